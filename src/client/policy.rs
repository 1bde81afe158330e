//! [`RetryPolicy`]: when a keyed request is sent again, and after how long.
//!
//! The decisions are pure functions of what an attempt returned, so the
//! HTTP layer (and, later, other clients) share them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method, StatusCode, header};
use tower::retry::budget::{Budget, TpsBudget};

use crate::grpc::{self, is_grpc};
use crate::problem::ProblemKind;
use crate::time::Backoff;

/// The default number of attempts, the first included: 5.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// The default bound on a logical request, every attempt and wait
/// included: 30 s.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);
/// The default first backoff: 100 ms (before jitter).
pub const DEFAULT_BASE: Duration = Duration::from_millis(100);
/// The default growth of the backoff per retry: ×2.
pub const DEFAULT_FACTOR: f64 = 2.0;
/// The default longest backoff: 10 s (before jitter).
pub const DEFAULT_CAP: Duration = Duration::from_secs(10);
/// The default longest wait a `Retry-After` can ask for: 60 s.
pub const DEFAULT_RETRY_AFTER_CAP: Duration = Duration::from_secs(60);
/// The default largest request body kept to be sent again: 1 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

/// The largest problem document read to judge a refusal: 64 KiB. A longer
/// one is final (its type cannot be known) and returned as it came.
pub(crate) const PROBLEM_LIMIT: usize = 64 * 1024;

/// When and how a keyed request is retried. Built with its setters from
/// [`RetryPolicy::default`]; shared (with its budget) by every clone of the
/// service it configures.
///
/// What is retried:
///
/// | outcome | retried? |
/// |---|---|
/// | the inner service failed (connection refused or reset, a timeout layer gave up, the connection closed before the answer) | yes |
/// | 409 with the `InFlight` problem type (the first attempt is still running) | yes, after `Retry-After` when given |
/// | 429, 502, 503, 504 (with any problem type but `OutcomeUnknown`, or none) | yes, after `Retry-After` when given |
/// | the `OutcomeUnknown` problem type, whatever the status (the sidecar answers it with 502 or 504) | never: the request executed |
/// | 409 `KeyMismatch`, `NotReplayable`, any other 4xx | never |
/// | a problem document (409, 429, 502, 503, 504) longer than 64 KiB | never: its type cannot be read |
/// | any other status (2xx, 3xx, 500, 501, …) | never: it is the answer |
/// | gRPC (HTTP 200, `application/grpc`): `grpc-status` UNAVAILABLE, ABORTED (in flight), RESOURCE_EXHAUSTED in a Trailers-Only answer | yes, after `grpc-retry-pushback-ms` when given (a malformed or negative one: never) |
/// | any other gRPC status | never |
///
/// The `type` of a problem document (`application/problem+json`) answered
/// with 409, 429, 502, 503 or 504 is read (up to 64 KiB): it overrules the
/// status. The response is returned with its whole body all the same.
///
/// Retries happen only for the allowed methods (by default POST and
/// PATCH, which the server layer guards, and the idempotent GET, HEAD,
/// OPTIONS, PUT, DELETE), only when the body could be kept (at most
/// [`body_limit`](Self::body_limit) bytes), within
/// [`max_attempts`](Self::max_attempts), the [`deadline`](Self::deadline)
/// and the shared retry budget.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub(crate) max_attempts: u32,
    pub(crate) deadline: Duration,
    pub(crate) base: Duration,
    pub(crate) factor: f64,
    pub(crate) cap: Duration,
    pub(crate) jitter: bool,
    pub(crate) retry_after_cap: Duration,
    pub(crate) body_limit: usize,
    pub(crate) methods: Vec<Method>,
    pub(crate) budget: Arc<TpsBudget>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            deadline: DEFAULT_DEADLINE,
            base: DEFAULT_BASE,
            factor: DEFAULT_FACTOR,
            cap: DEFAULT_CAP,
            jitter: true,
            retry_after_cap: DEFAULT_RETRY_AFTER_CAP,
            body_limit: DEFAULT_BODY_LIMIT,
            methods: vec![
                Method::POST,
                Method::PATCH,
                Method::GET,
                Method::HEAD,
                Method::OPTIONS,
                Method::PUT,
                Method::DELETE,
            ],
            budget: Arc::new(default_budget()),
        }
    }
}

/// Retries may add 20 % to the requests of the last 10 s, and at least 10
/// a second are always allowed.
fn default_budget() -> TpsBudget {
    TpsBudget::new(Duration::from_secs(10), 10, 0.2)
}

impl RetryPolicy {
    /// How many attempts in all, the first included (default 5, at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The bound on the whole logical request (default 30 s): no attempt
    /// starts after it, and no wait runs past it.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The backoff before retry `n` is a random duration between zero and
    /// `min(cap, base × factor^(n−1))` (full jitter). Defaults: 100 ms, ×2,
    /// 10 s. A factor below 1 is taken as 1.
    pub fn backoff(mut self, base: Duration, factor: f64, cap: Duration) -> Self {
        self.base = base;
        self.factor = if factor.is_finite() {
            factor.max(1.0)
        } else {
            DEFAULT_FACTOR
        };
        self.cap = cap;
        self
    }

    /// Whether the backoff is jittered (default: full jitter, a random
    /// duration from zero to the backoff's ceiling). Without jitter every
    /// client waits the ceiling itself, in step with every other client
    /// that failed at the same moment: keep it on in production; off, the
    /// waits are exact (for tests and demonstrations).
    pub fn full_jitter(mut self, on: bool) -> Self {
        self.jitter = on;
        self
    }

    /// The longest wait a `Retry-After` header is obeyed for (default 60 s);
    /// a longer one is cut to it.
    pub fn retry_after_cap(mut self, cap: Duration) -> Self {
        self.retry_after_cap = cap;
        self
    }

    /// The largest request body kept to be sent again (default 1 MiB). A
    /// larger body, or one that does not end within it, is sent once and
    /// never retried. A body that fails before its end (within the limit)
    /// is not sent at all: the call fails with
    /// [`RequestBodyFailed`](super::RequestBodyFailed).
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// The methods that are retried (default POST, PATCH, GET, HEAD,
    /// OPTIONS, PUT, DELETE). Others are sent once.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// The retry budget shared by every clone of the service: retries may
    /// add `retry_percent` (0 to 1000 %, as a fraction: 0.2 is 20 %) to the
    /// requests of the last `ttl` (1 to 60 s), and `min_per_sec` retries a
    /// second are always allowed. Default: 20 % over 10 s, at least 10 a
    /// second. Out-of-range values are brought into range (a NaN percent is
    /// the default 20 %).
    pub fn budget(mut self, ttl: Duration, min_per_sec: u32, retry_percent: f32) -> Self {
        let ttl = ttl.clamp(Duration::from_secs(1), Duration::from_secs(60));
        let percent = if retry_percent.is_finite() {
            retry_percent.clamp(0.0, 1000.0)
        } else {
            0.2
        };
        // The budget refuses a minimum of `i32::MAX` or more a second.
        let min_per_sec = min_per_sec.min(i32::MAX as u32 - 1);
        self.budget = Arc::new(TpsBudget::new(ttl, min_per_sec, percent));
        self
    }

    /// Whether requests with `method` are retried.
    pub(crate) fn allows(&self, method: &Method) -> bool {
        self.methods.contains(method)
    }

    /// The backoff before retry `retry` (1 for the first retry), with full
    /// jitter drawn by `unit` (a number in `[0, 1)`).
    pub(crate) fn backoff_for(&self, retry: u32, unit: f64) -> Duration {
        let ceiling = Backoff::new(self.base, self.factor, self.cap).before(retry);
        if self.jitter {
            // Not `Duration::mul_f64`, which panics when the product does
            // not fit: `Duration::MAX` in seconds rounds up as an `f64`.
            Duration::try_from_secs_f64(ceiling.as_secs_f64() * unit.clamp(0.0, 1.0))
                .map_or(ceiling, |jittered| jittered.min(ceiling))
        } else {
            ceiling
        }
    }

    /// The wait before retry `retry`: what `Retry-After` asked for (cut to
    /// its cap), or the backoff.
    pub(crate) fn wait(&self, retry: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        match retry_after {
            Some(asked) => asked.min(self.retry_after_cap),
            None => self.backoff_for(retry, unit),
        }
    }

    /// Counts a logical request into the budget.
    pub(crate) fn deposit(&self) {
        self.budget.deposit();
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub(crate) fn withdraw(&self) -> bool {
        self.budget.withdraw()
    }
}

/// What an answer means for the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The answer is final: return it.
    Final,
    /// Send the request again, after this long if the server said.
    Retry(Option<Duration>),
    /// A refusal whose body must be read to know (its problem type).
    ReadProblem,
}

/// What a response's status and headers say; `now` reads `Retry-After`
/// dates.
pub(crate) fn judge(status: StatusCode, headers: &HeaderMap, now: SystemTime) -> Verdict {
    if status == StatusCode::OK && is_grpc(headers) {
        return judge_grpc(headers);
    }
    // A refusal's problem type overrules its status: the sidecar answers
    // an outcome unknown with 502 or 504, and it must never be retried.
    if is_refusal(status) && is_problem(headers) {
        return Verdict::ReadProblem;
    }
    by_status(status, headers, now)
}

/// The statuses whose problem document is read: 409, 429, 502, 503, 504.
fn is_refusal(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::CONFLICT
            | StatusCode::TOO_MANY_REQUESTS
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
    )
}

/// What the status alone says: 429, 502, 503 and 504 are retried.
fn by_status(status: StatusCode, headers: &HeaderMap, now: SystemTime) -> Verdict {
    match status {
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => Verdict::Retry(retry_after(headers, now)),
        _ => Verdict::Final,
    }
}

/// A gRPC answer, by the `grpc-status` of a Trailers-Only response (the form
/// every refusal and error without messages takes); a status that comes in
/// trailers after messages is final. `grpc-retry-pushback-ms` sets the
/// wait, and a malformed or negative one means "do not retry" (gRPC's
/// retry design).
fn judge_grpc(headers: &HeaderMap) -> Verdict {
    // Worth retrying with the same key: UNAVAILABLE, ABORTED (the server
    // layer's "in flight"), RESOURCE_EXHAUSTED.
    let retryable = grpc::status_in(headers).is_some_and(|status| {
        matches!(
            status.0,
            grpc::code::UNAVAILABLE | grpc::code::ABORTED | grpc::code::RESOURCE_EXHAUSTED
        )
    });
    if !retryable {
        return Verdict::Final;
    }
    match headers.get("grpc-retry-pushback-ms") {
        None => Verdict::Retry(None),
        Some(value) => match value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            Some(ms) => Verdict::Retry(Some(Duration::from_millis(ms))),
            None => Verdict::Final,
        },
    }
}

/// What a refusal's problem document (`body`, whole) says: an outcome
/// unknown is final and an in-flight refusal retried, whatever the status;
/// any other type leaves the verdict to the status.
pub(crate) fn judge_problem(
    status: StatusCode,
    body: &[u8],
    headers: &HeaderMap,
    now: SystemTime,
) -> Verdict {
    // First: whatever else the document might seem to say, a request that
    // executed with an unknown outcome is never sent again.
    if problem_type_is(body, ProblemKind::OutcomeUnknown) {
        Verdict::Final
    } else if problem_type_is(body, ProblemKind::InFlight) {
        Verdict::Retry(retry_after(headers, now))
    } else {
        by_status(status, headers, now)
    }
}

fn is_problem(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/problem+json"))
}

/// Whether the document's `type` is `kind`'s (its URI appears as the
/// `type` member's value).
fn problem_type_is(body: &[u8], kind: ProblemKind) -> bool {
    let quoted = format!("\"{}\"", kind.type_uri());
    let needle = quoted.as_bytes();
    body.windows(needle.len()).any(|w| w == needle)
}

/// `Retry-After`, as seconds or an HTTP date (past dates are zero).
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn the_backoff_grows_by_its_factor_up_to_its_cap_with_full_jitter() {
        let policy =
            RetryPolicy::default().backoff(Duration::from_millis(100), 2.0, Duration::from_secs(1));
        // The top of the jitter range: base × factor^(n−1), capped.
        let top = |n| policy.backoff_for(n, 1.0);
        assert_eq!(top(1), Duration::from_millis(100));
        assert_eq!(top(2), Duration::from_millis(200));
        assert_eq!(top(3), Duration::from_millis(400));
        assert_eq!(top(4), Duration::from_millis(800));
        assert_eq!(top(5), Duration::from_secs(1));
        assert_eq!(top(u32::MAX), Duration::from_secs(1), "no overflow");
        // Full jitter: anywhere from zero to the top.
        assert_eq!(policy.backoff_for(3, 0.0), Duration::ZERO);
        assert_eq!(policy.backoff_for(3, 0.5), Duration::from_millis(200));
    }

    #[test]
    fn absurd_settings_saturate_instead_of_panicking() {
        let policy = RetryPolicy::default()
            .backoff(Duration::MAX, f64::INFINITY, Duration::MAX)
            .budget(Duration::ZERO, u32::MAX, f32::NAN)
            .max_attempts(0);
        assert_eq!(policy.max_attempts, 1);
        assert!(policy.backoff_for(1_000, 0.99) <= Duration::MAX);
        let policy = RetryPolicy::default().backoff(Duration::from_secs(1), -3.0, Duration::ZERO);
        assert_eq!(policy.backoff_for(7, 1.0), Duration::ZERO);
    }

    #[test]
    fn a_backoff_capped_at_duration_max_does_not_panic() {
        // `Duration::MAX` in seconds rounds up to 2^64 as an `f64`: a
        // jitter of 1 once made `Duration::mul_f64` panic on it.
        let policy = RetryPolicy::default().backoff(Duration::from_secs(1), 1e300, Duration::MAX);
        for unit in [0.0, 0.5, 0.999_999, 1.0, f64::NAN, f64::INFINITY] {
            for retry in [1, 2, 3, 64, u32::MAX] {
                assert!(policy.backoff_for(retry, unit) <= Duration::MAX);
            }
        }
        assert_eq!(policy.backoff_for(1, 1.0), Duration::from_secs(1));
        assert_eq!(policy.backoff_for(2, 1.0), Duration::MAX);
        let exact = policy.clone().full_jitter(false);
        assert_eq!(exact.backoff_for(2, 0.5), Duration::MAX);
        let base = RetryPolicy::default().backoff(Duration::MAX, 1.0, Duration::MAX);
        assert_eq!(base.backoff_for(1, 1.0), Duration::MAX);
        assert_eq!(base.full_jitter(false).backoff_for(1, 1.0), Duration::MAX);
    }

    #[test]
    fn retry_after_is_obeyed_up_to_its_cap() {
        let policy = RetryPolicy::default().retry_after_cap(Duration::from_secs(5));
        assert_eq!(
            policy.wait(1, Some(Duration::from_secs(2)), 0.9),
            Duration::from_secs(2)
        );
        assert_eq!(
            policy.wait(1, Some(Duration::from_secs(3600)), 0.9),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            retry_after(&headers(&[("retry-after", "7")]), now),
            Some(Duration::from_secs(7))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &later)]), now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &earlier)]), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), now), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "-1")]), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn statuses_are_judged_as_the_table_says() {
        let now = SystemTime::now();
        let none = HeaderMap::new();
        for status in [429, 502, 503, 504] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(judge(status, &none, now), Verdict::Retry(None), "{status}");
        }
        for status in [200, 201, 204, 301, 400, 401, 404, 408, 413, 422, 500, 501] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(judge(status, &none, now), Verdict::Final, "{status}");
        }
        assert_eq!(
            judge(StatusCode::CONFLICT, &none, now),
            Verdict::Final,
            "a 409 that is not a problem document"
        );
        let problem = headers(&[("content-type", "application/problem+json")]);
        for status in [409, 429, 502, 503, 504] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(
                judge(status, &problem, now),
                Verdict::ReadProblem,
                "{status}"
            );
        }
        for status in [400, 422, 500] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(judge(status, &problem, now), Verdict::Final, "{status}");
        }
    }

    #[test]
    fn only_the_in_flight_problem_is_retried() {
        let now = SystemTime::now();
        let with_wait = headers(&[("retry-after", "1")]);
        let doc = |kind: ProblemKind| {
            format!(
                r#"{{"type":"{}","title":"t","status":409}}"#,
                kind.type_uri()
            )
        };
        assert_eq!(
            judge_problem(
                StatusCode::CONFLICT,
                doc(ProblemKind::InFlight).as_bytes(),
                &with_wait,
                now
            ),
            Verdict::Retry(Some(Duration::from_secs(1)))
        );
        for kind in [
            ProblemKind::KeyMismatch,
            ProblemKind::OutcomeUnknown,
            ProblemKind::NotReplayable,
        ] {
            assert_eq!(
                judge_problem(StatusCode::CONFLICT, doc(kind).as_bytes(), &with_wait, now),
                Verdict::Final,
                "{kind:?}"
            );
        }
    }

    /// A problem document as the server side writes it.
    fn problem_doc(kind: ProblemKind, status: StatusCode) -> String {
        format!(
            r#"{{"type":"{}","title":"{}","status":{}}}"#,
            kind.type_uri(),
            kind.title(),
            status.as_u16()
        )
    }

    /// The verdict on a problem document answered with `status`, as the
    /// client reaches it: `judge` says to read it, `judge_problem` decides.
    fn judge_refusal(status: StatusCode, body: &str, extra: &[(&str, &str)]) -> Verdict {
        let now = SystemTime::now();
        let mut pairs = vec![("content-type", "application/problem+json")];
        pairs.extend_from_slice(extra);
        let headers = headers(&pairs);
        assert_eq!(
            judge(status, &headers, now),
            Verdict::ReadProblem,
            "{status}"
        );
        judge_problem(status, body.as_bytes(), &headers, now)
    }

    #[test]
    fn an_outcome_unknown_is_final_whatever_its_status() {
        for status in [
            StatusCode::BAD_GATEWAY,
            StatusCode::GATEWAY_TIMEOUT,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::CONFLICT,
        ] {
            let doc = problem_doc(ProblemKind::OutcomeUnknown, status);
            assert_eq!(
                judge_refusal(status, &doc, &[("retry-after", "1")]),
                Verdict::Final,
                "{status}"
            );
        }
    }

    #[test]
    fn a_502_with_an_outcome_unknown_problem_is_final() {
        let doc = problem_doc(ProblemKind::OutcomeUnknown, StatusCode::BAD_GATEWAY);
        assert_eq!(
            judge_refusal(StatusCode::BAD_GATEWAY, &doc, &[]),
            Verdict::Final
        );
    }

    #[test]
    fn a_504_with_an_outcome_unknown_problem_is_final() {
        let doc = problem_doc(ProblemKind::OutcomeUnknown, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            judge_refusal(StatusCode::GATEWAY_TIMEOUT, &doc, &[]),
            Verdict::Final
        );
    }

    #[test]
    fn a_503_with_a_store_unavailable_problem_is_retried_after_retry_after() {
        let doc = problem_doc(
            ProblemKind::StoreUnavailable,
            StatusCode::SERVICE_UNAVAILABLE,
        );
        assert_eq!(
            judge_refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                &doc,
                &[("retry-after", "2")]
            ),
            Verdict::Retry(Some(Duration::from_secs(2)))
        );
    }

    #[test]
    fn other_problem_types_leave_the_verdict_to_the_status() {
        let doc = problem_doc(ProblemKind::KeyMismatch, StatusCode::CONFLICT);
        for status in [429, 502, 503, 504] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(
                judge_refusal(status, &doc, &[]),
                Verdict::Retry(None),
                "{status}"
            );
        }
        assert_eq!(
            judge_refusal(StatusCode::CONFLICT, &doc, &[]),
            Verdict::Final
        );
        // Not a problem document of this crate at all.
        assert_eq!(
            judge_refusal(StatusCode::BAD_GATEWAY, "{}", &[]),
            Verdict::Retry(None)
        );
    }

    #[test]
    fn a_502_without_a_problem_document_is_retried() {
        let now = SystemTime::now();
        let html = headers(&[("content-type", "text/html")]);
        assert_eq!(
            judge(StatusCode::BAD_GATEWAY, &html, now),
            Verdict::Retry(None)
        );
        assert_eq!(
            judge(StatusCode::BAD_GATEWAY, &HeaderMap::new(), now),
            Verdict::Retry(None)
        );
    }

    #[test]
    fn a_409_in_flight_is_retried_after_retry_after() {
        let doc = problem_doc(ProblemKind::InFlight, StatusCode::CONFLICT);
        assert_eq!(
            judge_refusal(StatusCode::CONFLICT, &doc, &[("retry-after", "1")]),
            Verdict::Retry(Some(Duration::from_secs(1)))
        );
        assert_eq!(
            judge_refusal(StatusCode::CONFLICT, &doc, &[]),
            Verdict::Retry(None)
        );
    }

    #[test]
    fn grpc_statuses_are_judged_by_grpc_status_and_pushback() {
        let now = SystemTime::now();
        let grpc = |status: &str, pushback: Option<&str>| {
            let mut pairs = vec![
                ("content-type", "application/grpc"),
                ("grpc-status", status),
            ];
            if let Some(p) = pushback {
                pairs.push(("grpc-retry-pushback-ms", p));
            }
            judge(StatusCode::OK, &headers(&pairs), now)
        };
        assert_eq!(grpc("14", None), Verdict::Retry(None), "UNAVAILABLE");
        assert_eq!(
            grpc("10", None),
            Verdict::Retry(None),
            "ABORTED (in flight)"
        );
        assert_eq!(grpc("8", None), Verdict::Retry(None), "RESOURCE_EXHAUSTED");
        assert_eq!(
            grpc("14", Some("250")),
            Verdict::Retry(Some(Duration::from_millis(250)))
        );
        assert_eq!(grpc("14", Some("-1")), Verdict::Final, "pushback says no");
        for code in ["0", "2", "3", "9", "13", "16"] {
            assert_eq!(grpc(code, None), Verdict::Final, "{code}");
        }
        // A response whose status comes in trailers (after messages).
        let streaming = headers(&[("content-type", "application/grpc")]);
        assert_eq!(judge(StatusCode::OK, &streaming, now), Verdict::Final);
    }

    #[test]
    fn methods_outside_the_list_are_not_retried() {
        let policy = RetryPolicy::default();
        assert!(policy.allows(&Method::POST));
        assert!(!policy.allows(&Method::CONNECT));
        let policy = policy.methods([Method::POST]);
        assert!(!policy.allows(&Method::GET));
    }

    #[test]
    fn the_budget_is_shared_and_runs_out() {
        let policy = RetryPolicy::default().budget(Duration::from_secs(1), 0, 0.0);
        let clone = policy.clone();
        // No deposits, no minimum: nothing to withdraw, on any clone.
        assert!(!policy.withdraw());
        assert!(!clone.withdraw());
        let generous = RetryPolicy::default().budget(Duration::from_secs(10), 0, 1.0);
        for _ in 0..10 {
            generous.deposit();
        }
        let shared = generous.clone();
        let mut taken = 0;
        while shared.withdraw() && taken < 100 {
            taken += 1;
        }
        assert!((1..=10).contains(&taken), "{taken}");
        assert!(!generous.withdraw(), "the clones share one budget");
    }
}
