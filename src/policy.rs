//! Which responses are stored, and which of their headers are replayed.

use http::{HeaderMap, HeaderName, StatusCode, header, response};

/// A handler's own verdict on its response, set as a response extension.
///
/// It overrides the layer's predicate for that one response:
///
/// ```
/// use axum::response::{IntoResponse, Response};
/// use http::StatusCode;
/// use tower_idempotency::StorePolicy;
///
/// async fn charge() -> Response {
///     // A 503 from the card network that we know did not charge: the
///     // default would also release it, but say so explicitly.
///     let mut res = (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response();
///     res.extensions_mut().insert(StorePolicy::DoNotStore);
///     res
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StorePolicy {
    /// Store this response: every retry replays it.
    Store,
    /// Do not store it and release the key: a retry executes again.
    DoNotStore,
    /// What the handler did is unknown (for example a call it made timed
    /// out after sending): hand this response to the caller, and complete
    /// the key as "outcome unknown", so retries are refused (409
    /// `OutcomeUnknown`) and nothing runs again. Unless the layer releases
    /// unknown outcomes
    /// ([`release_unknown_outcomes`](crate::IdempotencyLayer::release_unknown_outcomes)).
    OutcomeUnknown,
}

pub use crate::grpc::GrpcStatusCode;

/// The default predicate: store everything but 5xx, 408 and 429 (and, for
/// gRPC, the [retryable codes](GrpcStatusCode::is_retryable)).
///
/// Those statuses say "try again" (a timeout, a rate limit, a server
/// failure), so the key is released and a retry executes again. A handler
/// that commits a side effect and then answers 5xx will therefore run again
/// on retry: make such handlers atomic, or mark the response
/// [`StorePolicy::Store`].
pub fn default_should_store(parts: &response::Parts) -> bool {
    if let Some(code) = parts.extensions.get::<GrpcStatusCode>() {
        return !code.is_retryable();
    }
    let s = parts.status;
    !(s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT || s == StatusCode::TOO_MANY_REQUESTS)
}

/// Whether a response is a stream with no natural end (server-sent events),
/// which is passed through and marked not replayable instead of buffered.
pub(crate) fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            // Compared in place: this runs on every executed response.
            let v = v.trim_start().as_bytes();
            let kind = b"text/event-stream";
            v.len() >= kind.len() && v[..kind.len()].eq_ignore_ascii_case(kind)
        })
}

/// Hop-by-hop headers (RFC 9110 §7.6.1, and the proxy headers that Go's
/// reverse proxy also treats so): meaningful for one connection only.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// The most names of a `Connection` header that are honoured; names past
/// it are not looked at, so a header listing thousands costs no more than
/// this many comparisons per header. Real ones list one to three.
const MAX_CONNECTION_NAMES: usize = 64;

/// Decides which response headers a replay may carry: all but hop-by-hop
/// ones (including those the `Connection` header names, up to
/// [`MAX_CONNECTION_NAMES`] of them), `Set-Cookie` unless kept, and any
/// excluded by name.
pub(crate) struct ReplayFilter<'a> {
    named_by_connection: Vec<HeaderName>,
    keep_set_cookie: bool,
    excluded: &'a [HeaderName],
}

impl<'a> ReplayFilter<'a> {
    pub(crate) fn new(
        headers: &HeaderMap,
        keep_set_cookie: bool,
        excluded: &'a [HeaderName],
    ) -> Self {
        let named_by_connection = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .take(MAX_CONNECTION_NAMES)
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        Self {
            named_by_connection,
            keep_set_cookie,
            excluded,
        }
    }

    pub(crate) fn keeps(&self, name: &HeaderName) -> bool {
        !(HOP_BY_HOP.contains(name)
            || self.named_by_connection.contains(name)
            || (!self.keep_set_cookie && name == header::SET_COOKIE)
            || self.excluded.contains(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn default_predicate_releases_retryable_statuses() {
        let parts = |s: u16| {
            let (mut p, ()) = http::Response::new(()).into_parts();
            p.status = StatusCode::from_u16(s).unwrap();
            p
        };
        for s in [200, 201, 204, 302, 400, 402, 404, 409, 422] {
            assert!(default_should_store(&parts(s)), "{s}");
        }
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(!default_should_store(&parts(s)), "{s}");
        }
    }

    #[test]
    fn filters_hop_by_hop_cookies_and_exclusions() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("close, x-conn-scoped"),
        );
        h.append("x-conn-scoped", HeaderValue::from_static("1"));
        h.append(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::LOCATION, HeaderValue::from_static("/charges/1"));
        h.append("x-request-id", HeaderValue::from_static("r1"));
        let excluded = [HeaderName::from_static("x-request-id")];
        let filter = ReplayFilter::new(&h, false, &excluded);
        let kept: Vec<_> = h.keys().filter(|n| filter.keeps(n)).collect();
        assert_eq!(kept, [header::LOCATION]);
        let with_cookies = ReplayFilter::new(&h, true, &[]);
        assert!(with_cookies.keeps(&header::SET_COOKIE));
    }

    #[test]
    fn recognises_event_streams() {
        let mut h = HeaderMap::new();
        assert!(!is_event_stream(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("Text/Event-Stream; charset=utf-8"),
        );
        assert!(is_event_stream(&h));
        for other in ["text/", "", "text/html", "application/json"] {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(other));
            assert!(!is_event_stream(&h), "{other:?}");
        }
    }
}
