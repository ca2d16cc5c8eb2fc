//! Destinations: the narrow trait every backend implements, and the registry
//! that builds one instance per configured resource.
//!
//! Only this module tree depends on network client crates. Backends never
//! retry or schedule: they make one attempt and classify its failure into a
//! [`DeliveryError`]; the dispatcher owns the retry policy. Delivery is at
//! least once, so every backend must tolerate a duplicate carrying the same
//! record id (and pass that id on wherever the destination has a dedup key).

pub mod amqp;
pub mod cloudevents;
pub mod file;
pub mod http;
pub mod mqtt;
pub mod nats;
pub mod nats_jetstream;
pub mod oci;
pub mod oci_notifications;
pub mod oci_queue;
pub mod oci_streaming;
pub mod reconnect;
pub mod redis_streams;
pub mod tls;
pub mod webhook;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::config::{Config, LaneLimits};
use crate::error::DeliveryError;
use crate::record::{DestKind, DestinationType};

/// One record on its way out: the journaled JSON plus what backends need to
/// address it.
#[derive(Debug, Clone)]
pub struct OutgoingRecord {
    /// Record id (ULID), the idempotency key at the destination.
    pub id: String,
    /// The platform's call id.
    pub fn_call_id: String,
    /// Function id (stream key, notification title).
    pub function_id: String,
    /// Success or failure destination.
    pub destination_type: DestinationType,
    /// Kind of the destination.
    pub kind: DestKind,
    /// Resource id (config table key).
    pub resource_id: String,
    /// Channel of a QUEUE destination.
    pub channel_id: Option<String>,
    /// The record JSON (SPEC section 3), exactly as journaled.
    pub body: Bytes,
    /// Attempt number of this send, starting at 1.
    pub attempt: u32,
    /// The body's media type: `application/json`, or
    /// `application/cloudevents+json` for a structured CloudEvent.
    pub content_type: &'static str,
    /// CloudEvents attributes to send as headers (binary mode).
    pub cloudevent: Option<cloudevents::Attributes>,
}

/// A configured destination resource. Object-safe; held as `Arc<dyn Destination>`.
#[async_trait]
pub trait Destination: Send + Sync + 'static {
    /// Backend name (`file`, `webhook`, ...).
    fn backend(&self) -> &'static str;

    /// One attempt to deliver one record. `Ok` only once the destination has
    /// confirmed it (fsync, 2xx, broker ack).
    async fn send(&self, record: &OutgoingRecord) -> Result<(), DeliveryError>;

    /// One attempt for each record of a lane's batch, one result per record
    /// in order. The default sends them concurrently, which the multiplexed
    /// clients (AMQP confirms, JetStream acks, Redis, MQTT's in-flight
    /// window, HTTP/2) turn into pipelined requests whose confirmations are
    /// awaited together. Backends with a native batch override it.
    async fn send_batch(&self, records: &[OutgoingRecord]) -> Vec<Result<(), DeliveryError>> {
        futures_util::future::join_all(records.iter().map(|r| self.send(r))).await
    }

    /// Checks, with network I/O, that the resource exists and is usable
    /// (a queue, stream or exchange is there, records would be routed).
    /// Creates what the configuration asks to create only when
    /// `check.declare`. Run at start with `declare` (a failure is logged,
    /// records wait and retry) and by `check-config` (without `declare`
    /// unless `--declare`; a failure is an error).
    async fn check(&self, check: &Check<'_>) -> Result<(), DeliveryError> {
        let _ = check;
        Ok(())
    }
}

/// What a [`Destination::check`] may do and what it looks at.
#[derive(Debug, Clone, Copy)]
pub struct Check<'a> {
    /// Create what the configuration asks to create (`declare = true`,
    /// `create_stream = true`, a file and its directory). Without it a
    /// check changes nothing.
    pub declare: bool,
    /// The configured routes that send to this resource.
    pub routes: &'a [RouteUse],
}

/// A configured route side that names a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteUse {
    /// Where it is configured, e.g. `routes.default.failure`.
    pub key: String,
    /// The channelId it gives (QUEUE destinations).
    pub channel_id: Option<String>,
}

/// Identifies a resource: its kind and config key.
pub type ResourceKey = (DestKind, String);

/// All built destinations, by resource.
#[derive(Clone, Default)]
pub struct Registry {
    map: HashMap<ResourceKey, (Arc<dyn Destination>, LaneLimits)>,
    /// How each resource's records are written.
    encodings: HashMap<ResourceKey, cloudevents::Encoding>,
    /// The configured routes naming each resource.
    uses: HashMap<ResourceKey, Vec<RouteUse>>,
}

/// A built destination, or why it could not be built.
pub type Built = Result<Arc<dyn Destination>, Box<dyn std::error::Error + Send + Sync>>;

/// What a backend's configuration provides. `ResourceConfig::backend_config`
/// in the configuration module is the one place that lists the backends.
pub trait BackendConfig: Send + Sync {
    /// The backend name as written in the config (`file`, `amqp`, ...).
    fn name(&self) -> &'static str;
    /// Whether it can serve a resource of this kind (SPEC section 4).
    fn serves(&self, kind: DestKind) -> bool;
    /// `(concurrency, max_batch, largest max_batch)` of its lanes: what its
    /// protocol batches well, and the service's own limits.
    fn lane_defaults(&self) -> (usize, usize, usize);
    /// Problems as `(key, reason)`, without I/O.
    fn validate(&self) -> Vec<(String, String)>;
    /// Builds the destination for the resource `id`.
    fn build(&self, id: &str) -> Built;
}

/// Implements [`BackendConfig`] for a backend's config type.
macro_rules! backend {
    ($config:ty, $name:literal, serves: $serves:expr, lane: $lane:expr,
     build: |$c:ident, $id:ident| $build:expr) => {
        impl BackendConfig for $config {
            fn name(&self) -> &'static str {
                $name
            }
            fn serves(&self, kind: DestKind) -> bool {
                let serves: fn(DestKind) -> bool = $serves;
                serves(kind)
            }
            fn lane_defaults(&self) -> (usize, usize, usize) {
                $lane
            }
            fn validate(&self) -> Vec<(String, String)> {
                <$config>::validate(self)
            }
            fn build(&self, $id: &str) -> Built {
                let $c = self;
                boxed($build)
            }
        }
    };
}

backend!(file::FileConfig, "file", serves: |_| true, lane: (2, 512, 4096),
    build: |c, _id| c.build());
backend!(webhook::WebhookConfig, "webhook", serves: |k| k == DestKind::Notification,
    lane: (4, 16, 256), build: |c, _id| c.build());
backend!(amqp::AmqpConfig, "amqp", serves: |k| k == DestKind::Queue,
    lane: (4, 256, 4096), build: |c, id| c.build(id));
backend!(nats_jetstream::NatsJetStreamConfig, "nats-jetstream",
    serves: |k| k == DestKind::Stream, lane: (4, 256, 4096), build: |c, _id| c.build());
backend!(redis_streams::RedisStreamsConfig, "redis-streams",
    serves: |k| k == DestKind::Stream, lane: (4, 256, 4096), build: |c, _id| c.build());
backend!(mqtt::MqttConfig, "mqtt", serves: |k| k == DestKind::Notification,
    lane: (2, 64, 1024), build: |c, id| c.build(id));
backend!(nats::NatsConfig, "nats", serves: |k| k == DestKind::Notification,
    lane: (4, 256, 4096), build: |c, _id| c.build());
// OCI Queue PutMessages takes 20 messages; Streaming 1 MB per request;
// Notifications one message per request.
backend!(oci_queue::OciQueueConfig, "oci-queue", serves: |k| k == DestKind::Queue,
    lane: (4, 20, 20), build: |c, id| c.build(id));
backend!(oci_streaming::OciStreamingConfig, "oci-streaming",
    serves: |k| k == DestKind::Stream, lane: (4, 100, 500), build: |c, id| c.build(id));
backend!(oci_notifications::OciNotificationsConfig, "oci-notifications",
    serves: |k| k == DestKind::Notification, lane: (4, 8, 64), build: |c, id| c.build(id));

fn boxed<D: Destination, E: std::error::Error + Send + Sync + 'static>(r: Result<D, E>) -> Built {
    r.map(|d| Arc::new(d) as Arc<dyn Destination>)
        .map_err(Into::into)
}

/// A resource could not be built.
#[derive(Debug, thiserror::Error)]
#[error("{table}.{id}: {source}")]
pub struct BuildError {
    table: &'static str,
    id: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl Registry {
    /// Builds every resource of a validated config.
    pub fn build(config: &Config) -> Result<Self, BuildError> {
        let mut map = HashMap::new();
        let mut encodings = HashMap::new();
        for (table, kind, resources) in config.resource_tables() {
            for (id, resource) in resources {
                encodings.insert((kind, id.clone()), resource.encoding());
                let lane = resource.lane();
                let built = resource.backend.backend_config().build(id);
                let destination = built.map_err(|source| BuildError {
                    table,
                    id: id.clone(),
                    source,
                })?;
                map.insert((kind, id.clone()), (destination, lane));
            }
        }
        let mut uses: HashMap<ResourceKey, Vec<RouteUse>> = HashMap::new();
        let routes = &config.routes;
        let named = std::iter::once(("routes.default".to_string(), &routes.default))
            .chain(
                routes
                    .applications
                    .iter()
                    .map(|(id, r)| (format!("routes.applications.\"{id}\""), r)),
            )
            .chain(
                routes
                    .functions
                    .iter()
                    .map(|(id, r)| (format!("routes.functions.\"{id}\""), r)),
            );
        for (key, route) in named {
            for (side, dest) in [("success", &route.success), ("failure", &route.failure)] {
                let Some(dest) = dest else { continue };
                if let Some((kind, id)) = dest.target() {
                    uses.entry((kind, id.to_string()))
                        .or_default()
                        .push(RouteUse {
                            key: format!("{key}.{side}"),
                            channel_id: dest.channel().map(str::to_string),
                        });
                }
            }
        }
        Ok(Self {
            map,
            uses,
            encodings,
        })
    }

    /// The destination serving a resource.
    pub fn get(&self, kind: DestKind, id: &str) -> Option<&Arc<dyn Destination>> {
        self.map.get(&(kind, id.to_string())).map(|(d, _)| d)
    }

    /// Adds or replaces a destination (tests and embedders).
    pub fn insert(
        &mut self,
        kind: DestKind,
        id: impl Into<String>,
        destination: Arc<dyn Destination>,
        lane: LaneLimits,
    ) {
        self.map.insert((kind, id.into()), (destination, lane));
    }

    /// Runs every destination's [`Destination::check`] concurrently
    /// (creating what the configuration asks to create only with
    /// `declare`); returns `(table.id, error)` for each that failed.
    pub async fn check_all(&self, declare: bool) -> Vec<(String, DeliveryError)> {
        let checks = self.map.iter().map(|(key, (d, _))| {
            let d = d.clone();
            let name = format!("{}.{}", key.0.table(), key.1);
            let routes = self.uses.get(key).map_or(&[][..], Vec::as_slice);
            async move {
                let check = Check { declare, routes };
                (
                    name,
                    tokio::time::timeout(std::time::Duration::from_secs(10), d.check(&check)).await,
                )
            }
        });
        let mut failed = Vec::new();
        for (name, result) in futures_util::future::join_all(checks).await {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed.push((name, e)),
                Err(_) => failed.push((
                    name,
                    DeliveryError::retry(
                        crate::error::ErrorLabel::Timeout,
                        "check did not finish within 10s",
                    ),
                )),
            }
        }
        failed.sort_by(|a, b| a.0.cmp(&b.0));
        failed
    }

    /// How a resource's records are written.
    pub fn encoding(&self, key: &ResourceKey) -> cloudevents::Encoding {
        self.encodings.get(key).copied().unwrap_or_default()
    }

    /// All resources with their lane limits.
    pub fn iter(&self) -> impl Iterator<Item = (&ResourceKey, &Arc<dyn Destination>, LaneLimits)> {
        self.map.iter().map(|(k, (d, l))| (k, d, *l))
    }
}
