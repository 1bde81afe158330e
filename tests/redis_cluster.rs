//! `RedisStore` on a local three-primary Redis Cluster: the store contract,
//! duplicates across two instances, and a dead shard.

mod common;

use std::time::Duration;

use common::redis_cluster::RedisCluster;
use common::{Ledger, send};
use http::StatusCode;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use tower::Layer;
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::{Claim, RedisStore, Store, conformance};
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, Scope};

/// A store on `cluster` through a cluster connection of its own; waiters
/// are woken through pub/sub on the first primary (cluster pub/sub reaches
/// every node).
async fn store_on(cluster: &RedisCluster) -> RedisStore<ClusterConnection> {
    let urls = cluster.urls();
    RedisStore::builder(&urls[0])
        .expect("a URL")
        .build_cluster(&urls)
        .await
        .expect("cluster connection")
}

/// The same through `with_connection`, on a cluster connection built by
/// hand.
async fn store_by_hand(cluster: &RedisCluster) -> RedisStore<ClusterConnection> {
    let client = ClusterClient::builder(cluster.urls())
        .connection_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_millis(500))
        .retries(1)
        .build()
        .expect("cluster client");
    let conn = client
        .get_async_connection()
        .await
        .expect("cluster connection");
    let notifications = redis::Client::open(cluster.urls()[0].as_str()).expect("client");
    RedisStore::with_connection(conn, Some(notifications))
}

fn request(key: &str) -> http::Request<axum::body::Body> {
    http::Request::post("/pay")
        .header("idempotency-key", key)
        .header("x-gate", "1")
        .body(axum::body::Body::from(r#"{"amount":100}"#))
        .unwrap()
}

/// Over TLS (clients and the cluster bus), with the private CA: every node
/// is dialled at the address `CLUSTER SLOTS` gives (127.0.0.1, which the
/// certificate names), the pub/sub connection too; without the CA the
/// store is not built.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_contract_holds_on_a_cluster_over_tls() {
    let Some(certs) = common::tls::TestCerts::make_or_skip("cluster over TLS") else {
        return;
    };
    let Some(cluster) = RedisCluster::start_tls_or_skip("cluster over TLS", &certs) else {
        return;
    };
    let urls = cluster.urls();
    assert!(urls[0].starts_with("rediss://"), "{urls:?}");
    let refused = RedisStore::builder(&urls[0])
        .expect("a URL")
        .operation_timeout(Duration::from_millis(500))
        .build_cluster(&urls)
        .await;
    let e = refused.expect_err("Mozilla's roots do not hold the test CA");
    let chain = common::error_chain(&e);
    assert!(chain.contains("invalid peer certificate"), "{chain}");
    let store = RedisStore::builder(&urls[0])
        .expect("a URL")
        .tls_ca_file(&certs.ca)
        .fallback_check(Duration::from_secs(60))
        .build_cluster(&urls)
        .await
        .expect("a cluster connection over TLS");
    conformance::run_all(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_contract_holds_on_a_cluster() {
    let Some(cluster) = RedisCluster::start_or_skip("cluster conformance") else {
        return;
    };
    let store = store_on(&cluster).await;
    conformance::run_all(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_a_cluster_execute_32_duplicates_once() {
    let Some(cluster) = RedisCluster::start_or_skip("cluster duplicates") else {
        return;
    };
    let ledger = Ledger::new();
    let a = IdempotencyLayer::new(store_on(&cluster).await).layer(ledger.service());
    let b = IdempotencyLayer::new(store_by_hand(&cluster).await).layer(ledger.service());
    // The first one executes (and waits at the gate); then 31 duplicates,
    // alternating instances.
    let entered = ledger.entered.notified();
    let first = a.clone();
    let mut calls = vec![tokio::spawn(
        async move { send(&first, request("dup")).await },
    )];
    entered.await;
    for i in 1..32 {
        let svc = if i % 2 == 0 { a.clone() } else { b.clone() };
        calls.push(tokio::spawn(
            async move { send(&svc, request("dup")).await },
        ));
    }
    ledger.open(32);
    common::all_created_alike(calls).await;
    assert_eq!(ledger.count(), 1, "one execution across both instances");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_primary_dead_its_keys_get_503_and_the_others_keep_working() {
    let Some(mut cluster) = RedisCluster::start_or_skip("cluster dead shard") else {
        return;
    };
    let store = store_on(&cluster).await;
    let ledger = Ledger::new();
    let svc = IdempotencyLayer::new(store.clone()).layer(ledger.service());
    // One key served by the first primary, one by another.
    let shard_of = |key: &str| {
        let store_key = StoreKey::new(
            &Scope::global(),
            &IdempotencyKey::parse(key.as_bytes()).unwrap(),
        );
        cluster.primary_of(&store.key_name(store_key))
    };
    let keys: Vec<String> = (0..200).map(|n| format!("k{n}")).collect();
    let dead_key = keys.iter().find(|k| shard_of(k) == 0).unwrap().clone();
    let live_key = keys.iter().find(|k| shard_of(k) != 0).unwrap().clone();
    cluster.primaries[0].kill();
    ledger.open(10);
    let dead = send(&svc, request(&dead_key)).await;
    assert_eq!(
        dead.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        dead.text()
    );
    assert_eq!(ledger.count(), 0, "nothing ran for the dead shard's key");
    let live = send(&svc, request(&live_key)).await;
    assert_eq!(live.status, StatusCode::CREATED, "{}", live.text());
    let again = send(&svc, request(&live_key)).await;
    assert!(again.replayed());
    assert_eq!(ledger.count(), 1);
}

/// A cluster whose primaries announce a fault proxy in front of each
/// (`cluster-announce-port`), so that every connection a cluster client
/// opens, to the seeds and to the nodes they redirect to, goes through a
/// proxy. Returns the cluster and the proxies, in the primaries' order.
async fn cluster_behind_proxies(
    test: &str,
) -> Option<(RedisCluster, Vec<common::fault_proxy::FaultProxy>)> {
    let cluster = RedisCluster::start_unformed_or_skip(test)?;
    let mut proxies = Vec::new();
    for primary in &cluster.primaries {
        let proxy = common::fault_proxy::FaultProxy::start(primary.addr())
            .await
            .expect("start a proxy");
        let mut conn = primary.conn().await;
        // The bus stays direct: only clients go through the proxy.
        for (name, port) in [
            ("cluster-announce-port", proxy.addr().port()),
            ("cluster-announce-bus-port", primary.port + 10_000),
        ] {
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg(name)
                .arg(port)
                .query_async(&mut conn)
                .await
                .expect("CONFIG SET");
        }
        proxies.push(proxy);
    }
    cluster.form();
    Some((cluster, proxies))
}

/// Issue 22, item 13: a cluster connection re-sends a command after an I/O
/// error, even when the first copy was applied. Here the answer to a claim
/// never comes back (the proxy in front of its primary swallows it and
/// drops the connection), so the claim reaches Redis twice: the second copy
/// must find the caller's own claim by its nonce and answer it `Acquired`.
/// Before, it answered "in flight" with the caller's own claim: the request
/// waited on itself and the key was blocked for a lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_resent_after_its_answer_was_lost_is_acquired_by_its_caller() {
    let Some((cluster, proxies)) = cluster_behind_proxies("cluster re-sent claim").await else {
        return;
    };
    let seeds: Vec<String> = proxies.iter().map(|p| p.redis_url()).collect();
    let store = RedisStore::builder(&seeds[0])
        .expect("a URL")
        .build_cluster(&seeds)
        .await
        .expect("cluster connection through the proxies");
    let fp = tower_idempotency::fingerprint::Fingerprint::of_bytes(b"x");
    // Every node has a connection, and the scripts are loaded.
    for n in 0..32 {
        let key = StoreKey::from_parts(b"", format!("warm-{n}").as_bytes());
        store
            .claim(key, fp, Duration::from_secs(30))
            .await
            .expect("a claim through the proxies");
    }
    let key = StoreKey::from_parts(b"", b"resent");
    let primary = cluster.primary_of(&store.key_name(key));
    let before = cluster.primaries[primary].calls("evalsha").await;
    proxies[primary].swallow_answers(1);
    let claim = store.claim(key, fp, Duration::from_secs(30)).await;
    assert_eq!(
        cluster.primaries[primary].calls("evalsha").await,
        before + 2,
        "the claim reached its primary twice"
    );
    assert!(
        matches!(claim, Ok(Claim::Acquired(_))),
        "the caller did not own its own claim: {claim:?}"
    );
}
