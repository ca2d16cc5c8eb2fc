//! The AMQP connection, its confirm-mode channel, and the publish.

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};

use super::{AmqpError, ChannelIdAs, encode};
use crate::destination::OutgoingRecord;
use crate::destination::reconnect::{ConnectFailure, Reconnect};

/// What the client needs from the config.
pub struct Settings {
    pub uri: lapin::uri::AMQPUri,
    pub exchange: String,
    pub routing_key: Option<String>,
    pub channel_id_as: ChannelIdAs,
    pub resource_id: String,
    pub queue: Option<String>,
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
}

impl Client {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            conn: Reconnect::default(),
        }
    }

    async fn connect(&self) -> Result<Conn, AmqpError> {
        let connection =
            Connection::connect_uri(self.settings.uri.clone(), ConnectionProperties::default())
                .await
                .map_err(AmqpError::Connect)?;
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
        let routing_key = encode::routing_key(s.routing_key.as_deref(), s.channel_id_as, record);
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
                    encode::properties(s.channel_id_as, record),
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
            Ok(Confirmation::Ack(Some(_))) => Err(AmqpError::Unroutable {
                exchange: s.exchange.clone(),
                routing_key,
            }),
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
                let key = s
                    .routing_key
                    .clone()
                    .unwrap_or_else(|| s.resource_id.clone());
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        s.exchange.as_str().into(),
                        key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(AmqpError::Publish)?;
            }
        }
        Ok(())
    }

    /// Declares (with `declare`) or passively checks the queue and exchange.
    pub async fn check(&self) -> Result<(), AmqpError> {
        // A separate connection: a failed passive declare closes its channel.
        let connection =
            Connection::connect_uri(self.settings.uri.clone(), ConnectionProperties::default())
                .await
                .map_err(AmqpError::Connect)?;
        let channel = connection
            .create_channel()
            .await
            .map_err(AmqpError::Connect)?;
        let result = self.declare(&channel, !self.settings.declare).await;
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
        ConnectFailure::Paused(d) => AmqpError::Paused(d),
        ConnectFailure::Failed(e) => e,
    }
}
