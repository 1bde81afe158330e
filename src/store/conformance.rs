//! The store contract as executable checks, for every [`Store`].
//!
//! Each function checks one part of the contract against a store and panics
//! (with a message naming the rule) when it is broken. They use real time
//! with generous margins (leases of a few hundred milliseconds), because
//! remote stores keep time on their own clock. Each check uses fresh random
//! keys, so all of them may share one store.
//!
//! Run them all as separate tests with [`store_conformance_tests!`]:
//!
//! ```
//! # // The macro expands to #[tokio::test] functions, so it goes at module level.
//! use tower_idempotency::store::MemoryStore;
//!
//! tower_idempotency::store_conformance_tests!(MemoryStore::new());
//! # fn main() {}
//! ```
//!
//! The expression is evaluated inside each async test, so it may `.await`
//! (to start a server, say). It may be a store, or any value implementing
//! [`Fixture`] (for example one that keeps a test server alive).
//!
//! [`store_conformance_tests!`]: crate::store_conformance_tests

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Claim, CompletedRecord, LeaseStatus, OwnerToken, Store};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::payload::{StoredOutcome, StoredResponse};

/// A lease short enough to expire within a test.
pub(crate) const SHORT_LEASE: Duration = Duration::from_millis(150);
/// Comfortably longer than [`SHORT_LEASE`].
pub(crate) const PAST_SHORT_LEASE: Duration = Duration::from_millis(450);
/// A lease no test outlives.
pub(crate) const LONG_LEASE: Duration = Duration::from_secs(60);
/// A retention no test outlives.
pub(crate) const LONG_RETENTION: Duration = Duration::from_secs(600);
/// How long a wake-up may take before a check calls it missed.
pub(crate) const WAKE_BOUND: Duration = Duration::from_secs(3);

/// What the conformance tests run against: a store, or something that owns one.
pub trait Fixture {
    /// The store under test.
    type Store: Store;
    /// The store.
    fn store(&self) -> &Self::Store;
}

impl<St: Store> Fixture for St {
    type Store = St;
    fn store(&self) -> &St {
        self
    }
}

/// Generates one `#[tokio::test]` per conformance check, each running
/// against the store (or [`Fixture`]) that `$make` evaluates to.
///
/// With `optional:`, `$make` evaluates to an `Option` of one, and `None`
/// skips the test (say why where you return it, e.g. "redis-server not
/// installed"):
///
/// ```ignore
/// tower_idempotency::store_conformance_tests!(optional: my_server_or_skip().await);
/// ```
///
/// Requires `tokio` with the `macros` and `rt-multi-thread` features in the
/// calling crate's dev-dependencies.
#[macro_export]
macro_rules! store_conformance_tests {
    (optional: $make:expr) => {
        $crate::store_conformance_tests!(@checks [optional] $make);
    };
    ($make:expr) => {
        $crate::store_conformance_tests!(@checks [required] $make);
    };
    (@checks [$mode:ident] $make:expr) => {
        $crate::store_conformance_tests!(@tests [$mode] $make;
            claim_is_exclusive_under_a_race,
            completed_records_are_replayed_exactly,
            complete_is_fenced_and_idempotent,
            expired_lease_is_taken_over_with_a_higher_fence,
            fences_never_go_backwards,
            extend_keeps_a_claim_alive,
            extend_never_resurrects_an_expired_claim,
            a_late_completion_is_kept_if_nobody_took_over,
            release_frees_the_key_for_its_owner_only,
            records_expire_after_retention,
            wait_wakes_on_completion,
            wait_wakes_on_release,
            wait_returns_at_once_when_the_claim_is_gone,
            wait_gives_up_after_its_timeout,
            purge_drops_claims_and_records,
            keys_are_independent,
        );
    };
    (@tests [required] $make:expr; $($check:ident),+ $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let fixture = $make;
                $crate::store::conformance::$check(
                    $crate::store::conformance::Fixture::store(&fixture),
                )
                .await;
            }
        )+
    };
    (@tests [optional] $make:expr; $($check:ident),+ $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let Some(fixture) = $make else { return };
                $crate::store::conformance::$check(
                    $crate::store::conformance::Fixture::store(&fixture),
                )
                .await;
            }
        )+
    };
}

mod wait;
pub use self::wait::{
    wait_gives_up_after_its_timeout, wait_returns_at_once_when_the_claim_is_gone,
    wait_wakes_on_completion, wait_wakes_on_release,
};

/// Runs every check in turn against one store.
pub async fn run_all<St: Store>(store: &St) {
    claim_is_exclusive_under_a_race(store).await;
    completed_records_are_replayed_exactly(store).await;
    complete_is_fenced_and_idempotent(store).await;
    expired_lease_is_taken_over_with_a_higher_fence(store).await;
    fences_never_go_backwards(store).await;
    extend_keeps_a_claim_alive(store).await;
    extend_never_resurrects_an_expired_claim(store).await;
    a_late_completion_is_kept_if_nobody_took_over(store).await;
    release_frees_the_key_for_its_owner_only(store).await;
    records_expire_after_retention(store).await;
    wait_wakes_on_completion(store).await;
    wait_wakes_on_release(store).await;
    wait_returns_at_once_when_the_claim_is_gone(store).await;
    wait_gives_up_after_its_timeout(store).await;
    purge_drops_claims_and_records(store).await;
    keys_are_independent(store).await;
}

pub(crate) fn fresh_key() -> StoreKey {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let salt = RandomState::new().hash_one(n);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_be_bytes());
    id[8..].copy_from_slice(&salt.to_be_bytes());
    StoreKey::from_parts(b"tower-idempotency-conformance", &id)
}

pub(crate) fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

pub(crate) fn record(fingerprint: Fingerprint, payload: &[u8]) -> CompletedRecord {
    CompletedRecord {
        fingerprint,
        payload: Bytes::copy_from_slice(payload),
    }
}

pub(crate) async fn acquire<St: Store>(
    store: &St,
    key: StoreKey,
    f: Fingerprint,
    lease: Duration,
) -> OwnerToken {
    match store.claim(key, f, lease).await {
        Ok(Claim::Acquired(token)) => token,
        other => panic!("claim of a free key must acquire it, got {other:?}"),
    }
}

pub(crate) async fn claim<St: Store>(store: &St, key: StoreKey, f: Fingerprint) -> Claim {
    match store.claim(key, f, LONG_LEASE).await {
        Ok(claim) => claim,
        Err(e) => panic!("claim failed: {e}"),
    }
}

pub(crate) async fn check(
    what: &str,
    fut: impl std::future::Future<Output = Result<LeaseStatus, super::StoreError>>,
) -> LeaseStatus {
    match fut.await {
        Ok(status) => status,
        Err(e) => panic!("{what} failed: {e}"),
    }
}

/// 64 tasks claim one key at once: exactly one acquires it, every other one
/// sees it in flight with the winner's fingerprint.
pub async fn claim_is_exclusive_under_a_race<St: Store>(store: &St) {
    for _round in 0..5 {
        let key = fresh_key();
        let barrier = Arc::new(tokio::sync::Barrier::new(64));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (store, barrier) = (store.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                store.claim(key, fp(1), LONG_LEASE).await
            }));
        }
        let mut acquired = 0;
        for task in tasks {
            match task.await.expect("claim task panicked") {
                Ok(Claim::Acquired(_)) => acquired += 1,
                Ok(Claim::InFlight { fingerprint, .. }) => assert_eq!(fingerprint, fp(1)),
                other => panic!("a raced claim must be acquired or in flight, got {other:?}"),
            }
        }
        assert_eq!(acquired, 1, "exactly one racer must acquire the key");
    }
}

/// A completed key reports its record exactly (binary payload, fingerprint),
/// to any claimant, whatever fingerprint it brings.
pub async fn completed_records_are_replayed_exactly<St: Store>(store: &St) {
    let key = fresh_key();
    let token = acquire(store, key, fp(1), LONG_LEASE).await;
    let mut headers = http::HeaderMap::new();
    headers.append("x-multi", http::HeaderValue::from_static("a"));
    headers.append("x-multi", http::HeaderValue::from_static("b"));
    headers.append(
        "x-bin",
        http::HeaderValue::from_bytes(&[0xfe, 0x80]).expect("valid value"),
    );
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let payload = StoredOutcome::Response(StoredResponse {
        status: http::StatusCode::CREATED,
        headers,
        body: Bytes::from_static(&[0, 159, 146, 150, 255, 0]),
        trailers: Some(trailers),
    })
    .encode();
    let rec = CompletedRecord {
        fingerprint: fp(1),
        payload: payload.clone(),
    };
    let status = check(
        "complete",
        store.complete(key, token, rec.clone(), LONG_RETENTION),
    )
    .await;
    assert_eq!(
        status,
        LeaseStatus::Held,
        "the owner's completion must be stored"
    );
    for f in [fp(1), fp(2)] {
        match claim(store, key, f).await {
            Claim::Completed(got) => {
                assert_eq!(got, rec, "the record must come back byte for byte");
                let decoded = StoredOutcome::decode(&got.payload).expect("the payload decodes");
                assert_eq!(decoded.encode(), payload);
            }
            other => panic!("a completed key must report its record, got {other:?}"),
        }
    }
}

/// Only the owner's token completes a key; repeating the owner's completion
/// is harmless and keeps the first record.
pub async fn complete_is_fenced_and_idempotent<St: Store>(store: &St) {
    let key = fresh_key();
    let token = acquire(store, key, fp(1), LONG_LEASE).await;
    let stranger = OwnerToken::new(
        token.fence().wrapping_add(1_000_000),
        token.nonce() ^ 0x5555,
    );
    let status = check(
        "complete",
        store.complete(key, stranger, record(fp(1), b"forged"), LONG_RETENTION),
    )
    .await;
    assert_eq!(
        status,
        LeaseStatus::Lost,
        "a foreign token must not complete the key"
    );
    assert!(
        matches!(claim(store, key, fp(1)).await, Claim::InFlight { .. }),
        "the claim must survive"
    );

    let status = check(
        "complete",
        store.complete(key, token, record(fp(1), b"first"), LONG_RETENTION),
    )
    .await;
    assert_eq!(status, LeaseStatus::Held);
    let again = check(
        "complete",
        store.complete(key, token, record(fp(1), b"first"), LONG_RETENTION),
    )
    .await;
    assert_eq!(
        again,
        LeaseStatus::Held,
        "repeating the owner's completion must succeed"
    );
    let forged = check(
        "complete",
        store.complete(key, stranger, record(fp(1), b"forged"), LONG_RETENTION),
    )
    .await;
    assert_eq!(forged, LeaseStatus::Lost);
    match claim(store, key, fp(1)).await {
        Claim::Completed(got) => assert_eq!(got.payload, Bytes::from_static(b"first")),
        other => panic!("expected the completed record, got {other:?}"),
    }
}

/// After a lease expires, a new claimant takes over with a higher fence, and
/// the stale owner can no longer complete, extend or release: the newer
/// result is the one kept.
pub async fn expired_lease_is_taken_over_with_a_higher_fence<St: Store>(store: &St) {
    let key = fresh_key();
    let stale = acquire(store, key, fp(1), SHORT_LEASE).await;
    tokio::time::sleep(PAST_SHORT_LEASE).await;
    let fresh = acquire(store, key, fp(1), LONG_LEASE).await;
    assert!(
        fresh.fence() > stale.fence(),
        "fences must grow across a takeover"
    );
    assert_ne!(fresh, stale);

    let s = check(
        "complete",
        store.complete(key, stale, record(fp(1), b"stale"), LONG_RETENTION),
    )
    .await;
    assert_eq!(s, LeaseStatus::Lost, "a stale owner must not complete");
    let s = check("extend", store.extend(key, stale, LONG_LEASE)).await;
    assert_eq!(s, LeaseStatus::Lost, "a stale owner must not extend");
    let s = check("release", store.release(key, stale)).await;
    assert_eq!(s, LeaseStatus::Lost, "a stale owner must not release");
    assert!(
        matches!(claim(store, key, fp(1)).await, Claim::InFlight { fence, .. } if fence == fresh.fence()),
        "the new owner's claim must be intact"
    );
    let s = check(
        "complete",
        store.complete(key, fresh, record(fp(1), b"fresh"), LONG_RETENTION),
    )
    .await;
    assert_eq!(s, LeaseStatus::Held);
    let s = check(
        "complete",
        store.complete(key, stale, record(fp(1), b"stale"), LONG_RETENTION),
    )
    .await;
    assert_eq!(s, LeaseStatus::Lost);
    match claim(store, key, fp(1)).await {
        Claim::Completed(got) => assert_eq!(got.payload, Bytes::from_static(b"fresh")),
        other => panic!("expected the new owner's record, got {other:?}"),
    }
}

/// Fences never go backwards for a key: not across takeovers, not after a
/// release, and not after the key was purged (or, for a store that keeps
/// fences in its entries, after an entry expired), so a downstream that
/// rejects lower fences never refuses the rightful owner.
pub async fn fences_never_go_backwards<St: Store>(store: &St) {
    let key = fresh_key();
    let mut highest = 0;
    let mut grant = |token: OwnerToken, what: &str| {
        assert!(
            token.fence() > highest,
            "fence {} after {what} is not above {highest}",
            token.fence()
        );
        highest = token.fence();
    };
    let mut token = acquire(store, key, fp(1), SHORT_LEASE).await;
    grant(token, "a first claim");
    for _ in 0..3 {
        tokio::time::sleep(PAST_SHORT_LEASE).await;
        token = acquire(store, key, fp(1), SHORT_LEASE).await;
        grant(token, "a takeover");
    }
    assert_eq!(
        check("release", store.release(key, token)).await,
        LeaseStatus::Held
    );
    let token = acquire(store, key, fp(1), LONG_LEASE).await;
    grant(token, "a release");
    let s = check(
        "complete",
        store.complete(key, token, record(fp(1), b"done"), LONG_RETENTION),
    )
    .await;
    assert_eq!(s, LeaseStatus::Held);
    assert!(store.purge(key).await.expect("purge failed"));
    grant(acquire(store, key, fp(1), LONG_LEASE).await, "a purge");
    assert!(store.purge(key).await.expect("purge failed"));
    grant(acquire(store, key, fp(2), LONG_LEASE).await, "a purge");
}

/// Renewing a lease keeps the claim past its original end.
pub async fn extend_keeps_a_claim_alive<St: Store>(store: &St) {
    let key = fresh_key();
    let lease = Duration::from_millis(1000);
    let token = acquire(store, key, fp(1), lease).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1800) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = check("extend", store.extend(key, token, lease)).await;
        assert_eq!(s, LeaseStatus::Held, "a renewed claim must stay held");
    }
    assert!(
        matches!(claim(store, key, fp(1)).await, Claim::InFlight { .. }),
        "the renewed claim must be live"
    );
    let s = check(
        "complete",
        store.complete(key, token, record(fp(1), b"ok"), LONG_RETENTION),
    )
    .await;
    assert_eq!(s, LeaseStatus::Held);
}

/// An expired claim stays expired: extending it fails and does not bring it back.
pub async fn extend_never_resurrects_an_expired_claim<St: Store>(store: &St) {
    let key = fresh_key();
    let token = acquire(store, key, fp(1), SHORT_LEASE).await;
    tokio::time::sleep(PAST_SHORT_LEASE).await;
    let s = check("extend", store.extend(key, token, LONG_LEASE)).await;
    assert_eq!(s, LeaseStatus::Lost, "an expired lease must not be renewed");
    let next = acquire(store, key, fp(1), LONG_LEASE).await;
    assert!(next.fence() > token.fence());
}

/// A completion by the owner the claim still names is kept after its
/// lease ran out, as long as nobody took the key over: no other execution
/// exists, so its answer is better stored than lost. Renewing stays
/// refused (the lease is not brought back), and a takeover still wins.
pub async fn a_late_completion_is_kept_if_nobody_took_over<St: Store>(store: &St) {
    let key = fresh_key();
    let token = acquire(store, key, fp(1), SHORT_LEASE).await;
    tokio::time::sleep(PAST_SHORT_LEASE).await;
    let s = check("extend", store.extend(key, token, LONG_LEASE)).await;
    assert_eq!(s, LeaseStatus::Lost, "an expired lease must not be renewed");
    let s = check(
        "complete",
        store.complete(key, token, record(fp(1), b"late"), LONG_RETENTION),
    )
    .await;
    assert_eq!(
        s,
        LeaseStatus::Held,
        "nobody took the key over: the late answer is kept"
    );
    match claim(store, key, fp(1)).await {
        Claim::Completed(got) => assert_eq!(got.payload, Bytes::from_static(b"late")),
        other => panic!("expected the late record, got {other:?}"),
    }
    // Completing again is confirmed (a retried completion whose reply was
    // lost), and changes nothing.
    let s = check(
        "complete",
        store.complete(key, token, record(fp(1), b"again"), LONG_RETENTION),
    )
    .await;
    assert_eq!(s, LeaseStatus::Held);
    match claim(store, key, fp(1)).await {
        Claim::Completed(got) => assert_eq!(got.payload, Bytes::from_static(b"late")),
        other => panic!("expected the late record, got {other:?}"),
    }
}

/// The owner's release frees the key; a stranger's does nothing.
pub async fn release_frees_the_key_for_its_owner_only<St: Store>(store: &St) {
    let key = fresh_key();
    let token = acquire(store, key, fp(1), LONG_LEASE).await;
    let stranger = OwnerToken::new(
        token.fence().wrapping_add(1_000_000),
        token.nonce() ^ 0x5555,
    );
    assert_eq!(
        check("release", store.release(key, stranger)).await,
        LeaseStatus::Lost
    );
    assert!(
        matches!(claim(store, key, fp(1)).await, Claim::InFlight { .. }),
        "a stranger's release must not free the key"
    );
    assert_eq!(
        check("release", store.release(key, token)).await,
        LeaseStatus::Held
    );
    let next = acquire(store, key, fp(2), LONG_LEASE).await;
    assert!(
        next.fence() > token.fence(),
        "fences must grow after a release"
    );
    assert_eq!(
        check("release", store.release(key, token)).await,
        LeaseStatus::Lost
    );
}

/// A completed record is forgotten after its retention.
pub async fn records_expire_after_retention<St: Store>(store: &St) {
    let key = fresh_key();
    let token = acquire(store, key, fp(1), LONG_LEASE).await;
    let retention = Duration::from_millis(200);
    let s = check(
        "complete",
        store.complete(key, token, record(fp(1), b"r"), retention),
    )
    .await;
    assert_eq!(s, LeaseStatus::Held);
    assert!(
        matches!(claim(store, key, fp(1)).await, Claim::Completed(_)),
        "the record must be there before retention ends"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    acquire(store, key, fp(1), LONG_LEASE).await;
}

/// Purge drops a claim or a record, and says whether there was one.
pub async fn purge_drops_claims_and_records<St: Store>(store: &St) {
    let key = fresh_key();
    assert!(
        !store.purge(key).await.expect("purge failed"),
        "an empty key has nothing to purge"
    );
    let token = acquire(store, key, fp(1), LONG_LEASE).await;
    let s = check(
        "complete",
        store.complete(key, token, record(fp(1), b"x"), LONG_RETENTION),
    )
    .await;
    assert_eq!(s, LeaseStatus::Held);
    assert!(store.purge(key).await.expect("purge failed"));
    let next = acquire(store, key, fp(2), LONG_LEASE).await;
    assert!(store.purge(key).await.expect("purge failed"));
    let s = check(
        "complete",
        store.complete(key, next, record(fp(2), b"y"), LONG_RETENTION),
    )
    .await;
    assert_eq!(s, LeaseStatus::Lost, "a purged claim must not complete");
    acquire(store, key, fp(3), LONG_LEASE).await;
}

/// Operations on one key never touch another.
pub async fn keys_are_independent<St: Store>(store: &St) {
    let (a, b) = (fresh_key(), fresh_key());
    let ta = acquire(store, a, fp(1), LONG_LEASE).await;
    let tb = acquire(store, b, fp(1), LONG_LEASE).await;
    let s = check(
        "complete",
        store.complete(a, ta, record(fp(1), b"a"), LONG_RETENTION),
    )
    .await;
    assert_eq!(s, LeaseStatus::Held);
    assert!(matches!(
        claim(store, b, fp(1)).await,
        Claim::InFlight { .. }
    ));
    assert_eq!(
        check("release", store.release(b, tb)).await,
        LeaseStatus::Held
    );
    assert!(matches!(claim(store, a, fp(1)).await, Claim::Completed(_)));
}
