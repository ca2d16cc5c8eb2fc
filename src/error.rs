//! The delivery error vocabulary shared by every backend, the dispatcher and
//! the metrics (SPEC section 7), and the disposition of a failed attempt.

use std::fmt;
use std::time::Duration;

/// The bounded `error_message` label. Raw error text never becomes a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorLabel {
    /// The destination did not answer in time.
    Timeout,
    /// The destination asked us to slow down (429 or its equivalent).
    Throttled,
    /// Credentials missing or wrong (401).
    Unauthorized,
    /// Credentials valid but not allowed (403).
    Forbidden,
    /// The destination resource does not exist (404, missing queue or stream).
    NotFound,
    /// The record is over the destination's size limit.
    PayloadTooLarge,
    /// Could not connect, or the connection dropped.
    ConnectionFailed,
    /// The destination refused this record (400, unroutable, nack).
    Rejected,
    /// The destination failed on its side (5xx).
    ServerError,
    /// The record outlived `delivery.max_record_age`.
    RecordExpired,
    /// Anything else.
    Other,
}

impl ErrorLabel {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorLabel::Timeout => "timeout",
            ErrorLabel::Throttled => "throttled",
            ErrorLabel::Unauthorized => "unauthorized",
            ErrorLabel::Forbidden => "forbidden",
            ErrorLabel::NotFound => "not_found",
            ErrorLabel::PayloadTooLarge => "payload_too_large",
            ErrorLabel::ConnectionFailed => "connection_failed",
            ErrorLabel::Rejected => "rejected",
            ErrorLabel::ServerError => "server_error",
            ErrorLabel::RecordExpired => "record_expired",
            ErrorLabel::Other => "other",
        }
    }
}

impl fmt::Display for ErrorLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the dispatcher does after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Try again later; `after` is the destination's hint (Retry-After).
    Retry {
        /// Server-suggested delay, clamped to `delivery.max_backoff` by the caller.
        after: Option<Duration>,
    },
    /// Retrying cannot help: dead-letter now.
    Permanent,
    /// The destination as a whole cannot take records now (cannot connect,
    /// not authorized, queue or stream missing, no responders, throttled):
    /// the breaker opens and records wait without using attempts. `after`
    /// is the destination's hint.
    Unavailable {
        /// Server-suggested delay.
        after: Option<Duration>,
    },
}

/// Whose failure a failed attempt is (SPEC section 10), which decides what
/// happens to the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The destination as a whole failed: open the breaker, release the
    /// record without using an attempt.
    Destination {
        /// Server-suggested delay.
        after: Option<Duration>,
    },
    /// A real send failed and may succeed later: the attempt counts, the
    /// record is retried after a backoff.
    Send {
        /// Server-suggested delay.
        after: Option<Duration>,
    },
    /// The record itself is at fault (too large, malformed): dead-letter it.
    Record,
}

/// A failed delivery attempt, classified. Backends convert their own error
/// enums into this with an exhaustive match.
#[derive(Debug, thiserror::Error)]
#[error("{label}: {message}")]
pub struct DeliveryError {
    /// Metric label.
    pub label: ErrorLabel,
    /// Retry or not.
    pub disposition: Disposition,
    /// Human text for logs and the journal's `last_error`.
    pub message: String,
    /// The underlying error, if any.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
    /// A copy of the failure of a request that carried several records
    /// (see [`DeliveryError::replicate`]): it may be another record's fault.
    pub batch_wide: bool,
}

impl DeliveryError {
    /// A retryable error.
    pub fn retry(label: ErrorLabel, message: impl Into<String>) -> Self {
        Self {
            label,
            disposition: Disposition::Retry { after: None },
            message: message.into(),
            source: None,
            batch_wide: false,
        }
    }

    /// A permanent error.
    pub fn permanent(label: ErrorLabel, message: impl Into<String>) -> Self {
        Self {
            label,
            disposition: Disposition::Permanent,
            message: message.into(),
            source: None,
            batch_wide: false,
        }
    }

    /// Adds the server's retry hint.
    pub fn with_retry_after(mut self, after: Option<Duration>) -> Self {
        match &mut self.disposition {
            Disposition::Retry { after: slot } | Disposition::Unavailable { after: slot } => {
                *slot = after
            }
            Disposition::Permanent => {}
        }
        self
    }

    /// Keeps the cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// A copy for each record of a request that failed as a whole (the
    /// cause is kept as text).
    pub fn replicate(&self) -> Self {
        Self {
            label: self.label,
            disposition: self.disposition,
            message: self.full_message(),
            source: None,
            batch_wide: true,
        }
    }

    /// A destination-wide failure (see [`Disposition::Unavailable`]).
    pub fn unavailable(label: ErrorLabel, message: impl Into<String>) -> Self {
        Self {
            label,
            disposition: Disposition::Unavailable { after: None },
            message: message.into(),
            source: None,
            batch_wide: false,
        }
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self.disposition, Disposition::Permanent)
    }

    /// Whose failure this is. Backends say it explicitly with
    /// [`Disposition::Unavailable`]; otherwise the label decides: failing to
    /// connect, authenticate, find the resource or being throttled is the
    /// destination's, whatever the backend called retryable; a record too
    /// large or rejected as it is, is the record's.
    pub fn scope(&self) -> Scope {
        match (self.disposition, self.label) {
            (Disposition::Unavailable { after }, _) => Scope::Destination { after },
            (
                Disposition::Retry { after },
                ErrorLabel::ConnectionFailed
                | ErrorLabel::Unauthorized
                | ErrorLabel::Forbidden
                | ErrorLabel::NotFound
                | ErrorLabel::Throttled,
            ) => Scope::Destination { after },
            (
                Disposition::Permanent,
                ErrorLabel::ConnectionFailed
                | ErrorLabel::Unauthorized
                | ErrorLabel::Forbidden
                | ErrorLabel::NotFound
                | ErrorLabel::Throttled,
            ) => Scope::Destination { after: None },
            (Disposition::Retry { after }, _) => Scope::Send { after },
            (Disposition::Permanent, _) => Scope::Record,
        }
    }

    /// Message with the whole source chain, for logs and the journal.
    pub fn full_message(&self) -> String {
        let mut out = self.message.clone();
        let mut cause: Option<&(dyn std::error::Error + 'static)> = self
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static));
        while let Some(e) = cause {
            let text = e.to_string();
            if !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            cause = e.source();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_table() {
        use ErrorLabel::*;
        let retry = |l| DeliveryError::retry(l, "x").scope();
        let permanent = |l| DeliveryError::permanent(l, "x").scope();
        let dest = Scope::Destination { after: None };
        let send = Scope::Send { after: None };
        for l in [
            ConnectionFailed,
            Unauthorized,
            Forbidden,
            NotFound,
            Throttled,
        ] {
            assert_eq!(retry(l), dest, "{l} retryable");
            assert_eq!(permanent(l), dest, "{l} permanent");
        }
        for l in [Timeout, ServerError, Other] {
            assert_eq!(retry(l), send, "{l}");
        }
        for l in [PayloadTooLarge, Rejected] {
            assert_eq!(permanent(l), Scope::Record, "{l}");
        }
        let hinted = DeliveryError::unavailable(Rejected, "wrong type")
            .with_retry_after(Some(Duration::from_secs(3)));
        assert_eq!(
            hinted.scope(),
            Scope::Destination {
                after: Some(Duration::from_secs(3))
            }
        );
    }

    #[test]
    fn full_message_keeps_the_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = DeliveryError::retry(ErrorLabel::ConnectionFailed, "POST failed").with_source(io);
        assert_eq!(e.full_message(), "POST failed: refused");
        assert!(e.is_retryable());
        let p = DeliveryError::permanent(ErrorLabel::Rejected, "400")
            .with_retry_after(Some(Duration::from_secs(1)));
        assert_eq!(p.disposition, Disposition::Permanent);
    }
}
