//! PutMessages for a batch, with per-entry outcomes.

use async_trait::async_trait;

use super::{MAX_MESSAGES, MAX_REQUEST_BYTES, encode};
use crate::destination::OutgoingRecord;
use crate::destination::oci::batch::BatchSink;
use crate::destination::oci::{OciClient, OciError};
use crate::error::{DeliveryError, ErrorLabel};

pub struct StreamSink {
    pub client: OciClient,
    pub stream_id: String,
}

/// The outcome of one response entry.
fn entry_result(entry: &serde_json::Value) -> Result<(), DeliveryError> {
    let Some(code) = entry.get("error").and_then(|e| e.as_str()) else {
        return Ok(());
    };
    let message = entry
        .get("errorMessage")
        .and_then(|m| m.as_str())
        .unwrap_or("");
    let text = format!("entry failed: {code}: {message}");
    // Per-entry failures are transient by nature (throttling, partition
    // unavailable): retry just this record.
    let label = if code.contains("Throttl") || code.contains("TooManyRequests") {
        ErrorLabel::Throttled
    } else {
        ErrorLabel::ServerError
    };
    Err(DeliveryError::retry(label, text))
}

#[async_trait]
impl BatchSink for StreamSink {
    fn max_records(&self) -> usize {
        MAX_MESSAGES
    }

    fn max_bytes(&self) -> usize {
        MAX_REQUEST_BYTES
    }

    fn size(&self, record: &OutgoingRecord) -> usize {
        encode::size(record)
    }

    fn key(&self, _record: &OutgoingRecord) -> Option<String> {
        None
    }

    async fn send(&self, records: Vec<OutgoingRecord>) -> Vec<Result<(), DeliveryError>> {
        let n = records.len();
        let answer = self
            .client
            .post(
                &["20180418", "streams", &self.stream_id, "messages"],
                encode::body(&records),
                false,
            )
            .await
            .and_then(|bytes| {
                serde_json::from_slice::<serde_json::Value>(&bytes)
                    .map_err(|e| OciError::Decode(e.to_string()))
            });
        match answer {
            Ok(answer) => match answer["entries"].as_array() {
                Some(entries) if entries.len() == n => entries.iter().map(entry_result).collect(),
                _ => {
                    let e = DeliveryError::from(OciError::Decode(format!(
                        "expected {n} entries in {answer}"
                    )));
                    (0..n).map(|_| Err(e.replicate())).collect()
                }
            },
            Err(e) => {
                let e = DeliveryError::from(e);
                (0..n).map(|_| Err(e.replicate())).collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries() {
        assert!(entry_result(&serde_json::json!({"partition": "0", "offset": 7})).is_ok());
        let e = entry_result(
            &serde_json::json!({"error": "TooManyRequests", "errorMessage": "slow down"}),
        )
        .unwrap_err();
        assert_eq!((e.label, e.is_retryable()), (ErrorLabel::Throttled, true));
        let e = entry_result(&serde_json::json!({"error": "InternalServerError"})).unwrap_err();
        assert_eq!(e.label, ErrorLabel::ServerError);
    }
}
