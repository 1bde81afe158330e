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

/// A store on a table of its own in the test database (as the
/// integration tests find it: `TOWER_IDEMPOTENCY_POSTGRES_URL`, else
/// the local server), or `None` after saying `SKIPPED` (a failure under
/// `TOWER_IDEMPOTENCY_REQUIRE_POSTGRES=1`).
async fn store_on_a_table_of_its_own(test: &str) -> Option<PostgresStore> {
    static TABLES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let url = std::env::var("TOWER_IDEMPOTENCY_POSTGRES_URL").unwrap_or_else(|_| {
        "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable".to_owned()
    });
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
