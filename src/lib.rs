//! fnrelay delivers the results of detached function invocations: the
//! runtime posts a completion event, fnrelay journals it durably, builds a
//! versioned invocation record and delivers it, with retries, to the
//! function's success or failure destination, counting every outcome.
//!
//! # Layout
//!
//! - [`config`]: the TOML + environment configuration and its validation.
//!   Nothing else parses configuration.
//! - [`api`]: HTTP ingest, admin, metrics and health endpoints. Never calls
//!   a destination; answers 202 only after the journal commit. Holds the
//!   request budgets (requests and body bytes in flight, body deadline).
//! - [`auth`]: bearer tokens and their scopes.
//! - [`server`]: the HTTP/1.1 connections under the API: connection cap,
//!   header and idle timeouts, a shutdown bounded by `shutdown_timeout`.
//! - [`record`]: event validation and the invocation record v1.0. Pure.
//! - [`routing`]: destinations as events and routes name them, and the
//!   precedence between inline destinations and routes. Pure.
//! - [`journal`]: the durable store behind the [`journal::Journal`] trait:
//!   SQLite (one process) or PostgreSQL (shared by replicas); group commit,
//!   leased claims, fenced outcomes. The only module that touches a
//!   database.
//! - [`dispatch`]: one lane per destination resource (its claims, batches,
//!   concurrency and circuit breaker), the retry policy (backoff) and the
//!   disposition of failures, and the completer that writes outcomes back
//!   in batches.
//! - [`destination`]: the [`destination::Destination`] trait and one folder
//!   per backend. The only modules that talk to networks or brokers.
//! - [`metrics`]: every Prometheus metric, with bounded labels.
//! - [`error`]: the delivery error vocabulary and dispositions.
//! - [`reload`]: SIGHUP and `POST /v1/admin/reload`: validate, then swap
//!   routes, resources, policy, tokens and limits, or refuse naming why.
//! - [`watchdog`]: started invocations whose completion never came get a
//!   failure record made by fnrelay.
//! - [`shutdown`]: signals to the cancellation token.
//! - [`logging`]: escaped text logs, clipped client input, error chains,
//!   rate-limited repeats.
//!
//! Delivery is at least once: every destination must tolerate a duplicate
//! that carries the same record id.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod auth;
pub mod config;
pub mod destination;
pub mod dispatch;
pub mod error;
pub mod journal;
pub mod logging;
pub mod metrics;
pub mod record;
pub mod reload;
pub mod routing;
pub mod server;
pub mod shutdown;
pub mod watchdog;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::config::JournalBackend;
use crate::journal::{Journal, PgJournal, SqliteJournal};

/// The daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The bearer token file could not be read.
    #[error("{0}")]
    Token(String),
    /// The journal could not be opened.
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    /// A destination could not be built.
    #[error(transparent)]
    Destination(#[from] destination::BuildError),
    /// The HTTP server failed.
    #[error("HTTP server failed")]
    Serve(#[source] std::io::Error),
}

/// What the HTTP drain and the delivery wait may use of `shutdown_timeout`:
/// all but a tenth (at most a second), kept for the last outcome commit and
/// the exit itself, so the process is gone within `shutdown_timeout`.
fn drain_budget(shutdown_timeout: std::time::Duration) -> std::time::Duration {
    shutdown_timeout.saturating_sub((shutdown_timeout / 10).min(std::time::Duration::from_secs(1)))
}

/// Runs the daemon on `listener` until `shutdown` fires, then stops
/// accepting, lets in-flight deliveries finish (up to
/// `server.shutdown_timeout`) and returns. Records not yet delivered stay in
/// the journal for the next start. The configuration is fixed: reloads are
/// refused (see [`run_with`]).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let digest =
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, format!("{config:?}").as_bytes());
    let hash = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    run_with(config, hash, reload::Origin::Fixed, listener, shutdown).await
}

/// Like [`run`], for a configuration read from `origin` (whose hash is
/// `hash`): SIGHUP and `POST /v1/admin/reload` re-read it.
pub async fn run_with(
    config: Config,
    hash: String,
    origin: reload::Origin,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    // First, so that a SIGHUP from now on reloads rather than kills.
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
    if !matches!(origin, reload::Origin::Fixed) {
        reload::on_hangup(reload_tx.clone(), shutdown.clone()).map_err(RunError::Serve)?;
    }
    config.validate()?;
    let tokens = auth::Tokens::load(&config).map_err(RunError::Token)?;
    let wake = Arc::new(Notify::new());
    let journal: Arc<dyn Journal> = match config.journal.backend {
        JournalBackend::Sqlite => {
            let j = SqliteJournal::open(&config.journal.path, config.journal.max_group_commit)?;
            j.set_attempts_kept(config.journal.attempts_kept);
            Arc::new(j)
        }
        JournalBackend::Postgres => {
            let j = PgJournal::open(&config.journal, wake.clone()).await?;
            j.set_attempts_kept(config.journal.attempts_kept);
            Arc::new(j)
        }
    };
    let registry = destination::Registry::build(&config)?;
    reload::check_in_background(registry.clone());
    let metrics = Arc::new(metrics::Metrics::new());
    metrics.config_loaded(&hash);
    let tracker = TaskTracker::new();
    let stop_delivery = CancellationToken::new();
    let config = Arc::new(config);

    let dispatcher = dispatch::start(
        dispatch::Parts {
            journal: journal.clone(),
            registry,
            metrics: metrics.clone(),
            policy: config::DeliveryConfig {
                lease: config.lease(),
                ..config.delivery.clone()
            },
            retention: config.journal.delivered_retention,
            wake: wake.clone(),
        },
        &tracker,
        stop_delivery.clone(),
    );

    let mut state = api::AppState::new(
        config.clone(),
        journal.clone(),
        metrics.clone(),
        wake,
        shutdown.clone(),
        tokens,
    );
    state.reload = Some(reload_tx);
    let state = Arc::new(state);
    tracker.spawn(watchdog::run(state.clone(), stop_delivery.clone()));
    tokio::spawn(reload::serve(
        reload::Reloader {
            origin,
            current: config.clone(),
            hash,
            api: state.clone(),
            dispatcher,
            metrics: metrics.clone(),
        },
        reload_rx,
        shutdown.clone(),
    ));
    let addr = listener.local_addr().map_err(RunError::Serve)?;
    let limits = server::Limits {
        max_connections: server::fit_connections(config.server.max_connections),
        header_read_timeout: config.server.header_read_timeout,
        idle_timeout: config.server.idle_timeout,
        shutdown_timeout: drain_budget(config.server.shutdown_timeout),
    };
    let store = match config.journal.backend {
        JournalBackend::Sqlite => config.journal.path.display().to_string(),
        JournalBackend::Postgres => "postgres".to_string(),
    };
    tracing::info!(%addr, journal = %store, max_connections = limits.max_connections, "fnrelay listening");
    let http = tokio::spawn(server::serve(
        listener,
        api::router(state),
        limits,
        metrics,
        shutdown.clone(),
    ));

    // On the signal, ingest drains (answering 503) while delivery stops and
    // waits for in-flight sends; both within shutdown_timeout.
    shutdown.cancelled().await;
    stop_delivery.cancel();
    tracker.close();
    if tokio::time::timeout(drain_budget(config.server.shutdown_timeout), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "shutdown timeout reached with deliveries still in flight; they stay in the journal and are retried at the next start"
        );
    }
    let served = http.await.unwrap_or_else(|e| Err(std::io::Error::other(e)));
    tracing::info!("fnrelay stopped");
    served.map_err(RunError::Serve)
}
