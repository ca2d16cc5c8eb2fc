//! Dispatch: one lane per destination resource (SPEC section 10). Each lane
//! claims its due records from the journal in batches (leases), sends each
//! batch with [`Destination::send_batch`] under its own concurrency limit and
//! circuit breaker, and hands every record's outcome to the completer, which
//! writes many outcomes in one journal transaction and only then counts and
//! logs them. Sends never wait for a journal commit.
//!
//! Isolation: a lane holds only its own records and its own slots, so a slow
//! or dead destination cannot hold another's records; `delivery.workers`
//! caps the batches in flight over all lanes. A lane whose breaker is open
//! claims nothing (no claim/release churn); when the cool-down ends it
//! claims one record as the probe.
//!
//! Retries live in the journal (`next_attempt_at`), not in a task: a failing
//! record holds no slot and survives restarts. A destination-wide failure
//! (see [`crate::error::Scope`]) releases the records without using an
//! attempt and opens the breaker; only real sends count as attempts.

pub mod backoff;
pub mod breaker;

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::breaker::{Admit, Breaker};
use crate::config::{DeliveryConfig, LaneLimits};
use crate::destination::{Destination, OutgoingRecord, Registry};
use crate::error::{DeliveryError, ErrorLabel, Scope};
use crate::journal::{Claimed, Journal, Lane, Outcome, now_ms};
use crate::logging::{RateLimited, clip};
use crate::metrics::Metrics;

/// How often an idle lane looks at the journal when nothing woke it.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How often delivered records past retention are pruned and the journal
/// gauges recounted.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How often a lane whose breaker is open looks for expired records.
const EXPIRY_CHECK_EVERY: Duration = Duration::from_secs(30);
/// How long the completer pauses after the journal failed to take outcomes.
const COMPLETE_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Outcomes the completer writes in one journal call at most.
const MAX_OUTCOMES_PER_COMMIT: usize = 8192;

/// What the dispatcher is built from.
pub struct Parts {
    /// The journal to claim from and record outcomes in.
    pub journal: Arc<dyn Journal>,
    /// The built destinations.
    pub registry: Registry,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Retry policy, global cap, breaker settings.
    pub policy: DeliveryConfig,
    /// How long delivered records are kept.
    pub retention: Duration,
    /// Notified by ingest after each append.
    pub wake: Arc<Notify>,
}

/// What a lane sends with; swapped whole by a configuration reload (a
/// batch in flight keeps the destination it was claimed for).
#[derive(Clone)]
struct LaneConf {
    /// How the resource's records are written (the record, or a
    /// CloudEvent).
    encoding: crate::destination::cloudevents::Encoding,
    /// `None`: the resource is no longer configured; after
    /// `delivery.removed_resource_grace` its records are dead-lettered as
    /// `not_found`.
    destination: Option<Arc<dyn Destination>>,
    limits: LaneLimits,
    /// When the resource left the configuration.
    removed_at: Option<tokio::time::Instant>,
}

/// One destination resource's lane.
struct LaneState {
    lane: Lane,
    conf: RwLock<LaneConf>,
    breaker: Breaker,
    /// Batches in flight to this resource.
    slots: Arc<Semaphore>,
    wake: Notify,
    /// Notified when one of the lane's batches has finished its send.
    batch_done: Notify,
}

impl LaneState {
    fn conf(&self) -> LaneConf {
        self.conf.read().expect("lane conf lock").clone()
    }

    /// A reload: the resource is (still, again) configured as `destination`
    /// with `limits`, or has left the configuration (`None`).
    fn reconfigure(
        &self,
        destination: Option<Arc<dyn Destination>>,
        limits: Option<LaneLimits>,
        encoding: Option<crate::destination::cloudevents::Encoding>,
    ) {
        let mut conf = self.conf.write().expect("lane conf lock");
        if let Some(encoding) = encoding {
            conf.encoding = encoding;
        }
        if let Some(limits) = limits {
            crate::reload::resize(
                &self.slots,
                conf.limits.concurrency.max(1),
                limits.concurrency.max(1),
            );
            conf.limits = limits;
        }
        conf.removed_at = match (&destination, conf.removed_at) {
            (Some(_), _) => None,
            (None, Some(at)) => Some(at),
            (None, None) => Some(tokio::time::Instant::now()),
        };
        conf.destination = destination;
        drop(conf);
        self.wake.notify_one();
    }
}

type Lanes = Arc<RwLock<HashMap<Lane, Arc<LaneState>>>>;

/// Everything lanes and the completer share.
struct Shared {
    journal: Arc<dyn Journal>,
    metrics: Arc<Metrics>,
    /// The retry policy and limits; swapped by a reload. A batch keeps the
    /// policy it was claimed under.
    policy: RwLock<Arc<DeliveryConfig>>,
    /// Batches in flight over all lanes beyond each lane's first
    /// (`delivery.workers`).
    global: Arc<Semaphore>,
    done: mpsc::Sender<Done>,
    /// Journal errors every lane would log each second: once per 10 s.
    errors: RateLimited,
}

impl Shared {
    fn policy(&self) -> Arc<DeliveryConfig> {
        self.policy.read().expect("policy lock").clone()
    }
}

/// The running dispatcher, to reconfigure it on a reload. Holds no lane
/// alive: when delivery stops, reconfiguring does nothing.
#[derive(Clone)]
pub struct Dispatcher {
    shared: Weak<Shared>,
    lanes: Lanes,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Dispatcher {
    /// Applies a reloaded configuration: the new policy and limits, new
    /// lanes for new resources, the new destinations for the others (a
    /// batch in flight finishes on the destination it was claimed for), and
    /// resources that left the configuration start their grace period.
    pub async fn reconfigure(&self, registry: Registry, policy: DeliveryConfig) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        if self.cancel.is_cancelled() {
            return;
        }
        let old = shared.policy();
        crate::reload::resize(&shared.global, old.workers, policy.workers);
        *shared.policy.write().expect("policy lock") = Arc::new(policy.clone());
        {
            let mut lanes = self.lanes.write().expect("lanes lock");
            let mut configured = std::collections::HashSet::new();
            for ((kind, id), destination, limits) in registry.iter() {
                let key = Lane {
                    kind: *kind,
                    resource_id: id.clone(),
                };
                configured.insert(key.clone());
                let encoding = registry.encoding(&(*kind, id.clone()));
                match lanes.get(&key) {
                    Some(state) => {
                        state.reconfigure(Some(destination.clone()), Some(limits), Some(encoding))
                    }
                    None => {
                        shared.metrics.lane_added(*kind, id);
                        let state = new_lane(
                            key.clone(),
                            Some(destination.clone()),
                            limits,
                            encoding,
                            &policy,
                        );
                        lanes.insert(key, state.clone());
                        self.tracker.spawn(lane_loop(
                            state,
                            shared.clone(),
                            self.tracker.clone(),
                            self.cancel.clone(),
                        ));
                    }
                }
            }
            for (key, state) in lanes.iter() {
                state
                    .breaker
                    .set(policy.breaker_failure_threshold, policy.breaker_cool_down);
                if !configured.contains(key) && state.conf().destination.is_some() {
                    tracing::warn!(
                        destination = %key.resource_id,
                        grace = %humantime::format_duration(policy.removed_resource_grace),
                        "resource left the configuration: its pending records wait for it to come back, then are dead-lettered as not_found"
                    );
                    state.reconfigure(None, None, None);
                }
            }
        }
        adopt_orphans(&shared, &self.lanes, &self.tracker, &self.cancel).await;
    }
}

/// Gives a lane to each resource that has pending records in the journal
/// but no lane (it left the configuration before this process started, or
/// another replica accepted records for it): they wait out the grace
/// period, then are dead-lettered as `not_found`.
async fn adopt_orphans(
    shared: &Arc<Shared>,
    lanes: &Lanes,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
    let found = match shared.journal.pending_lanes().await {
        Ok(found) => found,
        Err(e) => {
            tracing::error!(error = %e, "cannot list the journal's lanes; records of removed resources stay pending");
            return;
        }
    };
    let policy = shared.policy();
    let mut lanes = lanes.write().expect("lanes lock");
    for lane in found {
        if lanes.contains_key(&lane) || cancel.is_cancelled() {
            continue;
        }
        let limits = LaneLimits {
            concurrency: 1,
            max_batch: 512,
        };
        let state = new_lane(lane.clone(), None, limits, Default::default(), &policy);
        lanes.insert(lane, state.clone());
        tracker.spawn(lane_loop(
            state,
            shared.clone(),
            tracker.clone(),
            cancel.clone(),
        ));
    }
}

/// A batch's outcomes, on their way to the completer.
struct Done {
    lane: Arc<LaneState>,
    /// Each record (body dropped) with its outcome.
    outcomes: Vec<Settled>,
}

/// A record's outcome and the note of its attempt (JSON), for lookups.
type Settled = (Claimed, Outcome, Option<String>);

/// The note of one attempt (a [`crate::journal::AttemptNote`] as JSON).
fn note(outcome: &str, error: Option<&DeliveryError>, duration: Duration) -> Option<String> {
    serde_json::to_string(&crate::journal::AttemptNote {
        at_ms: now_ms(),
        outcome: outcome.to_string(),
        error_message: error.map(|e| e.label.as_str().to_string()),
        error: error.map(DeliveryError::full_message),
        duration_ms: Some(duration.as_millis() as i64),
    })
    .ok()
}

/// Starts the lanes, the completer and the pruner on `tracker`. They stop
/// when `cancel` fires: lanes stop claiming, batches in flight finish their
/// send, and the completer writes every outcome before it returns.
pub fn start(parts: Parts, tracker: &TaskTracker, cancel: CancellationToken) -> Dispatcher {
    let Parts {
        journal,
        registry,
        metrics,
        policy,
        retention,
        wake,
    } = parts;
    let (done_tx, done_rx) = mpsc::channel::<Done>(1024);
    let shared = Arc::new(Shared {
        journal: journal.clone(),
        metrics: metrics.clone(),
        global: Arc::new(Semaphore::new(policy.workers)),
        policy: RwLock::new(Arc::new(policy.clone())),
        done: done_tx,
        errors: RateLimited::new(Duration::from_secs(10)),
    });
    let mut lanes: HashMap<Lane, Arc<LaneState>> = HashMap::new();
    for ((kind, id), destination, limits) in registry.iter() {
        metrics.lane_added(*kind, id);
        let lane = Lane {
            kind: *kind,
            resource_id: id.clone(),
        };
        let encoding = registry.encoding(&(*kind, id.clone()));
        lanes.insert(
            lane.clone(),
            new_lane(lane, Some(destination.clone()), limits, encoding, &policy),
        );
    }
    let lanes: Lanes = Arc::new(RwLock::new(lanes));
    for lane in lanes.read().expect("lanes lock").values() {
        tracker.spawn(lane_loop(
            lane.clone(),
            shared.clone(),
            tracker.clone(),
            cancel.clone(),
        ));
    }
    // Records of resources that left the configuration get a lane that
    // dead-letters them after the grace period.
    {
        let (shared, tracker2, cancel, lanes) = (
            shared.clone(),
            tracker.clone(),
            cancel.clone(),
            lanes.clone(),
        );
        tracker.spawn(async move { adopt_orphans(&shared, &lanes, &tracker2, &cancel).await });
    }
    tracker.spawn(fan_out(wake, lanes.clone(), cancel.clone()));
    tracker.spawn(completer(done_rx, journal.clone(), metrics));
    tracker.spawn(prune_loop(journal, retention, cancel.clone()));
    // `shared` (and with it the completer's sender) now lives only in the
    // lanes and their batches: the completer ends after the last of them.
    Dispatcher {
        shared: Arc::downgrade(&shared),
        lanes,
        tracker: tracker.clone(),
        cancel,
    }
}

fn new_lane(
    lane: Lane,
    destination: Option<Arc<dyn Destination>>,
    limits: LaneLimits,
    encoding: crate::destination::cloudevents::Encoding,
    policy: &DeliveryConfig,
) -> Arc<LaneState> {
    let removed_at = destination.is_none().then(tokio::time::Instant::now);
    Arc::new(LaneState {
        lane,
        conf: RwLock::new(LaneConf {
            encoding,
            destination,
            limits,
            removed_at,
        }),
        breaker: Breaker::new(policy.breaker_failure_threshold, policy.breaker_cool_down),
        slots: Arc::new(Semaphore::new(limits.concurrency.max(1))),
        wake: Notify::new(),
        batch_done: Notify::new(),
    })
}

/// Ingest wakes one `Notify`; every lane looks at the journal.
async fn fan_out(wake: Arc<Notify>, lanes: Lanes, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = wake.notified() => {}
        }
        for lane in lanes.read().expect("lanes lock").values() {
            lane.wake.notify_one();
        }
    }
}

async fn lane_loop(
    lane: Arc<LaneState>,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let mut next_expiry_check = tokio::time::Instant::now();
    loop {
        if cancel.is_cancelled() {
            return;
        }
        // This round's configuration: the batch claimed now is sent with it
        // even if a reload swaps it meanwhile.
        let policy = shared.policy();
        let conf = lane.conf();
        if let (None, Some(removed_at)) = (&conf.destination, conf.removed_at) {
            // Left the configuration: wait for it to come back (a reload
            // wakes the lane) until the grace period ends.
            let until = removed_at + policy.removed_resource_grace;
            if tokio::time::Instant::now() < until {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = lane.wake.notified() => {}
                    _ = tokio::time::sleep_until(until) => {}
                }
                continue;
            }
        }
        let lease = policy.lease;
        let (limit, probe) = match lane.breaker.admit(tokio::time::Instant::now()) {
            Admit::Go => (conf.limits.max_batch, false),
            Admit::Probe => {
                shared.metrics.breaker_state(
                    lane.lane.kind,
                    &lane.lane.resource_id,
                    lane.breaker.state().code(),
                );
                (1, true)
            }
            Admit::Wait(d) => {
                // Open: claim nothing, except records past max_record_age,
                // which are dead-lettered on time (looked for at most every
                // EXPIRY_CHECK_EVERY, or a quarter of max_record_age when
                // that is shorter: the look walks the lane's backlog).
                let now = tokio::time::Instant::now();
                if now >= next_expiry_check {
                    expire_waiting(&lane, &shared, &policy).await;
                    next_expiry_check = now
                        + EXPIRY_CHECK_EVERY
                            .min(policy.max_record_age / 4)
                            .max(Duration::from_millis(100));
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(d) => {}
                }
                continue;
            }
        };
        let slot = tokio::select! {
            _ = cancel.cancelled() => return,
            slot = lane.slots.clone().acquire_owned() => slot.expect("lane semaphore is never closed"),
        };
        let claimed = match shared
            .journal
            .claim(&lane.lane, now_ms(), limit, lease)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                if probe {
                    lane.breaker.on_abandon(tokio::time::Instant::now());
                }
                let text = e.to_string();
                if let Some(suppressed) = shared.errors.allow(&text) {
                    tracing::error!(destination = %lane.lane.resource_id, error = %text, suppressed, "cannot claim records from the journal; retrying in 1s");
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(IDLE_POLL) => continue,
                }
            }
        };
        shared
            .metrics
            .claimed(lane.lane.kind, &lane.lane.resource_id, claimed.len() as u64);
        if claimed.is_empty() {
            drop(slot);
            if probe {
                lane.breaker.on_abandon(tokio::time::Instant::now());
            }
            let wait = match shared.journal.next_due(&lane.lane).await {
                Ok(Some(at)) => Duration::from_millis(
                    (at - now_ms()).clamp(1, IDLE_POLL.as_millis() as i64) as u64,
                ),
                Ok(None) | Err(_) => IDLE_POLL,
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = lane.wake.notified() => {
                    // Let the records of the next few milliseconds join
                    // this batch: at a steady trickle, one claim, one send
                    // and one outcome commit then serve several records.
                    if !policy.linger.is_zero() {
                        tokio::time::sleep(policy.linger).await;
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        // A lane's first batch in flight is its own; more need a share of
        // `delivery.workers`, so slow lanes cannot take every slot. Waiting
        // for a share ends as soon as this lane's other batches are done:
        // then this batch goes as the lane's own, whatever others hold.
        let global = loop {
            if lane.slots.available_permits() + 1 >= conf.limits.concurrency.max(1) {
                break None;
            }
            tokio::select! {
                // Not sent: the leases end with the process (or the
                // journal), and the records are due again.
                _ = cancel.cancelled() => return,
                g = shared.global.clone().acquire_owned() => break Some(g.expect("global semaphore is never closed")),
                _ = lane.batch_done.notified() => {}
            }
        };
        if probe {
            tracing::info!(destination = %lane.lane.resource_id, "circuit breaker half-open: sending a probe");
        }
        tracker.spawn(send_batch(
            lane.clone(),
            shared.clone(),
            Round {
                destination: conf.destination,
                encoding: conf.encoding,
                policy,
            },
            claimed,
            probe,
            (slot, global),
        ));
    }
}

/// Dead-letters a waiting lane's records that are past `max_record_age`.
async fn expire_waiting(lane: &Arc<LaneState>, shared: &Arc<Shared>, policy: &DeliveryConfig) {
    let max_age = policy.max_record_age;
    let before = now_ms() - max_age.as_millis() as i64;
    match shared
        .journal
        .claim_expired(&lane.lane, before, 512, policy.lease)
        .await
    {
        Ok(expired) if !expired.is_empty() => {
            let outcomes = expired
                .into_iter()
                .map(|r| {
                    let e = expired_error(max_age, r.attempts);
                    let n = note("dead", Some(&e), Duration::ZERO);
                    let o = dead(&r, r.attempts, e);
                    (r, o, n)
                })
                .collect();
            let _ = shared
                .done
                .send(Done {
                    lane: lane.clone(),
                    outcomes,
                })
                .await;
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot look for expired records"),
    }
}

fn expired_error(max_age: Duration, attempts: u32) -> DeliveryError {
    DeliveryError::permanent(
        ErrorLabel::RecordExpired,
        format!(
            "record is older than delivery.max_record_age ({}) after {attempts} attempts",
            humantime::format_duration(max_age)
        ),
    )
}

fn dead(record: &Claimed, attempts: u32, e: DeliveryError) -> Outcome {
    Outcome::Dead {
        id: record.id.clone(),
        token: record.token,
        attempts,
        error: e.full_message(),
        label: e.label,
    }
}

/// The configuration a batch was claimed under, which it finishes on.
struct Round {
    destination: Option<Arc<dyn Destination>>,
    encoding: crate::destination::cloudevents::Encoding,
    policy: Arc<DeliveryConfig>,
}

/// Sends one claimed batch and hands its outcomes to the completer.
async fn send_batch(
    lane: Arc<LaneState>,
    shared: Arc<Shared>,
    round: Round,
    batch: Vec<Claimed>,
    probe: bool,
    permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
) {
    let policy = &*round.policy;
    let now = now_ms();
    let mut outcomes: Vec<Settled> = Vec::with_capacity(batch.len());
    let mut to_send: Vec<Claimed> = Vec::with_capacity(batch.len());
    for record in batch {
        let age_limit = record.age_from_ms + policy.max_record_age.as_millis() as i64;
        if now > age_limit {
            let e = expired_error(policy.max_record_age, record.attempts);
            let n = note("dead", Some(&e), Duration::ZERO);
            let o = dead(&record, record.attempts, e);
            outcomes.push((record, o, n));
        } else {
            to_send.push(record);
        }
    }
    let key = &lane.lane;
    if probe && (to_send.is_empty() || round.destination.is_none()) {
        // The probe's record was not sent (it expired, or its resource is
        // gone): no verdict, so let the next claim probe again rather than
        // stay half-open for ever.
        lane.breaker.on_abandon(tokio::time::Instant::now());
    }
    if let Some(destination) = &round.destination {
        if !to_send.is_empty() {
            sent(
                &lane,
                &shared,
                &round,
                destination,
                to_send,
                probe,
                &mut outcomes,
            )
            .await;
        }
    } else {
        for record in to_send {
            let e = DeliveryError::permanent(
                ErrorLabel::NotFound,
                format!(
                    "{} `{}` is no longer defined in the configuration",
                    key.kind.id_field(),
                    key.resource_id
                ),
            );
            let n = note("dead", Some(&e), Duration::ZERO);
            let o = dead(&record, record.attempts, e);
            outcomes.push((record, o, n));
        }
    }
    // The slots are free as soon as the send is over; the outcomes are
    // written by the completer.
    drop(permits);
    lane.batch_done.notify_one();
    for (record, _, _) in &mut outcomes {
        record.body = String::new();
    }
    let _ = shared
        .done
        .send(Done {
            lane: lane.clone(),
            outcomes,
        })
        .await;
}

/// One attempt for each record of `batch`; pushes one outcome per record.
async fn sent(
    lane: &LaneState,
    shared: &Shared,
    round: &Round,
    destination: &Arc<dyn Destination>,
    batch: Vec<Claimed>,
    probe: bool,
    outcomes: &mut Vec<Settled>,
) {
    let (policy, encoding) = (&*round.policy, round.encoding);
    let key = &lane.lane;
    let mut batch = batch;
    let outgoing: Vec<OutgoingRecord> = batch
        .iter_mut()
        .map(|r| {
            // The body is not needed after the send: move it.
            let (body, content_type, cloudevent) = crate::destination::cloudevents::encode(
                encoding,
                &r.id,
                &r.function_id,
                &r.fn_call_id,
                r.destination_type,
                Bytes::from(std::mem::take(&mut r.body)),
            );
            OutgoingRecord {
                id: r.id.clone(),
                fn_call_id: r.fn_call_id.clone(),
                function_id: r.function_id.clone(),
                destination_type: r.destination_type,
                kind: r.target.kind,
                resource_id: r.target.resource_id.clone(),
                channel_id: r.target.channel_id.clone(),
                body,
                attempt: r.attempts + 1,
                content_type,
                cloudevent,
            }
        })
        .collect();
    let started = tokio::time::Instant::now();
    let results =
        match tokio::time::timeout(policy.attempt_timeout, destination.send_batch(&outgoing)).await
        {
            Ok(r) if r.len() == outgoing.len() => r,
            Ok(r) => {
                // A backend bug; never guess which records made it.
                let e = DeliveryError::retry(
                    ErrorLabel::Other,
                    format!(
                        "backend answered {} results for {} records",
                        r.len(),
                        outgoing.len()
                    ),
                );
                outgoing.iter().map(|_| Err(e.replicate())).collect()
            }
            Err(_) => {
                let e = DeliveryError::retry(
                    ErrorLabel::Timeout,
                    format!(
                        "no confirmation within delivery.attempt_timeout ({})",
                        humantime::format_duration(policy.attempt_timeout)
                    ),
                );
                outgoing.iter().map(|_| Err(e.replicate())).collect()
            }
        };
    // A request that carried several records and was refused as a whole
    // (an OCI 400 or LimitExceeded caused by one entry) says nothing about
    // each record: send those one by one before anything is dead-lettered.
    let mut results = results;
    if outgoing.len() > 1 {
        let alone: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                r.as_ref()
                    .err()
                    .is_some_and(|e| e.batch_wide && e.scope() == Scope::Record)
            })
            .map(|(i, _)| i)
            .collect();
        if !alone.is_empty() {
            let outgoing = &outgoing;
            let resent = futures_util::future::join_all(alone.iter().map(|&i| async move {
                let one = std::slice::from_ref(&outgoing[i]);
                match tokio::time::timeout(policy.attempt_timeout, destination.send_batch(one))
                    .await
                {
                    Ok(mut r) if r.len() == 1 => r.remove(0),
                    Ok(_) | Err(_) => Err(DeliveryError::retry(
                        ErrorLabel::Timeout,
                        "no confirmation for the record sent alone",
                    )),
                }
            }))
            .await;
            for (i, r) in alone.into_iter().zip(resent) {
                results[i] = r;
            }
        }
    }
    drop(outgoing);
    let took = started.elapsed();

    let before = lane.breaker.state();
    let mut any_ok = false;
    let mut send_failed = false;
    let mut unavailable: Option<Option<Duration>> = None;
    // The last failure, for the log line when the breaker opens.
    let mut last_error: Option<(ErrorLabel, String)> = None;
    let now = now_ms();
    for (record, result) in batch.into_iter().zip(results) {
        let attempt = record.attempts + 1;
        let noted;
        let outcome = match result {
            Ok(()) => {
                any_ok = true;
                // A delivery at the first attempt needs no note (the
                // lookup reads it from the row): nothing extra to write on
                // the hot path.
                noted = if record.attempts == 0 {
                    None
                } else {
                    note("success", None, took)
                };
                shared
                    .metrics
                    .attempt(key.kind, &key.resource_id, "success", None);
                Outcome::Delivered {
                    id: record.id.clone(),
                    token: record.token,
                    attempts: attempt,
                }
            }
            Err(e) => {
                last_error = Some((e.label, e.full_message()));
                let n = |outcome: &str| note(outcome, Some(&e), took);
                match e.scope() {
                    Scope::Destination { after } => {
                        // Not the record's failure: no attempt used; the lane
                        // waits for the breaker.
                        unavailable = Some(unavailable.flatten().or(after));
                        shared.metrics.attempt(
                            key.kind,
                            &key.resource_id,
                            "unavailable",
                            Some(e.label),
                        );
                        tracing::debug!(record_id = %record.id, error = %e.full_message(), "destination unavailable; the record waits");
                        noted = n("unavailable");
                        Outcome::Release {
                            id: record.id.clone(),
                            token: record.token,
                            next_attempt_at_ms: now,
                        }
                    }
                    Scope::Send { after } => {
                        send_failed = true;
                        // The attempt that uses the last one dead-letters the
                        // record: `dead`, not `retry`.
                        let last = attempt >= policy.max_attempts;
                        shared.metrics.attempt(
                            key.kind,
                            &key.resource_id,
                            if last { "dead" } else { "retry" },
                            Some(e.label),
                        );
                        noted = n(if last { "dead" } else { "retry" });
                        if last {
                            dead(&record, attempt, e)
                        } else {
                            retry(&record, attempt, after, e, policy)
                        }
                    }
                    Scope::Record => {
                        shared
                            .metrics
                            .attempt(key.kind, &key.resource_id, "dead", Some(e.label));
                        noted = n("dead");
                        dead(&record, attempt, e)
                    }
                }
            }
        };
        outcomes.push((record, outcome, noted));
    }
    let t = tokio::time::Instant::now();
    if let Some(after) = unavailable {
        lane.breaker.on_failure(t);
        if let Some(pause) = after {
            lane.breaker.hold(t, pause.min(policy.max_backoff));
        }
    } else if send_failed && !any_ok {
        lane.breaker.on_failure(t);
    } else {
        // Delivered, or answered (even refusing a record): it is up.
        lane.breaker.on_success();
    }
    let after = lane.breaker.state();
    if before != after || probe {
        shared
            .metrics
            .breaker_state(key.kind, &key.resource_id, after.code());
        match (before, after) {
            (_, breaker::State::Open) if before != after => {
                let (label, error) = last_error.unwrap_or((ErrorLabel::Other, String::new()));
                tracing::warn!(
                    destination = %key.resource_id,
                    error_message = label.as_str(),
                    error = %error,
                    "circuit breaker opened: destination keeps failing; records wait in the journal"
                )
            }
            (_, breaker::State::Closed) if before != after => {
                tracing::info!(destination = %key.resource_id, "circuit breaker closed: destination is back")
            }
            _ => {}
        }
    }
}

fn retry(
    record: &Claimed,
    attempts: u32,
    hint: Option<Duration>,
    e: DeliveryError,
    policy: &DeliveryConfig,
) -> Outcome {
    let delay = backoff::delay(
        attempts,
        policy.initial_backoff,
        policy.max_backoff,
        hint,
        fastrand::f64(),
    );
    let age_limit = record.age_from_ms + policy.max_record_age.as_millis() as i64;
    // Come back no later than the expiry, so an expired record is
    // dead-lettered on time instead of after a long backoff.
    let next = (now_ms() + delay.as_millis() as i64).min(age_limit + 1);
    tracing::debug!(record_id = %record.id, attempt = attempts, error = %e.full_message(), retry_in_ms = next - now_ms(), "delivery attempt failed; will retry");
    Outcome::Retry {
        id: record.id.clone(),
        token: record.token,
        attempts,
        next_attempt_at_ms: next,
        error: e.full_message(),
    }
}

/// Writes outcomes in batches; counts and logs each final outcome once the
/// journal has it, and only for records whose row it changed.
async fn completer(mut rx: mpsc::Receiver<Done>, journal: Arc<dyn Journal>, metrics: Arc<Metrics>) {
    let mut group: Vec<Done> = Vec::new();
    let errors = RateLimited::new(Duration::from_secs(10));
    while let Some(first) = rx.recv().await {
        let mut n = first.outcomes.len();
        group.push(first);
        while n < MAX_OUTCOMES_PER_COMMIT {
            match rx.try_recv() {
                Ok(more) => {
                    n += more.outcomes.len();
                    group.push(more);
                }
                Err(_) => break,
            }
        }
        let (outcomes, notes): (Vec<Outcome>, Vec<Option<String>>) = group
            .iter_mut()
            .flat_map(|d| d.outcomes.iter_mut().map(|(_, o, n)| (o.clone(), n.take())))
            .unzip();
        let applied = match journal.complete_noted(outcomes, notes).await {
            Ok(applied) => applied,
            Err(e) => {
                // Their leases stay until they run out (`delivery.lease`);
                // then the records are sent again (same id), never lost.
                // Pausing here fills the outcome channel, which holds the
                // lanes' slots: no storm of resends while the journal fails.
                let text = e.to_string();
                if let Some(suppressed) = errors.allow(&text) {
                    tracing::error!(records = n, error = %text, suppressed, "cannot record delivery outcomes in the journal; the records will be sent again when their lease ends");
                }
                group.clear();
                tokio::time::sleep(COMPLETE_RETRY_PAUSE).await;
                continue;
            }
        };
        let mut applied = applied.into_iter();
        for done in group.drain(..) {
            let mut wake = false;
            for (record, outcome, _) in &done.outcomes {
                if !applied.next().unwrap_or(false) {
                    // The lease ended and another claim owns the record now
                    // (this process was paused, or the journal was slow):
                    // the other owner's outcome counts, not this one.
                    metrics.fenced(record.target.kind, &record.target.resource_id);
                    continue;
                }
                wake |= report(&metrics, record, outcome);
            }
            if wake {
                done.lane.wake.notify_one();
            }
        }
    }
    // Every lane and batch has stopped.
}

/// Counts and logs one written outcome; true when the record is due again.
fn report(metrics: &Metrics, record: &Claimed, outcome: &Outcome) -> bool {
    let target = &record.target;
    match outcome {
        Outcome::Delivered { attempts, .. } => {
            metrics.delivery(
                record.destination_type,
                target.kind,
                &target.resource_id,
                None,
            );
            let seconds = (now_ms() - record.accepted_at_ms).max(0) as f64 / 1000.0;
            metrics.latency(target.kind, &target.resource_id, seconds);
            tracing::info!(
                record_id = %record.id,
                fn_call_id = %clip(&record.fn_call_id),
                destination = %format!("{}:{}", target.kind.as_str(), target.resource_id),
                destination_type = record.destination_type.lower(),
                attempts,
                "invocation record delivered"
            );
            false
        }
        Outcome::Dead {
            attempts,
            error,
            label,
            ..
        } => {
            metrics.delivery(
                record.destination_type,
                target.kind,
                &target.resource_id,
                Some(*label),
            );
            tracing::warn!(
                record_id = %record.id,
                fn_call_id = %clip(&record.fn_call_id),
                destination = %format!("{}:{}", target.kind.as_str(), target.resource_id),
                attempts,
                error_message = label.as_str(),
                "Invocation record delivery to {} destination failed due to - {}: {}",
                record.destination_type.lower(),
                label,
                error
            );
            false
        }
        Outcome::Retry { .. } | Outcome::Release { .. } => true,
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
        if let Err(e) = journal.resync().await {
            tracing::warn!(error = %e, "cannot recount the journal gauges");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
        }
    }
}
