//! [`RequestLabel`]: what identifies a request without its body, kept with
//! its entry for an operator.

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
/// ([`Store::claim_labelled`](super::Store::claim_labelled)); stores that
/// keep it show it to an operator ([`admin`](super::admin)), and it never
/// decides anything.
///
/// Bounded: a method past [`MAX_LABEL_METHOD`] bytes is dropped, a path
/// past [`MAX_LABEL_PATH`] bytes cut. Cloning is a reference count.
///
/// ```
/// use tower_idempotency::store::RequestLabel;
///
/// let label = RequestLabel::new("POST", "/payments?customer=42");
/// assert_eq!(label.method(), "POST");
/// assert_eq!(label.path(), "/payments");
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct RequestLabel {
    /// The method, a space, then the path; `None` for an empty label.
    text: Option<Arc<str>>,
    /// Where the method ends in `text`.
    method_len: u8,
}

impl RequestLabel {
    /// A label of `method` and `path`; a query in `path` (from the first
    /// `?`) is left out.
    pub fn new(method: &str, path: &str) -> Self {
        let method = if method.len() <= MAX_LABEL_METHOD {
            method
        } else {
            ""
        };
        let path = path.split('?').next().unwrap_or_default();
        let path = cut(path, MAX_LABEL_PATH);
        if method.is_empty() && path.is_empty() {
            return Self::default();
        }
        let mut text = String::with_capacity(method.len() + 1 + path.len());
        text.push_str(method);
        text.push(' ');
        text.push_str(path);
        Self {
            text: Some(text.into()),
            // At most `MAX_LABEL_METHOD` bytes: fits.
            method_len: u8::try_from(method.len()).unwrap_or(0),
        }
    }

    /// The request's method (empty when unknown).
    pub fn method(&self) -> &str {
        match &self.text {
            Some(text) => text.get(..usize::from(self.method_len)).unwrap_or_default(),
            None => "",
        }
    }

    /// The request's path, without its query (empty when unknown).
    pub fn path(&self) -> &str {
        match &self.text {
            Some(text) => text
                .get(usize::from(self.method_len) + 1..)
                .unwrap_or_default(),
            None => "",
        }
    }

    /// Whether the label says nothing.
    pub fn is_empty(&self) -> bool {
        self.text.is_none()
    }

    /// Bytes the label holds: the method, a space and the path (a store
    /// that bounds its bytes counts them).
    pub fn len(&self) -> usize {
        self.text.as_deref().map_or(0, str::len)
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

impl fmt::Debug for RequestLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestLabel")
            .field("method", &self.method())
            .field("path", &self.path())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_method_and_path_without_the_query() {
        let label = RequestLabel::new("PATCH", "/a/b?c=d?e");
        assert_eq!((label.method(), label.path()), ("PATCH", "/a/b"));
        assert!(RequestLabel::new("", "?only=query").is_empty());
        let empty = RequestLabel::default();
        assert_eq!((empty.method(), empty.path()), ("", ""));
    }

    #[test]
    fn bounds_what_it_keeps() {
        let long = "é".repeat(MAX_LABEL_PATH);
        let label = RequestLabel::new(&"M".repeat(MAX_LABEL_METHOD + 1), &long);
        assert_eq!(label.method(), "");
        assert!(label.path().len() <= MAX_LABEL_PATH);
        assert!(long.starts_with(label.path()));
        let label = RequestLabel::new(&"M".repeat(MAX_LABEL_METHOD), "/x");
        assert_eq!(label.method().len(), MAX_LABEL_METHOD);
        assert_eq!(label.path(), "/x");
    }
}
