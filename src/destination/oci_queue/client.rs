//! PutMessages for a batch of records.

use async_trait::async_trait;

use super::{MAX_MESSAGES, MAX_REQUEST_BYTES, encode};
use crate::destination::OutgoingRecord;
use crate::destination::oci::batch::BatchSink;
use crate::destination::oci::{OciClient, OciError};
use crate::error::DeliveryError;

pub struct QueueSink {
    pub client: OciClient,
    pub queue_id: String,
}

#[async_trait]
impl BatchSink for QueueSink {
    fn max_records(&self) -> usize {
        MAX_MESSAGES
    }

    fn max_bytes(&self) -> usize {
        MAX_REQUEST_BYTES - 64
    }

    fn size(&self, record: &OutgoingRecord) -> usize {
        encode::size(record)
    }

    fn key(&self, record: &OutgoingRecord) -> Option<String> {
        // One channel per request: a multi-channel request can partly fail
        // with no documented per-entry report.
        record.channel_id.clone()
    }

    async fn send(&self, records: Vec<OutgoingRecord>) -> Vec<Result<(), DeliveryError>> {
        let n = records.len();
        let result = self
            .client
            .post(
                &["20210201", "queues", &self.queue_id, "messages"],
                encode::body(&records),
                true,
            )
            .await
            .and_then(|bytes| {
                let answer: serde_json::Value =
                    serde_json::from_slice(&bytes).map_err(|e| OciError::Decode(e.to_string()))?;
                let stored = answer["messages"].as_array().map_or(0, Vec::len);
                if stored == n {
                    Ok(())
                } else {
                    Err(OciError::Decode(format!(
                        "{stored} message ids for {n} messages"
                    )))
                }
            });
        match result {
            Ok(()) => (0..n).map(|_| Ok(())).collect(),
            Err(e) => {
                let e = DeliveryError::from(e);
                (0..n).map(|_| Err(e.replicate())).collect()
            }
        }
    }
}
