//! Options of the `nats` backend.

use serde::Deserialize;

use super::{NatsDestination, client};
use crate::destination::nats_jetstream::config_support::{NatsConnection, check_subject};

/// `backend = "nats"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Connection (same keys as `nats-jetstream`).
    #[serde(flatten)]
    pub connection: NatsConnection,
    /// Subject to publish on.
    pub subject: String,
}

impl NatsConfig {
    /// Problems as `(key, reason)`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = self.connection.validate();
        if let Some(reason) = check_subject(&self.subject) {
            out.push(("subject".into(), reason));
        }
        out
    }

    /// Builds the destination (connects lazily).
    pub fn build(&self) -> Result<NatsDestination, std::io::Error> {
        Ok(NatsDestination {
            client: client::Client::new(self.clone()),
        })
    }
}
