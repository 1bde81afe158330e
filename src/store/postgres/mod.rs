//! [`PostgresStore`]: records in a table of your own PostgreSQL database,
//! and a fence for the handler's own transaction.

mod cleanup;
mod connect;
mod error;
mod listen;
mod sql;
#[cfg(feature = "tls")]
mod tls;

pub use self::connect::{ConnectOptions, SslMode};

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use deadpool_postgres::{ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::task::JoinHandle;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Row, Socket};

use self::error::{PgError, configure_error, corrupt};
use self::listen::{Listen, Opener};
use self::sql::Statements;
use super::remote::abandon::Orphan;
use super::remote::call::Failure;
use super::remote::notify::Notifications;
use super::remote::wait::{self, Probe};
use super::remote::{self, Kit, Remote, Unsettled, millis};
use super::{Claim, CompletedRecord, LeaseStatus, OwnerToken, Store, StoreError, StoreErrorKind};
use crate::engine::ExecutionContext;
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;

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
///   in case a notification is lost.
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
///     payload          bytea
/// );
/// CREATE INDEX IF NOT EXISTS idempotency_keys_expires_at ON idempotency_keys (expires_at);
/// ```
///
/// (For another table name, quote it and the index's name, as the store
/// does: `CREATE TABLE IF NOT EXISTS "order" (…)`, `"order_expires_at"`.)
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

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.cleanup_task().take() {
            task.abort();
        }
    }
}

impl Inner {
    fn cleanup_task(&self) -> std::sync::MutexGuard<'_, Option<JoinHandle<()>>> {
        self.cleanup.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where the store's connections come from.
enum Source {
    Options(Box<ConnectOptions>),
    Pool(Pool),
}

/// Where the `LISTEN` connection goes, when not where the store's own pool
/// connects.
enum ListenTo {
    Config(Box<tokio_postgres::Config>),
    Options(Box<ConnectOptions>),
}

/// Configures a [`PostgresStore`].
pub struct PostgresStoreBuilder {
    source: Source,
    notifications: Option<ListenTo>,
    notifications_tls: Option<Opener>,
    #[cfg(feature = "tls")]
    tls: crate::store::tls::TlsSettings,
    table: String,
    op_timeout: Duration,
    pool_size: usize,
    server_timeouts: bool,
    fallback_check: Duration,
    fence_memory: Duration,
    cleanup_every: Option<Duration>,
    cleanup_batch: u32,
}

impl std::fmt::Debug for PostgresStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStoreBuilder")
            .field("table", &self.table)
            .field("operation_timeout", &self.op_timeout)
            .finish_non_exhaustive()
    }
}

impl PostgresStoreBuilder {
    fn new(source: Source, notifications: Option<ListenTo>) -> Self {
        Self {
            source,
            notifications,
            notifications_tls: None,
            #[cfg(feature = "tls")]
            tls: crate::store::tls::TlsSettings::default(),
            table: DEFAULT_TABLE.to_owned(),
            op_timeout: DEFAULT_OPERATION_TIMEOUT,
            pool_size: DEFAULT_POOL_SIZE,
            server_timeouts: true,
            fallback_check: DEFAULT_FALLBACK_CHECK,
            fence_memory: crate::engine::DEFAULT_RETENTION,
            cleanup_every: Some(DEFAULT_CLEANUP_EVERY),
            cleanup_batch: DEFAULT_CLEANUP_BATCH,
        }
    }

    /// The table (default `idempotency_keys`): a plain lower-case
    /// identifier (`[a-z_][a-z0-9_]*`, at most 48 bytes), in the
    /// connection's `search_path`. [`build`](Self::build) refuses others.
    /// The store always quotes it, so a reserved word (`order`, `user`)
    /// works like any other name.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The bound on each operation, the wait for a pooled connection
    /// included (default 1 s, at least 1 ms). An operation that takes
    /// longer fails as [`StoreErrorKind::Timeout`].
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Whether the store's own connections carry the server-side
    /// `statement_timeout` and `idle_in_transaction_session_timeout`
    /// (default on; see [`PostgresStore`]). Turn it off behind a connection
    /// pooler that refuses startup `options` (PgBouncer before 1.20 unless
    /// `options` is in its `ignore_startup_parameters`; later ones unless
    /// `statement_timeout` is in `track_extra_parameters`), and set the
    /// timeouts on the server's role instead (`ALTER ROLE … SET`).
    pub fn server_timeouts(mut self, on: bool) -> Self {
        self.server_timeouts = on;
        self
    }

    /// How many connections the store's own pool keeps at most (default
    /// 16, at least 1). Ignored for a pool you provide.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// How often a waiter re-checks its key when no notification came
    /// (default 1 s, at least 10 ms).
    pub fn fallback_check(mut self, interval: Duration) -> Self {
        self.fallback_check = interval.max(Duration::from_millis(10));
        self
    }

    /// How long the row of a claim that never completed is kept after its
    /// lease ended (default 24 h): the claim keeps it a lease plus this
    /// long, and each renewal moves that past the new lease, so a claim
    /// renewed for longer than this is never removed under its owner. The
    /// same setting means the same on `RedisStore`.
    ///
    /// Keep it at least the layer's retention: a key whose effect was
    /// committed ([`PostgresStore::fence`]) and whose outcome is unknown
    /// answers "outcome unknown" this long after its lease ended (or it was
    /// released), then expires like a completed record: its row is removed
    /// and the key can run again.
    pub fn fence_memory(mut self, keep: Duration) -> Self {
        self.fence_memory = keep;
        self
    }

    /// How often the background task removes expired rows (default every
    /// minute); `None` runs no task (call
    /// [`PostgresStore::remove_expired`] yourself, for example from a
    /// scheduled job).
    pub fn cleanup_every(mut self, every: Option<Duration>) -> Self {
        self.cleanup_every = every.map(|d| d.max(Duration::from_millis(10)));
        self
    }

    /// How many rows one cleanup statement removes at most (default 1 000,
    /// at least 1): each round runs statements of this size until fewer are
    /// left, so a backlog never becomes one long-locking delete.
    pub fn cleanup_batch(mut self, rows: u32) -> Self {
        self.cleanup_batch = rows.max(1);
        self
    }

    /// Trusts the certificates in the PEM bundle at `path` instead of
    /// Mozilla's roots, for the store's own connections and its `LISTEN`
    /// connection (feature `tls`; see [`ConnectOptions::tls_ca_file`]).
    /// [`build`](Self::build) fails when the file cannot be read or holds no
    /// certificate.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls_ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.tls.roots_file(path.into());
        self
    }

    /// Like [`tls_ca_file`](Self::tls_ca_file), with the PEM bundle in
    /// memory.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.roots_pem(pem.into());
        self
    }

    /// Presents a client certificate (PEM chain, PEM private key) to a
    /// server that asks for one (feature `tls`).
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls_client_identity(
        mut self,
        certificate_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.identity(certificate_pem.into(), key_pem.into());
        self
    }

    /// Where the `LISTEN` connection goes, with its TLS (by default where
    /// the store's own pool connects, or the `notifications` settings given
    /// to [`PostgresStore::builder_for_pool`]). When this builder was given
    /// TLS settings of its own (a CA, a client certificate), they replace
    /// all those of `options`.
    pub fn notifications(mut self, options: ConnectOptions) -> Self {
        self.notifications = Some(ListenTo::Options(Box::new(options)));
        self
    }

    /// The TLS connector of the `LISTEN` connection: give it the one your
    /// own pool's manager uses (a `tokio_postgres_rustls::MakeRustlsConnect`,
    /// a `postgres_native_tls::MakeTlsConnector`, …) when you build the
    /// store with [`PostgresStore::builder_for_pool`] and notifications over
    /// TLS. Without it, that connection uses this crate's own: rustls with
    /// Mozilla's roots or [`tls_ca_file`](Self::tls_ca_file) (feature
    /// `tls`), or plaintext.
    pub fn notifications_tls<T>(mut self, tls: T) -> Self
    where
        T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
        T::Stream: Send + 'static,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        self.notifications_tls = Some(listen::opener(tls));
        self
    }

    /// Builds the store. It connects lazily (a process can start while the
    /// database is down: guarded requests get 503 until it is back) and
    /// does not create the table: call [`PostgresStore::migrate`], or run
    /// the SQL in its docs yourself. The cleanup task starts with the first
    /// operation, on that operation's tokio runtime.
    pub fn build(self) -> Result<PostgresStore, StoreError> {
        if !sql::is_valid_table_name(&self.table) {
            return Err(configure_error(format!(
                "the table name {:?} is not a plain lower-case SQL identifier ([a-z_][a-z0-9_]*, at most {} bytes)",
                self.table,
                sql::MAX_TABLE_NAME
            )));
        }
        #[cfg(feature = "tls")]
        let tls = self.tls;
        // The builder's TLS settings, where it was given any, win over
        // those of the options.
        let with_builder_tls = |#[allow(unused_mut)] mut options: ConnectOptions| {
            #[cfg(feature = "tls")]
            if tls.is_set() {
                options.set_tls(tls.clone());
            }
            options
        };
        let (pool, own) = match self.source {
            Source::Pool(pool) => (pool, None),
            Source::Options(options) => {
                let mut options = with_builder_tls(*options);
                if self.server_timeouts {
                    stop_with_the_caller(options.config_mut(), self.op_timeout);
                }
                let manager = options.manager(ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                })?;
                let pool = Pool::builder(manager)
                    .max_size(self.pool_size)
                    .wait_timeout(Some(self.op_timeout))
                    .create_timeout(Some(self.op_timeout))
                    .runtime(Runtime::Tokio1)
                    .build()
                    .map_err(configure_error)?;
                (pool, Some(options))
            }
        };
        // Where the `LISTEN` connection goes and how: through the user's
        // own connector as they configured it, or through this crate's for
        // the options (their `sslmode` and TLS settings checked here).
        let listen = match self.notifications_tls {
            Some(open) => match self.notifications {
                None => own.map(|options| options.tokio_config()),
                Some(ListenTo::Config(config)) => Some(*config),
                Some(ListenTo::Options(options)) => Some(options.tokio_config()),
            }
            .map(|config| (config, open)),
            None => {
                let options = match self.notifications {
                    None => own,
                    Some(ListenTo::Config(config)) => {
                        Some(with_builder_tls(ConnectOptions::from_config(*config)?))
                    }
                    Some(ListenTo::Options(options)) => Some(with_builder_tls(*options)),
                };
                match options {
                    None => None,
                    Some(options) => Some((options.tokio_config(), options.connector()?.opener())),
                }
            }
        };
        let channel = format!("{}_done", self.table);
        let notifications = listen.map(|(config, open)| {
            let feed = Listen {
                config,
                open,
                channel: channel.clone(),
            };
            Notifications::new(feed, self.op_timeout, self.fallback_check)
        });
        let store = PostgresStore {
            inner: Arc::new(Inner {
                pool,
                sql: Statements::for_table(&self.table),
                table: self.table,
                channel,
                kit: Kit::new(self.op_timeout, self.fallback_check, self.fence_memory),
                cleanup_batch: self.cleanup_batch,
                notifications,
                cleanup_every: self.cleanup_every,
                cleanup_started: AtomicBool::new(self.cleanup_every.is_none()),
                cleanup: Mutex::new(None),
            }),
        };
        Ok(store)
    }
}

/// Why [`PostgresStore::fence`] refused to mark the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FenceError {
    /// This execution no longer owns the key (its lease expired and another
    /// execution took it over, or the key was purged): roll the transaction
    /// back.
    #[error("this execution no longer owns its idempotency key; roll the transaction back")]
    Lost,
    /// The statement failed (roll back too).
    #[error("the idempotency fence statement failed")]
    Database(#[from] tokio_postgres::Error),
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
            let mut client = self.inner.pool.get().await.map_err(PgError::Pool)?;
            let tx = client.transaction().await?;
            tx.batch_execute(sql).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Removes expired rows now, in batches of the configured size, and
    /// returns how many. The background task does this on its own; call it
    /// from a scheduled job if you turned the task off.
    pub async fn remove_expired(&self) -> Result<u64, StoreError> {
        let batch = i64::from(self.inner.cleanup_batch);
        let mut removed = 0u64;
        loop {
            let rows = self
                .execute("cleanup", &self.inner.sql.cleanup, &[&batch])
                .await?;
            removed = removed.saturating_add(rows);
            if rows < u64::from(self.inner.cleanup_batch) {
                return Ok(removed);
            }
        }
    }

    /// Stops the background cleanup task for good (it also stops when the
    /// last handle on the store is dropped).
    pub fn stop_cleanup(&self) {
        self.inner.cleanup_started.store(true, Ordering::Release);
        if let Some(task) = self.inner.cleanup_task().take() {
            task.abort();
        }
    }

    /// Starts the cleanup task, once, on the current runtime.
    fn ensure_cleanup(&self) {
        if self.inner.cleanup_started.load(Ordering::Acquire) {
            return;
        }
        let (Some(every), Ok(runtime)) = (
            self.inner.cleanup_every,
            tokio::runtime::Handle::try_current(),
        ) else {
            return;
        };
        let mut task = self.inner.cleanup_task();
        if self.inner.cleanup_started.swap(true, Ordering::AcqRel) {
            return;
        }
        *task = Some(cleanup::spawn(&runtime, Arc::downgrade(&self.inner), every));
    }

    /// Marks the key of `execution` "effect committed" inside `tx`, if the
    /// execution still owns it; see [the type's docs](Self#exactly-once-effects-inside-the-database).
    ///
    /// Call it in the transaction that writes the handler's business rows,
    /// after them and before committing: it locks the key's row until the
    /// transaction ends (a takeover waits for it), and costs one round
    /// trip. On [`FenceError::Lost`], roll back.
    pub async fn fence(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        execution: &ExecutionContext,
    ) -> Result<(), FenceError> {
        let key = execution.store_key();
        let token = execution.owner_token();
        let rows = tx
            .query_typed(
                &self.inner.sql.fence,
                &[
                    (&key.as_bytes().as_slice(), Type::BYTEA),
                    (&fence_param(token), Type::INT8),
                    (&nonce_param(token), Type::INT8),
                ],
            )
            .await?;
        if rows.is_empty() {
            Err(FenceError::Lost)
        } else {
            Ok(())
        }
    }

    /// Runs `op` within the operation timeout.
    async fn bounded<T>(
        &self,
        op: &'static str,
        work: impl Future<Output = Result<T, PgError>>,
    ) -> Result<T, StoreError> {
        let until = self.inner.kit.deadline();
        Ok(self.call(op, until, work).await?)
    }

    /// Runs `op` until `until`, telling apart the failures after which it
    /// cannot have taken effect.
    async fn call<T>(
        &self,
        op: &'static str,
        until: tokio::time::Instant,
        work: impl Future<Output = Result<T, PgError>>,
    ) -> Result<T, Failure> {
        self.ensure_cleanup();
        remote::call::bounded(op, until, &(), work).await
    }

    /// Claims whose reply was lost (a timeout, a dropped connection, a
    /// caller that went away during the claim), waiting to be released in
    /// the background. At most 1 024 wait per store; beyond that, such a
    /// claim expires with its lease.
    pub fn lost_claims_pending(&self) -> usize {
        self.inner.kit.abandoner.pending()
    }

    async fn query(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.bounded(op, async {
            let client = self.inner.pool.get().await.map_err(PgError::Pool)?;
            let statement = client.prepare_cached(sql).await?;
            Ok(client.query(&statement, params).await?)
        })
        .await
    }

    async fn execute(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        self.bounded(op, async {
            let client = self.inner.pool.get().await.map_err(PgError::Pool)?;
            let statement = client.prepare_cached(sql).await?;
            Ok(client.execute(&statement, params).await?)
        })
        .await
    }

    /// Whether the claim with `fence` on `key` is still live.
    async fn claim_is_live(&self, key: StoreKey, fence: u64) -> Result<bool, StoreError> {
        let fence = i64::try_from(fence).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "wait",
                &self.inner.sql.probe,
                &[&key.as_bytes().as_slice(), &fence],
            )
            .await?;
        Ok(match rows.first() {
            Some(row) => row.try_get::<_, bool>(0).map_err(|e| corrupt("wait", e))?,
            None => false,
        })
    }

    async fn fenced(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<LeaseStatus, StoreError> {
        let rows = self.query(op, sql, params).await?;
        let held = match rows.first() {
            Some(row) => row.try_get::<_, bool>(0).map_err(|e| corrupt(op, e))?,
            None => return Err(corrupt(op, "no row")),
        };
        Ok(if held {
            LeaseStatus::Held
        } else {
            LeaseStatus::Lost
        })
    }
}

/// A fence as a parameter (fences are below `i64::MAX`: they start from
/// the clock in microseconds).
fn fence_param(token: OwnerToken) -> i64 {
    i64::try_from(token.fence()).unwrap_or(i64::MAX)
}

/// A nonce as a parameter: its bits, in a `bigint`.
fn nonce_param(token: OwnerToken) -> i64 {
    i64::from_ne_bytes(token.nonce().to_ne_bytes())
}

/// Milliseconds as a parameter (`$n::float8 * interval '1 millisecond'`):
/// [`millis`], exact as a `float8` (below 2^53).
fn ms(d: Duration) -> f64 {
    millis(d) as f64
}

impl Store for PostgresStore {
    async fn claim(
        &self,
        key: StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let nonce = i64::from_ne_bytes(self.inner.kit.nonces.next().to_ne_bytes());
        // The row outlives the lease by the fence memory (the extend
        // statement keeps it so), the same meaning as on Redis.
        let keep = lease.saturating_add(self.inner.kit.fence_memory);
        let params: [&(dyn ToSql + Sync); 5] = [
            &key.as_bytes().as_slice(),
            &fingerprint.as_bytes().as_slice(),
            &nonce,
            &ms(lease),
            &ms(keep),
        ];
        // One connection for the (up to three) attempts, within one bound.
        let until = self.inner.kit.deadline();
        let client = self
            .call("claim", until, async {
                self.inner.pool.get().await.map_err(PgError::Pool)
            })
            .await?;
        // Until its reply is in, the claim may have been applied with nobody
        // to own it: if the reply is lost, or this future is dropped (the
        // client went away), the guard queues its release by its nonce.
        let mut unsettled = Unsettled::new(
            &self.inner,
            Orphan::new(key.to_hex(), u64::from_ne_bytes(nonce.to_ne_bytes()), lease),
        );
        // A row committed by another transaction after this statement's
        // snapshot was taken is seen by the insert's conflict check but not
        // by the statement's read: no row comes back. The next attempt sees
        // it.
        for _ in 0..3 {
            let sent = self
                .call("claim", until, async {
                    let statement = client.prepare_cached(&self.inner.sql.claim).await?;
                    Ok(client.query(&statement, &params).await?)
                })
                .await;
            let rows = sent.map_err(|failure| unsettled.failed(failure))?;
            if let Some(row) = rows.first() {
                unsettled.settled();
                return read_claim(row, nonce).map_err(|e| corrupt("claim", e));
            }
        }
        unsettled.settled();
        Err(StoreError::new(StoreErrorKind::Unavailable, "claim")
            .with_source("the key changed under three claims in a row"))
    }

    async fn complete(
        &self,
        key: StoreKey,
        token: OwnerToken,
        record: CompletedRecord,
        retention: Duration,
    ) -> Result<LeaseStatus, StoreError> {
        self.fenced(
            "complete",
            &self.inner.sql.complete,
            &[
                &key.as_bytes().as_slice(),
                &fence_param(token),
                &nonce_param(token),
                &record.payload.as_ref(),
                &record.fingerprint.as_bytes().as_slice(),
                &ms(retention),
                &self.inner.channel,
            ],
        )
        .await
    }

    async fn release(&self, key: StoreKey, token: OwnerToken) -> Result<LeaseStatus, StoreError> {
        // A released claim whose effect was committed answers "outcome
        // unknown" for the fence memory from now, then expires.
        self.fenced(
            "release",
            &self.inner.sql.release,
            &[
                &key.as_bytes().as_slice(),
                &fence_param(token),
                &nonce_param(token),
                &self.inner.channel,
                &ms(self.inner.kit.fence_memory),
            ],
        )
        .await
    }

    async fn extend(
        &self,
        key: StoreKey,
        token: OwnerToken,
        lease: Duration,
    ) -> Result<LeaseStatus, StoreError> {
        let rows = self
            .execute(
                "extend",
                &self.inner.sql.extend,
                &[
                    &key.as_bytes().as_slice(),
                    &fence_param(token),
                    &nonce_param(token),
                    &ms(lease),
                    // The row's life moves with the lease, so the cleanup
                    // never removes a claim its owner is renewing.
                    &ms(lease.saturating_add(self.inner.kit.fence_memory)),
                ],
            )
            .await?;
        Ok(if rows == 1 {
            LeaseStatus::Held
        } else {
            LeaseStatus::Lost
        })
    }

    async fn wait(&self, key: StoreKey, fence: u64, timeout: Duration) -> Result<(), StoreError> {
        let probe = || async {
            Ok(if self.claim_is_live(key, fence).await? {
                Probe::Live { left: None }
            } else {
                Probe::Gone
            })
        };
        wait::until_gone(
            self.inner.notifications.as_ref(),
            &key.to_hex(),
            timeout,
            self.inner.kit.fallback_check,
            probe,
        )
        .await
    }

    async fn purge(&self, key: StoreKey) -> Result<bool, StoreError> {
        let rows = self
            .query(
                "purge",
                &self.inner.sql.purge,
                &[&key.as_bytes().as_slice()],
            )
            .await?;
        match rows.first() {
            Some(row) => row.try_get::<_, bool>(0).map_err(|e| corrupt("purge", e)),
            None => Ok(false),
        }
    }
}

/// Reads the row a claim statement returned.
fn read_claim(row: &Row, nonce: i64) -> Result<Claim, tokio_postgres::Error> {
    let acquired: bool = row.try_get(0)?;
    let fence: i64 = row.try_get(1)?;
    let fence = u64::try_from(fence).unwrap_or(0);
    if acquired {
        let nonce = u64::from_ne_bytes(nonce.to_ne_bytes());
        return Ok(Claim::Acquired(OwnerToken::new(fence, nonce)));
    }
    let state: i16 = row.try_get(2)?;
    let fingerprint = fingerprint_of(row.try_get(3)?);
    let effect_committed: bool = row.try_get(5)?;
    let lapsed: bool = row.try_get(6)?;
    Ok(match state {
        sql::COMPLETED => {
            let payload: &[u8] = row.try_get(4)?;
            Claim::Completed(CompletedRecord {
                fingerprint,
                payload: bytes::Bytes::copy_from_slice(payload),
            })
        }
        sql::CLAIMED if effect_committed && lapsed => Claim::OutcomeUnknown { fingerprint },
        _ => Claim::InFlight { fingerprint, fence },
    })
}

fn fingerprint_of(bytes: &[u8]) -> Fingerprint {
    let mut array = [0u8; 32];
    if bytes.len() == array.len() {
        array.copy_from_slice(bytes);
    }
    Fingerprint::from_bytes(array)
}

/// The release may reach the database before the claim (which may still
/// be on a connection that stopped answering): it then leaves the nonce
/// behind, and the late claim refuses (see the `abandon` statement).
impl Remote for Inner {
    fn kit(&self) -> &Kit {
        &self.kit
    }

    fn abandon_once(
        self: Arc<Self>,
        orphan: &Orphan,
    ) -> impl Future<Output = Result<(), Failure>> + Send {
        let nonce = i64::from_ne_bytes(orphan.nonce.to_ne_bytes());
        let keep = ms(orphan.keep(self.kit.fence_memory));
        let name = orphan.name.clone();
        let store = PostgresStore { inner: self };
        async move {
            let until = store.inner.kit.deadline();
            store
                .call("abandon", until, async {
                    let params: [&(dyn ToSql + Sync); 4] =
                        [&name.as_str(), &nonce, &store.inner.channel, &keep];
                    let client = store.inner.pool.get().await.map_err(PgError::Pool)?;
                    let statement = client.prepare_cached(&store.inner.sql.abandon).await?;
                    client.query(&statement, &params).await?;
                    Ok(())
                })
                .await
        }
    }
}

/// Bounds, on the server, each statement of a connection made from
/// `config` a little above the operation timeout, and each transaction left
/// idle the same: a statement whose operation timed out on this side stops
/// on the server too, instead of holding its connection (and its locks)
/// for as long as it waits. As startup options, ahead of any the URL gave
/// (which come later and so win).
fn stop_with_the_caller(config: &mut tokio_postgres::Config, op_timeout: Duration) {
    let ms = server_timeout_ms(op_timeout);
    let ours = format!("-c statement_timeout={ms} -c idle_in_transaction_session_timeout={ms}");
    let options = match config.get_options() {
        Some(theirs) if !theirs.trim().is_empty() => format!("{ours} {theirs}"),
        _ => ours,
    };
    config.options(&options);
}

/// The operation timeout, a quarter more and 50 ms, in milliseconds, within
/// what PostgreSQL takes (1 to `i32::MAX`; 0 would mean no timeout).
fn server_timeout_ms(op_timeout: Duration) -> u64 {
    let bound = op_timeout
        .saturating_add(op_timeout / 4)
        .saturating_add(Duration::from_millis(50));
    u64::try_from(bound.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, i32::MAX as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let params: [&(dyn ToSql + Sync); 5] = [
            &key.as_bytes().as_slice(),
            &[1u8; 32].as_slice(),
            &nonce,
            &ms(Duration::from_secs(60)),
            &ms(Duration::from_secs(120)),
        ];
        let rows = store
            .query("claim", &store.inner.sql.claim, &params)
            .await
            .unwrap();
        rows.first().map(|row| read_claim(row, nonce).unwrap())
    }

    /// The release of a lost claim, sent now, and done.
    async fn abandon_now(store: &PostgresStore, key: StoreKey, nonce: u64) {
        remote::abandon(
            &store.inner,
            Orphan::new(key.to_hex(), nonce, Duration::from_secs(60)),
        );
        let started = std::time::Instant::now();
        while store.lost_claims_pending() > 0 {
            assert!(started.elapsed() < Duration::from_secs(10), "not released");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A release that reaches the database before its claim leaves the
    /// nonce behind: the late claim refuses (no row, nothing taken), others
    /// claim as usual. Two lost claims of one key, and a released key, are
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

        // Two lost claims of one key, both overtaken.
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

    #[test]
    fn server_timeouts_are_a_little_above_the_operation_timeout_and_bounded() {
        assert_eq!(server_timeout_ms(Duration::from_secs(1)), 1_300);
        assert_eq!(server_timeout_ms(Duration::from_millis(1)), 51);
        assert_eq!(server_timeout_ms(Duration::MAX), i32::MAX as u64);
    }

    #[test]
    fn the_urls_own_options_come_after_the_stores() {
        let mut config: tokio_postgres::Config = "postgres://u@h/db".parse().unwrap();
        stop_with_the_caller(&mut config, Duration::from_secs(1));
        assert_eq!(
            config.get_options(),
            Some("-c statement_timeout=1300 -c idle_in_transaction_session_timeout=1300")
        );
        let mut config: tokio_postgres::Config =
            "postgres://u@h/db?options=-c%20statement_timeout%3D5000"
                .parse()
                .unwrap();
        stop_with_the_caller(&mut config, Duration::from_secs(1));
        assert_eq!(
            config.get_options(),
            Some(
                "-c statement_timeout=1300 -c idle_in_transaction_session_timeout=1300 -c statement_timeout=5000"
            )
        );
    }
}
