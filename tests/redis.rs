//! `RedisStore` against a real `redis-server` started per test.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::redis_server::{RedisServer, redis_or_skip};
use common::{Answer, Ledger, collect, send, serve};
use http::StatusCode;
use tower::Layer;
use tower_idempotency::engine::{Engine, Outcome};
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::{
    Claim, CompletedRecord, LeaseStatus, OwnerToken, RedisStore, Store, StoreErrorKind, conformance,
};
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, Scope};

async fn store_for(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&server.url()).await.expect("connect")
}

/// A running `redis-server` and a store on it, for the conformance suite.
struct RedisFixture {
    store: RedisStore,
    _server: RedisServer,
}

impl conformance::Fixture for RedisFixture {
    type Store = RedisStore;
    fn store(&self) -> &RedisStore {
        &self.store
    }
}

async fn redis_fixture() -> Option<RedisFixture> {
    let server = redis_or_skip("conformance")?;
    Some(RedisFixture {
        store: store_for(&server).await,
        _server: server,
    })
}

mod conformance_on_redis {
    use super::*;
    tower_idempotency::store_conformance_tests!(optional: redis_fixture().await);
}

#[tokio::test]
async fn a_prefix_with_braces_is_refused() {
    let err = RedisStore::builder("redis://127.0.0.1:1")
        .unwrap()
        .prefix("a{b}")
        .build()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("prefix"));
}

fn ledger_request(key: &str, gate: bool) -> http::Request<axum::body::Body> {
    let mut b = http::Request::post("/pay").header("idempotency-key", key);
    if gate {
        b = b.header("x-gate", "1");
    }
    b.body(axum::body::Body::from(r#"{"amount":100}"#)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_request_costs_one_claim_and_one_completion_and_a_replay_one_claim() {
    let Some(server) = redis_or_skip("round_trips") else {
        return;
    };
    let ledger = Ledger::new();
    let svc = IdempotencyLayer::new(store_for(&server).await).layer(ledger.service());
    // Load the scripts first, so the counts below are steady-state.
    send(&svc, ledger_request("warm-up", false)).await;
    server.reset_stats().await;
    let first = send(&svc, ledger_request("k", false)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        server.calls("evalsha").await,
        2,
        "one claim + one completion"
    );
    // Inside each script: one read, the clock, one write; nobody waited, so
    // nothing is published.
    assert_eq!(server.calls("get").await, 2);
    assert_eq!(server.calls("time").await, 2);
    assert_eq!(server.calls("set").await, 2, "each write is one SET … PX");
    assert_eq!(server.calls("pexpire").await, 0);
    assert_eq!(server.calls("hset").await, 0);
    assert_eq!(server.calls("publish").await, 0, "no waiter, no PUBLISH");
    server.reset_stats().await;
    let replay = send(&svc, ledger_request("k", false)).await;
    assert!(replay.replayed());
    assert_eq!(server.calls("evalsha").await, 1, "one claim-or-read");
    // A replay is one GET inside its script: no clock, no write.
    assert_eq!(server.calls("get").await, 1);
    assert_eq!(server.calls("time").await, 0);
    assert_eq!(server.calls("set").await, 0);
    assert_eq!(server.calls("hmget").await, 0);
    assert_eq!(ledger.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_handler_adds_one_extend_per_renewal() {
    let Some(server) = redis_or_skip("renewals") else {
        return;
    };
    let store = store_for(&server).await;
    let engine = Engine::new(store).lease(Duration::from_millis(300));
    let key = StoreKey::from_parts(b"", b"long");
    let fp = Fingerprint::of_bytes(b"x");
    engine
        .run_stored(key, fp, |_| async { Ok::<_, std::io::Error>(Bytes::new()) })
        .await
        .unwrap();
    server.reset_stats().await;
    let key = StoreKey::from_parts(b"", b"long-2");
    let out = engine
        .run_stored(key, fp, |_| async {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            Ok::<_, std::io::Error>(Bytes::from_static(b"done"))
        })
        .await
        .unwrap();
    assert_eq!(out, Outcome::Executed(Bytes::from_static(b"done")));
    // Renewed every 100 ms for 1 s: about ten extends, plus claim and completion.
    let calls = server.calls("evalsha").await;
    assert!(
        (2 + 8..=2 + 11).contains(&calls),
        "claim + ~10 extends + complete, got {calls}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sharing_redis_execute_64_duplicates_once_and_wake_waiters_by_notification() {
    let Some(server) = redis_or_skip("two_instances") else {
        return;
    };
    // A fallback check far longer than the test: only notifications can wake
    // the waiters in time.
    let slow_fallback = |url: String| async move {
        RedisStore::builder(&url)
            .unwrap()
            .fallback_check(Duration::from_secs(30))
            .build()
            .await
            .unwrap()
    };
    let ledger = Ledger::new();
    let a = IdempotencyLayer::new(slow_fallback(server.url()).await)
        .wait_for_in_flight(Duration::from_secs(20))
        .layer(ledger.infallible());
    let b = IdempotencyLayer::new(slow_fallback(server.url()).await)
        .wait_for_in_flight(Duration::from_secs(20))
        .layer(ledger.infallible());
    let (addr_a, addr_b) = (serve(a).await, serve(b).await);
    let entered = ledger.entered.notified();
    let first = tokio::spawn(post_over_http(addr_a, "fleet", true));
    entered.await;
    let mut others = Vec::new();
    let runs_before = script_runs(&server).await;
    for i in 0..63 {
        let addr = if i % 2 == 0 { addr_b } else { addr_a };
        others.push(tokio::spawn(post_over_http(addr, "fleet", true)));
    }
    // Each duplicate claims (and finds the key in flight), then probes the
    // claim it waits on: two script runs each before it sleeps.
    common::eventually(Duration::from_secs(10), "63 duplicates wait", || async {
        script_runs(&server).await >= runs_before + 63 * 2
    })
    .await;
    let opened = std::time::Instant::now();
    ledger.open(64);
    let first = first.await.unwrap();
    for other in others {
        let other = other.await.unwrap();
        assert_eq!(other.status, first.status);
        assert_eq!(other.body, first.body, "all 64 bodies are identical");
        assert!(other.replayed());
    }
    let took = opened.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "waiters woke by notification, not by the 30 s re-check ({took:?})"
    );
    assert_eq!(ledger.count(), 1, "one execution across both instances");
}

fn ledger_request_k() -> http::Request<axum::body::Body> {
    ledger_request("k", false)
}

/// Retries (for up to 5 s) while the store answers 503, as a client would
/// while Redis comes back; returns the first other answer.
async fn retry_until_available<Svc>(
    svc: &Svc,
    request: fn() -> http::Request<axum::body::Body>,
) -> Answer
where
    Svc: tower::Service<
            http::Request<axum::body::Body>,
            Response = http::Response<tower_idempotency::ResponseBody<axum::body::Body>>,
        > + Clone,
    Svc::Error: std::fmt::Debug,
{
    for _ in 0..50 {
        let answer = send(svc, request()).await;
        if answer.status != StatusCode::SERVICE_UNAVAILABLE {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the store did not become available again within 5 s");
}

async fn post_over_http(addr: std::net::SocketAddr, key: &'static str, gate: bool) -> Answer {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let mut req = ledger_request(key, gate);
    *req.uri_mut() = format!("http://{addr}/pay").parse().unwrap();
    let res = client.request(req).await.expect("request");
    collect(res).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_before_a_request_fails_closed_and_recovers() {
    let Some(mut server) = redis_or_skip("down_before") else {
        return;
    };
    let ledger = Ledger::new();
    let svc = IdempotencyLayer::new(store_for(&server).await).layer(ledger.service());
    server.kill();
    let refused = send(&svc, ledger_request("k", false)).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(ledger.count(), 0, "nothing runs unguarded");
    server.restart();
    let answer = retry_until_available(&svc, ledger_request_k).await;
    assert_eq!(answer.status, StatusCode::CREATED, "recovers by itself");
    assert_eq!(ledger.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_request_then_restarted() {
    let Some(mut server) = redis_or_skip("killed_mid_request") else {
        return;
    };
    let ledger = Ledger::new();
    let svc = IdempotencyLayer::new(store_for(&server).await).layer(ledger.service());
    let entered = ledger.entered.notified();
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, ledger_request("k", true)).await }
    });
    entered.await;
    server.kill();
    // During the outage, a retry is refused and does not execute.
    let during = send(&svc, ledger_request("k", false)).await;
    assert_eq!(during.status, StatusCode::SERVICE_UNAVAILABLE);
    ledger.open(1);
    let first = first.await.unwrap();
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "the caller still gets its handler's answer"
    );
    assert_eq!(ledger.count(), 1);
    // Redis comes back empty (no persistence): the claim and the result are
    // gone, so a retry executes again. This is the documented
    // at-least-once-under-store-loss case.
    server.restart();
    let answer = retry_until_available(&svc, ledger_request_k).await;
    assert_eq!(answer.status, StatusCode::CREATED, "recovers");
    assert_eq!(ledger.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_times_out_instead_of_hanging() {
    let Some(server) = redis_or_skip("frozen") else {
        return;
    };
    let store = RedisStore::builder(&server.url())
        .unwrap()
        .operation_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let ledger = Ledger::new();
    let svc = IdempotencyLayer::new(store).layer(ledger.service());
    send(&svc, ledger_request("warm", false)).await;
    server.freeze();
    let started = std::time::Instant::now();
    let refused = send(&svc, ledger_request("k", false)).await;
    let took = started.elapsed();
    server.thaw();
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        took < Duration::from_secs(3),
        "bounded by the command timeout, took {took:?}"
    );
    assert_eq!(ledger.count(), 1, "only the warm-up executed");
    let answer = retry_until_available(&svc, ledger_request_k).await;
    assert_eq!(answer.status, StatusCode::CREATED, "recovers after thaw");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_expired_by_force_fences_out_the_stale_owner() {
    let Some(server) = redis_or_skip("forced_expiry") else {
        return;
    };
    let store = store_for(&server).await;
    let ledger = Ledger::new();
    let svc = IdempotencyLayer::new(store.clone()).layer(ledger.service());
    let entered = ledger.entered.notified();
    let stale = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, ledger_request("k", true)).await }
    });
    entered.await;
    let name = store.key_name(StoreKey::new(
        &Scope::global(),
        &IdempotencyKey::parse(b"k").unwrap(),
    ));
    let _: i64 = redis::cmd("PEXPIRE")
        .arg(&name)
        .arg(1)
        .query_async(&mut server.conn().await)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A new owner executes and stores its result.
    let entered = ledger.entered.notified();
    let newer = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, ledger_request("k", true)).await }
    });
    entered.await;
    // Both owners now run; let them finish. Whatever the order, the stale
    // owner's completion is refused by the fence check.
    ledger.open(2);
    let stale = stale.await.unwrap();
    newer.await.unwrap();
    assert_eq!(
        ledger.count(),
        2,
        "the forced expiry let a second owner run"
    );
    let replay = send(&svc, ledger_request("k", false)).await;
    assert!(replay.replayed());
    assert_eq!(
        replay.headers["x-exec"], "2",
        "the newer owner's result is the one replayed"
    );
    assert_eq!(
        stale.headers["x-exec"], "1",
        "the stale owner's caller got its own execution"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_under_allkeys_lru_voids_the_promise() {
    // Documents why the README asks for `maxmemory-policy noeviction`.
    let Some(server) = RedisServer::start_with(
        "eviction",
        &["--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"],
    ) else {
        return;
    };
    let store = store_for(&server).await;
    let ledger = Ledger::new();
    let svc = IdempotencyLayer::new(store.clone()).layer(ledger.service());
    send(&svc, ledger_request("k", false)).await;
    let name = store.key_name(StoreKey::new(
        &Scope::global(),
        &IdempotencyKey::parse(b"k").unwrap(),
    ));
    let mut conn = server.conn().await;
    let junk = vec![b'j'; 8192];
    for i in 0..2000 {
        let _: () = redis::cmd("SET")
            .arg(format!("junk:{i}"))
            .arg(&junk)
            .query_async(&mut conn)
            .await
            .unwrap();
        let exists: i64 = redis::cmd("EXISTS")
            .arg(&name)
            .query_async(&mut conn)
            .await
            .unwrap();
        if exists == 0 {
            break;
        }
    }
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&name)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0, "the completed record was evicted");
    let again = send(&svc, ledger_request("k", false)).await;
    assert!(!again.replayed());
    assert_eq!(
        ledger.count(),
        2,
        "an evicted record means the key executes again"
    );
}

/// Every `Duration` setting of the layer and of `RedisStore` at its
/// extremes: a first request, an in-flight duplicate (waited for, and
/// refused) and a replay go through without a panic, and `Duration::MAX`
/// saturates to a lease and retention Redis accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_duration_setting_at_zero_or_max_runs_first_duplicate_and_replay_without_a_panic() {
    let Some(server) = redis_or_skip("extreme_durations") else {
        return;
    };
    for extreme in [Duration::MAX, Duration::ZERO] {
        let key = format!("k-{}", extreme.as_secs());
        let store = RedisStore::builder(&server.url())
            .unwrap()
            .operation_timeout(extreme.max(Duration::from_secs(1)))
            .fallback_check(extreme)
            .fence_memory(extreme)
            .build()
            .await
            .unwrap();
        let ledger = Ledger::new();
        let configure = |layer: IdempotencyLayer<RedisStore>| {
            layer.lease(extreme).retention(extreme).retry_after(extreme)
        };
        let svc = configure(IdempotencyLayer::new(store.clone()))
            .wait_for_in_flight(extreme)
            .layer(ledger.service());
        let refusing = configure(IdempotencyLayer::new(store.clone()))
            .reject_in_flight()
            .layer(ledger.service());
        let entered = ledger.entered.notified();
        let first = tokio::spawn({
            let (svc, key) = (svc.clone(), key.clone());
            async move { send(&svc, ledger_request(&key, true)).await }
        });
        entered.await;
        let refused = send(&refusing, ledger_request(&key, false)).await;
        assert_eq!(refused.status, StatusCode::CONFLICT, "{extreme:?}");
        assert!(refused.headers.contains_key("retry-after"));
        let waiting = tokio::spawn({
            let (svc, key) = (svc.clone(), key.clone());
            async move { send(&svc, ledger_request(&key, false)).await }
        });
        ledger.open(1);
        let first = first.await.unwrap();
        assert_eq!(first.status, StatusCode::CREATED);
        let waited = waiting.await.unwrap();
        let replay = send(&svc, ledger_request(&key, false)).await;
        if extreme == Duration::MAX {
            assert_eq!(waited.body, first.body, "the duplicate waited");
            assert!(replay.replayed());
            assert_eq!(replay.body, first.body);
            assert_eq!(ledger.count(), 1);
            let ttl: i64 = redis::cmd("PTTL")
                .arg(store_key_name(&store, &key))
                .query_async(&mut server.conn().await)
                .await
                .unwrap();
            assert!(ttl > 86_400_000, "kept for the saturated retention: {ttl}");
        } else {
            // A 1 ms retention may already have passed: either answer is fine.
            assert!(waited.status.is_success() || waited.status == StatusCode::CONFLICT);
            assert!(replay.status.is_success());
        }
    }
}

fn store_key_name(store: &RedisStore, key: &str) -> String {
    store.key_name(StoreKey::new(
        &Scope::global(),
        &IdempotencyKey::parse(key.as_bytes()).unwrap(),
    ))
}

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
    let token = loop {
        match store.claim(key, fp, Duration::from_secs(30)).await {
            Ok(Claim::Acquired(token)) => break token,
            Ok(other) => panic!("the restarted Redis is empty, got {other:?}"),
            // The connection manager reconnects after the restart.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert!(
        token.fence() > highest,
        "fence {} after the restart is not above {highest}",
        token.fence()
    );
}

/// Loads the scripts and opens the store's connection with one claim.
async fn warm_up(store: &RedisStore) {
    let key = StoreKey::from_parts(b"", b"warm");
    store
        .claim(key, Fingerprint::of_bytes(b"x"), Duration::from_secs(1))
        .await
        .unwrap();
}

/// Claims a key until it is acquired, waiting on it meanwhile; returns how
/// long that took, or `None` after `limit`.
async fn acquire_within(store: &RedisStore, key: StoreKey, limit: Duration) -> Option<Duration> {
    let started = std::time::Instant::now();
    let fp = Fingerprint::of_bytes(b"x");
    while started.elapsed() < limit {
        match store.claim(key, fp, Duration::from_secs(30)).await {
            Ok(Claim::Acquired(_)) => return Some(started.elapsed()),
            Ok(Claim::InFlight { fence, .. }) => {
                let _ = store.wait(key, fence, Duration::from_secs(1)).await;
            }
            Ok(other) => panic!("{other:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    None
}

/// The caller of a claim goes away (the client disconnected) while Redis is
/// paused: the claim is applied once Redis resumes, with nobody to own it.
/// Its release is queued when the caller's future is dropped, so the key is
/// free again long before the claim's 30 s lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_during_a_claim_leaves_no_orphan_claim() {
    let Some(server) = redis_or_skip("orphan_claim") else {
        return;
    };
    let store = store_for(&server).await;
    let other = store_for(&server).await;
    let fp = Fingerprint::of_bytes(b"x");
    // Load the scripts and open the connections first.
    warm_up(&store).await;
    other
        .purge(StoreKey::from_parts(b"", b"warm"))
        .await
        .unwrap();
    let key = StoreKey::from_parts(b"", b"orphan");
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(400)
        .arg("ALL")
        .query_async(&mut server.conn().await)
        .await
        .unwrap();
    // The client goes away while the claim waits for its reply.
    let dropped = tokio::time::timeout(
        Duration::from_millis(100),
        store.claim(key, fp, Duration::from_secs(30)),
    )
    .await;
    assert!(dropped.is_err(), "the claim was still under way");
    let took = acquire_within(&other, key, Duration::from_secs(10)).await;
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(5)),
        "the orphan claim held the key for {took:?}"
    );
}

/// During an outage, claims whose replies are lost queue their releases in
/// one bounded queue served by one task, not a task each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_of_lost_claims_are_bounded_during_an_outage() {
    let Some(server) = redis_or_skip("bounded_releases") else {
        return;
    };
    let store = RedisStore::builder(&server.url())
        .unwrap()
        .operation_timeout(Duration::from_millis(20))
        .build()
        .await
        .unwrap();
    let fp = Fingerprint::of_bytes(b"x");
    warm_up(&store).await;
    let runtime = tokio::runtime::Handle::current().metrics();
    let tasks_before = runtime.num_alive_tasks();
    server.freeze();
    let claims = (0..3000u32).map(|n| {
        let store = store.clone();
        async move {
            let key = StoreKey::from_parts(b"outage", &n.to_be_bytes());
            store.claim(key, fp, Duration::from_secs(30)).await
        }
    });
    let results = futures_util::future::join_all(claims).await;
    assert!(results.iter().all(Result::is_err), "Redis is frozen");
    let tasks = runtime.num_alive_tasks();
    let pending = store.orphans_pending();
    server.thaw();
    assert!(
        tasks <= tasks_before + 2,
        "{tasks} tasks alive during the outage (was {tasks_before})"
    );
    assert!(
        (1..=1024).contains(&pending),
        "{pending} releases queued, at most 1 024 kept"
    );
    // Once Redis is back, the queue drains.
    let started = std::time::Instant::now();
    while store.orphans_pending() > 0 && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.orphans_pending(), 0, "the queue drained");
}

/// Claims refused because Redis is down never reached it: nothing is
/// queued for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_that_never_reached_redis_queue_no_release() {
    let Some(mut server) = redis_or_skip("unsent_claims") else {
        return;
    };
    let store = store_for(&server).await;
    let fp = Fingerprint::of_bytes(b"x");
    warm_up(&store).await;
    server.kill();
    // The first calls may find the old connection broken mid-command.
    for n in 0..5u32 {
        let key = StoreKey::from_parts(b"first", &n.to_be_bytes());
        assert!(store.claim(key, fp, Duration::from_secs(30)).await.is_err());
    }
    // A claim that times out while the connection is being re-established
    // may or may not have been sent: its release is queued. One whose
    // connection was refused was not: nothing is queued for it.
    let (mut refused, mut timed_out) = (0, 0);
    let before = store.orphans_pending();
    for n in 0..20u32 {
        let key = StoreKey::from_parts(b"refused", &n.to_be_bytes());
        let e = store
            .claim(key, fp, Duration::from_secs(30))
            .await
            .unwrap_err();
        match e.kind() {
            StoreErrorKind::Timeout => timed_out += 1,
            _ => refused += 1,
        }
    }
    assert!(refused > 0, "some claims found the connection refused");
    assert_eq!(
        store.orphans_pending(),
        before + timed_out,
        "only the {timed_out} timed-out claims queue a release, not the {refused} refused"
    );
}

/// A store whose connections go through a [`FaultProxy`] to `server`.
async fn store_through_proxy(
    server: &RedisServer,
    timeout: Duration,
) -> (RedisStore, common::fault_proxy::FaultProxy) {
    let proxy = common::fault_proxy::FaultProxy::start(server.addr())
        .await
        .expect("start the proxy");
    let store = RedisStore::builder(&proxy.redis_url())
        .unwrap()
        .operation_timeout(timeout)
        .build()
        .await
        .unwrap();
    warm_up(&store).await;
    (store, proxy)
}

/// A half-open connection (the server's side is gone, the client's never
/// hears of it) never answers and never fails: every command on it times
/// out. The store must notice and open a new connection, not time out
/// forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_connection_is_replaced_after_its_commands_time_out() {
    let Some(server) = redis_or_skip("half-open") else {
        return;
    };
    let timeout = Duration::from_millis(200);
    let (store, proxy) = store_through_proxy(&server, timeout).await;
    let connections = proxy.accepted();
    proxy.half_open();
    let key = StoreKey::from_parts(b"", b"during");
    let e = store
        .claim(key, Fingerprint::of_bytes(b"x"), Duration::from_secs(30))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Timeout, "{e}");
    let recovered = common::first_claim_within(&store, Duration::from_secs(5)).await;
    assert!(
        recovered.is_some(),
        "every command still times out 5 s after the connection went half-open"
    );
    assert!(
        proxy.accepted() > connections,
        "a new connection was opened"
    );
}

/// Dropped connections cost the commands on them, and the next ones
/// reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_are_reopened() {
    let Some(server) = redis_or_skip("dropped connections") else {
        return;
    };
    let (store, proxy) = store_through_proxy(&server, Duration::from_millis(300)).await;
    for _ in 0..3 {
        proxy.drop_connections();
        let took = common::first_claim_within(&store, Duration::from_secs(5)).await;
        assert!(
            took.is_some(),
            "no claim succeeded after the connections dropped"
        );
    }
}

/// A black hole: the commands sent into it time out (bounded, 503), and
/// when it ends their bytes arrive late. The late replies must not be
/// taken for the answers of later commands: each claim gets its own reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_hole_times_out_and_its_late_replies_answer_nobody_else() {
    let Some(server) = redis_or_skip("black hole") else {
        return;
    };
    let timeout = Duration::from_millis(200);
    let (store, proxy) = store_through_proxy(&server, timeout).await;
    let fp = Fingerprint::of_bytes(b"x");
    let lease = Duration::from_secs(30);
    proxy.set_black_hole(true);
    for i in 0..3 {
        let key = StoreKey::from_parts(b"", format!("held-{i}").as_bytes());
        let started = std::time::Instant::now();
        let e = store.claim(key, fp, lease).await.unwrap_err();
        assert_eq!(e.kind(), StoreErrorKind::Timeout, "{e}");
        assert!(started.elapsed() < timeout * 3, "bounded by the timeout");
    }
    proxy.set_black_hole(false);
    // Each key claimed now is acquired once, with a fence of its own, and
    // a second claim sees it in flight: no reply went to the wrong caller.
    let mut fences = std::collections::HashSet::new();
    for i in 0..20 {
        let key = StoreKey::from_parts(b"", format!("after-{i}").as_bytes());
        let token = loop {
            match store.claim(key, fp, lease).await {
                Ok(Claim::Acquired(token)) => break token,
                Ok(other) => panic!("a new key answered {other:?}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        assert!(fences.insert(token.fence()), "fences are unique");
        assert!(
            matches!(
                store.claim(key, fp, lease).await,
                Ok(Claim::InFlight { .. })
            ),
            "the second claim of after-{i} sees it in flight"
        );
    }
}

/// Latency under the timeout slows the store down and changes nothing
/// else; latency over it makes commands time out until it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_slows_commands_and_past_the_timeout_fails_them_until_it_goes() {
    let Some(server) = redis_or_skip("latency") else {
        return;
    };
    let timeout = Duration::from_millis(300);
    let (store, proxy) = store_through_proxy(&server, timeout).await;
    let fp = Fingerprint::of_bytes(b"x");
    proxy.set_latency(Duration::from_millis(40));
    let key = StoreKey::from_parts(b"", b"slow");
    let started = std::time::Instant::now();
    assert!(matches!(
        store.claim(key, fp, Duration::from_secs(30)).await,
        Ok(Claim::Acquired(_))
    ));
    assert!(started.elapsed() >= Duration::from_millis(80), "both ways");
    proxy.set_latency(timeout * 2);
    let e = store
        .claim(
            StoreKey::from_parts(b"", b"too-slow"),
            fp,
            Duration::from_secs(30),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Timeout, "{e}");
    proxy.heal();
    assert!(
        common::first_claim_within(&store, Duration::from_secs(5))
            .await
            .is_some()
    );
}

/// The Redis server's clock in ms.
async fn server_ms(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    secs * 1000 + micros / 1000
}

/// Writes a record the way earlier versions of the crate did (format 1: a
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

/// Records written by an earlier version (format 1) are still read: a
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

/// A value the store did not write (not a record, a record cut short, an
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
        ("not a record", b"hello"),
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

/// `fence_memory` means the same as on PostgreSQL: the record of a claim
/// outlives its lease by the fence memory, renewals included. Each renewal
/// moves the record's life past the new lease; before, a claim renewed for
/// longer than a lease plus the fence memory kept only its lease (the key's
/// time to live fell to the lease), so its record went with its lease.
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
    // Renewed past the record's first life (a lease plus the fence memory).
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
        "the record outlives the renewed lease by less than the fence memory: {ttl} ms left"
    );
}

/// A connection that sends every command twice and answers with the second
/// reply: what a Redis Cluster connection does (`retries`) when the reply
/// to a command it sent is lost to an I/O error after the command was
/// applied.
#[derive(Clone)]
struct SendsTwice(redis::aio::MultiplexedConnection);

impl redis::aio::ConnectionLike for SendsTwice {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let _lost = redis::aio::ConnectionLike::req_packed_command(&mut self.0, cmd).await;
            redis::aio::ConnectionLike::req_packed_command(&mut self.0, cmd).await
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        redis::aio::ConnectionLike::req_packed_commands(&mut self.0, pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        redis::aio::ConnectionLike::get_db(&self.0)
    }
}

/// A claim applied, then sent again (its first reply lost): the second copy
/// finds the claim its caller made, by its nonce, and answers that grant.
/// Before, it answered "in flight" with the caller's own claim, and the
/// caller waited for itself, the key blocked for a whole lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_sent_twice_is_acquired_by_its_caller() {
    let Some(server) = redis_or_skip("claim_sent_twice") else {
        return;
    };
    let store = RedisStore::with_connection(SendsTwice(server.conn().await), None);
    let plain = store_for(&server).await;
    let key = StoreKey::from_parts(b"", b"twice");
    let fp = Fingerprint::of_bytes(b"x");
    let token = match store.claim(key, fp, Duration::from_secs(30)).await {
        Ok(Claim::Acquired(token)) => token,
        other => panic!("the caller found its own claim and did not own it: {other:?}"),
    };
    let record = CompletedRecord {
        fingerprint: fp,
        payload: Bytes::from_static(b"once"),
    };
    assert_eq!(
        store
            .complete(key, token, record.clone(), Duration::from_secs(60))
            .await
            .unwrap(),
        LeaseStatus::Held,
        "the token answered is the one the record names"
    );
    assert_eq!(
        plain.claim(key, fp, Duration::from_secs(30)).await.unwrap(),
        Claim::Completed(record)
    );
}

/// A connection whose first command is held back until `go` is notified,
/// then sent on its own: a claim still queued on a connection that stopped
/// answering, delivered after its caller gave up. That caller gets no
/// answer (it times out); every later command goes straight through, as on
/// the connection that replaced the stuck one.
#[derive(Clone)]
struct HoldsFirstCommand {
    conn: redis::aio::MultiplexedConnection,
    held: std::sync::Arc<std::sync::atomic::AtomicBool>,
    go: std::sync::Arc<tokio::sync::Notify>,
    delivered: std::sync::Arc<tokio::sync::Notify>,
}

impl redis::aio::ConnectionLike for HoldsFirstCommand {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        if self.held.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return redis::aio::ConnectionLike::req_packed_command(&mut self.conn, cmd);
        }
        let (mut conn, cmd) = (self.conn.clone(), cmd.clone());
        let (go, delivered) = (self.go.clone(), self.delivered.clone());
        tokio::spawn(async move {
            go.notified().await;
            let _ = redis::aio::ConnectionLike::req_packed_command(&mut conn, &cmd).await;
            delivered.notify_one();
        });
        Box::pin(std::future::pending::<redis::RedisResult<redis::Value>>())
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        redis::aio::ConnectionLike::req_packed_commands(&mut self.conn, pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        redis::aio::ConnectionLike::get_db(&self.conn)
    }
}

/// The release of a lost claim overtakes the claim (sent on another
/// connection) and finds nothing; then the claim arrives. It must not take
/// the key with nobody to own it: the release left its nonce behind, and
/// the late claim refuses. Before, the late claim held the key for its
/// whole 30 s lease (every duplicate waited, then got 409).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_arrives_after_its_own_release_does_not_take_the_key() {
    let Some(server) = redis_or_skip("late_claim") else {
        return;
    };
    let plain = store_for(&server).await;
    // Loads the scripts into the server's cache, so the held claim is one
    // `EVALSHA` that runs when it arrives (not a `NOSCRIPT` answered to
    // nobody).
    warm_up(&plain).await;
    let stuck = HoldsFirstCommand {
        conn: server.conn().await,
        held: std::sync::Arc::default(),
        go: std::sync::Arc::default(),
        delivered: std::sync::Arc::default(),
    };
    let (go, delivered) = (stuck.go.clone(), stuck.delivered.clone());
    let store = RedisStore::with_connection(stuck, None);
    let key = StoreKey::from_parts(b"", b"late");
    let fp = Fingerprint::of_bytes(b"x");
    let e = store
        .claim(key, fp, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Timeout, "{e}");
    // The release of the lost claim goes first, and finds nothing.
    until_lost_claims_released(&store, Duration::from_secs(5)).await;
    // Then the claim arrives.
    go.notify_one();
    delivered.notified().await;
    let claim = plain.claim(key, fp, Duration::from_secs(30)).await.unwrap();
    assert!(
        matches!(claim, Claim::Acquired(_)),
        "the late claim took the key with nobody to own it: {claim:?}"
    );
}

/// Waits until every lost claim of `store` is released, failing past
/// `limit`.
async fn until_lost_claims_released<C>(store: &RedisStore<C>, limit: Duration)
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    common::eventually(limit, "the lost claims are released", || async {
        store.orphans_pending() == 0
    })
    .await;
}

/// The number of script runs the server has counted (`EVALSHA` and `EVAL`).
async fn script_runs(server: &RedisServer) -> u64 {
    server.calls("evalsha").await + server.calls("eval").await
}

/// The same late claims over a real network, through the fault proxy:
/// three claims (two of them for one key) are held in a connection that
/// stopped answering (2 s of
/// latency, past the 200 ms operation timeout); their timeouts make the
/// store replace the connection, so the releases of the lost claims go out
/// on the new one, ahead of the claims. When the claims arrive at last,
/// none may take its key: before, they held their keys for their whole
/// lease with nobody to own them, and every duplicate waited on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_overtaken_by_their_releases_on_a_new_connection_do_not_take_the_keys() {
    let Some(server) = redis_or_skip("late claims through the proxy") else {
        return;
    };
    let (store, proxy) = store_through_proxy(&server, Duration::from_millis(200)).await;
    let plain = store_for(&server).await;
    warm_up(&plain).await;
    // Two lost claims of one key (a client retrying through the outage),
    // and one of another.
    let keys: Vec<StoreKey> = [0, 0, 1]
        .iter()
        .map(|i| StoreKey::from_parts(b"", format!("overtaken-{i}").as_bytes()))
        .collect();
    let fp = Fingerprint::of_bytes(b"x");
    let before = script_runs(&server).await;
    proxy.set_latency(Duration::from_secs(2));
    // A first lost claim of a key of its own: the release of the first
    // lost claim may go out on the stuck connection before the store has
    // replaced it (and so arrive after its claim, which it releases); the
    // others' go out on the new connection.
    let first = {
        let store = store.clone();
        let key = StoreKey::from_parts(b"", b"overtaken-first");
        tokio::spawn(async move { store.claim(key, fp, Duration::from_secs(30)).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut claims: Vec<_> = keys
        .iter()
        .map(|&key| {
            let store = store.clone();
            tokio::spawn(async move { store.claim(key, fp, Duration::from_secs(30)).await })
        })
        .collect();
    claims.push(first);
    for claim in claims {
        let e = claim.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), StoreErrorKind::Timeout, "{e}");
    }
    // The claims' bytes wait out the latency; what is sent from now on goes
    // at once.
    proxy.set_latency(Duration::ZERO);
    let started = std::time::Instant::now();
    until_lost_claims_released(&store, Duration::from_secs(10)).await;
    // Eight scripts at least: four releases, then the four late claims.
    while script_runs(&server).await < before + 8 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the late claims never reached the server"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for key in [keys[0], keys[2]] {
        let claim = plain.claim(key, fp, Duration::from_secs(30)).await.unwrap();
        assert!(
            matches!(claim, Claim::Acquired(_)),
            "a late claim took its key with nobody to own it: {claim:?}"
        );
    }
}
