//! What of a request's body its fingerprint covers: the bytes (the
//! default), the meaning of a JSON body, or what a function of the user's
//! makes of it.

use std::fmt;
use std::sync::Arc;

#[cfg(feature = "json")]
use http::HeaderMap;
use http::{HeaderName, request};

use super::{Fingerprint, FingerprintHasher};
#[cfg(feature = "json")]
use super::{JsonPointer, json, pointer::Ignored};

/// A user's function from a request to the material that is hashed in
/// place of its body.
type MaterialFn = dyn Fn(&request::Parts, &[u8], &mut FingerprintHasher) + Send + Sync;

/// How a request's body enters its [`Fingerprint`]: by its bytes (the
/// default), by the meaning of a JSON body, or through a function of yours.
///
/// The method, the path and query and the selected headers are in the
/// fingerprint whatever the mode, and the mode is part of the fingerprint's
/// version tag: a record made under one mode never matches a request under
/// another (a retry sent across a change of mode gets the mismatch
/// answer, never a replay). Two exceptions, both by design: gRPC calls are
/// compared by their bytes in bytes and JSON mode alike, so their records
/// match across a change between those two; and a function given to
/// [`with`](Self::with) is not itself in the tag (see there).
///
/// The layer's [`fingerprint_json`](crate::IdempotencyLayer::fingerprint_json),
/// [`fingerprint_json_ignoring`](crate::IdempotencyLayer::fingerprint_json_ignoring)
/// and [`fingerprint_with`](crate::IdempotencyLayer::fingerprint_with) set
/// one; [`fingerprint`](Self::fingerprint) computes a fingerprint outside
/// the layer.
///
/// ```
/// # #[cfg(feature = "json")] {
/// use http::Request;
/// use tower_idempotency::fingerprint::FingerprintMode;
///
/// let json = FingerprintMode::json();
/// let a = Request::post("/charges").header("content-type", "application/json").body(()).unwrap();
/// let (a, _) = a.into_parts();
/// assert_eq!(
///     json.fingerprint(&a, &[], br#"{"amount": 1000, "currency": "eur"}"#),
///     json.fingerprint(&a, &[], br#"{"currency":"eur","amount":1000}"#),
/// );
/// // Bytes mode (the default) tells them apart.
/// let bytes = FingerprintMode::bytes();
/// assert_ne!(
///     bytes.fingerprint(&a, &[], br#"{"amount": 1000, "currency": "eur"}"#),
///     bytes.fingerprint(&a, &[], br#"{"currency":"eur","amount":1000}"#),
/// );
/// # }
/// ```
#[derive(Clone, Default)]
pub struct FingerprintMode {
    kind: Kind,
}

#[derive(Clone, Default)]
enum Kind {
    #[default]
    Bytes,
    #[cfg(feature = "json")]
    Json(Arc<JsonMode>),
    With(Arc<MaterialFn>),
}

#[cfg(feature = "json")]
struct JsonMode {
    /// The ignored pointers, sorted, each once.
    pointers: Vec<JsonPointer>,
    ignored: Ignored,
    /// The version tag: the mode and the pointers.
    tag: Box<[u8]>,
}

/// The version tag of the mode that hashes what a function made.
const WITH_TAG: &[u8] = b"tidf/http/v1+with";
/// The version tag of the JSON mode, before its ignored pointers.
#[cfg(feature = "json")]
const JSON_TAG: &[u8] = b"tidf/http/v1+json";

impl FingerprintMode {
    /// The body's bytes, exactly as sent (the default).
    pub fn bytes() -> Self {
        Self { kind: Kind::Bytes }
    }

    /// A JSON body by its meaning: member order, insignificant whitespace
    /// and the spelling of strings and numbers do not count.
    ///
    /// Two JSON texts are the same body when they parse to the same value:
    ///
    /// - objects with the same members, in any order (an object with one
    ///   member name twice is compared by its bytes);
    /// - arrays with the same elements in the same order;
    /// - strings with the same characters, however escaped (`"\u00e9"` is
    ///   `"é"`);
    /// - numbers with the same exact decimal value: `1`, `1.0`, `1e0` and
    ///   `10e-1` are one number and `-0` is `0`, but `9007199254740993` and
    ///   `9007199254740992` are two (no rounding to a double, unlike RFC
    ///   8785), as are `0.1` and `0.10000000000000001`.
    ///
    /// A body is compared by its bytes instead when its `Content-Type` is
    /// not JSON (`application/json` or any `application/*+json`), when it is
    /// not JSON (RFC 8259; UTF-8), when arrays and objects nest more than
    /// 128 deep ([`MAX_DEPTH`](super::MAX_DEPTH)), when a non-zero number's
    /// exponent has more than 15 digits or its integer part more than 4 300
    /// digits. gRPC calls are always compared by their bytes.
    ///
    /// RFC 8785 is the reference for the canonical form, and the crates
    /// that implement it (`serde_json_canonicalizer`, `serde_jcs`) follow it
    /// in rounding every number to a double, which makes two amounts one;
    /// so the canonical form is this crate's own, on the `jiter` parser.
    ///
    /// The body is read whole within the request body limit first (as in
    /// every mode), then parsed once without building a tree.
    #[cfg(feature = "json")]
    #[cfg_attr(docsrs, doc(cfg(feature = "json")))]
    pub fn json() -> Self {
        Self::json_ignoring([])
    }

    /// Like [`json`](Self::json), leaving out the values the pointers name
    /// (a client timestamp, a trace id in the body): a member so named is
    /// compared as if absent, and an element so named as if removed from
    /// its array. A pointer that names nothing in a body changes nothing.
    ///
    /// The pointers are part of the mode: records made while ignoring one
    /// set never match requests made while ignoring another.
    #[cfg(feature = "json")]
    #[cfg_attr(docsrs, doc(cfg(feature = "json")))]
    pub fn json_ignoring(pointers: impl IntoIterator<Item = JsonPointer>) -> Self {
        let mut pointers: Vec<JsonPointer> = pointers.into_iter().collect();
        pointers.sort();
        pointers.dedup();
        let mut tag = JSON_TAG.to_vec();
        for p in &pointers {
            tag.extend_from_slice(&(p.as_str().len() as u64).to_be_bytes());
            tag.extend_from_slice(p.as_str().as_bytes());
        }
        let ignored = Ignored::new(&pointers);
        Self {
            kind: Kind::Json(Arc::new(JsonMode {
                pointers,
                ignored,
                tag: tag.into(),
            })),
        }
    }

    /// The material `f` makes of a request's head and body is hashed in
    /// place of the body: for form bodies, protobuf messages, or anything
    /// whose meaning your code knows. It applies to gRPC calls too.
    ///
    /// `f` runs once per guarded request on the whole body, within the
    /// request body limit; it should be cheap and must not fail (return the
    /// body itself for what it does not understand). What it returns is
    /// hashed as it is: two requests are the same when their material is.
    ///
    /// Every function shares one version tag: records stored under one
    /// function are compared with what the next one makes of a retry. When
    /// a new function compares otherwise, make its material say so (start
    /// it with a version of your own, `b"v2:"`), and retries of earlier
    /// keys then get the mismatch answer rather than a replay.
    ///
    /// ```
    /// use tower_idempotency::fingerprint::FingerprintMode;
    ///
    /// // A form body by its fields, in any order.
    /// let form = FingerprintMode::with(|_parts, body| {
    ///     let mut fields: Vec<&[u8]> = body.split(|&b| b == b'&').collect();
    ///     fields.sort_unstable();
    ///     fields.join(&b'&')
    /// });
    /// let (parts, _) = http::Request::post("/pay").body(()).unwrap().into_parts();
    /// assert_eq!(
    ///     form.fingerprint(&parts, &[], b"amount=10&currency=eur"),
    ///     form.fingerprint(&parts, &[], b"currency=eur&amount=10"),
    /// );
    /// ```
    pub fn with<F, M>(f: F) -> Self
    where
        F: Fn(&request::Parts, &[u8]) -> M + Send + Sync + 'static,
        M: AsRef<[u8]>,
    {
        Self {
            kind: Kind::With(Arc::new(move |parts, body, hasher| {
                hasher.update(f(parts, body).as_ref());
            })),
        }
    }

    /// The fingerprint of a request with head `parts` and body `body`,
    /// including the `selected` headers, as the layer computes it for an
    /// HTTP request (not a gRPC call) in this mode.
    pub fn fingerprint(
        &self,
        parts: &request::Parts,
        selected: &[HeaderName],
        body: &[u8],
    ) -> Fingerprint {
        match &self.kind {
            Kind::Bytes => {
                let mut h =
                    FingerprintHasher::new(&parts.method, &parts.uri, &parts.headers, selected);
                h.update(body);
                h.finish()
            }
            #[cfg(feature = "json")]
            Kind::Json(mode) => {
                let mut h = FingerprintHasher::tagged(
                    &mode.tag,
                    &parts.method,
                    &parts.uri,
                    &parts.headers,
                    selected,
                );
                let canonical = is_json(&parts.headers)
                    .then(|| json::canonical(body, &mode.ignored))
                    .flatten();
                match canonical {
                    Some(text) => {
                        h.update(b"J");
                        h.update(&text);
                    }
                    None => {
                        h.update(b"B");
                        h.update(body);
                    }
                }
                h.finish()
            }
            Kind::With(f) => {
                let mut h = FingerprintHasher::tagged(
                    WITH_TAG,
                    &parts.method,
                    &parts.uri,
                    &parts.headers,
                    selected,
                );
                f(parts, body, &mut h);
                h.finish()
            }
        }
    }

    /// Whether the body is hashed as it is read, by its bytes: in bytes
    /// mode, and for gRPC calls in JSON mode.
    #[cfg_attr(not(feature = "json"), allow(unused_variables))]
    pub(crate) fn streams(&self, grpc: bool) -> bool {
        match &self.kind {
            Kind::Bytes => true,
            #[cfg(feature = "json")]
            Kind::Json(_) => grpc,
            Kind::With(_) => false,
        }
    }
}

impl fmt::Debug for FingerprintMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Bytes => f.write_str("Bytes"),
            #[cfg(feature = "json")]
            Kind::Json(mode) => f.debug_tuple("Json").field(&mode.pointers).finish(),
            Kind::With(_) => f.write_str("With(..)"),
        }
    }
}

/// Whether the request says its body is JSON: `application/json` or
/// `application/<anything>+json`, with any parameters, in any case. A
/// request with no `Content-Type`, or with more than one, is not.
#[cfg(feature = "json")]
fn is_json(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(http::header::CONTENT_TYPE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    if !kind.eq_ignore_ascii_case("application") {
        return false;
    }
    let subtype = subtype.as_bytes();
    subtype.eq_ignore_ascii_case(b"json")
        || (subtype.len() > 5 && subtype[subtype.len() - 5..].eq_ignore_ascii_case(b"+json"))
}

#[cfg(all(test, feature = "json"))]
mod tests {
    use super::*;

    fn headers(content_type: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in content_type {
            h.append(http::header::CONTENT_TYPE, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn json_media_types() {
        for yes in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            " application/json ",
            "application/problem+json",
            "application/vnd.api+JSON;v=2",
        ] {
            assert!(is_json(&headers(&[yes])), "{yes}");
        }
        for no in [
            "text/plain",
            "application/jsonx",
            "text/json",
            "application/+json",
            "application/x-www-form-urlencoded",
            "json",
            "",
        ] {
            assert!(!is_json(&headers(&[no])), "{no}");
        }
        assert!(!is_json(&headers(&[])));
        assert!(!is_json(&headers(&[
            "application/json",
            "application/json"
        ])));
    }
}
