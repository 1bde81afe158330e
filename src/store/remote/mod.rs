//! What the server-backed stores share: a backend (Redis, PostgreSQL) is a
//! page of commands, and this kit does the rest.
//!
//! - [`Nonces`]: one per claim, so that a claim whose reply was lost can be
//!   released by it ([`abandon`]).
//! - [`millis`]: durations as the servers take them.
//! - [`call`]: every call bounded, its failure judged: provably not
//!   applied, or unknown.
//! - [`abandon`]: the one bounded queue that releases claims whose reply
//!   never came back ("orphans").
//! - [`wakers`]: waiters woken by the server's notifications, with a
//!   fallback check when none comes.

pub(crate) mod abandon;
pub(crate) mod call;
pub(crate) mod wakers;

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The nonces of one store handle: distinct for every call, and
/// unpredictable across processes (each is a fresh random hash of a count
/// that starts at a random point).
#[derive(Debug)]
pub(crate) struct Nonces(AtomicU64);

impl Nonces {
    pub(crate) fn new() -> Self {
        Self(AtomicU64::new(RandomState::new().hash_one(0u8)))
    }

    pub(crate) fn next(&self) -> u64 {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        RandomState::new().hash_one(n) ^ n
    }
}

/// `d` in whole milliseconds, as both servers take leases and expiries:
/// never 0 (Redis's `PEXPIRE key 0` deletes the key, and a zero lease would
/// be no lease), never past a century (Redis refuses expiries that overflow
/// its clock; Lua's numbers and PostgreSQL's `float8` stay exact below
/// 2^53).
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.min(crate::time::FAR_FUTURE).as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_are_never_zero_nor_past_a_century() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(999)), 1);
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        let century = millis(crate::time::FAR_FUTURE);
        assert_eq!(millis(Duration::MAX), century);
        assert!(century < 1 << 53);
    }

    #[test]
    fn nonces_differ() {
        let nonces = Nonces::new();
        let (a, b) = (nonces.next(), nonces.next());
        assert_ne!(a, b);
        assert_ne!(Nonces::new().next(), Nonces::new().next());
    }
}
