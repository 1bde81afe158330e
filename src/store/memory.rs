//! [`MemoryStore`]: the in-process store.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use moka::policy::EvictionPolicy;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Claim, CompletedRecord, LeaseStatus, OwnerToken, Store, StoreError, StoreErrorKind};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;

/// Default bound on the bytes of completed records: 64 MiB.
const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Default bound on simultaneous in-flight claims.
const DEFAULT_MAX_IN_FLIGHT: usize = 65_536;
/// Bytes charged per completed record on top of its payload.
const RECORD_OVERHEAD: u64 = 160;

/// An in-process [`Store`]: fast, but per process and lost on restart.
///
/// Completed records live in a [moka] cache bounded by total bytes (least
/// recently used records go first when it is full) and expire after their
/// retention. In-flight claims live apart, in a map the cache's eviction
/// cannot reach (a byte-bounded cache may evict a brand-new entry at once,
/// which would let a duplicate execute), bounded by a count: when it is full,
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

type Hashing = crate::key::StoreKeyHasherBuilder;

struct Inner {
    in_flight: Mutex<HashMap<StoreKey, InFlight, Hashing>>,
    completed: moka::sync::Cache<StoreKey, Arc<Completed>, Hashing>,
    max_in_flight: usize,
    next_fence: AtomicU64,
    nonce_seed: u64,
}

struct InFlight {
    token: OwnerToken,
    fingerprint: Fingerprint,
    deadline: Instant,
    /// Created by the first waiter; never sent on: dropping it (with the
    /// entry) wakes every waiter.
    gone: Option<watch::Sender<()>>,
}

struct Completed {
    record: CompletedRecord,
    owner: OwnerToken,
    expires_at: Instant,
    retention: Duration,
}

struct RetentionExpiry;

impl moka::Expiry<StoreKey, Arc<Completed>> for RetentionExpiry {
    fn expire_after_create(
        &self,
        _key: &StoreKey,
        value: &Arc<Completed>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.retention)
    }

    fn expire_after_update(
        &self,
        _key: &StoreKey,
        value: &Arc<Completed>,
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
    /// Bounds the total size of completed records (default 64 MiB).
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
            .weigher(|_k: &StoreKey, v: &Arc<Completed>| {
                u32::try_from(v.record.payload.len() as u64 + RECORD_OVERHEAD).unwrap_or(u32::MAX)
            })
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(RetentionExpiry)
            .build_with_hasher(Hashing::new());
        MemoryStore {
            inner: Arc::new(Inner {
                in_flight: Mutex::new(HashMap::with_hasher(Hashing::new())),
                completed,
                max_in_flight: self.max_in_flight,
                next_fence: AtomicU64::new(1),
                nonce_seed: RandomState::new().hash_one(0u8),
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
        self.lock().len()
    }

    /// The approximate total weight of completed records, in bytes.
    pub fn completed_bytes(&self) -> u64 {
        self.inner.completed.run_pending_tasks();
        self.inner.completed.weighted_size()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<StoreKey, InFlight, Hashing>> {
        // No code panics while holding the lock; if one ever did, the map is
        // still consistent (every update is a single insert or remove).
        self.inner
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn live_completed(&self, key: &StoreKey, now: Instant) -> Option<Arc<Completed>> {
        self.inner.completed.get(key).filter(|c| c.expires_at > now)
    }

    fn claim_now(
        &self,
        key: StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let mut map = self.lock();
        match map.get(&key) {
            Some(entry) if entry.deadline > now => {
                return Ok(Claim::InFlight {
                    fingerprint: entry.fingerprint,
                    fence: entry.token.fence(),
                });
            }
            // An expired claim is taken over below: replacing the entry drops
            // its channel and wakes its waiters.
            Some(_) => {}
            None => {
                if let Some(done) = self.live_completed(&key, now) {
                    return Ok(Claim::Completed(done.record.clone()));
                }
                if map.len() >= self.inner.max_in_flight {
                    map.retain(|_, e| e.deadline > now);
                    if map.len() >= self.inner.max_in_flight {
                        return Err(StoreError::new(StoreErrorKind::CapacityExceeded, "claim"));
                    }
                }
            }
        }
        let fence = self.inner.next_fence.fetch_add(1, Ordering::Relaxed);
        let token = OwnerToken::new(fence, self.inner.nonce_seed ^ fence);
        let entry = InFlight {
            token,
            fingerprint,
            deadline: now + lease,
            gone: None,
        };
        map.insert(key, entry);
        Ok(Claim::Acquired(token))
    }
}

impl Store for MemoryStore {
    async fn claim(
        &self,
        key: StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.claim_now(key, fingerprint, lease)
    }

    async fn complete(
        &self,
        key: StoreKey,
        token: OwnerToken,
        record: CompletedRecord,
        retention: Duration,
    ) -> Result<LeaseStatus, StoreError> {
        let now = Instant::now();
        let mut map = self.lock();
        match map.get(&key) {
            Some(entry) if entry.token == token && entry.deadline > now => {
                let done = Completed {
                    record,
                    owner: token,
                    expires_at: now + retention,
                    retention,
                };
                // Inserted while the claim map is locked, so a concurrent
                // claim sees either the claim or the record, never neither.
                self.inner.completed.insert(key, Arc::new(done));
                map.remove(&key);
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
        let mut map = self.lock();
        match map.get(&key) {
            Some(entry) if entry.token == token => {
                let live = entry.deadline > now;
                map.remove(&key);
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
        let mut map = self.lock();
        match map.get_mut(&key) {
            Some(entry) if entry.token == token && entry.deadline > now => {
                entry.deadline = now + lease;
                Ok(LeaseStatus::Held)
            }
            _ => Ok(LeaseStatus::Lost),
        }
    }

    async fn wait(&self, key: StoreKey, fence: u64, timeout: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let (mut gone, until) = {
            let mut map = self.lock();
            match map.get_mut(&key) {
                Some(entry) if entry.token.fence() == fence && entry.deadline > now => {
                    let gone = entry
                        .gone
                        .get_or_insert_with(|| watch::channel(()).0)
                        .subscribe();
                    (gone, entry.deadline.min(now + timeout))
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
        let mut map = self.lock();
        let had_claim = map.remove(&key).is_some_and(|e| e.deadline > now);
        let had_record = self
            .inner
            .completed
            .remove(&key)
            .is_some_and(|c| c.expires_at > now);
        Ok(had_claim || had_record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn key(n: u8) -> StoreKey {
        StoreKey::from_parts(b"", &[n])
    }

    fn record(fp: Fingerprint, body: &'static [u8]) -> CompletedRecord {
        CompletedRecord {
            fingerprint: fp,
            payload: Bytes::from_static(body),
        }
    }

    const FP: Fingerprint = Fingerprint::from_bytes([7; 32]);
    const LEASE: Duration = Duration::from_secs(30);
    const DAY: Duration = Duration::from_secs(86_400);

    #[tokio::test(start_paused = true)]
    async fn in_flight_bound_refuses_new_claims_and_never_drops_live_ones() {
        let store = MemoryStore::builder().max_in_flight(3).build();
        for n in 0..3 {
            assert!(matches!(
                store.claim(key(n), FP, LEASE).await.unwrap(),
                Claim::Acquired(_)
            ));
        }
        let err = store.claim(key(9), FP, LEASE).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::CapacityExceeded);
        for n in 0..3 {
            assert!(matches!(
                store.claim(key(n), FP, LEASE).await.unwrap(),
                Claim::InFlight { .. }
            ));
        }
        // Expired claims make room again.
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        assert!(matches!(
            store.claim(key(9), FP, LEASE).await.unwrap(),
            Claim::Acquired(_)
        ));
    }

    #[tokio::test]
    async fn a_new_claim_survives_a_full_hot_cache() {
        // The cache is tiny and full of hot records; claims do not live in it.
        let store = MemoryStore::builder().max_bytes(2_000).build();
        for n in 0..50u8 {
            let Claim::Acquired(t) = store.claim(key(n), FP, LEASE).await.unwrap() else {
                panic!()
            };
            store
                .complete(key(n), t, record(FP, b"x"), DAY)
                .await
                .unwrap();
            for _ in 0..5 {
                let _ = store.claim(key(n), FP, LEASE).await.unwrap();
            }
        }
        store.inner.completed.run_pending_tasks();
        let k = key(200);
        let mut acquired = 0;
        for _ in 0..32 {
            if let Claim::Acquired(_) = store.claim(k, FP, LEASE).await.unwrap() {
                acquired += 1;
            }
            store.inner.completed.run_pending_tasks();
        }
        assert_eq!(acquired, 1);
        assert!(store.completed_bytes() <= 2_000);
    }
}
