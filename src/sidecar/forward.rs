//! Forwarding to the upstream: the proxy service under the layer, the
//! rewriting of requests (URI, hop-by-hop and forwarding headers), and
//! what the upstream's failures are answered with.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower_service::Service;

use crate::body::RequestBody;
use crate::policy::StorePolicy;
use crate::problem::{Problem, ProblemKind};

use super::SidecarConfig;

/// The peer address of a connection, put in each request's extensions.
#[derive(Debug, Clone, Copy)]
pub(super) struct ClientAddr(pub(super) SocketAddr);

type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Forwards requests to the upstream.
#[derive(Clone)]
pub(super) struct Proxy {
    client: Client<HttpConnector, RequestBody<Incoming>>,
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
    Problem::new(kind)
        .detail(detail)
        .into_response(|bytes| Either::Right(Full::new(bytes)))
}

/// The answer when the upstream may have acted but its response was lost:
/// marked so that the layer completes the key as "outcome unknown".
fn outcome_unknown(status: StatusCode, detail: String) -> Response<ProxyBody> {
    let mut res = Problem::new(ProblemKind::OutcomeUnknown)
        .status(status)
        .detail(detail)
        .into_response(|bytes| Either::Right(Full::new(bytes)));
    res.extensions_mut().insert(StorePolicy::OutcomeUnknown);
    res
}

impl Service<Request<RequestBody<Incoming>>> for Proxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody<Incoming>>) -> Self::Future {
        let client = self.client.clone();
        let config = self.config.clone();
        Box::pin(async move {
            let req = match to_upstream(req, &config) {
                Ok(req) => req,
                Err(detail) => {
                    return Ok(problem_response(ProblemKind::UpstreamUnavailable, detail));
                }
            };
            match tokio::time::timeout(config.hard_timeout, client.request(req)).await {
                Ok(Ok(res)) => {
                    let (mut parts, body) = res.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
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
    req: Request<RequestBody<Incoming>>,
    config: &SidecarConfig,
) -> Result<Request<RequestBody<Incoming>>, String> {
    let (mut parts, body) = req.into_parts();
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
    strip_hop_by_hop(&mut parts.headers);
    if keep_te_trailers {
        // gRPC needs `te: trailers` end to end.
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let original_host = parts.headers.remove(header::HOST);
    if let Ok(host) = HeaderValue::from_str(config.authority.as_str()) {
        parts.headers.insert(header::HOST, host);
    }
    let client = parts.extensions.get::<ClientAddr>().map(|c| c.0);
    if !config.trust_forwarded {
        parts.headers.remove(X_FORWARDED_FOR);
        parts.headers.remove(header::FORWARDED);
    }
    add_forwarding_headers(&mut parts.headers, client, original_host.as_ref());
    // HTTP/1 and HTTP/2 differ; let the client pick what the upstream speaks.
    parts.version = http::Version::default();
    Ok(Request::from_parts(parts, body))
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Adds this hop to `X-Forwarded-For` and `Forwarded` (after any the client
/// sent and the sidecar trusts), and sets `X-Forwarded-Host` and `-Proto`.
fn add_forwarding_headers(
    headers: &mut HeaderMap,
    client: Option<SocketAddr>,
    host: Option<&HeaderValue>,
) {
    const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
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
        headers.insert(X_FORWARDED_HOST, host.clone());
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

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let filter = crate::policy::ReplayFilter::new(headers, true, &[]);
    let dropped: Vec<HeaderName> = headers
        .keys()
        .filter(|n| !filter.keeps(n))
        .cloned()
        .collect();
    for name in dropped {
        headers.remove(name);
    }
}
