//! A circuit breaker per destination. It never drops a record: while open,
//! records are put back in the journal (no attempt counted) until the
//! cool-down ends; then one probe goes through, and its result closes or
//! reopens the breaker.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Breaker state as the metric reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Sending normally.
    Closed,
    /// Not sending until the cool-down ends.
    Open,
    /// One probe in flight.
    HalfOpen,
}

impl State {
    /// Gauge value: 0 closed, 1 open, 2 half-open.
    pub fn code(self) -> i64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }
}

/// What a worker may do with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Send it.
    Go,
    /// Send it as the half-open probe.
    Probe,
    /// Put it back for this long.
    Wait(Duration),
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

/// One destination's breaker.
#[derive(Debug)]
pub struct Breaker {
    threshold: AtomicU32,
    /// Nanoseconds.
    cool_down: AtomicU64,
    inner: Mutex<Inner>,
}

impl Breaker {
    /// Opens after `threshold` consecutive retryable failures, for `cool_down`.
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        Self {
            threshold: AtomicU32::new(threshold),
            cool_down: AtomicU64::new(cool_down.as_nanos() as u64),
            inner: Mutex::new(Inner::Closed { failures: 0 }),
        }
    }

    /// New settings (a configuration reload); the state is kept, and an
    /// open breaker keeps the end of its current cool-down.
    pub fn set(&self, threshold: u32, cool_down: Duration) {
        self.threshold.store(threshold, Ordering::Relaxed);
        self.cool_down
            .store(cool_down.as_nanos() as u64, Ordering::Relaxed);
    }

    fn threshold(&self) -> u32 {
        self.threshold.load(Ordering::Relaxed)
    }

    fn cool_down(&self) -> Duration {
        Duration::from_nanos(self.cool_down.load(Ordering::Relaxed))
    }

    /// Current state.
    pub fn state(&self) -> State {
        match *self.inner.lock().expect("breaker lock") {
            Inner::Closed { .. } => State::Closed,
            Inner::Open { .. } => State::Open,
            Inner::HalfOpen => State::HalfOpen,
        }
    }

    /// Asks to send a record now.
    pub fn admit(&self, now: Instant) -> Admit {
        let mut inner = self.inner.lock().expect("breaker lock");
        match *inner {
            Inner::Closed { .. } => Admit::Go,
            Inner::Open { until } if now >= until => {
                *inner = Inner::HalfOpen;
                Admit::Probe
            }
            Inner::Open { until } => Admit::Wait(until - now),
            // Others wait for the probe's verdict; a short wait keeps them
            // from queueing behind a probe that may take the whole timeout.
            Inner::HalfOpen => Admit::Wait(self.cool_down().min(Duration::from_secs(1))),
        }
    }

    /// The destination confirmed a record, or answered (even with a
    /// permanent error): it is reachable.
    pub fn on_success(&self) {
        *self.inner.lock().expect("breaker lock") = Inner::Closed { failures: 0 };
    }

    /// A retryable failure (connect, timeout, 5xx, throttled).
    pub fn on_failure(&self, now: Instant) {
        let mut inner = self.inner.lock().expect("breaker lock");
        *inner = match *inner {
            Inner::Closed { failures } if failures + 1 < self.threshold() => Inner::Closed {
                failures: failures + 1,
            },
            Inner::Closed { .. } | Inner::HalfOpen => Inner::Open {
                until: now + self.cool_down(),
            },
            Inner::Open { until } => Inner::Open { until },
        };
    }

    /// The destination asked for a pause (Retry-After on a throttle): stay
    /// open at least until `now + pause`.
    pub fn hold(&self, now: Instant, pause: Duration) {
        let mut inner = self.inner.lock().expect("breaker lock");
        let until = now + pause;
        *inner = match *inner {
            Inner::Open { until: u } if u >= until => Inner::Open { until: u },
            _ => Inner::Open { until },
        };
    }

    /// The probe was admitted but never sent (shutdown): let another probe go.
    pub fn on_abandon(&self, now: Instant) {
        let mut inner = self.inner.lock().expect("breaker lock");
        if matches!(*inner, Inner::HalfOpen) {
            *inner = Inner::Open { until: now };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_probes_and_closes() {
        let t0 = Instant::now();
        let b = Breaker::new(3, Duration::from_secs(10));
        for _ in 0..2 {
            b.on_failure(t0);
            assert_eq!(b.admit(t0), Admit::Go);
        }
        b.on_failure(t0);
        assert_eq!(b.state(), State::Open);
        assert_eq!(
            b.admit(t0 + Duration::from_secs(4)),
            Admit::Wait(Duration::from_secs(6))
        );
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.admit(later), Admit::Probe);
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(
            b.admit(later),
            Admit::Wait(Duration::from_secs(1)),
            "one probe at a time"
        );
        b.on_failure(later);
        assert_eq!(
            b.admit(later + Duration::from_secs(1)),
            Admit::Wait(Duration::from_secs(9))
        );
        assert_eq!(b.admit(later + Duration::from_secs(10)), Admit::Probe);
        b.on_success();
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.admit(later), Admit::Go);
    }

    #[test]
    fn success_resets_the_count_and_abandoned_probe_is_retried() {
        let t0 = Instant::now();
        let b = Breaker::new(2, Duration::from_secs(5));
        b.on_failure(t0);
        b.on_success();
        b.on_failure(t0);
        assert_eq!(b.state(), State::Closed);
        b.on_failure(t0);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.admit(t0 + Duration::from_secs(5)), Admit::Probe);
        b.on_abandon(t0 + Duration::from_secs(5));
        assert_eq!(b.admit(t0 + Duration::from_secs(5)), Admit::Probe);
    }
}
