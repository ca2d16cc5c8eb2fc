//! `oci-queue` backend (QUEUE kind): OCI Queue PutMessages. The message
//! content is the record JSON; the destination's channelId is the message
//! channel. A lane's batch is packed into requests (up to 20 messages and
//! 512 KB, one channel per request). Queue has no idempotency token: a retry after
//! a lost answer can store a record twice, with the same id inside.

mod client;
mod config;
mod encode;

pub use config::OciQueueConfig;

use async_trait::async_trait;

use crate::destination::oci::batch::send_fitted;
use crate::destination::oci::{OciClient, OciConfig, OciError};
use crate::destination::{Destination, OutgoingRecord};
use crate::error::DeliveryError;

/// Largest message content (bytes).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Most messages per PutMessages.
pub const MAX_MESSAGES: usize = 20;
/// Largest PutMessages request (bytes).
pub const MAX_REQUEST_BYTES: usize = 512 * 1024;

/// An OCI Queue destination.
pub struct OciQueueDestination {
    sink: client::QueueSink,
}

impl OciQueueDestination {
    /// Builds the destination for queue `queue_id`.
    pub fn build(config: &OciConfig, queue_id: &str) -> Result<Self, std::io::Error> {
        let signer = config
            .signer()
            .map_err(|(k, r)| std::io::Error::other(format!("{k}: {r}")))?;
        let client = OciClient::new(&config.endpoint, signer, config.timeout)?;
        let sink = client::QueueSink {
            client,
            queue_id: queue_id.to_string(),
        };
        Ok(Self { sink })
    }
}

#[async_trait]
impl Destination for OciQueueDestination {
    fn backend(&self) -> &'static str {
        "oci-queue"
    }

    async fn send(&self, record: &OutgoingRecord) -> Result<(), DeliveryError> {
        self.send_batch(std::slice::from_ref(record))
            .await
            .pop()
            .expect("one result")
    }

    async fn send_batch(&self, records: &[OutgoingRecord]) -> Vec<Result<(), DeliveryError>> {
        send_fitted(&self.sink, records, |r| {
            encode::fit(r).map_err(DeliveryError::from)
        })
        .await
    }
}

impl From<encode::Oversize> for DeliveryError {
    fn from(e: encode::Oversize) -> Self {
        OciError::TooLarge {
            size: e.size,
            limit: e.limit,
        }
        .into()
    }
}
