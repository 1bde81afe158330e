//! Which headers travel beyond one connection: hop-by-hop headers are
//! dropped by the sidecar when it forwards and by the layer when it stores
//! a response for replay; a replay also drops `Set-Cookie` unless told to
//! keep it, and any header excluded by name.

use http::header::{self, HeaderMap, HeaderName};

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

/// The hop-by-hop headers of one message: the standard ones, and those its
/// `Connection` header names (up to [`MAX_CONNECTION_NAMES`]).
pub(crate) struct HopByHop {
    named_by_connection: Vec<HeaderName>,
}

impl HopByHop {
    /// The hop-by-hop headers of the message whose headers are `headers`.
    pub(crate) fn of(headers: &HeaderMap) -> Self {
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
        }
    }

    /// Whether `name` is one of them.
    pub(crate) fn contains(&self, name: &HeaderName) -> bool {
        HOP_BY_HOP.contains(name) || self.named_by_connection.contains(name)
    }
}

/// Removes the hop-by-hop headers from `headers` (a proxy forwarding a
/// message).
#[cfg(any(feature = "sidecar", test))]
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let hop_by_hop = HopByHop::of(headers);
    let dropped: Vec<HeaderName> = headers
        .keys()
        .filter(|name| hop_by_hop.contains(name))
        .cloned()
        .collect();
    for name in dropped {
        headers.remove(name);
    }
}

/// Which headers of a response a replay carries: all but the hop-by-hop
/// ones, `Set-Cookie` unless kept, and those excluded by name.
pub(crate) struct ReplayHeaders<'a> {
    hop_by_hop: HopByHop,
    keep_set_cookie: bool,
    excluded: &'a [HeaderName],
}

impl<'a> ReplayHeaders<'a> {
    /// For the response whose headers are `headers`.
    pub(crate) fn of(
        headers: &HeaderMap,
        keep_set_cookie: bool,
        excluded: &'a [HeaderName],
    ) -> Self {
        Self {
            hop_by_hop: HopByHop::of(headers),
            keep_set_cookie,
            excluded,
        }
    }

    /// Whether a replay carries the header `name`.
    pub(crate) fn keeps(&self, name: &HeaderName) -> bool {
        !(self.hop_by_hop.contains(name)
            || (!self.keep_set_cookie && name == header::SET_COOKIE)
            || self.excluded.contains(name))
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers() -> HeaderMap {
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
        h
    }

    #[test]
    fn a_replay_drops_hop_by_hop_headers_cookies_and_exclusions() {
        let h = headers();
        let excluded = [HeaderName::from_static("x-request-id")];
        let replay = ReplayHeaders::of(&h, false, &excluded);
        let kept: Vec<_> = h.keys().filter(|n| replay.keeps(n)).collect();
        assert_eq!(kept, [header::LOCATION]);
        let with_cookies = ReplayHeaders::of(&h, true, &[]);
        assert!(with_cookies.keeps(&header::SET_COOKIE));
    }

    #[test]
    fn a_proxy_drops_hop_by_hop_headers_only() {
        let mut h = headers();
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|name| name.as_str().to_owned()).collect();
        left.sort();
        assert_eq!(left, ["location", "set-cookie", "x-request-id"]);
        assert_eq!(h.get_all(header::SET_COOKIE).iter().count(), 2);
    }
}
