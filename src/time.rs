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

#[cfg(test)]
mod tests {
    use super::*;

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
