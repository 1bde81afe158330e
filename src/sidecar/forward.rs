//! Forwarding to the upstream: the proxy service under the layer, the
//! rewriting of requests (URI, hop-by-hop and forwarding headers), and
//! what the upstream's failures are answered with.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower_service::Service;

use crate::IdempotencyInfo;
use crate::body::RequestBody;
use crate::policy::StorePolicy;
use crate::problem::{Problem, ProblemKind};

use super::SidecarConfig;
use super::deadline::DeadlineBody;

/// The peer address of a connection, put in each request's extensions.
#[derive(Debug, Clone, Copy)]
pub(super) struct ClientAddr(pub(super) SocketAddr);

/// Put in each request's extensions by the connection: the proxy says
/// through it when (and whether) the request goes upstream, which is when
/// the client's wait for the upstream starts. A duplicate that waits for
/// another request's execution never goes upstream, so its wait is the
/// layer's own.
#[derive(Debug, Clone)]
pub(super) struct UpstreamCall(Arc<std::sync::Mutex<Option<oneshot::Sender<Started>>>>);

/// What the proxy tells the connection when a request goes upstream.
#[derive(Debug, Clone, Copy)]
pub(super) struct Started {
    /// The call runs under a claim: if the client stops waiting, the call
    /// goes on and its response is stored (otherwise it is cut off).
    pub(super) guarded: bool,
}

impl UpstreamCall {
    /// A signal to put in a request, and the end that hears it.
    pub(super) fn new() -> (Self, oneshot::Receiver<Started>) {
        let (tx, rx) = oneshot::channel();
        (Self(Arc::new(std::sync::Mutex::new(Some(tx)))), rx)
    }

    fn started(&self, guarded: bool) {
        let sender = match self.0.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(sender) = sender {
            // The connection may have stopped listening: nothing to tell.
            let _ = sender.send(Started { guarded });
        }
    }
}

pub(super) type ProxyBody = Either<DeadlineBody<Incoming>, Full<Bytes>>;

/// A request body as the proxy receives it: bounded by the client's wait.
pub(super) type ClientBody = DeadlineBody<Incoming>;

/// Forwards requests to the upstream.
#[derive(Clone)]
pub(super) struct Proxy {
    client: Client<HttpConnector, RequestBody<ClientBody>>,
    config: SidecarConfig,
}

impl Proxy {
    pub(super) fn new(config: SidecarConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .http2_only(config.h2c)
            .build(connector);
        Self { client, config }
    }
}

fn problem_response(kind: ProblemKind, detail: String) -> Response<ProxyBody> {
    crate::observe::refusal(kind);
    Problem::new(kind)
        .detail(detail)
        .into_response(|bytes| Either::Right(Full::new(bytes)))
}

/// The answer when the upstream may have acted but its response never came
/// back: marked so that the layer completes the key as "outcome unknown".
fn outcome_unknown(status: StatusCode, detail: String) -> Response<ProxyBody> {
    let mut res = Problem::new(ProblemKind::OutcomeUnknown)
        .status(status)
        .detail(detail)
        .into_response(|bytes| Either::Right(Full::new(bytes)));
    res.extensions_mut().insert(StorePolicy::OutcomeUnknown);
    res
}

impl Service<Request<RequestBody<ClientBody>>> for Proxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody<ClientBody>>) -> Self::Future {
        let client = self.client.clone();
        let config = self.config.clone();
        // The exchange, body included, ends by the hard timeout.
        let deadline = crate::time::deadline(Instant::now(), config.hard_timeout);
        if let Some(call) = req.extensions().get::<UpstreamCall>() {
            call.started(req.extensions().get::<IdempotencyInfo>().is_some());
        }
        Box::pin(async move {
            let req = match to_upstream(req, &config) {
                Ok(req) => req,
                Err(detail) => {
                    return Ok(problem_response(ProblemKind::UpstreamUnavailable, detail));
                }
            };
            match tokio::time::timeout_at(deadline, client.request(req)).await {
                Ok(Ok(res)) => {
                    let (mut parts, body) = res.into_parts();
                    crate::headers::strip_hop_by_hop(&mut parts.headers);
                    // The upstream's HTTP version is its hop's, not the
                    // client's: an HTTP/1.0 upstream's answer would be
                    // written to the client as HTTP/1.0 (and its connection
                    // closed), where its replay is HTTP/1.1.
                    parts.version = http::Version::default();
                    // A body that stalls must not keep its key in flight (its
                    // lease renewed) for as long as the upstream keeps the
                    // socket open: the layer completes a body that breaks
                    // off as "outcome unknown".
                    let body = DeadlineBody::new(
                        body,
                        deadline,
                        "the upstream's response, which may or may not have acted,",
                        config.hard_timeout,
                    );
                    Ok(Response::from_parts(parts, Either::Left(body)))
                }
                // Nothing was sent: a 5xx, so the key is released.
                Ok(Err(e)) if e.is_connect() => {
                    let detail = format!("the upstream could not be reached: {}", source_chain(&e));
                    Ok(problem_response(ProblemKind::UpstreamUnavailable, detail))
                }
                Ok(Err(e)) => {
                    let detail = format!(
                        "the upstream failed after the request was sent, so it may have acted on it: {}",
                        source_chain(&e)
                    );
                    Ok(outcome_unknown(StatusCode::BAD_GATEWAY, detail))
                }
                Err(_) => {
                    let detail = format!(
                        "the upstream did not answer within {:?}, so it may or may not have acted",
                        config.hard_timeout
                    );
                    Ok(outcome_unknown(StatusCode::GATEWAY_TIMEOUT, detail))
                }
            }
        })
    }
}

pub(super) fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Rewrites a request for the upstream: its URI, hop-by-hop headers, and the
/// forwarding headers.
fn to_upstream(
    req: Request<RequestBody<ClientBody>>,
    config: &SidecarConfig,
) -> Result<Request<RequestBody<ClientBody>>, String> {
    let (mut parts, body) = req.into_parts();
    // The authority the client asked for, read before the hop-by-hop
    // headers go (`Connection: host` would take `Host` with them): the
    // request target's (HTTP/2's `:authority`, or an HTTP/1 absolute-form
    // target, which override `Host`), else the `Host` header.
    let authority = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        .or_else(|| parts.headers.get(header::HOST).cloned());
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    parts.uri = Uri::builder()
        .scheme(config.scheme.clone())
        .authority(config.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| format!("cannot build the upstream URI: {e}"))?;
    let keep_te_trailers = parts
        .headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    crate::headers::strip_hop_by_hop(&mut parts.headers);
    if keep_te_trailers {
        // gRPC needs `te: trailers` end to end.
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Ok(host) = HeaderValue::from_str(config.authority.as_str()) {
        parts.headers.insert(header::HOST, host);
    }
    let client = parts.extensions.get::<ClientAddr>().map(|c| c.0);
    if !config.trust_forwarded {
        // A client can put anything in these; only a trusted proxy's count.
        parts.headers.remove(X_FORWARDED_FOR);
        parts.headers.remove(header::FORWARDED);
        parts.headers.remove(X_FORWARDED_HOST);
    }
    add_forwarding_headers(&mut parts.headers, client, authority.as_ref());
    // HTTP/1 and HTTP/2 differ; let the client pick what the upstream speaks.
    parts.version = http::Version::default();
    Ok(Request::from_parts(parts, body))
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Adds this hop to `X-Forwarded-For` and `Forwarded` (after any the client
/// sent and the sidecar trusts), sets `X-Forwarded-Proto`, and sets
/// `X-Forwarded-Host` to the authority the client asked for (unless a
/// trusted proxy set it already; with no authority, none is sent).
fn add_forwarding_headers(
    headers: &mut HeaderMap,
    client: Option<SocketAddr>,
    host: Option<&HeaderValue>,
) {
    const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    let mut forwarded = String::from("proto=http");
    if let Some(addr) = client {
        let ip = addr.ip();
        if let Ok(v) = HeaderValue::from_str(&ip.to_string()) {
            headers.append(X_FORWARDED_FOR, v);
        }
        let node = match ip {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        forwarded = format!("for={node};{forwarded}");
    }
    if let Some(host) = host {
        // A client's own was removed unless trusted; a trusted proxy's
        // names the host its client asked for, and stays.
        headers
            .entry(X_FORWARDED_HOST)
            .or_insert_with(|| host.clone());
        // Only a plain host[:port] goes into `Forwarded` unquoted.
        let plain = |h: &&str| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        };
        if let Some(h) = host.to_str().ok().filter(plain) {
            forwarded.push_str(";host=");
            forwarded.push_str(h);
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        headers.append(header::FORWARDED, v);
    }
}
