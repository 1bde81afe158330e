//! A randomized fault campaign: the at-most-once promise checked under
//! store, server, network and process faults, on the memory store, on Redis
//! and on Redis Cluster.
//!
//! Several instances (each a layer over its own handle on one shared
//! backend, wrapped in a `FaultStore`) serve many concurrent clients. The
//! clients send keys with duplicates (concurrent and sequential), retry on
//! 409 in flight and 503 like a real client, sometimes change the body
//! under a used key, and sometimes go away mid-request. Handlers record
//! every execution in a ledger and take random time, some longer than the
//! lease. Meanwhile a fault task injects store faults at random: failing
//! before an operation, applying it and losing its reply, delaying it
//! (sometimes a completion by more than a lease: a stall). Instances crash
//! at random: their executions freeze mid-handler, their store handle goes
//! dead, their clients see the connection reset, and a new instance (new
//! layer, new store handle) takes their place. On Redis, a TCP proxy per
//! instance adds latency, drops connections, black-holes them and leaves
//! them half-open, and the server itself is paused, put to sleep, made to
//! forget its scripts, and killed and restarted.
//!
//! At the end a checker judges the whole history: at most one execution
//! per key, every answer for a key byte-identical, no 2xx without a
//! recorded execution, fences that never go backwards, every key
//! answerable once the faults stop, and no execution left running.
//!
//! The seed comes from `TOWER_IDEMPOTENCY_CAMPAIGN_SEED` (default: random,
//! printed) and the duration from `TOWER_IDEMPOTENCY_CAMPAIGN_SECS`
//! (default 8 seconds per backend). A failure prints the seed that
//! reproduces its schedule of choices (thread timing still varies).

#[path = "../common/mod.rs"]
mod common;
mod faults;
mod run;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tower_idempotency::store::MemoryStore;

#[cfg(feature = "redis")]
use faults::{network_faults, server_faults};
use run::{Connect, INSTANCES, Plan, campaign};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_holds_under_random_store_faults_on_the_memory_store() {
    let store = MemoryStore::new();
    let plan = Plan::from_env();
    let connect: Connect<MemoryStore> = Arc::new(move |_| {
        let store = store.clone();
        Box::pin(async move { store })
    });
    campaign("memory", connect, &plan).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_holds_under_random_store_faults_on_redis() {
    let Some(server) = common::redis_server::redis_or_skip("campaign on redis") else {
        return;
    };
    redis_campaign("redis", server, false).await;
}

/// With `appendonly yes` and `appendfsync always`, a `kill -9` loses
/// nothing: a restart explains no double execution.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_holds_under_random_faults_on_a_redis_that_persists_every_write() {
    let Some(server) = common::redis_server::RedisServer::start_with(
        "campaign on persistent redis",
        &["--appendonly", "yes", "--appendfsync", "always"],
    ) else {
        return;
    };
    redis_campaign("redis with appendfsync always", server, true).await;
}

/// The campaign on `server`, with its server and network faults;
/// `persistent` says whether a restart keeps every write (then it explains
/// nothing). Each instance reaches Redis through a fault proxy of its own.
#[cfg(feature = "redis")]
async fn redis_campaign(
    backend: &str,
    server: common::redis_server::RedisServer,
    persistent: bool,
) {
    use common::fault_proxy::FaultProxy;
    use tower_idempotency::store::RedisStore;
    let mut proxies = Vec::new();
    for _ in 0..INSTANCES {
        proxies.push(Arc::new(
            FaultProxy::start(server.addr()).await.expect("a proxy"),
        ));
    }
    let urls: Vec<String> = proxies.iter().map(|p| p.redis_url()).collect();
    let connect: Connect<RedisStore> = Arc::new(move |i| {
        let url = urls[i].clone();
        Box::pin(async move { RedisStore::connect(&url).await.expect("connect") })
    });
    let plan = Plan::from_env();
    let server_faults = server_faults(server, &plan, persistent);
    // The proxies outlive the fault task: the liveness check needs them.
    let network_faults = network_faults(proxies.clone(), &plan);
    campaign(backend, connect, &plan).await;
    let (server_faults, _server) = server_faults.await.expect("the server fault task panicked");
    let network_faults = network_faults
        .await
        .expect("the network fault task panicked");
    eprintln!(
        "campaign on {backend}, seed {}: server faults {server_faults:?}, network faults {network_faults:?}",
        plan.seed
    );
}

/// The campaign on a local three-primary Redis Cluster, each instance with
/// a cluster connection of its own, with the store faults, the crashes, and
/// nodes paused now and then.
#[cfg(feature = "redis-cluster")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_holds_under_random_faults_on_redis_cluster() {
    use redis::cluster_async::ClusterConnection;
    use tower_idempotency::store::RedisStore;
    let Some(cluster) = common::redis_cluster::RedisCluster::start_or_skip("campaign on cluster")
    else {
        return;
    };
    let urls = cluster.urls();
    let connect: Connect<RedisStore<ClusterConnection>> = Arc::new(move |_| {
        let urls = urls.clone();
        Box::pin(async move {
            RedisStore::builder(&urls[0])
                .expect("a URL")
                .build_cluster(&urls)
                .await
                .expect("a cluster connection")
        })
    });
    let plan = Plan::from_env();
    let node_faults = {
        let mut rng = SmallRng::seed_from_u64(plan.seed ^ 0xc105);
        let deadline = Instant::now() + plan.duration;
        let mut conns = Vec::new();
        for primary in &cluster.primaries {
            conns.push(primary.conn().await);
        }
        tokio::spawn(async move {
            let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
                let conn = &mut conns[rng.random_range(0..3)];
                let (name, cmd) = if rng.random_bool(0.6) {
                    let mut cmd = redis::cmd("CLIENT");
                    cmd.arg("PAUSE").arg(rng.random_range(50..400)).arg("ALL");
                    ("CLIENT PAUSE on a primary", cmd)
                } else {
                    let mut cmd = redis::cmd("SCRIPT");
                    cmd.arg("FLUSH");
                    ("SCRIPT FLUSH on a primary", cmd)
                };
                if cmd.query_async::<()>(conn).await.is_ok() {
                    *counts.entry(name).or_default() += 1;
                }
            }
            counts
        })
    };
    campaign("redis cluster", connect, &plan).await;
    let node_faults = node_faults.await.expect("the node fault task panicked");
    eprintln!(
        "campaign on redis cluster, seed {}: node faults {node_faults:?}",
        plan.seed
    );
}

/// The campaign on PostgreSQL, each instance with a store of its own (on
/// one shared pool) on one database of its own, with the store faults and
/// the crashes.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_holds_under_random_faults_on_postgres() {
    use tower_idempotency::store::PostgresStore;
    let Some(db) = common::postgres::TestDatabase::create_or_skip("campaign on postgres") else {
        return;
    };
    let url = db.url.clone();
    let first = PostgresStore::connect(&url).await.expect("a store");
    first.migrate().await.expect("migrate");
    // One pool for every instance: a crashed instance's handlers freeze
    // for good and keep its store, so pools of their own would keep their
    // connections open until the server ran out of them (a process that
    // really crashes closes its connections). Each instance still has its
    // own `LISTEN` connection.
    let config: tokio_postgres::Config = url.parse().expect("a URL");
    let manager = deadpool_postgres::Manager::from_config(
        config.clone(),
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(16)
        .wait_timeout(Some(Duration::from_secs(1)))
        .create_timeout(Some(Duration::from_secs(1)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .expect("a pool");
    let connect: Connect<PostgresStore> = Arc::new(move |_| {
        let (pool, config) = (pool.clone(), config.clone());
        Box::pin(async move {
            PostgresStore::builder_for_pool(pool, Some(config))
                .fallback_check(Duration::from_millis(200))
                .build()
                .expect("a store")
        })
    });
    let plan = Plan::from_env();
    campaign("postgres", connect, &plan).await;
    drop(db);
}
