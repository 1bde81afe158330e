//! gRPC on the wire: recognising calls, reading `grpc-status`, refusing
//! with gRPC statuses.
//!
//! A gRPC call is an HTTP/2 `POST` whose `content-type` starts with
//! `application/grpc`. Its outcome is the `grpc-status` trailer (or header,
//! for a Trailers-Only response), not the HTTP status, which is 200 either
//! way; so the layer classifies gRPC responses by `grpc-status`, stores
//! their trailers, and answers refusals as gRPC statuses.
//!
//! gRPC-Web (`application/grpc-web…`, binary or base64 text) is gRPC too:
//! its status comes either in the headers (Trailers-Only) or in a trailer
//! frame at the end of the body, which the layer reads from the buffered
//! body before judging the response.

use http::{HeaderMap, HeaderValue, Response, header};

use crate::problem::{Problem, ProblemKind};

/// `grpc-status` codes used here (see `google.rpc.Code`).
pub(crate) mod code {
    pub(crate) const INVALID_ARGUMENT: i32 = 3;
    pub(crate) const DEADLINE_EXCEEDED: i32 = 4;
    pub(crate) const RESOURCE_EXHAUSTED: i32 = 8;
    pub(crate) const FAILED_PRECONDITION: i32 = 9;
    pub(crate) const ABORTED: i32 = 10;
    pub(crate) const INTERNAL: i32 = 13;
    pub(crate) const UNAVAILABLE: i32 = 14;
}

/// The `grpc-status` of a gRPC response, made available to the store
/// predicate as a response extension.
///
/// Before asking [`store_when`](crate::IdempotencyLayer::store_when)'s
/// predicate about a gRPC response, the layer reads its `grpc-status` (from
/// the headers of a Trailers-Only response, or from the trailers after the
/// body) and inserts it into the response's extensions, so a custom
/// predicate can judge gRPC outcomes the way the default one does.
///
/// ```
/// # #[cfg(feature = "memory")] {
/// use tower_idempotency::{IdempotencyLayer, policy::GrpcStatusCode, store::MemoryStore};
///
/// // Store gRPC successes only.
/// let layer = IdempotencyLayer::new(MemoryStore::new()).store_when(|parts| {
///     match parts.extensions.get::<GrpcStatusCode>() {
///         Some(code) => code.0 == 0,
///         None => parts.status.is_success(),
///     }
/// });
/// # drop(layer);
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcStatusCode(pub i32);

impl GrpcStatusCode {
    /// Whether the default predicate treats this code like a 5xx (not
    /// stored, key released): `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`,
    /// `INTERNAL`, `UNAVAILABLE`.
    pub fn is_retryable(self) -> bool {
        matches!(
            self.0,
            code::DEADLINE_EXCEEDED | code::RESOURCE_EXHAUSTED | code::INTERNAL | code::UNAVAILABLE
        )
    }
}

/// Whether a request or response is gRPC (including `application/grpc+proto`
/// and gRPC-Web's `application/grpc-web…`).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The trailers a gRPC-Web response carries at the end of its body (a
/// frame flagged `0x80` holding HTTP/1-style header lines), for a response
/// whose content type is `application/grpc-web…` (binary) or
/// `application/grpc-web-text…` (base64). `None` for other responses, or a
/// body without a readable trailer frame.
pub(crate) fn web_trailers(headers: &HeaderMap, body: &[u8]) -> Option<HeaderMap> {
    let content_type = headers.get(header::CONTENT_TYPE)?.as_bytes();
    let decoded;
    let frames = if content_type.starts_with(b"application/grpc-web-text") {
        decoded = decode_web_text(body)?;
        &decoded[..]
    } else if content_type.starts_with(b"application/grpc-web") {
        body
    } else {
        return None;
    };
    let mut rest = frames;
    let mut trailers = None;
    while let [flag, a, b, c, d, tail @ ..] = rest {
        let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
        let (payload, after) = tail.split_at_checked(len)?;
        if flag & 0x80 != 0 {
            trailers = Some(parse_web_trailers(payload));
        }
        rest = after;
    }
    trailers
}

/// Decodes a gRPC-Web text body: base64 in groups of four characters,
/// where each write may end with its own padding.
fn decode_web_text(body: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine;
    let mut out = Vec::with_capacity(body.len() / 4 * 3);
    let clean: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    for quad in clean.chunks(4) {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(quad)
            .ok()?;
        out.extend_from_slice(&bytes);
    }
    Some(out)
}

/// Parses `name: value` lines (CRLF-separated) into a header map, skipping
/// lines that are not valid headers.
fn parse_web_trailers(payload: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in payload.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(&name.to_ascii_lowercase()),
            HeaderValue::from_bytes(value),
        ) {
            // A hostile body cannot grow the map past its limit: stop there.
            if map.try_append(name, value).is_err() {
                break;
            }
        }
    }
    map
}

/// The `grpc-status` in `headers`, if there is a valid one.
pub(crate) fn status_in(headers: &HeaderMap) -> Option<GrpcStatusCode> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    value.trim().parse().ok().map(GrpcStatusCode)
}

fn code_for(kind: ProblemKind) -> i32 {
    match kind {
        ProblemKind::MissingKey | ProblemKind::InvalidKey | ProblemKind::BodyUnreadable => {
            code::INVALID_ARGUMENT
        }
        ProblemKind::PayloadTooLarge => code::RESOURCE_EXHAUSTED,
        ProblemKind::KeyMismatch | ProblemKind::NotReplayable | ProblemKind::OutcomeUnknown => {
            code::FAILED_PRECONDITION
        }
        ProblemKind::InFlight => code::ABORTED,
        ProblemKind::StoreUnavailable => code::UNAVAILABLE,
        #[cfg(feature = "sidecar")]
        ProblemKind::UpstreamUnavailable => code::UNAVAILABLE,
        #[cfg(feature = "sidecar")]
        ProblemKind::UpstreamTimeout => code::DEADLINE_EXCEEDED,
        ProblemKind::ScopeUnavailable | ProblemKind::RecordUnreadable => code::INTERNAL,
    }
}

/// A refusal as a gRPC Trailers-Only response: HTTP 200, the status in the
/// headers, no body.
pub(crate) fn refusal<B>(problem: &Problem, empty: B) -> Response<B> {
    let mut res = Response::new(empty);
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(code_for(problem.kind)));
    let message = match &problem.detail {
        Some(detail) => format!("{}: {detail}", problem.kind.title()),
        None => problem.kind.title().to_owned(),
    };
    if let Ok(value) = HeaderValue::from_str(&percent_encode(&message)) {
        headers.insert("grpc-message", value);
    }
    res
}

/// Percent-encodes a `grpc-message` as the gRPC HTTP/2 protocol asks:
/// everything outside printable ASCII, and `%` itself.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_grpc_content_types() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc-web+proto",
        ] {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            assert!(is_grpc(&h), "{ct}");
        }
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert!(!is_grpc(&h));
    }

    #[test]
    fn refusals_are_trailers_only_statuses() {
        let p = Problem::new(ProblemKind::KeyMismatch).detail("100% different\n");
        let res = refusal(&p, ());
        assert_eq!(res.status(), http::StatusCode::OK);
        assert_eq!(res.headers()["grpc-status"], "9");
        assert_eq!(
            res.headers()["grpc-message"],
            "Idempotency-Key is already used for a different request: 100%25 different%0A"
        );
        assert_eq!(code_for(ProblemKind::InFlight), code::ABORTED);
        assert_eq!(code_for(ProblemKind::StoreUnavailable), code::UNAVAILABLE);
        assert_eq!(
            code_for(ProblemKind::PayloadTooLarge),
            code::RESOURCE_EXHAUSTED
        );
        assert_eq!(code_for(ProblemKind::MissingKey), code::INVALID_ARGUMENT);
        assert_eq!(
            code_for(ProblemKind::OutcomeUnknown),
            code::FAILED_PRECONDITION,
            "never retried as it is"
        );
    }

    #[test]
    fn grpc_web_trailer_frames_are_read_and_damaged_ones_are_not() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc-web+proto"),
        );
        let trailer = b"Grpc-Status: 14\r\ngrpc-message: down\r\nbad line\r\n";
        let mut body = vec![
            0,
            0,
            0,
            0,
            2,
            b'h',
            b'i',
            0x80,
            0,
            0,
            0,
            trailer.len() as u8,
        ];
        body.extend_from_slice(trailer);
        let t = web_trailers(&h, &body).unwrap();
        assert_eq!(status_in(&t), Some(GrpcStatusCode(14)));
        assert_eq!(t["grpc-message"], "down");
        // Cut short, or a length past the end: no trailers, no panic.
        for cut in 0..body.len() {
            let _ = web_trailers(&h, &body[..cut]);
        }
        assert!(web_trailers(&h, &[0x80, 0xff, 0xff, 0xff, 0xff, 1]).is_none());
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        assert!(
            web_trailers(&h, &body).is_none(),
            "plain gRPC has real trailers"
        );
    }

    #[test]
    fn retryable_codes() {
        for c in [4, 8, 13, 14] {
            assert!(GrpcStatusCode(c).is_retryable());
        }
        for c in [0, 3, 5, 6, 9, 10] {
            assert!(!GrpcStatusCode(c).is_retryable());
        }
    }
}
