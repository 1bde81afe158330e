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
    /// `key` holding nothing, nothing known of it: what an inspection
    /// starts from before it reads the entry.
    pub(crate) fn nothing(key: &StoreKey) -> Self {
        Self {
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
        }
    }

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

pub(crate) mod sealed;

#[cfg(test)]
mod tests;
