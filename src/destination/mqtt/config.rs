//! Options of the `mqtt` backend.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{MqttDestination, client};

/// `backend = "mqtt"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host:1883` or `mqtts://host:8883`.
    pub url: String,
    /// Topic to publish on; `{functionId}` is replaced by the record's
    /// function id (with `/`, `+` and `#` turned into `_`).
    pub topic: String,
    /// Client id. Default: `fnrelay-<resource id>-<random>`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// User name.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// CA certificate (PEM) for `mqtts://`; required with TLS.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Largest packet sent, bytes. Records above it fail as `payload_too_large`.
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
    /// Keep-alive interval.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
}

fn default_max_packet() -> usize {
    256 * 1024
}

fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}

/// Parsed `url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl MqttConfig {
    /// Host, port and TLS from `url`.
    pub fn endpoint(&self) -> Result<Endpoint, String> {
        let url = url::Url::parse(&self.url).map_err(|e| format!("not a URL ({e})"))?;
        let tls = match url.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            other => return Err(format!("scheme `{other}` is not mqtt or mqtts")),
        };
        let host = url.host_str().ok_or("has no host")?.to_string();
        let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
        Ok(Endpoint { host, port, tls })
    }

    /// Problems as `(key, reason)`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        match self.endpoint() {
            Err(reason) => out.push(("url".into(), reason)),
            Ok(e) if e.tls && self.tls_ca_file.is_none() => {
                out.push(("tls_ca_file".into(), "is required with mqtts://".into()))
            }
            Ok(_) => {}
        }
        let probe = self.topic.replace("{functionId}", "f");
        if probe.is_empty() || probe.contains(['+', '#']) {
            out.push((
                "topic".into(),
                format!(
                    "`{}` is not a topic to publish on (no wildcards)",
                    self.topic
                ),
            ));
        }
        for (key, path) in [
            ("password_file", &self.password_file),
            ("tls_ca_file", &self.tls_ca_file),
        ] {
            if let Some(path) = path
                && let Err(e) = std::fs::read(path)
            {
                out.push((key.into(), format!("cannot read {}: {e}", path.display())));
            }
        }
        if self.password_file.is_some() && self.username.is_none() {
            out.push(("username".into(), "is required with password_file".into()));
        }
        if self.max_packet_bytes < 1024 {
            out.push(("max_packet_bytes".into(), "must be at least 1024".into()));
        }
        out
    }

    /// Builds the destination (connects lazily).
    pub fn build(&self, id: &str) -> Result<MqttDestination, std::io::Error> {
        let endpoint = self.endpoint().map_err(std::io::Error::other)?;
        let password = match &self.password_file {
            Some(p) => Some(std::fs::read_to_string(p)?.trim().to_string()),
            None => None,
        };
        let ca = match &self.tls_ca_file {
            Some(p) => Some(std::fs::read(p)?),
            None => None,
        };
        let client_id = self
            .client_id
            .clone()
            .unwrap_or_else(|| format!("fnrelay-{id}-{:08x}", fastrand::u32(..)));
        Ok(MqttDestination {
            client: client::Client::new(client::Settings {
                endpoint,
                client_id,
                username: self.username.clone(),
                password,
                ca,
                topic: self.topic.clone(),
                max_packet: self.max_packet_bytes,
                keep_alive: self.keep_alive,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str, topic: &str) -> MqttConfig {
        MqttConfig {
            url: url.into(),
            topic: topic.into(),
            client_id: None,
            username: None,
            password_file: None,
            tls_ca_file: None,
            max_packet_bytes: default_max_packet(),
            keep_alive: default_keep_alive(),
        }
    }

    #[test]
    fn validation() {
        assert!(
            cfg("mqtt://127.0.0.1:1883", "fn/{functionId}/results")
                .validate()
                .is_empty()
        );
        assert_eq!(
            cfg("mqtt://h", "t").endpoint().unwrap(),
            Endpoint {
                host: "h".into(),
                port: 1883,
                tls: false
            }
        );
        assert_eq!(cfg("mqtts://h", "t").validate()[0].0, "tls_ca_file");
        assert_eq!(cfg("http://h", "t").validate()[0].0, "url");
        assert_eq!(cfg("mqtt://h", "fn/#").validate()[0].0, "topic");
    }
}
