//! What a store does for [`Admin`](super::Admin), sealed: the built-in
//! stores implement it, nothing else can.

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
    pub(crate) fn inspect_with(self, key: StoreKey, clock: FenceClock, noted: Noted) -> Inspection {
        let mut seen = Inspection::nothing(&key);
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
    fn read(&self, key: StoreKey) -> impl Future<Output = Result<(Raw, Noted), StoreError>> + Send;

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
