//! `webhook` backend: POSTs the record JSON to an HTTP(S) endpoint with the
//! Standard Webhooks headers (`webhook-id` = record id, so receivers
//! deduplicate retries; `webhook-timestamp`; `webhook-signature` when a
//! secret is set). Any 2xx is delivered; other answers are classified by
//! [`crate::destination::http::classify_status`]. Redirects are not followed.

mod client;
mod config;
mod encode;

pub use config::WebhookConfig;
pub use encode::{Secret, sign};

use std::time::Duration;

use async_trait::async_trait;

use crate::destination::http;
use crate::destination::{Destination, OutgoingRecord};
use crate::error::DeliveryError;

/// Why a webhook attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// No answer in time.
    #[error("webhook request timed out")]
    Timeout(#[source] reqwest::Error),
    /// Could not connect (refused, DNS, TLS, or an address the SSRF guard blocks).
    #[error("cannot connect to webhook")]
    Connect(#[source] reqwest::Error),
    /// The request failed after connecting (connection reset, bad response).
    #[error("webhook request failed")]
    Transport(#[source] reqwest::Error),
    /// The receiver answered with a non-2xx status.
    #[error("webhook answered {status}{}", if .body.is_empty() { String::new() } else { format!(": {}", .body) })]
    Status {
        /// HTTP status.
        status: u16,
        /// Parsed `Retry-After`.
        retry_after: Option<Duration>,
        /// The first bytes of the answer body, for the logs.
        body: String,
    },
}

impl From<WebhookError> for DeliveryError {
    fn from(e: WebhookError) -> Self {
        let message = e.to_string();
        match e {
            WebhookError::Timeout(inner) => http::request_error(true, message, inner),
            WebhookError::Connect(inner) | WebhookError::Transport(inner) => {
                http::request_error(false, message, inner)
            }
            WebhookError::Status {
                status,
                retry_after,
                ..
            } => http::status_error(status, retry_after, message),
        }
    }
}

/// A webhook destination.
pub struct WebhookDestination {
    client: client::Client,
}

#[async_trait]
impl Destination for WebhookDestination {
    fn backend(&self) -> &'static str {
        "webhook"
    }

    async fn send(&self, record: &OutgoingRecord) -> Result<(), DeliveryError> {
        self.client.post(record).await.map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Scope;

    #[test]
    fn status_dispositions() {
        let scope = |status: u16| {
            DeliveryError::from(WebhookError::Status {
                status,
                retry_after: None,
                body: String::new(),
            })
            .scope()
        };
        let dest = Scope::Destination { after: None };
        for s in [401, 403, 404, 410, 429] {
            assert_eq!(scope(s), dest, "{s}: the receiver's failure");
        }
        for s in [408, 500, 502, 503] {
            assert_eq!(scope(s), Scope::Send { after: None }, "{s}");
        }
        for s in [400, 413, 422, 301] {
            assert_eq!(scope(s), Scope::Record, "{s}: this record's fault");
        }
    }
}
