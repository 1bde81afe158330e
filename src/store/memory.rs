//! [`MemoryStore`]: the in-process store.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use moka::policy::EvictionPolicy;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    Claim, CompletedRecord, KeptLabel, LeaseStatus, OwnerToken, RequestLabel, Store, StoreError,
    StoreErrorKind,
};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::time::deadline;

/// Default bound on the bytes of completed records: 64 MiB.
const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Default bound on simultaneous in-flight claims.
const DEFAULT_MAX_IN_FLIGHT: usize = 65_536;
/// Bytes charged per completed record on top of its payload: what the
/// record's own allocations and moka's entry (its hash-table bucket, entry
/// metadata, order-queue and timer nodes) take besides the payload, measured
/// by `benches/memory.rs` and held to by `tests/memory_bound.rs`. The cache
/// has no eviction listener on purpose (BENCHMARKS.md says why).
const RECORD_OVERHEAD: u64 = 560;
/// Independent locks over the in-flight claims, so that requests for
/// different keys on different threads do not wait for each other.
const SHARDS: usize = 64;

/// An in-process [`Store`]: fast, but per process and forgotten on restart.
///
/// Completed records live in a [moka] cache bounded by total bytes (least
/// recently used records go first when it is full) and expire after their
/// retention. In-flight claims live apart, in a map the cache's eviction
/// cannot reach (a byte-bounded cache may evict a brand-new entry at once,
/// which would let a duplicate execute; 64 independently locked shards, so
/// that requests for different keys do not wait for each other), bounded by
/// a count: when it is full,
/// new claims fail with [`StoreErrorKind::CapacityExceeded`] and the layer
/// answers 503 rather than dropping a live claim. Waiters are woken when the
/// claim they wait on completes, is released or is taken over.
///
/// Time is read from tokio's clock, so tests may pause and advance it.
///
/// Behind a load balancer with several instances, each instance has its own
/// memory store and duplicates sent to different instances both execute: use
/// a shared store (Redis) there.
///
/// ```
/// use tower_idempotency::store::MemoryStore;
///
/// let store = MemoryStore::builder()
///     .max_bytes(16 * 1024 * 1024)
///     .max_in_flight(10_000)
///     .build();
/// # drop(store);
/// ```
///
/// [moka]: https://docs.rs/moka
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

type Hashing = super::key_hasher::StoreKeyHasherBuilder;

struct Inner {
    shards: Box<[Shard]>,
    /// Mixed into the shard choice, so that clients cannot aim keys at one.
    shard_seed: u64,
    /// Live entries across all shards, against `max_in_flight`.
    claims: AtomicUsize,
    completed: moka::sync::Cache<StoreKey, Completed, Hashing>,
    max_in_flight: usize,
    nonce_seed: u64,
}

/// One lock's share of the in-flight claims, on its own cache lines.
#[repr(align(128))]
struct Shard(Mutex<Claims>);

struct Claims {
    map: HashMap<StoreKey, InFlight, Hashing>,
    /// A key always maps to the same shard, so a per-shard counter gives
    /// every key fences that grow with each grant. Shard `i` issues fences
    /// equal to `i + 1` modulo `SHARDS`, so no two grants share a token,
    /// and never below the wall clock in µs times `SHARDS`
    /// ([`clock_fence`]), so a process that restarts with an empty store
    /// still hands out fences above those it handed out before.
    next_fence: u64,
    /// This shard's residue, `i + 1`.
    lane: u64,
}

struct InFlight {
    token: OwnerToken,
    /// What identifies the request, for an operator.
    label: KeptLabel,
    fingerprint: Fingerprint,
    deadline: Instant,
    /// Created by the first waiter; never sent on: dropping it (with the
    /// entry) wakes every waiter.
    gone: Option<watch::Sender<()>>,
}

/// Kept by value: moka already holds each value behind its own shared
/// pointer, and a clone of this is a copy and one reference count.
#[derive(Clone)]
struct Completed {
    record: CompletedRecord,
    /// What identifies the request, for an operator.
    label: KeptLabel,
    owner: OwnerToken,
    expires_at: Instant,
    retention: Duration,
}

struct RetentionExpiry;

impl moka::Expiry<StoreKey, Completed> for RetentionExpiry {
    fn expire_after_create(
        &self,
        _key: &StoreKey,
        value: &Completed,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.retention)
    }

    fn expire_after_update(
        &self,
        _key: &StoreKey,
        value: &Completed,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.retention)
    }
}

/// Configures a [`MemoryStore`].
#[derive(Debug, Clone)]
pub struct MemoryStoreBuilder {
    max_bytes: u64,
    max_in_flight: usize,
}

impl MemoryStoreBuilder {
    /// Bounds the heap that completed records take (default 64 MiB): each
    /// record is charged its stored length plus 560 bytes for the cache
    /// entry around it. A few just-evicted records may stay allocated a
    /// moment past the bound, which only large stored responses make
    /// noticeable: lower the layer's `stored_response_limit` if they matter.
    /// In-flight claims are bounded apart, by
    /// [`max_in_flight`](Self::max_in_flight).
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// Bounds the number of simultaneous in-flight claims (default 65 536).
    pub fn max_in_flight(mut self, claims: usize) -> Self {
        self.max_in_flight = claims;
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        let completed = moka::sync::Cache::builder()
            .max_capacity(self.max_bytes)
            .weigher(|_k: &StoreKey, v: &Completed| {
                let held = v.record.payload.len().saturating_add(v.label.len()) as u64;
                u32::try_from(held.saturating_add(RECORD_OVERHEAD)).unwrap_or(u32::MAX)
            })
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(RetentionExpiry)
            .build_with_hasher(Hashing::new());
        let hashing = Hashing::new();
        let shards = (0..SHARDS as u64)
            .map(|i| {
                Shard(Mutex::new(Claims {
                    map: HashMap::with_hasher(hashing),
                    next_fence: i + 1,
                    lane: i + 1,
                }))
            })
            .collect();
        let random = RandomState::new();
        MemoryStore {
            inner: Arc::new(Inner {
                shards,
                shard_seed: random.hash_one(1u8),
                claims: AtomicUsize::new(0),
                completed,
                max_in_flight: self.max_in_flight,
                nonce_seed: random.hash_one(0u8),
            }),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("in_flight", &self.in_flight_count())
            .field("max_in_flight", &self.inner.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// A store with the default bounds (64 MiB of records, 65 536 claims).
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Starts configuring a store.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            max_bytes: DEFAULT_MAX_BYTES,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }

    /// How many in-flight claims the store holds now (expired ones not yet
    /// swept included).
    pub fn in_flight_count(&self) -> usize {
        self.inner.shards.iter().map(|s| lock(s).map.len()).sum()
    }

    /// The approximate total weight of completed records, in bytes.
    pub fn completed_bytes(&self) -> u64 {
        self.inner.completed.run_pending_tasks();
        self.inner.completed.weighted_size()
    }

    /// Locks the shard that holds `key`'s claim.
    fn shard(&self, key: &StoreKey) -> MutexGuard<'_, Claims> {
        let bytes = key.as_bytes();
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[16..24]);
        // The hash tables use the first 16 digest bytes; the shard uses others.
        let mixed = u64::from_le_bytes(word) ^ self.inner.shard_seed;
        lock(&self.inner.shards[(mixed % SHARDS as u64) as usize])
    }

    /// Takes one of the `max_in_flight` places, if one is free.
    fn reserve_place(&self) -> bool {
        if self.inner.claims.fetch_add(1, Ordering::AcqRel) < self.inner.max_in_flight {
            return true;
        }
        self.inner.claims.fetch_sub(1, Ordering::AcqRel);
        false
    }

    /// Gives back the places of claims removed from their shard.
    fn free_places(&self, n: usize) {
        self.inner.claims.fetch_sub(n, Ordering::AcqRel);
    }

    /// Drops expired claims from every shard, one lock at a time.
    fn sweep_expired(&self, now: Instant) {
        for shard in self.inner.shards.iter() {
            let mut claims = lock(shard);
            let before = claims.map.len();
            claims.map.retain(|_, e| e.deadline > now);
            let removed = before - claims.map.len();
            drop(claims);
            self.free_places(removed);
        }
    }

    fn live_completed(&self, key: &StoreKey, now: Instant) -> Option<Completed> {
        self.inner.completed.get(key).filter(|c| c.expires_at > now)
    }

    fn claim_now(
        &self,
        key: StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
        label: &RequestLabel<'_>,
    ) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let mut swept = false;
        loop {
            let mut claims = self.shard(&key);
            let takeover = match claims.map.get(&key) {
                Some(entry) if entry.deadline > now => {
                    return Ok(Claim::InFlight {
                        fingerprint: entry.fingerprint,
                        fence: entry.token.fence(),
                    });
                }
                // An expired claim is taken over below: replacing the entry
                // drops its channel and wakes its waiters. It keeps its place.
                Some(_) => true,
                None => {
                    // `contains_key` first: in moka a `get` that misses is
                    // still recorded and later replayed into its bookkeeping,
                    // which a new key (most claims) need not pay for.
                    if self.inner.completed.contains_key(&key)
                        && let Some(done) = self.live_completed(&key, now)
                    {
                        return Ok(Claim::Completed(done.record.clone()));
                    }
                    false
                }
            };
            if !takeover && !self.reserve_place() {
                drop(claims);
                if swept {
                    return Err(StoreError::new(StoreErrorKind::CapacityExceeded, "claim"));
                }
                // Expired claims may be holding the places: sweep, then retry.
                self.sweep_expired(now);
                swept = true;
                continue;
            }
            let fence = claims.next_fence.max(clock_fence(claims.lane));
            claims.next_fence = fence.saturating_add(SHARDS as u64);
            let token = OwnerToken::new(fence, self.inner.nonce_seed ^ fence);
            let entry = InFlight {
                token,
                label: KeptLabel::of(label),
                fingerprint,
                deadline: deadline(now, lease),
                gone: None,
            };
            claims.map.insert(key, entry);
            return Ok(Claim::Acquired(token));
        }
    }
}

/// The smallest fence the clock allows shard `lane` now: the wall clock in
/// microseconds since 1970, times `SHARDS`, plus the lane. It stays below
/// 2^63 for millennia; a shard that grants more than one claim per
/// microsecond runs ahead of it by that much, which a restart never
/// outpaces.
fn clock_fence(lane: u64) -> u64 {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    micros.saturating_mul(SHARDS as u64).saturating_add(lane)
}

/// Locks a shard. No code panics while holding it; if one ever did, the map
/// is still consistent (every update is a single insert or remove).
fn lock(shard: &Shard) -> MutexGuard<'_, Claims> {
    shard.0.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Store for MemoryStore {
    async fn claim(
        &self,
        key: StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.claim_now(key, fingerprint, lease, &RequestLabel::default())
    }

    async fn claim_labelled(
        &self,
        key: StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
        label: &RequestLabel<'_>,
    ) -> Result<Claim, StoreError> {
        self.claim_now(key, fingerprint, lease, label)
    }

    async fn complete(
        &self,
        key: StoreKey,
        token: OwnerToken,
        record: CompletedRecord,
        retention: Duration,
    ) -> Result<LeaseStatus, StoreError> {
        let now = Instant::now();
        let mut claims = self.shard(&key);
        match claims.map.get(&key) {
            // After its lease too: nobody took the claim over, or its token
            // would differ (SPEC §5).
            Some(entry) if entry.token == token => {
                // The claim's label moves to the record.
                let label = claims
                    .map
                    .remove(&key)
                    .map(|claim| claim.label)
                    .unwrap_or_default();
                let done = Completed {
                    record,
                    label,
                    owner: token,
                    expires_at: deadline(now, retention),
                    retention,
                };
                // Inserted while the claim's shard is locked, so a concurrent
                // claim sees either the claim or the record, never neither.
                self.inner.completed.insert(key, done);
                drop(claims);
                self.free_places(1);
                Ok(LeaseStatus::Held)
            }
            Some(_) => Ok(LeaseStatus::Lost),
            None => Ok(match self.live_completed(&key, now) {
                Some(done) if done.owner == token => LeaseStatus::Held,
                _ => LeaseStatus::Lost,
            }),
        }
    }

    async fn release(&self, key: StoreKey, token: OwnerToken) -> Result<LeaseStatus, StoreError> {
        let now = Instant::now();
        let mut claims = self.shard(&key);
        match claims.map.get(&key) {
            Some(entry) if entry.token == token => {
                let live = entry.deadline > now;
                claims.map.remove(&key);
                drop(claims);
                self.free_places(1);
                Ok(if live {
                    LeaseStatus::Held
                } else {
                    LeaseStatus::Lost
                })
            }
            _ => Ok(LeaseStatus::Lost),
        }
    }

    async fn extend(
        &self,
        key: StoreKey,
        token: OwnerToken,
        lease: Duration,
    ) -> Result<LeaseStatus, StoreError> {
        let now = Instant::now();
        let mut claims = self.shard(&key);
        match claims.map.get_mut(&key) {
            Some(entry) if entry.token == token && entry.deadline > now => {
                entry.deadline = deadline(now, lease);
                Ok(LeaseStatus::Held)
            }
            _ => Ok(LeaseStatus::Lost),
        }
    }

    async fn wait(&self, key: StoreKey, fence: u64, timeout: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let (mut gone, until) = {
            let mut claims = self.shard(&key);
            match claims.map.get_mut(&key) {
                Some(entry) if entry.token.fence() == fence && entry.deadline > now => {
                    let gone = entry
                        .gone
                        .get_or_insert_with(|| watch::channel(()).0)
                        .subscribe();
                    (gone, entry.deadline.min(deadline(now, timeout)))
                }
                _ => return Ok(()),
            }
        };
        // `changed` fails once the sender is dropped with its entry.
        let _ = tokio::time::timeout_at(until, gone.changed()).await;
        Ok(())
    }

    async fn purge(&self, key: StoreKey) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut claims = self.shard(&key);
        let removed = claims.map.remove(&key);
        if removed.is_some() {
            self.free_places(1);
        }
        let had_claim = removed.is_some_and(|e| e.deadline > now);
        let had_record = self
            .inner
            .completed
            .remove(&key)
            .is_some_and(|c| c.expires_at > now);
        Ok(had_claim || had_record)
    }
}

mod admin;
#[cfg(test)]
mod tests;
