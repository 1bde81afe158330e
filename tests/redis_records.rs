//! `RedisStore`'s entries on a real `redis-server`: fences across a restart
//! that kept nothing, entries of the earlier format, damaged entries
//! (refused untouched, purged), and the fence memory of a renewed claim.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::redis_server::redis_or_skip;
use common::redis_store::*;
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::{
    Claim, CompletedRecord, LeaseStatus, OwnerToken, RedisStore, Store, StoreErrorKind,
};

/// A Redis that restarts empty forgets every fence; the next grant's fence
/// must still be above every fence handed out before, so a downstream that
/// rejects lower fences accepts the rightful owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_restarts_empty_a_claim_gets_a_fence_above_every_earlier_one() {
    let Some(mut server) = redis_or_skip("fence_after_restart") else {
        return;
    };
    let store = store_for(&server).await;
    let key = StoreKey::from_parts(b"", b"fenced");
    let fp = Fingerprint::of_bytes(b"x");
    let mut highest = 0;
    for _ in 0..5 {
        let Ok(Claim::Acquired(token)) = store.claim(key, fp, Duration::from_secs(30)).await else {
            panic!("the key is free");
        };
        assert!(token.fence() > highest);
        highest = token.fence();
        store.release(key, token).await.unwrap();
    }
    server.restart();
    let restarted = std::time::Instant::now();
    let token = loop {
        match store.claim(key, fp, Duration::from_secs(30)).await {
            Ok(Claim::Acquired(token)) => break token,
            Ok(other) => panic!("the restarted Redis is empty, got {other:?}"),
            // The connection manager reconnects after the restart.
            Err(e) => {
                assert!(restarted.elapsed() < Duration::from_secs(10), "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(
        token.fence() > highest,
        "fence {} after the restart is not above {highest}",
        token.fence()
    );
}

/// The Redis server's clock in ms.
async fn server_ms(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    secs * 1000 + micros / 1000
}

/// Writes an entry the way earlier versions of the crate did (format 1: a
/// hash per key).
async fn write_format_1(
    conn: &mut redis::aio::MultiplexedConnection,
    name: &str,
    state: &str,
    fence: u64,
    deadline_ms: u64,
    payload: &[u8],
) {
    let _: i64 = redis::cmd("HSET")
        .arg(name)
        .arg("v")
        .arg("1")
        .arg("st")
        .arg(state)
        .arg("fence")
        .arg(fence)
        .arg("nonce")
        .arg("5")
        .arg("fp")
        .arg(&Fingerprint::of_bytes(b"x").as_bytes()[..])
        .arg("dl")
        .arg(deadline_ms)
        .arg("w")
        .arg("0")
        .arg("pl")
        .arg(payload)
        .query_async(conn)
        .await
        .unwrap();
}

/// Entries written by an earlier version (format 1) are still read: a
/// completed one is replayed, a claim in flight is waited for (its waiter
/// flag set in the hash, so that its owner publishes), an expired one is
/// taken over with a higher fence. Nothing this version does completes,
/// releases or extends a format-1 claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_the_earlier_format_are_still_read() {
    let Some(server) = redis_or_skip("format_1") else {
        return;
    };
    let store = store_for(&server).await;
    let mut conn = server.conn().await;
    let fp = Fingerprint::of_bytes(b"x");
    let lease = Duration::from_secs(30);
    let now = server_ms(&mut conn).await;

    let done = StoreKey::from_parts(b"", b"v1-done");
    write_format_1(&mut conn, &store.key_name(done), "d", 17, now, b"stored").await;
    match store.claim(done, fp, lease).await {
        Ok(Claim::Completed(record)) => {
            assert_eq!(record.fingerprint, fp);
            assert_eq!(&record.payload[..], b"stored");
        }
        other => panic!("expected the stored record, got {other:?}"),
    }

    let live = StoreKey::from_parts(b"", b"v1-live");
    let name = store.key_name(live);
    write_format_1(&mut conn, &name, "i", 23, now + 30_000, b"").await;
    assert!(matches!(
        store.claim(live, fp, lease).await,
        Ok(Claim::InFlight { fence: 23, fingerprint }) if fingerprint == fp
    ));
    store
        .wait(live, 23, Duration::from_millis(20))
        .await
        .unwrap();
    let waited: String = redis::cmd("HGET")
        .arg(&name)
        .arg("w")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        waited, "1",
        "the format-1 owner must publish its completion"
    );
    let stranger = OwnerToken::new(23, 5);
    let record = CompletedRecord {
        fingerprint: fp,
        payload: Bytes::from_static(b"mine"),
    };
    let retention = Duration::from_secs(60);
    let lost = [
        store
            .complete(live, stranger, record.clone(), retention)
            .await,
        store.extend(live, stranger, lease).await,
        store.release(live, stranger).await,
    ];
    assert!(
        lost.iter().all(|s| matches!(s, Ok(LeaseStatus::Lost))),
        "{lost:?}"
    );

    let expired = StoreKey::from_parts(b"", b"v1-expired");
    let name = store.key_name(expired);
    write_format_1(&mut conn, &name, "i", 29, now - 1, b"").await;
    let Ok(Claim::Acquired(token)) = store.claim(expired, fp, lease).await else {
        panic!("an expired format-1 claim must be taken over");
    };
    assert!(token.fence() > 29);
    let kind: String = redis::cmd("TYPE")
        .arg(&name)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kind, "string", "the takeover writes the current format");
    assert!(matches!(
        store.complete(expired, token, record, retention).await,
        Ok(LeaseStatus::Held)
    ));
    assert!(matches!(
        store.claim(expired, fp, lease).await,
        Ok(Claim::Completed(r)) if &r.payload[..] == b"mine"
    ));
}

/// A value the store did not write (not an entry, an entry cut short, an
/// unknown state, a key of another type) is reported as corrupt and left
/// as it was: no script writes before it has validated what it read. An
/// operator's purge drops it, and the key works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_records_are_refused_untouched_and_purge_drops_them() {
    let Some(server) = redis_or_skip("damaged_records") else {
        return;
    };
    let store = store_for(&server).await;
    let mut conn = server.conn().await;
    let fp = Fingerprint::of_bytes(b"x");
    let lease = Duration::from_secs(30);
    let mut cut = b"2d0".to_vec();
    cut.extend_from_slice(&[b'0'; 40]);
    let mut unknown_state = b"2x0".to_vec();
    unknown_state.extend_from_slice(&[b'0'; 70]);
    let mut unreadable_lease = b"2i0".to_vec();
    unreadable_lease.extend_from_slice(&[b'0'; 56]);
    unreadable_lease.extend_from_slice(b"soon");
    let strings: [(&str, &[u8]); 4] = [
        ("not an entry", b"hello"),
        ("cut short", &cut),
        ("unknown state", &unknown_state),
        ("unreadable lease", &unreadable_lease),
    ];
    for (what, value) in strings {
        let key = StoreKey::from_parts(b"", what.as_bytes());
        let name = store.key_name(key);
        let _: () = redis::cmd("SET")
            .arg(&name)
            .arg(value)
            .query_async(&mut conn)
            .await
            .unwrap();
        let err = store.claim(key, fp, lease).await.expect_err(what);
        assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{what}: {err}");
        let kept: Vec<u8> = redis::cmd("GET")
            .arg(&name)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(kept, value, "{what}: the claim wrote over it");
        assert!(store.purge(key).await.unwrap(), "{what}: purge drops it");
        assert!(
            matches!(store.claim(key, fp, lease).await, Ok(Claim::Acquired(_))),
            "{what}"
        );
    }
    let key = StoreKey::from_parts(b"", b"a list");
    let name = store.key_name(key);
    let _: i64 = redis::cmd("RPUSH")
        .arg(&name)
        .arg("a")
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = store.claim(key, fp, lease).await.expect_err("a list");
    assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{err}");
    assert!(store.purge(key).await.unwrap());
    assert!(matches!(
        store.claim(key, fp, lease).await,
        Ok(Claim::Acquired(_))
    ));
}

/// `fence_memory` means the same as on PostgreSQL: the entry of a claim
/// outlives its lease by the fence memory, renewals included. Each renewal
/// moves the entry's life past the new lease; before, a claim renewed for
/// longer than a lease plus the fence memory kept only its lease (the key's
/// time to live fell to the lease), so its entry went with its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_claim_outlives_its_lease_by_the_fence_memory() {
    let Some(server) = redis_or_skip("fence_memory_after_renewals") else {
        return;
    };
    let keep = Duration::from_secs(1);
    let lease = Duration::from_millis(600);
    let store = RedisStore::builder(&server.url())
        .unwrap()
        .fence_memory(keep)
        .build()
        .await
        .unwrap();
    let key = StoreKey::from_parts(b"", b"renewed");
    let fp = Fingerprint::of_bytes(b"x");
    let Ok(Claim::Acquired(token)) = store.claim(key, fp, lease).await else {
        panic!("the key is free");
    };
    // Renewed past the entry's first life (a lease plus the fence memory).
    let started = std::time::Instant::now();
    while started.elapsed() < lease + keep + lease {
        tokio::time::sleep(lease / 4).await;
        assert_eq!(
            store.extend(key, token, lease).await.unwrap(),
            LeaseStatus::Held
        );
    }
    let ttl: i64 = redis::cmd("PTTL")
        .arg(store.key_name(key))
        .query_async(&mut server.conn().await)
        .await
        .unwrap();
    assert!(
        ttl > 1_000,
        "the entry outlives the renewed lease by less than the fence memory: {ttl} ms left"
    );
}
