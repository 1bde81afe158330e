//! Settling an execution: the [`Completion`] an operation asks for, and
//! storing or releasing its key accordingly.
//!
//! One vocabulary for the end of an execution: the operation (or, for
//! HTTP, the layer judging its response) returns a [`Completion`]; the
//! engine [`settle`]s the key by it, into a [`Settlement`]: the record is
//! stored ([`store_outcome`], retried while the lease can be kept) or the
//! key released ([`release`]). A [`Completion::Later`] is awaited first.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::Either;
use tokio::time::Instant;

use super::executions::ExecutionGuard;
use super::lease::{Lease, Owner, release};
use crate::fingerprint::Fingerprint;
use crate::observe::{self, Event};
use crate::store::{CompletedRecord, LeaseStatus, Store};
use crate::time::{Backoff, deadline};

/// What the operation asks the engine to do with its outcome.
#[derive(Debug)]
pub enum Completion {
    /// Store this payload; every later call with the key replays it.
    Store(Bytes),
    /// Store nothing and release the key: a later call executes again.
    Release,
    /// Decided after the caller got its value, through the [`Decider`]
    /// that [`Completion::later`] returned with it (for example once a
    /// response streamed to the caller has ended). The key stays claimed,
    /// its lease renewed, until then; a `Decider` dropped without deciding
    /// releases it. A graceful shutdown waits for the decision
    /// ([`Executions`](super::Executions)).
    Later(Later),
}

impl Completion {
    /// A completion to be decided later, and the handle that decides it.
    pub fn later() -> (Decider, Completion) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Decider(tx), Completion::Later(Later(rx)))
    }
}

/// Decides a [`Completion::Later`].
#[derive(Debug)]
pub struct Decider(tokio::sync::oneshot::Sender<Completion>);

impl Decider {
    /// Stores or releases the key, as `completion` says (a nested
    /// [`Completion::Later`] releases it).
    pub fn decide(self, completion: Completion) {
        // The execution may be gone (its runtime shut down): nothing to do.
        let _ = self.0.send(completion);
    }
}

/// A completion that a [`Decider`] will send. It has no API of its own and
/// cannot be named outside the crate: match `Completion::Later(_)`.
#[derive(Debug)]
pub struct Later(tokio::sync::oneshot::Receiver<Completion>);

/// Stores or releases an operation's outcome, then hands its value on.
///
/// The value waits in the closure of a `map`, not in the store call's
/// future, so it is held once.
pub(super) fn settle<St: Store, T, E>(
    owner: Owner<St>,
    lease: Lease,
    fingerprint: Fingerprint,
    retention: Duration,
    result: Result<(T, Completion), E>,
    counted: ExecutionGuard,
) -> impl Future<Output = Result<T, E>> {
    let (value, settlement) = match result {
        Ok((value, Completion::Later(later))) => {
            // The caller gets its value now; the settlement is awaited and
            // carried out in a task of its own, still counted as running.
            tokio::spawn(async move {
                let (completion, lease) = await_later(&owner, lease, later).await;
                let settlement = Settlement::of(completion, fingerprint);
                record(owner, lease, retention, settlement, counted).await;
            });
            return Either::Left(std::future::ready(Ok(value)));
        }
        Ok((value, completion)) => (Ok(value), Settlement::of(completion, fingerprint)),
        Err(e) => (Err(e), Settlement::Release(Event::Failed)),
    };
    Either::Right(record(owner, lease, retention, settlement, counted).map(move |()| value))
}

/// Waits for a [`Completion::Later`] to be decided, renewing the lease
/// meanwhile; returns the decision and the lease as it then stands. A lost
/// lease ends the wait: nothing of this execution can be stored any more.
async fn await_later<St: Store>(
    owner: &Owner<St>,
    mut lease: Lease,
    Later(mut decision): Later,
) -> (Completion, Lease) {
    let period = owner.lease / 3;
    let mut next_renewal = deadline(lease.confirmed, period);
    loop {
        tokio::select! {
            decided = &mut decision => {
                return (decided.unwrap_or(Completion::Release), lease);
            }
            () = tokio::time::sleep_until(next_renewal), if !lease.lost => {
                owner.renew(&mut lease).await;
                next_renewal = deadline(Instant::now(), period);
            }
        }
    }
}

/// What to do with the key once the operation ended.
pub(super) enum Settlement {
    Store(CompletedRecord),
    /// Release the key and report this event.
    Release(Event),
}

impl Settlement {
    fn of(completion: Completion, fingerprint: Fingerprint) -> Self {
        match completion {
            Completion::Store(payload) => Settlement::Store(CompletedRecord {
                fingerprint,
                payload,
            }),
            Completion::Release | Completion::Later(_) => Settlement::Release(Event::Released),
        }
    }
}

async fn record<St: Store>(
    owner: Owner<St>,
    lease: Lease,
    retention: Duration,
    settlement: Settlement,
    _counted: ExecutionGuard,
) {
    match settlement {
        Settlement::Store(record) => {
            store_outcome(&owner, lease, record, retention).await;
            observe::event(Event::Executed, &owner.key, None);
        }
        Settlement::Release(event) => {
            release(&owner.store, owner.key, owner.token).await;
            observe::event(event, &owner.key, None);
        }
    }
}

/// The pauses between completion attempts: 10 ms, doubling up to 1 s.
const COMPLETION_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(10), 2.0, Duration::from_secs(1));

/// Stores the outcome, until the store confirms it or the lease is lost.
///
/// A store error leaves the outcome unknown to the store, so it is retried
/// with capped exponential backoff for as long as the lease can be kept,
/// and the lease keeps being renewed meanwhile: duplicates go on waiting
/// instead of executing. It stops when the store confirms the record (a
/// retry of a completion whose reply never came back confirms it too), when
/// the store says the lease is lost, or when the lease has gone unconfirmed
/// for a whole lease (the store may have let it expire). The execution
/// stays counted in [`Executions`](super::Executions) until then, so a
/// graceful shutdown waits.
async fn store_outcome<St: Store>(
    owner: &Owner<St>,
    lease: Lease,
    record: CompletedRecord,
    retention: Duration,
) {
    let (key, token) = (owner.key, owner.token);
    let period = owner.lease / 3;
    let mut lease = lease;
    let mut renewing = !lease.lost;
    let mut next_renewal = deadline(lease.confirmed, period);
    let mut failures = 0u32;
    loop {
        let attempt = observe::store_call(
            "complete",
            owner.store.complete(key, token, record.clone(), retention),
        );
        let error = match attempt.await {
            Ok(LeaseStatus::Held) => return,
            Ok(LeaseStatus::Lost) => return owner.lose_lease(),
            Err(e) => e,
        };
        observe::event(Event::StoreError, &key, Some(&error));
        let now = Instant::now();
        if now >= owner.expiry(&lease) {
            observe::event(Event::CompletionFailed, &key, Some(&error));
            return owner.lost.store(true, Ordering::Release);
        }
        if renewing && now >= next_renewal {
            // Lost means taken over, or completed by an attempt whose reply
            // never came back: the next attempt tells which.
            if owner.extend(&mut lease).await == Some(LeaseStatus::Lost) {
                renewing = false;
            }
            next_renewal = deadline(now, period);
        }
        failures = failures.saturating_add(1);
        observe::completion_retry();
        let mut wake = deadline(now, COMPLETION_BACKOFF.before(failures)).min(owner.expiry(&lease));
        if renewing {
            wake = wake.min(next_renewal);
        }
        tokio::time::sleep_until(wake).await;
    }
}
