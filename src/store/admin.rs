//! The operator's view of a store: [`Admin`], implemented by every
//! built-in store.
//!
//! The layer creates states that a person must act on: a key whose outcome
//! is unknown (every retry is refused with 409 until someone checks what
//! happened), a claim held by a process that died (the key waits for the
//! claim's lease), an entry that cannot be read (500 until it is purged).
//! [`Admin`] finds and settles them:
//!
//! | method | what it does |
//! |---|---|
//! | [`inspect`](Admin::inspect) | what one key holds: its [`State`], fence, lease left or time to expiry, and for a completed key the stored answer |
//! | [`list`](Admin::list) | keys by state, oldest claim first, at most a limit |
//! | [`purge_entry`](Admin::purge_entry) | drops what a key holds, refusing a live claim unless forced |
//! | [`resolve`](Admin::resolve) | settles an outcome-unknown key: releases it (the next retry executes) or stores the answer retries get |
//!
//! Keys are the [`StoreKey`]s the layer derives from the scope and the
//! client's key: [`StoreKey::new`] with the same [`Scope`](crate::Scope)
//! finds the layer's entry (for the sidecar's `--scope-header`,
//! [`Scope::from_header_value`](crate::Scope::from_header_value)).
//!
//! The trait is separate from [`Store`], so a store of your own does not
//! have to implement it; it is sealed, and only the built-in stores
//! implement it.
//!
//! ```
//! # #[cfg(feature = "memory")]
//! # async fn run() -> Result<(), tower_idempotency::store::StoreError> {
//! use tower_idempotency::store::MemoryStore;
//! use tower_idempotency::store::admin::{Admin, State};
//! use tower_idempotency::key::StoreKey;
//! use tower_idempotency::{IdempotencyKey, Scope};
//!
//! let store = MemoryStore::new();
//! let key = IdempotencyKey::parse(b"order-1042").expect("a valid key");
//! let seen = store.inspect(StoreKey::new(&Scope::global(), &key)).await?;
//! assert_eq!(seen.state, State::Absent);
//! # Ok(())
//! # }
//! ```

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashSet};
use std::fmt;
use std::future::Future;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use super::{KeptLabel, Store, StoreError};
use crate::headers::HopByHop;
use crate::key::StoreKey;
use crate::payload::{PayloadError, StoredOutcome, encode_response};

/// The most entries one [`Admin::list`] returns.
pub const MAX_LIST: usize = 10_000;

/// What a key holds, as an operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum State {
    /// Nothing: the next request with the key executes (a released claim,
    /// or one whose lease ran out, counts as nothing).
    Absent,
    /// A live claim: an execution is running, or its process died and the
    /// key waits for the lease to run out.
    InFlight,
    /// A stored answer, replayed to every retry.
    Completed,
    /// The execution's outcome is unknown (it committed its effect and
    /// lost its lease, or its response broke off): every retry is refused
    /// with 409 until an operator [resolves](Admin::resolve) it.
    OutcomeUnknown,
    /// An entry the store cannot read: the layer answers 500 until it is
    /// [purged](Admin::purge_entry).
    Unreadable,
}

impl State {
    /// Every state, in the order the tool lists them.
    pub const ALL: [State; 5] = [
        State::Absent,
        State::InFlight,
        State::Completed,
        State::OutcomeUnknown,
        State::Unreadable,
    ];

    /// The state's name in JSON and logs: `absent`, `in_flight`,
    /// `completed`, `outcome_unknown` or `unreadable`.
    pub fn name(self) -> &'static str {
        match self {
            State::Absent => "absent",
            State::InFlight => "in_flight",
            State::Completed => "completed",
            State::OutcomeUnknown => "outcome_unknown",
            State::Unreadable => "unreadable",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What kind of answer a completed (or outcome-unknown) key stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AnswerKind {
    /// A full response, replayed byte for byte.
    Response,
    /// The request executed, but its response was too large (or streamed)
    /// to store: retries are refused.
    NotReplayable,
    /// The response broke off after its head: what the handler did is
    /// unknown, and retries are refused with 409.
    OutcomeUnknown,
}

/// The answer stored for a completed key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredAnswer {
    /// What was stored.
    pub kind: AnswerKind,
    /// The status the execution answered with.
    pub status: StatusCode,
    /// The replayed headers (empty unless `kind` is
    /// [`AnswerKind::Response`]).
    pub headers: HeaderMap,
    /// The replayed body (empty unless `kind` is [`AnswerKind::Response`]).
    pub body: Bytes,
}

/// One key as [`Admin::inspect`] and [`Admin::list`] see it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Inspection {
    /// The key's name in the store: the hex SHA-256 of scope and key (the
    /// part after the prefix in a Redis key name, the `key` column of
    /// PostgreSQL, in hex).
    pub key_hash: String,
    /// What the key holds.
    pub state: State,
    /// The fence of the key's latest grant, where the entry keeps one.
    pub fence: Option<u64>,
    /// When the latest grant was made, read from its fence (stores derive
    /// fences from their clock): the age of a claim, or of the execution a
    /// record came from.
    pub claimed_at: Option<SystemTime>,
    /// The request's method, where the store keeps it (PostgreSQL and
    /// memory do; Redis does not).
    pub method: Option<String>,
    /// The request's path without its query, where the store keeps it.
    pub path: Option<String>,
    /// When the answer was stored, where the store keeps it.
    pub completed_at: Option<SystemTime>,
    /// For a live claim, how long its lease has left.
    pub lease_left: Option<Duration>,
    /// For a completed or outcome-unknown key, how long until the store
    /// forgets it.
    pub expires_in: Option<Duration>,
    /// For a completed key, the stored answer.
    pub answer: Option<StoredAnswer>,
    /// For an unreadable entry, why it cannot be read.
    pub problem: Option<String>,
}

impl Inspection {
    /// How long ago the latest grant was made, by `now`.
    pub fn age(&self, now: SystemTime) -> Option<Duration> {
        self.claimed_at
            .map(|at| now.duration_since(at).unwrap_or(Duration::ZERO))
    }
}

/// What [`Admin::purge_entry`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Purged {
    /// The key held nothing live; whatever was left of it is gone.
    Nothing,
    /// A live claim, a record or an unreadable entry was dropped: the key
    /// is new.
    Dropped,
    /// The key holds a live claim and `force` was not given: nothing
    /// changed.
    RefusedLiveClaim,
}

/// How [`Admin::resolve`] settles an outcome-unknown key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Resolution {
    /// Drop it: the next retry executes (after the operator checked that
    /// the effect did not happen).
    Release,
    /// Store this answer: every retry gets it, marked as a replay (after
    /// the operator checked what the effect was). It is kept as long as the
    /// key would have been.
    Respond {
        /// The status retries get.
        status: StatusCode,
        /// The headers retries get.
        headers: HeaderMap,
        /// The body retries get.
        body: Bytes,
    },
}

/// What [`Admin::resolve`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Resolved {
    /// The key was released: the next retry executes.
    Released,
    /// The answer was stored: retries replay it.
    Stored,
    /// The key's outcome is not unknown (it holds this state): nothing
    /// changed. Only an outcome-unknown key can be resolved.
    Refused(State),
    /// The key changed between reading it and resolving it (its owner
    /// stored its answer late, or another operator resolved it): nothing
    /// was overwritten. Inspect it again.
    Changed,
}

/// An operator's interface to a store: inspect, list, purge and resolve.
/// See the [module docs](self).
pub trait Admin: Store + sealed::Backend {
    /// What `key` holds now.
    fn inspect(
        &self,
        key: StoreKey,
    ) -> impl Future<Output = Result<Inspection, StoreError>> + Send {
        async move {
            let (raw, noted) = sealed::Backend::read(self, key).await?;
            Ok(raw.inspect_with(key, Self::CLOCK, noted))
        }
    }

    /// Keys in `state` (every state but absent when `None`), oldest claim
    /// first, at most `limit` (itself at most [`MAX_LIST`]). A store on a
    /// server reads every key it holds to find them (Redis: `SCAN` over the
    /// store's prefix on every primary; PostgreSQL: the rows in fence
    /// order, which an index keeps cheap), so it costs a round trip per key
    /// on Redis: an operator's command, not a request path.
    fn list(
        &self,
        state: Option<State>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Inspection>, StoreError>> + Send {
        async move {
            let mut oldest = sealed::Oldest::new(state, limit.min(MAX_LIST));
            sealed::Backend::scan(self, &mut oldest).await?;
            Ok(oldest.into_sorted())
        }
    }

    /// Drops what `key` holds, so the next request with it executes; a
    /// live claim only with `force` (its execution may be running: a
    /// duplicate would then run beside it).
    fn purge_entry(
        &self,
        key: StoreKey,
        force: bool,
    ) -> impl Future<Output = Result<Purged, StoreError>> + Send {
        sealed::Backend::drop_entry(self, key, force)
    }

    /// Settles `key` if its outcome is unknown, and refuses any other
    /// state ([`Resolved::Refused`]): it releases the key or stores the
    /// answer retries get, only if the key still holds the entry that was
    /// read (its fence, its state, and for a record its payload), so a
    /// concurrent change is never overwritten ([`Resolved::Changed`]). A
    /// stored answer keeps no hop-by-hop header and no `Content-Length`
    /// (a replay sets the body's own), as the layer stores a response.
    fn resolve(
        &self,
        key: StoreKey,
        resolution: Resolution,
    ) -> impl Future<Output = Result<Resolved, StoreError>> + Send {
        async move {
            let (raw, noted) = sealed::Backend::read(self, key).await?;
            let expected = match &raw {
                sealed::Raw::Record { payload, .. } => sealed::Expected::Record(payload.clone()),
                _ => sealed::Expected::UnknownClaim,
            };
            let seen = raw.inspect_with(key, Self::CLOCK, noted);
            let fence = match (seen.state, seen.fence) {
                (State::OutcomeUnknown, Some(fence)) => fence,
                // An entry whose fence cannot be read is damaged: purge it.
                (State::OutcomeUnknown, None) => return Ok(Resolved::Refused(State::Unreadable)),
                (state, _) => return Ok(Resolved::Refused(state)),
            };
            let (payload, done) = match resolution {
                Resolution::Release => (None, Resolved::Released),
                Resolution::Respond {
                    status,
                    headers,
                    body,
                } => {
                    // As the layer stores a response: no header that is
                    // meaningful for one connection only, and the length
                    // is the body's own.
                    let hop_by_hop = HopByHop::of(&headers);
                    let keep = |name: &http::HeaderName| {
                        !hop_by_hop.contains(name) && name != http::header::CONTENT_LENGTH
                    };
                    let payload = encode_response(status, &headers, keep, &body, None);
                    (Some(payload), Resolved::Stored)
                }
            };
            if sealed::Backend::replace(self, key, fence, &expected, payload).await? {
                return Ok(done);
            }
            Ok(Resolved::Changed)
        }
    }
}

impl<S: Store + sealed::Backend> Admin for S {}

fn answer_of(payload: &Bytes) -> Result<StoredAnswer, PayloadError> {
    Ok(match StoredOutcome::decode(payload)? {
        StoredOutcome::Response(r) => StoredAnswer {
            kind: AnswerKind::Response,
            status: r.status,
            headers: r.headers,
            body: r.body,
        },
        StoredOutcome::NotReplayable { status } => StoredAnswer {
            kind: AnswerKind::NotReplayable,
            status,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        },
        StoredOutcome::OutcomeUnknown { status } => StoredAnswer {
            kind: AnswerKind::OutcomeUnknown,
            status,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        },
    })
}

pub(crate) mod sealed {
    use super::*;

    /// What a store read for one key, before the payload is decoded.
    #[doc(hidden)]
    #[derive(Debug, Clone)]
    pub enum Raw {
        /// Nothing live (a released or expired claim keeps its fence).
        Absent { fence: Option<u64> },
        /// A live claim.
        InFlight { fence: u64, lease_left: Duration },
        /// A completed record.
        Record {
            fence: Option<u64>,
            payload: Bytes,
            expires_in: Option<Duration>,
        },
        /// A claim whose effect was committed and whose lease ran out.
        UnknownClaim {
            fence: u64,
            expires_in: Option<Duration>,
        },
        /// An entry the store cannot read.
        Unreadable { problem: String },
    }

    /// How a store turns a fence into the time of its grant.
    #[doc(hidden)]
    #[derive(Debug, Clone, Copy)]
    pub enum FenceClock {
        /// The fence is the clock in microseconds since 1970 (Redis,
        /// PostgreSQL).
        Micros,
        /// The fence is the clock in microseconds times this, plus a lane
        /// (the memory store's shards).
        MicrosTimes(u64),
    }

    impl FenceClock {
        pub(crate) fn time_of(self, fence: u64) -> Option<SystemTime> {
            let micros = match self {
                FenceClock::Micros => fence,
                FenceClock::MicrosTimes(n) => fence.checked_div(n)?,
            };
            SystemTime::UNIX_EPOCH.checked_add(Duration::from_micros(micros))
        }
    }

    impl Raw {
        /// The key as an operator sees it: the payload decoded, a record whose
        /// answer is "outcome unknown" shown as such.
        pub(crate) fn inspect_with(
            self,
            key: StoreKey,
            clock: FenceClock,
            noted: Noted,
        ) -> Inspection {
            let mut seen = Inspection {
                key_hash: key.to_hex(),
                state: State::Absent,
                fence: None,
                claimed_at: None,
                method: None,
                path: None,
                completed_at: None,
                lease_left: None,
                expires_in: None,
                answer: None,
                problem: None,
            };
            match self {
                Raw::Absent { fence } => seen.fence = fence,
                Raw::InFlight { fence, lease_left } => {
                    seen.state = State::InFlight;
                    seen.fence = Some(fence);
                    seen.lease_left = Some(lease_left);
                }
                Raw::UnknownClaim { fence, expires_in } => {
                    seen.state = State::OutcomeUnknown;
                    seen.fence = Some(fence);
                    seen.expires_in = expires_in;
                }
                Raw::Record {
                    fence,
                    payload,
                    expires_in,
                } => {
                    seen.fence = fence;
                    seen.expires_in = expires_in;
                    match answer_of(&payload) {
                        Ok(answer) => {
                            seen.state = match answer.kind {
                                AnswerKind::OutcomeUnknown => State::OutcomeUnknown,
                                _ => State::Completed,
                            };
                            seen.answer = Some(answer);
                        }
                        Err(e) => {
                            seen.state = State::Unreadable;
                            seen.problem = Some(e.to_string());
                        }
                    }
                }
                Raw::Unreadable { problem } => {
                    seen.state = State::Unreadable;
                    seen.problem = Some(problem);
                }
            }
            seen.claimed_at = seen.fence.and_then(|f| clock.time_of(f));
            if seen.state != State::Absent {
                let known = |text: &str| (!text.is_empty()).then(|| text.to_owned());
                seen.method = known(noted.label.method());
                seen.path = known(noted.label.path());
                seen.completed_at = noted.completed_at;
            }
            seen
        }
    }

    /// What a key held when it was read, to be resolved only if it still
    /// does.
    #[doc(hidden)]
    #[derive(Debug, Clone)]
    pub enum Expected {
        /// A completed record with this payload.
        Record(Bytes),
        /// A claim whose effect was committed and whose lease ran out.
        UnknownClaim,
    }

    /// What a store keeps beside an entry, for an operator.
    #[doc(hidden)]
    #[derive(Debug, Clone, Default)]
    pub struct Noted {
        /// The claiming request's method and path.
        pub(crate) label: KeptLabel,
        /// When the answer was stored.
        pub(crate) completed_at: Option<SystemTime>,
    }

    /// What a store does for [`Admin`]: read one key, visit every key,
    /// drop one, and replace the record of one by its fence. Sealed: only
    /// the built-in stores implement it.
    pub trait Backend: Send + Sync {
        /// How the store's fences read as time.
        #[doc(hidden)]
        const CLOCK: FenceClock = FenceClock::Micros;

        /// What `key` holds.
        #[doc(hidden)]
        fn read(
            &self,
            key: StoreKey,
        ) -> impl Future<Output = Result<(Raw, Noted), StoreError>> + Send;

        /// Offers every key the store holds to `oldest`.
        #[doc(hidden)]
        fn scan(&self, oldest: &mut Oldest) -> impl Future<Output = Result<(), StoreError>> + Send;

        /// Drops what `key` holds; a live claim only if `force`.
        #[doc(hidden)]
        fn drop_entry(
            &self,
            key: StoreKey,
            force: bool,
        ) -> impl Future<Output = Result<Purged, StoreError>> + Send;

        /// If `key` still holds what `expected` says under `fence`: stores
        /// `payload` as its record, keeping its fingerprint and expiry, or
        /// releases it (`None`). Whether it did.
        #[doc(hidden)]
        fn replace(
            &self,
            key: StoreKey,
            fence: u64,
            expected: &Expected,
            payload: Option<Bytes>,
        ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    }

    /// The `limit` oldest keys offered in a state, kept in a bounded heap
    /// (the newest on top, dropped first).
    #[derive(Debug)]
    #[cfg_attr(
        not(any(feature = "memory", feature = "redis", feature = "postgres")),
        allow(dead_code, reason = "used by the built-in stores")
    )]
    pub struct Oldest {
        state: Option<State>,
        limit: usize,
        heap: BinaryHeap<ByAge>,
        /// The keys in `heap`: a key offered twice (`SCAN` may return one
        /// twice) is kept once.
        kept: HashSet<String>,
    }

    #[derive(Debug)]
    struct ByAge(Inspection);

    impl ByAge {
        /// Oldest first; an entry without a time after every other;
        /// then by name, so the order is total.
        fn rank(&self) -> (bool, Option<SystemTime>, &str) {
            (
                self.0.claimed_at.is_none(),
                self.0.claimed_at,
                &self.0.key_hash,
            )
        }
    }

    impl PartialEq for ByAge {
        fn eq(&self, other: &Self) -> bool {
            self.rank() == other.rank()
        }
    }
    impl Eq for ByAge {}
    impl PartialOrd for ByAge {
        fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for ByAge {
        fn cmp(&self, other: &Self) -> Ordering {
            self.rank().cmp(&other.rank())
        }
    }

    impl Oldest {
        pub(crate) fn new(state: Option<State>, limit: usize) -> Self {
            Self {
                state,
                limit,
                heap: BinaryHeap::new(),
                kept: HashSet::new(),
            }
        }

        /// Whether `limit` keys in the state were offered: a store that
        /// offers them oldest first may stop.
        #[cfg_attr(
            not(feature = "postgres"),
            allow(dead_code, reason = "a store that reads oldest first stops early")
        )]
        pub(crate) fn full(&self) -> bool {
            self.heap.len() >= self.limit
        }

        /// Offers one key; keeps it if it is in the state and among the
        /// oldest.
        #[cfg_attr(
            not(any(feature = "memory", feature = "redis", feature = "postgres")),
            allow(dead_code, reason = "used by the built-in stores")
        )]
        pub(crate) fn offer(&mut self, seen: Inspection) {
            let wanted = match self.state {
                Some(state) => seen.state == state,
                None => seen.state != State::Absent,
            };
            if !wanted || self.limit == 0 || self.kept.contains(&seen.key_hash) {
                return;
            }
            self.kept.insert(seen.key_hash.clone());
            self.heap.push(ByAge(seen));
            if self.heap.len() > self.limit
                && let Some(newest) = self.heap.pop()
            {
                self.kept.remove(&newest.0.key_hash);
            }
        }

        pub(crate) fn into_sorted(self) -> Vec<Inspection> {
            self.heap
                .into_sorted_vec()
                .into_iter()
                .map(|b| b.0)
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sealed::{FenceClock, Noted, Oldest, Raw};
    use super::*;

    fn seen(n: u8, state: State, fence: Option<u64>) -> Inspection {
        Inspection {
            key_hash: StoreKey::from_bytes([n; 32]).to_hex(),
            state,
            fence,
            claimed_at: fence.and_then(|f| FenceClock::Micros.time_of(f)),
            method: None,
            path: None,
            completed_at: None,
            lease_left: None,
            expires_in: None,
            answer: None,
            problem: None,
        }
    }

    #[test]
    fn keeps_the_oldest_in_the_state_asked_for() {
        let mut oldest = Oldest::new(Some(State::InFlight), 2);
        oldest.offer(seen(1, State::InFlight, Some(30)));
        oldest.offer(seen(2, State::Completed, Some(1)));
        oldest.offer(seen(3, State::InFlight, None));
        oldest.offer(seen(4, State::InFlight, Some(10)));
        oldest.offer(seen(5, State::InFlight, Some(20)));
        let fences: Vec<_> = oldest.into_sorted().iter().map(|s| s.fence).collect();
        assert_eq!(fences, [Some(10), Some(20)]);
    }

    #[test]
    fn a_key_offered_twice_is_kept_once() {
        let mut oldest = Oldest::new(None, 10);
        oldest.offer(seen(1, State::Completed, Some(5)));
        oldest.offer(seen(1, State::Completed, Some(5)));
        oldest.offer(seen(2, State::Completed, Some(6)));
        assert_eq!(oldest.into_sorted().len(), 2);
        // A key dropped as the newest may come back.
        let mut oldest = Oldest::new(None, 1);
        oldest.offer(seen(1, State::Completed, Some(9)));
        oldest.offer(seen(2, State::Completed, Some(1)));
        oldest.offer(seen(1, State::Completed, Some(9)));
        let kept: Vec<_> = oldest.into_sorted().iter().map(|s| s.fence).collect();
        assert_eq!(kept, [Some(1)]);
    }

    #[test]
    fn without_a_state_every_key_but_absent_ones() {
        let mut oldest = Oldest::new(None, 10);
        oldest.offer(seen(1, State::Absent, Some(1)));
        oldest.offer(seen(2, State::Unreadable, None));
        oldest.offer(seen(3, State::Completed, Some(5)));
        let states: Vec<_> = oldest.into_sorted().iter().map(|s| s.state).collect();
        assert_eq!(states, [State::Completed, State::Unreadable]);
    }

    #[test]
    fn a_record_with_an_outcome_unknown_answer_is_outcome_unknown() {
        let key = StoreKey::from_bytes([7; 32]);
        let payload = StoredOutcome::OutcomeUnknown {
            status: StatusCode::BAD_GATEWAY,
        }
        .encode();
        let seen = Raw::Record {
            fence: Some(1_700_000_000_000_000),
            payload,
            expires_in: None,
        }
        .inspect_with(key, FenceClock::Micros, Noted::default());
        assert_eq!(seen.state, State::OutcomeUnknown);
        assert_eq!(seen.answer.map(|a| a.status), Some(StatusCode::BAD_GATEWAY));
        assert_eq!(
            seen.claimed_at,
            SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(1_700_000_000))
        );
        let damaged = Raw::Record {
            fence: None,
            payload: Bytes::from_static(b"not a payload"),
            expires_in: None,
        }
        .inspect_with(key, FenceClock::Micros, Noted::default());
        assert_eq!(damaged.state, State::Unreadable);
        assert!(damaged.problem.is_some());
    }

    #[test]
    fn memory_fences_count_shards() {
        let at = FenceClock::MicrosTimes(64).time_of(64 * 1_000_000 + 3);
        assert_eq!(
            at,
            SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(1))
        );
        assert_eq!(FenceClock::MicrosTimes(0).time_of(5), None);
    }
}
