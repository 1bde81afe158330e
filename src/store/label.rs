//! [`RequestLabel`]: what identifies a request without its body, given
//! with its claim for an operator; and the form a store keeps.

use std::fmt;
use std::sync::Arc;

/// The longest method a label keeps, in bytes.
pub const MAX_LABEL_METHOD: usize = 32;
/// The longest path a label keeps, in bytes; a longer one is cut at a
/// character boundary.
pub const MAX_LABEL_PATH: usize = 512;

/// What identifies a request without its body: its method and its path,
/// the query left out (it may carry personal data, and the fingerprint
/// already tells requests apart). The layer gives one with each claim
/// ([`Store::claim_labelled`](super::Store::claim_labelled)), borrowed
/// from the request, so a store that keeps none pays nothing for it;
/// stores that keep it show it to an operator ([`admin`](super::admin)),
/// and it never decides anything.
///
/// Bounded: a method past [`MAX_LABEL_METHOD`] bytes is dropped, a path
/// past [`MAX_LABEL_PATH`] bytes cut.
///
/// ```
/// use tower_idempotency::store::RequestLabel;
///
/// let label = RequestLabel::new("POST", "/payments?customer=42");
/// assert_eq!(label.method(), "POST");
/// assert_eq!(label.path(), "/payments");
/// ```
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RequestLabel<'a> {
    method: &'a str,
    path: &'a str,
}

impl<'a> RequestLabel<'a> {
    /// A label of `method` and `path`; a query in `path` (from the first
    /// `?`) is left out.
    pub fn new(method: &'a str, path: &'a str) -> Self {
        let method = if method.len() <= MAX_LABEL_METHOD {
            method
        } else {
            ""
        };
        let path = path.split('?').next().unwrap_or_default();
        Self {
            method,
            path: cut(path, MAX_LABEL_PATH),
        }
    }

    /// The request's method (empty when unknown).
    pub fn method(&self) -> &'a str {
        self.method
    }

    /// The request's path, without its query (empty when unknown).
    pub fn path(&self) -> &'a str {
        self.path
    }

    /// Whether the label says nothing.
    pub fn is_empty(&self) -> bool {
        self.method.is_empty() && self.path.is_empty()
    }
}

impl fmt::Debug for RequestLabel<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestLabel")
            .field("method", &self.method)
            .field("path", &self.path)
            .finish()
    }
}

/// A label as a store keeps it beside an entry: one allocation (none for
/// an empty label; the text is put together on the stack first), cloned
/// by a reference count.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct KeptLabel {
    /// The method, a space, then the path; `None` for an empty label.
    text: Option<Arc<str>>,
    /// Where the method ends in `text` (at most [`MAX_LABEL_METHOD`]).
    method_len: u8,
}

impl KeptLabel {
    #[cfg_attr(
        not(any(feature = "memory", feature = "postgres")),
        allow(dead_code, reason = "the stores that keep labels")
    )]
    pub(crate) fn of(label: &RequestLabel<'_>) -> Self {
        if label.is_empty() {
            return Self::default();
        }
        // Both parts are bounded, so the whole fits on the stack.
        let mut buf = [0u8; MAX_LABEL_METHOD + 1 + MAX_LABEL_PATH];
        let (method, path) = (label.method.as_bytes(), label.path.as_bytes());
        let end = method.len() + 1 + path.len();
        let Some(text) = buf.get_mut(..end) else {
            return Self::default();
        };
        let (m, rest) = text.split_at_mut(method.len());
        m.copy_from_slice(method);
        rest[0] = b' ';
        rest[1..].copy_from_slice(path);
        let text = std::str::from_utf8(text).unwrap_or_default();
        Self {
            text: Some(Arc::from(text)),
            method_len: u8::try_from(method.len()).unwrap_or(0),
        }
    }

    pub(crate) fn method(&self) -> &str {
        match &self.text {
            Some(text) => text.get(..usize::from(self.method_len)).unwrap_or_default(),
            None => "",
        }
    }

    pub(crate) fn path(&self) -> &str {
        match &self.text {
            Some(text) => text
                .get(usize::from(self.method_len) + 1..)
                .unwrap_or_default(),
            None => "",
        }
    }

    /// Bytes it holds (for a store's byte bound).
    #[cfg_attr(
        not(feature = "memory"),
        allow(dead_code, reason = "the memory store's bound")
    )]
    pub(crate) fn len(&self) -> usize {
        self.text.as_deref().map_or(0, str::len)
    }
}

impl fmt::Debug for KeptLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeptLabel")
            .field("method", &self.method())
            .field("path", &self.path())
            .finish()
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_method_and_path_without_the_query() {
        let label = RequestLabel::new("PATCH", "/a/b?c=d?e");
        assert_eq!((label.method(), label.path()), ("PATCH", "/a/b"));
        assert!(RequestLabel::new("", "?only=query").is_empty());
        let kept = KeptLabel::of(&label);
        assert_eq!((kept.method(), kept.path()), ("PATCH", "/a/b"));
        assert_eq!(kept.len(), "PATCH /a/b".len());
        let empty = KeptLabel::of(&RequestLabel::default());
        assert_eq!((empty.method(), empty.path(), empty.len()), ("", "", 0));
    }

    #[test]
    fn bounds_what_it_keeps() {
        let long = "é".repeat(MAX_LABEL_PATH);
        let too_long = "M".repeat(MAX_LABEL_METHOD + 1);
        let label = RequestLabel::new(&too_long, &long);
        assert_eq!(label.method(), "");
        assert!(label.path().len() <= MAX_LABEL_PATH);
        assert!(long.starts_with(label.path()));
        let method = "M".repeat(MAX_LABEL_METHOD);
        let label = RequestLabel::new(&method, "/x");
        let kept = KeptLabel::of(&label);
        assert_eq!(kept.method().len(), MAX_LABEL_METHOD);
        assert_eq!(kept.path(), "/x");
    }
}
