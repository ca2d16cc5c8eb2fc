//! Every metric in one place (SPEC section 7). Labels are bounded: kinds,
//! outcomes, the error vocabulary, and configured resource ids (bounded by
//! the config). Never a record id, a URL or raw error text.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::ErrorLabel;
use crate::journal::Stats;
use crate::record::{DestKind, DestinationType};

/// Labels of `function_detached_deliveries_total`, exactly as SPEC section 7 names them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    /// `Success` or `Error`.
    pub response_type: &'static str,
    /// Empty on success, else the error vocabulary.
    pub error_message: &'static str,
    /// `Success` or `Failure`.
    pub destination_type: &'static str,
    /// `QUEUE`, `STREAM` or `NOTIFICATION`.
    pub destination_kind: &'static str,
    /// Resource id.
    pub destination_id: String,
}

/// Labels of delivery attempts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// `success`, `retry` (will be retried), `unavailable` (the
    /// destination failed; no attempt used) or `dead` (this attempt
    /// dead-lettered the record: the record's fault, or the last attempt).
    pub outcome: &'static str,
    /// Empty on success, else the error vocabulary.
    pub error_message: &'static str,
    /// Destination kind.
    pub destination_kind: &'static str,
    /// Resource id.
    pub destination_id: String,
}

/// Labels naming one destination resource.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    /// Destination kind.
    pub destination_kind: &'static str,
    /// Resource id.
    pub destination_id: String,
}

/// Labels of skipped records.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkippedLabels {
    /// `Success` or `Failure`.
    pub destination_type: &'static str,
}

/// The daemon's metrics.
pub struct Metrics {
    registry: Registry,
    deliveries: Family<DeliveryLabels, Counter>,
    attempts: Family<AttemptLabels, Counter>,
    accepted: Counter,
    duplicates: Counter,
    skipped: Family<SkippedLabels, Counter>,
    latency: Family<DestinationLabels, Histogram>,
    breaker: Family<DestinationLabels, Gauge>,
    claimed: Family<DestinationLabels, Counter>,
    fenced: Family<DestinationLabels, Counter>,
    replayed: Counter,
    pending: Gauge,
    oldest_age: Gauge<f64, AtomicU64>,
    dead: Gauge,
    journal_bytes: Gauge,
    connections: Gauge,
    requests: Gauge,
    body_bytes: Gauge,
    refused: Family<RefusedLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    config_info: Family<ConfigLabels, Gauge>,
    config_hash: std::sync::Mutex<Option<String>>,
    ready: Gauge,
    watchdog: Family<WatchdogLabels, Counter>,
}

/// Labels of the watchdog's results.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchdogLabels {
    /// `fired` (a failure record made), `completed` (the completion came
    /// first) or `refused` (the policy forbids its destination).
    pub result: &'static str,
}

/// Labels of configuration reloads.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `applied` or `refused`.
    pub result: &'static str,
}

/// Labels of the loaded configuration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    /// First 16 hex digits of the configuration's SHA-256.
    pub hash: String,
}

/// Labels of refused HTTP requests and connections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// The limit that refused it: `max_connections`,
    /// `max_requests_in_flight`, `max_body_bytes_in_flight`,
    /// `body_read_timeout` or `shutting_down`.
    pub reason: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        // The encoder appends `_total`.
        registry.register(
            "function_detached_deliveries",
            "Invocation records by final outcome: delivered (Success) or dead-lettered (Error)",
            deliveries.clone(),
        );
        let attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "fnrelay_delivery_attempts",
            "Delivery attempts by outcome",
            attempts.clone(),
        );
        let accepted = Counter::default();
        registry.register(
            "fnrelay_events_accepted",
            "Completion events newly journaled (re-posts of a known fnCallId excluded)",
            accepted.clone(),
        );
        let duplicates = Counter::default();
        registry.register(
            "fnrelay_events_duplicate",
            "Completion events re-posted with a fnCallId already journaled",
            duplicates.clone(),
        );
        let skipped = Family::<SkippedLabels, Counter>::default();
        registry.register(
            "fnrelay_records_skipped",
            "Records not sent because their destination is NONE or missing",
            skipped.clone(),
        );
        let latency = Family::<DestinationLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 20))
        });
        registry.register(
            "fnrelay_delivery_latency_seconds",
            "Time from accept to confirmed delivery",
            latency.clone(),
        );
        let claimed = Family::<DestinationLabels, Counter>::default();
        registry.register(
            "fnrelay_records_claimed",
            "Records claimed from the journal by a destination's lane (a claim is a lease; compare with attempts to see claims that were not sent)",
            claimed.clone(),
        );
        let fenced = Family::<DestinationLabels, Counter>::default();
        registry.register(
            "fnrelay_outcomes_fenced",
            "Outcomes not written because the record's lease had ended and another claim held it (a paused or slow process); the record is counted by its new owner",
            fenced.clone(),
        );
        let replayed = Counter::default();
        registry.register(
            "fnrelay_dead_letters_replayed",
            "Dead letters put back to pending by a replay (each gets a new final outcome later: accepted + replayed = delivered + dead-lettered + skipped + pending)",
            replayed.clone(),
        );
        let breaker = Family::<DestinationLabels, Gauge>::default();
        registry.register(
            "fnrelay_circuit_breaker_state",
            "Circuit breaker per destination: 0 closed, 1 open, 2 half-open",
            breaker.clone(),
        );
        let pending = Gauge::default();
        registry.register(
            "fnrelay_pending_records",
            "Records waiting for delivery",
            pending.clone(),
        );
        let oldest_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "fnrelay_oldest_pending_age_seconds",
            "Age of the oldest record waiting for delivery",
            oldest_age.clone(),
        );
        let dead = Gauge::default();
        registry.register(
            "fnrelay_dead_letters",
            "Dead-lettered records in the journal",
            dead.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "fnrelay_http_connections_open",
            "Client connections open (server.max_connections caps it)",
            connections.clone(),
        );
        let requests = Gauge::default();
        registry.register(
            "fnrelay_http_requests_in_flight",
            "Requests being handled (server.max_requests_in_flight caps it)",
            requests.clone(),
        );
        let body_bytes = Gauge::default();
        registry.register(
            "fnrelay_http_body_bytes_in_flight",
            "Request-body bytes held (server.max_body_bytes_in_flight caps it)",
            body_bytes.clone(),
        );
        let refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "fnrelay_http_refused",
            "Connections and requests refused by a server limit (503, or 408 for body_read_timeout)",
            refused.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "fnrelay_config_reloads",
            "Configuration reloads (SIGHUP or POST /v1/admin/reload) by result: applied or refused",
            reloads.clone(),
        );
        let config_info = Family::<ConfigLabels, Gauge>::default();
        registry.register(
            "fnrelay_config_info",
            "1 for the configuration in use, labelled with its hash (fnrelay check-config prints the same hash)",
            config_info.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "fnrelay_ready",
            "1 when GET /readyz answers 200 (journal writable, not shutting down), else 0",
            ready.clone(),
        );
        let watchdog = Family::<WatchdogLabels, Counter>::default();
        registry.register(
            "fnrelay_watchdog",
            "Deadlines of started invocations that passed, by result: fired (failure record made), completed (its completion came first), refused (policy)",
            watchdog.clone(),
        );
        let journal_bytes = Gauge::default();
        registry.register(
            "fnrelay_journal_size_bytes",
            "Journal size on disk",
            journal_bytes.clone(),
        );
        // Bounded label sets start at 0, so increase() sees their first
        // increment.
        for destination_type in ["Success", "Failure"] {
            let _ = skipped.get_or_create(&SkippedLabels { destination_type });
        }
        for result in ["applied", "refused"] {
            let _ = reloads.get_or_create(&ReloadLabels { result });
        }
        for result in ["fired", "completed", "refused"] {
            let _ = watchdog.get_or_create(&WatchdogLabels { result });
        }
        Self {
            registry,
            deliveries,
            attempts,
            accepted,
            duplicates,
            skipped,
            latency,
            breaker,
            claimed,
            fenced,
            replayed,
            pending,
            oldest_age,
            dead,
            journal_bytes,
            connections,
            requests,
            body_bytes,
            refused,
            reloads,
            config_info,
            config_hash: std::sync::Mutex::new(None),
            ready,
            watchdog,
        }
    }

    /// Counts a passed deadline by result.
    pub fn watchdog(&self, result: &'static str) {
        self.watchdog
            .get_or_create(&WatchdogLabels { result })
            .inc();
    }

    /// Counts a reload by result (`applied` or `refused`).
    pub fn reload(&self, result: &'static str) {
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    /// The configuration in use is now the one with `hash`.
    pub fn config_loaded(&self, hash: &str) {
        let mut current = self.config_hash.lock().expect("config hash lock");
        if let Some(old) = current.take() {
            self.config_info.remove(&ConfigLabels { hash: old });
        }
        self.config_info
            .get_or_create(&ConfigLabels {
                hash: hash.to_string(),
            })
            .set(1);
        *current = Some(hash.to_string());
    }

    /// Readiness as `/readyz` answered it last.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Counts one record's final outcome.
    pub fn delivery(
        &self,
        dt: DestinationType,
        kind: DestKind,
        id: &str,
        error: Option<ErrorLabel>,
    ) {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                response_type: if error.is_none() { "Success" } else { "Error" },
                error_message: error.map_or("", ErrorLabel::as_str),
                destination_type: dt.as_str(),
                destination_kind: kind.as_str(),
                destination_id: id.to_string(),
            })
            .inc();
    }

    /// Counts one attempt.
    pub fn attempt(
        &self,
        kind: DestKind,
        id: &str,
        outcome: &'static str,
        error: Option<ErrorLabel>,
    ) {
        self.attempts
            .get_or_create(&AttemptLabels {
                outcome,
                error_message: error.map_or("", ErrorLabel::as_str),
                destination_kind: kind.as_str(),
                destination_id: id.to_string(),
            })
            .inc();
    }

    /// Counts accepted events.
    pub fn accepted(&self, new: u64, duplicate: u64) {
        self.accepted.inc_by(new);
        self.duplicates.inc_by(duplicate);
    }

    /// Counts a skipped record.
    pub fn skipped(&self, dt: DestinationType) {
        self.skipped
            .get_or_create(&SkippedLabels {
                destination_type: dt.as_str(),
            })
            .inc();
    }

    /// Observes accept-to-delivery latency.
    pub fn latency(&self, kind: DestKind, id: &str, seconds: f64) {
        self.latency
            .get_or_create(&DestinationLabels {
                destination_kind: kind.as_str(),
                destination_id: id.to_string(),
            })
            .observe(seconds);
    }

    /// Counts records claimed by a lane.
    pub fn claimed(&self, kind: DestKind, id: &str, n: u64) {
        self.claimed
            .get_or_create(&DestinationLabels {
                destination_kind: kind.as_str(),
                destination_id: id.to_string(),
            })
            .inc_by(n);
    }

    /// Sets a breaker state gauge.
    pub fn breaker_state(&self, kind: DestKind, id: &str, state: i64) {
        self.breaker
            .get_or_create(&DestinationLabels {
                destination_kind: kind.as_str(),
                destination_id: id.to_string(),
            })
            .set(state);
    }

    /// Refreshes the journal gauges.
    pub fn journal(&self, stats: &Stats, now_ms: i64) {
        self.pending.set(stats.pending as i64);
        self.dead.set(stats.dead as i64);
        self.journal_bytes.set(stats.size_bytes as i64);
        let age = stats
            .oldest_pending_ms
            .map_or(0.0, |t| ((now_ms - t).max(0)) as f64 / 1000.0);
        self.oldest_age.set(age);
    }

    /// Dead letters replayed.
    pub fn replayed(&self, n: u64) {
        self.replayed.inc_by(n);
    }

    /// A lane for a configured resource: its breaker closed, and its
    /// counters exported at 0 so that `increase()` sees their first
    /// increment.
    pub fn lane_added(&self, kind: DestKind, id: &str) {
        let labels = DestinationLabels {
            destination_kind: kind.as_str(),
            destination_id: id.to_string(),
        };
        self.breaker.get_or_create(&labels).set(0);
        let _ = self.fenced.get_or_create(&labels);
        let _ = self.claimed.get_or_create(&labels);
    }

    /// Outcomes refused by the journal because their claim was stale.
    pub fn fenced(&self, kind: DestKind, id: &str) {
        self.fenced
            .get_or_create(&DestinationLabels {
                destination_kind: kind.as_str(),
                destination_id: id.to_string(),
            })
            .inc();
    }

    /// A connection opened (+1) or closed (-1).
    pub fn connection(&self, delta: i64) {
        self.connections.inc_by(delta);
    }

    /// Sets the request and body-byte gauges (read from the budgets at
    /// scrape time).
    pub fn http_in_flight(&self, requests: usize, body_bytes: usize) {
        self.requests.set(requests as i64);
        self.body_bytes.set(body_bytes as i64);
    }

    /// Counts one refusal by `reason`.
    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&RefusedLabels { reason }).inc();
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

/// Shared handle.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_counter_has_the_spec_name_and_labels() {
        let m = Metrics::new();
        m.delivery(
            DestinationType::Failure,
            DestKind::Queue,
            "failures",
            Some(ErrorLabel::Rejected),
        );
        m.delivery(DestinationType::Success, DestKind::Stream, "results", None);
        let text = m.encode();
        assert!(text.contains(
            r#"function_detached_deliveries_total{response_type="Error",error_message="rejected",destination_type="Failure",destination_kind="QUEUE",destination_id="failures"} 1"#
        ), "{text}");
        assert!(text.contains(
            r#"function_detached_deliveries_total{response_type="Success",error_message="",destination_type="Success",destination_kind="STREAM",destination_id="results"} 1"#
        ), "{text}");
    }
}
