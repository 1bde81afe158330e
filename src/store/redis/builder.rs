//! [`RedisStoreBuilder`]: the client, its TLS, the store's settings, and
//! the checks made when a store is built.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};

use super::connection::{Connection, Reopen};
#[cfg(feature = "tls")]
use super::tls;
use super::{
    DEFAULT_FALLBACK_CHECK, DEFAULT_FENCE_MEMORY, DEFAULT_OPERATION_TIMEOUT, DEFAULT_PREFIX,
    RedisStore,
};
use crate::store::StoreError;
use crate::store::remote::call::Cause;

/// What a store is configured with, beside its connection.
#[derive(Debug, Clone)]
pub(super) struct Settings {
    pub(super) prefix: String,
    pub(super) op_timeout: Duration,
    pub(super) fallback_check: Duration,
    pub(super) fence_memory: Duration,
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
    pub(super) fn new(client: redis::Client) -> Self {
        Self {
            client,
            #[cfg(feature = "tls")]
            tls: crate::store::tls::TlsSettings::default(),
            settings: Settings::default(),
        }
    }

    crate::store::tls_setters!("`rediss://` connections (commands, notifications, cluster nodes)");

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
                return Err(StoreError::configuration(
                    "a TLS CA or client certificate was given, but the store's URL is not rediss://",
                ));
            }
            let certificates = tls::certificates(&self.tls)?;
            return redis::Client::build_with_tls(info, certificates)
                .map_err(StoreError::configuration);
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
    /// command that takes longer fails as
    /// [`StoreErrorKind::Timeout`](crate::store::StoreErrorKind::Timeout).
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

    /// How long the entry of a claim that never completed (and so its
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
            return Err(StoreError::configuration(
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
            .map_err(StoreError::configuration)?;
        let connect_timeout = self.settings.op_timeout;
        let conn = tokio::time::timeout(connect_timeout, client.get_async_connection())
            .await
            .map_err(|_| StoreError::new(crate::store::StoreErrorKind::Timeout, "connect"))?
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

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
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
