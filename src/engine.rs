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
//! use tower_idempotency::store::MemoryStore;
//!
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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

mod detach;
mod running;

use detach::Detachable;
use futures_util::FutureExt;
use futures_util::future::Either;
use running::{Lease, Running};

use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::observe::{self, Event};
use crate::store::{Claim, CompletedRecord, LeaseStatus, OwnerToken, Store, StoreError};
use crate::time::deadline;

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
    /// ([`Executions`]).
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

/// A completion that a [`Decider`] will send.
#[derive(Debug)]
pub struct Later(tokio::sync::oneshot::Receiver<Completion>);

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
}

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

/// Counts the executions running in an engine's tasks, so a server can let
/// them finish (and be stored) before it exits.
///
/// Executions are detached from their callers, so a graceful HTTP shutdown,
/// which waits for open connections, does not wait for an execution whose
/// client already went away. [`wait_idle`](Self::wait_idle) does.
#[derive(Debug, Clone, Default)]
pub struct Executions {
    inner: Arc<ExecutionsInner>,
}

#[derive(Debug, Default)]
struct ExecutionsInner {
    running: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

impl Executions {
    /// How many executions are running now.
    pub fn running(&self) -> usize {
        self.inner.running.load(Ordering::Acquire)
    }

    /// Waits until no execution is running.
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.inner.idle.notified();
            if self.running() == 0 {
                return;
            }
            idle.await;
        }
    }

    fn start(&self) -> ExecutionGuard {
        self.inner.running.fetch_add(1, Ordering::AcqRel);
        ExecutionGuard(self.inner.clone())
    }
}

struct ExecutionGuard(Arc<ExecutionsInner>);

impl Drop for ExecutionGuard {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
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

    /// The lease.
    pub fn lease_duration(&self) -> Duration {
        self.lease
    }

    /// The in-flight policy.
    pub fn in_flight(&self) -> InFlightPolicy {
        self.in_flight
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
        // A block, not an `async fn`: an `async fn` keeps each argument twice
        // in its future (rust-lang/rust#62958), and `op` carries the request.
        async move {
            // The wait for an in-flight duplicate counts from the first time
            // it is seen; a request that claims or replays never reads the clock.
            let mut started: Option<Instant> = None;
            let mut coalesced = false;
            loop {
                let claim = match self.store.claim(key, fingerprint, self.lease).await {
                    Ok(claim) => claim,
                    Err(e) => {
                        observe::event(Event::StoreError, &key, Some(&e));
                        return Err(EngineError::Store(e));
                    }
                };
                match claim {
                    // The execution is boxed inside `Detachable`, so every
                    // replay's future (which callers move and box) stays small.
                    Claim::Acquired(token) => {
                        return self.execute(key, fingerprint, token, op).await;
                    }
                    Claim::Completed(record) if record.fingerprint == fingerprint => {
                        let event = if coalesced {
                            Event::Coalesced
                        } else {
                            Event::Replayed
                        };
                        observe::event(event, &key, None);
                        return Ok(Outcome::Replayed {
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
                        let waited = started.get_or_insert_with(Instant::now).elapsed();
                        if waited >= limit {
                            observe::event(Event::InFlight, &key, None);
                            return Err(EngineError::InFlight);
                        }
                        if let Err(e) = Box::pin(self.store.wait(key, fence, limit - waited)).await
                        {
                            observe::event(Event::StoreError, &key, Some(&e));
                            return Err(EngineError::Store(e));
                        }
                        coalesced = true;
                    }
                    Claim::Completed(_) | Claim::InFlight { .. } => {
                        observe::event(Event::Mismatch, &key, None);
                        return Err(EngineError::Mismatch);
                    }
                }
            }
        }
    }

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
    ) -> impl Future<Output = Result<Outcome<T>, EngineError<E>>> + Send + 'static
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
        let execution = Detachable::new(running.then(move |(result, lease)| {
            settle(owner, lease, fingerprint, retention, result, counted)
        }));
        async move {
            match execution.await {
                Ok(value) => Ok(Outcome::Executed(value)),
                Err(e) => Err(EngineError::Operation(e)),
            }
        }
    }
}

/// The owner of a claim, once its operation ended: what storing or
/// releasing the outcome needs.
struct Owner<St> {
    store: St,
    key: StoreKey,
    token: OwnerToken,
    lease: Duration,
    lost: Arc<AtomicBool>,
}

impl<St: Store> Owner<St> {
    fn lose_lease(&self) {
        self.lost.store(true, Ordering::Release);
        observe::event(Event::LeaseLost, &self.key, None);
    }

    /// When `lease` ends unless renewed: a whole lease after the store last
    /// confirmed it.
    fn expiry(&self, lease: &Lease) -> Instant {
        deadline(lease.confirmed, self.lease)
    }

    /// Renews the lease once, noting in `lease` when the store confirmed
    /// it. `None` when the store failed (reported here).
    async fn renew(&self, lease: &mut Lease) -> Option<LeaseStatus> {
        let sent = Instant::now();
        match self.store.extend(self.key, self.token, self.lease).await {
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
}

/// Stores or releases an operation's outcome, then hands its value on.
///
/// The value waits in the closure of a `map`, not in the store call's
/// future, so it is held once.
fn settle<St: Store, T, E>(
    owner: Owner<St>,
    lease: Lease,
    fingerprint: Fingerprint,
    retention: Duration,
    result: Result<(T, Completion), E>,
    counted: ExecutionGuard,
) -> impl Future<Output = Result<T, E>> {
    let (value, verdict) = match result {
        Ok((value, Completion::Later(later))) => {
            // The caller gets its value now; the verdict is awaited and
            // recorded in a task of its own, still counted as running.
            tokio::spawn(async move {
                let (completion, lease) = await_later(&owner, lease, later).await;
                let verdict = Verdict::of(completion, fingerprint);
                record_verdict(owner, lease, retention, verdict, counted).await;
            });
            return Either::Left(std::future::ready(Ok(value)));
        }
        Ok((value, completion)) => (Ok(value), Verdict::of(completion, fingerprint)),
        Err(e) => (Err(e), Verdict::Release(Event::Failed)),
    };
    Either::Right(record_verdict(owner, lease, retention, verdict, counted).map(move |()| value))
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
                let renewed = owner.renew(&mut lease).await;
                let now = Instant::now();
                if renewed == Some(LeaseStatus::Lost) || (renewed.is_none() && now >= owner.expiry(&lease)) {
                    owner.lose_lease();
                    lease.lost = true;
                }
                next_renewal = deadline(now, period);
            }
        }
    }
}

/// What to do with the key once the operation ended.
enum Verdict {
    Store(CompletedRecord),
    /// Release the key and report this event.
    Release(Event),
}

impl Verdict {
    fn of(completion: Completion, fingerprint: Fingerprint) -> Self {
        match completion {
            Completion::Store(payload) => Verdict::Store(CompletedRecord {
                fingerprint,
                payload,
            }),
            Completion::Release | Completion::Later(_) => Verdict::Release(Event::Released),
        }
    }
}

async fn record_verdict<St: Store>(
    owner: Owner<St>,
    lease: Lease,
    retention: Duration,
    verdict: Verdict,
    _counted: ExecutionGuard,
) {
    match verdict {
        Verdict::Store(record) => {
            complete(&owner, lease, record, retention).await;
            observe::event(Event::Executed, &owner.key, None);
        }
        Verdict::Release(event) => {
            release(&owner.store, owner.key, owner.token).await;
            observe::event(event, &owner.key, None);
        }
    }
}

/// The first pause between completion attempts; it doubles up to
/// [`COMPLETION_BACKOFF_CAP`].
const COMPLETION_BACKOFF: Duration = Duration::from_millis(10);
/// The longest pause between completion attempts.
const COMPLETION_BACKOFF_CAP: Duration = Duration::from_secs(1);

/// Stores the outcome, until the store confirms it or the lease is lost.
///
/// A store error leaves the outcome unknown to the store, so it is retried
/// with capped exponential backoff for as long as the lease can be kept,
/// and the lease keeps being renewed meanwhile: duplicates go on waiting
/// instead of executing. It stops when the store confirms the record
/// (a retry of a completion whose reply was lost confirms it too), when the
/// store says the lease is lost, or when the lease has gone unconfirmed for
/// a whole lease (the store may have let it expire). The execution stays
/// counted in [`Executions`] until then, so a graceful shutdown waits.
async fn complete<St: Store>(
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
    let mut backoff = COMPLETION_BACKOFF;
    loop {
        let attempt = owner.store.complete(key, token, record.clone(), retention);
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
            // was lost: the next attempt tells which.
            if owner.renew(&mut lease).await == Some(LeaseStatus::Lost) {
                renewing = false;
            }
            next_renewal = deadline(now, period);
        }
        let mut wake = deadline(now, backoff).min(owner.expiry(&lease));
        if renewing {
            wake = wake.min(next_renewal);
        }
        tokio::time::sleep_until(wake).await;
        backoff = backoff.saturating_mul(2).min(COMPLETION_BACKOFF_CAP);
    }
}

async fn release<St: Store>(store: &St, key: StoreKey, token: OwnerToken) {
    if let Err(e) = store.release(key, token).await {
        // The claim will expire with its lease.
        observe::event(Event::StoreError, &key, Some(&e));
    }
}
