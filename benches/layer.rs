//! What the guarantee costs, in process, each scenario beside its baseline.
//!
//! ```sh
//! cargo bench --all-features --bench layer
//! ```
//!
//! Groups:
//! - `memory`: the bare axum route, a request the layer passes through
//!   (GET, no key), a first request (new key) and a replay, on `MemoryStore`,
//!   and the same scenarios through the published `axum-idempotent` crate
//!   (the peer) where it can run them.
//! - `tower`: the same without axum (a bare `service_fn` vs the layer over
//!   it), which isolates the layer's own cost from `Router::layer`'s.
//! - `coalesced`: N = 1, 16, 256 concurrent duplicates of one new key.
//! - `fingerprint`: hashing 64 B, 1 KiB, 64 KiB and 1 MiB bodies.
//! - `memory/store_alone/first`: the part of `memory/ours/first` spent in the
//!   store, measured alone on the same store.
//! - `store`: what `MemoryStore` spends storing a new key (claim, then
//!   complete) below its byte bound and at it, beside the same inserts into
//!   a bare moka cache configured as the store configures it.
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

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use tower::{ServiceBuilder, ServiceExt};
use tower_idempotency::IdempotencyLayer;
use tower_idempotency::fingerprint::FingerprintHasher;
use tower_idempotency::store::{MemoryStore, Store};

const BODY_64: &[u8] = br#"{"amount":100,"currency":"GHS","reference":"order-000000000042"}"#;

async fn handler(body: Bytes) -> (StatusCode, Bytes) {
    (StatusCode::CREATED, body)
}

/// `with_state(())` turns the handlers into services once, as `axum::serve`
/// does: a `Router` called without it converts (and layers) each handler
/// again on every request, which a served app never pays.
fn routes() -> Router {
    unprepared_routes().with_state(())
}

fn unprepared_routes() -> Router {
    Router::new().route("/pay", post(handler).get(|| async { "ok" }))
}

fn guarded<St: Store>(store: St) -> Router {
    unprepared_routes()
        .layer(ServiceBuilder::new().layer(IdempotencyLayer::new(store)))
        .with_state(())
}

fn post_req(key: Option<&str>) -> Request<Body> {
    let mut b = Request::post("/pay").header("content-type", "application/json");
    if let Some(key) = key {
        b = b.header("idempotency-key", key);
    }
    b.body(Body::from(Bytes::from_static(BODY_64))).unwrap()
}

fn get_req() -> Request<Body> {
    Request::get("/pay").body(Body::empty()).unwrap()
}

async fn call(router: &Router, req: Request<Body>) -> StatusCode {
    let res = router.clone().oneshot(req).await.unwrap();
    let status = res.status();
    black_box(res.into_body().collect().await.unwrap());
    status
}

/// A new key into `store` as a first request leaves it: claimed (a 30 s
/// lease), then completed with `payload` (kept a day).
async fn store_new_key<St: Store>(
    store: &St,
    key: tower_idempotency::key::StoreKey,
    fp: tower_idempotency::fingerprint::Fingerprint,
    payload: Bytes,
) -> tower_idempotency::store::LeaseStatus {
    use tower_idempotency::store::{Claim, CompletedRecord};
    let Claim::Acquired(token) = store.claim(key, fp, Duration::from_secs(30)).await.unwrap()
    else {
        panic!("a fresh key is acquired")
    };
    let record = CompletedRecord {
        fingerprint: fp,
        payload,
    };
    let retention = Duration::from_secs(86_400);
    black_box(store.complete(key, token, record, retention).await.unwrap())
}

static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

fn fresh_key() -> String {
    format!("key-{}", NEXT_KEY.fetch_add(1, Ordering::Relaxed))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The peer: `axum-idempotent` over a ruts cookie session on moka, in
/// header mode. It caches only for requests that carry a session cookie, so
/// the bench logs in once and sends the cookie with every request.
mod peer {
    use super::*;
    use axum_idempotent::{IdempotentLayer, IdempotentOptions};
    use ruts::store::moka::MokaStore;
    use ruts::{CookieOptions, Session, SessionLayer};

    async fn login(session: Session<MokaStore>) -> &'static str {
        let ttl = ruts::store::Ttl::new(3600).unwrap();
        session.set("user", &"bench", ttl, None).await.unwrap();
        "ok"
    }

    pub fn router() -> Router {
        let store = Arc::new(MokaStore::builder().build());
        // `false`: a request without a key passes through (the GET scenario);
        // `true` would refuse it with 400, on every method.
        let options =
            IdempotentOptions::default().use_idempotency_key_header(Some("Idempotency-Key"), false);
        unprepared_routes()
            .route("/login", get(login))
            .layer(
                ServiceBuilder::new()
                    .layer(tower_cookies::CookieManagerLayer::new())
                    .layer(
                        SessionLayer::new(store)
                            .with_cookie_options(CookieOptions::build().name("session")),
                    )
                    .layer(IdempotentLayer::<MokaStore>::new(options)),
            )
            .with_state(())
    }

    /// Logs in and returns the session cookie to send.
    pub async fn session_cookie(router: &Router) -> HeaderValue {
        let res = router
            .clone()
            .oneshot(Request::get("/login").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let Some(cookie) = res.headers().get("set-cookie") else {
            panic!("no session cookie: {} {:?}", res.status(), res.headers());
        };
        let cookie = cookie.to_str().unwrap();
        HeaderValue::from_str(cookie.split(';').next().unwrap()).unwrap()
    }
}

fn with_cookie(mut req: Request<Body>, cookie: &HeaderValue) -> Request<Body> {
    req.headers_mut().insert("cookie", cookie.clone());
    req
}

fn memory(c: &mut Criterion) {
    let rt = runtime();
    let bare = routes();
    let store = MemoryStore::new();
    let ours = guarded(store.clone());
    let theirs = peer::router();
    let cookie = rt.block_on(peer::session_cookie(&theirs));
    // The replayed key, completed once up front.
    rt.block_on(async {
        assert_eq!(
            call(&ours, post_req(Some("replayed"))).await,
            StatusCode::CREATED
        );
        call(&theirs, with_cookie(post_req(Some("replayed")), &cookie)).await;
        // Both really replay in this setup.
        let ours_again = ours
            .clone()
            .oneshot(post_req(Some("replayed")))
            .await
            .unwrap();
        assert!(ours_again.headers().contains_key("idempotent-replayed"));
        let req = with_cookie(post_req(Some("replayed")), &cookie);
        let theirs_again = theirs.clone().oneshot(req).await.unwrap();
        assert!(
            theirs_again.headers().contains_key("idempotency-replayed"),
            "the peer replays"
        );
    });

    // The record the layer stored for the replayed key, as it is (read
    // now: the first requests below fill the store, which then evicts it).
    let fp = tower_idempotency::fingerprint::Fingerprint::from_bytes([7; 32]);
    let replayed = tower_idempotency::key::StoreKey::new(
        &tower_idempotency::Scope::global(),
        &tower_idempotency::IdempotencyKey::parse(b"replayed").unwrap(),
    );
    let payload = match rt.block_on(store.claim(replayed, fp, Duration::from_secs(30))) {
        Ok(tower_idempotency::store::Claim::Completed(record)) => record.payload,
        other => panic!("the replayed key holds the layer's record, got {other:?}"),
    };
    let mut g = c.benchmark_group("memory");
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("bare/post", |b| {
        b.to_async(&rt).iter(|| call(&bare, post_req(None)))
    });
    // The same requests the first-request scenario sends (a fresh key
    // formatted into a header each time), which the bare route ignores.
    g.bench_function("bare/post_fresh_key", |b| {
        b.to_async(&rt)
            .iter(|| async { call(&bare, post_req(Some(&fresh_key()))).await })
    });
    g.bench_function("bare/get", |b| {
        b.to_async(&rt).iter(|| call(&bare, get_req()))
    });
    g.bench_function("ours/passthrough_get", |b| {
        b.to_async(&rt).iter(|| call(&ours, get_req()))
    });
    g.bench_function("ours/first", |b| {
        b.to_async(&rt)
            .iter(|| async { call(&ours, post_req(Some(&fresh_key()))).await })
    });
    // What `ours/first` spends in the store: the same store, as full as
    // the first requests left it, storing a new key (claim, then complete)
    // with a record of the size the layer stores for this response; keys
    // made outside the timed part. `ours/first` minus this is the layer's
    // own share of a first request.
    g.bench_function("store_alone/first", |b| {
        use criterion::BatchSize;
        use tower_idempotency::key::StoreKey;
        let fresh = || StoreKey::from_parts(b"", fresh_key().as_bytes());
        b.to_async(&rt).iter_batched(
            fresh,
            |key| {
                let (store, payload) = (store.clone(), payload.clone());
                async move { store_new_key(&store, key, fp, payload).await }
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("ours/replay", |b| {
        b.to_async(&rt)
            .iter(|| call(&ours, post_req(Some("replayed"))))
    });
    g.bench_function("peer/passthrough_get", |b| {
        b.to_async(&rt)
            .iter(|| call(&theirs, with_cookie(get_req(), &cookie)))
    });
    g.bench_function("peer/first", |b| {
        b.to_async(&rt).iter(|| async {
            call(&theirs, with_cookie(post_req(Some(&fresh_key())), &cookie)).await
        })
    });
    g.bench_function("peer/replay", |b| {
        b.to_async(&rt)
            .iter(|| call(&theirs, with_cookie(post_req(Some("replayed")), &cookie)))
    });
    g.finish();
}

/// The layer's own cost, without axum: a bare `service_fn` against the same
/// service wrapped by the layer (axum's `Router::layer` re-boxes every route,
/// which any layer pays on top of this).
fn tower_level(c: &mut Criterion) {
    use tower::Layer;
    let rt = runtime();
    let inner = tower::service_fn(
        |req: Request<tower_idempotency::RequestBody<Body>>| async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::from(body)))
        },
    );
    let bare = tower::service_fn(|req: Request<Body>| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Ok::<_, std::convert::Infallible>(http::Response::new(Body::from(body)))
    });
    let ours = IdempotencyLayer::new(MemoryStore::new()).layer(inner);
    rt.block_on(async {
        let res = ours
            .clone()
            .oneshot(post_req(Some("replayed")))
            .await
            .unwrap();
        black_box(res.into_body().collect().await.unwrap());
    });
    let mut g = c.benchmark_group("tower");
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("bare/get", |b| {
        b.to_async(&rt).iter(|| async {
            let res = bare.oneshot(get_req()).await.unwrap();
            black_box(res.into_body().collect().await.unwrap())
        })
    });
    g.bench_function("ours/passthrough_get", |b| {
        b.to_async(&rt).iter(|| async {
            let res = ours.clone().oneshot(get_req()).await.unwrap();
            black_box(res.into_body().collect().await.unwrap())
        })
    });
    g.bench_function("bare/post", |b| {
        b.to_async(&rt).iter(|| async {
            let res = bare.oneshot(post_req(None)).await.unwrap();
            black_box(res.into_body().collect().await.unwrap())
        })
    });
    g.bench_function("ours/replay", |b| {
        b.to_async(&rt).iter(|| async {
            let res = ours
                .clone()
                .oneshot(post_req(Some("replayed")))
                .await
                .unwrap();
            black_box(res.into_body().collect().await.unwrap())
        })
    });
    g.finish();
}

fn coalesced(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ours = guarded(MemoryStore::new());
    let bare = routes();
    let mut g = c.benchmark_group("coalesced");
    g.measurement_time(Duration::from_secs(5));
    for n in [1usize, 16, 256] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("bare", n), &n, |b, &n| {
            b.to_async(&rt).iter(|| async {
                let mut set = tokio::task::JoinSet::new();
                for _ in 0..n {
                    let bare = bare.clone();
                    set.spawn(async move { call(&bare, post_req(None)).await });
                }
                set.join_all().await
            })
        });
        g.bench_with_input(BenchmarkId::new("ours", n), &n, |b, &n| {
            b.to_async(&rt).iter(|| async {
                let key = fresh_key();
                let mut set = tokio::task::JoinSet::new();
                for _ in 0..n {
                    let (ours, key) = (ours.clone(), key.clone());
                    set.spawn(async move { call(&ours, post_req(Some(&key))).await });
                }
                set.join_all().await
            })
        });
    }
    g.finish();
}

fn fingerprint(c: &mut Criterion) {
    let uri: http::Uri = "/pay?x=1".parse().unwrap();
    let headers = http::HeaderMap::new();
    let mut g = c.benchmark_group("fingerprint");
    for size in [64usize, 1024, 64 * 1024, 1024 * 1024] {
        let body = vec![b'x'; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &body, |b, body| {
            b.iter(|| {
                let mut h = FingerprintHasher::new(&http::Method::POST, &uri, &headers, &[]);
                h.update(black_box(body));
                h.finish()
            })
        });
    }
    g.finish();
}

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

/// A new key into `MemoryStore` (claim, then complete) against the same
/// insert into a bare moka cache built as the store builds its cache (LRU,
/// a byte weigher, per-entry expiry), below the byte bound and at it. Keys
/// are made outside the timed part; the at-bound stores are filled first.
fn store(c: &mut Criterion) {
    use criterion::BatchSize;
    use tower_idempotency::fingerprint::Fingerprint;
    use tower_idempotency::key::StoreKey;

    struct Value {
        payload: Bytes,
        retention: Duration,
    }
    /// A keyed multiply-fold hasher like the store's own (which is private):
    /// moka rehashes every key as its table grows and as removals pile up,
    /// so the hasher is part of what moka costs.
    #[derive(Clone)]
    struct FoldHasher(u64);
    impl std::hash::Hasher for FoldHasher {
        fn write(&mut self, bytes: &[u8]) {
            for chunk in bytes.chunks(8) {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                let full = u128::from(self.0 ^ u64::from_le_bytes(word)) * 0x9E37_79B9_7F4A_7C15;
                self.0 = (full as u64) ^ ((full >> 64) as u64);
            }
        }
        fn finish(&self) -> u64 {
            self.0
        }
    }
    #[derive(Clone)]
    struct Fold(u64);
    impl std::hash::BuildHasher for Fold {
        type Hasher = FoldHasher;
        fn build_hasher(&self) -> FoldHasher {
            FoldHasher(self.0)
        }
    }
    struct Retention;
    impl moka::Expiry<StoreKey, Arc<Value>> for Retention {
        fn expire_after_create(
            &self,
            _key: &StoreKey,
            value: &Arc<Value>,
            _created_at: std::time::Instant,
        ) -> Option<Duration> {
            Some(value.retention)
        }
    }
    const AT_BOUND: u64 = 4 * 1024 * 1024;
    const BELOW_BOUND: u64 = 1 << 40;
    let payload = Bytes::from(vec![b'r'; 200]);
    let fp = Fingerprint::from_bytes([7; 32]);
    // The retention `store_new_key` gives the store's records.
    let retention = Duration::from_secs(86_400);
    let next = AtomicU64::new(0);
    let fresh = || {
        StoreKey::from_parts(
            b"bench",
            &next.fetch_add(1, Ordering::Relaxed).to_be_bytes(),
        )
    };
    let moka_cache = |bound: u64| {
        moka::sync::Cache::builder()
            .max_capacity(bound)
            // 560: the store's charge per record (`RECORD_OVERHEAD` in
            // src/store/memory.rs, private), so both hold as many records.
            .weigher(|_k: &StoreKey, v: &Arc<Value>| {
                u32::try_from(v.payload.len() + 560).unwrap_or(u32::MAX)
            })
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .expire_after(Retention)
            .build_with_hasher(Fold(0x5eed_1234_abcd_0001))
    };
    let moka_insert = |cache: &moka::sync::Cache<StoreKey, Arc<Value>, Fold>, key: StoreKey| {
        if !cache.contains_key(&key) {
            cache.insert(
                key,
                Arc::new(Value {
                    payload: payload.clone(),
                    retention,
                }),
            );
        }
    };
    let rt = runtime();
    let store_insert = |store: &MemoryStore, key: StoreKey| {
        let store = store.clone();
        let payload = payload.clone();
        async move { store_new_key(&store, key, fp, payload).await }
    };
    let below = MemoryStore::builder().max_bytes(BELOW_BOUND).build();
    let at = MemoryStore::builder().max_bytes(AT_BOUND).build();
    let moka_below = moka_cache(BELOW_BOUND);
    let moka_at = moka_cache(AT_BOUND);
    // Three times over the bound, so every insert measured evicts.
    for _ in 0..3 * AT_BOUND / 760 {
        rt.block_on(store_insert(&at, fresh()));
        moka_insert(&moka_at, fresh());
    }
    let mut g = c.benchmark_group("store");
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("memory_store/below_bound", |b| {
        b.to_async(&rt)
            .iter_batched(&fresh, |k| store_insert(&below, k), BatchSize::SmallInput)
    });
    g.bench_function("memory_store/at_bound", |b| {
        b.to_async(&rt)
            .iter_batched(&fresh, |k| store_insert(&at, k), BatchSize::SmallInput)
    });
    g.bench_function("moka_alone/below_bound", |b| {
        b.iter_batched(
            &fresh,
            |k| moka_insert(&moka_below, k),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("moka_alone/at_bound", |b| {
        b.iter_batched(&fresh, |k| moka_insert(&moka_at, k), BatchSize::SmallInput)
    });
    g.finish();
}

criterion_group!(
    benches,
    memory,
    tower_level,
    coalesced,
    fingerprint,
    redis,
    postgres,
    store
);
criterion_main!(benches);
