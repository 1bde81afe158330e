//! The engine: run an operation at most once per key, whatever the transport.
//!
//! [`Engine`] is the core the HTTP layer is built on, and it is usable on its
//! own — for a queue consumer, a scheduled job, or any function that must not
//! run twice for the same input. Given a [`StoreKey`], a [`Fingerprint`] and
//! an async operation, it:
//!
//! 1. claims the key in the store (one atomic operation);
//! 2. if it acquired the key, runs the operation in the caller's task, and
//!    moves it to **a task of its own** if the caller goes away (a client
//!    disconnect), so that dropping the caller never cancels it; the
//!    lease is renewed while it runs, and a lost lease is reported through
//!    [`ExecutionContext::lease_lost`] and the logs;
//! 3. stores the operation's outcome (or releases the key, if the operation
//!    failed or asked not to be stored), then hands it to the caller; a
//!    store error at this point is retried with backoff, the lease still
//!    renewed, until the store confirms the record or the lease is lost, so
//!    a short store outage never lets a retry run the operation again;
//! 4. if the key is in flight with the same fingerprint, waits for it
//!    (without polling) and replays its outcome, up to a deadline;
//! 5. if the key completed, replays the stored outcome; if the fingerprint
//!    differs, refuses.
//!
//! ```
//! use bytes::Bytes;
//! use tower_idempotency::engine::{Engine, Outcome};
//! use tower_idempotency::fingerprint::Fingerprint;
//! use tower_idempotency::key::StoreKey;
//! # #[cfg(feature = "memory")]
//! use tower_idempotency::store::MemoryStore;
//!
//! # #[cfg(not(feature = "memory"))] fn main() {}
//! # #[cfg(feature = "memory")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let engine = Engine::new(MemoryStore::new());
//! let message = br#"{"order": 42, "amount": 100}"#;
//! let key = StoreKey::from_parts(b"billing-queue", b"message-7f3a");
//! let fingerprint = Fingerprint::of_bytes(message);
//!
//! for _delivery in 0..3 {
//!     // A queue may deliver the same message more than once.
//!     let outcome = engine
//!         .run_stored(key, fingerprint, |_ctx| async {
//!             // charge the card here; runs once
//!             Ok::<_, std::io::Error>(Bytes::from_static(b"charged"))
//!         })
//!         .await
//!         .unwrap();
//!     assert_eq!(outcome.value(), &Bytes::from_static(b"charged"));
//! }
//! # }
//! ```

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

mod detach;
mod execution;
mod executions;
mod lease;
mod running;
mod settle;

pub use execution::ExecutionContext;
pub(crate) use execution::{Acquired, Begun};
pub use executions::Executions;
pub use settle::{Completion, Decider};

use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::observe::{self, Event};
use crate::store::{Claim, RequestLabel, Store, StoreError};

/// The default lease: 30 seconds, renewed every 10 while the operation runs.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// The default retention of completed records: 24 hours.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);
/// The default wait for an in-flight duplicate: 10 seconds.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);
/// The shortest lease accepted; shorter values are raised to it.
pub const MIN_LEASE: Duration = Duration::from_millis(3);

/// What to do with a request whose key is in flight with the same fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InFlightPolicy {
    /// Wait for the first execution, up to this long (counted from when the
    /// duplicate first finds it in flight), and return its outcome; after
    /// the deadline, refuse as in flight (HTTP 409 + `Retry-After`).
    Wait(Duration),
    /// Refuse at once as in flight.
    Reject,
}

/// A successful run: either this call executed, or it got a stored outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// This call ran the operation; here is what it returned.
    Executed(T),
    /// Another execution's stored outcome.
    Replayed {
        /// The stored payload.
        payload: Bytes,
        /// Whether this call waited for an in-flight execution (coalesced).
        coalesced: bool,
    },
}

impl Outcome<Bytes> {
    /// The bytes, whether executed or replayed.
    pub fn value(&self) -> &Bytes {
        match self {
            Outcome::Executed(b) | Outcome::Replayed { payload: b, .. } => b,
        }
    }
}

/// Why a run did not produce an outcome.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError<E> {
    /// The operation returned an error; the key was released.
    #[error("the idempotent operation failed")]
    Operation(E),
    /// The key is in use (in flight or completed) with a different fingerprint.
    #[error("the idempotency key was already used with a different request")]
    Mismatch,
    /// The key is in flight and the policy refused to wait, or the wait
    /// deadline passed.
    #[error("a request with this idempotency key is still in flight")]
    InFlight,
    /// The store failed; nothing was executed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An earlier execution committed its effect and its outcome is
    /// unknown ([`Claim::OutcomeUnknown`]); nothing was executed.
    #[error(
        "an earlier execution with this idempotency key committed its effect; its outcome is unknown"
    )]
    OutcomeUnknown,
}

/// Runs operations at most once per key over a [`Store`]. See the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct Engine<St> {
    store: St,
    lease: Duration,
    retention: Duration,
    in_flight: InFlightPolicy,
    executions: Executions,
}

impl<St: Store> Engine<St> {
    /// An engine with the default lease (30 s), retention (24 h) and in-flight
    /// policy (wait up to 10 s).
    pub fn new(store: St) -> Self {
        Self {
            store,
            lease: DEFAULT_LEASE,
            retention: DEFAULT_RETENTION,
            in_flight: InFlightPolicy::Wait(DEFAULT_WAIT),
            executions: Executions::default(),
        }
    }

    /// The executions this engine (and its clones) are running.
    pub fn executions(&self) -> &Executions {
        &self.executions
    }

    /// Sets the lease (at least [`MIN_LEASE`]); it is renewed every third of it.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(MIN_LEASE);
        self
    }

    /// Sets how long completed outcomes are kept (at least 1 ms).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention.max(Duration::from_millis(1));
        self
    }

    /// Sets what happens to a duplicate while the first is in flight.
    pub fn in_flight_policy(mut self, policy: InFlightPolicy) -> Self {
        self.in_flight = policy;
        self
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.store
    }

    /// Runs `op` at most once for `key`, storing the payload it returns on
    /// `Ok` and releasing the key on `Err`. The simple form of [`run`](Self::run).
    pub async fn run_stored<F, Fut, E>(
        &self,
        key: StoreKey,
        fingerprint: Fingerprint,
        op: F,
    ) -> Result<Outcome<Bytes>, EngineError<E>>
    where
        F: FnOnce(ExecutionContext) -> Fut,
        Fut: Future<Output = Result<Bytes, E>> + Send + 'static,
        E: Send + 'static,
    {
        self.run(key, fingerprint, move |ctx| {
            let fut = op(ctx);
            async move { fut.await.map(|b| (b.clone(), Completion::Store(b))) }
        })
        .await
    }

    /// Runs `op` at most once for `key`.
    ///
    /// `op` returns the value for this caller and a [`Completion`] saying
    /// what to store for every later caller (the two differ when, for
    /// example, a response carries per-caller headers). An `Err` releases the
    /// key. A panic in `op` releases the key and is resumed in the caller, as
    /// if `op` had run inline.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn would hold its arguments twice"
    )]
    pub fn run<F, Fut, T, E>(
        &self,
        key: StoreKey,
        fingerprint: Fingerprint,
        op: F,
    ) -> impl Future<Output = Result<Outcome<T>, EngineError<E>>>
    where
        F: FnOnce(ExecutionContext) -> Fut,
        Fut: Future<Output = Result<(T, Completion), E>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        // A block, not an `async fn` (see `crate::service::guard`): `op`
        // carries the request.
        async move {
            match self
                .begin(key, fingerprint, &RequestLabel::default())
                .await?
            {
                Begun::Acquired(acquired) => acquired
                    .execute(op)
                    .await
                    .map(Outcome::Executed)
                    .map_err(EngineError::Operation),
                Begun::Replayed { payload, coalesced } => {
                    Ok(Outcome::Replayed { payload, coalesced })
                }
            }
        }
    }

    /// Claims `key` (waiting for an in-flight duplicate as the policy says)
    /// without running anything yet: the first half of [`run`](Self::run),
    /// for a caller that must keep what the operation would consume until it
    /// knows the store answered (the HTTP layer, to fail open).
    pub(crate) async fn begin<E>(
        &self,
        key: StoreKey,
        fingerprint: Fingerprint,
        label: &RequestLabel<'_>,
    ) -> Result<Begun<'_, St>, EngineError<E>> {
        // The wait for an in-flight duplicate counts from the first time
        // it is seen; a request that claims or replays never reads the clock.
        let mut waiting = observe::WaitClock::default();
        let mut coalesced = false;
        loop {
            let claim = self
                .store
                .claim_labelled(key, fingerprint, self.lease, label);
            let claim = match observe::store_call("claim", claim).await {
                Ok(claim) => claim,
                Err(e) => {
                    observe::event(Event::StoreError, &key, Some(&e));
                    return Err(EngineError::Store(e));
                }
            };
            match claim {
                Claim::Acquired(token) => {
                    return Ok(Begun::Acquired(Acquired {
                        engine: self,
                        key,
                        fingerprint,
                        token,
                        executed: false,
                    }));
                }
                Claim::Completed(record) if record.fingerprint == fingerprint => {
                    let event = if coalesced {
                        Event::Coalesced
                    } else {
                        Event::Replayed
                    };
                    observe::event(event, &key, None);
                    return Ok(Begun::Replayed {
                        payload: record.payload,
                        coalesced,
                    });
                }
                Claim::InFlight {
                    fingerprint: theirs,
                    fence,
                } if theirs == fingerprint => {
                    let limit = match self.in_flight {
                        InFlightPolicy::Wait(limit) => limit,
                        InFlightPolicy::Reject => Duration::ZERO,
                    };
                    let waited = waiting.waited();
                    if waited >= limit {
                        observe::event(Event::InFlight, &key, None);
                        return Err(EngineError::InFlight);
                    }
                    if let Err(e) = Box::pin(self.store.wait(key, fence, limit - waited)).await {
                        // Counted, not timed: a wait's length is the
                        // other execution's, not the store's.
                        observe::store_error("wait", &e);
                        observe::event(Event::StoreError, &key, Some(&e));
                        return Err(EngineError::Store(e));
                    }
                    coalesced = true;
                }
                Claim::OutcomeUnknown {
                    fingerprint: theirs,
                } if theirs == fingerprint => {
                    observe::event(Event::OutcomeUnknown, &key, None);
                    return Err(EngineError::OutcomeUnknown);
                }
                Claim::Completed(_) | Claim::InFlight { .. } | Claim::OutcomeUnknown { .. } => {
                    observe::event(Event::Mismatch, &key, None);
                    return Err(EngineError::Mismatch);
                }
            }
        }
    }
}

#[cfg(all(test, feature = "memory"))]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn a_claim_dropped_before_executing_is_released() {
        let engine = Engine::new(MemoryStore::new());
        let key = StoreKey::from_parts(b"", b"k");
        let fingerprint = Fingerprint::of_bytes(b"request");
        let begun = engine
            .begin::<std::convert::Infallible>(key, fingerprint, &RequestLabel::default())
            .await
            .unwrap();
        assert!(matches!(begun, Begun::Acquired(_)));
        drop(begun);
        // The release runs in a task of its own.
        for _ in 0..100 {
            if engine.store().in_flight_count() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        let again = engine.store().claim(key, fingerprint, DEFAULT_LEASE).await;
        assert!(matches!(again, Ok(Claim::Acquired(_))), "{again:?}");
    }
}
