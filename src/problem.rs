//! The layer's refusals: RFC 9457 `application/problem+json` documents.
//!
//! Every refusal carries a stable `type` per cause (a link to the variant's
//! documentation below), `Cache-Control: no-store`, and `Retry-After` where a
//! retry can succeed (in flight, store unavailable). The inner service is
//! never called for a refusal.
//!
//! | cause | default status | `Retry-After` | retrying helps? |
//! |---|---|---|---|
//! | [`MissingKey`](ProblemKind::MissingKey) | 400 | no | after adding the header |
//! | [`InvalidKey`](ProblemKind::InvalidKey) | 400 | no | after fixing the key |
//! | [`PayloadTooLarge`](ProblemKind::PayloadTooLarge) | 413 | no | no |
//! | [`BodyUnreadable`](ProblemKind::BodyUnreadable) | 400 | no | yes, resend |
//! | [`KeyMismatch`](ProblemKind::KeyMismatch) | 409 (configurable, e.g. 422) | no | never with this key |
//! | [`InFlight`](ProblemKind::InFlight) | 409 | yes | yes, same request |
//! | [`NotReplayable`](ProblemKind::NotReplayable) | 409 | no | never: it executed |
//! | [`OutcomeUnknown`](ProblemKind::OutcomeUnknown) | 409 (the sidecar's first answer: 502 or 504) | no | never: it executed, and what it did is unknown |
//! | [`StoreUnavailable`](ProblemKind::StoreUnavailable) | 503 | yes | yes, same request |
//! | [`ScopeUnavailable`](ProblemKind::ScopeUnavailable) | 500 | no | no (server misconfigured) |
//! | [`RecordUnreadable`](ProblemKind::RecordUnreadable) | 500 | no | no (operator must purge) |
//! | `UpstreamUnavailable` (feature `sidecar`) | 502 | no | yes, once the upstream is back |
//! | `UpstreamTimeout` (feature `sidecar`) | 504 | yes | yes, same request: it waits for the call still running, or replays it |
//!
//! The mismatch and in-flight refusals share 409 by default; clients tell
//! them apart by `type` (and by `Retry-After`, which only the in-flight one
//! carries). Set [`mismatch_status`](crate::IdempotencyLayer::mismatch_status)
//! to 422 to follow the IETF draft instead.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// Why the layer refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemKind {
    /// The request has no idempotency key and the layer requires one.
    MissingKey,
    /// The key is empty, longer than 255 characters, not visible ASCII,
    /// malformed, or its header was sent more than once.
    InvalidKey,
    /// The request body is larger than the limit (default 1 MiB).
    PayloadTooLarge,
    /// The request body could not be read (the stream failed).
    BodyUnreadable,
    /// The key was already used with a different request (method, path,
    /// query, selected headers or body). The client layer
    /// (`client::IdempotentRetryLayer`, feature `client`) never retries it.
    KeyMismatch,
    /// A request with this key is still being processed. The client layer
    /// retries it with the same key after `Retry-After` (it then waits for
    /// the first execution or replays it).
    InFlight,
    /// The request with this key executed, but its response was too large
    /// or streaming, so it cannot be replayed. The client layer never
    /// retries it.
    NotReplayable,
    /// The request with this key executed, but its response broke off
    /// after its head (the handler's body stream failed, or the sidecar's
    /// upstream dropped the connection or never answered), so what it did
    /// is unknown. It never runs again for this key: check its effect (for
    /// example look the payment up) before sending it again with a new key.
    /// gRPC: `FAILED_PRECONDITION`, as for other refusals that retrying the
    /// same call cannot fix. The client layer never retries it.
    OutcomeUnknown,
    /// The idempotency store is unreachable or failing; nothing executed.
    /// The client layer retries it (503) after `Retry-After`.
    StoreUnavailable,
    /// The layer could not determine the request's scope (for example the
    /// authentication layer did not run first).
    ScopeUnavailable,
    /// What the store holds for this key cannot be read: a damaged entry,
    /// or a payload this release cannot decode.
    RecordUnreadable,
    /// (Sidecar) The upstream could not be connected to; nothing was sent
    /// there, and the key was released. The client layer retries it (502).
    #[cfg(feature = "sidecar")]
    #[cfg_attr(docsrs, doc(cfg(feature = "sidecar")))]
    UpstreamUnavailable,
    /// (Sidecar) The upstream did not answer within the client's wait. The
    /// call goes on; its response is stored when it comes, and a retry of
    /// the same request waits for it or replays it. The client layer
    /// retries it (504) after `Retry-After`.
    #[cfg(feature = "sidecar")]
    #[cfg_attr(docsrs, doc(cfg(feature = "sidecar")))]
    UpstreamTimeout,
}

impl ProblemKind {
    /// The problem's stable `type` URI.
    pub fn type_uri(self) -> &'static str {
        match self {
            ProblemKind::MissingKey => const_concat::MISSING_KEY,
            ProblemKind::InvalidKey => const_concat::INVALID_KEY,
            ProblemKind::PayloadTooLarge => const_concat::PAYLOAD_TOO_LARGE,
            ProblemKind::BodyUnreadable => const_concat::BODY_UNREADABLE,
            ProblemKind::KeyMismatch => const_concat::KEY_MISMATCH,
            ProblemKind::InFlight => const_concat::IN_FLIGHT,
            ProblemKind::NotReplayable => const_concat::NOT_REPLAYABLE,
            ProblemKind::OutcomeUnknown => const_concat::OUTCOME_UNKNOWN,
            ProblemKind::StoreUnavailable => const_concat::STORE_UNAVAILABLE,
            ProblemKind::ScopeUnavailable => const_concat::SCOPE_UNAVAILABLE,
            ProblemKind::RecordUnreadable => const_concat::RECORD_UNREADABLE,
            #[cfg(feature = "sidecar")]
            ProblemKind::UpstreamUnavailable => const_concat::UPSTREAM_UNAVAILABLE,
            #[cfg(feature = "sidecar")]
            ProblemKind::UpstreamTimeout => const_concat::UPSTREAM_TIMEOUT,
        }
    }

    /// A short, stable, machine-friendly name (for metric labels).
    pub(crate) fn name(self) -> &'static str {
        match self {
            ProblemKind::MissingKey => "missing_key",
            ProblemKind::InvalidKey => "invalid_key",
            ProblemKind::PayloadTooLarge => "payload_too_large",
            ProblemKind::BodyUnreadable => "body_unreadable",
            ProblemKind::KeyMismatch => "key_mismatch",
            ProblemKind::InFlight => "in_flight",
            ProblemKind::NotReplayable => "not_replayable",
            ProblemKind::OutcomeUnknown => "outcome_unknown",
            ProblemKind::StoreUnavailable => "store_unavailable",
            ProblemKind::ScopeUnavailable => "scope_unavailable",
            ProblemKind::RecordUnreadable => "record_unreadable",
            #[cfg(feature = "sidecar")]
            ProblemKind::UpstreamUnavailable => "upstream_unavailable",
            #[cfg(feature = "sidecar")]
            ProblemKind::UpstreamTimeout => "upstream_timeout",
        }
    }

    /// A short, human-readable summary.
    pub fn title(self) -> &'static str {
        match self {
            ProblemKind::MissingKey => "Idempotency-Key is missing",
            ProblemKind::InvalidKey => "Idempotency-Key is invalid",
            ProblemKind::PayloadTooLarge => "Request body is too large",
            ProblemKind::BodyUnreadable => "Request body could not be read",
            ProblemKind::KeyMismatch => "Idempotency-Key is already used for a different request",
            ProblemKind::InFlight => "A request is outstanding for this Idempotency-Key",
            ProblemKind::NotReplayable => {
                "The response for this Idempotency-Key cannot be replayed"
            }
            ProblemKind::OutcomeUnknown => {
                "The outcome of the request with this Idempotency-Key is unknown"
            }
            ProblemKind::StoreUnavailable => "Idempotency store is unavailable",
            ProblemKind::ScopeUnavailable => "Idempotency scope could not be determined",
            ProblemKind::RecordUnreadable => {
                "Stored response for this Idempotency-Key is unreadable"
            }
            #[cfg(feature = "sidecar")]
            ProblemKind::UpstreamUnavailable => "The upstream service is unavailable",
            #[cfg(feature = "sidecar")]
            ProblemKind::UpstreamTimeout => "The upstream service did not answer in time",
        }
    }

    /// The status used unless configured otherwise.
    pub fn default_status(self) -> StatusCode {
        match self {
            ProblemKind::MissingKey | ProblemKind::InvalidKey | ProblemKind::BodyUnreadable => {
                StatusCode::BAD_REQUEST
            }
            ProblemKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProblemKind::KeyMismatch
            | ProblemKind::InFlight
            | ProblemKind::NotReplayable
            | ProblemKind::OutcomeUnknown => StatusCode::CONFLICT,
            ProblemKind::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ProblemKind::ScopeUnavailable | ProblemKind::RecordUnreadable => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            #[cfg(feature = "sidecar")]
            ProblemKind::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            #[cfg(feature = "sidecar")]
            ProblemKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Whether the same request may succeed later (such refusals carry
    /// `Retry-After`).
    pub fn is_retryable(self) -> bool {
        match self {
            ProblemKind::InFlight | ProblemKind::StoreUnavailable => true,
            #[cfg(feature = "sidecar")]
            ProblemKind::UpstreamTimeout => true,
            _ => false,
        }
    }
}

mod const_concat {
    // One documentation anchor per kind; `concat!` keeps them `&'static str`.
    macro_rules! uri {
        ($name:ident, $variant:literal) => {
            pub(super) const $name: &str = concat!(
                "https://docs.rs/tower-idempotency/latest/tower_idempotency/problem/enum.ProblemKind.html#variant.",
                $variant
            );
        };
    }
    uri!(MISSING_KEY, "MissingKey");
    uri!(INVALID_KEY, "InvalidKey");
    uri!(PAYLOAD_TOO_LARGE, "PayloadTooLarge");
    uri!(BODY_UNREADABLE, "BodyUnreadable");
    uri!(KEY_MISMATCH, "KeyMismatch");
    uri!(IN_FLIGHT, "InFlight");
    uri!(NOT_REPLAYABLE, "NotReplayable");
    uri!(OUTCOME_UNKNOWN, "OutcomeUnknown");
    uri!(STORE_UNAVAILABLE, "StoreUnavailable");
    uri!(SCOPE_UNAVAILABLE, "ScopeUnavailable");
    uri!(RECORD_UNREADABLE, "RecordUnreadable");
    #[cfg(feature = "sidecar")]
    uri!(UPSTREAM_UNAVAILABLE, "UpstreamUnavailable");
    #[cfg(feature = "sidecar")]
    uri!(UPSTREAM_TIMEOUT, "UpstreamTimeout");
}

/// One refusal, ready to become a response.
#[derive(Debug, Clone)]
pub(crate) struct Problem {
    pub(crate) kind: ProblemKind,
    pub(crate) status: StatusCode,
    pub(crate) detail: Option<String>,
    pub(crate) retry_after: Option<Duration>,
}

impl Problem {
    pub(crate) fn new(kind: ProblemKind) -> Self {
        Self {
            kind,
            status: kind.default_status(),
            detail: None,
            retry_after: None,
        }
    }

    pub(crate) fn status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub(crate) fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub(crate) fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The problem+json body.
    pub(crate) fn to_json(&self) -> String {
        let mut out = String::with_capacity(256);
        out.push_str("{\"type\":");
        json_string(&mut out, self.kind.type_uri());
        out.push_str(",\"title\":");
        json_string(&mut out, self.kind.title());
        out.push_str(",\"status\":");
        out.push_str(&self.status.as_u16().to_string());
        if let Some(detail) = &self.detail {
            out.push_str(",\"detail\":");
            json_string(&mut out, detail);
        }
        out.push('}');
        out
    }

    /// The full HTTP response.
    pub(crate) fn into_response<B>(self, body: impl FnOnce(Bytes) -> B) -> Response<B> {
        let json = self.to_json();
        let mut res = Response::new(body(Bytes::from(json)));
        *res.status_mut() = self.status;
        let headers = res.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(after) = self.retry_after {
            let secs = after
                .as_secs()
                .saturating_add(u64::from(after.subsec_nanos() > 0));
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        res
    }
}

/// Appends `s` as a JSON string literal.
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_valid_problem_json() {
        let p = Problem::new(ProblemKind::InFlight)
            .detail("quote \" and \\ and \n")
            .retry_after(Duration::from_millis(1500));
        let res = p.into_response(|b| b);
        assert_eq!(res.status(), StatusCode::CONFLICT);
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert_eq!(res.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(res.headers()[header::RETRY_AFTER], "2");
        let v: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
        assert_eq!(v["status"], 409);
        assert_eq!(v["detail"], "quote \" and \\ and \n");
        assert!(v["type"].as_str().unwrap().ends_with("#variant.InFlight"));
    }

    #[test]
    fn every_kind_has_a_distinct_type() {
        use ProblemKind::*;
        let all = [
            MissingKey,
            InvalidKey,
            PayloadTooLarge,
            BodyUnreadable,
            KeyMismatch,
            InFlight,
            NotReplayable,
            OutcomeUnknown,
            StoreUnavailable,
            ScopeUnavailable,
            RecordUnreadable,
            #[cfg(feature = "sidecar")]
            UpstreamUnavailable,
            #[cfg(feature = "sidecar")]
            UpstreamTimeout,
        ];
        let types: std::collections::HashSet<_> = all.iter().map(|k| k.type_uri()).collect();
        assert_eq!(types.len(), all.len());
    }
}
