//! Unit tests of the statements against a real database.

use std::time::Duration;

use tokio_postgres::types::ToSql;

use super::PostgresStore;
use super::row::{ms, read_claim};
use super::sql;
use crate::key::StoreKey;
use crate::store::Claim;
use crate::store::remote;
use crate::store::remote::abandon::Orphan;

/// The test database: `TOWER_IDEMPOTENCY_POSTGRES_URL`, else the local
/// server.
fn test_database_url() -> String {
    std::env::var("TOWER_IDEMPOTENCY_POSTGRES_URL").unwrap_or_else(|_| {
        "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable".to_owned()
    })
}

/// A store on a table of its own in the test database (as the
/// integration tests find it: `TOWER_IDEMPOTENCY_POSTGRES_URL`, else
/// the local server), or `None` after saying `SKIPPED` (a failure under
/// `TOWER_IDEMPOTENCY_REQUIRE_POSTGRES=1`).
async fn store_on_a_table_of_its_own(test: &str) -> Option<PostgresStore> {
    static TABLES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let url = test_database_url();
    let table = format!(
        "unit_{}_{}",
        std::process::id(),
        TABLES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let store = PostgresStore::builder(&url)
        .unwrap()
        .table(table)
        .cleanup_every(None)
        .build()
        .unwrap();
    if let Err(e) = store.migrate().await {
        if std::env::var("TOWER_IDEMPOTENCY_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
            panic!("{test}: PostgreSQL at {url} is not reachable ({e})");
        }
        eprintln!("SKIPPED {test}: PostgreSQL at {url} is not reachable ({e})");
        return None;
    }
    Some(store)
}

/// A claim of `key` on `store` for a 60 s lease, which must be acquired.
async fn acquire(
    store: &PostgresStore,
    key: StoreKey,
    fingerprint: u8,
) -> crate::store::OwnerToken {
    use crate::store::Store;
    let fingerprint = crate::fingerprint::Fingerprint::from_bytes([fingerprint; 32]);
    match store.claim(key, fingerprint, Duration::from_secs(60)).await {
        Ok(Claim::Acquired(token)) => token,
        other => panic!("acquired: {other:?}"),
    }
}

/// Whether `key`'s row on `store`'s table is marked as waited for.
async fn waited(store: &PostgresStore, key: StoreKey) -> bool {
    let sql = format!(
        "SELECT waited FROM {} WHERE key = $1",
        sql::quoted(store.table())
    );
    store
        .query("read", &sql, &[&key.as_bytes().as_slice()])
        .await
        .unwrap()[0]
        .get(0)
}

/// A connection of its own to the test database (another process's).
async fn other_connection() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&test_database_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

async fn drop_table(store: &PostgresStore) {
    let sql = format!("DROP TABLE {}", sql::quoted(store.table()));
    store.execute("drop", &sql, &[]).await.unwrap();
}

/// The claim statement with a nonce of the test's choosing: a copy of a
/// claim that arrives late, after its release.
async fn claim_with(store: &PostgresStore, key: StoreKey, nonce: u64) -> Option<Claim> {
    let nonce = i64::from_ne_bytes(nonce.to_ne_bytes());
    let rows = store
        .query(
            "claim",
            &store.inner.sql.claim,
            &refs(&claim_params(&key, &nonce)),
        )
        .await
        .unwrap();
    rows.first().map(|row| read_claim(row, nonce).unwrap())
}

fn refs<'a>(params: &'a [Box<dyn ToSql + Sync + 'a>]) -> Vec<&'a (dyn ToSql + Sync)> {
    params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect()
}

/// The claim statement's parameters for `key` and `nonce`: a fixed
/// fingerprint, a 60 s lease, no label.
fn claim_params<'a>(key: &'a StoreKey, nonce: &'a i64) -> [Box<dyn ToSql + Sync + 'a>; 7] {
    [
        Box::new(key.as_bytes().as_slice()),
        Box::new([1u8; 32].as_slice()),
        Box::new(*nonce),
        Box::new(ms(Duration::from_secs(60))),
        Box::new(ms(Duration::from_secs(120))),
        Box::new(None::<&str>),
        Box::new(None::<&str>),
    ]
}

/// The release of an orphan, sent now, and done.
async fn abandon_now(store: &PostgresStore, key: StoreKey, nonce: u64) {
    remote::abandon(
        &store.inner,
        Orphan::new(key.to_hex(), nonce, Duration::from_secs(60)),
    );
    let started = std::time::Instant::now();
    while store.orphans_pending() > 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "not released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A release that reaches the database before its claim leaves the
/// nonce behind: the late claim refuses (no row, nothing taken), others
/// claim as usual. Two orphans of one key, and a released key, are
/// each refused too; the newest sixteen nonces are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_arrives_after_its_own_release_does_not_take_the_key() {
    let Some(store) = store_on_a_table_of_its_own("late claims (unit)").await else {
        return;
    };
    // Nothing there: a tombstone.
    let key = StoreKey::from_parts(b"", b"late");
    abandon_now(&store, key, 1).await;
    assert_eq!(
        claim_with(&store, key, 1).await,
        None,
        "the late claim took the key"
    );

    // Two orphans of one key, both overtaken.
    let twice = StoreKey::from_parts(b"", b"twice");
    abandon_now(&store, twice, 2).await;
    abandon_now(&store, twice, 3).await;
    assert_eq!(claim_with(&store, twice, 2).await, None);
    assert_eq!(claim_with(&store, twice, 3).await, None);

    // Sixteen are kept: the oldest of seventeen is forgotten.
    let many = StoreKey::from_parts(b"", b"many");
    for nonce in 100..117 {
        abandon_now(&store, many, nonce).await;
    }
    for nonce in 101..117 {
        assert_eq!(claim_with(&store, many, nonce).await, None, "{nonce}");
    }
    assert!(matches!(
        claim_with(&store, many, 100).await,
        Some(Claim::Acquired(_))
    ));

    // Another claim takes a tombstoned key as it would a free one.
    assert!(matches!(
        claim_with(&store, key, 4).await,
        Some(Claim::Acquired(_))
    ));
    // A release that finds another owner's claim leaves it alone.
    abandon_now(&store, key, 5).await;
    assert!(matches!(
        claim_with(&store, key, 6).await,
        Some(Claim::InFlight { .. })
    ));
    // A release that finds its own claim releases it, as before.
    abandon_now(&store, key, 4).await;
    assert!(matches!(
        claim_with(&store, key, 6).await,
        Some(Claim::Acquired(_))
    ));
    drop_table(&store).await;
}

/// A release that runs while its claim's transaction is still open (after
/// a freeze, the claim and its release reach two backends at once): the
/// release's update cannot see the uncommitted claim, and its insert waits
/// for the key until the claim commits. It must then release the claim it
/// finds under its own nonce. Before, it took that claim for another
/// owner's and left it: the orphan held its key for its whole lease (the
/// outage suite failed so, now and then, under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_racing_its_uncommitted_claim_still_releases_it() {
    let Some(store) = store_on_a_table_of_its_own("release racing its claim (unit)").await else {
        return;
    };
    let key = StoreKey::from_parts(b"", b"racing");
    let nonce = i64::from_ne_bytes(7u64.to_ne_bytes());
    let mut claimer = store.inner.pool.get().await.unwrap();
    let claim = claimer.transaction().await.unwrap();
    let rows = claim
        .query(&store.inner.sql.claim, &refs(&claim_params(&key, &nonce)))
        .await
        .unwrap();
    assert!(matches!(
        read_claim(&rows[0], nonce).unwrap(),
        Claim::Acquired(_)
    ));
    let release = tokio::spawn({
        let store = store.clone();
        async move { abandon_now(&store, key, 7).await }
    });
    // The release waits on the claim's row lock.
    let waiting = format!("%{}%", store.table());
    let started = std::time::Instant::now();
    loop {
        let rows = store
            .query(
                "observe",
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'
                   AND query LIKE $1",
                &[&waiting],
            )
            .await
            .unwrap();
        if rows[0].get::<_, i64>(0) > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the release never waited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    claim.commit().await.unwrap();
    release.await.unwrap();
    assert!(
        matches!(claim_with(&store, key, 8).await, Some(Claim::Acquired(_))),
        "the orphan's claim still holds its key"
    );
    drop_table(&store).await;
}

/// A table an earlier version made (without the columns an operator
/// reads) gets them from `migrate`, once, and keeps its rows; migrating
/// again changes nothing. A claim then keeps its method and path.
#[tokio::test]
async fn migrate_adds_the_operator_columns_to_an_older_table() {
    use crate::store::admin::{Admin, State};
    use crate::store::{RequestLabel, Store};

    let Some(store) = store_on_a_table_of_its_own("migrate_adds_the_operator_columns").await else {
        return;
    };
    let table = sql::quoted(store.table());
    for column in ["method", "path", "completed_at"] {
        let drop = format!("ALTER TABLE {table} DROP COLUMN {column}");
        store.execute("drop", &drop, &[]).await.unwrap();
    }
    let old = StoreKey::from_parts(b"", b"old");
    let insert = format!(
        "INSERT INTO {table} (key, fingerprint, fence, nonce, state, lease_until, expires_at, payload)
         VALUES ($1, $2, 1, 1, 0, now() + interval '1 minute', now() + interval '1 day', NULL)"
    );
    store
        .execute(
            "insert",
            &insert,
            &[&old.as_bytes().as_slice(), &[1u8; 32].as_slice()],
        )
        .await
        .unwrap();
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    let seen = store.inspect(old).await.unwrap();
    assert_eq!(seen.state, State::InFlight, "the older row is kept");
    assert_eq!(seen.method, None);

    let new = StoreKey::from_parts(b"", b"new");
    let label = RequestLabel::new("POST", "/charges?card=4242");
    let fingerprint = crate::fingerprint::Fingerprint::from_bytes([2; 32]);
    let claim = store
        .claim_labelled(new, fingerprint, Duration::from_secs(60), &label)
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired(_)));
    let seen = store.inspect(new).await.unwrap();
    assert_eq!(seen.method.as_deref(), Some("POST"));
    assert_eq!(seen.path.as_deref(), Some("/charges"));
    drop_table(&store).await;
}

/// A table of the release before `waited` (with the operator's columns)
/// gets `waited` from `migrate`, and its rows wait and complete as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_adds_the_waiters_mark_to_a_table_of_the_release_before() {
    use crate::store::{CompletedRecord, LeaseStatus, Store};

    let Some(store) = store_on_a_table_of_its_own("migrate_adds_waited").await else {
        return;
    };
    let table = sql::quoted(store.table());
    let drop = format!("ALTER TABLE {table} DROP COLUMN waited");
    store.execute("drop", &drop, &[]).await.unwrap();
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    let key = StoreKey::from_parts(b"", b"waited");
    let fingerprint = crate::fingerprint::Fingerprint::from_bytes([3; 32]);
    let Claim::Acquired(token) = store
        .claim(key, fingerprint, Duration::from_secs(60))
        .await
        .unwrap()
    else {
        panic!("acquired");
    };
    // A waiter's probe marks the claim; the completion still succeeds.
    let probe = store.probe_claim(key, token.fence()).await.unwrap();
    assert!(
        matches!(probe, remote::wait::Probe::Live { left: Some(left) } if left <= Duration::from_secs(61)),
        "{probe:?}"
    );
    let record = CompletedRecord {
        fingerprint,
        payload: bytes::Bytes::from_static(b"ok"),
    };
    let held = store.complete(key, token, record, Duration::from_secs(60));
    assert_eq!(held.await.unwrap(), LeaseStatus::Held);
    let probe = store.probe_claim(key, token.fence()).await.unwrap();
    assert!(matches!(probe, remote::wait::Probe::Gone), "{probe:?}");
    drop_table(&store).await;
}

/// A claim whose effect was committed (`fence`) and whose lease ran out:
/// the key's outcome is unknown until an operator resolves it.
async fn committed_and_lapsed(store: &PostgresStore, key: StoreKey) -> crate::store::OwnerToken {
    use super::row::{fence_param, nonce_param};
    use crate::store::Store;

    let fingerprint = crate::fingerprint::Fingerprint::from_bytes([3; 32]);
    let Claim::Acquired(token) = store
        .claim(key, fingerprint, Duration::from_millis(100))
        .await
        .unwrap()
    else {
        panic!("acquired");
    };
    store
        .query(
            "fence",
            &store.inner.sql.fence,
            &[
                &key.as_bytes().as_slice(),
                &fence_param(token),
                &nonce_param(token),
            ],
        )
        .await
        .unwrap();
    // The lease is judged by the server's clock: wait until it says so.
    let started = std::time::Instant::now();
    loop {
        let seen = crate::store::admin::Admin::inspect(store, key)
            .await
            .unwrap();
        if seen.state == crate::store::admin::State::OutcomeUnknown {
            return token;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An outcome-unknown claim is inspected, listed and resolved both ways;
/// and its owner storing its answer late, between an operator's read and
/// resolve, wins: the resolve changes nothing (the record keeps the same
/// fence, so the fence alone could not tell).
#[tokio::test]
async fn an_outcome_unknown_claim_is_resolved_unless_its_owner_answered_meanwhile() {
    use crate::store::admin::sealed::{Backend, Expected};
    use crate::store::admin::{Admin, Resolution, Resolved, State};
    use crate::store::{CompletedRecord, LeaseStatus, Store};

    let Some(store) = store_on_a_table_of_its_own("an_outcome_unknown_claim_is_resolved").await
    else {
        return;
    };
    let late = StoreKey::from_parts(b"", b"late");
    let token = committed_and_lapsed(&store, late).await;
    let seen = store.inspect(late).await.unwrap();
    assert_eq!(seen.fence, Some(token.fence()));
    let listed = store.list(Some(State::OutcomeUnknown), 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key_hash, late.to_hex());

    // The owner answers late (its effect was committed, so it may).
    let record = CompletedRecord {
        fingerprint: crate::fingerprint::Fingerprint::from_bytes([3; 32]),
        payload: bytes::Bytes::from_static(b"the real answer"),
    };
    let stored = store
        .complete(late, token, record, Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(stored, LeaseStatus::Held);
    let answer = Some(bytes::Bytes::from_static(b"an operator's answer"));
    let replaced = store
        .replace(late, token.fence(), &Expected::UnknownClaim, answer)
        .await
        .unwrap();
    assert!(!replaced, "the owner's answer is never overwritten");
    assert_eq!(
        store.resolve(late, Resolution::Release).await.unwrap(),
        Resolved::Refused(State::Unreadable),
        "the owner's payload (no payload of the layer) is what the key holds"
    );

    let released = StoreKey::from_parts(b"", b"released");
    committed_and_lapsed(&store, released).await;
    assert_eq!(
        store.resolve(released, Resolution::Release).await.unwrap(),
        Resolved::Released
    );
    assert_eq!(store.inspect(released).await.unwrap().state, State::Absent);
    let fingerprint = crate::fingerprint::Fingerprint::from_bytes([4; 32]);
    let again = store
        .claim(released, fingerprint, Duration::from_secs(60))
        .await;
    assert!(matches!(again, Ok(Claim::Acquired(t)) if t.fence() > token.fence()));

    let answered = StoreKey::from_parts(b"", b"answered");
    let owner = committed_and_lapsed(&store, answered).await;
    let respond = Resolution::Respond {
        status: http::StatusCode::CREATED,
        headers: http::HeaderMap::new(),
        body: bytes::Bytes::from_static(b"{}"),
    };
    assert_eq!(
        store.resolve(answered, respond).await.unwrap(),
        Resolved::Stored
    );
    let seen = store.inspect(answered).await.unwrap();
    assert_eq!(seen.state, State::Completed);
    assert_eq!(
        seen.answer.map(|a| a.status),
        Some(http::StatusCode::CREATED)
    );
    assert!(seen.completed_at.is_some());
    // Its owner answering after the operator learns it was not kept.
    let late = CompletedRecord {
        fingerprint: crate::fingerprint::Fingerprint::from_bytes([3; 32]),
        payload: bytes::Bytes::from_static(b"too late"),
    };
    let stored = store
        .complete(answered, owner, late, Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(stored, LeaseStatus::Lost);
    let seen = store.inspect(answered).await.unwrap();
    assert_eq!(
        seen.answer.map(|a| a.body),
        Some(bytes::Bytes::from_static(b"{}"))
    );
    drop_table(&store).await;
}

/// Listing reads the table page by page in fence order: all of 1 200
/// outcome-unknown rows (three pages), and the oldest few first.
#[tokio::test]
async fn listing_crosses_pages_oldest_first() {
    use crate::store::admin::{Admin, State};

    let Some(store) = store_on_a_table_of_its_own("listing_crosses_pages").await else {
        return;
    };
    let table = sql::quoted(store.table());
    // The layer's payload of an outcome-unknown answer with status 502.
    let insert = format!(
        "INSERT INTO {table} (key, fingerprint, fence, nonce, state, lease_until, expires_at, payload)
         SELECT decode(lpad(to_hex(g), 64, '0'), 'hex'), decode(repeat('07', 32), 'hex'),
                1700000000000000 + g, g, 1, now(), now() + interval '1 day',
                '\\x54494452010201f6'::bytea
         FROM generate_series(1, 1200) AS g"
    );
    store.execute("insert", &insert, &[]).await.unwrap();
    let all = store
        .list(Some(State::OutcomeUnknown), 10_000)
        .await
        .unwrap();
    assert_eq!(all.len(), 1200);
    let oldest = store.list(None, 3).await.unwrap();
    let fences: Vec<_> = oldest.iter().map(|s| s.fence).collect();
    assert_eq!(
        fences,
        [
            Some(1_700_000_000_000_001),
            Some(1_700_000_000_000_002),
            Some(1_700_000_000_000_003)
        ]
    );
    drop_table(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_opens_the_connections_it_is_asked_for_and_no_more() {
    let Some(store) = store_on_a_table_of_its_own("warm_up").await else {
        return;
    };
    let max = store.inner.pool.status().max_size;
    assert!(max >= 3, "the default pool holds {max}");
    assert_eq!(store.warm_up(2).await.unwrap(), 2);
    assert!(store.inner.pool.status().size >= 2);
    // No more than the pool holds, and every one of them open afterwards,
    // idle, with the statements prepared.
    assert_eq!(store.warm_up(max + 10).await.unwrap(), max);
    let status = store.inner.pool.status();
    assert_eq!((status.size, status.available), (max, max));
    assert_eq!(store.warm_up(0).await.unwrap(), 0);
    // The rehearsals were rolled back: nothing is left in the table.
    let client = store.inner.pool.get().await.unwrap();
    let rows: i64 = client
        .query_one(
            format!("SELECT count(*) FROM {}", sql::quoted(store.table())).as_str(),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "the warm-up leaves no row behind");
    // And each connection ran the claim past PostgreSQL's custom plans
    // (five), to its cached plan (counted since PostgreSQL 14).
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    if version >= 140_000 {
        let (generic, custom): (i64, i64) = {
            let row = client
                .query_one(
                    "SELECT generic_plans, custom_plans FROM pg_prepared_statements
                 WHERE statement LIKE '%live AS%taken AS%'
                   AND statement NOT LIKE '%pg_prepared_statements%'",
                    &[],
                )
                .await
                .unwrap();
            (row.get(0), row.get(1))
        };
        // (Connections warmed twice, by both calls above, ran it twice as
        // often.)
        assert!(
            (generic + custom) as usize >= super::warm::REHEARSALS,
            "the claim ran {generic} + {custom} times"
        );
        assert_eq!(custom, 5, "PostgreSQL's custom plans, then its cached one");
        assert!(generic >= 1, "and reached its cached plan");
    }
    drop(client);
    // The store works as before.
    let key = StoreKey::from_parts(b"", b"after warm_up");
    assert!(matches!(
        claim_with(&store, key, 1).await,
        Some(Claim::Acquired(_))
    ));
    drop_table(&store).await;
}

/// A waiter does not queue behind a row its owner's transaction holds (a
/// fenced handler's, until it commits): it skips the mark and looks again
/// soon; once the row is free, it marks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_does_not_wait_behind_a_locked_row() {
    let Some(store) = store_on_a_table_of_its_own("probe_skips_locked").await else {
        return;
    };
    let key = StoreKey::from_parts(b"", b"locked");
    let token = acquire(&store, key, 4).await;
    let mut other = other_connection().await;
    let holder = other.transaction().await.unwrap();
    let lock = format!(
        "SELECT 1 FROM {} WHERE key = $1 FOR UPDATE",
        sql::quoted(store.table())
    );
    holder
        .execute(lock.as_str(), &[&key.as_bytes().as_slice()])
        .await
        .unwrap();
    let probe = tokio::time::timeout(
        Duration::from_secs(5),
        store.probe_claim(key, token.fence()),
    )
    .await
    .expect("the probe does not wait for the lock")
    .unwrap();
    assert!(
        matches!(probe, remote::wait::Probe::Live { left: Some(d) } if d == super::ops::MARK_RETRY),
        "{probe:?}"
    );
    assert!(!waited(&store, key).await, "not marked while locked");
    holder.commit().await.unwrap();
    let probe = store.probe_claim(key, token.fence()).await.unwrap();
    assert!(
        matches!(probe, remote::wait::Probe::Live { left: Some(left) } if left > super::ops::MARK_RETRY),
        "marked: looked at again when the 60 s lease ends, {probe:?}"
    );
    assert!(waited(&store, key).await, "marked once free");
    drop_table(&store).await;
}

/// A store without notifications has nobody listening: its waiters look
/// again at the lease's end (or the fallback check) and mark nothing, so
/// the claim's completion sends no `NOTIFY` for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_without_notifications_marks_nothing() {
    let Some(store) = store_on_a_table_of_its_own("probe_without_listen").await else {
        return;
    };
    let silent = PostgresStore::builder_for_pool(store.inner.pool.clone(), None)
        .table(store.table())
        .cleanup_every(None)
        .build()
        .unwrap();
    assert!(silent.inner.notifications.is_none());
    let key = StoreKey::from_parts(b"", b"no listener");
    let token = acquire(&silent, key, 5).await;
    let probe = silent.probe_claim(key, token.fence()).await.unwrap();
    assert!(
        matches!(probe, remote::wait::Probe::Live { left: Some(left) } if left > super::ops::MARK_RETRY),
        "looked at again when the 60 s lease ends, not every {:?}: {probe:?}",
        super::ops::MARK_RETRY
    );
    assert!(!waited(&silent, key).await, "not marked: nobody listens");
    // The store with notifications marks the same claim.
    let probe = store.probe_claim(key, token.fence()).await.unwrap();
    assert!(
        matches!(probe, remote::wait::Probe::Live { .. }),
        "{probe:?}"
    );
    assert!(waited(&store, key).await, "marked by a store that listens");
    drop_table(&store).await;
}

/// `migrate` at a start while a handler's fenced transaction is open on
/// the table (it holds the table's row-exclusive lock until it commits):
/// it neither waits for that transaction nor makes writes wait behind it.
/// Before, its `CREATE INDEX IF NOT EXISTS` took the table's share lock
/// before finding the index there, and waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_does_not_wait_for_open_transactions_on_the_table() {
    let Some(store) = store_on_a_table_of_its_own("migrate_no_wait").await else {
        return;
    };
    let key = StoreKey::from_parts(b"", b"open transaction");
    acquire(&store, key, 6).await;
    let mut other = other_connection().await;
    let open = other.transaction().await.unwrap();
    let write = format!(
        "UPDATE {} SET effect_committed = true WHERE key = $1",
        sql::quoted(store.table())
    );
    assert_eq!(
        open.execute(write.as_str(), &[&key.as_bytes().as_slice()])
            .await
            .unwrap(),
        1
    );
    tokio::time::timeout(Duration::from_secs(5), store.migrate())
        .await
        .expect("migrate does not wait for the open transaction")
        .unwrap();
    open.rollback().await.unwrap();
    // And the indexes it looked for are there (it made them at the start).
    for index in ["expires_at", "fence"] {
        let name = sql::quoted(&format!("{}_{index}", store.table()));
        let rows = store
            .query("read", "SELECT to_regclass($1) IS NOT NULL", &[&name])
            .await
            .unwrap();
        assert!(rows[0].get::<_, bool>(0), "{name}");
    }
    drop_table(&store).await;
}

/// `migrate` looks for its indexes in its table's own schema: a table of
/// the same name in a later schema of the search path (an older install)
/// and its indexes do not stop the new table from getting its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_makes_the_indexes_of_its_own_schema() {
    let Some(probe) = store_on_a_table_of_its_own("migrate_schemas").await else {
        return;
    };
    let table = probe.table().to_owned();
    let (first, later) = (format!("{table}_new"), format!("{table}_old"));
    let client = probe.inner.pool.get().await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {first}; CREATE SCHEMA IF NOT EXISTS {later};
             CREATE TABLE IF NOT EXISTS {later}.{table} (key bytea PRIMARY KEY, expires_at timestamptz, fence bigint);
             CREATE INDEX IF NOT EXISTS {table}_expires_at ON {later}.{table} (expires_at);
             CREATE INDEX IF NOT EXISTS {table}_fence ON {later}.{table} (fence, key)"
        ))
        .await
        .unwrap();
    let url = format!(
        "{}{}options=-c%20search_path%3D{first},{later}",
        test_database_url(),
        if test_database_url().contains('?') {
            "&"
        } else {
            "?"
        }
    );
    let store = PostgresStore::builder(&url)
        .unwrap()
        .table(table.clone())
        .cleanup_every(None)
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    for index in ["expires_at", "fence"] {
        let rows = client
            .query(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&first, &format!("{table}_{index}")],
            )
            .await
            .unwrap();
        assert_eq!(rows[0].get::<_, i64>(0), 1, "{first}.{table}_{index}");
    }
    client
        .batch_execute(&format!(
            "DROP SCHEMA {first} CASCADE; DROP SCHEMA {later} CASCADE"
        ))
        .await
        .unwrap();
    drop(client);
    drop_table(&probe).await;
}
