//! `PostgresStore` against a real PostgreSQL: the store contract,
//! migrations and table names, waking waiters, cleanup, and the fence
//! memory. The fence in the handler's transaction is in
//! `postgres_fence.rs`; outages in `postgres_outages.rs` and, with the
//! Redis store's, in `outages.rs`.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::postgres::{FP, LEASE, TestDatabase, connect, pg_fixture};
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::postgres::DEFAULT_TABLE;
use tower_idempotency::store::{
    Claim, CompletedRecord, LeaseStatus, PostgresStore, Store, StoreErrorKind,
};

mod conformance_on_postgres {
    use super::*;
    tower_idempotency::store_conformance_tests!(optional: pg_fixture("conformance").await);
}

/// A store on the database at `url` whose fallback check (30 s) is past
/// every test's bound: within a test, only a notification or a lease's end
/// wakes its waiters.
fn waking_on_notifications(url: &str) -> PostgresStore {
    PostgresStore::builder(url)
        .unwrap()
        .fallback_check(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Waits until a waiter on `table` (in the database of `url`) has probed
/// its key: registered for notifications, then looked (the probe is the
/// only statement that starts `WITH live AS (SELECT waited,`).
async fn until_probed(url: &str, table: &str) {
    let client = connect(url).await;
    let probe = format!("WITH live AS (%SELECT waited,%FROM \"{table}\"%");
    common::eventually(Duration::from_secs(10), "the waiter probes", || {
        let (client, probe) = (&client, &probe);
        async move {
            client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND query LIKE $1",
                    &[probe],
                )
                .await
                .is_ok_and(|row| row.get::<_, i64>(0) > 0)
        }
    })
    .await;
}

/// Every instance may migrate at start-up, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_instances_can_migrate_at_once() {
    let Some(db) = TestDatabase::create_or_skip("concurrent migrate") else {
        return;
    };
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = db.url.clone();
        tasks.push(tokio::spawn(async move {
            let store = PostgresStore::builder(&url).unwrap().build().unwrap();
            store.migrate().await
        }));
    }
    for task in tasks {
        task.await.unwrap().expect("migrate");
    }
    let client = connect(&db.url).await;
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE tablename = $1",
            &[&DEFAULT_TABLE],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i64>(0),
        3,
        "the primary key, expires_at, and (fence, key) for an operator's listing"
    );
}

/// Building needs no runtime (a store can be made in a plain `main` or a
/// static): the cleanup task starts with the first operation.
#[test]
fn a_store_is_built_outside_a_runtime_without_a_panic() {
    let store = PostgresStore::builder("postgres://postgres@127.0.0.1/postgres")
        .unwrap()
        .build();
    assert!(store.is_ok());
}

#[tokio::test]
async fn table_names_that_are_not_plain_identifiers_are_refused() {
    for bad in ["Keys", "a;drop table x", "schema.t", ""] {
        let e = PostgresStore::builder("postgres://postgres@127.0.0.1/postgres")
            .unwrap()
            .table(bad)
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("identifier"), "{bad}: {e}");
        assert_eq!(e.kind(), StoreErrorKind::Configuration);
    }
    let e = PostgresStore::builder("not a url ://").unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Configuration);
}

/// A waiter is woken by `NOTIFY` long before its fallback check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_woken_by_notify_across_handles() {
    let Some(db) = TestDatabase::create_or_skip("notify") else {
        return;
    };
    let build = || waking_on_notifications(&db.url);
    let (owner, waiter) = (build(), build());
    owner.migrate().await.unwrap();
    let key = StoreKey::from_parts(b"", b"wake");
    let Ok(Claim::Acquired(token)) = owner.claim(key, FP, Duration::from_secs(30)).await else {
        panic!("acquired");
    };
    let waiting = tokio::spawn(async move {
        let started = std::time::Instant::now();
        waiter
            .wait(key, token.fence(), Duration::from_secs(20))
            .await
            .unwrap();
        started.elapsed()
    });
    // The waiter listens, then probes: once its probe ran, only a
    // notification wakes it before its 30 s fallback check.
    until_probed(&db.url, DEFAULT_TABLE).await;
    let record = CompletedRecord {
        fingerprint: FP,
        payload: Bytes::from_static(b"done"),
    };
    assert_eq!(
        owner
            .complete(key, token, record, Duration::from_secs(60))
            .await
            .unwrap(),
        LeaseStatus::Held
    );
    let waited = waiting.await.unwrap();
    assert!(
        waited < Duration::from_secs(5),
        "woken by the notification, not the 30 s fallback: {waited:?}"
    );
}

/// Waits until a waiter marked the claim on `key` as waited for.
async fn until_marked(url: &str, key: StoreKey) {
    let client = connect(url).await;
    let sql = format!("SELECT waited FROM \"{DEFAULT_TABLE}\" WHERE key = $1");
    common::eventually(
        Duration::from_secs(10),
        "the waiter marks the claim",
        || {
            let (client, sql) = (&client, &sql);
            async move {
                client
                    .query_opt(sql.as_str(), &[&key.as_bytes().as_slice()])
                    .await
                    .is_ok_and(|row| row.is_some_and(|row| row.get::<_, bool>(0)))
            }
        },
    )
    .await;
}

/// A connection that `LISTEN`s on `channel`, and the payloads of the
/// notifications it receives.
async fn listen(
    url: &str,
    channel: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let Ok(tokio_postgres::AsyncMessage::Notification(n)) = message {
                let _ = sender.send(n.payload().to_owned());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .await
        .expect("listen");
    (client, receiver)
}

/// Only a claim someone waits for notifies when it completes or is
/// released: a `NOTIFY` at commit queues every notifying transaction in the
/// database on one lock, which halved first requests under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_claim_someone_waits_for_notifies() {
    let Some(db) = TestDatabase::create_or_skip("notify only waited") else {
        return;
    };
    let build = || waking_on_notifications(&db.url);
    let (owner, waiter) = (build(), build());
    owner.migrate().await.unwrap();
    let (_listener, mut notes) = listen(&db.url, &format!("{DEFAULT_TABLE}_done")).await;
    let record = || CompletedRecord {
        fingerprint: FP,
        payload: Bytes::from_static(b"done"),
    };
    let acquire = |name: &'static [u8]| {
        let owner = owner.clone();
        async move {
            let key = StoreKey::from_parts(b"", name);
            match owner.claim(key, FP, Duration::from_secs(30)).await {
                Ok(Claim::Acquired(token)) => (key, token),
                other => panic!("acquired, not {other:?}"),
            }
        }
    };
    // Nobody waits: completed and released without a notification.
    let (quiet, token) = acquire(b"quiet").await;
    let held = owner.complete(quiet, token, record(), Duration::from_secs(60));
    assert_eq!(held.await.unwrap(), LeaseStatus::Held);
    let (freed, token) = acquire(b"freed").await;
    assert_eq!(
        owner.release(freed, token).await.unwrap(),
        LeaseStatus::Held
    );
    // A waiter: its probe marks the claim, and the completion notifies.
    let (awaited, token) = acquire(b"awaited").await;
    let waiting = tokio::spawn(async move {
        waiter
            .wait(awaited, token.fence(), Duration::from_secs(20))
            .await
    });
    until_marked(&db.url, awaited).await;
    let held = owner.complete(awaited, token, record(), Duration::from_secs(60));
    assert_eq!(held.await.unwrap(), LeaseStatus::Held);
    let first = tokio::time::timeout(Duration::from_secs(5), notes.recv())
        .await
        .expect("a notification within 5 s");
    // Notifications arrive in commit order: none came before this one.
    assert_eq!(first.as_deref(), Some(awaited.to_hex().as_str()));
    waiting.await.unwrap().unwrap();
    // A waiter on a released claim is told too.
    let (again, token) = acquire(b"again").await;
    let waiter = build();
    let waiting = tokio::spawn(async move {
        waiter
            .wait(again, token.fence(), Duration::from_secs(20))
            .await
    });
    until_marked(&db.url, again).await;
    assert_eq!(
        owner.release(again, token).await.unwrap(),
        LeaseStatus::Held
    );
    let note = tokio::time::timeout(Duration::from_secs(5), notes.recv())
        .await
        .expect("a notification within 5 s");
    assert_eq!(note.as_deref(), Some(again.to_hex().as_str()));
    waiting.await.unwrap().unwrap();
}

/// A waiter on a claim whose owner went away looks again when the lease
/// ends (and can take the key over then), not at the fallback check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_looks_again_when_the_lease_ends() {
    let Some(db) = TestDatabase::create_or_skip("lease end") else {
        return;
    };
    let store = waking_on_notifications(&db.url);
    store.migrate().await.unwrap();
    let key = StoreKey::from_parts(b"", b"owner gone");
    let Ok(Claim::Acquired(token)) = store.claim(key, FP, LEASE).await else {
        panic!("acquired");
    };
    // Nobody completes or releases: only the lease's end can end the wait
    // before the 30 s fallback check.
    let started = std::time::Instant::now();
    store
        .wait(key, token.fence(), Duration::from_secs(20))
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "woken by the lease's end, not the 30 s fallback: {waited:?}"
    );
    assert!(matches!(
        store.claim(key, FP, LEASE).await.unwrap(),
        Claim::Acquired(_)
    ));
}

/// Expired rows go, in batches; live ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_rows_are_removed_in_batches_and_live_ones_stay() {
    let Some(db) = TestDatabase::create_or_skip("cleanup") else {
        return;
    };
    let store = PostgresStore::builder(&db.url)
        .unwrap()
        .cleanup_every(None)
        .cleanup_batch(7)
        .fence_memory(Duration::from_millis(1))
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    for i in 0..40u32 {
        let key = StoreKey::from_parts(b"", &i.to_be_bytes());
        let Ok(Claim::Acquired(token)) = store.claim(key, FP, Duration::from_secs(60)).await else {
            panic!("acquired");
        };
        let retention = if i < 30 {
            Duration::from_millis(1)
        } else {
            Duration::from_secs(600)
        };
        let record = CompletedRecord {
            fingerprint: FP,
            payload: Bytes::from_static(b"x"),
        };
        store.complete(key, token, record, retention).await.unwrap();
    }
    // Past the short records' retention: their expiry is the point.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.remove_expired().await.unwrap(), 30);
    let client = connect(&db.url).await;
    let left: i64 = client
        .query_one(&format!("SELECT count(*) FROM {DEFAULT_TABLE}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 10);
}

/// The background task removes expired rows by itself, and stops when
/// told to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cleanup_task_removes_expired_rows_by_itself_until_stopped() {
    let Some(db) = TestDatabase::create_or_skip("cleanup task") else {
        return;
    };
    let store = PostgresStore::builder(&db.url)
        .unwrap()
        .cleanup_every(Some(Duration::from_millis(50)))
        .fence_memory(Duration::from_millis(1))
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    let client = connect(&db.url).await;
    let count = || async {
        client
            .query_one(&format!("SELECT count(*) FROM {DEFAULT_TABLE}"), &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let expire_soon = |n: u32| {
        let store = store.clone();
        async move {
            let key = StoreKey::from_parts(b"", &n.to_be_bytes());
            let Ok(Claim::Acquired(token)) = store.claim(key, FP, Duration::from_secs(60)).await
            else {
                panic!("acquired");
            };
            let record = CompletedRecord {
                fingerprint: FP,
                payload: Bytes::from_static(b"x"),
            };
            store
                .complete(key, token, record, Duration::from_millis(1))
                .await
                .unwrap();
        }
    };
    for n in 0..5 {
        expire_soon(n).await;
    }
    common::eventually(
        Duration::from_secs(5),
        "the task removes the expired rows",
        || async { count().await == 0 },
    )
    .await;
    store.stop_cleanup();
    expire_soon(99).await;
    // Six periods of the stopped 50 ms task: a task still running would
    // have removed the row (above, it took one or two).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count().await, 1, "stopped: the expired row stays");
}

/// A replay only reads: it takes no row lock (a lock is a write, with a
/// WAL record and a flush at commit), so the row's `xmax` stays unset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_writes_nothing() {
    let Some(fixture) = pg_fixture("replay writes nothing").await else {
        return;
    };
    let store = &fixture.store;
    let key = StoreKey::from_parts(b"", b"replayed");
    let Ok(Claim::Acquired(token)) = store.claim(key, FP, Duration::from_secs(30)).await else {
        panic!("acquired");
    };
    let record = CompletedRecord {
        fingerprint: FP,
        payload: Bytes::from_static(b"done"),
    };
    store
        .complete(key, token, record.clone(), Duration::from_secs(600))
        .await
        .unwrap();
    let client = connect(&fixture.db.url).await;
    let row_versions = || async {
        let row = client
            .query_one(
                &format!("SELECT xmin::text, xmax::text FROM {DEFAULT_TABLE} WHERE key = $1"),
                &[&key.as_bytes().as_slice()],
            )
            .await
            .unwrap();
        (row.get::<_, String>(0), row.get::<_, String>(1))
    };
    let before = row_versions().await;
    for _ in 0..3 {
        assert_eq!(
            store.claim(key, FP, LEASE).await.unwrap(),
            Claim::Completed(record.clone())
        );
    }
    assert_eq!(
        row_versions().await,
        before,
        "the replays locked or wrote the row"
    );
    assert_eq!(before.1, "0");
}

/// Issue 10: a claim renewed for longer than a lease plus the fence memory
/// (one lease here, as the docs allow) is still its owner's: the cleanup
/// never removes it and a duplicate never takes it. Before, `extend` moved
/// `lease_until` alone: the row's `expires_at` passed under the running
/// owner, the cleanup deleted the row, and a duplicate inserted a fresh
/// claim and ran the handler a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_renewed_past_its_fence_memory_is_never_cleaned_up_or_taken_over() {
    let Some(db) = TestDatabase::create_or_skip("renewed claim and cleanup") else {
        return;
    };
    let lease = Duration::from_millis(600);
    let store = PostgresStore::builder(&db.url)
        .unwrap()
        .cleanup_every(None)
        .fence_memory(lease)
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    let key = StoreKey::from_parts(b"", b"long handler");
    let Ok(Claim::Acquired(token)) = store.claim(key, FP, lease).await else {
        panic!("acquired");
    };
    let started = std::time::Instant::now();
    while started.elapsed() < lease * 4 {
        tokio::time::sleep(lease / 4).await;
        assert_eq!(
            store.extend(key, token, lease).await.unwrap(),
            LeaseStatus::Held
        );
        assert_eq!(
            store.remove_expired().await.unwrap(),
            0,
            "the cleanup removed a claim whose lease is live"
        );
        assert!(
            matches!(
                store.claim(key, FP, lease).await,
                Ok(Claim::InFlight { .. })
            ),
            "a duplicate took a claim whose lease is live"
        );
    }
    // A row whose `expires_at` passed while its lease is live (as rows that
    // earlier versions renewed are) is not removed either.
    let client = connect(&db.url).await;
    client
        .execute(
            &format!(
                "UPDATE {DEFAULT_TABLE} SET expires_at = clock_timestamp() - interval '1 second' WHERE key = $1"
            ),
            &[&key.as_bytes().as_slice()],
        )
        .await
        .unwrap();
    assert_eq!(
        store.remove_expired().await.unwrap(),
        0,
        "the cleanup went by `expires_at` alone"
    );
    let record = CompletedRecord {
        fingerprint: FP,
        payload: Bytes::from_static(b"once"),
    };
    assert_eq!(
        store
            .complete(key, token, record, Duration::from_secs(60))
            .await
            .unwrap(),
        LeaseStatus::Held,
        "the owner still owns its key"
    );
}

/// Issue 12: a table named by a reserved word (`order`, `user`, `select`)
/// passes validation, so it must work: migrate, claim, renew, wait (its
/// `LISTEN` channel), complete, replay, clean up, purge. Before, the name
/// went into the SQL unquoted and `migrate` failed with a syntax error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_named_by_a_reserved_word_works() {
    let Some(db) = TestDatabase::create_or_skip("reserved table name") else {
        return;
    };
    for table in ["order", "user", "select"] {
        let store = PostgresStore::builder(&db.url)
            .unwrap()
            .table(table)
            .fallback_check(Duration::from_secs(30))
            .cleanup_every(None)
            .build()
            .expect("a reserved word is a valid table name");
        store.migrate().await.expect("migrate");
        store.migrate().await.expect("migrate again");
        let key = StoreKey::from_parts(b"", table.as_bytes());
        let lease = Duration::from_secs(30);
        let Ok(Claim::Acquired(token)) = store.claim(key, FP, lease).await else {
            panic!("{table}: acquired");
        };
        assert!(
            matches!(
                store.claim(key, FP, lease).await,
                Ok(Claim::InFlight { .. })
            ),
            "{table}"
        );
        assert_eq!(
            store.extend(key, token, lease).await.unwrap(),
            LeaseStatus::Held,
            "{table}"
        );
        let waiter = tokio::spawn({
            let store = store.clone();
            async move {
                let started = std::time::Instant::now();
                store
                    .wait(key, token.fence(), Duration::from_secs(20))
                    .await
                    .map(|()| started.elapsed())
            }
        });
        until_probed(&db.url, table).await;
        let record = CompletedRecord {
            fingerprint: FP,
            payload: Bytes::from(table),
        };
        assert_eq!(
            store
                .complete(key, token, record.clone(), Duration::from_secs(600))
                .await
                .unwrap(),
            LeaseStatus::Held,
            "{table}"
        );
        let waited = waiter.await.unwrap().expect("wait");
        assert!(
            waited < Duration::from_secs(5),
            "{table}: woken by its channel's notification, not the fallback: {waited:?}"
        );
        assert_eq!(
            store.claim(key, FP, lease).await.unwrap(),
            Claim::Completed(record),
            "{table}"
        );
        assert_eq!(store.remove_expired().await.unwrap(), 0, "{table}");
        assert!(store.purge(key).await.unwrap(), "{table}");
    }
}
