//! Which responses are stored, and which of their headers are replayed.

use http::{HeaderMap, StatusCode, header, response};

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
