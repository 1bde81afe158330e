//! The `idempotency-admin` binary, run as an operator runs it: each
//! command on each state (the store-specific tests use it), PostgreSQL, and
//! a store that does not answer.

use std::process::Stdio;

use serde_json::Value;
use tower_idempotency::store::PostgresStore;

use super::*;
use crate::common::postgres::TestDatabase;
use crate::common::unique;

/// The tool with the flags that name a store.
#[derive(Clone)]
pub(crate) struct Tool {
    pub(crate) args: Vec<String>,
}

/// What one run of the tool did.
#[derive(Debug)]
pub(crate) struct Ran {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Ran {
    /// The one JSON object it printed.
    pub(crate) fn object(&self) -> Value {
        assert_eq!(self.code, 0, "{self:?}");
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    /// The JSON objects it printed, one per line.
    pub(crate) fn objects(&self) -> Vec<Value> {
        assert_eq!(self.code, 0, "{self:?}");
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

impl Tool {
    pub(crate) fn new(args: &[&str]) -> Self {
        Self {
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    pub(crate) async fn run(&self, command: &[&str]) -> Ran {
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
pub(crate) struct BodyFile(std::path::PathBuf);

impl BodyFile {
    pub(crate) fn new(body: &[u8]) -> Self {
        let path =
            std::env::temp_dir().join(format!("admin-body-{}-{}", std::process::id(), unique()));
        std::fs::write(&path, body).unwrap();
        Self(path)
    }

    pub(crate) fn path(&self) -> &str {
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
pub(crate) async fn every_command_on_every_state<S>(
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
    // A table an older version made, and not migrated since (a column the
    // tool reads is missing): said so too, from PostgreSQL's SQLSTATE.
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute("ALTER TABLE idempotency_keys DROP COLUMN completed_at")
        .await
        .unwrap();
    let older = tool.run(&["inspect", "k"]).await;
    assert_eq!(older.code, 1, "{older:?}");
    assert!(older.stderr.contains("older than this tool"), "{older:?}");
    store.migrate().await.unwrap();
    // Any other failure of the store has no such hint.
    let down = Tool::new(&[
        "--store",
        "postgres",
        "--postgres-url",
        &format!(
            "postgres://postgres@127.0.0.1:{}/x",
            crate::common::free_port()
        ),
    ])
    .run(&["inspect", "k"])
    .await;
    assert_eq!(down.code, 1, "{down:?}");
    assert!(!down.stderr.contains("migrate"), "{down:?}");
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
