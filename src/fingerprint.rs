//! Request fingerprints: what makes two requests "the same request".
//!
//! By default a request's body counts by its bytes. [`FingerprintMode`]
//! chooses otherwise: a JSON body by its meaning (with the `json` feature),
//! or a function of yours.

use std::fmt;

use http::{HeaderMap, HeaderName, Method, Uri};
use sha2::{Digest, Sha256};

#[cfg(feature = "json")]
mod json;
mod mode;
#[cfg(feature = "json")]
mod pointer;

#[cfg(feature = "json")]
#[cfg_attr(docsrs, doc(cfg(feature = "json")))]
pub use json::MAX_DEPTH;
pub use mode::FingerprintMode;
#[cfg(feature = "json")]
#[cfg_attr(docsrs, doc(cfg(feature = "json")))]
pub use pointer::{InvalidJsonPointer, JsonPointer, MAX_POINTER_LEN};

/// A SHA-256 digest identifying one request's content.
///
/// The same key sent with a different fingerprint is refused: the
/// fingerprint covers the method, the path and query, any request headers
/// the user selected, and the body bytes. Every field is length-prefixed so
/// that no two different requests frame to the same bytes, and a version tag
/// leads so that a later format change can never silently match an old
/// entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Wraps raw digest bytes (for stores that read fingerprints back, or
    /// non-HTTP uses of the [`Engine`](crate::engine::Engine)).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Fingerprints arbitrary bytes (for non-HTTP uses of the engine).
    pub fn of_bytes(bytes: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(b"tower-idempotency/fingerprint/bytes/v1");
        h.update(bytes);
        Self(h.finalize().into())
    }

    /// The digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", crate::key::hex(&self.0[..8]))
    }
}

/// Computes a request [`Fingerprint`] incrementally, while the body is read.
///
/// The result does not depend on how the body is split into chunks.
///
/// ```
/// use http::{HeaderMap, Method, Uri};
/// use tower_idempotency::fingerprint::FingerprintHasher;
///
/// let uri: Uri = "/charges?x=1".parse().unwrap();
/// let mut a = FingerprintHasher::new(&Method::POST, &uri, &HeaderMap::new(), &[]);
/// a.update(b"hello ");
/// a.update(b"world");
/// let mut b = FingerprintHasher::new(&Method::POST, &uri, &HeaderMap::new(), &[]);
/// b.update(b"hello world");
/// assert_eq!(a.finish(), b.finish());
/// ```
#[derive(Clone)]
pub struct FingerprintHasher {
    hash: Sha256,
    body_len: u64,
}

impl fmt::Debug for FingerprintHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FingerprintHasher")
            .field("body_len", &self.body_len)
            .finish()
    }
}

impl FingerprintHasher {
    /// Domain separation and format version (short: it is hashed per request).
    const VERSION: &'static [u8] = b"tidf/http/v1";

    /// Starts a fingerprint over the request head.
    ///
    /// `selected` names the headers to include; each is hashed with all of
    /// its values in order (an absent header and an empty one differ).
    pub fn new(method: &Method, uri: &Uri, headers: &HeaderMap, selected: &[HeaderName]) -> Self {
        Self::tagged(Self::VERSION, method, uri, headers, selected)
    }

    /// Starts a fingerprint whose version tag is `tag`: each
    /// [`FingerprintMode`] other than bytes has a tag of its own.
    pub(crate) fn tagged(
        tag: &[u8],
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        selected: &[HeaderName],
    ) -> Self {
        let mut hash = Sha256::new();
        field(&mut hash, tag);
        field(&mut hash, method.as_str().as_bytes());
        let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
        field(&mut hash, path_and_query.as_bytes());
        hash.update((selected.len() as u64).to_be_bytes());
        for name in selected {
            field(&mut hash, name.as_str().as_bytes());
            let values = headers.get_all(name);
            hash.update((values.iter().count() as u64).to_be_bytes());
            for value in values {
                field(&mut hash, value.as_bytes());
            }
        }
        Self { hash, body_len: 0 }
    }

    /// Feeds the next chunk of the body.
    pub fn update(&mut self, chunk: &[u8]) {
        self.hash.update(chunk);
        self.body_len += chunk.len() as u64;
    }

    /// Finishes the fingerprint.
    ///
    /// The body is the last field, so its length is appended after it
    /// rather than before: the framing stays unambiguous without knowing the
    /// length up front.
    pub fn finish(mut self) -> Fingerprint {
        self.hash.update(self.body_len.to_be_bytes());
        Fingerprint(self.hash.finalize().into())
    }
}

fn field(hash: &mut Sha256, bytes: &[u8]) {
    hash.update((bytes.len() as u64).to_be_bytes());
    hash.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fp(
        method: &str,
        uri: &str,
        headers: &HeaderMap,
        selected: &[HeaderName],
        body: &[u8],
    ) -> Fingerprint {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let uri: Uri = uri.parse().unwrap();
        let mut h = FingerprintHasher::new(&method, &uri, headers, selected);
        h.update(body);
        h.finish()
    }

    #[test]
    fn method_path_query_and_body_all_count() {
        let h = HeaderMap::new();
        let base = fp("POST", "/a?x=1", &h, &[], b"body");
        assert_ne!(base, fp("PATCH", "/a?x=1", &h, &[], b"body"));
        assert_ne!(base, fp("POST", "/b?x=1", &h, &[], b"body"));
        assert_ne!(base, fp("POST", "/a?x=2", &h, &[], b"body"));
        assert_ne!(base, fp("POST", "/a?x=1", &h, &[], b"bodz"));
        assert_ne!(
            fp("POST", "/a?a=&b=", &h, &[], b""),
            fp("POST", "/a?a&b=", &h, &[], b"")
        );
        assert_eq!(base, fp("POST", "/a?x=1", &h, &[], b"body"));
    }

    #[test]
    fn headers_count_only_when_selected() {
        let name = HeaderName::from_static("x-tenant");
        let mut a = HeaderMap::new();
        a.insert(&name, "a".parse().unwrap());
        let mut b = HeaderMap::new();
        b.insert(&name, "b".parse().unwrap());
        assert_eq!(fp("POST", "/", &a, &[], b""), fp("POST", "/", &b, &[], b""));
        let sel = [name.clone()];
        assert_ne!(
            fp("POST", "/", &a, &sel, b""),
            fp("POST", "/", &b, &sel, b"")
        );
        assert_ne!(
            fp("POST", "/", &HeaderMap::new(), &sel, b""),
            fp("POST", "/", &a, &sel, b"")
        );
        let mut empty = HeaderMap::new();
        empty.insert(&name, "".parse().unwrap());
        assert_ne!(
            fp("POST", "/", &HeaderMap::new(), &sel, b""),
            fp("POST", "/", &empty, &sel, b"")
        );
    }

    /// Bytes-mode fingerprints are what records already stored hold: a
    /// digest computed by hand from the framing (SHA-256 over the
    /// length-prefixed tag, method, path and query, selected headers, then
    /// the body and its length) must not change.
    #[test]
    fn bytes_fingerprints_are_pinned() {
        let name = HeaderName::from_static("x-tenant");
        let mut headers = HeaderMap::new();
        headers.insert(&name, "t1".parse().unwrap());
        let streamed = fp(
            "POST",
            "/pay?x=1",
            &headers,
            std::slice::from_ref(&name),
            br#"{"a":1}"#,
        );
        assert_eq!(
            crate::key::hex(streamed.as_bytes()),
            "e04b6cd1cbd102d5d857b66e5b0bea4a57e023503708ac6720ff0befe75edc60"
        );
        let mut req = http::Request::post("/pay?x=1").body(()).unwrap();
        *req.headers_mut() = headers;
        let (parts, ()) = req.into_parts();
        let whole = FingerprintMode::bytes().fingerprint(&parts, &[name], br#"{"a":1}"#);
        assert_eq!(
            whole, streamed,
            "the mode's own path hashes as the stream does"
        );
    }

    proptest! {
        #[test]
        fn chunking_never_changes_the_fingerprint(
            body in proptest::collection::vec(any::<u8>(), 0..2048),
            cuts in proptest::collection::vec(any::<usize>(), 0..16),
        ) {
            let uri: Uri = "/x".parse().unwrap();
            let h = HeaderMap::new();
            let mut one = FingerprintHasher::new(&Method::POST, &uri, &h, &[]);
            one.update(&body);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (body.len() + 1)).collect();
            cuts.sort_unstable();
            let mut many = FingerprintHasher::new(&Method::POST, &uri, &h, &[]);
            let mut start = 0;
            for c in cuts {
                many.update(&body[start..c]);
                start = c;
            }
            many.update(&body[start..]);
            prop_assert_eq!(one.finish(), many.finish());
        }
    }
}
