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

#[tokio::test(start_paused = true)]
async fn the_in_flight_bound_holds_across_shards_and_grants_never_share_a_token() {
    let store = MemoryStore::builder().max_in_flight(100).build();
    let mut tokens = std::collections::HashSet::new();
    let mut refused = 0;
    // 300 keys spread over every shard: exactly 100 are granted.
    for n in 0..300u16 {
        let key = StoreKey::from_parts(b"", &n.to_be_bytes());
        match store.claim(key, FP, LEASE).await {
            Ok(Claim::Acquired(t)) => assert!(tokens.insert(t), "token {t:?} reused"),
            Err(e) if e.kind() == StoreErrorKind::CapacityExceeded => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((tokens.len(), refused), (100, 200));
    assert_eq!(store.in_flight_count(), 100);
    // Completing and releasing give places back.
    let mut held: Vec<_> = Vec::new();
    for n in 0..300u16 {
        let key = StoreKey::from_parts(b"", &n.to_be_bytes());
        if let Ok(Claim::InFlight { .. }) = store.claim(key, FP, LEASE).await {
            held.push(key);
        }
    }
    assert_eq!(held.len(), 100);
    assert!(store.purge(held[0]).await.unwrap());
    let fresh = StoreKey::from_parts(b"", b"fresh");
    assert!(matches!(
        store.claim(fresh, FP, LEASE).await.unwrap(),
        Claim::Acquired(_)
    ));
    assert!(store.claim(key(250), FP, LEASE).await.is_err());
}

#[tokio::test]
async fn a_store_that_restarts_empty_grants_fences_above_every_earlier_one() {
    let k = key(1);
    let mut highest = 0;
    let before = MemoryStore::new();
    for _ in 0..5 {
        let Claim::Acquired(t) = before.claim(k, FP, LEASE).await.unwrap() else {
            panic!("the key is free")
        };
        assert!(t.fence() > highest);
        highest = t.fence();
        before.release(k, t).await.unwrap();
    }
    drop(before);
    // A process that restarts starts with an empty store.
    let after = MemoryStore::new();
    let Claim::Acquired(t) = after.claim(k, FP, LEASE).await.unwrap() else {
        panic!("the key is free")
    };
    assert!(
        t.fence() > highest,
        "fence {} after the restart is not above {highest}",
        t.fence()
    );
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

/// An operator's answer replaces a record only if the key still holds
/// the record that was read: its fence and its payload.
#[tokio::test]
async fn a_record_is_replaced_only_as_it_was_read() {
    use crate::store::admin::sealed::{Backend, Expected};

    let store = MemoryStore::new();
    let Claim::Acquired(token) = store.claim(key(1), FP, LEASE).await.unwrap() else {
        panic!("acquired");
    };
    store
        .complete(key(1), token, record(FP, b"first"), DAY)
        .await
        .unwrap();
    let was = Expected::Record(Bytes::from_static(b"first"));
    let other = Expected::Record(Bytes::from_static(b"other"));
    let answer = || Some(Bytes::from_static(b"answer"));
    let fence = token.fence();
    assert!(
        !store
            .replace(key(1), fence + 1, &was, answer())
            .await
            .unwrap()
    );
    assert!(
        !store
            .replace(key(1), fence, &other, answer())
            .await
            .unwrap()
    );
    assert!(
        !store
            .replace(key(1), fence, &Expected::UnknownClaim, answer())
            .await
            .unwrap()
    );
    assert!(!store.replace(key(2), fence, &was, answer()).await.unwrap());
    assert!(store.replace(key(1), fence, &was, answer()).await.unwrap());
    // What was read is gone: a second answer is refused.
    assert!(!store.replace(key(1), fence, &was, None).await.unwrap());
    match store.claim(key(1), FP, LEASE).await.unwrap() {
        Claim::Completed(done) => assert_eq!(&done.payload[..], b"answer"),
        other => panic!("{other:?}"),
    }
    let now = Expected::Record(Bytes::from_static(b"answer"));
    assert!(store.replace(key(1), fence, &now, None).await.unwrap());
    assert!(matches!(
        store.claim(key(1), FP, LEASE).await.unwrap(),
        Claim::Acquired(_)
    ));
}
