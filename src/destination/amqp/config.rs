//! Options of the `amqp` backend.

use std::path::PathBuf;

use serde::Deserialize;

use super::encode::Routing;
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
    /// `routing_key` (the default) or `header`.
    #[serde(default)]
    pub channel_id_as: Option<ChannelIdAs>,
    /// With the default exchange: the queue every record is published to
    /// (its name is the routing key; the channelId goes in the
    /// `channel-id` header). With a named exchange: the queue to check (or
    /// declare and bind) at start.
    #[serde(default)]
    pub queue: Option<String>,
    /// Declare the queue (durable) and, with a named exchange, the exchange
    /// (durable, direct) and the binding at start. Without it, a missing
    /// queue or exchange fails `check-config`.
    #[serde(default)]
    pub declare: bool,
    /// With `amqps://`: PEM file of certificate authorities trusted for the
    /// broker, in addition to the system's (a private CA).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
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
        if self.exchange.is_empty()
            && let (Some(queue), Some(key)) = (&self.queue, &self.routing_key)
            && queue != key
        {
            out.push((
                "routing_key".into(),
                format!(
                    "with the default exchange the routing key is the queue name: `queue = \"{queue}\"` already publishes to that queue; remove routing_key"
                ),
            ));
        }
        if self.exchange.is_empty()
            && self.queue.is_some()
            && self.channel_id_as == Some(ChannelIdAs::RoutingKey)
        {
            out.push((
                "channel_id_as".into(),
                "with `queue` and the default exchange every record goes to that queue, so the channelId cannot be the routing key; remove channel_id_as (the channelId goes in the channel-id header)".into(),
            ));
        }
        crate::destination::tls::validate_ca(self.tls_ca_file.as_deref(), &mut out);
        if self.tls_ca_file.is_some() && !self.url.starts_with("amqps://") {
            out.push((
                "tls_ca_file".into(),
                "is only used with an amqps:// URL".into(),
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
        out
    }

    /// Builds the destination for resource `id` (no I/O: connects lazily).
    pub fn build(&self, id: &str) -> Result<AmqpDestination, std::io::Error> {
        let mut uri: lapin::uri::AMQPUri = self.url.parse().map_err(std::io::Error::other)?;
        if let Some(path) = &self.password_file {
            uri.authority.userinfo.password = std::fs::read_to_string(path)?.trim().to_string();
        }
        let ca = match &self.tls_ca_file {
            Some(path) => {
                let pem = crate::destination::tls::read_ca(path).map_err(std::io::Error::other)?;
                Some(String::from_utf8(pem).map_err(std::io::Error::other)?)
            }
            None => None,
        };
        Ok(AmqpDestination {
            client: client::Client::new(client::Settings {
                uri,
                ca,
                exchange: self.exchange.clone(),
                routing: self.routing(id),
                queue: self.queue_to_check(id),
                binding_key: self.routing_key.clone().unwrap_or_else(|| id.to_string()),
                declare: self.declare,
                confirm_timeout: self.confirm_timeout,
            }),
        })
    }
}

impl AmqpConfig {
    /// How a record's routing key is chosen.
    pub fn routing(&self, id: &str) -> Routing {
        match (&self.queue, &self.routing_key, self.channel_id_as) {
            (Some(queue), _, _) if self.exchange.is_empty() => Routing::Fixed(queue.clone()),
            (_, Some(key), _) => Routing::Fixed(key.clone()),
            (_, None, Some(ChannelIdAs::Header)) => Routing::Fixed(id.to_string()),
            (_, None, _) => Routing::ChannelElse(id.to_string()),
        }
    }

    /// The queue checked (or declared) at start: `queue`; with the default
    /// exchange and a fixed routing key, the queue that key names.
    fn queue_to_check(&self, id: &str) -> Option<String> {
        self.queue.clone().or_else(|| {
            if !self.exchange.is_empty() {
                return None;
            }
            match self.routing(id) {
                Routing::Fixed(k) => Some(k),
                Routing::ChannelElse(_) => None,
            }
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
            channel_id_as: None,
            queue: None,
            declare: false,
            tls_ca_file: None,
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

    #[test]
    fn queue_names_the_routing_key_on_the_default_exchange() {
        let mut c = cfg("amqp://127.0.0.1");
        assert_eq!(c.routing("jobs"), Routing::ChannelElse("jobs".into()));
        assert_eq!(c.queue_to_check("jobs"), None);
        c.queue = Some("work".into());
        assert_eq!(c.routing("jobs"), Routing::Fixed("work".into()));
        assert_eq!(c.queue_to_check("jobs"), Some("work".into()));
        c.routing_key = Some("other".into());
        assert_eq!(c.validate()[0].0, "routing_key");
        c.routing_key = None;
        c.channel_id_as = Some(ChannelIdAs::RoutingKey);
        assert_eq!(c.validate()[0].0, "channel_id_as");
        // A named exchange: `queue` is what is bound, not the key.
        let mut c = cfg("amqp://127.0.0.1");
        c.exchange = "fn".into();
        c.queue = Some("work".into());
        assert_eq!(c.routing("jobs"), Routing::ChannelElse("jobs".into()));
        assert!(c.validate().is_empty());
        c.channel_id_as = Some(ChannelIdAs::Header);
        assert_eq!(c.routing("jobs"), Routing::Fixed("jobs".into()));
    }
}
