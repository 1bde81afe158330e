//! [`IdempotentRetryLayer`] and its service: one key per logical request,
//! the same bytes on every attempt, retries as the [`RetryPolicy`] says.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use super::Attempts;
use super::body::{Read, RetryBody, RetryResponseBody, keep};
use super::policy::{RetryPolicy, Verdict, judge, judge_problem};
use crate::BoxError;

/// The header the key goes in.
const KEY_HEADER: &str = "idempotency-key";
/// The largest 409 problem document read to judge it.
const PROBLEM_LIMIT: u64 = 64 * 1024;

/// Wraps an HTTP client service with [`IdempotentRetry`]. See the
/// [module docs](super).
#[derive(Debug, Clone)]
pub struct IdempotentRetryLayer {
    policy: Arc<RetryPolicy>,
}

impl IdempotentRetryLayer {
    /// A layer retrying as `policy` says.
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl Default for IdempotentRetryLayer {
    fn default() -> Self {
        Self::new(RetryPolicy::default())
    }
}

impl<S> Layer<S> for IdempotentRetryLayer {
    type Service = IdempotentRetry<S>;

    fn layer(&self, inner: S) -> IdempotentRetry<S> {
        IdempotentRetry {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// An HTTP client service that sends each request with one idempotency key
/// and retries it safely. See the [module docs](super).
#[derive(Debug, Clone)]
pub struct IdempotentRetry<S> {
    inner: S,
    policy: Arc<RetryPolicy>,
}

impl<S, B, ResB> Service<Request<B>> for IdempotentRetry<S>
where
    S: Service<Request<RetryBody<B>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<RetryResponseBody<ResB>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The service that was polled ready goes with this call; a clone
        // stays for the next one.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(send(inner, self.policy.clone(), req))
    }
}

/// One logical request: its attempts, until an answer is final or a limit
/// is reached.
async fn send<S, B, ResB>(
    mut inner: S,
    policy: Arc<RetryPolicy>,
    req: Request<B>,
) -> Result<Response<RetryResponseBody<ResB>>, BoxError>
where
    S: Service<Request<RetryBody<B>>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    let started = Instant::now();
    let deadline = crate::time::deadline(started, policy.deadline);
    let (mut parts, body) = req.into_parts();
    if !parts.headers.contains_key(KEY_HEADER) {
        let key = uuid::Uuid::new_v4().hyphenated().to_string();
        if let Ok(value) = HeaderValue::from_str(&key) {
            parts.headers.insert(KEY_HEADER, value);
        }
    }
    let key = parts
        .headers
        .get(KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    // Kept to be sent again, or sent once.
    let (kept, once) = if policy.allows(&parts.method) {
        match keep(body, policy.body_limit).await {
            Read::Kept(data, trailers) => (Some((data, trailers)), None),
            Read::Once(once) => (None, Some(once)),
        }
    } else {
        (None, Some(RetryBody::once(None, body)))
    };
    policy.deposit();
    let mut once = once;
    let mut attempt: u32 = 0;
    loop {
        attempt = attempt.saturating_add(1);
        let body = match (&kept, once.take()) {
            (Some((data, trailers)), _) => RetryBody::kept(data.clone(), trailers.clone()),
            (None, Some(once)) => once,
            // Sent once already: not reached, a body that was not kept
            // stops the loop after its attempt.
            (None, None) => return Err("the request body was already sent".into()),
        };
        let request = rebuild(&parts, body);
        let outcome =
            tokio::time::timeout_at(deadline, attempt_once(&mut inner, request, attempt)).await;
        let (outcome, verdict) = match outcome {
            Ok(done) => done,
            Err(_) => (
                Err(BoxError::from(
                    "the retry deadline passed during an attempt",
                )),
                Verdict::Final,
            ),
        };
        let retry_after = match verdict {
            Verdict::Retry(after) => after,
            _ => {
                report(attempt, &key, &outcome, None, "final");
                return with_attempts(outcome, attempt);
            }
        };
        let stop = if kept.is_none() {
            Some("the body was not kept: sent once")
        } else if attempt >= policy.max_attempts {
            Some("attempt limit reached")
        } else {
            None
        };
        let wait = policy.wait(attempt, retry_after, fastrand::f64());
        let stop = stop.or_else(|| {
            (Instant::now() + wait >= deadline).then_some("the deadline would pass during the wait")
        });
        let stop = stop.or_else(|| (!policy.withdraw()).then_some("the retry budget is spent"));
        if let Some(why) = stop {
            report(attempt, &key, &outcome, None, why);
            return with_attempts(outcome, attempt);
        }
        report(attempt, &key, &outcome, Some(wait), "retrying");
        drop(outcome);
        tokio::time::sleep(wait).await;
    }
}

/// Sends one attempt (waiting for the service to be ready, after the
/// first) and judges its answer; a 409 problem document is read to judge.
async fn attempt_once<S, B, ResB>(
    inner: &mut S,
    request: Request<RetryBody<B>>,
    attempt: u32,
) -> (Result<Response<RetryResponseBody<ResB>>, BoxError>, Verdict)
where
    S: Service<Request<RetryBody<B>>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    if attempt > 1
        && let Err(e) = std::future::poll_fn(|cx| inner.poll_ready(cx)).await
    {
        return (Err(e.into()), Verdict::Retry(None));
    }
    let response = match inner.call(request).await {
        Ok(response) => response,
        // A transport failure: the request may or may not have arrived; the
        // key makes sending it again safe.
        Err(e) => return (Err(e.into()), Verdict::Retry(None)),
    };
    let now = SystemTime::now();
    match judge(response.status(), response.headers(), now) {
        Verdict::ReadProblem if response.body().size_hint().lower() <= PROBLEM_LIMIT => {
            let (parts, body) = response.into_parts();
            let read = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) => return (Err(e.into()), Verdict::Retry(None)),
            };
            let verdict = judge_problem(&read, &parts.headers, now);
            let response = Response::from_parts(parts, RetryResponseBody::read(read));
            (Ok(response), verdict)
        }
        Verdict::ReadProblem => (Ok(passthrough(response)), Verdict::Final),
        verdict => (Ok(passthrough(response)), verdict),
    }
}

fn passthrough<B>(response: Response<B>) -> Response<RetryResponseBody<B>> {
    response.map(RetryResponseBody::passthrough)
}

/// The request of one attempt: the same method, URI, headers (key
/// included) and extensions each time.
fn rebuild<B>(parts: &http::request::Parts, body: RetryBody<B>) -> Request<RetryBody<B>> {
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    *request.extensions_mut() = parts.extensions.clone();
    request
}

fn with_attempts<B>(
    outcome: Result<Response<B>, BoxError>,
    attempts: u32,
) -> Result<Response<B>, BoxError> {
    outcome.map(|mut response| {
        response.extensions_mut().insert(Attempts(attempts));
        response
    })
}

/// One event per attempt, and (with `metrics`) one count.
fn report<B>(
    attempt: u32,
    key: &str,
    outcome: &Result<Response<B>, BoxError>,
    wait: Option<std::time::Duration>,
    next: &'static str,
) {
    let wait_ms = wait.map(|w| u64::try_from(w.as_millis()).unwrap_or(u64::MAX));
    match outcome {
        Ok(response) => tracing::debug!(
            target: "tower_idempotency::client",
            attempt, key, status = response.status().as_u16(), wait_ms, next,
            "idempotent request attempt"
        ),
        Err(error) => tracing::debug!(
            target: "tower_idempotency::client",
            attempt, key, error = %error, wait_ms, next,
            "idempotent request attempt"
        ),
    }
    #[cfg(feature = "metrics")]
    {
        let outcome = if wait.is_some() { "retried" } else { "final" };
        metrics::counter!("idempotency_client_attempts_total", "outcome" => outcome).increment(1);
    }
}
