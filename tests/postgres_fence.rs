//! `PostgresStore`'s fence inside the handler's own transaction, against a
//! real PostgreSQL: the three races (a stale owner paused before its
//! commit, a crash after the commit, a late response of a committed
//! effect), releasing a committed key (outcome unknown, until the fence
//! memory ends), and executions that do not own the key.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::postgres::{FP, LEASE, PgFixture, TestDatabase, connect, pg_fixture};
use http::StatusCode;
use tokio::sync::Notify;
use tower::{Layer, ServiceExt};
use tower_idempotency::engine::{Engine, EngineError, Outcome};
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::fault::{Fault, FaultStore, Operation};
use tower_idempotency::store::{FenceError, PostgresStore, Store};
use tower_idempotency::{IdempotencyInfo, IdempotencyLayer, RequestBody};

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

/// [`charge`] on a pooled connection: in a deadpool-postgres transaction,
/// whose fence statement is prepared once per connection.
async fn charge_pooled(
    store: &PostgresStore,
    pool: &deadpool_postgres::Pool,
    name: &str,
    execution: &tower_idempotency::engine::ExecutionContext,
) -> Result<(), FenceError> {
    let mut client = pool.get().await.expect("a connection");
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

/// A deadpool-postgres transaction (what a pooled connection gives): the
/// fence statement is prepared once per connection, in the pool's
/// statement cache, not parsed and planned by the server at every call;
/// and it still refuses an execution that no longer owns its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_transaction_fences_with_a_statement_prepared_once() {
    let Some(fixture) = pg_fixture("fence pooled").await else {
        return;
    };
    let business = charges_table(&fixture.db.url).await;
    let config: tokio_postgres::Config = fixture.db.url.parse().expect("a URL");
    let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
    // One connection: every fence below runs on it.
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(1)
        .build()
        .expect("a pool");
    let engine = Engine::new(fixture.store.clone()).lease(LEASE);
    for name in ["first", "second", "third"] {
        let (store, pool) = (fixture.store.clone(), pool.clone());
        let done = engine
            .run_stored(
                StoreKey::from_parts(b"", name.as_bytes()),
                FP,
                |ctx| async move {
                    charge_pooled(&store, &pool, name, &ctx).await?;
                    Ok::<_, FenceError>(Bytes::from_static(b"ok"))
                },
            )
            .await
            .expect("each charge runs");
        assert_eq!(done, Outcome::Executed(Bytes::from_static(b"ok")));
    }
    assert_eq!(charges(&business).await, ["first", "second", "third"]);
    let client = pool.get().await.expect("the connection");
    let prepared: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_prepared_statements
             WHERE statement LIKE '%SET effect_committed = true%'
               AND statement NOT LIKE '%pg_prepared_statements%'",
            &[],
        )
        .await
        .expect("pg_prepared_statements")
        .get(0);
    assert_eq!(
        prepared, 1,
        "one fence statement, prepared once on the connection"
    );
    drop(client);

    // Purged meanwhile: the pooled fence refuses too, and nothing commits.
    let (store, pooled) = (fixture.store.clone(), pool.clone());
    let result = engine
        .run_stored(StoreKey::from_parts(b"", b"purged"), FP, |ctx| async move {
            store.purge(ctx.store_key()).await.expect("purge");
            charge_pooled(&store, &pooled, "purged", &ctx).await?;
            Ok::<_, FenceError>(Bytes::new())
        })
        .await;
    assert!(
        matches!(result, Err(EngineError::Operation(FenceError::Lost))),
        "{result:?}"
    );
    assert_eq!(charges(&business).await, ["first", "second", "third"]);
}
