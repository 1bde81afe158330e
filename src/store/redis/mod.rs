//! [`RedisStore`]: one guarantee across every process that shares a Redis.

mod connection;
mod error;
mod notify;
mod record;
mod scripts;
#[cfg(feature = "tls")]
mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};

use self::connection::{Connection, Reopen};
use self::error::corrupt;
use self::notify::PubSub;
use super::remote::abandon::Orphan;
use super::remote::call::{Cause, Failure, Health, bounded};
use super::remote::notify::Notifications;
use super::remote::wait::{self, Probe};
use super::remote::{Kit, Remote, Unsettled, millis};
use super::{Claim, CompletedRecord, LeaseStatus, OwnerToken, Store, StoreError, StoreErrorKind};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;

/// Default prefix of the Redis key names.
pub const DEFAULT_PREFIX: &str = "idem";
/// Default bound on each Redis command.
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_millis(500);
/// Default interval of the fallback check while waiting on a key.
pub const DEFAULT_FALLBACK_CHECK: Duration = Duration::from_secs(1);
/// Default time a record's fence is remembered after its claim.
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
///   the record expired, was purged, or was lost with a Redis that
///   restarted empty. Leases are judged by the Redis server's clock alone.
/// - **Little work for the Redis server**: a record is one string (a
///   59-byte header, then the stored response), so a replay's script is one
///   `GET` returned as it is, and a claim's and a completion's a `GET`, the
///   server's clock (`TIME`) and one `SET … PX`. Records of the earlier
///   format (a hash per key) are still read.
/// - **Cluster-safe names**: each key is `<prefix>:<hex SHA-256 of scope and
///   key>`; client input never reaches a key name, so it can never pick a
///   Cluster slot.
/// - **Waiting without polling**: completions and releases of claims that
///   someone waits for are published on the channel `<prefix>:done`; waiters
///   in every process wake at once (claims nobody waits for publish nothing). A
///   bounded fallback check (default every second) covers lost
///   notifications, which Redis pub/sub does not redeliver.
/// - **Bounded**: every command has a timeout (default 500 ms); a frozen or
///   unreachable Redis makes the layer answer 503, and the store recovers by
///   itself when Redis is back.
/// - **No orphan claims**: a claim whose reply is lost (a timeout, a broken
///   connection, or a caller dropped while it was under way, as when a
///   client disconnects) may have been applied with nobody to own it. Its
///   release, by the nonce it was sent with, is queued and sent by one
///   background task per store once Redis answers. At most 1 024 wait
///   ([`lost_claims_pending`](Self::lost_claims_pending)); past that, or
///   once its lease has ended, such a claim simply expires. A claim whose
///   connection was refused, or that Redis answered with an error, never
///   took effect and queues nothing. The release may reach Redis before
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
/// start-up otherwise): an evicted claim lets a duplicate execute. See the
/// README's "Guarantees and limits" for replication and persistence.
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

struct Scripts {
    claim: Script,
    complete: Script,
    release: Script,
    extend: Script,
    lease_left: Script,
    purge: Script,
    abandon: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            claim: Script::new(scripts::CLAIM),
            complete: Script::new(scripts::COMPLETE),
            release: Script::new(scripts::RELEASE),
            extend: Script::new(scripts::EXTEND),
            lease_left: Script::new(scripts::LEASE_LEFT),
            purge: Script::new(scripts::PURGE),
            abandon: Script::new(scripts::ABANDON),
        }
    }
}

/// What a store is configured with, beside its connection.
#[derive(Debug, Clone)]
struct Settings {
    prefix: String,
    op_timeout: Duration,
    fallback_check: Duration,
    fence_memory: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
            op_timeout: DEFAULT_OPERATION_TIMEOUT,
            fallback_check: DEFAULT_FALLBACK_CHECK,
            fence_memory: DEFAULT_FENCE_MEMORY,
        }
    }
}

/// Configures a [`RedisStore`] over a `redis::Client`.
#[derive(Debug, Clone)]
pub struct RedisStoreBuilder {
    client: redis::Client,
    #[cfg(feature = "tls")]
    tls: crate::store::tls::TlsSettings,
    settings: Settings,
}

impl RedisStoreBuilder {
    /// Trusts the certificates of the PEM bundle at `path` (read when the
    /// store is built) for `rediss://` connections, in place of Mozilla's
    /// roots: for a Redis whose certificate a private CA signed (feature
    /// `tls`). A certificate that does not verify fails every connection;
    /// nothing is ever sent in the clear instead.
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

    /// Presents this client certificate (a PEM chain) and its private key
    /// (PEM) on `rediss://` connections, for a Redis that asks clients for
    /// one (`tls-auth-clients yes`).
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

    /// The client to connect with: the one given, or one of its own with
    /// the TLS settings.
    fn client(&self) -> Result<redis::Client, StoreError> {
        #[cfg(feature = "tls")]
        crate::store::tls::ensure_crypto_provider();
        #[cfg(feature = "tls")]
        tls::refuse_insecure(self.client.get_connection_info())?;
        #[cfg(feature = "tls")]
        if self.tls.is_set() {
            let info = self.client.get_connection_info().clone();
            if !matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
                return Err(
                    StoreError::new(StoreErrorKind::Unavailable, "configure").with_source(
                        "a TLS CA or client certificate was given, but the store's URL is not rediss://",
                    ),
                );
            }
            let certificates = tls::certificates(&self.tls)?;
            return redis::Client::build_with_tls(info, certificates)
                .map_err(|e| e.into_store_error("configure"));
        }
        Ok(self.client.clone())
    }

    /// The prefix of every key name and of the channel (default `idem`).
    /// It must not contain `{` or `}` (they would pin a Cluster slot).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.settings.prefix = prefix.into();
        self
    }

    /// The bound on each Redis command (default 500 ms, at least 1 ms). A
    /// command that takes longer fails as [`StoreErrorKind::Timeout`].
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.settings.op_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How often a waiter re-checks its key when no notification came
    /// (default 1 s, at least 10 ms).
    pub fn fallback_check(mut self, interval: Duration) -> Self {
        self.settings.fallback_check = interval.max(Duration::from_millis(10));
        self
    }

    /// How long the record of a claim that never completed (and so its
    /// fence) is kept after its lease ended (default 24 h): the claim keeps
    /// it a lease plus this long, and each renewal moves that past the new
    /// lease. The same setting means the same on `PostgresStore`. Keep it
    /// at least the layer's retention.
    pub fn fence_memory(mut self, keep: Duration) -> Self {
        self.settings.fence_memory = keep;
        self
    }

    /// Builds the store. It connects lazily, so a process can start while
    /// Redis is down (guarded requests get 503 until it is back). It then
    /// checks, best effort, that Redis will not evict claims. Over TLS
    /// (feature `tls`), it first tries one connection (within the operation
    /// timeout): a server whose certificate does not verify fails the
    /// build, so a misconfigured process refuses to start instead of
    /// answering 503 to everything.
    pub async fn build(self) -> Result<RedisStore, StoreError> {
        self.check_prefix()?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.settings.op_timeout))
            .set_response_timeout(Some(self.settings.op_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let client = self.client()?;
        #[cfg(feature = "tls")]
        tls::refuse_a_certificate_that_does_not_verify(&client, self.settings.op_timeout).await?;
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(|e| e.into_store_error("connect"))?;
        let reopen: Reopen<ConnectionManager> = Arc::new({
            let client = client.clone();
            move || {
                let (client, config) = (client.clone(), config.clone());
                Box::pin(async move { ConnectionManager::new_lazy_with_config(client, config) })
            }
        });
        let conn = Connection::new(conn, Some(reopen));
        let store = RedisStore::assemble(conn, Some(client), self.settings);
        store.warn_if_claims_can_be_evicted().await;
        Ok(store)
    }

    fn check_prefix(&self) -> Result<(), StoreError> {
        if self.settings.prefix.contains(['{', '}']) {
            return Err(StoreError::new(StoreErrorKind::Unavailable, "configure").with_source(
                "the key prefix must not contain '{' or '}' (they would pin a Redis Cluster slot)",
            ));
        }
        Ok(())
    }

    /// Builds a store on a Redis Cluster (feature `redis-cluster`), with
    /// this builder's settings: `nodes` are the cluster's seed nodes (for
    /// example `redis://127.0.0.1:7000`), and the builder's own URL is the
    /// node whose pub/sub wakes waiters (pub/sub reaches every node of a
    /// cluster). Every operation is a single-key script, so each goes to
    /// the shard that owns its key; a shard that is down makes its keys
    /// answer 503 while the others keep serving.
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub async fn build_cluster<T: AsRef<str>>(
        self,
        nodes: &[T],
    ) -> Result<RedisStore<redis::cluster_async::ClusterConnection>, StoreError> {
        self.check_prefix()?;
        let notifications = self.client()?;
        #[cfg(feature = "tls")]
        for node in nodes {
            use redis::IntoConnectionInfo;
            // A node that does not parse fails below, with the cluster
            // client's own error.
            if let Ok(info) = node.as_ref().into_connection_info() {
                tls::refuse_insecure(&info)?;
            }
        }
        let builder = redis::cluster::ClusterClient::builder(nodes.iter().map(|n| n.as_ref()));
        #[cfg(feature = "tls")]
        let builder = if self.tls.is_set() {
            builder.certs(tls::certificates(&self.tls)?)
        } else {
            builder
        };
        let client = builder
            .connection_timeout(self.settings.op_timeout)
            .response_timeout(self.settings.op_timeout)
            // Retries follow MOVED/ASK redirects during a resharding, and
            // re-send after an I/O error even when the first copy was
            // applied: a second run of a script writes nothing the first
            // did not (a claim that finds its own nonce answers its own
            // grant, see `scripts`), though its answer may say less (a
            // second purge finds nothing to drop).
            .retries(2)
            .build()
            .map_err(|e| e.into_store_error("configure"))?;
        let connect_timeout = self.settings.op_timeout;
        let conn = tokio::time::timeout(connect_timeout, client.get_async_connection())
            .await
            .map_err(|_| StoreError::new(StoreErrorKind::Timeout, "connect"))?
            .map_err(|e| e.into_store_error("connect"))?;
        let reopen: Reopen<redis::cluster_async::ClusterConnection> = Arc::new(move || {
            let client = client.clone();
            Box::pin(async move {
                match tokio::time::timeout(connect_timeout, client.get_async_connection()).await {
                    Ok(conn) => conn,
                    Err(_) => Err(redis::RedisError::from(std::io::Error::from(
                        std::io::ErrorKind::TimedOut,
                    ))),
                }
            })
        });
        let conn = Connection::new(conn, Some(reopen));
        Ok(RedisStore::assemble(
            conn,
            Some(notifications),
            self.settings,
        ))
    }
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
            .map_err(|e| e.into_store_error("configure"))?;
        let nodelay = info.tcp_settings().clone().set_nodelay(true);
        let client = redis::Client::open(info.set_tcp_settings(nodelay))
            .map_err(|e| e.into_store_error("configure"))?;
        Ok(Self::builder_for(client))
    }

    /// Starts configuring a store over an existing client. (With the
    /// builder's TLS settings, a client of its own is made from this one's
    /// address.)
    pub fn builder_for(client: redis::Client) -> RedisStoreBuilder {
        RedisStoreBuilder {
            client,
            #[cfg(feature = "tls")]
            tls: crate::store::tls::TlsSettings::default(),
            settings: Settings::default(),
        }
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
    /// key's record with `redis-cli` (for example to inspect it, or to check
    /// its TTL); client input never reaches it, it is a hash of scope and
    /// key.
    pub fn key_name(&self, key: StoreKey) -> String {
        format!("{}:{}", self.inner.prefix, key.to_hex())
    }

    /// Runs a script within the operation timeout, telling apart the
    /// failures after which it cannot have taken effect.
    async fn call(
        &self,
        op: &'static str,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<Value, Failure> {
        let mut conn = self.inner.conn.get();
        let until = self.inner.kit.deadline();
        bounded(
            op,
            until,
            &*self.inner,
            invocation.invoke_async::<Value>(&mut conn),
        )
        .await
    }

    /// An invocation of `script` on `key` by the owner of `token`: the
    /// first argument of every fenced script is the owner token.
    fn by_owner<'s>(
        &self,
        script: &'s Script,
        key: StoreKey,
        token: OwnerToken,
    ) -> redis::ScriptInvocation<'s> {
        let mut invocation = script.key(self.key_name(key));
        invocation.arg(record::token_arg(token));
        invocation
    }

    async fn fenced(
        &self,
        op: &'static str,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<LeaseStatus, StoreError> {
        match self.call(op, invocation).await? {
            Value::Int(1) => Ok(LeaseStatus::Held),
            Value::Int(0) => Ok(LeaseStatus::Lost),
            other => Err(corrupt(op, &other)),
        }
    }

    /// Claims whose reply was lost (a timeout, a dropped connection, a
    /// caller that went away during the claim), waiting to be released in
    /// the background. At most 1 024 wait per store; beyond that, such a
    /// claim expires with its lease.
    pub fn lost_claims_pending(&self) -> usize {
        self.inner.kit.abandoner.pending()
    }

    async fn warn_if_claims_can_be_evicted(&self) {
        let mut conn = self.inner.conn.get();
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        let query = cmd.query_async::<Vec<String>>(&mut conn);
        match tokio::time::timeout(self.inner.kit.op_timeout, query).await {
            Ok(Ok(reply)) => match reply.get(1).map(String::as_str) {
                Some("noeviction") | None => {}
                Some(policy) => tracing::warn!(
                    policy,
                    "Redis maxmemory-policy is not `noeviction`: under memory pressure Redis may evict \
                     in-flight claims and stored responses, and a retry would then execute again"
                ),
            },
            _ => tracing::debug!(
                "could not read Redis maxmemory-policy (CONFIG GET refused or Redis unreachable)"
            ),
        }
    }
}

impl<C: Clone + Send + 'static> Health for Inner<C> {
    fn answered(&self) {
        self.conn.answered();
    }

    /// After a few timeouts in a row the connection may be half-open, and
    /// a new one is opened (and a new subscription with it).
    fn timed_out(&self) {
        if self.conn.timed_out()
            && let Some(notifications) = &self.notifications
        {
            notifications.reset();
        }
    }
}

impl<C> Remote for Inner<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn kit(&self) -> &Kit {
        &self.kit
    }

    /// The claim may still arrive after this release (queued on an old
    /// connection): the release leaves its nonce behind for as long as the
    /// claim's record would have lived.
    fn abandon_once(
        self: Arc<Self>,
        orphan: &Orphan,
    ) -> impl Future<Output = Result<(), Failure>> + Send {
        let keep = millis(orphan.keep(self.kit.fence_memory));
        let (name, nonce) = (orphan.name.clone(), record::nonce_arg(orphan.nonce));
        let store = RedisStore { inner: self };
        async move {
            let mut invocation = store.inner.scripts.abandon.key(&name);
            invocation
                .arg(&nonce[..])
                .arg(&store.inner.channel)
                .arg(keep);
            if store.call("abandon", invocation).await? == Value::Int(1) {
                tracing::debug!("released a claim whose reply was lost");
            }
            Ok(())
        }
    }
}

impl<C> Store for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn claim(
        &self,
        key: StoreKey,
        fp: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let name = self.key_name(key);
        let nonce = self.inner.kit.nonces.next();
        let keep = millis(lease.saturating_add(self.inner.kit.fence_memory));
        let mut invocation = self.inner.scripts.claim.key(&name);
        invocation
            .arg(&fp.as_bytes()[..])
            .arg(millis(lease))
            .arg(keep)
            .arg(&record::nonce_arg(nonce)[..]);
        // Until its reply is in, the claim may have been applied with nobody
        // to own it: if the reply is lost, or this future is dropped (the
        // client went away), the guard queues its release.
        let mut unsettled = Unsettled::new(&self.inner, Orphan::new(name, nonce, lease));
        let reply = self
            .call("claim", invocation)
            .await
            .map_err(|failure| unsettled.failed(failure))?;
        unsettled.settled();
        match reply {
            Value::Int(fence) => match u64::try_from(fence) {
                Ok(fence) => Ok(Claim::Acquired(OwnerToken::new(fence, nonce))),
                Err(_) => Err(corrupt("claim", &reply)),
            },
            Value::BulkString(stored) => record::parse(stored).ok_or_else(|| {
                StoreError::new(StoreErrorKind::Corrupt, "claim")
                    .with_source("a record Redis returned is not one this store reads")
            }),
            other => Err(corrupt("claim", &other)),
        }
    }

    async fn complete(
        &self,
        key: StoreKey,
        token: OwnerToken,
        record: CompletedRecord,
        retention: Duration,
    ) -> Result<LeaseStatus, StoreError> {
        let mut invocation = self.by_owner(&self.inner.scripts.complete, key, token);
        invocation
            .arg(record::done(token, &record))
            .arg(millis(retention))
            .arg(&self.inner.channel);
        self.fenced("complete", invocation).await
    }

    async fn release(&self, key: StoreKey, token: OwnerToken) -> Result<LeaseStatus, StoreError> {
        let mut invocation = self.by_owner(&self.inner.scripts.release, key, token);
        invocation.arg(&self.inner.channel);
        self.fenced("release", invocation).await
    }

    async fn extend(
        &self,
        key: StoreKey,
        token: OwnerToken,
        lease: Duration,
    ) -> Result<LeaseStatus, StoreError> {
        let mut invocation = self.by_owner(&self.inner.scripts.extend, key, token);
        // The record outlives the renewed lease by the fence memory, as the
        // claim made it.
        invocation
            .arg(millis(lease))
            .arg(millis(lease.saturating_add(self.inner.kit.fence_memory)));
        self.fenced("extend", invocation).await
    }

    async fn wait(&self, key: StoreKey, fence: u64, timeout: Duration) -> Result<(), StoreError> {
        let name = self.key_name(key);
        let probe = || async {
            // Also marks the claim waited for, so its end is published.
            let mut invocation = self.inner.scripts.lease_left.key(&name);
            invocation.arg(record::fence_arg(fence));
            match self.call("wait", invocation).await? {
                Value::Int(left) => Ok(match u64::try_from(left) {
                    Ok(left) => Probe::Live {
                        left: Some(Duration::from_millis(left)),
                    },
                    Err(_) => Probe::Gone,
                }),
                other => Err(corrupt("wait", &other)),
            }
        };
        wait::until_gone(
            self.inner.notifications.as_ref(),
            &name,
            timeout,
            self.inner.kit.fallback_check,
            probe,
        )
        .await
    }

    async fn purge(&self, key: StoreKey) -> Result<bool, StoreError> {
        let name = self.key_name(key);
        let mut invocation = self.inner.scripts.purge.key(&name);
        invocation.arg(&self.inner.channel);
        match self.call("purge", invocation).await? {
            Value::Int(n) => Ok(n == 1),
            other => Err(corrupt("purge", &other)),
        }
    }
}
