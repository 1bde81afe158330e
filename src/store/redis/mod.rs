//! [`RedisStore`]: one guarantee across every process that shares a Redis
//! (feature `redis`; Redis Cluster with `redis-cluster`, TLS with `tls`),
//! its builder and its defaults.

mod admin;
mod builder;
mod connection;
mod entry;
mod error;
mod notify;
mod ops;
mod scripts;
#[cfg(feature = "tls")]
mod tls;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};

pub use self::builder::RedisStoreBuilder;
use self::builder::Settings;
use self::connection::Connection;
use self::notify::PubSub;
use self::scripts::Scripts;
#[cfg(doc)]
use super::Store;
use super::StoreError;
use super::remote::Kit;
use super::remote::notify::Notifications;
use crate::key::StoreKey;

/// The default prefix of the store's Redis key names and channel: `idem`.
pub const DEFAULT_PREFIX: &str = "idem";
/// The default bound on each Redis command: 500 ms (PostgreSQL's is
/// [`postgres::DEFAULT_OPERATION_TIMEOUT`](crate::store::postgres::DEFAULT_OPERATION_TIMEOUT)
/// where that feature is on).
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_millis(500);
/// How often a waiter re-checks its key by default when no notification
/// came: every second.
pub const DEFAULT_FALLBACK_CHECK: Duration = Duration::from_secs(1);
/// How long the entry of a claim that never completed outlives its lease
/// by default: 24 h.
pub const DEFAULT_FENCE_MEMORY: Duration = Duration::from_secs(24 * 60 * 60);

/// A [`Store`] on Redis, for fleets of processes behind a load balancer.
///
/// - **One round trip per operation**: claim (which also returns a completed
///   record, so a replay is one round trip), complete, release, extend and
///   purge are each one single-key Lua script (`EVALSHA`, reloaded by itself
///   after a Redis restart) that checks the owner token.
/// - **Fencing**: the fence grows with every grant of a key, even after a
///   lease expires and is taken over, and never goes backwards while the
///   Redis server's clock does not: each grant's fence is at least the
///   server's clock in microseconds, so it stays above earlier fences after
///   the entry expired, was purged, or was forgotten by a Redis that
///   restarted empty. Leases are judged by the Redis server's clock alone.
/// - **Little work for the Redis server**: an entry is one string (a
///   59-byte header, then the lease deadline or the record's payload), so a
///   replay's script is one `GET` returned as it is, and a claim's and a
///   completion's a `GET`, the server's clock (`TIME`) and one `SET … PX`.
///   Entries of the earlier format (a hash per key) are still read.
/// - **Cluster-safe names**: each key is `<prefix>:<hex SHA-256 of scope and
///   key>`; client input never reaches a key name, so it can never pick a
///   Cluster slot.
/// - **Waiting without polling**: completions and releases of claims that
///   someone waits for are published on the channel `<prefix>:done`; waiters
///   in every process wake at once (claims nobody waits for publish nothing). A
///   bounded fallback check (default every second) covers missed
///   notifications, which Redis pub/sub does not redeliver.
/// - **Bounded**: every command has a timeout (default 500 ms); a frozen or
///   unreachable Redis makes the layer answer 503, and the store recovers by
///   itself when Redis is back.
/// - **Orphans released**: an orphan, a claim whose reply never came back
///   (a timeout, a broken connection, or a caller dropped while it was
///   under way, as when a client disconnects), may have been applied with
///   nobody to own it. Its release, by the nonce it was sent with, is
///   queued and sent by one background task per store once Redis answers.
///   At most 1 024 wait ([`orphans_pending`](Self::orphans_pending)); past
///   that, or once its lease has ended, an orphan simply expires. A claim
///   whose connection was refused, or that Redis answered with an error,
///   never took effect and queues nothing. The release may reach Redis before
///   the claim does (the claim still queued on a connection that stopped
///   answering, the release sent on its replacement): it leaves the
///   claim's nonce behind, and a claim that arrives after its own release
///   refuses to take the key.
/// - **Claims sent twice are one claim**: a Redis Cluster connection
///   re-sends a command after an I/O error even if the first copy was
///   applied; a claim that finds the live claim it made itself (by its
///   nonce) answers that grant, so the caller owns the key instead of
///   waiting for itself for a whole lease.
///
/// Run it on a Redis with `maxmemory-policy noeviction` (the store warns at
/// start-up otherwise): an evicted claim lets a duplicate execute. See
/// "Guarantees and limits" (`docs/guarantees.md` in the repository) for
/// replication and persistence.
///
/// ```no_run
/// use tower_idempotency::{IdempotencyLayer, store::RedisStore};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// let layer = IdempotencyLayer::new(store);
/// # drop(layer);
/// # Ok(())
/// # }
/// ```
pub struct RedisStore<C = ConnectionManager> {
    inner: Arc<Inner<C>>,
}

impl<C> Clone for RedisStore<C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<C> std::fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .field("operation_timeout", &self.inner.kit.op_timeout)
            .field("notifications", &self.inner.notifications.is_some())
            .finish_non_exhaustive()
    }
}

struct Inner<C> {
    conn: Connection<C>,
    prefix: String,
    channel: String,
    kit: Kit,
    scripts: Scripts,
    notifications: Option<Notifications<PubSub>>,
}

impl RedisStore {
    /// Connects to the Redis at `url` (for example `redis://127.0.0.1:6379`)
    /// with the default settings.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder(url)?.build().await
    }

    /// Starts configuring a store for the Redis at `url`.
    ///
    /// Its connections set `TCP_NODELAY`: every operation is one small
    /// request awaited by a caller, so Nagle's algorithm would only add
    /// latency. (Build a `redis::Client` yourself and use
    /// [`builder_for`](Self::builder_for) to choose otherwise.)
    pub fn builder(url: &str) -> Result<RedisStoreBuilder, StoreError> {
        use redis::IntoConnectionInfo;
        let info = url
            .into_connection_info()
            .map_err(StoreError::configuration)?;
        let nodelay = info.tcp_settings().clone().set_nodelay(true);
        let client = redis::Client::open(info.set_tcp_settings(nodelay))
            .map_err(StoreError::configuration)?;
        Ok(Self::builder_for(client))
    }

    /// Starts configuring a store over an existing client. (With the
    /// builder's TLS settings, a client of its own is made from this one's
    /// address.)
    pub fn builder_for(client: redis::Client) -> RedisStoreBuilder {
        RedisStoreBuilder::new(client)
    }
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A store over a connection you built (a `MultiplexedConnection`, a
    /// cluster connection, …), with the default prefix and timeout.
    /// `notifications` is the client whose pub/sub connection wakes waiters;
    /// without one, waiters rely on the fallback check alone.
    ///
    /// The store cannot open another such connection: if yours goes
    /// half-open, its commands time out until it recovers by itself (the
    /// stores [`RedisStore::builder`] builds open a new connection after two
    /// timeouts in a row).
    pub fn with_connection(conn: C, notifications: Option<redis::Client>) -> Self {
        Self::assemble(
            Connection::new(conn, None),
            notifications,
            Settings::default(),
        )
    }

    fn assemble(conn: Connection<C>, client: Option<redis::Client>, settings: Settings) -> Self {
        let Settings {
            prefix,
            op_timeout,
            fallback_check,
            fence_memory,
        } = settings;
        let channel = format!("{prefix}:done");
        let notifications = client.map(|client| {
            let feed = PubSub {
                client,
                channel: channel.clone(),
            };
            Notifications::new(feed, op_timeout, fallback_check)
        });
        Self {
            inner: Arc::new(Inner {
                conn,
                prefix,
                channel,
                kit: Kit::new(op_timeout, fallback_check, fence_memory),
                scripts: Scripts::new(),
                notifications,
            }),
        }
    }

    /// The Redis key name of `key`: public so that an operator can find a
    /// key's entry with `redis-cli` (for example to inspect it, or to check
    /// its TTL); client input never reaches it, it is a hash of scope and
    /// key.
    pub fn key_name(&self, key: StoreKey) -> String {
        format!("{}:{}", self.inner.prefix, key.to_hex())
    }

    /// Orphans, claims whose reply never came back (a timeout, a dropped
    /// connection, a caller that went away during the claim), waiting to be
    /// released in the background. At most 1 024 wait per store; beyond
    /// that, an orphan expires with its lease.
    pub fn orphans_pending(&self) -> usize {
        self.inner.kit.abandoner.pending()
    }
}
