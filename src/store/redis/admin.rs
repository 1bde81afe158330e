//! [`Admin`](crate::store::admin::Admin) for [`RedisStore`]: one key read
//! by a script that changes nothing, every key found by `SCAN` over the
//! store's prefix (on every primary of a cluster).

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionLike;
use redis::{RedisResult, Value};

use super::error::corrupt;
use super::{RedisStore, entry};
use crate::key::StoreKey;
use crate::store::admin::Purged;
use crate::store::admin::sealed::{Backend, Expected, Noted, Oldest, Raw};
use crate::store::remote::call::bounded;
use crate::store::{StoreError, StoreErrorKind};

/// How many names one `SCAN` asks for.
const SCAN_COUNT: usize = 512;

/// A Redis node to scan: the one server, or a cluster primary's address.
#[derive(Debug, Clone)]
pub enum Node {
    /// The server the connection talks to.
    Only,
    /// A cluster primary.
    Address(String, u16),
}

/// A connection whose keyspace can be walked: a single server's
/// (`ConnectionManager`, `MultiplexedConnection`), or a cluster's, primary
/// by primary. Sealed: `Admin` is implemented for a `RedisStore` on one of
/// these connections.
pub trait Keyspace: ConnectionLike + Clone + Send + Sync + 'static {
    /// The nodes whose keys together are every key.
    #[doc(hidden)]
    fn nodes(&mut self) -> impl Future<Output = RedisResult<Vec<Node>>> + Send {
        std::future::ready(Ok(vec![Node::Only]))
    }

    /// One `SCAN` page of `node`: the next cursor (0 at the end) and names.
    #[doc(hidden)]
    fn scan_page(
        &mut self,
        node: &Node,
        cursor: u64,
        pattern: &str,
    ) -> impl Future<Output = RedisResult<(u64, Vec<Vec<u8>>)>> + Send {
        let _ = node;
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        async move { scan.query_async(self).await }
    }
}

impl Keyspace for redis::aio::ConnectionManager {}
impl Keyspace for redis::aio::MultiplexedConnection {}

#[cfg(feature = "redis-cluster")]
impl Keyspace for redis::cluster_async::ClusterConnection {
    async fn nodes(&mut self) -> RedisResult<Vec<Node>> {
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("NODES");
        let reply = self
            .route_command(cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))
            .await?;
        let text: String = redis::from_redis_value(reply)?;
        let primaries = primaries(&text);
        if primaries.is_empty() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "CLUSTER NODES lists no primary to scan",
            )));
        }
        Ok(primaries)
    }

    async fn scan_page(
        &mut self,
        node: &Node,
        cursor: u64,
        pattern: &str,
    ) -> RedisResult<(u64, Vec<Vec<u8>>)> {
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let routing = match node {
            Node::Only => SingleNodeRoutingInfo::RandomPrimary,
            Node::Address(host, port) => SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port: *port,
            },
        };
        let reply = self
            .route_command(scan, RoutingInfo::SingleNode(routing))
            .await?;
        Ok(redis::from_redis_value(reply)?)
    }
}

/// `text` with the characters `SCAN … MATCH` reads as a pattern (`*`,
/// `?`, `[`, `]`, `\\`) escaped, so it matches only itself.
fn glob_escaped(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// The primaries `CLUSTER NODES` lists that are not failing: `host:port`
/// of each line whose flags say `master`.
#[cfg(any(feature = "redis-cluster", test))]
fn primaries(nodes: &str) -> Vec<Node> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let address = fields.nth(1)?;
            let flags = fields.next()?;
            let flags: Vec<&str> = flags.split(',').collect();
            // A primary only suspected of failing (`fail?`) still holds
            // its keys: it is scanned, and the listing fails if it does
            // not answer. One the cluster agreed has failed (`fail`) has
            // handed its slots to a replica, listed as a primary.
            if !flags.contains(&"master") || flags.contains(&"fail") {
                return None;
            }
            // `ip:port@cport[,hostname]`
            let address = address.split(['@', ',']).next()?;
            let (host, port) = address.rsplit_once(':')?;
            Some(Node::Address(host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

impl<C: Keyspace> RedisStore<C> {
    /// The key a name of this store's names, if it is one.
    fn key_of(&self, name: &[u8]) -> Option<StoreKey> {
        let hex = name.strip_prefix(self.inner.prefix.as_bytes())?;
        let hex = hex.strip_prefix(b":")?;
        StoreKey::from_hex(std::str::from_utf8(hex).ok()?)
    }

    async fn read_named(&self, name: &str) -> Result<Raw, StoreError> {
        let invocation = self.inner.scripts.inspect.key(name);
        match self.call("inspect", invocation).await {
            Ok(Value::Array(parts)) => Ok(raw_of(parts)),
            Ok(other) => Err(corrupt("inspect", &other)),
            Err(failure) if failure.error.kind() == StoreErrorKind::Corrupt => {
                Ok(Raw::Unreadable {
                    problem: crate::store::error_chain(&failure.error),
                })
            }
            Err(failure) => Err(failure.error),
        }
    }
}

/// The entry, its time to live and the server's clock, as `INSPECT`
/// answers them.
fn raw_of(parts: Vec<Value>) -> Raw {
    let mut parts = parts.into_iter();
    let (entry, pttl, now) = (parts.next(), parts.next(), parts.next());
    let pttl = match pttl {
        Some(Value::Int(ms)) => u64::try_from(ms).ok().map(Duration::from_millis),
        _ => None,
    };
    let now = match now {
        Some(Value::Int(ms)) => u64::try_from(ms).unwrap_or(0),
        _ => 0,
    };
    match entry {
        Some(Value::BulkString(bytes)) => entry::read(bytes, pttl, now),
        Some(Value::Nil) | None => Raw::Absent { fence: None },
        Some(other) => Raw::Unreadable {
            problem: format!("unexpected reply from Redis: {other:?}"),
        },
    }
}

impl<C: Keyspace> Backend for RedisStore<C> {
    /// Redis keeps no label: its entries have no room for one that
    /// earlier versions could still read.
    async fn read(&self, key: StoreKey) -> Result<(Raw, Noted), StoreError> {
        Ok((
            self.read_named(&self.key_name(key)).await?,
            Noted::default(),
        ))
    }

    async fn scan(&self, oldest: &mut Oldest) -> Result<(), StoreError> {
        let pattern = format!("{}:*", glob_escaped(&self.inner.prefix));
        let mut conn = self.inner.conn.get();
        let nodes = self.bounded_call("scan", conn.nodes()).await?;
        for node in nodes {
            let mut cursor = 0;
            loop {
                let (next, names) = self
                    .bounded_call("scan", conn.scan_page(&node, cursor, &pattern))
                    .await?;
                for name in names {
                    // The channel shares the prefix; names of other shapes
                    // are not this store's.
                    let Some(key) = self.key_of(&name) else {
                        continue;
                    };
                    let (raw, noted) = self.read(key).await?;
                    oldest.offer(raw.inspect_with(key, Self::CLOCK, noted));
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }

    async fn drop_entry(&self, key: StoreKey, force: bool) -> Result<Purged, StoreError> {
        let name = self.key_name(key);
        let mut invocation = self.inner.scripts.purge.key(&name);
        invocation
            .arg(&self.inner.channel)
            .arg(if force { "1" } else { "0" });
        match self.call("purge", invocation).await? {
            Value::Int(0) => Ok(Purged::Nothing),
            Value::Int(1) => Ok(Purged::Dropped),
            Value::Int(2) => Ok(Purged::RefusedLiveClaim),
            other => Err(corrupt("purge", &other)),
        }
    }

    async fn replace(
        &self,
        key: StoreKey,
        fence: u64,
        expected: &Expected,
        payload: Option<Bytes>,
    ) -> Result<bool, StoreError> {
        // Redis keeps no claim past its lease with its effect committed.
        let Expected::Record(was) = expected else {
            return Ok(false);
        };
        let name = self.key_name(key);
        let mut invocation = self.inner.scripts.resolve.key(&name);
        let release = payload.is_none();
        invocation
            .arg(entry::fence_arg(fence))
            .arg(payload.as_deref().unwrap_or_default())
            .arg(if release { "1" } else { "0" })
            .arg(&was[..]);
        match self.call("resolve", invocation).await? {
            Value::Int(n) => Ok(n == 1),
            other => Err(corrupt("resolve", &other)),
        }
    }
}

impl<C: Keyspace> RedisStore<C> {
    async fn bounded_call<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let until = self.inner.kit.deadline();
        Ok(bounded(op, until, &*self.inner, call).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primaries_of_cluster_nodes() {
        let text = "\
07c3 127.0.0.1:30004@31004 slave e7d1 0 1 4 connected
67ed 127.0.0.1:30002@31002 master - 0 1 2 connected 5461-10922
292f 127.0.0.1:30003@31003,node-3 myself,master - 0 0 3 connected 10923-16383
e7d1 127.0.0.1:30001@31001 master,fail - 0 1 1 disconnected
a1b2 127.0.0.1:30005@31005 master,fail? - 0 1 1 connected 0-5460
";
        let got: Vec<String> = primaries(text)
            .into_iter()
            .map(|n| match n {
                Node::Address(h, p) => format!("{h}:{p}"),
                Node::Only => "only".into(),
            })
            .collect();
        assert_eq!(
            got,
            ["127.0.0.1:30002", "127.0.0.1:30003", "127.0.0.1:30005"]
        );
        assert!(primaries("garbage\n\n").is_empty());
    }

    #[test]
    fn a_prefix_matches_only_itself() {
        assert_eq!(glob_escaped("idem"), "idem");
        assert_eq!(glob_escaped("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
