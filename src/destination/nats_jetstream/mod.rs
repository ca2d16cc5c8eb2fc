//! `nats-jetstream` backend (STREAM kind): publishes with `Nats-Msg-Id` =
//! record id and waits for the stream's PubAck. A PubAck flagged duplicate
//! (the stream already had this id within its `duplicate_window`) counts as
//! delivered: that is the server-side dedup working. The key (functionId)
//! travels in the `Fnrelay-Key` header.

mod client;
mod config;
/// Connection options shared with the core `nats` backend.
pub mod config_support {
    pub use super::config::{NatsConnection, check_subject};
}
mod encode;

pub use config::{NatsConnection, NatsJetStreamConfig};

use async_nats::jetstream::context::PublishErrorKind;
use async_trait::async_trait;

use crate::destination::{Check, Destination, OutgoingRecord};
use crate::error::{DeliveryError, ErrorLabel};

/// Why a JetStream attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum JetStreamError {
    /// Could not connect.
    #[error("cannot connect to NATS")]
    Connect(#[source] async_nats::ConnectError),
    /// The last connect failed moments ago.
    #[error("NATS unreachable; reconnecting in {0:?}; the last connect failed: {1}")]
    Paused(std::time::Duration, String),
    /// Publish or PubAck failed.
    #[error("JetStream publish failed")]
    Publish(#[source] async_nats::jetstream::context::PublishError),
    /// No PubAck while the connection to the server is down.
    #[error("JetStream publish failed while disconnected from NATS")]
    Disconnected(#[source] async_nats::jetstream::context::PublishError),
    /// The stream checked at start is missing or cannot be created.
    #[error("stream `{stream}`: {reason}")]
    Stream {
        /// Stream name.
        stream: String,
        /// What went wrong.
        reason: String,
    },
}

impl From<JetStreamError> for DeliveryError {
    fn from(e: JetStreamError) -> Self {
        let message = e.to_string();
        match &e {
            JetStreamError::Connect(_) => {
                DeliveryError::retry(ErrorLabel::ConnectionFailed, message).with_source(e)
            }
            JetStreamError::Paused(after, _) => {
                DeliveryError::retry(ErrorLabel::ConnectionFailed, message)
                    .with_retry_after(Some(*after))
            }
            JetStreamError::Publish(p) => {
                let d = match p.kind() {
                    // No stream listens on the subject.
                    PublishErrorKind::StreamNotFound => {
                        DeliveryError::permanent(ErrorLabel::NotFound, message)
                    }
                    PublishErrorKind::MaxPayloadExceeded => {
                        DeliveryError::permanent(ErrorLabel::PayloadTooLarge, message)
                    }
                    PublishErrorKind::TimedOut => {
                        DeliveryError::retry(ErrorLabel::Timeout, message)
                    }
                    PublishErrorKind::BrokenPipe => {
                        DeliveryError::retry(ErrorLabel::ConnectionFailed, message)
                    }
                    PublishErrorKind::MaxAckPending => {
                        DeliveryError::retry(ErrorLabel::Throttled, message)
                    }
                    // Expected-last-id/sequence checks are not used by fnrelay.
                    PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => {
                        DeliveryError::permanent(ErrorLabel::Rejected, message)
                    }
                    PublishErrorKind::Other => {
                        DeliveryError::retry(ErrorLabel::ServerError, message)
                    }
                };
                d.with_source(e)
            }
            JetStreamError::Stream { .. } => {
                DeliveryError::permanent(ErrorLabel::NotFound, message)
            }
            JetStreamError::Disconnected(_) => {
                DeliveryError::retry(ErrorLabel::ConnectionFailed, message).with_source(e)
            }
        }
    }
}

/// A JetStream destination.
pub struct NatsJetStreamDestination {
    client: client::Client,
}

#[async_trait]
impl Destination for NatsJetStreamDestination {
    fn backend(&self) -> &'static str {
        "nats-jetstream"
    }

    async fn send(&self, record: &OutgoingRecord) -> Result<(), DeliveryError> {
        self.client.publish(record).await.map_err(Into::into)
    }

    async fn check(&self, check: &Check<'_>) -> Result<(), DeliveryError> {
        self.client.check(check.declare).await.map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};

    use super::*;
    use crate::error::Scope;

    #[test]
    fn error_dispositions() {
        let scope = |k: PublishErrorKind| {
            DeliveryError::from(JetStreamError::Publish(PublishError::new(k))).scope()
        };
        let dest = Scope::Destination { after: None };
        // No responders: no stream, or JetStream restarting or electing a
        // leader. Never the record's fault.
        assert_eq!(scope(PublishErrorKind::StreamNotFound), dest);
        assert_eq!(scope(PublishErrorKind::BrokenPipe), dest);
        assert_eq!(scope(PublishErrorKind::MaxAckPending), dest);
        assert_eq!(
            scope(PublishErrorKind::TimedOut),
            Scope::Send { after: None }
        );
        assert_eq!(scope(PublishErrorKind::Other), Scope::Send { after: None });
        assert_eq!(scope(PublishErrorKind::MaxPayloadExceeded), Scope::Record);
        let stream = JetStreamError::Stream {
            stream: "S".into(),
            reason: "cannot create".into(),
        };
        assert_eq!(DeliveryError::from(stream).scope(), dest);
    }
}
