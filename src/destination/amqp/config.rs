//! Options of the `amqp` backend.

use std::path::PathBuf;

use serde::Deserialize;

use super::{AmqpDestination, client};

/// Where the destination's channelId goes.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ChannelIdAs {
    /// As the routing key (unless `routing_key` is set).
    #[default]
    RoutingKey,
    /// In the `channel-id` message header; the routing key is `routing_key`
    /// or the resource id.
    Header,
}

/// `backend = "amqp"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:5672/vhost` or `amqps://...`.
    pub url: String,
    /// File holding the password, if it is not in the URL.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Exchange to publish to; `""` is the default exchange (routing key =
    /// queue name).
    #[serde(default)]
    pub exchange: String,
    /// Fixed routing key. Default: the destination's channelId (when
    /// `channel_id_as = "routing_key"`), else the resource id.
    #[serde(default)]
    pub routing_key: Option<String>,
    /// `routing_key` or `header`.
    #[serde(default)]
    pub channel_id_as: ChannelIdAs,
    /// Queue to check (or declare) at start. Default: `routing_key` or the
    /// resource id when publishing to the default exchange.
    #[serde(default)]
    pub queue: Option<String>,
    /// Declare the queue (durable) and, with a named exchange, the exchange
    /// (durable, direct) and the binding at start. Without it, a missing
    /// queue or exchange fails `check-config`.
    #[serde(default)]
    pub declare: bool,
    /// How long a publish waits for the broker's confirm. On expiry the
    /// connection is rebuilt (a channel with a lost confirm is not reused)
    /// and the record is retried.
    #[serde(default = "default_confirm_timeout", with = "humantime_serde")]
    pub confirm_timeout: std::time::Duration,
}

fn default_confirm_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}

impl AmqpConfig {
    /// Problems as `(key, reason)`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        match self.url.parse::<lapin::uri::AMQPUri>() {
            Err(e) => out.push((
                "url".into(),
                format!("not an amqp:// or amqps:// URL ({e})"),
            )),
            Ok(_) if !(self.url.starts_with("amqp://") || self.url.starts_with("amqps://")) => {
                out.push(("url".into(), "must start with amqp:// or amqps://".into()))
            }
            Ok(_) => {}
        }
        if let Some(path) = &self.password_file
            && let Err(e) = std::fs::read_to_string(path)
        {
            out.push((
                "password_file".into(),
                format!("cannot read {}: {e}", path.display()),
            ));
        }
        out
    }

    /// Builds the destination for resource `id` (no I/O: connects lazily).
    pub fn build(&self, id: &str) -> Result<AmqpDestination, std::io::Error> {
        let mut uri: lapin::uri::AMQPUri = self.url.parse().map_err(std::io::Error::other)?;
        if let Some(path) = &self.password_file {
            uri.authority.userinfo.password = std::fs::read_to_string(path)?.trim().to_string();
        }
        let queue = self.queue.clone().or_else(|| {
            self.exchange
                .is_empty()
                .then(|| self.routing_key.clone().unwrap_or(id.to_string()))
        });
        Ok(AmqpDestination {
            client: client::Client::new(client::Settings {
                uri,
                exchange: self.exchange.clone(),
                routing_key: self.routing_key.clone(),
                channel_id_as: self.channel_id_as,
                resource_id: id.to_string(),
                queue,
                declare: self.declare,
                confirm_timeout: self.confirm_timeout,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> AmqpConfig {
        AmqpConfig {
            url: url.into(),
            password_file: None,
            exchange: String::new(),
            routing_key: None,
            channel_id_as: ChannelIdAs::RoutingKey,
            queue: None,
            declare: false,
            confirm_timeout: default_confirm_timeout(),
        }
    }

    #[test]
    fn url_is_checked() {
        assert!(
            cfg("amqp://guest:guest@127.0.0.1:5672/%2f")
                .validate()
                .is_empty()
        );
        assert!(
            cfg("amqps://u:p@broker.example.com/vh")
                .validate()
                .is_empty()
        );
        assert_eq!(cfg("http://x").validate()[0].0, "url");
        let mut c = cfg("amqp://127.0.0.1");
        c.password_file = Some("/nonexistent/pw".into());
        assert_eq!(c.validate()[0].0, "password_file");
    }
}
