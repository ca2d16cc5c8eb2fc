//! The one network call of the webhook backend.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};

use super::WebhookError;
use super::config::Guard;
use super::encode::{Secret, sign};
use crate::destination::OutgoingRecord;

/// HTTP client bound to one endpoint.
pub struct Client {
    http: reqwest::Client,
    url: Url,
    secret: Option<Secret>,
}

/// Resolves names and drops the addresses the guard blocks, so a
/// public-looking host name cannot lead into the sidecar's network (SSRF).
struct Guarded(Arc<Guard>);

impl Resolve for Guarded {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        let guard = self.0.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| !guard.blocks(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!(
                    "{host} resolves only to private addresses (list them in allowed_networks, or set allow_private_network = true)"
                )
                .into());
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

impl Client {
    /// Builds the client.
    pub fn new(
        url: Url,
        secret: Option<Secret>,
        timeout: Duration,
        guard: Guard,
        ca: Option<Vec<u8>>,
    ) -> reqwest::Result<Self> {
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("fnrelay/", env!("CARGO_PKG_VERSION")));
        if !guard.allow_private {
            builder = builder.dns_resolver(Arc::new(Guarded(Arc::new(guard))));
        }
        if let Some(pem) = ca {
            for cert in reqwest::Certificate::from_pem_bundle(&pem)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Self {
            http: builder.build()?,
            url,
            secret,
        })
    }

    /// POSTs one record.
    pub async fn post(&self, record: &OutgoingRecord) -> Result<(), WebhookError> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        let mut request = self
            .http
            .post(self.url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static(record.content_type))
            .header("webhook-id", &record.id)
            .header("webhook-timestamp", now.to_string());
        // CloudEvents binary mode: the attributes as `ce-` headers.
        if let Some(ce) = &record.cloudevent {
            for (name, value) in ce.pairs() {
                if name != "datacontenttype" {
                    request = request.header(format!("ce-{name}"), value);
                }
            }
        }
        if let Some(secret) = &self.secret {
            request = request.header(
                "webhook-signature",
                sign(secret, &record.id, now, &record.body),
            );
        }
        let response = request
            .body(record.body.clone())
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    WebhookError::Timeout(e)
                } else if e.is_connect() {
                    WebhookError::Connect(e)
                } else {
                    WebhookError::Transport(e)
                }
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::destination::http::parse_retry_after);
        let mut body = response.text().await.unwrap_or_default();
        if body.len() > 200 {
            let mut cut = 200;
            while !body.is_char_boundary(cut) {
                cut -= 1;
            }
            body.truncate(cut);
        }
        Err(WebhookError::Status {
            status: status.as_u16(),
            retry_after,
            body,
        })
    }
}
