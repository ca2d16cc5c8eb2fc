//! `redis-streams` backend (STREAM kind): `XADD stream_key [MAXLEN ~ n] *
//! id <record id> key <functionId> record <record JSON>`. The entry id the
//! server answers is the confirmation. Redis 7 has no idempotent XADD, so a
//! retried record can appear twice; consumers deduplicate on the `id` field.
//! The connection manager reconnects by itself after a drop.

mod client;
mod config;
mod encode;

pub use config::RedisStreamsConfig;

use async_trait::async_trait;

use crate::destination::{Check, Destination, OutgoingRecord};
use crate::error::{DeliveryError, ErrorLabel};

/// Why a Redis attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisStreamsError {
    /// Could not connect.
    #[error("cannot connect to Redis")]
    Connect(#[source] redis::RedisError),
    /// The last connect failed moments ago.
    #[error("Redis unreachable; reconnecting in {0:?}; the last connect failed: {1}")]
    Paused(std::time::Duration, String),
    /// The command failed.
    #[error("XADD failed")]
    Command(#[source] redis::RedisError),
    /// A pipeline's answer did not have one result per command.
    #[error("Redis answered {got} results for a pipeline of {sent} XADDs")]
    Answers {
        /// Results received.
        got: usize,
        /// Commands sent.
        sent: usize,
    },
    /// The stream key holds another type (found by the start check).
    #[error("key `{key}` is a {kind}, not a stream")]
    WrongType {
        /// The key.
        key: String,
        /// Its Redis type.
        kind: String,
    },
}

fn classify(e: &redis::RedisError) -> (ErrorLabel, bool) {
    if e.is_timeout() {
        return (ErrorLabel::Timeout, true);
    }
    if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() {
        return (ErrorLabel::ConnectionFailed, true);
    }
    match e.code() {
        // The key holds another type: no record can be added there until an
        // operator fixes the key (destination-wide, see `From` below).
        Some("WRONGTYPE") => (ErrorLabel::Rejected, false),
        Some("NOAUTH") | Some("WRONGPASS") => (ErrorLabel::Unauthorized, false),
        Some("NOPERM") => (ErrorLabel::Forbidden, false),
        // OOM, LOADING, BUSY, READONLY, MASTERDOWN, TRYAGAIN, ERR ...: the
        // server may recover; do not lose the record over it.
        Some(_) => (ErrorLabel::ServerError, true),
        None => (ErrorLabel::Other, true),
    }
}

impl From<RedisStreamsError> for DeliveryError {
    fn from(e: RedisStreamsError) -> Self {
        let message = e.to_string();
        let wrong_type = match &e {
            RedisStreamsError::WrongType { .. } => true,
            RedisStreamsError::Command(inner) => inner.code() == Some("WRONGTYPE"),
            _ => false,
        };
        if wrong_type {
            // Every record of this resource would fail the same way: the
            // destination's failure, the records wait (SPEC section 10).
            return DeliveryError::unavailable(ErrorLabel::Rejected, message).with_source(e);
        }
        let (label, retry) = match &e {
            RedisStreamsError::Connect(inner) | RedisStreamsError::Command(inner) => {
                classify(inner)
            }
            RedisStreamsError::WrongType { .. } => (ErrorLabel::Rejected, false),
            RedisStreamsError::Answers { .. } => (ErrorLabel::ServerError, true),
            RedisStreamsError::Paused(after, _) => {
                return DeliveryError::retry(ErrorLabel::ConnectionFailed, message)
                    .with_retry_after(Some(*after));
            }
        };
        let d = if retry {
            DeliveryError::retry(label, message)
        } else {
            DeliveryError::permanent(label, message)
        };
        d.with_source(e)
    }
}

/// A Redis Streams destination.
pub struct RedisStreamsDestination {
    client: client::Client,
}

#[async_trait]
impl Destination for RedisStreamsDestination {
    fn backend(&self) -> &'static str {
        "redis-streams"
    }

    async fn send(&self, record: &OutgoingRecord) -> Result<(), DeliveryError> {
        self.client.xadd(record).await.map_err(Into::into)
    }

    /// One pipeline of XADDs for the whole batch.
    async fn send_batch(&self, records: &[OutgoingRecord]) -> Vec<Result<(), DeliveryError>> {
        match self.client.xadd_batch(records).await {
            Ok(per) => per.into_iter().map(|r| r.map_err(Into::into)).collect(),
            Err(e) => {
                let e = DeliveryError::from(e);
                records.iter().map(|_| Err(e.replicate())).collect()
            }
        }
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
        // A key of another type blocks every record of the resource.
        let wrong = RedisStreamsError::WrongType {
            key: "k".into(),
            kind: "string".into(),
        };
        assert_eq!(
            DeliveryError::from(wrong).scope(),
            Scope::Destination { after: None }
        );
        let paused =
            RedisStreamsError::Paused(std::time::Duration::from_millis(300), "refused".into());
        assert_eq!(
            DeliveryError::from(paused).scope(),
            Scope::Destination {
                after: Some(std::time::Duration::from_millis(300))
            }
        );
    }
}
