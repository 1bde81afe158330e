//! `PostgresStore` through the outages only PostgreSQL has: a statement
//! that cannot finish (a row lock held for ever), a statement whose
//! operation timed out (it stops on the server too), and late claims behind
//! a slow network with their releases on other pooled connections. The
//! outages both remote stores share (killed, frozen, connections dropped,
//! half-open, black-holed or slow, orphans) are one suite, in `outages.rs`.

mod common;

use std::time::Duration;

use common::postgres::{FP, LEASE, PrivatePostgres, connect, pg_fixture};
use http::StatusCode;
use tower::Layer;
use tower_idempotency::IdempotencyLayer;
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::postgres::DEFAULT_TABLE;
use tower_idempotency::store::{Claim, PostgresStore, PostgresStoreBuilder, Store, StoreErrorKind};

/// A store on a private server, with a short timeout.
async fn private_store(server: &PrivatePostgres) -> PostgresStore {
    let store = PostgresStore::builder(&server.url())
        .unwrap()
        .operation_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    store.migrate().await.expect("migrate");
    store
}

/// A fault proxy in front of `server`, and a store's builder connecting
/// through it (no cleanup task).
async fn through_proxy(
    server: &PrivatePostgres,
) -> (common::fault_proxy::FaultProxy, PostgresStoreBuilder) {
    let proxy = common::fault_proxy::FaultProxy::start(([127, 0, 0, 1], server.port).into())
        .await
        .unwrap();
    let builder = PostgresStore::builder(&format!("postgres://postgres@{}/postgres", proxy.addr()))
        .unwrap()
        .cleanup_every(None);
    (proxy, builder)
}

/// A statement that cannot finish (its row locked by another transaction
/// that does not end) fails as a timeout within the operation timeout, and
/// the layer answers 503 with `Retry-After`, never an execution. With a
/// pool of one connection, an operation on another key is served: the
/// blocked statement stopped on the server too (before, it waited behind
/// the blocked one and failed the same way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_that_cannot_finish_times_out_and_the_layer_fails_closed() {
    let Some(fixture) = pg_fixture("statement timeout").await else {
        return;
    };
    let store = PostgresStore::builder(&fixture.db.url)
        .unwrap()
        .operation_timeout(Duration::from_millis(300))
        .pool_size(1)
        .build()
        .unwrap();
    let key = StoreKey::new(
        &tower_idempotency::Scope::global(),
        &tower_idempotency::IdempotencyKey::parse(b"locked").unwrap(),
    );
    let Ok(Claim::Acquired(_)) = store.claim(key, FP, Duration::from_millis(50)).await else {
        panic!("acquired");
    };
    // Past its 50 ms lease, so that the next claim is a takeover.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Another session holds the row's lock: a takeover must wait for it.
    let (mut locker, locker_pid) = session_with_pid(&fixture.db.url).await;
    let tx = locker.transaction().await.unwrap();
    tx.execute(
        &format!("SELECT 1 FROM {DEFAULT_TABLE} WHERE key = $1 FOR UPDATE"),
        &[&key.as_bytes().as_slice()],
    )
    .await
    .unwrap();
    let ledger = common::Ledger::new();
    let svc = IdempotencyLayer::new(store.clone()).layer(ledger.service());
    for _ in 0..2 {
        let started = std::time::Instant::now();
        let refused = common::send(
            &svc,
            http::Request::post("/pay")
                .header("idempotency-key", "locked")
                .body(axum::body::Body::from("x"))
                .unwrap(),
        )
        .await;
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(refused.headers.contains_key("retry-after"));
        assert!(started.elapsed() < Duration::from_secs(2), "bounded");
    }
    // The blocked statements are cancelled by the server (their
    // `statement_timeout`), so the pool's one connection is free again for
    // a key that is not locked.
    until_no_statement_runs(&fixture.db.url, locker_pid, Duration::from_secs(3)).await;
    let other = store
        .claim(StoreKey::from_parts(b"", b"behind"), FP, LEASE)
        .await;
    assert!(matches!(other, Ok(Claim::Acquired(_))), "{other:?}");
    assert_eq!(ledger.count(), 0, "nothing ran");
    drop(tx);
    let acquired = store.claim(key, FP, LEASE).await;
    assert!(
        matches!(
            acquired,
            Ok(Claim::Acquired(_)) | Ok(Claim::InFlight { .. })
        ),
        "{acquired:?}"
    );
}

/// Orphans behind a slow network: three claims (two of them for one key, a
/// client retrying through an outage) are held back 2 s by the network,
/// past the 300 ms operation timeout, and their releases go through the one
/// queue, some on other pooled connections, some after the network healed.
/// When the claims arrive at last, none may hold its key with nobody to own
/// it: a release that reached the database first left its nonce behind for
/// the late claim to refuse, one that came after released it. (Which of the
/// two happens depends on the pool; the unit tests of the statements pin
/// each case down.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_behind_a_slow_network_do_not_hold_their_keys() {
    let Some(server) = PrivatePostgres::start_or_skip("postgres late claims") else {
        return;
    };
    let (proxy, store) = through_proxy(&server).await;
    let store = store
        .operation_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    // Five pooled connections, each with its statements prepared: the
    // claims take the first three (the pool hands out the longest idle),
    // and the releases a fourth, which nothing holds back.
    let warm: Vec<StoreKey> = (0..5)
        .map(|i| StoreKey::from_parts(b"", format!("warm-{i}").as_bytes()))
        .collect();
    let claims = warm.iter().map(|key| store.claim(*key, FP, LEASE));
    for claim in futures_util::future::join_all(claims).await {
        assert!(matches!(claim, Ok(Claim::Acquired(_))), "{claim:?}");
    }
    let keys: Vec<StoreKey> = [0, 0, 1]
        .iter()
        .map(|i| StoreKey::from_parts(b"", format!("overtaken-{i}").as_bytes()))
        .collect();
    let held_back = Duration::from_secs(2);
    proxy.set_latency(held_back);
    let sent = std::time::Instant::now();
    for key in &keys {
        let e = store
            .claim(*key, FP, Duration::from_secs(60))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), StoreErrorKind::Timeout, "{e}");
    }
    proxy.heal();
    common::eventually(
        Duration::from_secs(10),
        "the releases of the orphans are done",
        || async { store.orphans_pending() == 0 },
    )
    .await;
    // The claims arrive `held_back` after they were sent (the proxy delays
    // each chunk by the latency it read it under); a second more for them
    // to run.
    tokio::time::sleep(held_back.saturating_sub(sent.elapsed()) + Duration::from_secs(1)).await;
    let other = private_store(&server).await;
    for key in [keys[0], keys[2]] {
        let claim = other.claim(key, FP, LEASE).await.unwrap();
        assert!(
            matches!(claim, Claim::Acquired(_)),
            "a late claim took the key with nobody to own it: {claim:?}"
        );
    }
}

/// Issue 23: a statement whose operation timed out stops on the server
/// too. Another session holds a lock on the whole table; a claim times out
/// (the layer would answer 503), and its statement, waiting for the lock,
/// is cancelled by the server shortly after (the store's connections carry
/// a `statement_timeout` a little above the operation timeout), while the
/// lock is still held: no connection of the store stays busy. Before, the
/// statement waited on the server for as long as the lock was held. Once
/// the lock is released, the store serves at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_whose_operation_timed_out_stops_on_the_server() {
    let Some(fixture) = pg_fixture("statement stops with its caller").await else {
        return;
    };
    let timeout = Duration::from_millis(300);
    let store = PostgresStore::builder(&fixture.db.url)
        .unwrap()
        .operation_timeout(timeout)
        .pool_size(1)
        .cleanup_every(None)
        .build()
        .unwrap();
    // The pool's one connection, opened and its statement prepared.
    store
        .claim(StoreKey::from_parts(b"", b"warm"), FP, LEASE)
        .await
        .unwrap();
    let (mut locker, locker_pid) = session_with_pid(&fixture.db.url).await;
    let tx = locker.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "LOCK TABLE {DEFAULT_TABLE} IN ACCESS EXCLUSIVE MODE"
    ))
    .await
    .unwrap();
    let e = store
        .claim(StoreKey::from_parts(b"", b"blocked"), FP, LEASE)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Timeout, "{e}");
    until_no_statement_runs(&fixture.db.url, locker_pid, Duration::from_secs(3)).await;
    tx.rollback().await.unwrap();
    let started = std::time::Instant::now();
    let claimed = store
        .claim(StoreKey::from_parts(b"", b"after"), FP, LEASE)
        .await;
    assert!(matches!(claimed, Ok(Claim::Acquired(_))), "{claimed:?}");
    assert!(started.elapsed() < timeout, "served at once");
}

/// Waits until no statement of another session runs on the database at
/// `url` (but for session `except`), failing after `limit`: a statement
/// that outlived its operation's timeout is still running there.
async fn until_no_statement_runs(url: &str, except: i32, limit: Duration) {
    let observer = connect(url).await;
    common::eventually(
        limit,
        "a timed-out statement still runs on the server, its connection busy",
        || async {
            let running: i64 = observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND state = 'active'
                       AND backend_type = 'client backend'
                       AND pid <> pg_backend_pid() AND pid <> $1",
                    &[&except],
                )
                .await
                .unwrap()
                .get(0);
            running == 0
        },
    )
    .await;
}

/// A session of its own on the database at `url`, and its server process
/// id (to leave it out of `until_no_statement_runs`).
async fn session_with_pid(url: &str) -> (tokio_postgres::Client, i32) {
    let client = connect(url).await;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    (client, pid)
}
