//! `amqp` backend (RabbitMQ, QUEUE kind): persistent messages with
//! `message_id` = record id, `mandatory` so an unroutable message is an
//! error, and publisher confirms awaited before the record counts as
//! delivered. One connection with a confirm-mode channel per resource,
//! shared by all workers (confirms pipeline on it), rebuilt after an error.

mod client;
mod config;
mod encode;

pub use config::{AmqpConfig, ChannelIdAs};

use async_trait::async_trait;

use crate::destination::{Check, Destination, OutgoingRecord};
use crate::error::{DeliveryError, ErrorLabel};

/// Why an AMQP attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// Connecting or opening the channel failed.
    #[error("cannot connect to the AMQP broker")]
    Connect(#[source] lapin::Error),
    /// The last connect failed moments ago.
    #[error("AMQP broker unreachable; reconnecting in {0:?}; the last connect failed: {1}")]
    Paused(std::time::Duration, String),
    /// Publishing or waiting for the confirm failed.
    #[error("AMQP publish failed")]
    Publish(#[source] lapin::Error),
    /// The broker returned the message: no queue is bound for it.
    #[error(
        "message unroutable: no queue bound to exchange `{exchange}` with routing key `{routing_key}`"
    )]
    Unroutable {
        /// Exchange published to.
        exchange: String,
        /// Routing key used.
        routing_key: String,
    },
    /// The broker nacked the message.
    #[error("broker nacked the message")]
    Nacked,
    /// No confirm within `confirm_timeout`; the connection is rebuilt.
    #[error("no publisher confirm within confirm_timeout ({0:?}); reconnecting")]
    ConfirmTimeout(std::time::Duration),
    /// With the default exchange, routing keys the configured routes
    /// produce that name no queue: their records would come back
    /// unroutable.
    #[error(
        "{keys} name(s) no queue on the broker, so their records would be returned as unroutable; to publish to one queue whatever the channelId, set `queue = \"<queue name>\"` (the channelId then goes in the channel-id header), or set `channel_id_as = \"header\"`, or publish through a named `exchange` bound to the queue"
    )]
    NoQueueForKey {
        /// Each key with the configuration that produces it, as text.
        keys: String,
    },
    /// The queue or exchange checked at start is missing.
    #[error("{what} `{name}` does not exist on the broker (set declare = true to create it)")]
    Missing {
        /// `queue` or `exchange`.
        what: &'static str,
        /// Its name.
        name: String,
    },
}

/// Reply code of an AMQP protocol error, if that is what `e` is.
fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => Some(p.get_id()),
        _ => None,
    }
}

fn classify(e: &lapin::Error) -> (ErrorLabel, bool) {
    match reply_code(e) {
        Some(403) => (ErrorLabel::Forbidden, false),
        Some(404) => (ErrorLabel::NotFound, false),
        Some(311) => (ErrorLabel::PayloadTooLarge, false), // CONTENT_TOO_LARGE
        Some(406) => (ErrorLabel::Rejected, false),        // PRECONDITION_FAILED
        Some(_) => (ErrorLabel::ServerError, true),
        None => (ErrorLabel::ConnectionFailed, true),
    }
}

impl From<AmqpError> for DeliveryError {
    fn from(e: AmqpError) -> Self {
        let message = e.to_string();
        match &e {
            AmqpError::Connect(inner) => {
                let (label, retry) = match reply_code(inner) {
                    Some(403) => (ErrorLabel::Unauthorized, false),
                    _ => (ErrorLabel::ConnectionFailed, true),
                };
                let d = if retry {
                    DeliveryError::retry(label, message)
                } else {
                    DeliveryError::permanent(label, message)
                };
                d.with_source(e)
            }
            AmqpError::Paused(after, _) => {
                DeliveryError::retry(ErrorLabel::ConnectionFailed, message)
                    .with_retry_after(Some(*after))
            }
            AmqpError::Publish(inner) => {
                let (label, retry) = classify(inner);
                let d = if retry {
                    DeliveryError::retry(label, message)
                } else {
                    DeliveryError::permanent(label, message)
                };
                d.with_source(e)
            }
            AmqpError::Unroutable { .. } => DeliveryError::permanent(ErrorLabel::NotFound, message),
            AmqpError::Nacked => DeliveryError::retry(ErrorLabel::ServerError, message),
            AmqpError::ConfirmTimeout(_) => DeliveryError::retry(ErrorLabel::Timeout, message),
            AmqpError::Missing { .. } | AmqpError::NoQueueForKey { .. } => {
                DeliveryError::permanent(ErrorLabel::NotFound, message)
            }
        }
    }
}

/// A RabbitMQ destination.
pub struct AmqpDestination {
    client: client::Client,
}

#[async_trait]
impl Destination for AmqpDestination {
    fn backend(&self) -> &'static str {
        "amqp"
    }

    async fn send(&self, record: &OutgoingRecord) -> Result<(), DeliveryError> {
        self.client.publish(record).await.map_err(Into::into)
    }

    async fn check(&self, check: &Check<'_>) -> Result<(), DeliveryError> {
        self.client.check(check).await.map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::error::Scope;

    #[test]
    fn error_dispositions() {
        let scope = |e: AmqpError| DeliveryError::from(e).scope();
        let dest = Scope::Destination { after: None };
        // Nothing bound, or the queue missing: every record would fail the
        // same way; they wait for an operator.
        let unroutable = AmqpError::Unroutable {
            exchange: String::new(),
            routing_key: "k".into(),
        };
        assert_eq!(scope(unroutable), dest);
        let missing = AmqpError::Missing {
            what: "queue",
            name: "q".into(),
        };
        assert_eq!(scope(missing), dest);
        assert_eq!(scope(AmqpError::Nacked), Scope::Send { after: None });
        assert_eq!(
            scope(AmqpError::ConfirmTimeout(Duration::from_secs(10))),
            Scope::Send { after: None }
        );
        assert_eq!(
            scope(AmqpError::Paused(Duration::from_secs(2), "refused".into())),
            Scope::Destination {
                after: Some(Duration::from_secs(2))
            }
        );
    }
}
