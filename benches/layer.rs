//! What the guarantee costs, in process, each scenario beside its baseline.
//!
//! ```sh
//! cargo bench --all-features --bench layer
//! ```
//!
//! Groups:
//! - `memory`: the bare axum route, a request the layer passes through
//!   (GET, no key), a first request (new key) and a replay, on `MemoryStore`,
//!   the same first request and replay through a hand-written guard on a
//!   moka cache (`floor/*`, the floor SPEC §12 names), and the same
//!   scenarios through the published `axum-idempotent` crate (the peer)
//!   where it can run them.
//! - `tower`: the same without axum (a bare `service_fn` vs the layer over
//!   it), which isolates the layer's own cost from `Router::layer`'s.
//! - `coalesced`: N = 1, 16, 256 concurrent duplicates of one new key.
//! - `fingerprint`: hashing 64 B, 1 KiB, 64 KiB and 1 MiB bodies.
//! - `hot_path`: the primitives a request pays for alone (a `Mutex` lock
//!   with a handle clone, an `Arc`, the two clocks).
//! - `fingerprint_mode` (with `--features json`): a 1 KiB and a 64 KiB JSON
//!   body fingerprinted by its bytes and by its meaning
//!   (`FingerprintMode::bytes` and `FingerprintMode::json`, the whole
//!   request head included), and a 512 KiB body nested 100 objects deep,
//!   each out of order (the worst shape for putting members in order).
//! - `memory/store_alone/first`: the part of `memory/ours/first` spent in the
//!   store, measured alone on the same store.
//! - `store`: what `MemoryStore` spends storing a new key (claim, then
//!   complete) below its byte bound and at it, beside the same inserts into
//!   a bare moka cache configured as the store configures it.
//!
//! The remote stores (Redis, PostgreSQL) have a bench of their own,
//! `remote_stores`.

mod support;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use support::*;
use tower::{ServiceBuilder, ServiceExt};
use tower_idempotency::IdempotencyLayer;
use tower_idempotency::fingerprint::FingerprintHasher;
use tower_idempotency::store::{MemoryStore, Store};

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
    let floor = floor::guarded();
    let theirs = peer::router();
    let cookie = rt.block_on(peer::session_cookie(&theirs));
    // The replayed key, completed once up front.
    rt.block_on(async {
        assert_eq!(
            call(&ours, post_req(Some("replayed"))).await,
            StatusCode::CREATED
        );
        assert_eq!(
            call(&floor, post_req(Some("replayed"))).await,
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
    g.bench_function("floor/first", |b| {
        b.to_async(&rt)
            .iter(|| async { call(&floor, post_req(Some(&fresh_key()))).await })
    });
    g.bench_function("floor/replay", |b| {
        b.to_async(&rt)
            .iter(|| call(&floor, post_req(Some("replayed"))))
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

/// A JSON body of about `size` bytes: line items as a payments API would
/// take them, pretty-printed as clients send them.
#[cfg(feature = "json")]
fn json_body(size: usize) -> Vec<u8> {
    let mut body =
        String::from("{\n  \"amount\": 125000,\n  \"currency\": \"eur\",\n  \"items\": [");
    let mut i = 0;
    while body.len() + 160 < size {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!(
            "\n    {{\"sku\": \"item-{i:05}\", \"quantity\": {}, \"price\": {}.{:02}, \"tags\": [\"a\", \"b\"], \"note\": \"caf\\u00e9 {i}\"}}",
            i % 7 + 1,
            i % 90 + 10,
            i % 100
        ));
        i += 1;
    }
    body.push_str("\n  ],\n  \"metadata\": {\"sent_at\": \"2026-12-07T10:00:00Z\"}\n}");
    body.into_bytes()
}

#[cfg(feature = "json")]
fn fingerprint_mode(c: &mut Criterion) {
    use tower_idempotency::fingerprint::FingerprintMode;
    let (parts, ()) = http::Request::post("/pay?x=1")
        .header("content-type", "application/json")
        .body(())
        .unwrap()
        .into_parts();
    let mut g = c.benchmark_group("fingerprint_mode");
    for size in [1024usize, 64 * 1024] {
        let body = json_body(size);
        // Valid JSON, or the JSON mode would measure its fallback to bytes.
        assert!(serde_json::from_slice::<serde_json::Value>(&body).is_ok());
        g.throughput(Throughput::Bytes(body.len() as u64));
        for (name, mode) in [
            ("bytes", FingerprintMode::bytes()),
            ("json", FingerprintMode::json()),
        ] {
            g.bench_with_input(BenchmarkId::new(name, size), &body, |b, body| {
                b.iter(|| mode.fingerprint(&parts, &[], black_box(body)))
            });
        }
    }
    // The worst shape for putting members in order: 100 objects, one in
    // the other, each with its members out of order, around 512 KiB.
    let deep = format!(
        "{}\"{}\"{}",
        r#"{"z":0,"a":"#.repeat(100),
        "y".repeat(512 * 1024),
        "}".repeat(100)
    )
    .into_bytes();
    assert!(serde_json::from_slice::<serde_json::Value>(&deep).is_ok());
    g.throughput(Throughput::Bytes(deep.len() as u64));
    for (name, mode) in [
        ("bytes_nested", FingerprintMode::bytes()),
        ("json_nested", FingerprintMode::json()),
    ] {
        g.bench_with_input(BenchmarkId::new(name, deep.len()), &deep, |b, body| {
            b.iter(|| mode.fingerprint(&parts, &[], black_box(body)))
        });
    }
    g.finish();
}

#[cfg(not(feature = "json"))]
fn fingerprint_mode(_: &mut Criterion) {}

/// The primitives issue 27 asked about, each alone: what the Redis store
/// pays per operation for its replaceable connection (a `Mutex` locked and
/// the connection handle cloned: two `Arc`s in redis-rs's
/// `ConnectionManager`), the PostgreSQL store per claim (one small `Arc`),
/// every execution (`Instant::now()`) and every memory grant
/// (`SystemTime::now()`), to set beside a request's cost.
fn hot_path(c: &mut Criterion) {
    use std::sync::Mutex;
    let mut g = c.benchmark_group("hot_path");
    let handle = Mutex::new((Arc::new(1u64), Arc::new(2u64)));
    g.bench_function("mutex_lock_and_clone_two_arcs", |b| {
        b.iter(|| black_box(handle.lock().unwrap().clone()))
    });
    let plain = (Arc::new(1u64), Arc::new(2u64));
    g.bench_function("clone_two_arcs", |b| b.iter(|| black_box(plain.clone())));
    g.bench_function("arc_new_64_bytes", |b| {
        b.iter(|| black_box(Arc::new(black_box([0u8; 64]))))
    });
    g.bench_function("instant_now", |b| {
        b.iter(|| black_box(std::time::Instant::now()))
    });
    g.bench_function("system_time_now", |b| {
        b.iter(|| black_box(std::time::SystemTime::now()))
    });
    g.finish();
}

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
    fingerprint_mode,
    hot_path,
    store
);
criterion_main!(benches);
