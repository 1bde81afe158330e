//! `RedisStore` through the outages only Redis has: killed mid-request with
//! nothing kept on disk; claims sent twice, or overtaken by their releases;
//! the bound on queued releases. The outages both remote stores share
//! (killed, frozen, connections dropped, half-open, black-holed or slow,
//! orphans) are one suite, in `outages.rs`.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::redis_server::{RedisServer, redis_or_skip};
use common::redis_store::*;
use common::{Ledger, ledger_request, ledger_request_k, retry_until_available, send};
use http::StatusCode;
use tower::Layer;
use tower_idempotency::IdempotencyLayer;
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::{
    Claim, CompletedRecord, LeaseStatus, RedisStore, Store, StoreErrorKind,
};

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

/// During an outage, orphans (claims whose replies never come back) queue
/// their releases in one bounded queue served by one task, not a task each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_of_orphans_are_bounded_during_an_outage() {
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
    // The release worker, and the few tasks of the connections the store
    // opens after timeouts in a row (one reopening at a time, a dropped
    // connection's driver winding down): a handful, however many claims
    // (3 000 here) never got their replies. (A bound of two failed now and
    // then when the machine was busy: a third connection task was still
    // alive.)
    assert!(
        tasks <= tasks_before + 8,
        "{tasks} tasks alive during the outage (was {tasks_before})"
    );
    assert!(
        (1..=1024).contains(&pending),
        "{pending} releases queued, at most 1 024 kept"
    );
    // Once Redis is back, the queue drains.
    common::eventually(Duration::from_secs(20), "the queue drains", || async {
        store.orphans_pending() == 0
    })
    .await;
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

/// A connection that sends every command twice and answers with the second
/// reply: what a Redis Cluster connection does (`retries`) when the reply
/// to a command it sent never comes back (an I/O error) after the command
/// was applied.
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

/// A claim applied, then sent again (its first reply never came back): the
/// second copy finds the claim its caller made, by its nonce, and answers
/// that grant. Before, it answered "in flight" with the caller's own claim,
/// and the caller waited for itself, the key blocked for a whole lease.
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
        "the token answered is the one the entry names"
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

/// The release of an orphan overtakes the claim (sent on another
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
    // The release of the orphan goes first, and finds nothing.
    until_orphans_released(&store, Duration::from_secs(5)).await;
    // Then the claim arrives.
    go.notify_one();
    delivered.notified().await;
    let claim = plain.claim(key, fp, Duration::from_secs(30)).await.unwrap();
    assert!(
        matches!(claim, Claim::Acquired(_)),
        "the late claim took the key with nobody to own it: {claim:?}"
    );
}

/// Waits until every orphan of `store` is released, failing past `limit`.
async fn until_orphans_released<C>(store: &RedisStore<C>, limit: Duration)
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    common::eventually(limit, "the orphans are released", || async {
        store.orphans_pending() == 0
    })
    .await;
}

/// The same late claims over a real network, through the fault proxy: three
/// claims (two of them for one key) are held in a connection that stopped
/// answering (2 s of latency, past the 200 ms operation timeout); their
/// timeouts make the store replace the connection, so the releases of the
/// orphans go out on the new one, ahead of the claims. When the claims
/// arrive at last, none may take its key: before, they held their keys for
/// their whole lease with nobody to own them, and every duplicate waited on
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_overtaken_by_their_releases_on_a_new_connection_do_not_take_the_keys() {
    let Some(server) = redis_or_skip("late claims through the proxy") else {
        return;
    };
    let (store, proxy) = store_through_proxy(&server, Duration::from_millis(200)).await;
    let plain = store_for(&server).await;
    warm_up(&plain).await;
    // Two orphans of one key (a client retrying through the outage), and
    // one of another.
    let keys: Vec<StoreKey> = [0, 0, 1]
        .iter()
        .map(|i| StoreKey::from_parts(b"", format!("overtaken-{i}").as_bytes()))
        .collect();
    let fp = Fingerprint::of_bytes(b"x");
    let before = script_runs(&server).await;
    proxy.set_latency(Duration::from_secs(2));
    // A first orphan of a key of its own: the release of the first orphan
    // may go out on the stuck connection before the store has replaced it
    // (and so arrive after its claim, which it releases); the others' go
    // out on the new connection.
    let read = proxy.chunks_from_clients();
    let first = {
        let store = store.clone();
        let key = StoreKey::from_parts(b"", b"overtaken-first");
        tokio::spawn(async move { store.claim(key, fp, Duration::from_secs(30)).await })
    };
    common::eventually(
        Duration::from_secs(5),
        "the first claim reaches the proxy",
        || async { proxy.chunks_from_clients() > read },
    )
    .await;
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
    until_orphans_released(&store, Duration::from_secs(10)).await;
    // Eight scripts at least: four releases, then the four late claims.
    common::eventually(
        Duration::from_secs(10),
        "the late claims reach the server",
        || async { script_runs(&server).await >= before + 8 },
    )
    .await;
    for key in [keys[0], keys[2]] {
        let claim = plain.claim(key, fp, Duration::from_secs(30)).await.unwrap();
        assert!(
            matches!(claim, Claim::Acquired(_)),
            "a late claim took its key with nobody to own it: {claim:?}"
        );
    }
}
