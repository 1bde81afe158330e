//! [`PostgresStoreBuilder`]: where the store's connections come from, its
//! settings, and the server-side timeouts of its own connections.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::Socket;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};

use super::error::configure_error;
use super::listen::{self, Listen, Opener};
use super::sql::{self, Statements};
use super::{
    ConnectOptions, DEFAULT_CLEANUP_BATCH, DEFAULT_CLEANUP_EVERY, DEFAULT_FALLBACK_CHECK,
    DEFAULT_OPERATION_TIMEOUT, DEFAULT_POOL_SIZE, DEFAULT_TABLE, Inner, PostgresStore,
};
use crate::store::StoreError;
use crate::store::remote::Kit;
use crate::store::remote::notify::Notifications;

/// Where the store's connections come from.
pub(super) enum Source {
    Options(Box<ConnectOptions>),
    Pool(Pool),
}

/// Where the `LISTEN` connection goes, when not where the store's own pool
/// connects.
pub(super) enum ListenTo {
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
    pub(super) fn new(source: Source, notifications: Option<ListenTo>) -> Self {
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
    /// longer fails as [`StoreErrorKind::Timeout`](crate::store::StoreErrorKind::Timeout).
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

    crate::store::tls_setters!(
        "the store's own connections and its `LISTEN` connection (a `sslmode` that asks for TLS)"
    );

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
