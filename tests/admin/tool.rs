//! The `idempotency-admin` binary, run as an operator runs it, over Redis,
//! Redis Cluster and PostgreSQL.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt as _};
use tower_idempotency::store::{PostgresStore, RedisStore};

use super::*;
use crate::common::postgres::TestDatabase;
use crate::common::redis_cluster::RedisCluster;
use crate::common::redis_server::redis_or_skip;
use crate::common::unique;

/// The tool with the flags that name a store.
#[derive(Clone)]
struct Tool {
    args: Vec<String>,
}

/// What one run of the tool did.
#[derive(Debug)]
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// The one JSON object it printed.
    fn object(&self) -> Value {
        assert_eq!(self.code, 0, "{self:?}");
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    /// The JSON objects it printed, one per line.
    fn objects(&self) -> Vec<Value> {
        assert_eq!(self.code, 0, "{self:?}");
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

impl Tool {
    fn new(args: &[&str]) -> Self {
        Self {
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    async fn run(&self, command: &[&str]) -> Ran {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_idempotency-admin"));
        cmd.args(&self.args)
            .args(command)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for var in [
            "IDEMPOTENCY_STORE",
            "IDEMPOTENCY_REDIS_URL",
            "IDEMPOTENCY_POSTGRES_URL",
            "IDEMPOTENCY_REDIS_PREFIX",
            "IDEMPOTENCY_POSTGRES_TABLE",
            "IDEMPOTENCY_TLS_CA_FILE",
        ] {
            cmd.env_remove(var);
        }
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .expect("the tool ends within a minute")
            .expect("the tool runs");
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// A file holding `body`, removed when dropped.
struct BodyFile(std::path::PathBuf);

impl BodyFile {
    fn new(body: &[u8]) -> Self {
        let path =
            std::env::temp_dir().join(format!("admin-body-{}-{}", std::process::id(), unique()));
        std::fs::write(&path, body).unwrap();
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for BodyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Every command on every state, through the tool, with the layer in front
/// of the same store making the states as requests do. `corrupt` damages
/// the record of a key in the store itself; `labels` says whether the
/// store keeps method and path.
async fn every_command_on_every_state<S>(
    store: S,
    tool: Tool,
    labels: bool,
    corrupt: impl AsyncFn(StoreKey),
) where
    S: Store + Admin,
{
    let ledger = Ledger::new();
    let svc = IdempotencyLayer::new(store.clone()).layer(ledger.service());

    // Absent.
    let absent = tool.run(&["inspect", "nothing", "--json"]).await.object();
    assert_eq!(absent["state"], "absent");
    assert_eq!(absent["key_hash"], key("nothing").to_hex());
    assert!(absent["fence"].is_null());
    assert_eq!(tool.run(&["purge", "nothing"]).await.code, 0);

    // Completed: its status, never its body unless asked.
    assert_eq!(
        send(&svc, req(Some("done"), "{}")).await.status,
        StatusCode::CREATED
    );
    let done = tool.run(&["inspect", "done", "--json"]).await;
    assert!(
        !done.stdout.contains("exec-1"),
        "a body only with --body: {done:?}"
    );
    let done = done.object();
    assert_eq!(done["state"], "completed");
    assert_eq!(done["status"], 201);
    assert!(done["fence"].as_u64().is_some());
    assert!(done["age_seconds"].as_f64().unwrap() < 60.0);
    if labels {
        assert_eq!(done["method"], "POST");
        assert_eq!(done["path"], "/pay");
        assert!(done["completed_at"].is_string());
    } else {
        assert!(done["method"].is_null());
    }
    let with_body = tool
        .run(&["inspect", "done", "--json", "--body"])
        .await
        .object();
    assert!(with_body["body"].as_str().unwrap().starts_with("exec-1:"));
    let table = tool.run(&["inspect", "done"]).await;
    assert_eq!(table.code, 0);
    assert!(
        table.stdout.contains("completed") && table.stdout.contains("201"),
        "{table:?}"
    );
    let refused = tool.run(&["resolve", "done", "--release"]).await;
    assert_eq!(
        refused.code, 1,
        "a completed key is not resolved: {refused:?}"
    );
    assert!(refused.stderr.contains("refused"), "{refused:?}");

    // In flight: purging it needs --force.
    let label = RequestLabel::new("PUT", "/orders/7");
    let claim = store
        .claim_labelled(key("busy"), Fingerprint::from_bytes([1; 32]), LEASE, &label)
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired(_)));
    let busy = tool.run(&["inspect", "busy", "--json"]).await.object();
    assert_eq!(busy["state"], "in_flight");
    assert!(busy["lease_left_ms"].as_u64().unwrap() > 50_000);
    if labels {
        assert_eq!(busy["path"], "/orders/7");
    }
    let refused = tool.run(&["purge", "busy"]).await;
    assert_eq!(refused.code, 1, "{refused:?}");
    for (k, state) in [("busy", "in_flight"), ("nothing", "absent")] {
        let refused = tool.run(&["resolve", k, "--release"]).await;
        assert_eq!(refused.code, 1, "{refused:?}");
        assert!(refused.stderr.contains(state), "{refused:?}");
    }
    assert_eq!(
        tool.run(&["inspect", "busy", "--json"]).await.object()["state"],
        "in_flight"
    );

    // Outcome unknown: listed, then resolved both ways.
    for k in ["lost-1", "lost-2"] {
        send(&svc, unknown_outcome(k)).await;
        assert_eq!(
            send(&svc, unknown_outcome(k)).await.status,
            StatusCode::CONFLICT
        );
    }
    let lost = tool
        .run(&["list", "--state", "outcome-unknown", "--json"])
        .await
        .objects();
    assert_eq!(lost.len(), 2, "{lost:?}");
    assert!(lost.iter().all(|o| o["state"] == "outcome_unknown"));
    let hashes: Vec<&str> = lost
        .iter()
        .map(|o| o["key_hash"].as_str().unwrap())
        .collect();
    assert!(hashes.contains(&key("lost-1").to_hex().as_str()));
    let body = BodyFile::new(b"{\"id\":\"pay_1\",\"checked\":true}");
    let resolved = tool
        .run(&[
            "resolve",
            "lost-1",
            "--respond-status",
            "201",
            "--respond-header",
            "Content-Type: application/json",
            "--respond-header",
            "X-Resolved-By: ops",
            "--respond-body",
            body.path(),
        ])
        .await;
    assert_eq!(resolved.code, 0, "{resolved:?}");
    let executed = ledger.count();
    let retry = send(&svc, unknown_outcome("lost-1")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(&retry.body[..], b"{\"id\":\"pay_1\",\"checked\":true}");
    assert_eq!(retry.headers["content-type"], "application/json");
    assert_eq!(retry.headers["x-resolved-by"], "ops");
    let released = tool.run(&["resolve", "lost-2", "--release"]).await;
    assert_eq!(released.code, 0, "{released:?}");
    let retry = send(&svc, req(Some("lost-2"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed());
    assert_eq!(ledger.count(), executed + 1, "the released key executed");
    let again = tool.run(&["resolve", "lost-1", "--release"]).await;
    assert_eq!(again.code, 1, "a resolved key is completed: {again:?}");

    // A body that is not text comes back in base64, and only when asked.
    send(&svc, unknown_outcome("lost-3")).await;
    let binary = BodyFile::new(&[0xff, 0xfe, 0x00]);
    let resolved = tool
        .run(&[
            "resolve",
            "lost-3",
            "--respond-status",
            "200",
            "--respond-body",
            binary.path(),
        ])
        .await;
    assert_eq!(resolved.code, 0, "{resolved:?}");
    let seen = tool
        .run(&["inspect", "lost-3", "--json", "--body"])
        .await
        .object();
    assert_eq!(seen["body_base64"], "//4A");
    assert!(seen["body"].is_null());
    let seen = tool.run(&["inspect", "lost-3", "--json"]).await.object();
    assert!(seen["body_base64"].is_null() && seen["body_bytes"] == 3);

    // Unreadable: refused with 500, purged, then executed.
    corrupt(key("done")).await;
    let broken = tool.run(&["inspect", "done", "--json"]).await.object();
    assert_eq!(broken["state"], "unreadable");
    assert!(broken["problem"].is_string());
    let refused = send(&svc, req(Some("done"), "{}")).await;
    assert_eq!(refused.status, StatusCode::INTERNAL_SERVER_ERROR);
    let listed = tool
        .run(&["list", "--state", "unreadable", "--json"])
        .await
        .objects();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["key_hash"], key("done").to_hex());

    // Listing: every line parses; a limit holds; a table for a person.
    let all = tool.run(&["list", "--json"]).await.objects();
    let states: Vec<&str> = all.iter().map(|o| o["state"].as_str().unwrap()).collect();
    for state in ["completed", "in_flight", "unreadable"] {
        assert!(states.contains(&state), "{state} in {states:?}");
    }
    let one = tool
        .run(&["list", "--state", "completed", "--limit", "1", "--json"])
        .await
        .objects();
    assert_eq!(one.len(), 1);
    let table = tool.run(&["list"]).await;
    assert!(table.stdout.starts_with("KEY_HASH"), "{table:?}");

    let purged = tool.run(&["purge", "done"]).await;
    assert_eq!(purged.code, 0, "{purged:?}");
    let executed = ledger.count();
    assert_eq!(
        send(&svc, req(Some("done"), "{}")).await.status,
        StatusCode::CREATED
    );
    assert_eq!(ledger.count(), executed + 1, "the purged key executed");
    assert_eq!(tool.run(&["purge", "busy", "--force"]).await.code, 0);
    assert_eq!(
        tool.run(&["inspect", "busy", "--json"]).await.object()["state"],
        "absent"
    );

    // Bad usage.
    for usage in [
        &["inspect", "a,b"][..],
        &["list", "--limit", "0"],
        &["list", "--state", "absent"],
        &["resolve", "k"],
        &[
            "resolve",
            "k",
            "--respond-status",
            "201",
            "--respond-body",
            "/nonexistent/file",
        ],
        &[
            "resolve",
            "k",
            "--respond-status",
            "201",
            "--respond-header",
            "bad",
        ],
    ] {
        let ran = tool.run(usage).await;
        assert_eq!(ran.code, 2, "{usage:?}: {ran:?}");
    }
}

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

#[tokio::test]
async fn the_tool_on_redis() {
    let Some(server) = redis_or_skip("the_tool_on_redis") else {
        return;
    };
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
    let url = server.url();
    every_command_on_every_state(store, tool.clone(), false, async |key| {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        corrupt_redis(&mut conn, &name_of(&prefix, key)).await;
    })
    .await;

    // Many keys: SCAN takes several pages, each key listed once.
    let store = RedisStore::builder(&server.url())
        .unwrap()
        .prefix(prefix.clone())
        .build()
        .await
        .unwrap();
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
    let tool = Tool::new(&[
        "--store",
        "redis",
        "--redis-url",
        &server.url(),
        "--prefix",
        &prefix,
    ]);
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

#[tokio::test]
async fn the_tool_on_postgres() {
    let Some(db) = TestDatabase::create_or_skip("the_tool_on_postgres") else {
        return;
    };
    let store = PostgresStore::connect(&db.url).await.unwrap();
    // The tool creates no table: a missing one is an error that says so.
    let tool = Tool::new(&["--store", "postgres", "--postgres-url", &db.url]);
    let missing = tool.run(&["inspect", "k"]).await;
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(missing.stderr.contains("migrate"), "{missing:?}");
    store.migrate().await.unwrap();
    let url = db.url.clone();
    every_command_on_every_state(store, tool, true, async |key| {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let changed = client
            .execute(
                "UPDATE idempotency_keys SET payload = 'garbage'::bytea WHERE key = $1",
                &[&key.as_bytes().as_slice()],
            )
            .await
            .unwrap();
        assert_eq!(changed, 1);
    })
    .await;
}

#[tokio::test]
async fn a_store_that_does_not_answer_exits_1_and_bad_settings_2() {
    let port = crate::common::free_port();
    let tool = Tool::new(&[
        "--store",
        "redis",
        "--redis-url",
        &format!("redis://127.0.0.1:{port}"),
    ]);
    for command in [
        &["inspect", "key-Zq9x", "--scope", "tenant-Wv3"][..],
        &["purge", "key-Zq9x", "--scope-raw", "tenant-Wv3"],
        &["resolve", "key-Zq9x", "--release"],
    ] {
        let ran = tool.run(command).await;
        assert_eq!(ran.code, 1, "{ran:?}");
        assert!(ran.stderr.contains("error"), "{ran:?}");
        let said = format!("{}{}", ran.stdout, ran.stderr);
        assert!(
            !said.contains("Zq9x") && !said.contains("Wv3"),
            "never the key nor the scope: {ran:?}"
        );
    }
    let ran = Tool::new(&["--store", "memcached"]).run(&["list"]).await;
    assert_eq!(ran.code, 2, "{ran:?}");
    let ran = Tool::new(&["--store", "redis", "--redis-url", "not a url"])
        .run(&["list"])
        .await;
    assert_eq!(ran.code, 2, "a setting the store refuses: {ran:?}");
    let ran = Tool::new(&["--store", "postgres", "--table", "Bad-Name"])
        .run(&["list"])
        .await;
    assert_eq!(ran.code, 2, "{ran:?}");
    let ran = tool
        .run(&["inspect", "k", "--scope", "a", "--scope-raw", "b"])
        .await;
    assert_eq!(ran.code, 2, "one scope: {ran:?}");
}

/// An upstream that reads each request and closes the connection without
/// answering: the sidecar cannot know whether it acted.
async fn start_resetting_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let count = received.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                // The head, then as many body bytes as it announces.
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&seen).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if seen.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                let _ = socket.shutdown().await;
            });
        }
    });
    (addr, received)
}

/// An outcome-unknown key made for real (the sidecar in front of an
/// upstream that resets after the request was sent), found by the scope
/// the client sent, and resolved both ways through the sidecar.
#[cfg(feature = "sidecar")]
#[tokio::test]
async fn outcome_unknown_from_the_sidecar_resolved_both_ways() {
    use crate::common::sidecar::{Sidecar, client, config};
    use tower_idempotency::sidecar::scope_from_header;

    let Some(server) = redis_or_skip("outcome_unknown_from_the_sidecar_resolved_both_ways") else {
        return;
    };
    let prefix = format!("admin{}", unique());
    let store = RedisStore::builder(&server.url())
        .unwrap()
        .prefix(prefix.clone())
        .build()
        .await
        .unwrap();
    let (upstream, received) = start_resetting_upstream().await;
    let layer = IdempotencyLayer::new(store)
        .scope(scope_from_header(http::HeaderName::from_static("x-tenant")));
    let sidecar = Sidecar::start(layer, config(upstream)).await;
    let addr = sidecar.addr;
    let call = |key: &'static str| async move {
        let req = http::Request::post(format!("http://{addr}/charge"))
            .header("idempotency-key", key)
            .header("x-tenant", "acme")
            .body(Body::from("{\"amount\":100}"))
            .unwrap();
        crate::common::collect(client().request(req).await.unwrap()).await
    };
    for k in ["pay-1", "pay-2"] {
        assert_eq!(call(k).await.status, StatusCode::BAD_GATEWAY);
        let retry = call(k).await;
        assert_eq!(retry.status, StatusCode::CONFLICT);
        assert!(retry.problem_type().ends_with("#variant.OutcomeUnknown"));
    }
    assert_eq!(received.load(Ordering::SeqCst), 2);

    let tool = Tool::new(&[
        "--store",
        "redis",
        "--redis-url",
        &server.url(),
        "--prefix",
        &prefix,
    ]);
    let unscoped = tool.run(&["inspect", "pay-1", "--json"]).await.object();
    assert_eq!(unscoped["state"], "absent", "the scope is part of the key");
    let seen = tool
        .run(&["inspect", "pay-1", "--scope", "acme", "--json"])
        .await
        .object();
    assert_eq!(seen["state"], "outcome_unknown");
    assert_eq!(seen["status"], 502);

    let body = BodyFile::new(b"{\"id\":\"ch_1\",\"amount\":100}");
    let resolved = tool
        .run(&[
            "resolve",
            "pay-1",
            "--scope",
            "acme",
            "--respond-status",
            "201",
            "--respond-header",
            "Content-Type: application/json",
            "--respond-body",
            body.path(),
        ])
        .await;
    assert_eq!(resolved.code, 0, "{resolved:?}");
    let retry = call("pay-1").await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(&retry.body[..], b"{\"id\":\"ch_1\",\"amount\":100}");

    let released = tool
        .run(&["resolve", "pay-2", "--scope", "acme", "--release"])
        .await;
    assert_eq!(released.code, 0, "{released:?}");
    assert_eq!(call("pay-2").await.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        received.load(Ordering::SeqCst),
        3,
        "the released key reached the upstream again; the resolved one did not"
    );
    sidecar.shutdown().await;
}
