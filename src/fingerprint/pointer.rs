//! JSON Pointers (RFC 6901) naming the fields a JSON fingerprint leaves
//! out, and the tree they are looked up in while a body is read.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use super::json::MAX_DEPTH;

/// The longest pointer accepted, in bytes.
pub const MAX_POINTER_LEN: usize = 1024;

/// A JSON Pointer (RFC 6901) to a field that
/// [`fingerprint_json_ignoring`](crate::IdempotencyLayer::fingerprint_json_ignoring)
/// leaves out of the comparison, such as a client timestamp.
///
/// A pointer is `/` followed by reference tokens separated by `/`, with `~`
/// written `~0` and `/` written `~1` inside a token. It names a member of
/// an object by its name, or an element of an array by its index (decimal,
/// no leading zeros). The empty pointer, which names the whole document, is
/// refused: ignoring it would make every JSON body the same request.
///
/// ```
/// use tower_idempotency::fingerprint::JsonPointer;
///
/// let sent_at: JsonPointer = "/metadata/sent_at".parse()?;
/// assert_eq!(sent_at.as_str(), "/metadata/sent_at");
///
/// // `~1` is a `/` inside a member's name.
/// let path = JsonPointer::from_static("/links/a~1b");
/// # drop(path);
///
/// assert!("metadata".parse::<JsonPointer>().is_err());
/// assert!("".parse::<JsonPointer>().is_err());
/// # Ok::<(), tower_idempotency::fingerprint::InvalidJsonPointer>(())
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JsonPointer {
    text: Box<str>,
    tokens: Box<[Box<str>]>,
}

/// Why a string is not a [`JsonPointer`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid JSON pointer {pointer:?}: {reason}")]
pub struct InvalidJsonPointer {
    /// The refused text, cut to its first 64 characters.
    pointer: String,
    reason: &'static str,
}

impl InvalidJsonPointer {
    fn new(text: &str, reason: &'static str) -> Self {
        Self {
            pointer: text.chars().take(64).collect(),
            reason,
        }
    }

    /// Why the pointer was refused.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl JsonPointer {
    /// Parses a pointer known when the program is written.
    ///
    /// # Panics
    ///
    /// If `text` is not a pointer this type accepts (see [`JsonPointer`]), as
    /// [`HeaderName::from_static`](http::HeaderName::from_static) does. For
    /// text that comes from configuration, use [`str::parse`].
    #[track_caller]
    pub fn from_static(text: &'static str) -> Self {
        match Self::parse(text) {
            Ok(pointer) => pointer,
            Err(e) => panic!("{e}"),
        }
    }

    /// The pointer as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The reference tokens, unescaped (`~1` is `/`, `~0` is `~`).
    pub(crate) fn tokens(&self) -> &[Box<str>] {
        &self.tokens
    }

    fn parse(text: &str) -> Result<Self, InvalidJsonPointer> {
        if text.is_empty() {
            return Err(InvalidJsonPointer::new(
                text,
                "the empty pointer names the whole body; ignoring it would make every JSON body the same",
            ));
        }
        if text.len() > MAX_POINTER_LEN {
            return Err(InvalidJsonPointer::new(text, "longer than 1024 bytes"));
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(InvalidJsonPointer::new(text, "must start with '/'"));
        };
        let mut tokens = Vec::new();
        for raw in rest.split('/') {
            if tokens.len() >= MAX_DEPTH {
                return Err(InvalidJsonPointer::new(
                    text,
                    "deeper than the 128 levels a JSON body is compared to",
                ));
            }
            tokens.push(unescape(raw).ok_or_else(|| {
                InvalidJsonPointer::new(text, "'~' must be followed by '0' or '1'")
            })?);
        }
        Ok(Self {
            text: text.into(),
            tokens: tokens.into(),
        })
    }
}

fn unescape(raw: &str) -> Option<Box<str>> {
    if !raw.contains('~') {
        return Some(raw.into());
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '~' {
            match chars.next() {
                Some('0') => out.push('~'),
                Some('1') => out.push('/'),
                _ => return None,
            }
        } else {
            out.push(c);
        }
    }
    Some(out.into())
}

impl FromStr for JsonPointer {
    type Err = InvalidJsonPointer;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl TryFrom<&str> for JsonPointer {
    type Error = InvalidJsonPointer;

    fn try_from(text: &str) -> Result<Self, Self::Error> {
        Self::parse(text)
    }
}

impl TryFrom<String> for JsonPointer {
    type Error = InvalidJsonPointer;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        Self::parse(&text)
    }
}

impl fmt::Display for JsonPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for JsonPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JsonPointer({:?})", self.text)
    }
}

/// The ignored pointers as a tree of reference tokens: a body's walk keeps
/// the node for the value it is in, and looks each member name, or each
/// element index written in decimal, up among that node's children.
///
/// A token names an object member and an array element alike (RFC 6901
/// §4): `0` is member `"0"` of an object and the first element of an
/// array. An index is looked up as its decimal digits, so a token with a
/// leading zero (`01`) or `-` never names an element.
#[derive(Debug, Default)]
pub(crate) struct Ignored {
    children: BTreeMap<Box<str>, Ignored>,
    /// A pointer ends here: the value is left out.
    ends: bool,
}

impl Ignored {
    pub(crate) fn new<'a>(pointers: impl IntoIterator<Item = &'a JsonPointer>) -> Self {
        let mut root = Self::default();
        for pointer in pointers {
            let mut node = &mut root;
            for token in pointer.tokens() {
                node = node.children.entry(token.clone()).or_default();
            }
            node.ends = true;
        }
        root
    }

    /// Whether no pointer is below this node.
    pub(crate) fn is_leaf(&self) -> bool {
        self.children.is_empty()
    }

    /// The node for member `name` of the object this node is for.
    pub(crate) fn member(&self, name: &str) -> Option<&Self> {
        self.children.get(name)
    }

    /// The node for element `index` of the array this node is for.
    pub(crate) fn element(&self, index: usize) -> Option<&Self> {
        if self.children.is_empty() {
            return None;
        }
        self.children.get(itoa::Buffer::new().format(index))
    }

    /// Whether the value at this node is left out.
    pub(crate) fn ends(&self) -> bool {
        self.ends
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(text: &str) -> Vec<String> {
        let p: JsonPointer = text.parse().unwrap();
        p.tokens().iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn tokens_are_unescaped_in_order() {
        assert_eq!(tokens("/a/b"), ["a", "b"]);
        assert_eq!(tokens("/a~1b/c~0d"), ["a/b", "c~d"]);
        assert_eq!(tokens("/~01"), ["~1"]);
        assert_eq!(tokens("/"), [""]);
        assert_eq!(tokens("//x"), ["", "x"]);
    }

    #[test]
    fn bad_pointers_are_refused_with_a_reason() {
        for bad in ["", "a", "a/b", "/a~", "/a~2", "/~x"] {
            let e = bad.parse::<JsonPointer>().unwrap_err();
            assert!(!e.reason().is_empty(), "{bad}");
        }
        let long = format!("/{}", "x".repeat(MAX_POINTER_LEN));
        assert!(long.parse::<JsonPointer>().is_err());
        let deep = "/x".repeat(MAX_DEPTH + 1);
        assert!(deep.parse::<JsonPointer>().is_err());
        let ok = "/x".repeat(MAX_DEPTH);
        assert!(ok.parse::<JsonPointer>().is_ok());
        // The message quotes at most 64 characters of what was refused.
        let e = format!("x{}", "y".repeat(200))
            .parse::<JsonPointer>()
            .unwrap_err();
        assert!(e.to_string().len() < 200, "{e}");
    }

    #[test]
    #[should_panic(expected = "must start with '/'")]
    fn from_static_panics_on_a_bad_pointer() {
        let _ = JsonPointer::from_static("nope");
    }

    #[test]
    fn the_tree_finds_names_and_indexes() {
        let ps: Vec<JsonPointer> = ["/a/b", "/items/0/ts", "/1"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        let t = Ignored::new(&ps);
        assert!(t.member("a").unwrap().member("b").unwrap().ends());
        assert!(!t.member("a").unwrap().ends());
        let item = t.member("items").unwrap().element(0).unwrap();
        assert!(item.member("ts").unwrap().ends());
        // "0" names element 0 of an array and member "0" of an object.
        let as_name = t.member("items").unwrap().member("0").unwrap();
        assert!(as_name.member("ts").unwrap().ends());
        assert!(t.element(1).unwrap().ends());
        assert!(t.member("1").unwrap().ends());
        assert!(t.member("c").is_none());
        assert!(Ignored::new([]).is_leaf());
        // A leading zero or `-` never names an element.
        let ps: Vec<JsonPointer> = ["/01", "/-"].iter().map(|p| p.parse().unwrap()).collect();
        let t = Ignored::new(&ps);
        assert!(t.element(1).is_none());
        assert!(t.element(0).is_none());
        assert!(t.member("01").unwrap().ends());
    }
}
