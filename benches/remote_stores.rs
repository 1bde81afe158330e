//! What the guarantee costs on the remote stores, each scenario beside its
//! baseline.
//!
//! ```sh
//! cargo bench --all-features --bench remote_stores
//! ```
//!
//! Groups:
//! - `postgres`: first request and replay on `PostgresStore`, beside a
//!   plain `SELECT 1` on the same pool, and the in-transaction `fence`
//!   (with its claim and completion) beside a transaction with a `SELECT 1`;
//!   on a database of its own on the PostgreSQL at
//!   `TOWER_IDEMPOTENCY_POSTGRES_URL` (default `127.0.0.1:5432`).
//! - `redis_server_time`: the Redis server's own time per claim, completion
//!   and replay script, beside the commands of a hand-written guard.
//! - `redis`: first request and replay on `RedisStore`, beside a plain Redis
//!   `GET` round trip, against a `redis-server` the bench starts on a free
//!   port (skipped when there is none).

mod support;

use axum::Router;
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::StatusCode;
use std::hint::black_box;
use std::time::Duration;
use support::*;
use tower_idempotency::store::Store;

#[cfg(feature = "redis")]
fn redis(c: &mut Criterion) {
    use tower_idempotency::store::RedisStore;
    let Some(server) = redis_server::redis_or_skip("redis benches") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let url = server.url();
    let (store, mut conn) = rt.block_on(async {
        let store = RedisStore::connect(&url).await.unwrap();
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_connection_manager().await.unwrap();
        let _: () = redis::cmd("SET")
            .arg("plain")
            .arg("value")
            .query_async(&mut conn)
            .await
            .unwrap();
        (store, conn)
    });
    let ours = guarded(store.clone());
    rt.block_on(async {
        assert_eq!(
            call(&ours, post_req(Some("replayed"))).await,
            StatusCode::CREATED
        )
    });
    let mut g = c.benchmark_group("redis");
    g.measurement_time(Duration::from_secs(5));
    // Every scenario runs on a runtime worker, as a request handler does (a
    // loop driven from the bench thread would add a cross-thread hop to each
    // round trip; shared/research/performance.md §2.2).
    g.bench_function("plain_get_round_trip", |b| {
        let conn = conn.clone();
        on_worker(&rt, b, move || {
            let mut conn = conn.clone();
            async move {
                let v: Option<String> = redis::cmd("GET")
                    .arg("plain")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                v
            }
        })
    });
    let bare = routes();
    g.bench_function("bare/post", |b| {
        let bare = bare.clone();
        on_worker(&rt, b, move || {
            let bare = bare.clone();
            async move { call(&bare, post_req(None)).await }
        })
    });
    first_and_replay(&mut g, &rt, &ours);
    g.finish();
    redis_server_time(c, &rt, &store, &conn, server.pid());
    let _: () = rt.block_on(async { redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap() });
    drop(server);
}

/// What each operation costs the Redis server itself: criterion's "time"
/// here is the server's time inside the command (`usec` of `INFO
/// commandstats`, reset before each sample), not the round trip. The
/// store's claim of a new key, its completion (a 200-byte record) and its
/// claim of a completed key (a replay), beside the plain commands a
/// hand-written guard would send: `SET NX PX` before the work, `SET PX` of
/// the response after it, `GET` for a replay. Redis runs pinned to one
/// core and this process to the other, so the server is not descheduled in
/// the middle of a command by the bench's own threads.
#[cfg(feature = "redis")]
fn redis_server_time(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    store: &tower_idempotency::store::RedisStore,
    conn: &redis::aio::ConnectionManager,
    server_pid: Option<u32>,
) {
    use tower_idempotency::fingerprint::Fingerprint;
    use tower_idempotency::key::StoreKey;
    use tower_idempotency::store::{Claim, CompletedRecord, OwnerToken};

    async fn reset(conn: &mut redis::aio::ConnectionManager) {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(conn)
            .await
            .unwrap();
    }
    /// Microseconds the server spent in `command` since the last reset.
    async fn spent(conn: &mut redis::aio::ConnectionManager, command: &str) -> Duration {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(conn)
            .await
            .unwrap();
        let prefix = format!("cmdstat_{command}:");
        let usec = info
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|fields| {
                fields
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("usec="))
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .unwrap_or(0);
        Duration::from_micros(usec)
    }
    async fn set_nx_px(conn: &mut redis::aio::ConnectionManager, key: &str) {
        let _: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg("claimed")
            .arg("NX")
            .arg("PX")
            .arg(30_000)
            .query_async(conn)
            .await
            .unwrap();
    }
    let fp = Fingerprint::of_bytes(b"bench");
    let lease = Duration::from_secs(30);
    let retention = Duration::from_secs(86_400);
    let payload = Bytes::from_static(&[b'x'; 200]);
    let fresh = || StoreKey::from_parts(b"", fresh_key().as_bytes());
    let floor_keys =
        |n: u64| -> Vec<String> { (0..n).map(|_| format!("floor:{}", fresh_key())).collect() };
    let claim_all = |keys: Vec<StoreKey>| {
        let store = store.clone();
        async move {
            let mut tokens: Vec<(StoreKey, OwnerToken)> = Vec::with_capacity(keys.len());
            for key in keys {
                match store.claim(key, fp, lease).await.unwrap() {
                    Claim::Acquired(token) => tokens.push((key, token)),
                    other => panic!("a new key must be acquired, got {other:?}"),
                }
            }
            tokens
        }
    };
    let done = fresh();
    rt.block_on(async {
        let (key, token) = claim_all(vec![done]).await[0];
        let record = CompletedRecord {
            fingerprint: fp,
            payload: payload.clone(),
        };
        store.complete(key, token, record, retention).await.unwrap();
        let _: () = redis::cmd("SET")
            .arg("floor:done")
            .arg(&payload[..])
            .query_async(&mut conn.clone())
            .await
            .unwrap();
    });

    let pinned = match server_pid {
        Some(pid) => pin(pid, "0", false) && pin(std::process::id(), "1", true),
        None => false,
    };
    if !pinned {
        eprintln!(
            "redis_server_time: not pinned (taskset failed); descheduling adds to the figures"
        );
    }
    let mut g = c.benchmark_group("redis_server_time");
    // The "time" is server time, a few µs per call against round trips of
    // tens: keep the planned totals small.
    g.warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_millis(600))
        .sample_size(20);
    g.bench_function("ours/claim", |b| {
        b.iter_custom(|iters| {
            let mut conn = conn.clone();
            let keys: Vec<_> = (0..iters).map(|_| fresh()).collect();
            rt.block_on(async {
                reset(&mut conn).await;
                black_box(claim_all(keys).await);
                spent(&mut conn, "evalsha").await
            })
        })
    });
    g.bench_function("ours/complete", |b| {
        b.iter_custom(|iters| {
            let mut conn = conn.clone();
            let keys: Vec<_> = (0..iters).map(|_| fresh()).collect();
            rt.block_on(async {
                let tokens = claim_all(keys).await;
                reset(&mut conn).await;
                for (key, token) in tokens {
                    let record = CompletedRecord {
                        fingerprint: fp,
                        payload: payload.clone(),
                    };
                    black_box(store.complete(key, token, record, retention).await.unwrap());
                }
                spent(&mut conn, "evalsha").await
            })
        })
    });
    g.bench_function("ours/replay", |b| {
        b.iter_custom(|iters| {
            let mut conn = conn.clone();
            rt.block_on(async {
                reset(&mut conn).await;
                for _ in 0..iters {
                    black_box(store.claim(done, fp, lease).await.unwrap());
                }
                spent(&mut conn, "evalsha").await
            })
        })
    });
    g.bench_function("floor/set_nx_px", |b| {
        b.iter_custom(|iters| {
            let mut conn = conn.clone();
            let keys = floor_keys(iters);
            rt.block_on(async {
                reset(&mut conn).await;
                for key in &keys {
                    set_nx_px(&mut conn, key).await;
                }
                spent(&mut conn, "set").await
            })
        })
    });
    g.bench_function("floor/set_px", |b| {
        b.iter_custom(|iters| {
            let mut conn = conn.clone();
            let keys = floor_keys(iters);
            rt.block_on(async {
                for key in &keys {
                    set_nx_px(&mut conn, key).await;
                }
                reset(&mut conn).await;
                for key in &keys {
                    let _: () = redis::cmd("SET")
                        .arg(key)
                        .arg(&payload[..])
                        .arg("PX")
                        .arg(86_400_000)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                }
                spent(&mut conn, "set").await
            })
        })
    });
    g.bench_function("floor/get", |b| {
        b.iter_custom(|iters| {
            let mut conn = conn.clone();
            rt.block_on(async {
                reset(&mut conn).await;
                for _ in 0..iters {
                    let _: Option<Vec<u8>> = redis::cmd("GET")
                        .arg("floor:done")
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                }
                spent(&mut conn, "get").await
            })
        })
    });
    g.finish();
    if pinned {
        let cpus = format!(
            "0-{}",
            std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
        );
        pin(std::process::id(), &cpus, true);
    }
}

/// `taskset` of a process (and with `all`, each of its threads) to `cpus`.
#[cfg(feature = "redis")]
fn pin(pid: u32, cpus: &str, all: bool) -> bool {
    let mut cmd = std::process::Command::new("taskset");
    if all {
        cmd.arg("-a");
    }
    cmd.args(["-p", "-c", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `ours/first` (a new key each time) and `ours/replay` (one key, stored
/// beforehand) through `ours`, on a runtime worker.
#[cfg(any(feature = "redis", feature = "postgres"))]
fn first_and_replay(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    ours: &Router,
) {
    g.bench_function("ours/first", |b| {
        let ours = ours.clone();
        on_worker(rt, b, move || {
            let ours = ours.clone();
            async move { call(&ours, post_req(Some(&fresh_key()))).await }
        })
    });
    g.bench_function("ours/replay", |b| {
        let ours = ours.clone();
        on_worker(rt, b, move || {
            let ours = ours.clone();
            async move { call(&ours, post_req(Some("replayed"))).await }
        })
    });
}

/// Times `iters` sequential calls of `op` inside one task spawned on the
/// runtime, so that every call runs on a worker thread.
#[cfg(any(feature = "redis", feature = "postgres"))]
fn on_worker<F, Fut>(rt: &tokio::runtime::Runtime, b: &mut criterion::Bencher<'_>, op: F)
where
    F: Fn() -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future + Send,
    Fut::Output: Send,
{
    b.iter_custom(|iters| {
        let op = op.clone();
        rt.block_on(async move {
            tokio::spawn(async move {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    black_box(op().await);
                }
                start.elapsed()
            })
            .await
            .unwrap()
        })
    });
}

/// First request and replay on `PostgresStore`, beside a plain `SELECT 1`
/// on the same pool, and the in-transaction `fence` beside a `SELECT 1` in
/// the same kind of transaction; on a database of its own on the shared
/// server.
#[cfg(feature = "postgres")]
fn postgres(c: &mut Criterion) {
    use tower_idempotency::store::PostgresStore;
    let Some(db) = common::postgres::TestDatabase::create_or_skip("postgres benches") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let config: tokio_postgres::Config = db.url.parse().unwrap();
    let pool = deadpool_postgres::Pool::builder(deadpool_postgres::Manager::from_config(
        config.clone(),
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    ))
    .max_size(4)
    .runtime(deadpool_postgres::Runtime::Tokio1)
    .build()
    .unwrap();
    let store = PostgresStore::builder_for_pool(pool.clone(), Some(config))
        .build()
        .unwrap();
    let ours = rt.block_on(async {
        store.migrate().await.unwrap();
        let ours = guarded(store.clone());
        assert_eq!(
            call(&ours, post_req(Some("replayed"))).await,
            StatusCode::CREATED
        );
        ours
    });
    let mut g = c.benchmark_group("postgres");
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("plain_select_1_round_trip", |b| {
        let pool = pool.clone();
        on_worker(&rt, b, move || {
            let pool = pool.clone();
            async move {
                let client = pool.get().await.unwrap();
                let statement = client.prepare_cached("SELECT 1").await.unwrap();
                client
                    .query_one(&statement, &[])
                    .await
                    .unwrap()
                    .get::<_, i32>(0)
            }
        })
    });
    // The floor of a first request: two committed writes, an insert of a
    // new row and an update of it, each its own statement.
    rt.block_on(async {
        let client = pool.get().await.unwrap();
        client
            .batch_execute("CREATE TABLE floor (k text PRIMARY KEY, v bytea)")
            .await
            .unwrap();
    });
    g.bench_function("plain_insert_then_update", |b| {
        let pool = pool.clone();
        on_worker(&rt, b, move || {
            let pool = pool.clone();
            async move {
                let client = pool.get().await.unwrap();
                let key = fresh_key();
                let insert = client
                    .prepare_cached("INSERT INTO floor (k) VALUES ($1)")
                    .await
                    .unwrap();
                client.execute(&insert, &[&key]).await.unwrap();
                let update = client
                    .prepare_cached("UPDATE floor SET v = $2 WHERE k = $1")
                    .await
                    .unwrap();
                client
                    .execute(&update, &[&key, &b"response".as_slice()])
                    .await
                    .unwrap()
            }
        })
    });
    first_and_replay(&mut g, &rt, &ours);
    // A transaction that writes nothing but checks one thing: `fence`, or
    // a `SELECT 1` for the floor.
    g.bench_function("transaction/select_1", |b| {
        let pool = pool.clone();
        on_worker(&rt, b, move || {
            let pool = pool.clone();
            async move {
                let mut client = pool.get().await.unwrap();
                let tx = client.transaction().await.unwrap();
                tx.query_typed("SELECT 1", &[]).await.unwrap();
                tx.commit().await.unwrap();
            }
        })
    });
    let engine = tower_idempotency::engine::Engine::new(store.clone());
    g.bench_function("transaction/fence", |b| {
        let (pool, store, engine) = (pool.clone(), store.clone(), engine.clone());
        on_worker(&rt, b, move || {
            let (pool, store, engine) = (pool.clone(), store.clone(), engine.clone());
            async move {
                let key = tower_idempotency::key::StoreKey::from_parts(b"", fresh_key().as_bytes());
                let fingerprint = tower_idempotency::fingerprint::Fingerprint::of_bytes(b"x");
                // The claim and completion are timed too; the bench
                // `ours/first` gives their cost, to subtract.
                engine
                    .run_stored(key, fingerprint, move |ctx| async move {
                        let mut client = pool.get().await.unwrap();
                        let tx = client.transaction().await.unwrap();
                        store.fence(&tx, &ctx).await.unwrap();
                        tx.commit().await.unwrap();
                        Ok::<_, std::convert::Infallible>(bytes::Bytes::new())
                    })
                    .await
                    .unwrap()
            }
        })
    });
    g.finish();
    drop(rt);
    drop(db);
}

#[cfg(not(feature = "postgres"))]
fn postgres(_c: &mut Criterion) {
    eprintln!("SKIPPED postgres benches: built without the `postgres` feature");
}

#[cfg(not(feature = "redis"))]
fn redis(_c: &mut Criterion) {
    eprintln!("SKIPPED redis benches: built without the `redis` feature");
}

// The support module the tests use (a throwaway `redis-server`, here).
#[path = "../tests/common/mod.rs"]
mod common;

#[cfg(feature = "redis")]
use common::redis_server;

criterion_group!(benches, redis, postgres);
criterion_main!(benches);
