//! Idempotency keys, scopes, and the store key derived from both.

use std::fmt;

use bytes::Bytes;
use http::HeaderValue;
use sha2::{Digest, Sha256};

/// The longest idempotency key accepted, in bytes (as Stripe allows).
pub const MAX_KEY_LEN: usize = 255;

/// A validated idempotency key, as sent by the client.
///
/// A key is 1 to [`MAX_KEY_LEN`] visible ASCII characters (`0x21..=0x7E`)
/// other than `,` (a comma means an intermediary joined two header lines).
/// The IETF draft's quoted form (a Structured Field String such as `"abc"`,
/// with `\"` and `\\` escapes) is accepted and is the same key as the bare
/// token `abc`. Surrounding spaces and tabs are ignored, as HTTP says they
/// are not part of a field value.
///
/// The key is client-chosen and may be a secret: its `Debug` output shows
/// only its length, and the layer never logs it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(Bytes);

/// Why a key header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidKey {
    /// The value is empty (or only whitespace, or `""`).
    #[error("the idempotency key is empty")]
    Empty,
    /// The value is longer than [`MAX_KEY_LEN`] bytes.
    #[error("the idempotency key is longer than {MAX_KEY_LEN} characters")]
    TooLong,
    /// The value holds a character other than visible ASCII, or a comma.
    #[error("the idempotency key must be visible ASCII characters without commas")]
    InvalidCharacter,
    /// A quoted key is not a well-formed Structured Field String.
    #[error("the quoted idempotency key is malformed")]
    MalformedQuoting,
    /// The header was sent more than once.
    #[error("the idempotency key header was sent more than once")]
    Repeated,
}

impl IdempotencyKey {
    /// Parses a key from raw header value bytes.
    ///
    /// ```
    /// use tower_idempotency::key::IdempotencyKey;
    ///
    /// let bare = IdempotencyKey::parse(b"order-42").unwrap();
    /// let quoted = IdempotencyKey::parse(br#""order-42""#).unwrap();
    /// assert_eq!(bare, quoted);
    /// assert!(IdempotencyKey::parse(b"").is_err());
    /// ```
    pub fn parse(raw: &[u8]) -> Result<Self, InvalidKey> {
        let trimmed = trim_ows(raw);
        let key = match trimmed {
            [b'"', inner @ .., b'"'] => unquote(inner)?,
            [b'"', ..] => return Err(InvalidKey::MalformedQuoting),
            bare => Bytes::copy_from_slice(bare),
        };
        if key.is_empty() {
            return Err(InvalidKey::Empty);
        }
        if key.len() > MAX_KEY_LEN {
            return Err(InvalidKey::TooLong);
        }
        if !key.iter().all(|&b| (0x21..=0x7e).contains(&b) && b != b',') {
            return Err(InvalidKey::InvalidCharacter);
        }
        Ok(Self(key))
    }

    /// Extracts the key from every value of the key header in a request.
    ///
    /// Returns `Ok(None)` when the header is absent.
    pub fn from_header_values<'a>(
        mut values: impl Iterator<Item = &'a HeaderValue>,
    ) -> Result<Option<Self>, InvalidKey> {
        let Some(first) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(InvalidKey::Repeated);
        }
        Self::parse(first.as_bytes()).map(Some)
    }

    /// The key's bytes (unquoted).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The key as text (always ASCII).
    pub fn as_str(&self) -> &str {
        // Validated as visible ASCII in `parse`, so this never fails; fall
        // back to an empty string rather than panic.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey(<{} bytes>)", self.0.len())
    }
}

fn trim_ows(raw: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = raw.iter().position(|b| !is_ows(b)).unwrap_or(raw.len());
    let end = raw
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    &raw[start..end]
}

/// Unescapes the inside of an RFC 9651 String (`\"` and `\\` only).
fn unquote(inner: &[u8]) -> Result<Bytes, InvalidKey> {
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&e @ (b'"' | b'\\')) => out.push(e),
                _ => return Err(InvalidKey::MalformedQuoting),
            },
            b'"' => return Err(InvalidKey::MalformedQuoting),
            _ => out.push(b),
        }
    }
    Ok(Bytes::from(out))
}

/// The namespace of idempotency keys, usually one authenticated principal.
///
/// The store key is (scope, key): one tenant can never receive another
/// tenant's stored response, nor block another tenant's key. The layer takes
/// the scope from the request with the function given to
/// [`IdempotencyLayer::scope`](crate::IdempotencyLayer::scope); without one,
/// every request shares [`Scope::global`].
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Scope(Bytes);

impl Scope {
    /// The scope shared by every request (the default).
    pub const fn global() -> Self {
        Self(Bytes::new())
    }

    /// A scope from any bytes, for example a tenant id or a user id.
    pub fn new(id: impl Into<Bytes>) -> Self {
        Self(id.into())
    }

    /// The scope of a request whose scope header carries `value` (the
    /// sidecar's `--scope-header`, `sidecar::scope_from_header`): the
    /// SHA-256 of the value, so a scope of any length costs 32 bytes. The
    /// operator's tool (`idempotency-admin --scope`) derives the same scope
    /// from the value the client sent, and finds the key the layer stored.
    pub fn from_header_value(value: &[u8]) -> Self {
        let digest: [u8; 32] = Sha256::digest(value).into();
        Self(Bytes::copy_from_slice(&digest))
    }

    /// The scope's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scope(<{} bytes>)", self.0.len())
    }
}

impl From<&'static str> for Scope {
    fn from(s: &'static str) -> Self {
        Self(Bytes::from_static(s.as_bytes()))
    }
}

impl From<String> for Scope {
    fn from(s: String) -> Self {
        Self(Bytes::from(s))
    }
}

/// The name under which a store keeps one (scope, key): a SHA-256 digest.
///
/// Its `Hash` feeds only the first 16 digest bytes to the hasher: they are
/// already uniformly distributed, and hashing less is cheaper.
///
/// Hashing keeps client input out of store key names (so it can never pick
/// a Redis Cluster slot or inject a pattern), fixes their length, and keeps
/// raw keys out of logs: `Debug` and `Display` show the first 8 bytes in hex.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct StoreKey([u8; 32]);

impl std::hash::Hash for StoreKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Equal keys have equal prefixes, so this agrees with `Eq`.
        state.write(&self.0[..16]);
    }
}

impl StoreKey {
    /// Domain separation and format version, kept short so a typical
    /// (scope, key) hashes in one SHA-256 block.
    const DOMAIN: &'static [u8] = b"tidk/v1";

    /// Derives the store key of `key` within `scope`.
    pub fn new(scope: &Scope, key: &IdempotencyKey) -> Self {
        Self::from_parts(scope.as_bytes(), key.as_bytes())
    }

    /// Derives a store key from any scope and key bytes (for non-HTTP use of
    /// the [`Engine`](crate::engine::Engine)).
    pub fn from_parts(scope: &[u8], key: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(Self::DOMAIN);
        h.update((scope.len() as u64).to_be_bytes());
        h.update(scope);
        h.update((key.len() as u64).to_be_bytes());
        h.update(key);
        Self(h.finalize().into())
    }

    /// Wraps raw digest bytes (for stores that read keys back).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest as 64 lowercase hex characters.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// The key named by 64 hex digits (either case), as
    /// [`to_hex`](Self::to_hex) writes it; `None` for anything else.
    pub fn from_hex(text: &str) -> Option<Self> {
        let text = text.as_bytes();
        if text.len() != 64 {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
            let digit = |c: u8| (c as char).to_digit(16);
            *byte = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
        }
        Some(Self(bytes))
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreKey({self})")
    }
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0[..8]))
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &[u8]) -> Result<IdempotencyKey, InvalidKey> {
        IdempotencyKey::parse(s)
    }

    #[test]
    fn accepts_bare_and_quoted_forms_as_the_same_key() {
        assert_eq!(parse(b"abc").unwrap(), parse(b"\"abc\"").unwrap());
        assert_eq!(parse(b"  abc\t").unwrap().as_str(), "abc");
        assert_eq!(parse(br#""a\"b\\c""#).unwrap().as_str(), r#"a"b\c"#);
    }

    #[test]
    fn length_limits() {
        assert_eq!(parse(b"").unwrap_err(), InvalidKey::Empty);
        assert_eq!(parse(b"   ").unwrap_err(), InvalidKey::Empty);
        assert_eq!(parse(b"\"\"").unwrap_err(), InvalidKey::Empty);
        assert!(parse(&[b'a'; 255]).is_ok());
        assert_eq!(parse(&[b'a'; 256]).unwrap_err(), InvalidKey::TooLong);
        assert_eq!(parse(&[b'a'; 65536]).unwrap_err(), InvalidKey::TooLong);
    }

    #[test]
    fn refuses_invisible_or_non_ascii_characters() {
        for bad in [
            &b"a b"[..],
            b"a\tb",
            b"\x01",
            b"\x7f",
            "é".as_bytes(),
            b"k1, k2",
            b"k1,k2",
            b"\"a b\"",
        ] {
            assert_eq!(
                parse(bad).unwrap_err(),
                InvalidKey::InvalidCharacter,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn refuses_malformed_quoting() {
        for bad in [&b"\"abc"[..], b"\"a\"b\"", b"\"a\\x\"", b"\"a\\\""] {
            assert_eq!(
                parse(bad).unwrap_err(),
                InvalidKey::MalformedQuoting,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn refuses_repeated_headers() {
        let v = HeaderValue::from_static("k");
        let err = IdempotencyKey::from_header_values([&v, &v].into_iter()).unwrap_err();
        assert_eq!(err, InvalidKey::Repeated);
        assert!(
            IdempotencyKey::from_header_values(std::iter::empty())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn store_keys_separate_scope_and_key() {
        let a = StoreKey::from_parts(b"ab", b"c");
        let b = StoreKey::from_parts(b"a", b"bc");
        assert_ne!(a, b);
        assert_eq!(a, StoreKey::from_parts(b"ab", b"c"));
        assert_eq!(a.to_hex().len(), 64);
        assert_eq!(format!("{a}").len(), 16);
    }

    #[test]
    fn debug_never_shows_the_key() {
        let k = parse(b"secret-key").unwrap();
        assert!(!format!("{k:?}").contains("secret"));
        assert!(!format!("{:?}", Scope::from("tenant-a")).contains("tenant"));
    }

    #[test]
    fn store_keys_read_back_from_hex() {
        let key = StoreKey::new(&Scope::from("t"), &parse(b"k").unwrap());
        assert_eq!(StoreKey::from_hex(&key.to_hex()), Some(key));
        assert_eq!(StoreKey::from_hex(&key.to_hex().to_uppercase()), Some(key));
        for bad in [
            "",
            "00",
            &"g".repeat(64),
            &"0".repeat(63),
            &"0".repeat(65),
            &"é".repeat(32),
        ] {
            assert_eq!(StoreKey::from_hex(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_header_scope_is_the_digest_of_the_value() {
        let scope = Scope::from_header_value(b"tenant-a");
        assert_eq!(scope.as_bytes().len(), 32);
        assert_eq!(scope, Scope::from_header_value(b"tenant-a"));
        assert_ne!(scope, Scope::from_header_value(b"tenant-b"));
    }
}
