//! Deadlines from configured durations, saturating instead of panicking.
//!
//! `Instant + Duration` panics when the sum does not fit, and every
//! `Duration` setting of the crate accepts `Duration::MAX`. Each deadline
//! is computed here: one past the representable range becomes a point about
//! a century away, which no process outlives.

use std::time::Duration;

use tokio::time::Instant;

/// How far away "never" is: about a hundred years.
pub(crate) const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// `from + after`, or [`FAR_FUTURE`] from `from` when `after` is longer or
/// the sum does not fit.
pub(crate) fn deadline(from: Instant, after: Duration) -> Instant {
    let after = after.min(FAR_FUTURE);
    from.checked_add(after).unwrap_or(from)
}

/// An exponential backoff: `first` before the first retry, `factor` times
/// more before each next one, never more than `cap`. The crate's one rule
/// for pauses between attempts: the completion retries, the release queue
/// and the retrying client (which adds jitter on top) use it. (Redis
/// reconnections are redis-rs's connection manager's own, configured by the
/// store.) Computed in floating point and saturating: no setting panics.
///
/// A helper of its own rather than a crate: each loop that pauses also
/// renews a lease, watches a deadline or keeps a queue's order, so a retry
/// combinator would not fit, and the ceiling is one line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    first: Duration,
    factor: f64,
    cap: Duration,
}

impl Backoff {
    pub(crate) const fn new(first: Duration, factor: f64, cap: Duration) -> Self {
        Self { first, factor, cap }
    }

    /// The pause before retry `retry` (1 for the first retry; 0 counts as
    /// 1).
    pub(crate) fn before(&self, retry: u32) -> Duration {
        let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let pause = self.first.as_secs_f64() * self.factor.powi(exponent);
        let pause = if pause.is_finite() {
            Duration::try_from_secs_f64(pause).unwrap_or(self.cap)
        } else {
            self.cap
        };
        pause.min(self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoffs_grow_by_their_factor_up_to_their_cap_and_saturate() {
        let backoff = Backoff::new(Duration::from_millis(50), 2.0, Duration::from_secs(1));
        let pauses: Vec<_> = (1..=7).map(|n| backoff.before(n).as_millis()).collect();
        assert_eq!(pauses, [50, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff.before(0), Duration::from_millis(50));
        assert_eq!(backoff.before(u32::MAX), Duration::from_secs(1));
        let huge = Backoff::new(Duration::MAX, f64::INFINITY, Duration::MAX);
        assert_eq!(huge.before(1_000), Duration::MAX);
        let shrinking = Backoff::new(Duration::from_secs(1), -3.0, Duration::ZERO);
        assert_eq!(shrinking.before(7), Duration::ZERO);
    }

    #[test]
    fn deadlines_saturate() {
        let now = Instant::now();
        assert_eq!(deadline(now, Duration::ZERO), now);
        assert_eq!(
            deadline(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert_eq!(deadline(now, Duration::MAX), now + FAR_FUTURE);
    }
}
