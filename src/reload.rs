//! Configuration reload (SPEC section 9): SIGHUP and `POST /v1/admin/reload`
//! ask one reloader task, so reloads never overlap. The file is read and
//! validated whole first, its destinations built and the bearer token read;
//! any problem refuses the reload with every reason (logged and counted),
//! and the running configuration stays. Keys that only a restart can change
//! (listen address, journal, log) refuse it too, named. A good file is
//! swapped in: ingest requests that start afterwards use the new routes,
//! policy, token and limits; lanes take the new destinations and limits at
//! their next claim, while a batch in flight finishes on what it was claimed
//! with; a resource that left the configuration keeps its records for
//! `delivery.removed_resource_grace` in case it comes back.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::config::{self, Config, ConfigError, Loaded, Source};
use crate::destination::Registry;
use crate::dispatch::Dispatcher;
use crate::metrics::Metrics;

/// Where the running configuration came from, and so what a reload reads.
#[derive(Debug, Clone)]
pub enum Origin {
    /// A TOML file (re-read on reload), with the environment's overrides.
    File(PathBuf),
    /// The embedded default, with the environment's overrides.
    Embedded,
    /// Given by the embedder (tests): nothing to re-read; reloads are refused.
    Fixed,
}

/// A reload that was applied.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    /// The hash of the configuration now in use.
    pub hash: String,
    /// Whether it differs from the one before.
    pub changed: bool,
    /// Resources added, as `table.id`.
    pub added: Vec<String>,
    /// Resources removed (their records wait out the grace period).
    pub removed: Vec<String>,
}

/// A refused reload: every reason, each naming its key.
#[derive(Debug, Clone, Serialize)]
pub struct Refused {
    /// What is wrong; the old configuration stays.
    pub reasons: Vec<String>,
}

/// One reload request, with where to send its result (none for SIGHUP).
pub struct Request {
    /// What asked: `SIGHUP`, or the API call and its token's name.
    pub trigger: String,
    /// Where the result goes.
    pub reply: Option<oneshot::Sender<Result<Applied, Refused>>>,
}

/// Everything a reload swaps, and where it reads the new configuration.
pub struct Reloader {
    /// What to re-read.
    pub origin: Origin,
    /// The configuration in use.
    pub current: Arc<Config>,
    /// Its hash.
    pub hash: String,
    /// Ingest's settings and budgets.
    pub api: Arc<AppState>,
    /// The lanes.
    pub dispatcher: Dispatcher,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl Reloader {
    /// Reads, validates and applies the configuration, or refuses it.
    pub async fn reload(&mut self, trigger: &str) -> Result<Applied, Refused> {
        let result = self.try_reload().await;
        match &result {
            Ok(applied) => {
                self.metrics.reload("applied");
                tracing::info!(
                    trigger,
                    hash = %applied.hash,
                    changed = applied.changed,
                    added = %applied.added.join(","),
                    removed = %applied.removed.join(","),
                    "configuration reloaded"
                );
            }
            Err(refused) => {
                self.metrics.reload("refused");
                tracing::error!(
                    trigger,
                    hash = %self.hash,
                    reasons = %refused.reasons.join("; "),
                    "configuration reload refused; the running configuration stays"
                );
            }
        }
        result
    }

    async fn try_reload(&mut self) -> Result<Applied, Refused> {
        let refuse = |reasons: Vec<String>| Refused { reasons };
        let loaded = match &self.origin {
            Origin::File(path) => config::load_traced(Source::File(path), None),
            Origin::Embedded => config::load_traced(Source::Text(config::DEFAULT_TOML), None),
            Origin::Fixed => {
                return Err(refuse(vec![
                    "this daemon was started with a configuration given in code, not a file: nothing to reload".into(),
                ]));
            }
        };
        let Loaded { config, hash, .. } = loaded.map_err(|e| refuse(reasons(e)))?;
        config.validate().map_err(|e| refuse(reasons(e)))?;
        let restart: Vec<String> = self
            .current
            .restart_keys(&config)
            .into_iter()
            .map(|k| format!("{k}: changes only with a restart"))
            .collect();
        if !restart.is_empty() {
            return Err(refuse(restart));
        }
        let tokens = crate::auth::Tokens::load(&config).map_err(|e| refuse(vec![e]))?;
        let registry = Registry::build(&config).map_err(|e| refuse(vec![e.to_string()]))?;

        let names = |c: &Config| -> std::collections::BTreeSet<String> {
            c.resource_tables()
                .iter()
                .flat_map(|(table, _, map)| map.keys().map(move |id| format!("{table}.{id}")))
                .collect()
        };
        let (before, after) = (names(&self.current), names(&config));
        let applied = Applied {
            changed: hash != self.hash,
            hash: hash.clone(),
            added: after.difference(&before).cloned().collect(),
            removed: before.difference(&after).cloned().collect(),
        };
        let config = Arc::new(config);
        self.api.reconfigure(config.clone(), tokens);
        let policy = config::DeliveryConfig {
            lease: config.lease(),
            ..config.delivery.clone()
        };
        check_in_background(registry.clone());
        self.dispatcher.reconfigure(registry, policy).await;
        self.metrics.config_loaded(&hash);
        self.current = config;
        self.hash = hash;
        Ok(applied)
    }
}

/// Runs reload requests one at a time until `stop` fires.
pub async fn serve(
    mut reloader: Reloader,
    mut requests: mpsc::Receiver<Request>,
    stop: CancellationToken,
) {
    loop {
        let request = tokio::select! {
            _ = stop.cancelled() => return,
            r = requests.recv() => match r {
                Some(r) => r,
                None => return,
            },
        };
        let result = reloader.reload(&request.trigger).await;
        if let Some(reply) = request.reply {
            let _ = reply.send(result);
        }
    }
}

/// Sends a reload request on each SIGHUP (what `systemctl reload` sends),
/// so SIGHUP never kills the daemon.
#[cfg(unix)]
pub fn on_hangup(requests: mpsc::Sender<Request>, stop: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = hup.recv() => if r.is_none() { return },
            }
            tracing::info!("SIGHUP received: reloading the configuration");
            if requests
                .send(Request {
                    trigger: "SIGHUP".into(),
                    reply: None,
                })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    Ok(())
}

/// No SIGHUP off Unix.
#[cfg(not(unix))]
pub fn on_hangup(_: mpsc::Sender<Request>, _: CancellationToken) -> std::io::Result<()> {
    Ok(())
}

/// Every reason of a load or validation error, one per line.
fn reasons(e: ConfigError) -> Vec<String> {
    match e {
        ConfigError::Invalid(issues) => issues.iter().map(ToString::to_string).collect(),
        other => vec![crate::logging::Chain(&other).to_string()],
    }
}

/// Checks destinations without holding anything up: a broker that is down
/// must not stop ingest; its records wait and retry.
pub fn check_in_background(registry: Registry) {
    tokio::spawn(async move {
        for (name, e) in registry.check_all(true).await {
            tracing::warn!(destination = %name, error = %e.full_message(), "destination check failed; its records will be retried");
        }
    });
}

/// Grows or shrinks a semaphore of `old` permits to `new`: permits in use
/// are not taken back; they are forgotten as they come back.
pub(crate) fn resize(semaphore: &Arc<Semaphore>, old: usize, new: usize) {
    if new > old {
        semaphore.add_permits(new - old);
    } else if new < old {
        let excess = old - new;
        let forgotten = semaphore.forget_permits(excess);
        if forgotten < excess {
            let semaphore = semaphore.clone();
            tokio::spawn(async move {
                if let Ok(p) = semaphore
                    .acquire_many_owned((excess - forgotten) as u32)
                    .await
                {
                    p.forget();
                }
            });
        }
    }
}
