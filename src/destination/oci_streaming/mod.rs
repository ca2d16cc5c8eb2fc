//! `oci-streaming` backend (STREAM kind): OCI Streaming PutMessages with
//! key = functionId and value = the record JSON (both base64). Concurrent
//! records share requests (up to 1 MB). The answer can fail some entries
//! and not others: each record gets its own entry's outcome, so only the
//! failed ones are retried and each is counted once. Signed without body
//! headers, as the OCI SDKs sign this operation.

mod client;
mod config;
mod encode;

pub use config::OciStreamingConfig;

use async_trait::async_trait;

use crate::destination::oci::batch::send_fitted;
use crate::destination::oci::{OciClient, OciConfig, OciError};
use crate::destination::{Destination, OutgoingRecord};
use crate::error::DeliveryError;

/// Largest message value (decoded bytes).
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Largest request (sum of decoded keys and values).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Largest key (decoded bytes).
pub const MAX_KEY_BYTES: usize = 256;
/// Most messages fnrelay puts in one request (the API sets no count limit).
pub const MAX_MESSAGES: usize = 200;

/// An OCI Streaming destination.
pub struct OciStreamingDestination {
    sink: client::StreamSink,
}

impl OciStreamingDestination {
    /// Builds the destination for stream `stream_id`.
    pub fn build(config: &OciConfig, stream_id: &str) -> Result<Self, std::io::Error> {
        let signer = config
            .signer()
            .map_err(|(k, r)| std::io::Error::other(format!("{k}: {r}")))?;
        let client = OciClient::new(&config.endpoint, signer, config.timeout)?;
        Ok(Self {
            sink: client::StreamSink {
                client,
                stream_id: stream_id.to_string(),
            },
        })
    }
}

#[async_trait]
impl Destination for OciStreamingDestination {
    fn backend(&self) -> &'static str {
        "oci-streaming"
    }

    async fn send(&self, record: &OutgoingRecord) -> Result<(), DeliveryError> {
        self.send_batch(std::slice::from_ref(record))
            .await
            .pop()
            .expect("one result")
    }

    async fn send_batch(&self, records: &[OutgoingRecord]) -> Vec<Result<(), DeliveryError>> {
        send_fitted(&self.sink, records, |r| {
            encode::fit(r)
                .map_err(|(size, limit)| DeliveryError::from(OciError::TooLarge { size, limit }))
        })
        .await
    }
}
