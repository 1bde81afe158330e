//! What the tool prints: one JSON object per key, or a table a person
//! reads.

use std::io::Write;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use http::HeaderMap;
use serde_json::{Value, json};
use tower_idempotency::store::admin::{AnswerKind, Inspection};

/// `at` in RFC 3339 (UTC), or `None` for a time it cannot write (past the
/// year 9999: a damaged entry's).
pub(crate) fn rfc3339(at: SystemTime, micros: bool) -> Option<String> {
    use std::fmt::Write as _;
    let mut text = String::new();
    let written = if micros {
        write!(text, "{}", humantime::format_rfc3339_micros(at))
    } else {
        write!(text, "{}", humantime::format_rfc3339_seconds(at))
    };
    written.ok().map(|()| text)
}

pub(crate) fn print_line(out: &mut impl Write, line: &str) {
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = writeln!(out, "{line}");
}

/// One key as a JSON object: the fields other programs rely on.
pub(crate) fn describe(seen: &Inspection, now: SystemTime) -> Value {
    let answer = seen.answer.as_ref();
    json!({
        "key_hash": seen.key_hash,
        "state": seen.state.name(),
        "fence": seen.fence,
        "claimed_at": seen.claimed_at.and_then(|t| rfc3339(t, true)),
        "age_seconds": seen.age(now).map(|a| a.as_secs_f64()),
        "method": seen.method,
        "path": seen.path,
        "completed_at": seen.completed_at.and_then(|t| rfc3339(t, true)),
        "lease_left_ms": seen.lease_left.map(millis),
        "expires_in_ms": seen.expires_in.map(millis),
        "status": answer.map(|a| a.status.as_u16()),
        "answer": answer.map(|a| kind_name(a.kind)),
        "headers": answer.map(|a| headers_json(&a.headers)),
        "body_bytes": answer.map(|a| a.body.len()),
        "problem": seen.problem,
    })
}

pub(crate) fn put_body(object: &mut Value, body: &[u8]) {
    if let Value::Object(map) = object {
        match std::str::from_utf8(body) {
            Ok(text) => map.insert("body".into(), Value::from(text)),
            Err(_) => map.insert(
                "body_base64".into(),
                Value::from(base64::engine::general_purpose::STANDARD.encode(body)),
            ),
        };
    }
}

pub(crate) fn kind_name(kind: AnswerKind) -> &'static str {
    match kind {
        AnswerKind::Response => "response",
        AnswerKind::NotReplayable => "not_replayable",
        AnswerKind::OutcomeUnknown => "outcome_unknown",
        _ => "other",
    }
}

pub(crate) fn headers_json(headers: &HeaderMap) -> Value {
    Value::Array(
        headers
            .iter()
            .map(|(name, value)| json!([name.as_str(), String::from_utf8_lossy(value.as_bytes())]))
            .collect(),
    )
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A duration for a person: `42s`, `3m12s`, `5h3m`, `2d4h`.
pub(crate) fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

pub(crate) fn print_table(out: &mut impl Write, seen: &Inspection, now: SystemTime) {
    let mut row = |name: &str, value: String| print_line(out, &format!("{name:<12}{value}"));
    row("key_hash", seen.key_hash.clone());
    row("state", seen.state.name().to_owned());
    if let Some(fence) = seen.fence {
        row("fence", fence.to_string());
    }
    let claimed = seen.claimed_at.and_then(|t| rfc3339(t, false));
    if let (Some(at), Some(age)) = (claimed, seen.age(now)) {
        row("claimed", format!("{at} ({} ago)", short_duration(age)));
    }
    if let Some(method) = &seen.method {
        row("method", method.clone());
    }
    if let Some(path) = &seen.path {
        row("path", path.clone());
    }
    if let Some(at) = seen.completed_at.and_then(|t| rfc3339(t, false)) {
        row("completed", at);
    }
    if let Some(left) = seen.lease_left {
        row("lease left", short_duration(left));
    }
    if let Some(left) = seen.expires_in {
        row("expires in", short_duration(left));
    }
    if let Some(answer) = &seen.answer {
        row(
            "status",
            format!("{} ({})", answer.status, kind_name(answer.kind)),
        );
        for (name, value) in &answer.headers {
            row(
                "header",
                format!("{name}: {}", String::from_utf8_lossy(value.as_bytes())),
            );
        }
        row("body", format!("{} bytes", answer.body.len()));
    }
    if let Some(problem) = &seen.problem {
        row("problem", problem.clone());
    }
}
