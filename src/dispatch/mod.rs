//! Dispatch: moves due records from the journal through a bounded channel to
//! N workers, applies the retry policy and the circuit breakers, and writes
//! each outcome back to the journal, then to metrics and logs.
//!
//! Retries live in the journal (`next_attempt_at`), not in a worker: a
//! failing record holds no worker and survives restarts. Workers never drop
//! a record: every claim ends as delivered, retry, release or dead.

pub mod backoff;
pub mod breaker;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Mutex, Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::breaker::{Admit, Breaker};
use crate::config::DeliveryConfig;
use crate::destination::{OutgoingRecord, Registry, ResourceKey};
use crate::error::{DeliveryError, ErrorLabel};
use crate::journal::{Claimed, Journal, Outcome, now_ms};
use crate::metrics::Metrics;

/// How often the dispatcher looks at the journal when nothing woke it.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How often delivered records past retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Everything workers share.
struct Shared {
    journal: Arc<dyn Journal>,
    registry: Registry,
    breakers: HashMap<ResourceKey, Breaker>,
    metrics: Arc<Metrics>,
    policy: DeliveryConfig,
    /// Wakes the claim loop when a record is rescheduled, so its next due
    /// time is seen without waiting for the idle poll.
    wake: Arc<Notify>,
}

/// What the dispatcher is built from.
pub struct Parts {
    /// The journal to claim from and record outcomes in.
    pub journal: Arc<dyn Journal>,
    /// The built destinations.
    pub registry: Registry,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Retry policy, workers, breaker settings.
    pub policy: DeliveryConfig,
    /// How long delivered records are kept.
    pub retention: Duration,
    /// Notified by ingest after each append.
    pub wake: Arc<Notify>,
}

/// Starts the dispatcher, the workers and the pruner on `tracker`. They stop
/// when `cancel` fires: the dispatcher stops claiming, workers finish the
/// send in hand and release what is still queued.
pub fn start(parts: Parts, tracker: &TaskTracker, cancel: CancellationToken) {
    let Parts {
        journal,
        registry,
        metrics,
        policy,
        retention,
        wake,
    } = parts;
    let breakers = registry
        .iter()
        .map(|(key, _)| {
            metrics.breaker_state(key.0, &key.1, 0);
            (
                key.clone(),
                Breaker::new(policy.breaker_failure_threshold, policy.breaker_cool_down),
            )
        })
        .collect();
    let workers = policy.workers;
    let shared = Arc::new(Shared {
        journal: journal.clone(),
        registry,
        breakers,
        metrics,
        policy,
        wake: wake.clone(),
    });
    let (tx, rx) = mpsc::channel::<Claimed>(workers * 2);
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..workers {
        tracker.spawn(worker(shared.clone(), rx.clone(), cancel.clone()));
    }
    tracker.spawn(claim_loop(journal.clone(), tx, wake, cancel.clone()));
    tracker.spawn(prune_loop(journal, retention, cancel));
}

async fn claim_loop(
    journal: Arc<dyn Journal>,
    tx: mpsc::Sender<Claimed>,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    loop {
        // Wait for room first, so claimed records never wait in memory for
        // long while marked inflight.
        let room = tokio::select! {
            _ = cancel.cancelled() => break,
            permit = tx.reserve() => match permit {
                Ok(p) => { drop(p); tx.capacity().max(1) }
                Err(_) => break,
            },
        };
        let claimed = match journal.claim_due(now_ms(), room).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot claim records from the journal; retrying in 1s");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(IDLE_POLL) => continue,
                }
            }
        };
        let full = claimed.len() == room;
        for record in claimed {
            if tx.send(record).await.is_err() {
                return;
            }
        }
        if full {
            continue;
        }
        let wait = match journal.next_due().await {
            Ok(Some(at)) => {
                Duration::from_millis((at - now_ms()).clamp(0, IDLE_POLL.as_millis() as i64) as u64)
            }
            Ok(None) | Err(_) => IDLE_POLL,
        };
        if wait.is_zero() {
            continue;
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn prune_loop(journal: Arc<dyn Journal>, retention: Duration, cancel: CancellationToken) {
    loop {
        let before = now_ms() - retention.as_millis() as i64;
        match journal.prune(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(records = n, "pruned delivered records past retention"),
            Err(e) => tracing::warn!(error = %e, "journal pruning failed"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
        }
    }
}

async fn worker(
    shared: Arc<Shared>,
    rx: Arc<Mutex<mpsc::Receiver<Claimed>>>,
    cancel: CancellationToken,
) {
    loop {
        let next = { rx.lock().await.recv().await };
        let Some(record) = next else { return };
        let outcome = if cancel.is_cancelled() {
            // Shutting down: not attempted, back to pending as it was.
            Outcome::Release {
                id: record.id.clone(),
                next_attempt_at_ms: now_ms(),
            }
        } else {
            shared.handle(&record).await
        };
        shared.record(&record, outcome).await;
    }
}

/// A final or intermediate result with what metrics and logs need.
enum Verdict {
    Delivered,
    Retry(DeliveryError),
    Dead(DeliveryError),
}

impl Shared {
    async fn handle(&self, record: &Claimed) -> Outcome {
        let now = now_ms();
        let target = &record.target;
        let attempts = record.attempts;
        let age_limit = record.age_from_ms + self.policy.max_record_age.as_millis() as i64;
        if now > age_limit {
            let error = DeliveryError::permanent(
                ErrorLabel::RecordExpired,
                format!(
                    "record is older than delivery.max_record_age ({}) after {attempts} attempts",
                    humantime::format_duration(self.policy.max_record_age)
                ),
            );
            return self.finish(record, attempts, Verdict::Dead(error));
        }
        let key = (target.kind, target.resource_id.clone());
        let Some(destination) = self.registry.get(target.kind, &target.resource_id) else {
            let error = DeliveryError::permanent(
                ErrorLabel::NotFound,
                format!(
                    "{} `{}` is no longer defined in the configuration",
                    target.kind.id_field(),
                    target.resource_id
                ),
            );
            return self.finish(record, attempts, Verdict::Dead(error));
        };
        let breaker = self
            .breakers
            .get(&key)
            .expect("one breaker per destination");
        match breaker.admit(tokio::time::Instant::now()) {
            Admit::Wait(d) => {
                self.metrics.breaker_state(
                    target.kind,
                    &target.resource_id,
                    breaker.state().code(),
                );
                // Spread the wake-ups so a reopened destination is not hit by
                // every waiting record at once.
                let d = d + Duration::from_millis(fastrand::u64(0..=250));
                return Outcome::Release {
                    id: record.id.clone(),
                    // Back by its expiry at the latest, to dead-letter it on time.
                    next_attempt_at_ms: (now + d.as_millis() as i64).min(age_limit + 1),
                };
            }
            Admit::Probe => {
                self.metrics.breaker_state(
                    target.kind,
                    &target.resource_id,
                    breaker.state().code(),
                );
                tracing::info!(destination = %target.resource_id, record_id = %record.id, "circuit breaker half-open: sending a probe");
            }
            Admit::Go => {}
        }

        let attempt = attempts + 1;
        let outgoing = OutgoingRecord {
            id: record.id.clone(),
            fn_call_id: record.fn_call_id.clone(),
            function_id: record.function_id.clone(),
            destination_type: record.destination_type,
            kind: target.kind,
            resource_id: target.resource_id.clone(),
            channel_id: target.channel_id.clone(),
            body: Bytes::from(record.body.clone()),
            attempt,
        };
        let result =
            match tokio::time::timeout(self.policy.attempt_timeout, destination.send(&outgoing))
                .await
            {
                Ok(r) => r,
                Err(_) => Err(DeliveryError::retry(
                    ErrorLabel::Timeout,
                    format!(
                        "no confirmation within delivery.attempt_timeout ({})",
                        humantime::format_duration(self.policy.attempt_timeout)
                    ),
                )),
            };
        let before = breaker.state();
        let verdict = match result {
            Ok(()) => {
                breaker.on_success();
                self.metrics
                    .attempt(target.kind, &target.resource_id, "success", None);
                Verdict::Delivered
            }
            Err(e) if e.is_retryable() => {
                breaker.on_failure(tokio::time::Instant::now());
                self.metrics
                    .attempt(target.kind, &target.resource_id, "retry", Some(e.label));
                if attempt >= self.policy.max_attempts {
                    Verdict::Dead(e)
                } else {
                    Verdict::Retry(e)
                }
            }
            Err(e) => {
                // The destination answered: it is up, this record is bad.
                breaker.on_success();
                self.metrics
                    .attempt(target.kind, &target.resource_id, "permanent", Some(e.label));
                Verdict::Dead(e)
            }
        };
        let after = breaker.state();
        if before != after {
            self.metrics
                .breaker_state(target.kind, &target.resource_id, after.code());
            match after {
                breaker::State::Open => {
                    tracing::warn!(destination = %target.resource_id, "circuit breaker opened: destination keeps failing; records wait in the journal")
                }
                breaker::State::Closed => {
                    tracing::info!(destination = %target.resource_id, "circuit breaker closed: destination is back")
                }
                breaker::State::HalfOpen => {}
            }
        }
        self.finish(record, attempt, verdict)
    }

    fn finish(&self, record: &Claimed, attempts: u32, verdict: Verdict) -> Outcome {
        match verdict {
            Verdict::Delivered => Outcome::Delivered {
                id: record.id.clone(),
                attempts,
            },
            Verdict::Retry(e) => {
                let hint = match e.disposition {
                    crate::error::Disposition::Retry { after } => after,
                    crate::error::Disposition::Permanent => None,
                };
                let delay = backoff::delay(
                    attempts,
                    self.policy.initial_backoff,
                    self.policy.max_backoff,
                    hint,
                    fastrand::f64(),
                );
                let age_limit = record.age_from_ms + self.policy.max_record_age.as_millis() as i64;
                // Come back no later than the expiry, so an expired record is
                // dead-lettered on time instead of after a long backoff.
                let next = (now_ms() + delay.as_millis() as i64).min(age_limit + 1);
                tracing::debug!(record_id = %record.id, attempt = attempts, error = %e.full_message(), retry_in_ms = next - now_ms(), "delivery attempt failed; will retry");
                Outcome::Retry {
                    id: record.id.clone(),
                    attempts,
                    next_attempt_at_ms: next,
                    error: e.full_message(),
                }
            }
            Verdict::Dead(e) => Outcome::Dead {
                id: record.id.clone(),
                attempts,
                error: e.full_message(),
                label: e.label,
            },
        }
    }

    /// Writes the outcome; counts and logs it once the journal has it.
    async fn record(&self, record: &Claimed, outcome: Outcome) {
        let target = &record.target;
        let result = self.journal.complete(vec![outcome.clone()]).await;
        if let Err(e) = result {
            // The row stays inflight and goes back to pending at the next
            // start: delivered at least once, possibly twice, never lost.
            tracing::error!(record_id = %record.id, error = %e, "cannot record a delivery outcome in the journal");
            return;
        }
        match outcome {
            Outcome::Delivered { attempts, .. } => {
                self.metrics.delivery(
                    record.destination_type,
                    target.kind,
                    &target.resource_id,
                    None,
                );
                let seconds = (now_ms() - record.accepted_at_ms).max(0) as f64 / 1000.0;
                self.metrics
                    .latency(target.kind, &target.resource_id, seconds);
                tracing::info!(
                    record_id = %record.id,
                    fn_call_id = %record.fn_call_id,
                    destination = %format!("{}:{}", target.kind.as_str(), target.resource_id),
                    destination_type = record.destination_type.lower(),
                    attempts,
                    "invocation record delivered"
                );
            }
            Outcome::Dead {
                attempts,
                error,
                label,
                ..
            } => {
                self.metrics.delivery(
                    record.destination_type,
                    target.kind,
                    &target.resource_id,
                    Some(label),
                );
                tracing::warn!(
                    record_id = %record.id,
                    fn_call_id = %record.fn_call_id,
                    destination = %format!("{}:{}", target.kind.as_str(), target.resource_id),
                    attempts,
                    error_message = label.as_str(),
                    "Invocation record delivery to {} destination failed due to - {}: {}",
                    record.destination_type.lower(),
                    label,
                    error
                );
            }
            Outcome::Retry { .. } | Outcome::Release { .. } => self.wake.notify_one(),
        }
    }
}
