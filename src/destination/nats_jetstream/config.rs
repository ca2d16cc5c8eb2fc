//! Options of the `nats-jetstream` backend (and the connection options the
//! core `nats` backend shares).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{NatsJetStreamDestination, client};

/// Connection options shared by `nats` and `nats-jetstream`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConnection {
    /// `nats://host:4222` or `tls://host:4222` (comma-separated for a cluster).
    pub url: String,
    /// NATS credentials file (JWT + nkey seed).
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// Extra CA certificate (PEM) to trust for TLS.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Require TLS even for `nats://` URLs.
    #[serde(default)]
    pub tls_required: bool,
}

impl NatsConnection {
    /// Problems as `(key, reason)`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for url in self.url.split(',') {
            let url = url.trim();
            let ok = ["nats://", "tls://", "ws://", "wss://"]
                .iter()
                .any(|p| url.starts_with(p))
                && url::Url::parse(url).is_ok_and(|u| u.host().is_some());
            if !ok {
                out.push((
                    "url".into(),
                    format!("`{url}` is not a nats:// or tls:// URL"),
                ));
            }
        }
        for (key, path) in [
            ("credentials_file", &self.credentials_file),
            ("tls_ca_file", &self.tls_ca_file),
        ] {
            if let Some(path) = path
                && let Err(e) = std::fs::metadata(path)
            {
                out.push((key.into(), format!("cannot read {}: {e}", path.display())));
            }
        }
        out
    }

    /// Connects (async-nats then reconnects by itself in the background).
    pub async fn connect(&self) -> Result<async_nats::Client, async_nats::ConnectError> {
        let mut options = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .name("fnrelay");
        if let Some(path) = &self.credentials_file {
            options = options.credentials_file(path).await.map_err(|e| {
                async_nats::ConnectError::with_source(async_nats::ConnectErrorKind::Io, e)
            })?;
        }
        if let Some(path) = &self.tls_ca_file {
            options = options.add_root_certificates(path.clone());
        }
        if self.tls_required {
            options = options.require_tls(true);
        }
        options.connect(self.url.as_str()).await
    }
}

/// `backend = "nats-jetstream"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsJetStreamConfig {
    /// Connection.
    #[serde(flatten)]
    pub connection: NatsConnection,
    /// Subject to publish on; a stream must capture it.
    pub subject: String,
    /// Stream to check at start (or create, with `create_stream`).
    #[serde(default)]
    pub stream: Option<String>,
    /// Create `stream` (file storage, capturing `subject`) if it is missing.
    #[serde(default)]
    pub create_stream: bool,
    /// How long to wait for the PubAck.
    #[serde(default = "default_ack_timeout", with = "humantime_serde")]
    pub ack_timeout: Duration,
}

fn default_ack_timeout() -> Duration {
    Duration::from_secs(5)
}

/// Checks a subject for publishing: non-empty tokens, no wildcards or spaces.
pub fn check_subject(subject: &str) -> Option<String> {
    if subject.is_empty()
        || subject
            .split('.')
            .any(|t| t.is_empty() || t == "*" || t == ">")
        || subject.chars().any(char::is_whitespace)
    {
        Some(format!(
            "`{subject}` is not a valid subject to publish on (no wildcards, no empty tokens)"
        ))
    } else {
        None
    }
}

impl NatsJetStreamConfig {
    /// Problems as `(key, reason)`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = self.connection.validate();
        if let Some(reason) = check_subject(&self.subject) {
            out.push(("subject".into(), reason));
        }
        if self.create_stream && self.stream.is_none() {
            out.push((
                "create_stream".into(),
                "needs `stream` (the name to create)".into(),
            ));
        }
        out
    }

    /// Builds the destination (connects lazily).
    pub fn build(&self) -> Result<NatsJetStreamDestination, std::io::Error> {
        Ok(NatsJetStreamDestination {
            client: client::Client::new(self.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_urls() {
        assert_eq!(check_subject("fn.results"), None);
        assert!(check_subject("fn.*").is_some());
        assert!(check_subject("fn..x").is_some());
        assert!(check_subject("").is_some());
        let c = NatsConnection {
            url: "nats://127.0.0.1:4222, tls://n2:4222".into(),
            credentials_file: None,
            tls_ca_file: None,
            tls_required: false,
        };
        assert!(c.validate().is_empty());
        let bad = NatsConnection {
            url: "http://x".into(),
            ..c
        };
        assert_eq!(bad.validate()[0].0, "url");
    }
}
