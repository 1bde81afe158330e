//! What the server-backed stores share: a backend (Redis, PostgreSQL) is a
//! page of commands, and this kit does the rest.
//!
//! - [`Nonces`]: one per claim, so that an orphan (a claim whose reply
//!   never came back) can be released by it ([`abandon`]).
//! - [`millis`]: durations as the servers take them.
//! - [`call`]: every call bounded, its failure judged: provably not
//!   applied, or unknown.
//! - [`abandon`]: the one bounded queue that releases claims whose reply
//!   never came back ("orphans").
//! - [`notify`] and [`wakers`]: waiters woken by the server's
//!   notifications, with a fallback check when none comes; [`wait`]: the
//!   one wait loop.

pub(crate) mod abandon;
pub(crate) mod call;
pub(crate) mod notify;
pub(crate) mod wait;
pub(crate) mod wakers;

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use self::abandon::{Abandoner, Orphan};
use self::call::Failure;
use crate::store::StoreError;

/// What every remote store keeps beside its connection.
pub(crate) struct Kit {
    /// The bound on each operation.
    pub(crate) op_timeout: Duration,
    /// How often a waiter re-checks its key when no notification came.
    pub(crate) fallback_check: Duration,
    /// How long the entry of a claim that never completed outlives its
    /// lease.
    pub(crate) fence_memory: Duration,
    pub(crate) nonces: Nonces,
    pub(crate) abandoner: Abandoner,
}

impl Kit {
    pub(crate) fn new(
        op_timeout: Duration,
        fallback_check: Duration,
        fence_memory: Duration,
    ) -> Self {
        Self {
            op_timeout,
            fallback_check,
            fence_memory,
            nonces: Nonces::new(),
            abandoner: Abandoner::new(),
        }
    }

    /// The deadline of an operation starting now.
    pub(crate) fn deadline(&self) -> tokio::time::Instant {
        crate::time::deadline(tokio::time::Instant::now(), self.op_timeout)
    }
}

/// A remote store's shared state, as the kit needs it: a backend supplies
/// its kit and its one order-independent release command.
pub(crate) trait Remote: Send + Sync + Sized + 'static {
    fn kit(&self) -> &Kit;

    /// One attempt: releases the claim made with `orphan.nonce` on
    /// `orphan.name` if it is in flight, or else leaves the nonce behind (for
    /// `orphan.keep(fence_memory)`) so that a late copy of that claim
    /// refuses. It never touches another owner's claim or record, and it
    /// may reach the server before the claim it releases.
    fn abandon_once(
        self: Arc<Self>,
        orphan: &Orphan,
    ) -> impl Future<Output = Result<(), Failure>> + Send;
}

/// Queues the release of `orphan` on `remote`'s queue.
pub(crate) fn abandon<R: Remote>(remote: &Arc<R>, orphan: Orphan) {
    remote.kit().abandoner.push(orphan, Arc::downgrade(remote));
}

/// A claim sent whose reply is not in yet: it may be applied with nobody to
/// own it. Dropped armed (the reply never came back, or the caller's future
/// was dropped: the client went away), it queues the claim's release by
/// nonce: it is an orphan.
pub(crate) struct Unsettled<'a, R: Remote> {
    remote: &'a Arc<R>,
    orphan: Option<Orphan>,
}

impl<'a, R: Remote> Unsettled<'a, R> {
    pub(crate) fn new(remote: &'a Arc<R>, orphan: Orphan) -> Self {
        Self {
            remote,
            orphan: Some(orphan),
        }
    }

    /// The reply is in, whatever it says: nothing to release.
    pub(crate) fn settled(mut self) {
        self.orphan = None;
    }

    /// The call failed: when it provably did not apply there is nothing to
    /// release; either way the caller gets the error.
    pub(crate) fn failed(&mut self, failure: Failure) -> StoreError {
        if failure.unapplied {
            self.orphan = None;
        }
        failure.error
    }
}

impl<R: Remote> Drop for Unsettled<'_, R> {
    fn drop(&mut self) {
        if let Some(orphan) = self.orphan.take() {
            abandon(self.remote, orphan);
        }
    }
}

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
