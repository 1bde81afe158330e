//! An execution: the claim that allows it ([`Acquired`]), what the
//! operation knows of it ([`ExecutionContext`]), and running the operation
//! under it ([`Engine::execute`](super::Engine)).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures_util::FutureExt;

use super::Engine;
use super::detach::Detachable;
use super::lease::{self, Owner};
use super::running::Running;
use super::settle::{Completion, settle};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::store::{OwnerToken, Store};

/// What the running operation knows about its own execution.
///
/// The HTTP layer puts one into the request's extensions, so a handler can
/// key its own business rows by the store key and fence (the way to
/// exactly-once inside a database) or check that it still owns the key
/// before committing.
#[derive(Debug, Clone)]
pub struct ExecutionContext {
    key: StoreKey,
    fingerprint: Fingerprint,
    token: OwnerToken,
    lost: Arc<AtomicBool>,
}

impl ExecutionContext {
    /// The store key (a digest of scope and idempotency key).
    pub fn store_key(&self) -> StoreKey {
        self.key
    }

    /// The request's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The owner token; its [`fence`](OwnerToken::fence) grows with each grant.
    pub fn owner_token(&self) -> OwnerToken {
        self.token
    }

    /// Whether the lease was found lost while renewing it, or renewals have
    /// failed for longer than a lease (the store may have let it expire):
    /// another owner may now execute the same key, and this execution's
    /// outcome may not be stored. A handler that checks it before
    /// committing can stop.
    pub fn lease_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

impl<St: Store> Engine<St> {
    /// Runs the operation of an acquired claim, then stores or releases.
    ///
    /// The execution runs inline in the caller's task (no spawn, no task
    /// switch on the hot path) inside a [`Detachable`], which moves it to a
    /// task of its own if the caller is dropped before it ends: a client
    /// that goes away never cancels an execution. A panic in the operation
    /// releases the key and unwinds through the caller, as an inline call's
    /// would.
    fn execute<F, Fut, T, E>(
        &self,
        key: StoreKey,
        fingerprint: Fingerprint,
        token: OwnerToken,
        op: F,
    ) -> Detachable<impl Future<Output = Result<T, E>> + Send + 'static>
    where
        F: FnOnce(ExecutionContext) -> Fut,
        Fut: Future<Output = Result<(T, Completion), E>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        let lost = Arc::new(AtomicBool::new(false));
        let ctx = ExecutionContext {
            key,
            fingerprint,
            token,
            lost: lost.clone(),
        };
        let running = Running::new(
            op(ctx),
            self.store.clone(),
            key,
            token,
            self.lease,
            lost.clone(),
        );
        let owner = Owner {
            store: self.store.clone(),
            key,
            token,
            lease: self.lease,
            lost,
        };
        let retention = self.retention;
        let counted = self.executions.start();
        // Boxed inside `Detachable`, so that every replay's future (which
        // callers move and box) stays small.
        Detachable::new(running.then(move |(result, lease)| {
            settle(owner, lease, fingerprint, retention, result, counted)
        }))
    }
}

/// How [`Engine::begin`] found the key.
pub(crate) enum Begun<'a, St: Store> {
    /// This caller holds the claim: [`Acquired::execute`] runs the operation.
    Acquired(Acquired<'a, St>),
    /// Another execution's stored outcome.
    Replayed {
        /// The stored payload.
        payload: Bytes,
        /// Whether this call waited for an in-flight execution.
        coalesced: bool,
    },
}

/// A claim this caller holds. Dropped without executing, it releases the
/// key, so the claim does not block it for a whole lease.
pub(crate) struct Acquired<'a, St: Store> {
    pub(super) engine: &'a Engine<St>,
    pub(super) key: StoreKey,
    pub(super) fingerprint: Fingerprint,
    pub(super) token: OwnerToken,
    pub(super) executed: bool,
}

impl<St: Store> Acquired<'_, St> {
    /// Runs `op` under the claim; see [`Engine::run`]. The execution runs
    /// in the caller's task and carries on in a task of its own if the
    /// caller goes away.
    pub(crate) fn execute<F, Fut, T, E>(
        mut self,
        op: F,
    ) -> impl Future<Output = Result<T, E>> + Send + 'static
    where
        F: FnOnce(ExecutionContext) -> Fut,
        Fut: Future<Output = Result<(T, Completion), E>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        self.executed = true;
        self.engine
            .execute(self.key, self.fingerprint, self.token, op)
    }
}

impl<St: Store> Drop for Acquired<'_, St> {
    fn drop(&mut self) {
        if self.executed {
            return;
        }
        let (store, key, token) = (self.engine.store.clone(), self.key, self.token);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { lease::release(&store, key, token).await });
        }
    }
}
