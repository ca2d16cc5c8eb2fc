//! Options of the `redis-streams` backend.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{RedisStreamsDestination, client};

/// `backend = "redis-streams"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisStreamsConfig {
    /// `redis://[user:pass@]host:6379[/db]` or `rediss://` for TLS.
    pub url: String,
    /// File holding the password, if it is not in the URL.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The stream key.
    pub stream_key: String,
    /// Trim the stream to about this many entries (`MAXLEN ~`).
    #[serde(default)]
    pub maxlen: Option<u64>,
    /// Connect and response timeout.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// With `rediss://`: PEM file of the certificate authorities trusted
    /// for the server, instead of the system's (a private CA).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

impl RedisStreamsConfig {
    /// Problems as `(key, reason)`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !(self.url.starts_with("redis://") || self.url.starts_with("rediss://")) {
            out.push(("url".into(), "must start with redis:// or rediss://".into()));
        } else if let Err(e) = redis::Client::open(self.url.as_str()) {
            out.push(("url".into(), format!("not a Redis URL ({e})")));
        }
        if self.stream_key.is_empty() {
            out.push(("stream_key".into(), "must not be empty".into()));
        }
        if self.maxlen == Some(0) {
            out.push((
                "maxlen".into(),
                "must be greater than 0 (or left out)".into(),
            ));
        }
        if let Some(path) = &self.password_file
            && let Err(e) = std::fs::read_to_string(path)
        {
            out.push((
                "password_file".into(),
                format!("cannot read {}: {e}", path.display()),
            ));
        }
        crate::destination::tls::validate_ca(self.tls_ca_file.as_deref(), &mut out);
        if self.tls_ca_file.is_some() && !self.url.starts_with("rediss://") {
            out.push((
                "tls_ca_file".into(),
                "is only used with a rediss:// URL".into(),
            ));
        }
        out
    }

    /// Builds the destination (connects lazily).
    pub fn build(&self) -> Result<RedisStreamsDestination, std::io::Error> {
        let mut info: redis::ConnectionInfo =
            self.url.as_str().parse().map_err(std::io::Error::other)?;
        if let Some(path) = &self.password_file {
            let password = std::fs::read_to_string(path)?.trim().to_string();
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let redis = match &self.tls_ca_file {
            Some(path) => {
                let root_cert =
                    crate::destination::tls::read_ca(path).map_err(std::io::Error::other)?;
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    },
                )
            }
            None => redis::Client::open(info),
        }
        .map_err(std::io::Error::other)?;
        Ok(RedisStreamsDestination {
            client: client::Client::new(redis, self.clone()),
        })
    }
}
