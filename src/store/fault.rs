//! [`FaultStore`]: a store wrapper that injects faults (feature
//! `test-util`), for testing what the layer, the engine or your own code
//! does when a store misbehaves.
//!
//! ```
//! # #[cfg(feature = "memory")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use tower_idempotency::store::fault::{Fault, FaultStore, Operation};
//! use tower_idempotency::store::MemoryStore;
//!
//! let store = FaultStore::new(MemoryStore::new());
//! // The next two completions fail before they take effect, then the store
//! // behaves again: a short outage as the handler finishes.
//! store.inject(Operation::Complete, Fault::FailBefore, 2);
//! // The next claim takes effect, but its reply never comes back.
//! store.inject(Operation::Claim, Fault::LoseReply, 1);
//! # }
//! # #[cfg(not(feature = "memory"))] fn main() {}
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use super::{
    Claim, CompletedRecord, LeaseStatus, OwnerToken, RequestLabel, Store, StoreError,
    StoreErrorKind,
};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;

/// A [`Store`] operation, to aim a fault at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// [`Store::claim`].
    Claim,
    /// [`Store::complete`].
    Complete,
    /// [`Store::release`].
    Release,
    /// [`Store::extend`].
    Extend,
    /// [`Store::wait`].
    Wait,
    /// [`Store::purge`].
    Purge,
    /// [`Store::ping`].
    Ping,
}

impl Operation {
    const ALL: [Operation; 7] = [
        Operation::Claim,
        Operation::Complete,
        Operation::Release,
        Operation::Extend,
        Operation::Wait,
        Operation::Purge,
        Operation::Ping,
    ];

    fn name(self) -> &'static str {
        match self {
            Operation::Claim => "claim",
            Operation::Complete => "complete",
            Operation::Release => "release",
            Operation::Extend => "extend",
            Operation::Wait => "wait",
            Operation::Purge => "purge",
            Operation::Ping => "ping",
        }
    }
}

/// What happens to an operation a fault is aimed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// It fails before taking effect, as on a refused connection
    /// ([`StoreErrorKind::Unavailable`]).
    FailBefore,
    /// It takes effect, then fails as if its reply never came back
    /// ([`StoreErrorKind::Timeout`]).
    LoseReply,
    /// It runs after this delay (and then normally).
    Delay(Duration),
    /// Aimed at [`Operation::Claim`]: the payload of a completed record it
    /// finds comes back unreadable (a payload written by a version this one
    /// cannot read, or damaged), so the caller's handling of such payloads
    /// can be tested. Other answers, and other operations, are left alone.
    CorruptPayload,
}

/// Wraps a store and injects [`Fault`]s into the next calls of chosen
/// [`Operation`]s, and counts every call. Clones share their faults and
/// counts. See the [module docs](self).
#[derive(Clone)]
pub struct FaultStore<St> {
    inner: St,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    called: Notify,
}

#[derive(Default)]
struct State {
    /// Faults still to inject, per operation, in order.
    planned: HashMap<Operation, Vec<(Fault, usize)>>,
    calls: HashMap<Operation, usize>,
}

impl<St: fmt::Debug> fmt::Debug for FaultStore<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultStore")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<St> FaultStore<St> {
    /// Wraps `inner`, with no faults planned.
    pub fn new(inner: St) -> Self {
        Self {
            inner,
            shared: Arc::default(),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &St {
        &self.inner
    }

    /// The next `times` calls of `op` get `fault` (after any faults already
    /// planned for `op`); later calls run normally. `usize::MAX` is "from
    /// now on".
    pub fn inject(&self, op: Operation, fault: Fault, times: usize) {
        if times > 0 {
            self.state()
                .planned
                .entry(op)
                .or_default()
                .push((fault, times));
        }
    }

    /// How many calls of `op` still have a fault planned.
    pub fn planned(&self, op: Operation) -> usize {
        self.state().planned.get(&op).map_or(0, |faults| {
            faults
                .iter()
                .map(|(_, n)| *n)
                .fold(0, usize::saturating_add)
        })
    }

    /// Drops every planned fault.
    pub fn clear(&self) {
        self.state().planned.clear();
    }

    /// From now on every operation fails before taking effect, as when the
    /// store is down (ahead of any fault already planned), until
    /// [`clear`](Self::clear).
    pub fn fail_all(&self) {
        let mut state = self.state();
        for op in Operation::ALL {
            state
                .planned
                .entry(op)
                .or_default()
                .insert(0, (Fault::FailBefore, usize::MAX));
        }
    }

    /// How many operations were called in all (faulty calls included).
    pub fn total_calls(&self) -> usize {
        self.state()
            .calls
            .values()
            .copied()
            .fold(0, usize::saturating_add)
    }

    /// How many times `op` was called (faulty calls included).
    pub fn calls(&self, op: Operation) -> usize {
        self.state().calls.get(&op).copied().unwrap_or(0)
    }

    /// Returns once `op` has been called at least `n` times. A call is
    /// counted in the same poll that starts it on the wrapped store.
    pub async fn until_calls(&self, op: Operation, n: usize) {
        loop {
            let called = self.shared.called.notified();
            if self.calls(op) >= n {
                return;
            }
            called.await;
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a call of `op` and takes the fault planned for it, if any.
    fn enter(&self, op: Operation) -> Option<Fault> {
        let mut state = self.state();
        *state.calls.entry(op).or_default() += 1;
        let planned = state.planned.get_mut(&op)?;
        let (fault, left) = planned.first_mut()?;
        let fault = *fault;
        *left -= 1;
        if *left == 0 {
            planned.remove(0);
        }
        Some(fault)
    }

    /// Runs `call` on the wrapped store with the fault planned for `op`.
    async fn run<T>(
        &self,
        op: Operation,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let fault = self.enter(op);
        self.shared.called.notify_waiters();
        Self::apply(op, fault, call).await
    }

    /// Runs `call` with `fault` applied.
    async fn apply<T>(
        op: Operation,
        fault: Option<Fault>,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match fault {
            None => call.await,
            Some(Fault::FailBefore) => Err(StoreError::new(StoreErrorKind::Unavailable, op.name())
                .with_source("injected fault: failed before taking effect")),
            Some(Fault::LoseReply) => {
                call.await?;
                Err(StoreError::new(StoreErrorKind::Timeout, op.name())
                    .with_source("injected fault: took effect, reply never came back"))
            }
            Some(Fault::Delay(delay)) => {
                tokio::time::sleep(delay).await;
                call.await
            }
            // Applied by `claim`, which alone can change the record.
            Some(Fault::CorruptPayload) => call.await,
        }
    }
}

/// The payload of a completed record no reader of this crate accepts.
const UNREADABLE: &[u8] = b"TIDR\x01garbage";

impl<St: Store> Store for FaultStore<St> {
    async fn claim(
        &self,
        key: StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.claim_labelled(key, fingerprint, lease, &RequestLabel::default())
            .await
    }

    async fn claim_labelled(
        &self,
        key: StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
        label: &RequestLabel<'_>,
    ) -> Result<Claim, StoreError> {
        let fault = self.enter(Operation::Claim);
        self.shared.called.notify_waiters();
        let call = self.inner.claim_labelled(key, fingerprint, lease, label);
        let claim = Self::apply(Operation::Claim, fault, call).await?;
        Ok(match claim {
            Claim::Completed(mut record) if fault == Some(Fault::CorruptPayload) => {
                record.payload = bytes::Bytes::from_static(UNREADABLE);
                Claim::Completed(record)
            }
            other => other,
        })
    }

    async fn complete(
        &self,
        key: StoreKey,
        token: OwnerToken,
        record: CompletedRecord,
        retention: Duration,
    ) -> Result<LeaseStatus, StoreError> {
        let call = self.inner.complete(key, token, record, retention);
        self.run(Operation::Complete, call).await
    }

    async fn release(&self, key: StoreKey, token: OwnerToken) -> Result<LeaseStatus, StoreError> {
        self.run(Operation::Release, self.inner.release(key, token))
            .await
    }

    async fn extend(
        &self,
        key: StoreKey,
        token: OwnerToken,
        lease: Duration,
    ) -> Result<LeaseStatus, StoreError> {
        self.run(Operation::Extend, self.inner.extend(key, token, lease))
            .await
    }

    async fn wait(&self, key: StoreKey, fence: u64, timeout: Duration) -> Result<(), StoreError> {
        self.run(Operation::Wait, self.inner.wait(key, fence, timeout))
            .await
    }

    async fn purge(&self, key: StoreKey) -> Result<bool, StoreError> {
        self.run(Operation::Purge, self.inner.purge(key)).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.run(Operation::Ping, self.inner.ping()).await
    }
}

#[cfg(all(test, feature = "memory"))]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    const FP: Fingerprint = Fingerprint::from_bytes([3; 32]);
    const LEASE: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn an_outage_fails_everything_until_cleared_and_records_can_be_corrupted() {
        let store = FaultStore::new(MemoryStore::new());
        let key = StoreKey::from_parts(b"", b"k");
        store.fail_all();
        assert!(store.claim(key, FP, LEASE).await.is_err());
        assert!(store.purge(key).await.is_err());
        assert_eq!(store.total_calls(), 2);
        store.clear();
        let Ok(Claim::Acquired(token)) = store.claim(key, FP, LEASE).await else {
            panic!("the store is back");
        };
        let record = CompletedRecord {
            fingerprint: FP,
            payload: bytes::Bytes::from_static(b"done"),
        };
        store
            .complete(key, token, record.clone(), LEASE)
            .await
            .unwrap();
        store.inject(Operation::Claim, Fault::CorruptPayload, 1);
        let Ok(Claim::Completed(unreadable)) = store.claim(key, FP, LEASE).await else {
            panic!("completed");
        };
        assert_eq!(&unreadable.payload[..], UNREADABLE);
        assert_eq!(
            store.claim(key, FP, LEASE).await.unwrap(),
            Claim::Completed(record)
        );
        assert_eq!(store.total_calls(), 6);
    }

    #[tokio::test]
    async fn faults_hit_the_next_calls_then_the_store_behaves() {
        let store = FaultStore::new(MemoryStore::new());
        let key = StoreKey::from_parts(b"", b"k");
        store.inject(Operation::Claim, Fault::FailBefore, 2);
        for _ in 0..2 {
            let e = store.claim(key, FP, LEASE).await.unwrap_err();
            assert_eq!(e.kind(), StoreErrorKind::Unavailable);
        }
        assert_eq!(store.inner().in_flight_count(), 0, "nothing took effect");
        let Ok(Claim::Acquired(token)) = store.claim(key, FP, LEASE).await else {
            panic!("the third claim runs normally");
        };
        assert_eq!(store.calls(Operation::Claim), 3);

        store.inject(Operation::Complete, Fault::LoseReply, 1);
        let record = CompletedRecord {
            fingerprint: FP,
            payload: bytes::Bytes::from_static(b"done"),
        };
        let e = store
            .complete(key, token, record.clone(), LEASE)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), StoreErrorKind::Timeout);
        // It took effect: completing again confirms it.
        assert_eq!(
            store.complete(key, token, record, LEASE).await.unwrap(),
            LeaseStatus::Held
        );
        assert!(matches!(
            store.claim(key, FP, LEASE).await,
            Ok(Claim::Completed(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_postpones_the_call() {
        let store = FaultStore::new(MemoryStore::new());
        let key = StoreKey::from_parts(b"", b"slow");
        store.inject(Operation::Claim, Fault::Delay(Duration::from_secs(5)), 1);
        let started = tokio::time::Instant::now();
        assert!(matches!(
            store.claim(key, FP, LEASE).await,
            Ok(Claim::Acquired(_))
        ));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        store.clear();
        store.inject(Operation::Claim, Fault::FailBefore, usize::MAX);
        for _ in 0..3 {
            assert!(store.claim(key, FP, LEASE).await.is_err());
        }
        store.clear();
        assert!(store.claim(key, FP, LEASE).await.is_ok());
    }
}
