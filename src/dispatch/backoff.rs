//! The retry delay: capped exponential backoff with full jitter, and the
//! destination's Retry-After honoured but clamped.

use std::time::Duration;

/// Delay before the next attempt, after `attempts` failed ones (>= 1).
/// `jitter` is a uniform sample in `[0, 1]`; `hint` is the destination's
/// Retry-After. Full jitter (AWS's "Exponential Backoff and Jitter") spreads
/// retries of many records that failed together.
pub fn delay(
    attempts: u32,
    initial: Duration,
    max: Duration,
    hint: Option<Duration>,
    jitter: f64,
) -> Duration {
    let exp = attempts.saturating_sub(1).min(32);
    let base = initial.saturating_mul(1u32 << exp.min(31)).min(max);
    let jittered = base.mul_f64(jitter.clamp(0.0, 1.0));
    match hint {
        // Never sooner than the destination asked, never later than our cap.
        Some(h) => jittered.max(h.min(max)),
        None => jittered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn table() {
        let (i, m) = (MS(250), Duration::from_secs(300));
        let cases = [
            // attempts, hint, jitter, expected
            (1, None, 1.0, MS(250)),
            (2, None, 1.0, MS(500)),
            (3, None, 0.5, MS(500)),
            (11, None, 1.0, Duration::from_secs(256)),
            (12, None, 1.0, m),
            (4_000_000_000, None, 1.0, m),
            (1, None, 0.0, MS(0)),
            (1, Some(Duration::from_secs(3)), 0.0, Duration::from_secs(3)),
            (1, Some(Duration::from_secs(3600)), 1.0, m),
            (12, Some(Duration::from_secs(1)), 1.0, m),
        ];
        for (attempts, hint, jitter, want) in cases {
            assert_eq!(
                delay(attempts, i, m, hint, jitter),
                want,
                "attempts={attempts} hint={hint:?}"
            );
        }
    }

    #[test]
    fn jitter_stays_within_the_cap() {
        for attempts in 1..40 {
            for _ in 0..50 {
                let d = delay(attempts, MS(100), MS(5_000), None, fastrand::f64());
                assert!(d <= MS(5_000));
            }
        }
    }
}
