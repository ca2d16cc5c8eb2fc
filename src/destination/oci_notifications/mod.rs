//! `oci-notifications` backend (NOTIFICATION kind): PublishMessage with a
//! short title (function id, success or failure) and the record JSON as
//! the body. The service takes one message per request and at most 64 KB:
//! an oversize record gets its errorMessage truncated with a marker, or
//! fails as `payload_too_large` if even that cannot fit. Never dropped.

mod client;
mod config;
mod encode;

pub use config::OciNotificationsConfig;

use async_trait::async_trait;

use crate::destination::oci::{OciClient, OciConfig};
use crate::destination::{Destination, OutgoingRecord};
use crate::error::DeliveryError;

/// Largest message (title + body), bytes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Longest title fnrelay sends, bytes.
pub const MAX_TITLE_BYTES: usize = 128;

/// An OCI Notifications destination.
pub struct OciNotificationsDestination {
    client: OciClient,
    topic_id: String,
}

impl OciNotificationsDestination {
    /// Builds the destination for topic `topic_id`.
    pub fn build(config: &OciConfig, topic_id: &str) -> Result<Self, std::io::Error> {
        let signer = config
            .signer()
            .map_err(|(k, r)| std::io::Error::other(format!("{k}: {r}")))?;
        Ok(Self {
            client: OciClient::new(&config.endpoint, signer, config.timeout)?,
            topic_id: topic_id.to_string(),
        })
    }
}

#[async_trait]
impl Destination for OciNotificationsDestination {
    fn backend(&self) -> &'static str {
        "oci-notifications"
    }

    async fn send(&self, record: &OutgoingRecord) -> Result<(), DeliveryError> {
        client::publish(&self.client, &self.topic_id, record)
            .await
            .map_err(Into::into)
    }
}
