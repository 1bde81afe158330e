//! `PostgresStore` against a real PostgreSQL: the store contract, the
//! handler's fence inside its own transaction (three races), waking
//! waiters, cleanup, and faults of a private server (killed, frozen,
//! restarted, connections dropped, a statement that cannot finish).

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::postgres::{PrivatePostgres, TestDatabase};
use http::StatusCode;
use tokio::sync::Notify;
use tower::{Layer, ServiceExt};
use tower_idempotency::engine::{Engine, EngineError, Outcome};
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::fault::{Fault, FaultStore, Operation};
use tower_idempotency::store::postgres::DEFAULT_TABLE;
use tower_idempotency::store::{
    Claim, CompletedRecord, FenceError, LeaseStatus, PostgresStore, PostgresStoreBuilder, Store,
    StoreErrorKind, conformance,
};
use tower_idempotency::{IdempotencyInfo, IdempotencyLayer, RequestBody};

/// A store on a database of its own, its table migrated.
struct PgFixture {
    store: PostgresStore,
    db: TestDatabase,
}

impl conformance::Fixture for PgFixture {
    type Store = PostgresStore;
    fn store(&self) -> &PostgresStore {
        &self.store
    }
}

async fn pg_fixture(test: &str) -> Option<PgFixture> {
    let db = TestDatabase::create_or_skip(test)?;
    let store = PostgresStore::builder(&db.url)
        .expect("a URL")
        .fallback_check(Duration::from_millis(100))
        .build()
        .expect("build");
    store.migrate().await.expect("migrate");
    Some(PgFixture { store, db })
}

mod conformance_on_postgres {
    use super::*;
    tower_idempotency::store_conformance_tests!(optional: pg_fixture("conformance").await);
}

/// Waits until a waiter on `table` (in the database of `url`) has probed
/// its key: registered for notifications, then looked (the probe is the
/// only statement that starts `SELECT fence = $2`).
async fn until_probed(url: &str, table: &str) {
    let client = connect(url).await;
    let probe = format!("SELECT fence = $2%FROM \"{table}\" WHERE key = $1");
    common::eventually(Duration::from_secs(10), "the waiter probes", || {
        let (client, probe) = (&client, &probe);
        async move {
            client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND query LIKE $1",
                    &[probe],
                )
                .await
                .is_ok_and(|row| row.get::<_, i64>(0) > 0)
        }
    })
    .await;
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

/// A plain connection to `url` (for business rows and inspection).
async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

const FP: Fingerprint = Fingerprint::from_bytes([7; 32]);
const LEASE: Duration = Duration::from_millis(300);

/// The business table of the fence tests: one row per charge.
async fn charges_table(url: &str) -> tokio_postgres::Client {
    let client = connect(url).await;
    client
        .batch_execute("CREATE TABLE charges (execution text NOT NULL)")
        .await
        .expect("create charges");
    client
}

async fn charges(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query("SELECT execution FROM charges ORDER BY execution", &[])
        .await
        .expect("select")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Writes a charge named `name` and fences it, in one transaction;
/// commits only if the fence held.
async fn charge(
    store: &PostgresStore,
    url: &str,
    name: &str,
    execution: &tower_idempotency::engine::ExecutionContext,
) -> Result<(), FenceError> {
    let mut client = connect(url).await;
    let tx = client.transaction().await?;
    tx.execute("INSERT INTO charges (execution) VALUES ($1)", &[&name])
        .await?;
    store.fence(&tx, execution).await?;
    tx.commit().await?;
    Ok(())
}

/// A second handle on the same table, as another process would have.
fn second_handle(fixture: &PgFixture) -> PostgresStore {
    PostgresStore::builder(&fixture.db.url)
        .expect("a URL")
        .fallback_check(Duration::from_millis(100))
        .build()
        .expect("build")
}

/// Pauses an execution on `store` until `resume`: its lease renewals fail
/// from now on, so its lease lapses as a paused process's would.
fn pause_renewals(store: &FaultStore<PostgresStore>) {
    store.inject(Operation::Extend, Fault::FailBefore, usize::MAX);
}

/// Race 1: an owner paused between its claim and its commit, and a
/// takeover meanwhile. Exactly one set of business rows: the stale owner's
/// fence fails and its transaction rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owner_paused_before_its_commit_cannot_commit_after_a_takeover() {
    let Some(fixture) = pg_fixture("fence race 1").await else {
        return;
    };
    let url = fixture.db.url.clone();
    let business = charges_table(&url).await;
    let slow_store = FaultStore::new(fixture.store.clone());
    let slow = Engine::new(slow_store.clone()).lease(LEASE);
    let fast = Engine::new(second_handle(&fixture)).lease(LEASE);
    let key = StoreKey::from_parts(b"", b"pay-1");
    let (claimed, resume) = (Arc::new(Notify::new()), Arc::new(Notify::new()));

    let stale = tokio::spawn({
        let (store, url) = (fixture.store.clone(), url.clone());
        let (claimed, resume) = (claimed.clone(), resume.clone());
        async move {
            slow.run_stored(key, FP, move |ctx| async move {
                claimed.notify_one();
                resume.notified().await;
                charge(&store, &url, "stale", &ctx).await?;
                Ok::<_, FenceError>(Bytes::from_static(b"stale"))
            })
            .await
        }
    });
    claimed.notified().await;
    pause_renewals(&slow_store);
    tokio::time::sleep(LEASE * 2).await;

    let store = fixture.store.clone();
    let taken = fast
        .run_stored(key, FP, |ctx| {
            let url = url.clone();
            async move {
                charge(&store, &url, "takeover", &ctx).await?;
                Ok::<_, FenceError>(Bytes::from_static(b"takeover"))
            }
        })
        .await
        .expect("the takeover runs");
    assert_eq!(taken, Outcome::Executed(Bytes::from_static(b"takeover")));

    resume.notify_one();
    let stale = stale.await.expect("no panic");
    assert!(
        matches!(stale, Err(EngineError::Operation(FenceError::Lost))),
        "the stale owner's fence fails: {stale:?}"
    );
    assert_eq!(charges(&business).await, ["takeover"], "one set of rows");
    let replay = fast
        .run_stored(key, FP, |_| async { Ok::<_, FenceError>(Bytes::new()) })
        .await
        .expect("replay");
    assert_eq!(
        replay.value(),
        &Bytes::from_static(b"takeover"),
        "the newest owner's result is kept"
    );
}

/// Race 2: an owner paused between its commit and its completion, and a
/// duplicate meanwhile. The duplicate never executes (the effect is
/// committed: "outcome unknown"), and once the owner's completion lands it
/// is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_effect_is_never_executed_again_and_its_late_response_is_replayed() {
    let Some(fixture) = pg_fixture("fence race 2").await else {
        return;
    };
    let url = fixture.db.url.clone();
    let business = charges_table(&url).await;
    let slow_store = FaultStore::new(fixture.store.clone());
    let slow = Engine::new(slow_store.clone()).lease(LEASE);
    let other = Engine::new(second_handle(&fixture)).lease(LEASE);
    let key = StoreKey::from_parts(b"", b"pay-2");
    let (committed, resume) = (Arc::new(Notify::new()), Arc::new(Notify::new()));

    let first = tokio::spawn({
        let (store, url) = (fixture.store.clone(), url.clone());
        let (committed, resume) = (committed.clone(), resume.clone());
        async move {
            slow.run_stored(key, FP, move |ctx| async move {
                charge(&store, &url, "first", &ctx).await?;
                committed.notify_one();
                resume.notified().await;
                Ok::<_, FenceError>(Bytes::from_static(b"first"))
            })
            .await
        }
    });
    committed.notified().await;
    pause_renewals(&slow_store);
    tokio::time::sleep(LEASE * 2).await;

    let executed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attempt = || {
        let executed = executed.clone();
        other.run_stored(key, FP, move |_| async move {
            executed.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, FenceError>(Bytes::from_static(b"second"))
        })
    };
    let refused = attempt().await;
    assert!(
        matches!(refused, Err(EngineError::OutcomeUnknown)),
        "{refused:?}"
    );

    resume.notify_one();
    let first = first.await.expect("no panic").expect("the first completes");
    assert_eq!(first, Outcome::Executed(Bytes::from_static(b"first")));
    let replayed = attempt().await.expect("replayed");
    assert_eq!(replayed.value(), &Bytes::from_static(b"first"));
    assert!(!executed.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(charges(&business).await, ["first"]);
}

/// Race 3: a crash after the commit. Through the layer: every retry gets
/// 409 `OutcomeUnknown` and the handler never runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_commit_answers_outcome_unknown_and_never_runs_again() {
    let Some(fixture) = pg_fixture("fence race 3").await else {
        return;
    };
    let url = fixture.db.url.clone();
    let business = charges_table(&url).await;
    let doomed_store = FaultStore::new(fixture.store.clone());
    let committed = Arc::new(Notify::new());
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handler = {
        let (store, url, committed, runs) = (
            fixture.store.clone(),
            url.clone(),
            committed.clone(),
            runs.clone(),
        );
        tower::service_fn(move |req: http::Request<RequestBody<axum::body::Body>>| {
            let (store, url, committed, runs) =
                (store.clone(), url.clone(), committed.clone(), runs.clone());
            async move {
                if runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
                    // A second execution: the test fails on the count.
                    return Ok(http::Response::new(axum::body::Body::empty()));
                }
                let info = req
                    .extensions()
                    .get::<IdempotencyInfo>()
                    .cloned()
                    .expect("guarded");
                charge(&store, &url, "first", info.execution())
                    .await
                    .expect("the fence holds");
                committed.notify_one();
                // The process dies here: nothing more of it ever runs.
                std::future::pending::<()>().await;
                Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::empty()))
            }
        })
    };
    let request = || {
        http::Request::post("/pay")
            .header("idempotency-key", "crash-1")
            .body(axum::body::Body::from("amount=100"))
            .unwrap()
    };
    let doomed = IdempotencyLayer::new(doomed_store.clone())
        .lease(LEASE)
        .layer(handler.clone());
    let crashed = tokio::spawn(doomed.oneshot(request()));
    committed.notified().await;
    // The crash: its store handle answers nothing any more.
    for op in [Operation::Extend, Operation::Complete, Operation::Release] {
        doomed_store.inject(op, Fault::FailBefore, usize::MAX);
    }
    tokio::time::sleep(LEASE * 2).await;

    let survivor = IdempotencyLayer::new(second_handle(&fixture))
        .lease(LEASE)
        .layer(handler);
    for _ in 0..3 {
        let answer = common::collect(survivor.clone().oneshot(request()).await.unwrap()).await;
        assert_eq!(answer.status, StatusCode::CONFLICT);
        assert!(
            String::from_utf8_lossy(&answer.body).contains("OutcomeUnknown"),
            "{:?}",
            answer.body
        );
    }
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(charges(&business).await, ["first"]);
    crashed.abort();
}

/// A release (the handler failed after committing) leaves a committed key
/// "outcome unknown", not free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_a_committed_key_leaves_it_outcome_unknown() {
    let Some(fixture) = pg_fixture("release after commit").await else {
        return;
    };
    let url = fixture.db.url.clone();
    let _business = charges_table(&url).await;
    let store = fixture.store.clone();
    let engine = Engine::new(store.clone()).lease(LEASE);
    let key = StoreKey::from_parts(b"", b"pay-3");
    fail_after_committing(&engine, &store, &url, key).await;
}

/// Runs `key` with a handler that commits its charge ("first"), fenced,
/// and then fails, and checks that the key is then "outcome unknown".
async fn fail_after_committing(
    engine: &Engine<PostgresStore>,
    store: &PostgresStore,
    url: &str,
    key: StoreKey,
) {
    let failed = engine
        .run_stored(key, FP, |ctx| {
            let (store, url) = (store.clone(), url.to_owned());
            async move {
                charge(&store, &url, "first", &ctx).await.expect("fence");
                Err::<Bytes, _>("the handler failed after committing")
            }
        })
        .await;
    assert!(matches!(failed, Err(EngineError::Operation(_))));
    let again = engine
        .run_stored(key, FP, |_| async { Ok::<_, FenceError>(Bytes::new()) })
        .await;
    assert!(
        matches!(again, Err(EngineError::OutcomeUnknown)),
        "{again:?}"
    );
}

/// The fence refuses a token that never owned the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_refuses_an_execution_that_does_not_own_the_key() {
    let Some(fixture) = pg_fixture("fence refuses").await else {
        return;
    };
    let engine = Engine::new(fixture.store.clone()).lease(LEASE);
    let key = StoreKey::from_parts(b"", b"pay-4");
    let purged = fixture.store.clone();
    let result = engine
        .run_stored(key, FP, |ctx| async move {
            // Purged meanwhile (an operator's tool): the execution no
            // longer owns the key.
            purged.purge(ctx.store_key()).await.expect("purge");
            let mut client = connect(&fixture.db.url).await;
            let tx = client.transaction().await?;
            purged.fence(&tx, &ctx).await?;
            Ok::<_, FenceError>(Bytes::new())
        })
        .await;
    assert!(
        matches!(result, Err(EngineError::Operation(FenceError::Lost))),
        "{result:?}"
    );
}

/// Every instance may migrate at start-up, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_instances_can_migrate_at_once() {
    let Some(db) = TestDatabase::create_or_skip("concurrent migrate") else {
        return;
    };
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = db.url.clone();
        tasks.push(tokio::spawn(async move {
            let store = PostgresStore::builder(&url).unwrap().build().unwrap();
            store.migrate().await
        }));
    }
    for task in tasks {
        task.await.unwrap().expect("migrate");
    }
    let client = connect(&db.url).await;
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE tablename = $1",
            &[&DEFAULT_TABLE],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 2, "the primary key and expires_at");
}

/// Building needs no runtime (a store can be made in a plain `main` or a
/// static): the cleanup task starts with the first operation.
#[test]
fn a_store_is_built_outside_a_runtime_without_a_panic() {
    let store = PostgresStore::builder("postgres://postgres@127.0.0.1/postgres")
        .unwrap()
        .build();
    assert!(store.is_ok());
}

#[tokio::test]
async fn table_names_that_are_not_plain_identifiers_are_refused() {
    for bad in ["Keys", "a;drop table x", "schema.t", ""] {
        let e = PostgresStore::builder("postgres://postgres@127.0.0.1/postgres")
            .unwrap()
            .table(bad)
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("identifier"), "{bad}: {e}");
        assert_eq!(e.kind(), StoreErrorKind::Configuration);
    }
    let e = PostgresStore::builder("not a url ://").unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Configuration);
}

/// A waiter is woken by `NOTIFY` long before its fallback check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_woken_by_notify_across_handles() {
    let Some(db) = TestDatabase::create_or_skip("notify") else {
        return;
    };
    let build = || {
        PostgresStore::builder(&db.url)
            .unwrap()
            .fallback_check(Duration::from_secs(30))
            .build()
            .unwrap()
    };
    let (owner, waiter) = (build(), build());
    owner.migrate().await.unwrap();
    let key = StoreKey::from_parts(b"", b"wake");
    let Ok(Claim::Acquired(token)) = owner.claim(key, FP, Duration::from_secs(30)).await else {
        panic!("acquired");
    };
    let waiting = tokio::spawn(async move {
        let started = std::time::Instant::now();
        waiter
            .wait(key, token.fence(), Duration::from_secs(20))
            .await
            .unwrap();
        started.elapsed()
    });
    // The waiter listens, then probes: once its probe ran, only a
    // notification wakes it before its 30 s fallback check.
    until_probed(&db.url, DEFAULT_TABLE).await;
    let record = CompletedRecord {
        fingerprint: FP,
        payload: Bytes::from_static(b"done"),
    };
    assert_eq!(
        owner
            .complete(key, token, record, Duration::from_secs(60))
            .await
            .unwrap(),
        LeaseStatus::Held
    );
    let waited = waiting.await.unwrap();
    assert!(
        waited < Duration::from_secs(5),
        "woken by the notification, not the 30 s fallback: {waited:?}"
    );
}

/// Expired rows go, in batches; live ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_rows_are_removed_in_batches_and_live_ones_stay() {
    let Some(db) = TestDatabase::create_or_skip("cleanup") else {
        return;
    };
    let store = PostgresStore::builder(&db.url)
        .unwrap()
        .cleanup_every(None)
        .cleanup_batch(7)
        .fence_memory(Duration::from_millis(1))
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    for i in 0..40u32 {
        let key = StoreKey::from_parts(b"", &i.to_be_bytes());
        let Ok(Claim::Acquired(token)) = store.claim(key, FP, Duration::from_secs(60)).await else {
            panic!("acquired");
        };
        let retention = if i < 30 {
            Duration::from_millis(1)
        } else {
            Duration::from_secs(600)
        };
        let record = CompletedRecord {
            fingerprint: FP,
            payload: Bytes::from_static(b"x"),
        };
        store.complete(key, token, record, retention).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.remove_expired().await.unwrap(), 30);
    let client = connect(&db.url).await;
    let left: i64 = client
        .query_one(&format!("SELECT count(*) FROM {DEFAULT_TABLE}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 10);
}

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

/// Killed (`kill -9` of every process): operations fail fast and closed;
/// restarted, it serves again, and the records it confirmed are all there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_fails_closed_and_after_a_restart_keeps_every_record() {
    let Some(mut server) = PrivatePostgres::start_or_skip("postgres killed") else {
        return;
    };
    let store = private_store(&server).await;
    let key = StoreKey::from_parts(b"", b"durable");
    let Ok(Claim::Acquired(token)) = store.claim(key, FP, Duration::from_secs(30)).await else {
        panic!("acquired");
    };
    let record = CompletedRecord {
        fingerprint: FP,
        payload: Bytes::from_static(b"charged"),
    };
    store
        .complete(key, token, record.clone(), Duration::from_secs(600))
        .await
        .unwrap();
    server.kill();
    let started = std::time::Instant::now();
    let e = store.claim(key, FP, LEASE).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2), "bounded");
    assert!(
        matches!(
            e.kind(),
            StoreErrorKind::Unavailable | StoreErrorKind::Timeout
        ),
        "{e}"
    );
    server.restart();
    assert!(
        common::first_claim_within(&store, Duration::from_secs(10))
            .await
            .is_some()
    );
    assert_eq!(
        store.claim(key, FP, LEASE).await.unwrap(),
        Claim::Completed(record),
        "a confirmed record survives a crash"
    );
}

/// Frozen (`SIGSTOP`): operations time out instead of hanging; thawed, it
/// serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_times_out_and_recovers_when_thawed() {
    let Some(server) = PrivatePostgres::start_or_skip("postgres frozen") else {
        return;
    };
    let store = private_store(&server).await;
    assert!(
        common::first_claim_within(&store, Duration::from_secs(5))
            .await
            .is_some()
    );
    server.freeze();
    let started = std::time::Instant::now();
    let e = store
        .claim(StoreKey::from_parts(b"", b"frozen"), FP, LEASE)
        .await
        .unwrap_err();
    let took = started.elapsed();
    server.thaw();
    assert_eq!(e.kind(), StoreErrorKind::Timeout, "{e}");
    assert!(took < Duration::from_secs(2), "bounded: {took:?}");
    assert!(
        common::first_claim_within(&store, Duration::from_secs(10))
            .await
            .is_some()
    );
}

/// Connections closed by the server (a failover, a network cut): the next
/// operations open new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_are_replaced() {
    let Some(server) = PrivatePostgres::start_or_skip("postgres connections dropped") else {
        return;
    };
    let store = private_store(&server).await;
    for _ in 0..3 {
        assert!(
            common::first_claim_within(&store, Duration::from_secs(5))
                .await
                .is_some()
        );
        server.drop_connections();
    }
    assert!(
        common::first_claim_within(&store, Duration::from_secs(5))
            .await
            .is_some()
    );
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

/// The background task removes expired rows by itself, and stops when
/// told to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cleanup_task_removes_expired_rows_by_itself_until_stopped() {
    let Some(db) = TestDatabase::create_or_skip("cleanup task") else {
        return;
    };
    let store = PostgresStore::builder(&db.url)
        .unwrap()
        .cleanup_every(Some(Duration::from_millis(50)))
        .fence_memory(Duration::from_millis(1))
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    let client = connect(&db.url).await;
    let count = || async {
        client
            .query_one(&format!("SELECT count(*) FROM {DEFAULT_TABLE}"), &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let expire_soon = |n: u32| {
        let store = store.clone();
        async move {
            let key = StoreKey::from_parts(b"", &n.to_be_bytes());
            let Ok(Claim::Acquired(token)) = store.claim(key, FP, Duration::from_secs(60)).await
            else {
                panic!("acquired");
            };
            let record = CompletedRecord {
                fingerprint: FP,
                payload: Bytes::from_static(b"x"),
            };
            store
                .complete(key, token, record, Duration::from_millis(1))
                .await
                .unwrap();
        }
    };
    for n in 0..5 {
        expire_soon(n).await;
    }
    common::eventually(
        Duration::from_secs(5),
        "the task removes the expired rows",
        || async { count().await == 0 },
    )
    .await;
    store.stop_cleanup();
    expire_soon(99).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count().await, 1, "stopped: the expired row stays");
}

/// A replay only reads: it takes no row lock (a lock is a write, with a
/// WAL record and a flush at commit), so the row's `xmax` stays unset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_writes_nothing() {
    let Some(fixture) = pg_fixture("replay writes nothing").await else {
        return;
    };
    let store = &fixture.store;
    let key = StoreKey::from_parts(b"", b"replayed");
    let Ok(Claim::Acquired(token)) = store.claim(key, FP, Duration::from_secs(30)).await else {
        panic!("acquired");
    };
    let record = CompletedRecord {
        fingerprint: FP,
        payload: Bytes::from_static(b"done"),
    };
    store
        .complete(key, token, record.clone(), Duration::from_secs(600))
        .await
        .unwrap();
    let client = connect(&fixture.db.url).await;
    let row_versions = || async {
        let row = client
            .query_one(
                &format!("SELECT xmin::text, xmax::text FROM {DEFAULT_TABLE} WHERE key = $1"),
                &[&key.as_bytes().as_slice()],
            )
            .await
            .unwrap();
        (row.get::<_, String>(0), row.get::<_, String>(1))
    };
    let before = row_versions().await;
    for _ in 0..3 {
        assert_eq!(
            store.claim(key, FP, LEASE).await.unwrap(),
            Claim::Completed(record.clone())
        );
    }
    assert_eq!(
        row_versions().await,
        before,
        "the replays locked or wrote the row"
    );
    assert_eq!(before.1, "0");
}

/// A claim whose reply is lost (the server froze while it was under way and
/// the caller gave up) is applied when the server wakes, with nobody to own
/// it. It is released once the server answers, long before its lease ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_reply_was_lost_is_released_once_the_server_answers() {
    let Some(server) = PrivatePostgres::start_or_skip("postgres lost claim") else {
        return;
    };
    let store = PostgresStore::builder(&server.url())
        .unwrap()
        .operation_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    assert!(
        common::first_claim_within(&store, Duration::from_secs(5))
            .await
            .is_some()
    );
    let key = StoreKey::from_parts(b"", b"orphan");
    server.freeze();
    let e = store
        .claim(key, FP, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Timeout, "{e}");
    assert_eq!(store.orphans_pending(), 1);
    server.thaw();
    let other = private_store(&server).await;
    common::eventually(
        Duration::from_secs(10),
        "the lost claim is released long before its 60 s lease",
        || async {
            match other.claim(key, FP, Duration::from_secs(60)).await {
                Ok(Claim::Acquired(_)) => true,
                Ok(Claim::InFlight { .. }) | Err(_) => false,
                Ok(other) => panic!("{other:?}"),
            }
        },
    )
    .await;
    assert_eq!(store.orphans_pending(), 0);
}

/// Lost claims behind a slow network: three claims (two of them for one
/// key, a client retrying through an outage) are held back 2 s by the
/// network, past the 300 ms operation timeout, and their releases go
/// through the one queue, some on other pooled connections, some after the
/// network healed. When the claims arrive at last, none may hold its key
/// with nobody to own it: a release that reached the database first left
/// its nonce behind for the late claim to refuse, one that came after
/// released it. (Which of the two happens depends on the pool; the unit
/// tests of the statements pin each case down.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_lost_behind_a_slow_network_do_not_hold_their_keys() {
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
        "the releases of the lost claims are done",
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

/// A pooled connection that went half-open (its server side vanished
/// without a word: a failover, a NAT that forgot it) is not used forever:
/// once its statements time out, the store serves again on new
/// connections, as the Redis store does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_pooled_connections_are_replaced_after_their_statements_time_out() {
    let Some(server) = PrivatePostgres::start_or_skip("postgres half-open") else {
        return;
    };
    let (proxy, store) = through_proxy(&server).await;
    let store = store
        .operation_timeout(Duration::from_millis(200))
        .pool_size(4)
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    assert!(
        common::first_claim_within(&store, Duration::from_secs(5))
            .await
            .is_some()
    );
    let connections = proxy.accepted();
    proxy.half_open();
    let key = StoreKey::from_parts(b"", b"during");
    let e = store.claim(key, FP, LEASE).await.unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Timeout, "{e}");
    let recovered = common::first_claim_within(&store, Duration::from_secs(5)).await;
    assert!(
        recovered.is_some(),
        "every statement still times out 5 s after the connections went half-open"
    );
    assert!(
        proxy.accepted() > connections,
        "a new connection was opened"
    );
}

/// Issue 10: a claim renewed for longer than a lease plus the fence memory
/// (one lease here, as the docs allow) is still its owner's: the cleanup
/// never removes it and a duplicate never takes it. Before, `extend` moved
/// `lease_until` alone: the row's `expires_at` passed under the running
/// owner, the cleanup deleted the row, and a duplicate inserted a fresh
/// claim and ran the handler a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_renewed_past_its_fence_memory_is_never_cleaned_up_or_taken_over() {
    let Some(db) = TestDatabase::create_or_skip("renewed claim and cleanup") else {
        return;
    };
    let lease = Duration::from_millis(600);
    let store = PostgresStore::builder(&db.url)
        .unwrap()
        .cleanup_every(None)
        .fence_memory(lease)
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    let key = StoreKey::from_parts(b"", b"long handler");
    let Ok(Claim::Acquired(token)) = store.claim(key, FP, lease).await else {
        panic!("acquired");
    };
    let started = std::time::Instant::now();
    while started.elapsed() < lease * 4 {
        tokio::time::sleep(lease / 4).await;
        assert_eq!(
            store.extend(key, token, lease).await.unwrap(),
            LeaseStatus::Held
        );
        assert_eq!(
            store.remove_expired().await.unwrap(),
            0,
            "the cleanup removed a claim whose lease is live"
        );
        assert!(
            matches!(
                store.claim(key, FP, lease).await,
                Ok(Claim::InFlight { .. })
            ),
            "a duplicate took a claim whose lease is live"
        );
    }
    // A row whose `expires_at` passed while its lease is live (as rows that
    // earlier versions renewed are) is not removed either.
    let client = connect(&db.url).await;
    client
        .execute(
            &format!(
                "UPDATE {DEFAULT_TABLE} SET expires_at = clock_timestamp() - interval '1 second' WHERE key = $1"
            ),
            &[&key.as_bytes().as_slice()],
        )
        .await
        .unwrap();
    assert_eq!(
        store.remove_expired().await.unwrap(),
        0,
        "the cleanup went by `expires_at` alone"
    );
    let record = CompletedRecord {
        fingerprint: FP,
        payload: Bytes::from_static(b"once"),
    };
    assert_eq!(
        store
            .complete(key, token, record, Duration::from_secs(60))
            .await
            .unwrap(),
        LeaseStatus::Held,
        "the owner still owns its key"
    );
}

/// Issue 11: a key released after its effect was committed answers
/// "outcome unknown" for the fence memory, then expires like a completed
/// record: the cleanup removes its row and the key runs again. Before, the
/// cleanup skipped every committed claim and the claim statement took it
/// for live forever: the row was never removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_unknown_key_expires_after_the_fence_memory() {
    let Some(db) = TestDatabase::create_or_skip("outcome unknown expires") else {
        return;
    };
    let keep = Duration::from_millis(300);
    let store = PostgresStore::builder(&db.url)
        .unwrap()
        .cleanup_every(None)
        .fence_memory(keep)
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    let url = db.url.clone();
    let business = charges_table(&url).await;
    let engine = Engine::new(store.clone()).lease(LEASE);
    let key = StoreKey::from_parts(b"", b"unknown");
    fail_after_committing(&engine, &store, &url, key).await;
    // Past the lease and the fence memory, from the claim and the release.
    tokio::time::sleep(LEASE + keep * 2).await;
    assert_eq!(
        store.remove_expired().await.unwrap(),
        1,
        "the outcome-unknown row outlived its fence memory"
    );
    let after = engine
        .run_stored(key, FP, |_| async {
            Ok::<_, FenceError>(Bytes::from_static(b"after the window"))
        })
        .await
        .expect("a new request after the window");
    assert_eq!(
        after,
        Outcome::Executed(Bytes::from_static(b"after the window"))
    );
    assert_eq!(charges(&business).await, ["first"]);
}

/// Issue 12: a table named by a reserved word (`order`, `user`, `select`)
/// passes validation, so it must work: migrate, claim, renew, wait (its
/// `LISTEN` channel), complete, replay, clean up, purge. Before, the name
/// went into the SQL unquoted and `migrate` failed with a syntax error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_named_by_a_reserved_word_works() {
    let Some(db) = TestDatabase::create_or_skip("reserved table name") else {
        return;
    };
    for table in ["order", "user", "select"] {
        let store = PostgresStore::builder(&db.url)
            .unwrap()
            .table(table)
            .fallback_check(Duration::from_secs(30))
            .cleanup_every(None)
            .build()
            .expect("a reserved word is a valid table name");
        store.migrate().await.expect("migrate");
        store.migrate().await.expect("migrate again");
        let key = StoreKey::from_parts(b"", table.as_bytes());
        let lease = Duration::from_secs(30);
        let Ok(Claim::Acquired(token)) = store.claim(key, FP, lease).await else {
            panic!("{table}: acquired");
        };
        assert!(
            matches!(
                store.claim(key, FP, lease).await,
                Ok(Claim::InFlight { .. })
            ),
            "{table}"
        );
        assert_eq!(
            store.extend(key, token, lease).await.unwrap(),
            LeaseStatus::Held,
            "{table}"
        );
        let waiter = tokio::spawn({
            let store = store.clone();
            async move {
                let started = std::time::Instant::now();
                store
                    .wait(key, token.fence(), Duration::from_secs(20))
                    .await
                    .map(|()| started.elapsed())
            }
        });
        until_probed(&db.url, table).await;
        let record = CompletedRecord {
            fingerprint: FP,
            payload: Bytes::from(table),
        };
        assert_eq!(
            store
                .complete(key, token, record.clone(), Duration::from_secs(600))
                .await
                .unwrap(),
            LeaseStatus::Held,
            "{table}"
        );
        let waited = waiter.await.unwrap().expect("wait");
        assert!(
            waited < Duration::from_secs(5),
            "{table}: woken by its channel's notification, not the fallback: {waited:?}"
        );
        assert_eq!(
            store.claim(key, FP, lease).await.unwrap(),
            Claim::Completed(record),
            "{table}"
        );
        assert_eq!(store.remove_expired().await.unwrap(), 0, "{table}");
        assert!(store.purge(key).await.unwrap(), "{table}");
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
    let started = std::time::Instant::now();
    loop {
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
        if running == 0 {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "a timed-out statement still runs on the server, its connection busy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
