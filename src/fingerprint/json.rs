//! The canonical form of a JSON body: what the JSON fingerprint hashes.
//!
//! One form per meaning, after RFC 8785 (JSON Canonicalization Scheme): no
//! insignificant whitespace, object members in a fixed order, strings
//! unescaped and written with the fewest escapes. Three choices differ from
//! RFC 8785; none changes which bodies are equal except the first, and
//! that one only so that two different requests never share a form:
//!
//! - **Numbers are exact decimals**, not IEEE doubles. `1`, `1.0`, `1e0`
//!   and `10e-1` are one number, and `-0` is `0`; but `9007199254740993`
//!   and `9007199254740992` stay two numbers (RFC 8785 rounds both to the
//!   same double), as do `0.1` and `0.10000000000000001`. A number is
//!   written as its significant digits, then as many zeros as its power of
//!   ten when that makes an integer of at most 21 digits, or else `e` and
//!   the power (`100`, `15e-1`, `1e22`).
//! - Members are ordered by the bytes of their names as written here
//!   (escaped and quoted) rather than by UTF-16 code units.
//! - A member's value longer than [`INLINE_MAX`] bytes (as written here)
//!   is replaced by a byte that never occurs in UTF-8 (`0xff`) and the
//!   value's SHA-256 digest. Members are put in order by moving their
//!   bytes, and an object's members move again each time an enclosing
//!   object is put in order: without this, an object nested 128 deep would
//!   move the same megabyte 128 times. With it, putting an object in order
//!   moves its member names and at most 65 bytes per member, however deep
//!   it sits.
//!
//! A body this cannot read is compared by its bytes: text that is not
//! JSON, an object with a member name twice (parsers disagree on which one
//! counts), nesting deeper than [`MAX_DEPTH`], a number whose exponent has
//! more than 15 digits (unless the number is zero), or an integer part of
//! more than 4 300 digits (the parser's bound).

use jiter::{Jiter, Peek};
use sha2::{Digest, Sha256};

use super::pointer::Ignored;

/// The deepest nesting of arrays and objects a JSON body is compared at.
pub const MAX_DEPTH: usize = 128;

/// The longest member value kept as it is written; a longer one is kept as
/// [`DIGEST`] and its SHA-256 digest.
const INLINE_MAX: usize = 64;

/// Marks a member value kept as its digest: a byte no UTF-8 text has.
const DIGEST: u8 = 0xff;

/// The canonical text of `body` without the values `ignored` names, or
/// `None` when the body is to be compared by its bytes.
pub(crate) fn canonical(body: &[u8], ignored: &Ignored) -> Option<Vec<u8>> {
    let mut walk = Walk {
        jiter: Jiter::new(body),
        out: Vec::with_capacity(body.len()),
        members: Vec::new(),
        scratch: Vec::new(),
    };
    let peek = walk.jiter.peek().ok()?;
    let root = (!ignored.is_leaf()).then_some(ignored);
    walk.value(peek, 0, root).ok()?;
    walk.jiter.finish().ok()?;
    Some(walk.out)
}

/// Why a body has no canonical form (it is then compared by its bytes).
#[derive(Debug)]
enum NotCanonical {
    /// Not JSON (RFC 8259), or not UTF-8.
    Invalid,
    /// Arrays and objects nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// One object with one member name twice.
    DuplicateMember,
    /// A number whose exponent has more than 15 digits.
    NumberOutOfRange,
}

impl From<jiter::JiterError> for NotCanonical {
    fn from(_: jiter::JiterError) -> Self {
        Self::Invalid
    }
}

/// One object member written to `out`: its name (escaped, with quotes) is
/// `out[start..name_end]`, and the member (name, colon, value) is
/// `out[start..end]` (the comma before it is not part of it).
#[derive(Clone, Copy)]
struct Member {
    start: usize,
    name_end: usize,
    end: usize,
}

struct Walk<'j> {
    jiter: Jiter<'j>,
    out: Vec<u8>,
    /// The members of the objects being written, innermost last.
    members: Vec<Member>,
    /// Where an object's members are put in order.
    scratch: Vec<u8>,
}

impl Walk<'_> {
    /// Writes the value `peek` starts, `depth` arrays and objects deep;
    /// `node` is where the ignored pointers stand at this value.
    fn value(
        &mut self,
        peek: Peek,
        depth: usize,
        node: Option<&Ignored>,
    ) -> Result<(), NotCanonical> {
        match peek {
            Peek::Null => {
                self.jiter.known_null()?;
                self.out.extend_from_slice(b"null");
            }
            Peek::True | Peek::False => {
                let b = self.jiter.known_bool(peek)?;
                self.out
                    .extend_from_slice(if b { b"true" } else { b"false" });
            }
            Peek::String => {
                let s = self.jiter.known_str()?;
                write_string(&mut self.out, s);
            }
            Peek::Array => self.array(depth, node)?,
            Peek::Object => self.object(depth, node)?,
            _ if peek.is_num() => {
                let text = self.jiter.known_number_bytes(peek)?;
                write_number(&mut self.out, text)?;
            }
            _ => return Err(NotCanonical::Invalid),
        }
        Ok(())
    }

    fn array(&mut self, depth: usize, node: Option<&Ignored>) -> Result<(), NotCanonical> {
        if depth >= MAX_DEPTH {
            return Err(NotCanonical::TooDeep);
        }
        self.out.push(b'[');
        let mut next = self.jiter.known_array()?;
        let mut index = 0usize;
        let mut first = true;
        while let Some(peek) = next {
            let child = node.and_then(|n| n.element(index));
            if child.is_some_and(Ignored::ends) {
                // Read (so a malformed value still falls back to bytes),
                // then dropped.
                let mark = self.out.len();
                self.value(peek, depth + 1, None)?;
                self.out.truncate(mark);
            } else {
                if !first {
                    self.out.push(b',');
                }
                first = false;
                self.value(peek, depth + 1, child.filter(|c| !c.is_leaf()))?;
            }
            index = index.saturating_add(1);
            next = self.jiter.array_step()?;
        }
        self.out.push(b']');
        Ok(())
    }

    fn object(&mut self, depth: usize, node: Option<&Ignored>) -> Result<(), NotCanonical> {
        if depth >= MAX_DEPTH {
            return Err(NotCanonical::TooDeep);
        }
        self.out.push(b'{');
        let body_start = self.out.len();
        let mark = self.members.len();
        let mut name = self.jiter.known_object()?;
        while let Some(n) = name {
            let child = node.and_then(|node| node.member(n));
            let before = self.out.len();
            if self.members.len() > mark {
                self.out.push(b',');
            }
            let start = self.out.len();
            write_string(&mut self.out, n);
            let name_end = self.out.len();
            self.out.push(b':');
            let peek = self.jiter.peek()?;
            if child.is_some_and(Ignored::ends) {
                // Read (so a malformed value still falls back to bytes),
                // then dropped with its name and comma.
                self.value(peek, depth + 1, None)?;
                self.out.truncate(before);
            } else {
                let value_start = self.out.len();
                self.value(peek, depth + 1, child.filter(|c| !c.is_leaf()))?;
                if self.out.len() - value_start > INLINE_MAX {
                    let digest = Sha256::digest(&self.out[value_start..]);
                    self.out.truncate(value_start);
                    self.out.push(DIGEST);
                    self.out.extend_from_slice(&digest);
                }
                let end = self.out.len();
                self.members.push(Member {
                    start,
                    name_end,
                    end,
                });
            }
            name = self.jiter.next_key()?;
        }
        self.order_members(body_start, mark)?;
        self.out.push(b'}');
        Ok(())
    }

    /// Puts the members written since `mark` (from `body_start` on,
    /// separated by commas) in name order; refuses a name that appears
    /// twice. Members already in order are left where they are.
    fn order_members(&mut self, body_start: usize, mark: usize) -> Result<(), NotCanonical> {
        let out = &self.out;
        let members = &mut self.members[mark..];
        let name = |m: &Member| &out[m.start..m.name_end];
        if members.windows(2).all(|w| name(&w[0]) < name(&w[1])) {
            self.members.truncate(mark);
            return Ok(());
        }
        members.sort_unstable_by(|a, b| name(a).cmp(name(b)));
        if members.windows(2).any(|w| name(&w[0]) == name(&w[1])) {
            return Err(NotCanonical::DuplicateMember);
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(&self.out[body_start..]);
        self.out.truncate(body_start);
        for (i, m) in self.members[mark..].iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            self.out
                .extend_from_slice(&self.scratch[m.start - body_start..m.end - body_start]);
        }
        self.members.truncate(mark);
        Ok(())
    }
}

/// Writes `s` as a JSON string with the fewest escapes (RFC 8785 §3.2.2.2):
/// `"` and `\` escaped, control characters as `\b`, `\t`, `\n`, `\f`, `\r`
/// or `\u00xx`, everything else as it is.
fn write_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            0x0c => b"\\f",
            b'\r' => b"\\r",
            0x00..=0x1f => {
                out.extend_from_slice(&bytes[run..i]);
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
                run = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[run..i]);
        out.extend_from_slice(escape);
        run = i + 1;
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
}

/// Writes the JSON number `text` as its exact decimal value: `-` for a
/// negative non-zero value, the significant digits (no leading or trailing
/// zeros), then as many zeros as the power of ten for an integer of up to
/// 21 digits, or else `e` and the power of ten. Zero is `0`.
fn write_number(out: &mut Vec<u8>, text: &[u8]) -> Result<(), NotCanonical> {
    let (negative, rest) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    let (int, rest) = split_digits(rest);
    let (frac, rest) = match rest.split_first() {
        Some((b'.', after)) => match split_digits(after) {
            ([], _) => return Err(NotCanonical::Invalid),
            split => split,
        },
        _ => (&rest[..0], rest),
    };
    let exponent = match rest.split_first() {
        None => Ok(0),
        Some((b'e' | b'E', exp)) => parse_exponent(exp),
        Some(_) => return Err(NotCanonical::Invalid),
    };
    if int.is_empty() || (int.len() > 1 && int[0] == b'0') {
        return Err(NotCanonical::Invalid);
    }
    let digits = || int.iter().chain(frac.iter());
    let total = int.len() + frac.len();
    let leading = digits().take_while(|&&d| d == b'0').count();
    if leading == total {
        // Zero, whatever its exponent (as long as it is one).
        return match exponent {
            Ok(_) | Err(NotCanonical::NumberOutOfRange) => {
                out.push(b'0');
                Ok(())
            }
            Err(e) => Err(e),
        };
    }
    let exponent = exponent?;
    let trailing = frac
        .iter()
        .rev()
        .chain(int.iter().rev())
        .take_while(|&&d| d == b'0')
        .count();
    let power = i64::try_from(trailing)
        .ok()
        .and_then(|t| exponent.checked_add(t))
        .and_then(|e| e.checked_sub(i64::try_from(frac.len()).ok()?))
        .ok_or(NotCanonical::NumberOutOfRange)?;
    if negative {
        out.push(b'-');
    }
    let significant = total - leading - trailing;
    out.extend(digits().skip(leading).take(significant));
    // Digits alone when the power is 0, an integer of up to 21 digits
    // written out (as RFC 8785 writes them); anything else with its power
    // of ten.
    match usize::try_from(power) {
        Ok(zeros) if zeros == 0 || significant.saturating_add(zeros) <= 21 => {
            out.extend(std::iter::repeat_n(b'0', zeros));
        }
        _ => {
            out.push(b'e');
            out.extend_from_slice(itoa::Buffer::new().format(power).as_bytes());
        }
    }
    Ok(())
}

/// The leading ASCII digits of `bytes`, and the rest.
fn split_digits(bytes: &[u8]) -> (&[u8], &[u8]) {
    let len = bytes
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(bytes.len());
    bytes.split_at(len)
}

/// An exponent's sign and digits, leading zeros allowed; more than 15
/// significant digits is out of range.
fn parse_exponent(exp: &[u8]) -> Result<i64, NotCanonical> {
    let (negative, digits) = match exp.split_first() {
        Some((b'-', d)) => (true, d),
        Some((b'+', d)) => (false, d),
        _ => (false, exp),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(NotCanonical::Invalid);
    }
    let significant = &digits[digits.iter().take_while(|&&d| d == b'0').count()..];
    if significant.len() > 15 {
        return Err(NotCanonical::NumberOutOfRange);
    }
    let value = significant
        .iter()
        .fold(0i64, |v, &d| v * 10 + i64::from(d - b'0'));
    Ok(if negative { -value } else { value })
}

#[cfg(test)]
mod tests;
