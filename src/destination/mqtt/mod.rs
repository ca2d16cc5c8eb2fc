//! `mqtt` backend (NOTIFICATION kind): publishes the record JSON with QoS 1
//! and waits for the broker's PUBACK. MQTT 3.1.1 has no message id header:
//! the record id is inside the JSON, and subscribers deduplicate on it (QoS 1
//! is at least once). One connection per resource; after any connection
//! error it is thrown away, every waiting record fails as retryable, and
//! the next send reconnects.

mod client;
mod config;
mod encode;

pub use config::MqttConfig;

use async_trait::async_trait;

use crate::destination::{Check, Destination, OutgoingRecord};
use crate::error::{DeliveryError, ErrorLabel};

/// Why an MQTT attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// The connection failed or dropped before the PUBACK.
    #[error("MQTT connection failed: {0}")]
    Connection(String),
    /// The broker refused the connection (CONNACK code).
    #[error("MQTT broker refused the connection: {0}")]
    Refused(String),
    /// The last connect failed moments ago.
    #[error("MQTT broker unreachable; reconnecting in {0:?}; the last connect failed: {1}")]
    Paused(std::time::Duration, String),
    /// The client refused the request (its queue is closed).
    #[error("MQTT client stopped")]
    ClientStopped,
    /// The record is over `max_packet_bytes`.
    #[error("record of {size} bytes is over max_packet_bytes ({max})")]
    TooLarge {
        /// Size.
        size: usize,
        /// Limit.
        max: usize,
    },
}

impl From<MqttError> for DeliveryError {
    fn from(e: MqttError) -> Self {
        let message = e.to_string();
        match &e {
            MqttError::Connection(_) | MqttError::ClientStopped => {
                DeliveryError::retry(ErrorLabel::ConnectionFailed, message)
            }
            MqttError::Refused(reason)
                if reason.contains("NotAuthorized") || reason.contains("BadUserNamePassword") =>
            {
                DeliveryError::permanent(ErrorLabel::Unauthorized, message)
            }
            MqttError::Refused(_) => DeliveryError::retry(ErrorLabel::ConnectionFailed, message),
            MqttError::Paused(after, _) => {
                DeliveryError::retry(ErrorLabel::ConnectionFailed, message)
                    .with_retry_after(Some(*after))
            }
            MqttError::TooLarge { .. } => {
                DeliveryError::permanent(ErrorLabel::PayloadTooLarge, message)
            }
        }
    }
}

/// An MQTT destination.
pub struct MqttDestination {
    client: client::Client,
}

#[async_trait]
impl Destination for MqttDestination {
    fn backend(&self) -> &'static str {
        "mqtt"
    }

    async fn send(&self, record: &OutgoingRecord) -> Result<(), DeliveryError> {
        self.client.publish(record).await.map_err(Into::into)
    }

    async fn check(&self, _: &Check<'_>) -> Result<(), DeliveryError> {
        self.client.check().await.map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Scope;

    #[test]
    fn error_dispositions() {
        let scope = |e: MqttError| DeliveryError::from(e).scope();
        let dest = Scope::Destination { after: None };
        assert_eq!(scope(MqttError::Connection("reset".into())), dest);
        assert_eq!(scope(MqttError::ClientStopped), dest);
        assert_eq!(scope(MqttError::Refused("NotAuthorized".into())), dest);
        assert_eq!(scope(MqttError::Refused("ServerUnavailable".into())), dest);
        assert_eq!(
            scope(MqttError::TooLarge { size: 10, max: 5 }),
            Scope::Record
        );
    }
}
