//! The AMQP connection, its confirm-mode channel, and the publish.

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};

use super::encode::Routing;
use super::{AmqpError, encode};
use crate::destination::reconnect::{ConnectFailure, Reconnect};
use crate::destination::{Check, OutgoingRecord};
use crate::logging::RateLimited;

/// What the client needs from the config.
pub struct Settings {
    pub uri: lapin::uri::AMQPUri,
    /// PEM of extra trusted certificate authorities (amqps://).
    pub ca: Option<String>,
    pub exchange: String,
    pub routing: Routing,
    /// Queue checked (or declared) at start.
    pub queue: Option<String>,
    /// Key `queue` is bound with to a named exchange (with `declare`).
    pub binding_key: String,
    pub declare: bool,
    pub confirm_timeout: std::time::Duration,
}

/// A connection and its channel; the connection is kept alive by holding it.
#[derive(Clone)]
struct Conn {
    _connection: std::sync::Arc<Connection>,
    channel: Channel,
}

/// One per resource.
pub struct Client {
    settings: Settings,
    conn: Reconnect<Conn>,
    /// Returned (unroutable) messages, logged once per 10 s per key.
    returned: RateLimited,
}

impl Client {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            conn: Reconnect::default(),
            returned: RateLimited::new(std::time::Duration::from_secs(10)),
        }
    }

    /// A new connection, trusting the configured CA.
    async fn open(&self) -> Result<Connection, AmqpError> {
        let runtime = lapin::runtime::default_runtime().map_err(AmqpError::Connect)?;
        let tls = lapin::tcp::OwnedTLSConfig {
            identity: None,
            cert_chain: self.settings.ca.clone(),
        };
        Connection::connect_uri_with_config(
            self.settings.uri.clone(),
            ConnectionProperties::default(),
            tls,
            runtime,
        )
        .await
        .map_err(AmqpError::Connect)
    }

    async fn connect(&self) -> Result<Conn, AmqpError> {
        let connection = self.open().await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(AmqpError::Connect)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(AmqpError::Connect)?;
        if self.settings.declare {
            // Declared on every (re)connect, before the first publish, so a
            // broker that lost its definitions gets them back.
            self.declare(&channel, false).await?;
        }
        Ok(Conn {
            _connection: std::sync::Arc::new(connection),
            channel,
        })
    }

    async fn channel(&self) -> Result<Channel, AmqpError> {
        match self.conn.get(|| self.connect()).await {
            Ok(c) if c.channel.status().connected() => Ok(c.channel),
            Ok(_) => {
                // The channel or connection closed under us (broker restart,
                // channel error): rebuild now.
                self.conn.reset().await;
                self.conn
                    .get(|| self.connect())
                    .await
                    .map(|c| c.channel)
                    .map_err(failure)
            }
            Err(e) => Err(failure(e)),
        }
    }

    pub async fn publish(&self, record: &OutgoingRecord) -> Result<(), AmqpError> {
        let s = &self.settings;
        let channel = self.channel().await?;
        let routing_key = s.routing.key(record.channel_id.as_deref()).to_string();
        let publish = async {
            channel
                .basic_publish(
                    s.exchange.as_str().into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &record.body,
                    encode::properties(&s.routing, record),
                )
                .await?
                .await
        };
        let Ok(result) = tokio::time::timeout(s.confirm_timeout, publish).await else {
            // A confirm that never came leaves the channel in an unknown
            // state: rebuild the connection rather than reuse it.
            self.conn.reset().await;
            return Err(AmqpError::ConfirmTimeout(s.confirm_timeout));
        };
        match result {
            Ok(Confirmation::Ack(None)) => Ok(()),
            Ok(Confirmation::Ack(Some(returned))) => {
                // Never the body: the record id and where it was sent.
                if let Some(suppressed) = self.returned.allow(&routing_key) {
                    tracing::warn!(
                        record_id = %record.id,
                        exchange = %s.exchange,
                        routing_key = %routing_key,
                        reply = %returned.reply_text,
                        suppressed,
                        "AMQP broker returned the message: no queue is bound for its routing key"
                    );
                }
                Err(AmqpError::Unroutable {
                    exchange: s.exchange.clone(),
                    routing_key,
                })
            }
            Ok(Confirmation::Nack(_)) => Err(AmqpError::Nacked),
            // confirm_select is on; if the broker did not confirm, we do not know.
            Ok(Confirmation::NotRequested) => Err(AmqpError::Nacked),
            Err(e) => {
                self.conn.reset().await;
                Err(AmqpError::Publish(e))
            }
        }
    }

    /// Declares the exchange (durable, direct), the queue (durable) and the
    /// binding, as configured; with `passive`, only checks that the
    /// exchange and queue exist.
    async fn declare(&self, channel: &Channel, passive: bool) -> Result<(), AmqpError> {
        let s = &self.settings;
        if !s.exchange.is_empty() {
            let options = ExchangeDeclareOptions {
                passive,
                durable: true,
                ..Default::default()
            };
            channel
                .exchange_declare(
                    s.exchange.as_str().into(),
                    ExchangeKind::Direct,
                    options,
                    FieldTable::default(),
                )
                .await
                .map_err(missing("exchange", s.exchange.clone()))?;
        }
        if let Some(queue) = &s.queue {
            let options = QueueDeclareOptions {
                passive,
                durable: true,
                ..Default::default()
            };
            channel
                .queue_declare(queue.as_str().into(), options, FieldTable::default())
                .await
                .map_err(missing("queue", queue.clone()))?;
            if !passive && !s.exchange.is_empty() {
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        s.exchange.as_str().into(),
                        s.binding_key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(AmqpError::Publish)?;
            }
        }
        Ok(())
    }

    /// Checks the exchange and queue (declares them when both the config's
    /// `declare` and `check.declare` say so; a missing one that would be
    /// declared at start passes). With the default exchange, also checks
    /// that every routing key the configured routes produce names a queue:
    /// a message no queue receives comes back as unroutable.
    pub async fn check(&self, check: &Check<'_>) -> Result<(), AmqpError> {
        let s = &self.settings;
        // A separate connection: a failed passive declare closes its channel.
        let connection = self.open().await?;
        let result = async {
            let channel = connection
                .create_channel()
                .await
                .map_err(AmqpError::Connect)?;
            let declare = s.declare && check.declare;
            match self.declare(&channel, !declare).await {
                Err(AmqpError::Missing { .. }) if s.declare => return Ok(()),
                other => other?,
            }
            if !s.exchange.is_empty() {
                // Bindings cannot be listed over AMQP 0-9-1: a named
                // exchange's routing is the operator's to check.
                return Ok(());
            }
            let mut seen = std::collections::BTreeSet::new();
            let mut missing = Vec::new();
            for route in check.routes {
                let key = s.routing.key(route.channel_id.as_deref()).to_string();
                if !seen.insert(key.clone()) || s.queue.as_deref() == Some(key.as_str()) {
                    continue;
                }
                let channel = connection
                    .create_channel()
                    .await
                    .map_err(AmqpError::Connect)?;
                let options = QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                match channel
                    .queue_declare(key.as_str().into(), options, FieldTable::default())
                    .await
                {
                    Ok(_) => {}
                    Err(e) if super::reply_code(&e) == Some(404) => {
                        let from = if route.channel_id.is_some() {
                            format!("the channelId of {}", route.key)
                        } else {
                            format!("the resource id, for {}", route.key)
                        };
                        missing.push(format!("routing key `{key}` ({from})"));
                    }
                    Err(e) => return Err(AmqpError::Publish(e)),
                }
            }
            if missing.is_empty() {
                Ok(())
            } else {
                Err(AmqpError::NoQueueForKey {
                    keys: missing.join(", "),
                })
            }
        }
        .await;
        let _ = connection.close(200, "check done".into()).await;
        result
    }
}

/// Maps a failed passive declare to "missing", anything else as is.
fn missing(what: &'static str, name: String) -> impl FnOnce(lapin::Error) -> AmqpError {
    move |e| {
        if super::reply_code(&e) == Some(404) {
            AmqpError::Missing { what, name }
        } else {
            AmqpError::Publish(e)
        }
    }
}

fn failure(e: ConnectFailure<AmqpError>) -> AmqpError {
    match e {
        ConnectFailure::Paused(d, why) => AmqpError::Paused(d, why),
        ConnectFailure::Failed(e) => e,
    }
}
