use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::*;
use crate::fingerprint::JsonPointer;

fn canon(text: &str) -> Option<Vec<u8>> {
    canonical(text.as_bytes(), &Ignored::default())
}

fn canon_ignoring(text: &str, pointers: &[&str]) -> Option<Vec<u8>> {
    let ps: Vec<JsonPointer> = pointers.iter().map(|p| p.parse().unwrap()).collect();
    canonical(text.as_bytes(), &Ignored::new(&ps))
}

/// The canonical form of `text` as text (no member value in it is long
/// enough to be kept as a digest).
fn canon_str(text: &str) -> String {
    String::from_utf8(canon(text).expect("canonical")).expect("no digest")
}

fn ignoring_str(text: &str, pointers: &[&str]) -> String {
    String::from_utf8(canon_ignoring(text, pointers).expect("canonical")).expect("no digest")
}

#[test]
fn member_order_whitespace_and_escapes_do_not_count() {
    let a = canon_str(r#"{"b":[1,2,{"y":null,"x":true}],"a":"é"}"#);
    let b = canon_str(
        " {\n\t\"a\" : \"\\u00e9\" ,\r\n \"b\" : [ 1 , 2 , { \"x\" : true , \"y\" : null } ] } ",
    );
    assert_eq!(a, b);
    assert_eq!(a, r#"{"a":"é","b":[1,2,{"x":true,"y":null}]}"#);
    // Every escape of one string is one string.
    assert_eq!(canon(r#""\/\u0041\"\\""#), canon(r#""/A\"\\""#));
    assert_eq!(canon(r#""\ud83d\ude00""#), canon("\"😀\""));
    // Names are unescaped before they are ordered and compared.
    assert_eq!(canon(r#"{"\u0062":1,"a":2}"#), canon(r#"{"a":2,"b":1}"#));
}

#[test]
fn strings_are_written_with_the_fewest_escapes() {
    assert_eq!(
        canon_str(r#""a\u0008\t\n\u000c\r\u0001\u001f\"\\é""#),
        "\"a\\b\\t\\n\\f\\r\\u0001\\u001f\\\"\\\\é\""
    );
    assert_eq!(canon_str(r#""\u007f\u2028""#), "\"\u{7f}\u{2028}\"");
}

#[test]
fn values_that_differ_stay_apart() {
    let base = canon(r#"{"amount":1000,"items":["a","b"]}"#);
    for other in [
        r#"{"amount":1001,"items":["a","b"]}"#,
        r#"{"amount":1000,"items":["b","a"]}"#,
        r#"{"amount":1000,"items":["a","b"],"extra":null}"#,
        r#"{"amount":"1000","items":["a","b"]}"#,
        r#"{"amount":1000,"items":["a","b",null]}"#,
        r#"{"amount":1000}"#,
        r#"[{"amount":1000,"items":["a","b"]}]"#,
    ] {
        assert_ne!(base, canon(other), "{other}");
    }
    assert_ne!(canon("true"), canon("false"));
    assert_ne!(canon("null"), canon("\"null\""));
    assert_ne!(canon("[]"), canon("{}"));
    assert_ne!(canon(r#"["a,b"]"#), canon(r#"["a","b"]"#));
    assert_ne!(
        canon(r#"{"a":"b","c":"d"}"#),
        canon(r#"{"a":"b\",\"c\":\"d"}"#)
    );
}

#[test]
fn numbers_are_equal_when_their_exact_values_are() {
    let same = [
        &[
            "1",
            "1.0",
            "1e0",
            "1E0",
            "10e-1",
            "0.1e1",
            "1.000e+000",
            "100e-2",
        ][..],
        &["0", "-0", "0.0", "-0.0", "0e5", "-0E-7", "0.000"],
        &["-12.5", "-125e-1", "-1.25E1", "-0.125e2"],
        &["100", "1e2", "1E+2", "10e1", "100.00"],
        &["1e400", "10e399", "0.1e401"],
        &["1e-400", "0.1e-399"],
        &["12345678901234567890123", "1.2345678901234567890123e22"],
    ];
    for group in same {
        let first = canon_str(group[0]);
        for n in group {
            assert_eq!(canon_str(n), first, "{n} vs {}", group[0]);
        }
    }
    assert_eq!(canon_str("100"), "100");
    assert_eq!(canon_str("1e20"), "100000000000000000000");
    assert_eq!(canon_str("123456789012345678901"), "123456789012345678901");
    assert_eq!(canon_str("1e21"), "1e21");
    assert_eq!(canon_str("1e22"), "1e22");
    assert_eq!(
        canon_str("1234567890123456789012"),
        "1234567890123456789012"
    );
    assert_eq!(
        canon_str("12345678901234567890120"),
        "1234567890123456789012e1"
    );
    assert_eq!(canon_str("-0.0"), "0");
    assert_eq!(canon_str("-12.5"), "-125e-1");
    assert_eq!(canon_str("7"), "7");
    let apart = [
        ("9007199254740993", "9007199254740992"),
        ("0.1", "0.10000000000000001"),
        ("1", "-1"),
        ("1", "10"),
        ("1e2", "1e-2"),
        ("123", "1230"),
        ("18446744073709551616", "18446744073709551615"),
    ];
    for (a, b) in apart {
        assert_ne!(canon(a), canon(b), "{a} vs {b}");
    }
}

#[test]
fn what_is_not_json_has_no_canonical_form() {
    for bad in [
        "",
        " ",
        "{",
        "[1,]",
        "{\"a\":1,}",
        "{'a':1}",
        "01",
        "1.",
        ".5",
        "1e",
        "+1",
        "NaN",
        "Infinity",
        "-Infinity",
        "[1] [2]",
        "{\"a\" 1}",
        "\"\\ud800\"",
        "\"\\x\"",
        "nul",
        "tru",
        "// c\n1",
        "\"a\nb\"",
    ] {
        assert_eq!(canon(bad), None, "{bad:?}");
    }
    assert_eq!(canonical(b"\"\xff\"", &Ignored::default()), None);
    assert_eq!(
        canonical(b"\xef\xbb\xbf{}", &Ignored::default()),
        None,
        "a BOM"
    );
}

#[test]
fn a_member_named_twice_falls_back_to_bytes() {
    assert_eq!(canon(r#"{"a":1,"a":2}"#), None);
    assert_eq!(canon(r#"{"a":1,"b":{"c":1,"\u0063":1}}"#), None);
    // The same name in two objects is fine.
    assert!(canon(r#"{"a":{"a":1},"b":{"a":1}}"#).is_some());
}

#[test]
fn long_values_are_kept_as_digests_and_still_compared() {
    let long = "x".repeat(INLINE_MAX + 1);
    let a = format!(r#"{{"b":"{long}","a":1}}"#);
    let c = canon(&a).unwrap();
    assert_eq!(c.iter().filter(|&&b| b == DIGEST).count(), 1);
    assert_eq!(c.len(), r#"{"a":1,"b":"#.len() + 1 + 32 + 1);
    // The same value spelled otherwise, the same digest.
    let spelled = format!(
        r#"{{ "a" : 1.0 , "b" : "{}" }}"#,
        long.replace('x', "\\u0078")
    );
    assert_eq!(canon(&spelled), canon(&a));
    // One byte changed deep inside: another form.
    let changed = format!(r#"{{"b":"{}y","a":1}}"#, &long[1..]);
    assert_ne!(canon(&changed), canon(&a));
    // A value of exactly the bound stays as it is written.
    let short = "x".repeat(INLINE_MAX - 2);
    assert!(
        !canon(&format!(r#"{{"a":"{short}"}}"#))
            .unwrap()
            .contains(&DIGEST)
    );
    // Nested objects, each put in order: the digest of the inner value is
    // what moves, not the value.
    let nested = format!(
        "{}\"{}\"{}",
        r#"{"z":0,"a":"#.repeat(100),
        "y".repeat(100_000),
        "}".repeat(100)
    );
    let form = canon(&nested).unwrap();
    assert!(form.len() < 100 * 40, "{} bytes", form.len());
}

#[test]
fn nesting_is_bounded() {
    let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    assert!(canon(&nest(MAX_DEPTH)).is_some());
    assert_eq!(canon(&nest(MAX_DEPTH + 1)), None);
    let objects = |n: usize| format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n));
    assert!(canon(&objects(MAX_DEPTH)).is_some());
    assert_eq!(canon(&objects(MAX_DEPTH + 1)), None);
    // 10 000 deep, and a million: no stack overflow, just bytes.
    assert_eq!(canon(&nest(10_000)), None);
    assert_eq!(canon(&"[".repeat(1_000_000)), None);
    // An ignored value is bounded too.
    let deep_ignored = format!("{{\"t\":{}}}", nest(MAX_DEPTH + 5));
    assert_eq!(canon_ignoring(&deep_ignored, &["/t"]), None);
}

#[test]
fn exponents_beyond_15_digits_fall_back() {
    assert!(canon("1e999999999999999").is_some());
    assert_eq!(canon("1e1000000000000000"), None);
    // Zero is zero, whatever its exponent; a malformed one is still refused.
    assert_eq!(canon_str("0e1000000000000000"), "0");
    assert_eq!(canon_str("-0.0E-99999999999999999999"), "0");
    assert_eq!(canon("0e"), None);
    // Leading zeros do not count.
    assert_eq!(canon("1e0000000000000000000002"), canon("100"));
}

#[test]
fn ignored_pointers_leave_values_out() {
    let a = r#"{"amount":10,"metadata":{"sent_at":"10:00","note":"x"},"items":[{"ts":1,"id":"a"},{"ts":2,"id":"b"}]}"#;
    let b = r#"{"amount":10,"metadata":{"sent_at":"10:05","note":"x"},"items":[{"ts":9,"id":"a"},{"ts":2,"id":"b"}]}"#;
    assert_ne!(canon(a), canon(b));
    let ps = ["/metadata/sent_at", "/items/0/ts"];
    assert_eq!(canon_ignoring(a, &ps), canon_ignoring(b, &ps));
    assert_eq!(
        ignoring_str(a, &ps),
        r#"{"amount":10,"items":[{"id":"a"},{"id":"b","ts":2}],"metadata":{"note":"x"}}"#
    );
    // An ignored member compares as absent.
    let absent = r#"{"amount":10,"metadata":{"note":"x"},"items":[{"id":"a"},{"ts":2,"id":"b"}]}"#;
    assert_eq!(canon_ignoring(a, &ps), canon_ignoring(absent, &ps));
    // What is not ignored still counts.
    let changed = b.replace("\"note\":\"x\"", "\"note\":\"y\"");
    assert_ne!(canon_ignoring(a, &ps), canon_ignoring(&changed, &ps));
    // An element is removed from its array: first, middle, every one.
    assert_eq!(ignoring_str("[1,2,3]", &["/1"]), "[1,3]");
    assert_eq!(ignoring_str("[1,2,3]", &["/0"]), "[2,3]");
    assert_eq!(ignoring_str("[1,2,3]", &["/0", "/1", "/2"]), "[]");
    assert_eq!(ignoring_str(r#"{"a":1}"#, &["/a"]), "{}");
    assert_eq!(
        ignoring_str(r#"{"a":1,"b":2,"c":3}"#, &["/a", "/c"]),
        r#"{"b":2}"#
    );
    assert_eq!(ignoring_str("[1,2,3]", &["/3"]), "[1,2,3]");
    // `0` names a member too; `01` and `-` name no element.
    assert_eq!(ignoring_str(r#"{"0":1,"1":2}"#, &["/0"]), r#"{"1":2}"#);
    assert_eq!(ignoring_str("[1,2]", &["/01", "/-"]), "[1,2]");
    // Escaped tokens name members with `/` and `~` in their names.
    assert_eq!(
        ignoring_str(r#"{"a/b":1,"c~d":2,"e":3}"#, &["/a~1b", "/c~0d"]),
        r#"{"e":3}"#
    );
    // A pointer through a scalar, or to nothing, changes nothing.
    assert_eq!(ignoring_str(r#"{"a":1}"#, &["/a/b", "/zz"]), r#"{"a":1}"#);
    // An ignored value must still be JSON.
    assert_eq!(canon_ignoring(r#"{"a":[1,}"#, &["/a"]), None);
    // A name ignored twice over is still left out.
    assert_eq!(
        ignoring_str(r#"{"a":1,"a":2,"b":0}"#, &["/a"]),
        r#"{"b":0}"#
    );
}

/// A JSON value whose numbers are kept as an exact decimal (digits without
/// trailing zeros, a power of ten), so `==` is "the same meaning".
#[derive(Debug, Clone, PartialEq)]
enum J {
    Null,
    Bool(bool),
    Num {
        negative: bool,
        digits: u64,
        power: i32,
    },
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

fn number() -> impl Strategy<Value = J> {
    (any::<bool>(), any::<u64>(), -30i32..30).prop_map(|(negative, mut digits, mut power)| {
        if digits == 0 {
            return J::Num {
                negative: false,
                digits: 0,
                power: 0,
            };
        }
        while digits % 10 == 0 {
            digits /= 10;
            power += 1;
        }
        J::Num {
            negative,
            digits,
            power,
        }
    })
}

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{0,6}",
        any::<String>().prop_map(|s| s.chars().take(8).collect()),
        prop::collection::vec(
            prop_oneof![
                Just('"'),
                Just('\\'),
                Just('\u{1}'),
                Just('\n'),
                Just('é'),
                Just('😀'),
                Just('/')
            ],
            0..5
        )
        .prop_map(|v| v.into_iter().collect()),
    ]
}

fn value() -> impl Strategy<Value = J> {
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        number(),
        string().prop_map(J::Str),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(J::Arr),
            prop::collection::btree_map(string(), inner, 0..6)
                .prop_map(|m| J::Obj(m.into_iter().collect())),
        ]
    })
}

/// Changes one thing in `v`, at the node `path` leads to (each step an
/// index into the children there, modulo their number).
fn mutate(v: &mut J, path: &[usize]) {
    match (v, path.split_first()) {
        (J::Arr(items), Some((&i, rest))) if !items.is_empty() => {
            let n = items.len();
            mutate(&mut items[i % n], rest);
        }
        (J::Obj(members), Some((&i, rest))) if !members.is_empty() => {
            let n = members.len();
            mutate(&mut members[i % n].1, rest);
        }
        (v, _) => match v {
            J::Null => *v = J::Bool(false),
            J::Bool(b) => *b = !*b,
            J::Num {
                negative,
                digits,
                power,
            } => {
                if *digits == 0 {
                    *digits = 1;
                } else if *digits % 10 == 9 || *digits == u64::MAX {
                    *negative = !*negative;
                } else {
                    *digits += 1;
                }
                let _ = power;
            }
            J::Str(s) => s.push('x'),
            J::Arr(items) => items.push(J::Null),
            J::Obj(members) => {
                // A name no member has: longer than all of them.
                let name = members.iter().map(|(n, _)| n.len()).max().unwrap_or(0) + 1;
                members.push(("n".repeat(name), J::Null));
                members.sort_by(|a, b| a.0.cmp(&b.0));
            }
        },
    }
}

/// `v` and `w` spelled one after the other, with spellings drawn from
/// `seed`.
fn spelled_both(v: &J, w: &J, seed: u64) -> (String, String) {
    let (mut a, mut b) = (String::new(), String::new());
    let mut rng = SmallRng::seed_from_u64(seed);
    spell(v, &mut rng, &mut a);
    spell(w, &mut rng, &mut b);
    (a, b)
}

/// Writes `v` as one of its many JSON spellings, chosen by `rng`.
fn spell(v: &J, rng: &mut SmallRng, out: &mut String) {
    let ws = |rng: &mut SmallRng, out: &mut String| {
        for _ in 0..rng.random_range(0..3) {
            out.push([' ', '\t', '\n', '\r'][rng.random_range(0..4)]);
        }
    };
    ws(rng, out);
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Num {
            negative,
            digits,
            power,
        } => spell_number(*negative, *digits, *power, rng, out),
        J::Str(s) => spell_string(s, rng, out),
        J::Arr(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                spell(item, rng, out);
            }
            ws(rng, out);
            out.push(']');
        }
        J::Obj(members) => {
            let mut members: Vec<&(String, J)> = members.iter().collect();
            members.shuffle(rng);
            out.push('{');
            for (i, (name, value)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                ws(rng, out);
                spell_string(name, rng, out);
                ws(rng, out);
                out.push(':');
                spell(value, rng, out);
            }
            ws(rng, out);
            out.push('}');
        }
    }
    ws(rng, out);
}

fn spell_string(s: &str, rng: &mut SmallRng, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        let must = c == '"' || c == '\\' || (c as u32) < 0x20;
        match (must, rng.random_range(0..3)) {
            (false, 0 | 1) => out.push(c),
            _ => match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' if rng.random() => out.push_str("\\n"),
                '/' if rng.random() => out.push_str("\\/"),
                _ => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        if rng.random() {
                            out.push_str(&format!("\\u{u:04x}"));
                        } else {
                            out.push_str(&format!("\\u{u:04X}"));
                        }
                    }
                }
            },
        }
    }
    out.push('"');
}

fn spell_number(negative: bool, digits: u64, power: i32, rng: &mut SmallRng, out: &mut String) {
    if digits == 0 {
        out.push_str(["0", "-0", "0.0", "-0.00", "0e3", "0E-2"][rng.random_range(0..6)]);
        return;
    }
    if negative {
        out.push('-');
    }
    // Extra trailing zeros on the digits, taken back by the exponent.
    let zeros = rng.random_range(0..3);
    let mut d = digits.to_string();
    d.push_str(&"0".repeat(zeros));
    let mut exp = i64::from(power) - zeros as i64;
    // Move the decimal point left by `shift` places.
    let shift = rng.random_range(0..=d.len());
    if shift > 0 {
        let (int, frac) = d.split_at(d.len() - shift);
        let int = if int.is_empty() { "0" } else { int };
        out.push_str(int);
        out.push('.');
        out.push_str(frac);
        exp += shift as i64;
    } else {
        out.push_str(&d);
    }
    if exp != 0 || rng.random() {
        out.push(if rng.random() { 'e' } else { 'E' });
        match (exp < 0, rng.random_range(0..2)) {
            (true, _) => out.push('-'),
            (false, 0) => out.push('+'),
            _ => {}
        }
        out.push_str(&"0".repeat(rng.random_range(0..3)));
        out.push_str(&exp.unsigned_abs().to_string());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_spelling_of_a_value_has_one_canonical_form(v in value(), s1: u64, s2: u64) {
        let (mut a, mut b) = (String::new(), String::new());
        spell(&v, &mut SmallRng::seed_from_u64(s1), &mut a);
        spell(&v, &mut SmallRng::seed_from_u64(s2), &mut b);
        let ca = canon(&a);
        prop_assert!(ca.is_some(), "not read: {}", a);
        prop_assert_eq!(&ca, &canon(&b), "{} vs {}", a, b);
        // Without digests, the canonical form is JSON, and its own
        // canonical form.
        if let Some(Ok(c)) = ca.map(String::from_utf8) {
            let again = canon(&c);
            prop_assert_eq!(again.as_deref(), Some(c.as_bytes()));
            prop_assert!(serde_json::from_str::<serde_json::Value>(&c).is_ok());
        }
    }

    #[test]
    fn different_values_have_different_forms(v in value(), w in value(), seed: u64) {
        prop_assume!(v != w);
        let (a, b) = spelled_both(&v, &w, seed);
        prop_assert_ne!(canon(&a), canon(&b), "{} vs {}", a, b);
    }

    #[test]
    fn a_small_change_changes_the_form(v in value(), path in prop::collection::vec(any::<usize>(), 0..6), seed: u64) {
        let mut w = v.clone();
        mutate(&mut w, &path);
        prop_assert_ne!(&v, &w);
        let (a, b) = spelled_both(&v, &w, seed);
        prop_assert_ne!(canon(&a), canon(&b), "{} vs {}", a, b);
    }

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = canonical(&body, &Ignored::default());
    }
}
