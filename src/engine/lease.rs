//! The lease of an execution: who owns the claim ([`Owner`]), when the
//! store last confirmed it ([`Lease`]), and the one rule for losing it.
//!
//! **The rule**: the lease is lost when the store says so (a renewal
//! answered [`LeaseStatus::Lost`]), or when renewals have failed for a whole
//! lease since the store last confirmed it (the store may have let the
//! claim expire, and another process may own the key). Renewals run every
//! third of a lease, while the operation runs ([`Running`](super::running))
//! and while a [`Completion::Later`](super::Completion::Later) waits for
//! its decision.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::key::StoreKey;
use crate::observe::{self, Event};
use crate::store::{LeaseStatus, OwnerToken, Store};
use crate::time::deadline;

/// The lease as it stands: when the store last confirmed it (the claim's
/// reply, then the sending of each renewal it accepted), and whether it is
/// known lost.
#[derive(Debug, Clone, Copy)]
pub(super) struct Lease {
    pub(super) confirmed: Instant,
    pub(super) lost: bool,
}

impl Lease {
    /// A lease the store confirmed at `confirmed`.
    pub(super) fn new(confirmed: Instant) -> Self {
        Self {
            confirmed,
            lost: false,
        }
    }

    /// When a lease of `length` ends unless renewed.
    pub(super) fn expiry(&self, length: Duration) -> Instant {
        deadline(self.confirmed, length)
    }

    /// The rule, after a renewal sent at `sent` got `answer` (`None`: the
    /// store failed), judged at `now`. Returns whether this answer lost the
    /// lease.
    pub(super) fn renewed(
        &mut self,
        sent: Instant,
        answer: Option<LeaseStatus>,
        now: Instant,
        length: Duration,
    ) -> bool {
        let lost = match answer {
            Some(LeaseStatus::Held) => {
                self.confirmed = sent;
                false
            }
            Some(LeaseStatus::Lost) => true,
            None => now >= self.expiry(length),
        };
        if lost && !self.lost {
            self.lost = true;
            return true;
        }
        false
    }
}

/// The owner of a claim: what renewing, storing or releasing it needs.
pub(super) struct Owner<St> {
    pub(super) store: St,
    pub(super) key: StoreKey,
    pub(super) token: OwnerToken,
    /// The lease's length.
    pub(super) lease: Duration,
    /// Shared with the execution's context, which reports it.
    pub(super) lost: Arc<AtomicBool>,
}

impl<St: Store> Owner<St> {
    /// Marks the lease lost, for the execution's context, and reports it.
    pub(super) fn lose_lease(&self) {
        mark_lost(&self.lost, &self.key);
    }

    /// When `lease` ends unless renewed.
    pub(super) fn expiry(&self, lease: &Lease) -> Instant {
        lease.expiry(self.lease)
    }

    /// Renews the lease once; when the store holds it, `lease` is
    /// confirmed as of the sending. Returns the store's answer (`None`: it
    /// failed, reported here). The rule is not applied: after a completion
    /// whose reply never came back, "lost" may mean completed.
    pub(super) async fn extend(&self, lease: &mut Lease) -> Option<LeaseStatus> {
        let sent = Instant::now();
        let extend = self.store.extend(self.key, self.token, self.lease);
        match observe::store_call("extend", extend).await {
            Ok(status) => {
                if status == LeaseStatus::Held {
                    lease.confirmed = sent;
                }
                Some(status)
            }
            Err(e) => {
                observe::event(Event::StoreError, &self.key, Some(&e));
                None
            }
        }
    }

    /// Renews the lease once and applies the rule to `lease`; returns
    /// whether this renewal lost it (then reported).
    pub(super) async fn renew(&self, lease: &mut Lease) -> bool {
        let sent = Instant::now();
        let answer = self.extend(lease).await;
        let lost = lease.renewed(sent, answer, Instant::now(), self.lease);
        if lost {
            self.lose_lease();
        }
        lost
    }
}

/// Marks the lease of the execution on `key` lost, in the flag its context
/// reads, and reports it.
pub(super) fn mark_lost(lost: &AtomicBool, key: &StoreKey) {
    lost.store(true, Ordering::Release);
    observe::event(Event::LeaseLost, key, None);
}

/// Releases the key, best effort: a claim that is not released expires
/// with its lease.
pub(super) async fn release<St: Store>(store: &St, key: StoreKey, token: OwnerToken) {
    if let Err(e) = observe::store_call("release", store.release(key, token)).await {
        observe::event(Event::StoreError, &key, Some(&e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LENGTH: Duration = Duration::from_secs(30);

    #[test]
    fn the_store_decides_or_a_whole_lease_without_confirmation_does() {
        let start = Instant::now();
        let mut lease = Lease::new(start);
        let later = start + Duration::from_secs(10);
        assert!(!lease.renewed(later, Some(LeaseStatus::Held), later, LENGTH));
        assert_eq!(lease.confirmed, later);
        // Failures within a lease of the last confirmation keep it.
        let almost = later + LENGTH - Duration::from_millis(1);
        assert!(!lease.renewed(almost, None, almost, LENGTH));
        assert!(!lease.lost);
        // A whole lease without one loses it, once.
        let past = later + LENGTH;
        assert!(lease.renewed(past, None, past, LENGTH));
        assert!(lease.lost);
        assert!(!lease.renewed(past, Some(LeaseStatus::Lost), past, LENGTH));

        let mut taken = Lease::new(start);
        assert!(taken.renewed(start, Some(LeaseStatus::Lost), start, LENGTH));
    }
}
