//! The HTTP error triage that the webhook and OCI backends share: what an
//! answered status means, the `Retry-After` hint, and what a failed
//! request (timeout, connect, transport) means.

use std::time::{Duration, SystemTime};

use crate::error::{DeliveryError, ErrorLabel};

/// Classifies an HTTP status answered by a destination. Returns `None` for
/// 2xx, else the label and whether another attempt may succeed. Whose
/// failure it is (the destination's for 401/403/404/410/429) is decided
/// from the label by [`DeliveryError::scope`].
pub fn classify_status(status: u16) -> Option<(ErrorLabel, bool)> {
    let retryable = true;
    Some(match status {
        200..=299 => return None,
        401 => (ErrorLabel::Unauthorized, !retryable),
        403 => (ErrorLabel::Forbidden, !retryable),
        404 | 410 => (ErrorLabel::NotFound, !retryable),
        413 => (ErrorLabel::PayloadTooLarge, !retryable),
        408 => (ErrorLabel::Timeout, retryable),
        429 => (ErrorLabel::Throttled, retryable),
        500..=599 => (ErrorLabel::ServerError, retryable),
        // 1xx/3xx (redirects are not followed) and the remaining 4xx: the
        // destination refused this request as it is.
        _ => (ErrorLabel::Rejected, !retryable),
    })
}

/// The error for an answered, non-2xx status, with the server's hint.
pub fn status_error(status: u16, retry_after: Option<Duration>, message: String) -> DeliveryError {
    match classify_status(status) {
        Some((label, true)) => DeliveryError::retry(label, message).with_retry_after(retry_after),
        Some((label, false)) => DeliveryError::permanent(label, message),
        // 2xx never becomes an error; if it does, it is retried.
        None => DeliveryError::retry(ErrorLabel::Other, message),
    }
}

/// The error for a request that got no answer: `timeout` for a timeout,
/// `connection_failed` for anything else (connect, DNS, TLS, reset).
pub fn request_error(
    timed_out: bool,
    message: String,
    source: impl std::error::Error + Send + Sync + 'static,
) -> DeliveryError {
    let label = if timed_out {
        ErrorLabel::Timeout
    } else {
        ErrorLabel::ConnectionFailed
    };
    DeliveryError::retry(label, message).with_source(source)
}

/// `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table() {
        let table: &[(u16, Option<(&str, bool)>)] = &[
            (200, None),
            (204, None),
            (301, Some(("rejected", false))),
            (400, Some(("rejected", false))),
            (401, Some(("unauthorized", false))),
            (403, Some(("forbidden", false))),
            (404, Some(("not_found", false))),
            (408, Some(("timeout", true))),
            (413, Some(("payload_too_large", false))),
            (422, Some(("rejected", false))),
            (429, Some(("throttled", true))),
            (500, Some(("server_error", true))),
            (503, Some(("server_error", true))),
        ];
        for (status, want) in table {
            let got = classify_status(*status).map(|(l, r)| (l.as_str(), r));
            assert_eq!(got, *want, "status {status}");
        }
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let got = parse_retry_after(&later).unwrap();
        assert!(
            got > Duration::from_secs(100) && got <= Duration::from_secs(120),
            "{got:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
