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
mod tests;
