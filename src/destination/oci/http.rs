//! The signed OCI call and its error mapping (the one network call every
//! OCI backend makes).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::Url;
use reqwest::header::RETRY_AFTER;

use super::signer::{Request, Signer, http_date_now};
use crate::destination::http::{parse_retry_after, request_error, status_error};
use crate::error::{DeliveryError, ErrorLabel};

/// Why an OCI call failed.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// No answer in time.
    #[error("OCI request timed out")]
    Timeout(#[source] reqwest::Error),
    /// Could not connect.
    #[error("cannot connect to the OCI endpoint")]
    Connect(#[source] reqwest::Error),
    /// Failed after connecting.
    #[error("OCI request failed")]
    Transport(#[source] reqwest::Error),
    /// The service answered with an error.
    #[error("OCI answered {status} {code}: {message} (opc-request-id {request_id})")]
    Status {
        /// HTTP status.
        status: u16,
        /// OCI error code, e.g. `NotAuthorizedOrNotFound`.
        code: String,
        /// OCI error message.
        message: String,
        /// `opc-request-id` to quote to Oracle.
        request_id: String,
        /// `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// A 2xx answer whose body is not what the API documents.
    #[error("unexpected OCI response: {0}")]
    Decode(String),
    /// The record cannot fit the service's size limit.
    #[error(
        "record of {size} bytes is over the service limit of {limit} bytes, even with errorMessage truncated"
    )]
    TooLarge {
        /// Record size.
        size: usize,
        /// Limit.
        limit: usize,
    },
}

impl From<OciError> for DeliveryError {
    fn from(e: OciError) -> Self {
        let message = e.to_string();
        match &e {
            OciError::Timeout(_) => request_error(true, message, e),
            OciError::Connect(_) | OciError::Transport(_) => request_error(false, message, e),
            OciError::Status {
                status,
                code,
                retry_after,
                ..
            } => match (status, code.as_str()) {
                // IncorrectState (resource updating) and LockConflict pass; a
                // plain Conflict does not (reference/oci-rest.md section 0).
                (409, "IncorrectState" | "LockConflict") => {
                    DeliveryError::retry(ErrorLabel::ServerError, message)
                        .with_retry_after(*retry_after)
                }
                (409, _) => DeliveryError::permanent(ErrorLabel::Rejected, message),
                // 501 NotImplemented will not start working on retry.
                (501, _) => DeliveryError::permanent(ErrorLabel::Rejected, message),
                (s, _) => status_error(*s, *retry_after, message),
            },
            OciError::Decode(_) => DeliveryError::retry(ErrorLabel::ServerError, message),
            OciError::TooLarge { .. } => {
                DeliveryError::permanent(ErrorLabel::PayloadTooLarge, message)
            }
        }
    }
}

/// An HTTP client for one OCI endpoint and API key.
pub struct OciClient {
    http: reqwest::Client,
    endpoint: Url,
    signer: Arc<Signer>,
}

impl OciClient {
    /// Builds the client.
    pub fn new(endpoint: &str, signer: Signer, timeout: Duration) -> Result<Self, std::io::Error> {
        let endpoint = Url::parse(endpoint).map_err(std::io::Error::other)?;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("fnrelay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(std::io::Error::other)?;
        Ok(Self {
            http,
            endpoint,
            signer: Arc::new(signer),
        })
    }

    /// POSTs a JSON body to the path made of `segments` (each
    /// percent-encoded), signed with the body headers when `sign_body`.
    /// Returns the 2xx body.
    pub async fn post(
        &self,
        segments: &[&str],
        body: Vec<u8>,
        sign_body: bool,
    ) -> Result<Bytes, OciError> {
        let mut url = self.endpoint.clone();
        url.path_segments_mut()
            .map_err(|()| OciError::Decode("endpoint cannot take a path".into()))?
            .clear()
            .extend(segments);
        let host = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_string(),
        };
        let date = http_date_now();
        let headers = self.signer.sign(
            &Request {
                method: "POST",
                path_and_query: url.path(),
                host: &host,
                date: &date,
                body: &body,
                content_type: "application/json",
            },
            sign_body,
        );
        let mut request = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .header("opc-request-id", ulid::Ulid::generate().to_string());
        for (name, value) in headers {
            if name != "content-type" {
                request = request.header(name, value);
            }
        }
        let response = request.body(body).send().await.map_err(|e| {
            if e.is_timeout() {
                OciError::Timeout(e)
            } else if e.is_connect() {
                OciError::Connect(e)
            } else {
                OciError::Transport(e)
            }
        })?;
        let status = response.status();
        let request_id = response
            .headers()
            .get("opc-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let bytes = response.bytes().await.map_err(OciError::Transport)?;
        if status.is_success() {
            return Ok(bytes);
        }
        let error: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let text = |k: &str| {
            error
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        Err(OciError::Status {
            status: status.as_u16(),
            code: text("code"),
            message: text("message"),
            request_id,
            retry_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: u16, code: &str) -> (String, bool) {
        let d: DeliveryError = OciError::Status {
            status: s,
            code: code.into(),
            message: String::new(),
            request_id: String::new(),
            retry_after: None,
        }
        .into();
        (d.label.as_str().to_string(), d.is_retryable())
    }

    #[test]
    fn oci_status_table() {
        let table = [
            (400, "InvalidParameter", "rejected", false),
            (401, "NotAuthenticated", "unauthorized", false),
            (403, "Forbidden", "forbidden", false),
            (404, "NotAuthorizedOrNotFound", "not_found", false),
            (409, "IncorrectState", "server_error", true),
            (409, "Conflict", "rejected", false),
            (413, "", "payload_too_large", false),
            (429, "TooManyRequests", "throttled", true),
            (500, "InternalServerError", "server_error", true),
            (501, "NotImplemented", "rejected", false),
            (503, "ServiceUnavailable", "server_error", true),
        ];
        for (s, code, label, retry) in table {
            assert_eq!(status(s, code), (label.to_string(), retry), "{s} {code}");
        }
    }
}
