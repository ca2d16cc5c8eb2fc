//! Configuration: the TOML shape of SPEC section 8, loading with environment
//! overrides, and a pure validation pass that reports every error at once.
//!
//! Two phases: [`load`] parses (TOML + `FNRELAY__` environment), then
//! [`Config::validate`] checks everything it can without network I/O and
//! returns all problems, each naming its key. Only a validated config is
//! handed to [`crate::run`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::routing::{DestSpec, Route, RoutesConfig};

use crate::destination::{
    BackendConfig, amqp::AmqpConfig, file::FileConfig, mqtt::MqttConfig, nats::NatsConfig,
    nats_jetstream::NatsJetStreamConfig, oci_notifications::OciNotificationsConfig,
    oci_queue::OciQueueConfig, oci_streaming::OciStreamingConfig,
    redis_streams::RedisStreamsConfig, webhook::WebhookConfig,
};
use crate::record::DestKind;

/// The embedded default: file destinations under `data/`, no broker needed.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// The whole daemon configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// HTTP server: listen address, auth, input limits.
    #[serde(default)]
    pub server: ServerConfig,
    /// The durable journal of accepted records.
    #[serde(default)]
    pub journal: JournalConfig,
    /// Retry policy, lanes (global cap, linger, lease) and circuit breakers.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// Log format and level.
    #[serde(default)]
    pub log: LogConfig,
    /// The lost-completion watchdog (`POST /v1/invocations`).
    #[serde(default)]
    pub watchdog: WatchdogConfig,
    /// QUEUE resources, keyed by queueId.
    #[serde(default)]
    pub queues: BTreeMap<String, Resource>,
    /// STREAM resources, keyed by streamId.
    #[serde(default)]
    pub streams: BTreeMap<String, Resource>,
    /// NOTIFICATION resources, keyed by topicId.
    #[serde(default)]
    pub topics: BTreeMap<String, Resource>,
    /// Where each function's records go.
    #[serde(default)]
    pub routes: RoutesConfig,
    /// Which compartments may use which resources.
    #[serde(default)]
    pub policy: PolicyConfig,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the HTTP API listens on.
    pub listen: String,
    /// File holding the bearer token required by ingest and admin endpoints.
    pub auth_token_file: Option<PathBuf>,
    /// The bearer token itself (prefer `FNRELAY__SERVER__AUTH_TOKEN` or the file).
    pub auth_token: Option<String>,
    /// Named tokens, each with its scopes (SPEC section 12).
    pub tokens: Vec<TokenConfig>,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Most events in one `{"completions": [...]}` batch.
    pub max_batch_size: usize,
    /// Longest accepted id field (fnCallId, functionId, ...), in bytes.
    pub max_id_bytes: usize,
    /// Longest accepted `errorMessage`, in bytes.
    pub max_error_message_bytes: usize,
    /// How long SIGTERM waits for open requests and in-flight deliveries
    /// before exiting, whatever the clients do.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// A client must send a request's whole header within this time of
    /// starting it (or of opening the connection); then the connection is
    /// closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A request's whole body must arrive within this time of its header:
    /// `max_body_bytes / body_read_timeout` is the slowest rate served.
    /// Over it the request gets 408 and the connection is closed.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most open client connections; one more is answered 503 and closed.
    /// Lowered at start to fit the process's open-file limit.
    pub max_connections: usize,
    /// Most requests being handled at once; one more is answered 503.
    pub max_requests_in_flight: usize,
    /// Most request-body bytes held at once across all requests (a body is
    /// held until its request is answered). A request that would go over is
    /// answered 503 with Retry-After before its body is read.
    pub max_body_bytes_in_flight: usize,
}

/// The largest `server.max_id_bytes` accepted: ids are echoed in answers
/// and logs, so they stay short.
pub const MAX_ID_BYTES_LIMIT: usize = 4096;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            auth_token_file: None,
            auth_token: None,
            tokens: Vec::new(),
            max_body_bytes: 1_048_576,
            max_batch_size: 1000,
            max_id_bytes: 255,
            max_error_message_bytes: 8192,
            shutdown_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_requests_in_flight: 1024,
            max_body_bytes_in_flight: 32 * 1024 * 1024,
        }
    }
}

/// One `[[server.tokens]]` entry: a named bearer token and what it may do.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Shown in logs (never the token).
    pub name: String,
    /// File holding the token.
    pub file: PathBuf,
    /// What it may do.
    pub scopes: Vec<Scope>,
}

/// What a token may do.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// `POST /v1/completions`, `POST /v1/invocations`.
    Ingest,
    /// Dead letters, records, reload.
    Admin,
    /// `/v1/functions/{id}/destinations`.
    Destinations,
    /// `GET /metrics`.
    Metrics,
}

impl Scope {
    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Admin => "admin",
            Scope::Destinations => "destinations",
            Scope::Metrics => "metrics",
        }
    }
}

/// `[journal]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// `sqlite` (the default: one process, the file at `path`) or
    /// `postgres` (a database shared by replicas, at `url` or `url_file`).
    pub backend: JournalBackend,
    /// SQLite database file; created with its directory if missing.
    pub path: PathBuf,
    /// PostgreSQL connection URL (a secret: never logged). Prefer
    /// `url_file` or `FNRELAY__JOURNAL__URL`.
    pub url: Option<Secret>,
    /// File holding the PostgreSQL connection URL.
    pub url_file: Option<PathBuf>,
    /// PEM file of the certificate authorities trusted for TLS to
    /// PostgreSQL (`sslmode=require` or `verify-full` in the URL); without
    /// it, the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Most connections this replica opens to PostgreSQL.
    pub max_connections: usize,
    /// How long a claim holds records (SPEC section 11); the same setting
    /// as `delivery.lease`, which it replaces when given.
    #[serde(default, with = "humantime_serde")]
    pub lease: Option<Duration>,
    /// How long delivered and skipped records (their fnCallId -> id mapping)
    /// are kept, which is also the window of idempotent re-posts.
    #[serde(with = "humantime_serde")]
    pub delivered_retention: Duration,
    /// High-water mark: above this many undelivered records ingest answers 503.
    pub max_pending: u64,
    /// Most records written in one group-commit transaction.
    pub max_group_commit: usize,
    /// Delivery attempts kept per record for `GET /v1/records` (the most
    /// recent; at most 100).
    pub attempts_kept: usize,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            backend: JournalBackend::Sqlite,
            path: "data/journal.db".into(),
            url: None,
            url_file: None,
            ca_file: None,
            max_connections: 16,
            lease: None,
            delivered_retention: Duration::from_secs(24 * 3600),
            max_pending: 1_000_000,
            max_group_commit: 4096,
            attempts_kept: 10,
        }
    }
}

/// Which store holds the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalBackend {
    /// One SQLite file, one process.
    Sqlite,
    /// One PostgreSQL database, any number of replicas.
    Postgres,
}

/// A secret string: shown as `<redacted>` in debug output and errors.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl JournalConfig {
    /// The PostgreSQL URL, from `url` or `url_file`.
    pub fn postgres_url(&self) -> Result<String, String> {
        match (&self.url, &self.url_file) {
            (Some(url), _) => Ok(url.0.trim().to_string()),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("cannot read {}: {e}", path.display())),
            (None, None) => Err("give journal.url or journal.url_file".into()),
        }
    }
}

impl Config {
    /// The keys whose change needs a restart, that differ between `self`
    /// (running) and `new`: a reload that changes one is refused, naming it.
    pub fn restart_keys(&self, new: &Config) -> Vec<&'static str> {
        let (a, b) = (&self.server, &new.server);
        let (j, k) = (&self.journal, &new.journal);
        let mut keys = Vec::new();
        let mut differ = |key: &'static str, changed: bool| {
            if changed {
                keys.push(key);
            }
        };
        differ("server.listen", a.listen != b.listen);
        differ(
            "server.max_connections",
            a.max_connections != b.max_connections,
        );
        differ(
            "server.header_read_timeout",
            a.header_read_timeout != b.header_read_timeout,
        );
        differ("server.idle_timeout", a.idle_timeout != b.idle_timeout);
        differ(
            "server.shutdown_timeout",
            a.shutdown_timeout != b.shutdown_timeout,
        );
        differ("journal.backend", j.backend != k.backend);
        differ("journal.path", j.path != k.path);
        differ(
            "journal.url",
            j.url != k.url
                || j.url_file != k.url_file
                || j.postgres_url().ok() != k.postgres_url().ok(),
        );
        differ("journal.ca_file", j.ca_file != k.ca_file);
        differ(
            "journal.max_connections",
            j.max_connections != k.max_connections,
        );
        differ(
            "journal.max_group_commit",
            j.max_group_commit != k.max_group_commit,
        );
        differ("journal.attempts_kept", j.attempts_kept != k.attempts_kept);
        differ(
            "journal.delivered_retention",
            j.delivered_retention != k.delivered_retention,
        );
        differ("delivery.lease", self.lease() != new.lease());
        differ("log.format", self.log.format != new.log.format);
        differ("log.level", self.log.level != new.log.level);
        keys
    }

    /// How long a claim holds records: `journal.lease`, else
    /// `delivery.lease`.
    pub fn lease(&self) -> Duration {
        self.journal.lease.unwrap_or(self.delivery.lease)
    }
}

/// `[delivery]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Number of concurrent delivery workers.
    pub workers: usize,
    /// Attempts before a record is dead-lettered (first attempt included).
    pub max_attempts: u32,
    /// Records older than this (since accept) are dead-lettered as `record_expired`.
    #[serde(with = "humantime_serde")]
    pub max_record_age: Duration,
    /// Backoff before the second attempt; doubles per attempt, full jitter.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Cap of the backoff and of any Retry-After hint.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Upper bound of one delivery attempt, whatever the backend's own timeout.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// How long an idle lane waits after being woken before it claims, so
    /// that records arriving together share a batch (0 = claim at once).
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// How long a claim holds its records: a record whose send or outcome
    /// write has not finished by then is claimed again (delivered twice,
    /// never stuck). Must be longer than `attempt_timeout`.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Consecutive retryable failures that open a destination's circuit breaker.
    pub breaker_failure_threshold: u32,
    /// How long an open breaker waits before letting one probe through.
    #[serde(with = "humantime_serde")]
    pub breaker_cool_down: Duration,
    /// How long the pending records of a resource that left the
    /// configuration (by a reload, or found at start) wait for it to come
    /// back before they are dead-lettered as `not_found`.
    #[serde(with = "humantime_serde")]
    pub removed_resource_grace: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            workers: 32,
            max_attempts: 10,
            max_record_age: Duration::from_secs(6 * 3600),
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(300),
            attempt_timeout: Duration::from_secs(20),
            lease: Duration::from_secs(90),
            linger: Duration::from_millis(10),
            breaker_failure_threshold: 5,
            breaker_cool_down: Duration::from_secs(10),
            removed_resource_grace: Duration::from_secs(300),
        }
    }
}

/// `[watchdog]`: started invocations whose completion never comes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchdogConfig {
    /// The latest deadline `POST /v1/invocations` accepts, from now.
    #[serde(with = "humantime_serde")]
    pub max_deadline: Duration,
    /// How often the journal is looked at for deadlines that passed.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        Self {
            max_deadline: Duration::from_secs(24 * 3600),
            poll_interval: Duration::from_millis(250),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// Default filter when `RUST_LOG` is not set, e.g. `info` or `fnrelay=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A destination resource: its lane keys (SPEC section 10) and the backend
/// that serves it with that backend's keys.
#[derive(Debug, Clone, Deserialize)]
pub struct Resource {
    /// Batches in flight to this resource (default per backend).
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Records per send (default per backend, capped by the service's limit).
    #[serde(default)]
    pub max_batch: Option<usize>,
    /// `oci` (the record of SPEC section 3, the default) or `cloudevents`.
    #[serde(default)]
    pub format: RecordFormat,
    /// With `format = "cloudevents"`: `structured` (the default) or
    /// `binary` (webhook, amqp, nats, nats-jetstream only).
    #[serde(default)]
    pub cloudevents_mode: Option<CloudEventsMode>,
    /// The backend and its keys (unknown keys are refused there).
    #[serde(flatten)]
    pub backend: ResourceConfig,
}

/// How records are written to a resource.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RecordFormat {
    /// SPEC section 3.
    #[default]
    Oci,
    /// CloudEvents 1.0 with the record as data.
    Cloudevents,
}

/// CloudEvents content mode.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CloudEventsMode {
    /// The whole event in the body.
    Structured,
    /// The record in the body, attributes in headers.
    Binary,
}

impl Resource {
    /// The encoding of its records.
    pub fn encoding(&self) -> crate::destination::cloudevents::Encoding {
        use crate::destination::cloudevents::Encoding;
        match (self.format, self.cloudevents_mode) {
            (RecordFormat::Oci, _) => Encoding::Oci,
            (RecordFormat::Cloudevents, Some(CloudEventsMode::Binary)) => Encoding::Binary,
            (RecordFormat::Cloudevents, _) => Encoding::Structured,
        }
    }
}

/// A lane's effective limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneLimits {
    /// Batches in flight.
    pub concurrency: usize,
    /// Records per batch.
    pub max_batch: usize,
}

impl Resource {
    /// The lane limits: the configured ones, or the backend's defaults.
    pub fn lane(&self) -> LaneLimits {
        let (concurrency, max_batch, _) = self.backend.lane_defaults();
        LaneLimits {
            concurrency: self.concurrency.unwrap_or(concurrency),
            max_batch: self.max_batch.unwrap_or(max_batch),
        }
    }

    fn validate_lane(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let (_, _, cap) = self.backend.lane_defaults();
        if self.concurrency == Some(0) || self.concurrency.is_some_and(|c| c > 1024) {
            out.push(("concurrency".into(), "must be between 1 and 1024".into()));
        }
        match self.max_batch {
            Some(0) => out.push(("max_batch".into(), "must be greater than 0".into())),
            Some(n) if n > cap => out.push((
                "max_batch".into(),
                format!(
                    "{n} is over the {} backend's limit of {cap} records per send",
                    self.backend.backend()
                ),
            )),
            _ => {}
        }
        out
    }
}

/// A destination resource: which backend serves it and that backend's keys.
/// Adding a backend is one variant here and one arm in `backend_config`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "backend")]
pub enum ResourceConfig {
    /// JSON lines appended to a local file, fsynced.
    #[serde(rename = "file")]
    File(FileConfig),
    /// HTTPS POST with Standard Webhooks headers.
    #[serde(rename = "webhook")]
    Webhook(WebhookConfig),
    /// RabbitMQ with publisher confirms.
    #[serde(rename = "amqp")]
    Amqp(AmqpConfig),
    /// NATS JetStream with PubAck.
    #[serde(rename = "nats-jetstream")]
    NatsJetStream(NatsJetStreamConfig),
    /// Redis Streams XADD.
    #[serde(rename = "redis-streams")]
    RedisStreams(RedisStreamsConfig),
    /// MQTT QoS 1.
    #[serde(rename = "mqtt")]
    Mqtt(MqttConfig),
    /// Core NATS publish (at most once at subscribers).
    #[serde(rename = "nats")]
    Nats(NatsConfig),
    /// OCI Queue PutMessages.
    #[serde(rename = "oci-queue")]
    OciQueue(OciQueueConfig),
    /// OCI Streaming PutMessages.
    #[serde(rename = "oci-streaming")]
    OciStreaming(OciStreamingConfig),
    /// OCI Notifications PublishMessage.
    #[serde(rename = "oci-notifications")]
    OciNotifications(OciNotificationsConfig),
}

impl ResourceConfig {
    /// The backend behind this resource: the one place that lists the
    /// backends (adding one = a variant above, an arm here, and its
    /// `BackendConfig` in `destination`).
    pub fn backend_config(&self) -> &dyn BackendConfig {
        match self {
            ResourceConfig::File(c) => c,
            ResourceConfig::Webhook(c) => c,
            ResourceConfig::Amqp(c) => c,
            ResourceConfig::NatsJetStream(c) => c,
            ResourceConfig::RedisStreams(c) => c,
            ResourceConfig::Mqtt(c) => c,
            ResourceConfig::Nats(c) => c,
            ResourceConfig::OciQueue(c) => c,
            ResourceConfig::OciStreaming(c) => c,
            ResourceConfig::OciNotifications(c) => c,
        }
    }

    /// The backend name as written in the config.
    pub fn backend(&self) -> &'static str {
        self.backend_config().name()
    }

    /// `(concurrency, max_batch, largest max_batch)` of this backend's lanes.
    pub fn lane_defaults(&self) -> (usize, usize, usize) {
        self.backend_config().lane_defaults()
    }

    /// Kinds this backend may serve (SPEC section 4).
    fn serves(&self, kind: DestKind) -> bool {
        self.backend_config().serves(kind)
    }
}

/// `[policy]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Allow rules; with none, every compartment may use every resource.
    #[serde(default)]
    pub allow: Vec<AllowRule>,
}

/// One `[[policy.allow]]` rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowRule {
    /// Compartment the rule applies to.
    pub compartment: String,
    /// If set, only these applications of the compartment.
    #[serde(default)]
    pub applications: Option<Vec<String>>,
    /// Resources as `queues.<id>`, `streams.<id>` or `topics.<id>`.
    pub resources: Vec<String>,
}

/// One problem found in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key, e.g. `topics.alerts.url`.
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

impl std::fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Loading or validation failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration file {path}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file (or an override) could not be parsed into the config shape.
    #[error("cannot load configuration ({0}): {1}")]
    Load(String, #[source] Box<config::ConfigError>),
    /// Parsed, but some values are invalid.
    #[error("invalid configuration:\n{}", .0.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigIssue>),
}

/// Where the configuration comes from.
pub enum Source<'a> {
    /// A TOML file on disk.
    File(&'a Path),
    /// TOML text (the embedded default, or tests).
    Text(&'a str),
}

/// Parses a configuration, applying `FNRELAY__...` environment overrides.
pub fn load(source: Source<'_>) -> Result<Config, ConfigError> {
    load_with_env(source, None)
}

/// Like [`load`], with an explicit environment (tests) instead of the process's.
pub fn load_with_env(
    source: Source<'_>,
    env: Option<config::Map<String, String>>,
) -> Result<Config, ConfigError> {
    load_traced(source, env).map(|l| l.config)
}

/// A parsed configuration with what it was read from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The configuration (not yet validated).
    pub config: Config,
    /// First 16 hex digits of SHA-256 over the file's bytes, then, for each
    /// `FNRELAY__` variable in name order, a NUL byte and `NAME=value`:
    /// without overrides, the start of `sha256sum FILE`.
    pub hash: String,
    /// What was read, for people: the file (or the embedded default) and
    /// the names (never the values) of the environment overrides.
    pub sources: Vec<String>,
}

/// Reads and parses a configuration with `FNRELAY__...` overrides from
/// `env` (the process's when `None`), keeping its hash and sources.
pub fn load_traced(
    source: Source<'_>,
    env: Option<config::Map<String, String>>,
) -> Result<Loaded, ConfigError> {
    let (text, origin) = match source {
        Source::File(path) => (
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                path: path.display().to_string(),
                source: e,
            })?,
            format!("file {}", path.display()),
        ),
        Source::Text(text) => (text.to_string(), "embedded default".to_string()),
    };
    let vars: BTreeMap<String, String> = match &env {
        Some(map) => map
            .iter()
            .filter(|(k, _)| k.starts_with("FNRELAY__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        None => std::env::vars()
            .filter(|(k, _)| k.starts_with("FNRELAY__"))
            .collect(),
    };
    let mut bytes = text.clone().into_bytes();
    for (k, v) in &vars {
        bytes.push(0);
        bytes.extend_from_slice(format!("{k}={v}").as_bytes());
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes);
    let hash: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut sources = vec![origin.clone()];
    if !vars.is_empty() {
        sources.push(format!(
            "environment: {}",
            vars.keys().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    let environment = config::Environment::with_prefix("FNRELAY")
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .source(Some(vars.into_iter().collect()));
    let config = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .add_source(environment)
        .build()
        .and_then(|c| c.try_deserialize::<Config>())
        .map_err(|e| ConfigError::Load(origin, Box::new(e)))?;
    Ok(Loaded {
        config,
        hash,
        sources,
    })
}

/// Every problem of a configuration in one pass, for `check-config`: a
/// file that cannot be read or is not TOML is one problem; otherwise each
/// key whose value has the wrong type (or is unknown) is reported with
/// where it came from (the file or its `FNRELAY__` variable), the rest is
/// parsed without those keys and validated, and its problems are added.
/// Returns the configuration when there is no problem at all.
pub fn diagnose(
    source: Source<'_>,
    env: Option<config::Map<String, String>>,
) -> (Option<Loaded>, Vec<ConfigIssue>) {
    let (text, origin) = match source {
        Source::File(path) => match std::fs::read_to_string(path) {
            Ok(t) => (t, format!("file {}", path.display())),
            Err(e) => {
                return (
                    None,
                    vec![ConfigIssue {
                        key: "(file)".into(),
                        reason: format!("cannot read {}: {e}", path.display()),
                    }],
                );
            }
        },
        Source::Text(text) => (text.to_string(), "embedded default".to_string()),
    };
    let vars: BTreeMap<String, String> = match &env {
        Some(map) => map.clone().into_iter().collect(),
        None => std::env::vars().collect(),
    };
    let vars: BTreeMap<String, String> = vars
        .into_iter()
        .filter(|(k, _)| k.starts_with("FNRELAY__"))
        .collect();
    let environment = config::Environment::with_prefix("FNRELAY")
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .source(Some(vars.clone().into_iter().collect()));
    let built = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .add_source(environment)
        .build();
    let built = match built {
        Ok(b) => b,
        Err(e) => {
            return (
                None,
                vec![ConfigIssue {
                    key: "(file)".into(),
                    reason: format!("{origin} is not valid TOML: {e}"),
                }],
            );
        }
    };
    let config::ValueKind::Table(mut root) = built.cache.kind else {
        return (None, Vec::new());
    };
    let mut issues = Vec::new();
    let from = |key: &str, value: &config::Value| -> String {
        if env_origin(value) {
            format!(
                "FNRELAY__{}",
                key.replace('.', "__").replace('"', "").to_uppercase()
            )
        } else {
            origin.clone()
        }
    };
    let mut bad = |key: String, value: &config::Value, e: config::ConfigError| {
        let reason = format!("{e} (from {})", from(&key, value));
        issues.push(ConfigIssue { key, reason });
    };
    let keys: Vec<String> = root.keys().cloned().collect();
    for top in keys {
        let mut value = root.remove(&top).expect("listed key");
        let keep = match top.as_str() {
            "server" => check_leaves::<ServerConfig>(&top, &mut value, &mut bad),
            "journal" => check_leaves::<JournalConfig>(&top, &mut value, &mut bad),
            "delivery" => check_leaves::<DeliveryConfig>(&top, &mut value, &mut bad),
            "log" => check_leaves::<LogConfig>(&top, &mut value, &mut bad),
            "watchdog" => check_leaves::<WatchdogConfig>(&top, &mut value, &mut bad),
            "queues" | "streams" | "topics" => {
                check_entries::<Resource>(&top, &mut value, &mut bad);
                true
            }
            "routes" => {
                if let config::ValueKind::Table(t) = &mut value.kind {
                    if let Some(mut d) = t.remove("default")
                        && check_leaves::<Route>("routes.default", &mut d, &mut bad)
                    {
                        t.insert("default".into(), d);
                    }
                    for group in ["applications", "functions"] {
                        if let Some(mut g) = t.remove(group) {
                            check_entries::<Route>(&format!("routes.{group}"), &mut g, &mut bad);
                            t.insert(group.into(), g);
                        }
                    }
                }
                check_whole::<RoutesConfig>(&top, &value, &mut bad)
            }
            "policy" => check_whole::<PolicyConfig>(&top, &value, &mut bad),
            _ => {
                let reason = "unknown section".to_string();
                issues_push(&mut bad, top.clone(), &value, reason);
                false
            }
        };
        if keep {
            root.insert(top, value);
        }
    }
    let rest = config::Value::new(None, config::ValueKind::Table(root));
    let config = match rest.try_deserialize::<Config>() {
        Ok(c) => c,
        Err(e) => {
            issues.push(ConfigIssue {
                key: "(configuration)".into(),
                reason: e.to_string(),
            });
            return (None, issues);
        }
    };
    if let Err(ConfigError::Invalid(more)) = config.validate() {
        issues.extend(more);
    }
    if !issues.is_empty() {
        return (None, issues);
    }
    match load_traced(Source::Text(&text), Some(vars.into_iter().collect())) {
        Ok(mut loaded) => {
            loaded.sources[0] = origin;
            (Some(loaded), issues)
        }
        Err(e) => (
            None,
            vec![ConfigIssue {
                key: "(configuration)".into(),
                reason: e.to_string(),
            }],
        ),
    }
}

/// Whether a value (or any value inside it) came from the environment.
fn env_origin(value: &config::Value) -> bool {
    if value.origin() == Some("the environment") {
        return true;
    }
    match &value.kind {
        config::ValueKind::Table(t) => t.values().any(env_origin),
        config::ValueKind::Array(a) => a.iter().any(env_origin),
        _ => false,
    }
}

fn issues_push(
    bad: &mut impl FnMut(String, &config::Value, config::ConfigError),
    key: String,
    value: &config::Value,
    reason: String,
) {
    bad(key, value, config::ConfigError::Message(reason));
}

/// Deserializes each key of a section table alone (the section's other keys
/// take their defaults), reporting and removing each bad one. False when
/// the section is not a table at all.
fn check_leaves<T: serde::de::DeserializeOwned>(
    section: &str,
    value: &mut config::Value,
    bad: &mut impl FnMut(String, &config::Value, config::ConfigError),
) -> bool {
    let config::ValueKind::Table(table) = &mut value.kind else {
        let e = config::ConfigError::Message("must be a table".into());
        bad(section.to_string(), value, e);
        return false;
    };
    let keys: Vec<String> = table.keys().cloned().collect();
    for key in keys {
        let leaf = table.get(&key).expect("listed key").clone();
        let mut one = config::Map::new();
        one.insert(key.clone(), leaf.clone());
        let alone = config::Value::new(None, config::ValueKind::Table(one));
        if let Err(e) = alone.try_deserialize::<T>() {
            bad(format!("{section}.{key}"), &leaf, e);
            table.remove(&key);
        }
    }
    true
}

/// Deserializes each entry of a table of `T` alone, reporting and removing
/// each bad one.
fn check_entries<T: serde::de::DeserializeOwned>(
    section: &str,
    value: &mut config::Value,
    bad: &mut impl FnMut(String, &config::Value, config::ConfigError),
) {
    let config::ValueKind::Table(table) = &mut value.kind else {
        return;
    };
    let keys: Vec<String> = table.keys().cloned().collect();
    for key in keys {
        let entry = table.get(&key).expect("listed key").clone();
        if let Err(e) = entry.clone().try_deserialize::<T>() {
            bad(format!("{section}.{}", quote_key(&key)), &entry, e);
            table.remove(&key);
        }
    }
}

/// Deserializes a whole section, reporting it when bad.
fn check_whole<T: serde::de::DeserializeOwned>(
    section: &str,
    value: &config::Value,
    bad: &mut impl FnMut(String, &config::Value, config::ConfigError),
) -> bool {
    match value.clone().try_deserialize::<T>() {
        Ok(_) => true,
        Err(e) => {
            bad(section.to_string(), value, e);
            false
        }
    }
}

impl Config {
    /// Checks every value that can be checked without network I/O.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut issues = Vec::new();
        let mut bad = |key: &str, reason: String| {
            issues.push(ConfigIssue {
                key: key.to_string(),
                reason,
            })
        };

        if let Err(e) = self.server.listen.parse::<SocketAddr>() {
            bad("server.listen", format!("not a socket address ({e})"));
        }
        if let Some(path) = &self.server.auth_token_file {
            match std::fs::read_to_string(path) {
                Ok(t) if t.trim().is_empty() => bad(
                    "server.auth_token_file",
                    format!("{} is empty", path.display()),
                ),
                Ok(_) => {}
                Err(e) => bad(
                    "server.auth_token_file",
                    format!("cannot read {}: {e}", path.display()),
                ),
            }
            if self.server.auth_token.is_some() {
                bad(
                    "server.auth_token",
                    "set either auth_token or auth_token_file, not both".into(),
                );
            }
        }
        if matches!(&self.server.auth_token, Some(t) if t.trim().is_empty()) {
            bad("server.auth_token", "must not be empty".into());
        }
        if !(1..=crate::journal::MAX_ATTEMPTS_KEPT).contains(&self.journal.attempts_kept) {
            bad(
                "journal.attempts_kept",
                format!(
                    "must be between 1 and {}",
                    crate::journal::MAX_ATTEMPTS_KEPT
                ),
            );
        }
        let mut names = std::collections::BTreeSet::new();
        let mut values = std::collections::BTreeMap::new();
        for (i, token) in self.server.tokens.iter().enumerate() {
            let key = format!("server.tokens[{i}]");
            if token.name.trim().is_empty() {
                bad(&format!("{key}.name"), "must not be empty".into());
            } else if !names.insert(token.name.clone()) {
                bad(
                    &format!("{key}.name"),
                    format!("`{}` names two tokens", token.name),
                );
            }
            if token.scopes.is_empty() {
                bad(
                    &format!("{key}.scopes"),
                    "give at least one of ingest, admin, destinations, metrics".into(),
                );
            }
            match std::fs::read_to_string(&token.file) {
                Ok(t) if t.trim().is_empty() => bad(
                    &format!("{key}.file"),
                    format!("{} is empty", token.file.display()),
                ),
                Ok(t) => {
                    if let Some(other) = values.insert(t.trim().to_string(), token.name.clone()) {
                        bad(
                            &format!("{key}.file"),
                            format!(
                                "holds the same token as `{other}`: each token must be its own"
                            ),
                        );
                    }
                }
                Err(e) => bad(
                    &format!("{key}.file"),
                    format!("cannot read {}: {e}", token.file.display()),
                ),
            }
        }
        for (key, value) in [
            ("server.max_body_bytes", self.server.max_body_bytes),
            ("server.max_batch_size", self.server.max_batch_size),
            ("server.max_id_bytes", self.server.max_id_bytes),
            (
                "server.max_error_message_bytes",
                self.server.max_error_message_bytes,
            ),
            ("server.max_connections", self.server.max_connections),
            (
                "server.max_requests_in_flight",
                self.server.max_requests_in_flight,
            ),
            ("delivery.workers", self.delivery.workers),
            ("journal.max_group_commit", self.journal.max_group_commit),
        ] {
            if value == 0 {
                bad(key, "must be greater than 0".into());
            }
        }
        let s = &self.server;
        for (key, value) in [
            ("server.shutdown_timeout", s.shutdown_timeout),
            ("server.header_read_timeout", s.header_read_timeout),
            ("server.body_read_timeout", s.body_read_timeout),
            ("server.idle_timeout", s.idle_timeout),
        ] {
            if value.is_zero() {
                bad(key, "must be greater than 0".into());
            }
        }
        if s.max_id_bytes > MAX_ID_BYTES_LIMIT {
            bad(
                "server.max_id_bytes",
                format!(
                    "{} is over the limit of {MAX_ID_BYTES_LIMIT}",
                    s.max_id_bytes
                ),
            );
        }
        if s.max_body_bytes_in_flight < s.max_body_bytes {
            bad(
                "server.max_body_bytes_in_flight",
                format!(
                    "{} is less than server.max_body_bytes ({}): a largest request could never be served",
                    s.max_body_bytes_in_flight, s.max_body_bytes
                ),
            );
        }
        if s.max_body_bytes_in_flight > u32::MAX as usize {
            bad(
                "server.max_body_bytes_in_flight",
                format!(
                    "{} is over the limit of {}",
                    s.max_body_bytes_in_flight,
                    u32::MAX
                ),
            );
        }
        if self.journal.max_pending == 0 {
            bad("journal.max_pending", "must be greater than 0".into());
        }
        let j = &self.journal;
        match j.backend {
            JournalBackend::Sqlite => {
                if j.path.as_os_str().is_empty() {
                    bad("journal.path", "must not be empty".into());
                }
                for (key, given) in [
                    ("journal.url", j.url.is_some()),
                    ("journal.url_file", j.url_file.is_some()),
                ] {
                    if given {
                        bad(key, "only for backend = \"postgres\"".into());
                    }
                }
            }
            JournalBackend::Postgres => {
                if j.url.is_some() && j.url_file.is_some() {
                    bad("journal.url", "set either url or url_file, not both".into());
                }
                match j.postgres_url() {
                    Err(e) => bad(
                        if j.url_file.is_some() {
                            "journal.url_file"
                        } else {
                            "journal.url"
                        },
                        e,
                    ),
                    Ok(url) => {
                        if let Err(e) = url.parse::<tokio_postgres::Config>() {
                            // The parser's message never holds the password.
                            bad("journal.url", format!("not a PostgreSQL URL ({e})"));
                        }
                    }
                }
                if j.max_connections < 2 {
                    bad(
                        "journal.max_connections",
                        "must be at least 2 (ingest and delivery each need one)".into(),
                    );
                }
                if let Some(ca) = &j.ca_file
                    && let Err(e) = std::fs::metadata(ca)
                {
                    bad(
                        "journal.ca_file",
                        format!("cannot read {}: {e}", ca.display()),
                    );
                }
            }
        }
        if j.lease.is_some() && self.delivery.lease != DeliveryConfig::default().lease {
            bad(
                "journal.lease",
                "set either journal.lease or delivery.lease, not both".into(),
            );
        }
        let d = &self.delivery;
        if d.max_attempts == 0 {
            bad("delivery.max_attempts", "must be at least 1".into());
        }
        if d.breaker_failure_threshold == 0 {
            bad(
                "delivery.breaker_failure_threshold",
                "must be at least 1".into(),
            );
        }
        for (key, value) in [
            ("delivery.max_record_age", d.max_record_age),
            ("delivery.initial_backoff", d.initial_backoff),
            ("delivery.max_backoff", d.max_backoff),
            ("delivery.attempt_timeout", d.attempt_timeout),
            ("delivery.breaker_cool_down", d.breaker_cool_down),
            ("watchdog.max_deadline", self.watchdog.max_deadline),
            ("watchdog.poll_interval", self.watchdog.poll_interval),
        ] {
            if value.is_zero() {
                bad(key, "must be greater than 0".into());
            }
        }
        if d.linger > Duration::from_secs(1) {
            bad(
                "delivery.linger",
                "must be at most 1s (it delays every idle lane's next batch)".into(),
            );
        }
        if self.lease() <= d.attempt_timeout {
            bad(
                if self.journal.lease.is_some() {
                    "journal.lease"
                } else {
                    "delivery.lease"
                },
                format!(
                    "{} must be longer than delivery.attempt_timeout ({}), or records still being sent would be claimed again",
                    humantime::format_duration(self.lease()),
                    humantime::format_duration(d.attempt_timeout)
                ),
            );
        }
        if d.initial_backoff > d.max_backoff {
            bad(
                "delivery.initial_backoff",
                format!(
                    "{} is more than delivery.max_backoff ({})",
                    humantime::format_duration(d.initial_backoff),
                    humantime::format_duration(d.max_backoff)
                ),
            );
        }

        for (table, kind, map) in self.resource_tables() {
            for (id, resource) in map {
                let prefix = format!("{table}.{}", quote_key(id));
                for (key, reason) in resource.validate_lane() {
                    bad(&format!("{prefix}.{key}"), reason);
                }
                match (resource.format, resource.cloudevents_mode) {
                    (RecordFormat::Oci, Some(_)) => bad(
                        &format!("{prefix}.cloudevents_mode"),
                        "only with format = \"cloudevents\"".into(),
                    ),
                    (RecordFormat::Cloudevents, Some(CloudEventsMode::Binary))
                        if !matches!(
                            resource.backend.backend(),
                            "webhook" | "amqp" | "nats" | "nats-jetstream"
                        ) =>
                    {
                        bad(
                            &format!("{prefix}.cloudevents_mode"),
                            format!(
                                "binary mode needs message headers: webhook, amqp, nats or nats-jetstream, not `{}`; use structured",
                                resource.backend.backend()
                            ),
                        )
                    }
                    _ => {}
                }
                let resource = &resource.backend;
                if !resource.serves(kind) {
                    bad(
                        &format!("{prefix}.backend"),
                        format!(
                            "backend `{}` cannot serve a {} resource",
                            resource.backend(),
                            kind.as_str()
                        ),
                    );
                }
                let found = resource.backend_config().validate();
                for (key, reason) in found {
                    bad(&format!("{prefix}.{key}"), reason);
                }
            }
        }

        let mut check_route = |key: String, route: &Route| {
            for (side, dest) in [("success", &route.success), ("failure", &route.failure)] {
                if let Some(dest) = dest
                    && let Err(reason) = self.check_dest(dest)
                {
                    issues.push(ConfigIssue {
                        key: format!("{key}.{side}"),
                        reason,
                    });
                }
            }
        };
        check_route("routes.default".into(), &self.routes.default);
        for (id, route) in &self.routes.applications {
            check_route(format!("routes.applications.{}", quote_key(id)), route);
        }
        for (id, route) in &self.routes.functions {
            check_route(format!("routes.functions.{}", quote_key(id)), route);
        }

        for (i, rule) in self.policy.allow.iter().enumerate() {
            if rule.compartment.is_empty() {
                issues.push(ConfigIssue {
                    key: format!("policy.allow[{i}].compartment"),
                    reason: "must not be empty".into(),
                });
            }
            for (j, name) in rule.resources.iter().enumerate() {
                if self.resource_by_name(name).is_none() {
                    issues.push(ConfigIssue {
                        key: format!("policy.allow[{i}].resources[{j}]"),
                        reason: format!(
                            "`{name}` is not a defined resource (write queues.<id>, streams.<id> or topics.<id>)"
                        ),
                    });
                }
            }
        }

        if issues.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(issues))
        }
    }

    /// `(table name, kind, resources)` for the three resource tables.
    pub fn resource_tables(&self) -> [(&'static str, DestKind, &BTreeMap<String, Resource>); 3] {
        [
            ("queues", DestKind::Queue, &self.queues),
            ("streams", DestKind::Stream, &self.streams),
            ("topics", DestKind::Notification, &self.topics),
        ]
    }

    /// The resource table of one kind.
    pub fn resources(&self, kind: DestKind) -> &BTreeMap<String, Resource> {
        match kind {
            DestKind::Queue => &self.queues,
            DestKind::Stream => &self.streams,
            DestKind::Notification => &self.topics,
        }
    }

    /// Checks that a destination names a defined resource of its kind.
    pub fn check_dest(&self, dest: &DestSpec) -> Result<(), String> {
        match dest.target() {
            None => Ok(()),
            Some((kind, id)) if self.resources(kind).contains_key(id) => Ok(()),
            Some((kind, id)) => Err(format!(
                "{} `{id}` is not defined (no [{}.{}] table)",
                kind.id_field(),
                kind.table(),
                quote_key(id)
            )),
        }
    }

    fn resource_by_name(&self, name: &str) -> Option<&ResourceConfig> {
        let (table, id) = name.split_once('.')?;
        let id = id.trim_matches('"');
        self.resource_tables()
            .into_iter()
            .find(|(t, _, _)| *t == table)
            .and_then(|(_, _, map)| map.get(id))
            .map(|r| &r.backend)
    }
}

/// Quotes a table key the way TOML needs it when it contains dots.
fn quote_key(id: &str) -> String {
    if id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        id.to_string()
    } else {
        format!("\"{id}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        load_with_env(Source::Text(text), Some(Default::default()))
    }

    fn issues(text: &str) -> Vec<String> {
        match parse(text).expect("parses").validate() {
            Ok(()) => vec![],
            Err(ConfigError::Invalid(v)) => v.into_iter().map(|i| i.to_string()).collect(),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn embedded_default_is_valid() {
        let config = parse(DEFAULT_TOML).unwrap();
        config.validate().unwrap();
        assert!(config.routes.default.success.is_some());
    }

    #[test]
    fn camel_case_route_keys_and_quoted_ocids_survive_loading() {
        let config = parse(
            r#"
            [queues."ocid1.queue.oc1..x"]
            backend = "file"
            path = "data/q.jsonl"
            [routes.functions."ocid1.fnfunc.oc1..f"]
            failure = { kind = "QUEUE", queueId = "ocid1.queue.oc1..x", channelId = "Ch" }
            "#,
        )
        .unwrap();
        config.validate().unwrap();
        let route = &config.routes.functions["ocid1.fnfunc.oc1..f"];
        assert_eq!(
            route.failure,
            Some(DestSpec::Queue {
                queue_id: "ocid1.queue.oc1..x".into(),
                channel_id: Some("Ch".into())
            })
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let found = issues(
            r#"
            [server]
            listen = "nowhere"
            [delivery]
            initial_backoff = "10m"
            max_backoff = "1m"
            workers = 0
            [topics.alerts]
            backend = "webhook"
            url = "http://example.com/hook"
            [streams.s]
            backend = "webhook"
            url = "https://example.com/hook"
            [routes.default]
            success = { kind = "STREAM", streamId = "missing" }
            [[policy.allow]]
            compartment = "c"
            resources = ["queues.nope"]
            "#,
        );
        let keys: Vec<&str> = found.iter().map(|s| s.split(':').next().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "server.listen",
                "delivery.workers",
                "delivery.initial_backoff",
                "streams.s.backend",
                "topics.alerts.url",
                "routes.default.success",
                "policy.allow[0].resources[0]",
            ],
            "{found:#?}"
        );
        assert!(found[4].contains("allow_insecure_endpoint"), "{}", found[4]);
        assert!(found[5].contains("streamId `missing` is not defined"));
    }

    #[test]
    fn unknown_backend_key_and_bad_duration_fail_loading() {
        for (text, needle) in [
            (
                "[queues.q]\nbackend = \"carrier-pigeon\"\npath = \"x\"",
                "carrier-pigeon",
            ),
            (
                "[queues.q]\nbackend = \"file\"\npath = \"x\"\ncolour = 1",
                "colour",
            ),
            ("[delivery]\nmax_backoff = \"five minutes\"", "five minutes"),
            ("[server]\nlisten_on = \"x\"", "listen_on"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let env = [
            (
                "FNRELAY__SERVER__LISTEN".to_string(),
                "0.0.0.0:9999".to_string(),
            ),
            ("FNRELAY__DELIVERY__WORKERS".to_string(), "3".to_string()),
            (
                "FNRELAY__DELIVERY__MAX_BACKOFF".to_string(),
                "7s".to_string(),
            ),
        ]
        .into_iter()
        .collect();
        let config = load_with_env(Source::Text(DEFAULT_TOML), Some(env)).unwrap();
        assert_eq!(config.server.listen, "0.0.0.0:9999");
        assert_eq!(config.delivery.workers, 3);
        assert_eq!(config.delivery.max_backoff, Duration::from_secs(7));
    }

    #[test]
    fn missing_token_file_is_named() {
        let found = issues("[server]\nauth_token_file = \"/nonexistent/token\"");
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("server.auth_token_file: cannot read /nonexistent/token"));
    }
}
