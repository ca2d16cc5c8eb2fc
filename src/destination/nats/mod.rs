//! `nats` backend (NOTIFICATION kind): core NATS publish, confirmed by a
//! marker echoed through this connection's own inbox (see `client.rs`):
//! the server has processed the record and passed it to the subscribers
//! connected at that moment. Delivery to
//! subscribers is at most once (a subscriber that is disconnected misses
//! it). Use `nats-jetstream` when records must not be missed. The record id
//! travels in `Nats-Msg-Id` so subscribers can deduplicate retries.

mod client;
mod config;
mod encode;

pub use config::NatsConfig;

use async_trait::async_trait;

use crate::destination::{Destination, OutgoingRecord};
use crate::error::{DeliveryError, ErrorLabel};

/// Why a core NATS attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// Could not connect.
    #[error("cannot connect to NATS")]
    Connect(#[source] async_nats::ConnectError),
    /// The last connect failed moments ago.
    #[error("NATS unreachable; reconnecting in {0:?}; the last connect failed: {1}")]
    Paused(std::time::Duration, String),
    /// The message is over the server's max_payload.
    #[error("record of {size} bytes is over the server's max_payload of {max}")]
    TooLarge {
        /// Message size.
        size: usize,
        /// Server limit.
        max: usize,
    },
    /// Publish was refused by the client.
    #[error("NATS publish failed")]
    Publish(#[source] async_nats::PublishError),
    /// The flush did not complete (connection down).
    #[error("NATS flush failed")]
    Flush(#[source] async_nats::client::FlushError),
    /// The confirmation marker did not come back in time: the server may
    /// not have the record (connection lost).
    #[error("NATS server did not confirm the publish in time")]
    NotConfirmed,
    /// Subscribing to the confirmation inbox failed.
    #[error("cannot subscribe to the confirmation inbox: {0}")]
    Subscribe(String),
}

impl From<NatsError> for DeliveryError {
    fn from(e: NatsError) -> Self {
        let message = e.to_string();
        match &e {
            NatsError::Subscribe(_) => DeliveryError::retry(ErrorLabel::ConnectionFailed, message),
            NatsError::Connect(_) | NatsError::Publish(_) | NatsError::Flush(_) => {
                DeliveryError::retry(ErrorLabel::ConnectionFailed, message).with_source(e)
            }
            NatsError::Paused(after, _) => {
                DeliveryError::retry(ErrorLabel::ConnectionFailed, message)
                    .with_retry_after(Some(*after))
            }
            NatsError::TooLarge { .. } => {
                DeliveryError::permanent(ErrorLabel::PayloadTooLarge, message)
            }
            NatsError::NotConfirmed => DeliveryError::retry(ErrorLabel::Timeout, message),
        }
    }
}

/// A core NATS destination.
pub struct NatsDestination {
    client: client::Client,
}

#[async_trait]
impl Destination for NatsDestination {
    fn backend(&self) -> &'static str {
        "nats"
    }

    async fn send(&self, record: &OutgoingRecord) -> Result<(), DeliveryError> {
        self.send_batch(std::slice::from_ref(record))
            .await
            .pop()
            .expect("one result")
    }

    /// The batch is published in order, then one marker confirms it all.
    async fn send_batch(&self, records: &[OutgoingRecord]) -> Vec<Result<(), DeliveryError>> {
        let (own, shared) = self.client.publish_many(records).await;
        let shared = shared.map_err(DeliveryError::from);
        own.into_iter()
            .map(|e| match (e, &shared) {
                (Some(e), _) => Err(e.into()),
                (None, Ok(())) => Ok(()),
                (None, Err(e)) => Err(e.replicate()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Scope;

    #[test]
    fn error_dispositions() {
        let scope = |e: NatsError| DeliveryError::from(e).scope();
        assert_eq!(
            scope(NatsError::Subscribe("no inbox".into())),
            Scope::Destination { after: None }
        );
        assert_eq!(scope(NatsError::NotConfirmed), Scope::Send { after: None });
        assert!(matches!(
            scope(NatsError::Paused(
                std::time::Duration::from_secs(1),
                "refused".into()
            )),
            Scope::Destination { after: Some(_) }
        ));
    }
}
