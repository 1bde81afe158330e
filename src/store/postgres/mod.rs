//! [`PostgresStore`]: claims and records in a table of your own PostgreSQL
//! database, and a fence for the handler's own transaction.

mod admin;
mod builder;
mod cleanup;
mod connect;
mod error;
mod fence;
mod listen;
mod ops;
mod pooled;
mod row;
mod sql;
#[cfg(test)]
mod tests;
#[cfg(feature = "tls")]
mod tls;
mod warm;

pub use self::builder::PostgresStoreBuilder;
use self::builder::{ListenTo, Source};
pub use self::connect::{ConnectOptions, SslMode};
pub use self::fence::{FenceError, FenceTransaction};

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::task::JoinHandle;

use self::error::configure_error;
use self::listen::Listen;
use self::pooled::Pooled;
use self::sql::Statements;
#[cfg(doc)]
use super::Store;
use super::StoreError;
use super::remote::Kit;
use super::remote::notify::Notifications;

/// The default table: `idempotency_keys`.
pub const DEFAULT_TABLE: &str = "idempotency_keys";
/// The default bound on each store operation, pool wait included: 1 s.
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a waiter re-checks its key by default when no notification
/// came: every second.
pub const DEFAULT_FALLBACK_CHECK: Duration = Duration::from_secs(1);
/// The default pool size: 16 connections.
pub const DEFAULT_POOL_SIZE: usize = 16;
/// How often expired rows are removed by default: every minute.
pub const DEFAULT_CLEANUP_EVERY: Duration = Duration::from_secs(60);
/// How many expired rows one cleanup statement removes at most by default.
pub const DEFAULT_CLEANUP_BATCH: u32 = 1000;

/// A [`Store`] on a table of a PostgreSQL database (feature `postgres`).
///
/// - **Durable**: a completed record is a committed row, as durable as the
///   rest of your data; a restart or a crash of the database loses nothing
///   that was confirmed.
/// - **One statement per operation**: a claim is one `INSERT … ON CONFLICT
///   … DO UPDATE … WHERE <expired>` that also reports what the key holds,
///   so a first request costs two round trips (claim, completion) and a
///   replay one. Statements are prepared once per pooled connection.
/// - **Server time**: every lease and expiry is computed by the database
///   (`clock_timestamp()`), never from this process's clock. Fences start
///   from the database clock in microseconds and grow with every grant, so
///   they never go backwards, even after a row was removed.
/// - **Fenced**: completion, release and renewal only apply for the token
///   that owns the key.
/// - **Waiters** are woken by `LISTEN`/`NOTIFY` on one connection per store,
///   with a re-check every [`fallback_check`](PostgresStoreBuilder::fallback_check)
///   in case a notification is missed.
/// - **Expired rows** are removed by a background task in bounded batches,
///   off the request path ([`cleanup_every`](PostgresStoreBuilder::cleanup_every)):
///   completed records after the retention window, claims that never
///   completed (those whose outcome is unknown included) the
///   [fence memory](PostgresStoreBuilder::fence_memory) after their lease
///   ended; never a claim whose lease is live.
/// - **TLS** (feature `tls`): the URL's `sslmode` is read as libpq reads
///   it ([`SslMode`]), for the pool and the `LISTEN` connection; every TLS
///   connection verifies the server's certificate (Mozilla's roots, or
///   [`tls_ca_file`](PostgresStoreBuilder::tls_ca_file)), and one that
///   does not verify is an error, never a fallback to plaintext.
/// - **Fail closed**: a pool that has no connection to give in time, a
///   database that does not answer within the
///   [operation timeout](PostgresStoreBuilder::operation_timeout), or a
///   database error fails the operation, and the layer answers 503.
/// - **Statements stop when their caller gives up**: on the connections of
///   its own pool (and its `LISTEN` connection) the store sets PostgreSQL's
///   `statement_timeout` and `idle_in_transaction_session_timeout` a little
///   above the operation timeout (the timeout, a quarter more, and 50 ms),
///   as startup options, so a statement whose operation timed out (a lock
///   held by another session, an overloaded server) is cancelled by the
///   server too and its connection goes back to the pool free instead of
///   busy. Settings in the URL's own `options` come after, and so win (and
///   these override a role's own `ALTER ROLE … SET`);
///   [`server_timeouts(false)`](PostgresStoreBuilder::server_timeouts)
///   turns them off (behind a pooler that refuses startup options). On a
///   pool you provide ([`builder_for_pool`](Self::builder_for_pool)) the
///   store changes nothing: give the store a pool of its own and set them
///   on its configuration (the operation timeout, a quarter more and
///   50 ms; for the default 1 s,
///   `?options=-c%20statement_timeout%3D1300%20-c%20idle_in_transaction_session_timeout%3D1300`
///   in its URL), since on a pool your application shares they would cut
///   its own statements too.
///
/// # Exactly-once effects inside the database
///
/// A handler that writes its business rows in the same database can make
/// them commit only if its execution still owns the key: it calls
/// [`fence`](Self::fence) inside its own transaction, before committing.
/// The call locks the key's row, checks the execution's fence, and marks
/// the key "effect committed" as part of that transaction. So:
///
/// - an execution whose lease was lost (a pause, a partition) and whose key
///   was taken over gets [`FenceError::Lost`] and must roll back: its
///   business rows never commit;
/// - once the mark commits, the key is never executed again: a duplicate
///   waits for the response; if the execution then cannot store its
///   response (its process died), the key answers "outcome unknown"
///   (409) instead of running again; if it stores it late, duplicates get
///   it as usual. Releasing such a key (a handler error, a 5xx) also leaves
///   it "outcome unknown": its effect is committed. A key whose outcome
///   stays unknown answers so for the
///   [fence memory](PostgresStoreBuilder::fence_memory) after its lease
///   ended (keep it at least the layer's retention), then expires like a
///   completed record.
///
/// ```no_run
/// # async fn example(
/// #     store: tower_idempotency::store::PostgresStore,
/// #     client: &mut tokio_postgres::Client,
/// #     info: &tower_idempotency::IdempotencyInfo,
/// # ) -> Result<(), Box<dyn std::error::Error>> {
/// let tx = client.transaction().await?;
/// tx.execute("INSERT INTO charges (amount) VALUES ($1)", &[&100i64]).await?;
/// // Fails with FenceError::Lost if another execution took the key over;
/// // dropping `tx` then rolls the charge back.
/// store.fence(&tx, info.execution()).await?;
/// tx.commit().await?;
/// # Ok(())
/// # }
/// ```
///
/// A deadpool-postgres transaction works too ([`FenceTransaction`]), and
/// costs the server less: its fence statement is prepared once per
/// connection instead of parsed and planned at every call.
///
/// # The table
///
/// [`migrate`](Self::migrate) creates it (safe to run from every instance
/// at start-up). For teams that run their own migrations, the SQL for the
/// default table name is:
///
/// ```sql
/// CREATE TABLE IF NOT EXISTS idempotency_keys (
///     key              bytea       PRIMARY KEY,
///     fingerprint      bytea       NOT NULL,
///     fence            bigint      NOT NULL,
///     nonce            bigint      NOT NULL,
///     state            smallint    NOT NULL,
///     lease_until      timestamptz NOT NULL,
///     expires_at       timestamptz NOT NULL,
///     effect_committed boolean     NOT NULL DEFAULT false,
///     payload          bytea,
///     method           text,
///     path             text,
///     completed_at     timestamptz,
///     waited           boolean     NOT NULL DEFAULT false
/// );
/// CREATE INDEX IF NOT EXISTS idempotency_keys_expires_at ON idempotency_keys (expires_at);
/// CREATE INDEX IF NOT EXISTS idempotency_keys_fence ON idempotency_keys (fence, key);
/// ```
///
/// (For another table name, quote it and the indexes' names, as the store
/// does: `CREATE TABLE IF NOT EXISTS "order" (…)`, `"order_expires_at"`.)
///
/// A table made before `method`, `path` and `completed_at` existed (what
/// an operator's tools show, [`admin`](crate::store::admin)), or before
/// `waited` (a waiter's mark, so that only a claim someone waits for
/// notifies when it completes), needs them before this version claims on
/// it: `migrate` adds them (once each: it reads the catalog first; a
/// column with a constant default is added without rewriting the table),
/// or add them yourself, then build the index without blocking writes:
///
/// ```sql
/// ALTER TABLE idempotency_keys
///     ADD COLUMN IF NOT EXISTS method text,
///     ADD COLUMN IF NOT EXISTS path text,
///     ADD COLUMN IF NOT EXISTS completed_at timestamptz,
///     ADD COLUMN IF NOT EXISTS waited boolean NOT NULL DEFAULT false;
/// CREATE INDEX CONCURRENTLY IF NOT EXISTS idempotency_keys_fence ON idempotency_keys (fence, key);
/// ```
///
/// Earlier versions keep working on the wider table (they name the
/// columns they use), so instances can be upgraded one by one once the
/// columns are there. While both run, a duplicate waiting in an earlier
/// version does not mark the claim, so a completion by this version does
/// not notify it: it learns of the completion at its next check (within
/// the fallback check, 1 s by default), not at once.
///
/// ```no_run
/// # async fn example() -> Result<(), tower_idempotency::store::StoreError> {
/// use tower_idempotency::IdempotencyLayer;
/// use tower_idempotency::store::PostgresStore;
///
/// let store = PostgresStore::connect("postgres://postgres@127.0.0.1:5432/postgres").await?;
/// store.migrate().await?;
/// let layer = IdempotencyLayer::new(store);
/// # drop(layer);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.inner.table)
            .field("operation_timeout", &self.inner.kit.op_timeout)
            .field("notifications", &self.inner.notifications.is_some())
            .finish_non_exhaustive()
    }
}

struct Inner {
    pool: Pool,
    table: String,
    sql: Statements,
    channel: String,
    kit: Kit,
    cleanup_batch: u32,
    notifications: Option<Notifications<Listen>>,
    /// How often the cleanup task runs; `None`: no task.
    cleanup_every: Option<Duration>,
    /// Set once the cleanup task was started (or stopped for good).
    cleanup_started: AtomicBool,
    cleanup: Mutex<Option<JoinHandle<()>>>,
}

impl PostgresStore {
    /// Connects to the database at `url` (for example
    /// `postgres://postgres@127.0.0.1:5432/postgres`) with the default
    /// settings. Over TLS, it tries one connection first (within the
    /// operation timeout): a server whose certificate does not verify is an
    /// error here, a server that is down is not (the store connects lazily).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let store = Self::builder(url)?.build()?;
        store.refuse_a_certificate_that_does_not_verify().await?;
        Ok(store)
    }

    /// Over TLS, one pooled connection tried now (within the operation
    /// timeout): a server whose certificate does not verify is a
    /// configuration error. A server that is down or slow is not.
    async fn refuse_a_certificate_that_does_not_verify(&self) -> Result<(), StoreError> {
        #[cfg(feature = "tls")]
        if let Ok(Err(deadpool_postgres::PoolError::Backend(e))) =
            tokio::time::timeout(self.inner.kit.op_timeout, self.inner.pool.get()).await
            && crate::store::tls::is_a_certificate_error(&e)
        {
            return Err(crate::store::tls::refuse(format!(
                "the PostgreSQL server's TLS certificate did not verify: {}",
                crate::store::error_chain(&e)
            )));
        }
        Ok(())
    }

    /// Starts configuring a store for the database at `url` (a
    /// `postgres://` URL or a `key=value` connection string), with a pool
    /// of its own. `sslmode` is read as libpq reads it: see [`SslMode`].
    pub fn builder(url: &str) -> Result<PostgresStoreBuilder, StoreError> {
        Ok(Self::builder_with(ConnectOptions::from_url(url)?))
    }

    /// Starts configuring a store with a pool of its own, connecting as
    /// `options` say.
    pub fn builder_with(options: ConnectOptions) -> PostgresStoreBuilder {
        PostgresStoreBuilder::new(Source::Options(Box::new(options)), None)
    }

    /// Starts configuring a store on a pool you already have.
    /// `notifications` is the database to open the store's `LISTEN`
    /// connection to (a pooled connection cannot receive notifications);
    /// without one, waiters rely on the fallback check alone.
    ///
    /// - **TLS**: a pool whose connections use TLS needs the same for the
    ///   `LISTEN` connection: give its connector to
    ///   [`notifications_tls`](PostgresStoreBuilder::notifications_tls), or
    ///   give [`notifications`](PostgresStoreBuilder::notifications) a
    ///   [`ConnectOptions`] (and build the pool's manager from the same
    ///   options with [`ConnectOptions::manager`]).
    /// - **Timeouts**: the store does not change the settings of a pool it
    ///   borrows. Set `statement_timeout` and
    ///   `idle_in_transaction_session_timeout` on its connections yourself
    ///   (startup `options`, or `ALTER ROLE … SET`), a little above the
    ///   store's operation timeout and above your handlers' longest
    ///   statement, so that a statement whose caller gave up stops on the
    ///   server too.
    pub fn builder_for_pool(
        pool: Pool,
        notifications: Option<tokio_postgres::Config>,
    ) -> PostgresStoreBuilder {
        PostgresStoreBuilder::new(
            Source::Pool(pool),
            notifications.map(|config| ListenTo::Config(Box::new(config))),
        )
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    /// Creates the table and its index if they are missing. Safe to run
    /// from many instances at once (they take turns on an advisory lock).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let sql = &self.inner.sql.migrate;
        self.bounded("migrate", async {
            let mut client = Pooled::get(&self.inner.pool).await?;
            client.sending();
            if let Some(object) = client.object_mut() {
                let tx = object.transaction().await?;
                tx.batch_execute(sql).await?;
                tx.commit().await?;
            }
            client.finished();
            Ok(())
        })
        .await
    }
}
