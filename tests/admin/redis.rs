//! The `idempotency-admin` binary over Redis and Redis Cluster: every
//! command on every state, many keys over several `SCAN` pages, entries of
//! the earlier format, and entries a claim cannot read.

use tower_idempotency::store::RedisStore;

use super::*;
use crate::common::redis_cluster::RedisCluster;
use crate::common::redis_server::{RedisServer, redis_or_skip};
use crate::common::unique;
use crate::tool::{Tool, every_command_on_every_state};

/// The Redis key name of `key` under `prefix`.
fn name_of(prefix: &str, key: StoreKey) -> String {
    format!("{prefix}:{}", key.to_hex())
}

/// A done entry's payload replaced by bytes no reader accepts (the
/// header, and so the fingerprint, kept).
async fn corrupt_redis<C: redis::aio::ConnectionLike + Send>(conn: &mut C, name: &str) {
    let entry: Vec<u8> = redis::cmd("GET").arg(name).query_async(conn).await.unwrap();
    let mut damaged = entry[..59].to_vec();
    damaged.extend_from_slice(b"garbage");
    let _: () = redis::cmd("SET")
        .arg(name)
        .arg(damaged)
        .arg("KEEPTTL")
        .query_async(conn)
        .await
        .unwrap();
}

/// A store on `server` under a prefix of its own, and the tool on the
/// same prefix.
pub(crate) async fn store_and_tool(server: &RedisServer) -> (RedisStore, Tool, String) {
    let prefix = format!("admin{}", unique());
    let store = RedisStore::builder(&server.url())
        .unwrap()
        .prefix(prefix.clone())
        .build()
        .await
        .unwrap();
    let tool = Tool::new(&[
        "--store",
        "redis",
        "--redis-url",
        &server.url(),
        "--prefix",
        &prefix,
    ]);
    (store, tool, prefix)
}

#[tokio::test]
async fn the_tool_on_redis() {
    let Some(server) = redis_or_skip("the_tool_on_redis") else {
        return;
    };
    let (store, tool, prefix) = store_and_tool(&server).await;
    let listing = store.clone();
    let url = server.url();
    every_command_on_every_state(store, tool.clone(), false, async |key| {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        corrupt_redis(&mut conn, &name_of(&prefix, key)).await;
    })
    .await;

    // Many keys: SCAN takes several pages, each key listed once.
    let store = listing;
    let mut conn = server.conn().await;
    let mut pipe = redis::pipe();
    for n in 0..1200u64 {
        let mut entry = format!("2d0{:016}", 1_700_000_000_000_000 + n).into_bytes();
        entry.extend_from_slice(&n.to_be_bytes());
        entry.extend_from_slice(&[7; 32]);
        // The layer's payload of an outcome-unknown answer, status 502.
        entry.extend_from_slice(b"TIDR\x01\x02\x01\xf6");
        let name = name_of(&prefix, StoreKey::from_parts(b"many", &n.to_be_bytes()));
        pipe.cmd("SET")
            .arg(name)
            .arg(entry)
            .arg("EX")
            .arg(600)
            .ignore();
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();
    let many = store
        .list(Some(State::OutcomeUnknown), 10_000)
        .await
        .unwrap();
    assert_eq!(many.len(), 1200);
    let unique: std::collections::HashSet<&str> =
        many.iter().map(|s| s.key_hash.as_str()).collect();
    assert_eq!(unique.len(), 1200);
    assert_eq!(many[0].fence, Some(1_700_000_000_000_000), "oldest first");

    // An entry of the earlier format (a hash) is read as a claim reads it.
    let legacy = name_of(&prefix, key("legacy"));
    let _: () = redis::cmd("HSET")
        .arg(&legacy)
        .arg("v")
        .arg("1")
        .arg("st")
        .arg("d")
        .arg("fence")
        .arg("42")
        .arg("fp")
        .arg(&[7u8; 32][..])
        .arg("pl")
        .arg(&b"TIDR\x01\x02\x01\xf6"[..])
        .query_async(&mut conn)
        .await
        .unwrap();
    let seen = tool.run(&["inspect", "legacy", "--json"]).await.object();
    assert_eq!(seen["state"], "outcome_unknown");
    assert_eq!(seen["fence"], 42);
    let resolved = tool.run(&["resolve", "legacy", "--release"]).await;
    assert_eq!(resolved.code, 0, "{resolved:?}");
    let seen = tool.run(&["inspect", "legacy", "--json"]).await.object();
    assert_eq!(seen["state"], "absent");
    assert_eq!(seen["fence"], 42, "a free entry keeps the fence");

    // Entries a claim cannot read are purged without --force: nobody can
    // own them.
    let header = |state: &str, fence: &str| {
        let mut value = format!("2{state}0{fence}").into_bytes();
        value.extend_from_slice(&[b'n'; 8]);
        value.extend_from_slice(&[b'f'; 32]);
        value
    };
    let far = (std::time::SystemTime::now() + Duration::from_secs(3600))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    for (name, tail) in [
        ("bad-fence", far.clone()),
        ("bad-lease", "soon".to_owned()),
        ("torn-nonces", format!("{far};abc")),
    ] {
        let (state, fence) = match name {
            "bad-fence" => ("i", "00000000000000x2"),
            "bad-lease" => ("i", "0000000000000042"),
            _ => ("f", "0000000000000042"),
        };
        let mut value = header(state, fence);
        value.extend_from_slice(tail.as_bytes());
        let _: () = redis::cmd("SET")
            .arg(name_of(&prefix, key(name)))
            .arg(value)
            .query_async(&mut conn)
            .await
            .unwrap();
        let seen = tool.run(&["inspect", name, "--json"]).await.object();
        assert_eq!(seen["state"], "unreadable", "{name}");
        let purged = tool.run(&["purge", name]).await;
        assert_eq!(purged.code, 0, "{name}: {purged:?}");
        assert!(
            purged.stdout.contains("purged: the key is new"),
            "{name}: {purged:?}"
        );
    }

    // A value that is no entry at all is unreadable too, and purged.
    let mut conn = server.conn().await;
    let name = name_of(&prefix, key("raw"));
    let _: () = redis::cmd("SET")
        .arg(&name)
        .arg("garbage")
        .query_async(&mut conn)
        .await
        .unwrap();
    let raw = tool.run(&["inspect", "raw", "--json"]).await.object();
    assert_eq!(raw["state"], "unreadable");
    assert_eq!(tool.run(&["purge", "raw"]).await.code, 0);
    let gone: bool = redis::cmd("EXISTS")
        .arg(&name)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!gone);
}

#[tokio::test]
async fn the_tool_on_a_redis_cluster() {
    let Some(cluster) = RedisCluster::start_or_skip("the_tool_on_a_redis_cluster") else {
        return;
    };
    let urls = cluster.urls();
    let prefix = format!("admin{}", unique());
    let store = RedisStore::builder(&urls[0])
        .unwrap()
        .prefix(prefix.clone())
        .build_cluster(&urls)
        .await
        .unwrap();
    let seeds = urls.join(",");
    let tool = Tool::new(&[
        "--store",
        "redis-cluster",
        "--redis-url",
        &seeds,
        "--prefix",
        &prefix,
    ]);
    // The keys land on more than one primary: listing reads them all.
    let names: Vec<String> = ["done", "busy", "lost-1", "lost-2"]
        .iter()
        .map(|k| name_of(&prefix, key(k)))
        .collect();
    let primaries: std::collections::HashSet<usize> =
        names.iter().map(|n| cluster.primary_of(n)).collect();
    assert!(primaries.len() > 1, "the test's keys span primaries");
    every_command_on_every_state(store, tool, false, async |key| {
        let client = redis::cluster::ClusterClient::new(urls.clone()).unwrap();
        let mut conn = client.get_async_connection().await.unwrap();
        corrupt_redis(&mut conn, &name_of(&prefix, key)).await;
    })
    .await;
}
