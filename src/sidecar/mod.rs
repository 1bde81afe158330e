//! The sidecar: the layer as a reverse proxy in front of any HTTP backend.
//!
//! [`serve`] accepts HTTP/1.1 and HTTP/2 (cleartext) connections, answers
//! its own health check, and forwards everything else through an
//! [`IdempotencyLayer`] to one upstream, so a backend written in any
//! language gets the same guarantee without a line of its code changing.
//! The `idempotency-sidecar` binary (feature `sidecar`) is a command line
//! over this module.
//!
//! Forwarding keeps the method, path, query, headers (minus hop-by-hop
//! ones, `Proxy-Authorization` and `Proxy-Connection` among them; plus
//! `Forwarded`, `X-Forwarded-For`, `-Host` and `-Proto`, where a client's
//! own `Forwarded` and `X-Forwarded-For` are replaced unless
//! [`SidecarConfig::trust_forwarded_headers`]), body and trailers, over
//! pooled keep-alive connections (HTTP/1.1, or h2c with
//! [`SidecarConfig::upstream_h2c`]). Client connections are bounded in
//! number ([`SidecarConfig::max_connections`]) and in how long a request's
//! head may take to arrive ([`SidecarConfig::header_read_timeout`]).
//!
//! A slow or broken upstream never makes a request run twice:
//!
//! | the upstream | the client gets | the key |
//! |---|---|---|
//! | cannot be connected to (nothing was sent) | 502 `UpstreamUnavailable` | released: a retry is sent once the upstream is back |
//! | has not answered within [`upstream_timeout`](SidecarConfig::upstream_timeout) | 504 `UpstreamTimeout` with `Retry-After` | still held: the call goes on, its response is stored when it comes, and a retry waits for it or replays it |
//! | has not answered within [`upstream_hard_timeout`](SidecarConfig::upstream_hard_timeout) | (the 504 above) | completed as "outcome unknown": retries get 409 `OutcomeUnknown` |
//! | drops the connection after the request was sent, or its response body breaks off | 502 `OutcomeUnknown`, or the part of the body that came | completed as "outcome unknown" |
//!
//! ([`IdempotencyLayer::release_unknown_outcomes`] releases unknown outcomes
//! instead, for upstreams where running twice is harmless.)
//!
//! On shutdown it stops accepting, lets open connections finish, and then
//! waits for executions whose clients went away, so every started execution
//! is stored before the process exits.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderName, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_layer::Layer;
use tower_service::Service;

use crate::IdempotencyLayer;
use crate::body::ResponseBody;
use crate::key::Scope;
use crate::problem::{Problem, ProblemKind};
use crate::store::Store;

mod forward;

use forward::{ClientAddr, Proxy, source_chain};

/// Default path of the sidecar's own health check.
pub const DEFAULT_HEALTH_PATH: &str = "/_idempotency/health";
/// Default bound on the client's wait for the upstream.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound on the upstream call itself, after which its outcome is
/// taken as unknown.
pub const DEFAULT_UPSTREAM_HARD_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Default bound on reading a request's head (HTTP/1): a client that takes
/// longer is disconnected, so slow clients cannot hold connections open.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on open client connections; further clients wait in the
/// listen backlog until one closes.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Why the sidecar could not start or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SidecarError {
    /// The upstream address is not an absolute `http://host:port` URI.
    #[error(
        "the upstream must be an absolute http:// URI such as http://127.0.0.1:8081, got {0:?}"
    )]
    InvalidUpstream(String),
    /// Listening failed.
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
}

/// Where and how the sidecar forwards.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    scheme: Scheme,
    authority: Authority,
    h2c: bool,
    timeout: Duration,
    hard_timeout: Duration,
    health_path: String,
    trust_forwarded: bool,
    header_read_timeout: Duration,
    max_connections: usize,
}

impl SidecarConfig {
    /// Forwards to `upstream`, an absolute `http://host:port` URI (its path,
    /// if any, is ignored: requests keep their own).
    pub fn new(upstream: &str) -> Result<Self, SidecarError> {
        let invalid = || SidecarError::InvalidUpstream(upstream.to_owned());
        let uri: Uri = upstream.parse().map_err(|_| invalid())?;
        let scheme = uri.scheme().cloned().ok_or_else(invalid)?;
        if scheme != Scheme::HTTP {
            return Err(invalid());
        }
        let authority = uri.authority().cloned().ok_or_else(invalid)?;
        Ok(Self {
            scheme,
            authority,
            h2c: false,
            timeout: DEFAULT_UPSTREAM_TIMEOUT,
            hard_timeout: DEFAULT_UPSTREAM_HARD_TIMEOUT,
            health_path: DEFAULT_HEALTH_PATH.to_owned(),
            trust_forwarded: false,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        })
    }

    /// Keeps the client's `X-Forwarded-For` and `Forwarded` headers and
    /// appends this hop to them (default off: they are replaced, because a
    /// client can put anything there and an upstream that reads the first
    /// value would trust a spoofed address). Turn it on only behind a proxy
    /// you trust to set them. `X-Forwarded-Host` and `-Proto` are always
    /// set by the sidecar.
    pub fn trust_forwarded_headers(mut self, trust: bool) -> Self {
        self.trust_forwarded = trust;
        self
    }

    /// Bounds how long a client may take to send a request's head over
    /// HTTP/1 (default 10 s, at least 1 ms); past it the connection is
    /// closed.
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Bounds the open client connections (default 4 096, at least 1).
    /// Past it the sidecar accepts no more until one closes.
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections.max(1);
        self
    }

    /// Speaks HTTP/2 without TLS (h2c) to the upstream (default HTTP/1.1).
    pub fn upstream_h2c(mut self, h2c: bool) -> Self {
        self.h2c = h2c;
        self
    }

    /// Bounds the client's wait (default 30 s): past it the client gets 504
    /// with `Retry-After`, while the upstream call goes on (for a guarded
    /// request) and its response is stored when it arrives, for the
    /// client's retry to wait for or replay. Unguarded requests are simply
    /// cut off.
    pub fn upstream_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Bounds the upstream call itself (default 5 minutes): an upstream that
    /// has not answered by then may or may not have acted, and the key
    /// completes as "outcome unknown" (retries get 409, nothing is sent
    /// again). Keep it above [`upstream_timeout`](Self::upstream_timeout).
    pub fn upstream_hard_timeout(mut self, timeout: Duration) -> Self {
        self.hard_timeout = timeout;
        self
    }

    /// The path of the sidecar's own health check (default
    /// `/_idempotency/health`), answered without touching the upstream.
    pub fn health_path(mut self, path: impl Into<String>) -> Self {
        self.health_path = path.into();
        self
    }
}

/// A scope function for [`IdempotencyLayer::scope`] that takes the scope from
/// a request header set by the gateway in front (an API key or tenant id),
/// hashed so the raw value is never kept. Requests without it are refused
/// (the gateway is misconfigured).
pub fn scope_from_header(
    name: HeaderName,
) -> impl Fn(&http::request::Parts) -> Option<Scope> + Send + Sync + 'static {
    move |parts| {
        let value = parts.headers.get(&name)?;
        let digest: [u8; 32] = Sha256::digest(value.as_bytes()).into();
        Some(Scope::new(Bytes::copy_from_slice(&digest)))
    }
}

/// The 504 a client gets when its wait ends before the upstream answered.
fn client_timeout<B>(waited: Duration) -> Response<ResponseBody<B>> {
    Problem::new(ProblemKind::UpstreamTimeout)
        .detail(format!(
            "the upstream did not answer within {waited:?}; the request goes on, and its response is kept for a retry with the same key"
        ))
        .retry_after(Duration::from_secs(1))
        .into_response(|bytes| ResponseBody::full(bytes, None))
}

/// Serves the sidecar on `listener` until `shutdown` completes, then drains:
/// it stops accepting, lets open connections finish, and waits for detached
/// executions, so every execution that started is stored before it returns.
pub async fn serve<St: Store>(
    listener: TcpListener,
    layer: IdempotencyLayer<St>,
    config: SidecarConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SidecarError> {
    let health_path = config.health_path.clone();
    let client_wait = config.timeout;
    let places = Arc::new(Semaphore::new(config.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    let service = layer.layer(Proxy::new(config));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // A place first, then a connection: past the limit, clients wait in
        // the listen backlog.
        let place = tokio::select! {
            place = places.clone().acquire_owned() => match place {
                Ok(place) => place,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off, go on.
                    tracing::warn!(error = %e, "sidecar accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = service.clone();
        let health_path = health_path.clone();
        let per_request = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let mut service = service.clone();
            let is_health = req.method() == http::Method::GET && req.uri().path() == health_path;
            req.extensions_mut().insert(ClientAddr(peer));
            async move {
                if is_health {
                    return Ok::<_, Infallible>(Response::new(ResponseBody::full(
                        Bytes::from_static(b"ok"),
                        None,
                    )));
                }
                std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
                // Past the client's wait, the call is dropped here: a
                // guarded execution then goes on in a task of its own and
                // stores its response when it comes.
                match tokio::time::timeout(client_wait, service.call(req)).await {
                    Ok(answered) => answered,
                    Err(_) => Ok(client_timeout(client_wait)),
                }
            }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), per_request)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %source_chain(&*e), "sidecar connection ended with an error");
            }
            drop(place);
        });
    }
    drop(listener);
    tracing::info!("sidecar draining: finishing open connections and executions");
    graceful.shutdown().await;
    layer.executions().wait_idle().await;
    Ok(())
}
