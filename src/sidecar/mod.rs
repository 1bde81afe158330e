//! The sidecar: the layer as a reverse proxy in front of any HTTP backend.
//!
//! [`serve`] accepts HTTP/1.1 and HTTP/2 (cleartext) connections, answers
//! its own health check (liveness, [`SidecarConfig::health_path`]) and
//! readiness check (503 while the store does not answer a ping,
//! [`SidecarConfig::ready_path`]), and forwards everything else through an
//! [`IdempotencyLayer`] to one upstream, so a backend written in any
//! language gets the same guarantee without a line of its code changing.
//! The `idempotency-sidecar` binary (feature `sidecar`) is a command line
//! over this module.
//!
//! Forwarding keeps the method, path, query, headers (minus hop-by-hop
//! ones, `Proxy-Authorization` and `Proxy-Connection` among them; plus
//! `Forwarded`, `X-Forwarded-For`, `-Host` and `-Proto`, where a client's
//! own `Forwarded`, `X-Forwarded-For` and `X-Forwarded-Host` are replaced
//! unless [`SidecarConfig::trust_forwarded_headers`]; `X-Forwarded-Host`
//! is the authority the client asked for, from HTTP/2's `:authority` or
//! an absolute-form target, else `Host`), body and trailers, over pooled keep-alive connections
//! (HTTP/1.1, or h2c with [`SidecarConfig::upstream_h2c`]). Client
//! connections are bounded in number
//! ([`SidecarConfig::max_connections`]), in how long a new one may go
//! without its first request and a request's head may take to arrive
//! ([`SidecarConfig::header_read_timeout`]), in how long a request's body
//! may take ([`SidecarConfig::upstream_timeout`]), in how long one may stay idle
//! ([`SidecarConfig::idle_timeout`]), and HTTP/2 ones are pinged
//! ([`SidecarConfig::keep_alive_interval`]).
//!
//! A slow or broken upstream never makes a request run twice:
//!
//! | the upstream | the client gets | the key |
//! |---|---|---|
//! | cannot be connected to (nothing was sent) | 502 `UpstreamUnavailable` | released: a retry is sent once the upstream is back |
//! | has not answered within [`upstream_timeout`](SidecarConfig::upstream_timeout) of the request going upstream | 504 `UpstreamTimeout` with `Retry-After` | still held: the call goes on, its response is stored when it comes, and a retry waits for it (up to the layer's wait, then 409 `InFlight`) or replays it |
//! | has not answered, or not ended its response body, within [`upstream_hard_timeout`](SidecarConfig::upstream_hard_timeout) | (the 504 above), or the part of the body that came, then an error | completed as "outcome unknown": retries get 409 `OutcomeUnknown` |
//! | drops the connection after the request was sent, or its response body breaks off | 502 `OutcomeUnknown`, or the part of the body that came | completed as "outcome unknown" |
//!
//! ([`IdempotencyLayer::release_unknown_outcomes`] releases unknown outcomes
//! instead, for upstreams where running twice is harmless.) A request
//! without a guarded key that passes the client's wait gets the same 504,
//! but its upstream call is cut off, as its detail says.
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
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::IdempotencyLayer;
use crate::body::ResponseBody;
use crate::key::Scope;
use crate::problem::{Problem, ProblemKind};
use crate::store::Store;

mod connection;
mod deadline;
mod forward;
mod readiness;

use self::connection::{ConnectionLimits, Handling, Load, Tracked, supervise};
use self::readiness::Readiness;

use deadline::DeadlineBody;
use forward::{ClientAddr, Proxy, UpstreamCall, source_chain};

/// Default path of the sidecar's own health check (liveness: it answers
/// while the process serves, whatever its store does).
pub const DEFAULT_HEALTH_PATH: &str = "/_idempotency/health";
/// Default path of the sidecar's readiness check: 200 while its store
/// answers, 503 while it does not.
pub const DEFAULT_READY_PATH: &str = "/_idempotency/ready";
/// Default bound on the client's wait for the upstream.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound on the upstream call itself, after which its outcome is
/// taken as unknown.
pub const DEFAULT_UPSTREAM_HARD_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Default bound on reading a request's head, and on a new connection's
/// wait for its first request (HTTP/1 and HTTP/2): a client that takes
/// longer is disconnected, so slow clients cannot hold connections open.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on a connection with no request in flight, after its last
/// one (HTTP/1 keep-alive and HTTP/2 alike): past it, it is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default interval of HTTP/2 keep-alive pings; a client that does not
/// answer one within the same interval is disconnected.
pub const DEFAULT_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
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
    /// The health or readiness path is not a path the sidecar can answer
    /// (empty, not starting with `/`), or both are the same.
    #[error("the {which} path {path:?} {why}")]
    InvalidPath {
        /// `health` or `readiness`.
        which: &'static str,
        /// The path given.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
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
    ready_path: String,
    trust_forwarded: bool,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    keep_alive_interval: Duration,
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
            ready_path: DEFAULT_READY_PATH.to_owned(),
            trust_forwarded: false,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            keep_alive_interval: DEFAULT_KEEP_ALIVE_INTERVAL,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        })
    }

    /// Keeps the client's `X-Forwarded-For` and `Forwarded` headers and
    /// appends this hop to them, and keeps its `X-Forwarded-Host` (default
    /// off: they are replaced, because a client can put anything there and
    /// an upstream that reads the first value would trust a spoofed address
    /// or host). Turn it on only behind a proxy you trust to set them.
    /// Otherwise `X-Forwarded-Host` is the authority the client asked for
    /// (HTTP/2's `:authority` or an absolute-form target, else `Host`), and
    /// absent without one;
    /// `X-Forwarded-Proto` is always set by the sidecar.
    pub fn trust_forwarded_headers(mut self, trust: bool) -> Self {
        self.trust_forwarded = trust;
        self
    }

    /// Bounds how long a client may take to send a request's head over
    /// HTTP/1, and how long a new connection (HTTP/1 or HTTP/2) may go
    /// without its first request (default 10 s, at least 1 ms); past it the
    /// connection is closed. A connection asked to close (idle, or on
    /// shutdown) is cut off once it has had nothing in flight for this long
    /// (its last response had that long to be flushed).
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = bounded(timeout);
        self
    }

    /// Bounds how long a client connection may stay open with no request in
    /// flight after its last one (default 60 s, at least 1 ms), HTTP/1
    /// keep-alive and HTTP/2 alike; past it the connection is closed
    /// gracefully.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = bounded(timeout);
        self
    }

    /// How often an HTTP/2 client connection is pinged (default 20 s, at
    /// least 1 ms); a client that does not answer within the same interval
    /// is disconnected, so a vanished peer frees its place.
    pub fn keep_alive_interval(mut self, interval: Duration) -> Self {
        self.keep_alive_interval = bounded(interval);
        self
    }

    /// Bounds the open client connections (default 4 096, from 1 to
    /// `u32::MAX`). Past it the sidecar accepts no more until one closes.
    pub fn max_connections(mut self, connections: usize) -> Self {
        let most = Semaphore::MAX_PERMITS.min(u32::MAX as usize);
        self.max_connections = connections.clamp(1, most);
        self
    }

    /// Speaks HTTP/2 without TLS (h2c) to the upstream (default HTTP/1.1).
    pub fn upstream_h2c(mut self, h2c: bool) -> Self {
        self.h2c = h2c;
        self
    }

    /// Bounds the client's wait for the upstream (default 30 s), counted
    /// from when its request goes upstream: past it the client gets 504
    /// with `Retry-After`, while the upstream call goes on (for a guarded
    /// request) and its response is stored when it arrives, for the
    /// client's retry to wait for or replay. Unguarded requests are cut
    /// off. A duplicate that waits for another request's execution never
    /// goes upstream: it waits as the layer says
    /// ([`IdempotencyLayer::wait_for_in_flight`]). A request's body must
    /// also arrive within this long of the request's head, or the request
    /// is refused (400) and nothing goes upstream.
    pub fn upstream_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Bounds the whole upstream exchange, the response body included
    /// (default 5 minutes): an upstream that has not answered by then, or
    /// whose body has not ended, may or may not have acted, and the key
    /// completes as "outcome unknown" (retries get 409, nothing is sent
    /// again); a body cut off this way ends the client's response with an
    /// error. Keep it above [`upstream_timeout`](Self::upstream_timeout).
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

    /// The path of the sidecar's readiness check (default
    /// `/_idempotency/ready`): `GET` answers 200 `ready` while the store
    /// answers a ping, and 503 (with `Retry-After`) while it does not or
    /// takes over 2 s, so a load balancer sends no traffic that could only
    /// be refused. The upstream is not asked. Probes share one ping a
    /// second, however many there are. The path must start with `/` and
    /// differ from the health path ([`serve`] refuses it otherwise, with
    /// [`SidecarError::InvalidPath`]).
    pub fn ready_path(mut self, path: impl Into<String>) -> Self {
        self.ready_path = path.into();
        self
    }
}

impl SidecarConfig {
    /// The health and readiness paths are paths (`/…`), and differ.
    fn check_paths(&self) -> Result<(), SidecarError> {
        for (which, path) in [
            ("health", &self.health_path),
            ("readiness", &self.ready_path),
        ] {
            if !path.starts_with('/') {
                return Err(SidecarError::InvalidPath {
                    which,
                    path: path.clone(),
                    why: "must start with /",
                });
            }
        }
        if self.health_path == self.ready_path {
            return Err(SidecarError::InvalidPath {
                which: "readiness",
                path: self.ready_path.clone(),
                why: "must differ from the health path",
            });
        }
        Ok(())
    }
}

/// A connection timer's setting, from 1 ms to about a century: hyper adds
/// these to `Instant`s, which panics past their range.
fn bounded(timeout: Duration) -> Duration {
    timeout.clamp(Duration::from_millis(1), crate::time::FAR_FUTURE)
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
        Some(Scope::from_header_value(value.as_bytes()))
    }
}

/// The 504 a client gets when its wait for the upstream ends before the
/// upstream answered. What happens to the call depends on whether it runs
/// under a claim.
fn client_timeout<B>(waited: Duration, guarded: bool) -> Response<ResponseBody<B>> {
    let detail = if guarded {
        format!(
            "the upstream did not answer within {waited:?}; the request goes on, and its response is kept for a retry with the same key"
        )
    } else {
        format!(
            "the upstream did not answer within {waited:?}; the request carried no idempotency key the sidecar guards, so its call was cut off, and the upstream may or may not have acted on it"
        )
    };
    crate::observe::refusal(ProblemKind::UpstreamTimeout);
    Problem::new(ProblemKind::UpstreamTimeout)
        .detail(detail)
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
    config.check_paths()?;
    let health_path = config.health_path.clone();
    let ready_path = config.ready_path.clone();
    let readiness = Arc::new(Readiness::new(layer.store().clone()));
    let client_wait = config.timeout;
    let limits = ConnectionLimits {
        first_request: config.header_read_timeout,
        idle: config.idle_timeout,
        grace: config.header_read_timeout,
    };
    let places_total = config.max_connections;
    let places = Arc::new(Semaphore::new(places_total));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(config.keep_alive_interval)
        .keep_alive_timeout(config.keep_alive_interval);
    let service = layer.layer(Proxy::new(config));
    let (stopping_tx, stopping) = watch::channel(false);
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
        let (health_path, ready_path) = (health_path.clone(), ready_path.clone());
        let readiness = readiness.clone();
        let (load_tx, load) = watch::channel(Load::default());
        let load_tx = Arc::new(load_tx);
        let per_request = hyper::service::service_fn(move |req: Request<Incoming>| {
            // Counted from here until its response body is dropped.
            let handling = Handling::begin(load_tx.clone());
            // The body must arrive within the client's wait, which the
            // request's own wait for the upstream starts only after: a
            // client that never sends its body must not hold its place.
            let body_deadline = crate::time::deadline(Instant::now(), client_wait);
            let mut req = req.map(|body| {
                DeadlineBody::new(body, body_deadline, "the request body", client_wait)
            });
            let mut service = service.clone();
            let is_get = req.method() == http::Method::GET || req.method() == http::Method::HEAD;
            let is_health = is_get && req.uri().path() == health_path;
            let is_ready = is_get && req.uri().path() == ready_path;
            let readiness = readiness.clone();
            req.extensions_mut().insert(ClientAddr(peer));
            let (call, started) = UpstreamCall::new();
            req.extensions_mut().insert(call);
            async move {
                if is_health {
                    let ok = ResponseBody::full(Bytes::from_static(b"ok"), None);
                    return Ok::<_, Infallible>(Response::new(Tracked::new(ok, handling)));
                }
                if is_ready {
                    let answer = readiness.answer().await;
                    return Ok(answer.map(|body| Tracked::new(body, handling)));
                }
                std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
                // The client's wait starts when its request goes upstream: a
                // duplicate waiting on another execution waits as the layer
                // says (`--wait`), never upstream_timeout. Past the client's
                // wait the call is dropped here: a guarded execution then
                // goes on in a task of its own and stores its response when
                // it comes.
                let waited = async {
                    match started.await {
                        Ok(started) => {
                            tokio::time::sleep(client_wait).await;
                            started
                        }
                        // Answered without going upstream.
                        Err(_) => std::future::pending().await,
                    }
                };
                let answer = tokio::select! {
                    answered = service.call(req) => answered?,
                    started = waited => client_timeout(client_wait, started.guarded),
                };
                Ok(answer.map(|body| Tracked::new(body, handling)))
            }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), per_request)
            .into_owned();
        let stopping = stopping.clone();
        tokio::spawn(async move {
            let ended = supervise(
                connection,
                |connection| connection.graceful_shutdown(),
                load,
                stopping,
                limits,
            )
            .await;
            if let Some(e) = ended {
                tracing::debug!(error = %source_chain(&*e), "sidecar connection ended with an error");
            }
            drop(place);
        });
    }
    drop(listener);
    tracing::info!("sidecar draining: finishing open connections and executions");
    // Every connection closes gracefully (and is dropped if it will not).
    let _ = stopping_tx.send(true);
    // Each open connection holds a place: all of them back means all closed.
    let all = u32::try_from(places_total).unwrap_or(u32::MAX);
    drop(places.acquire_many(all).await);
    layer.executions().wait_idle().await;
    Ok(())
}
