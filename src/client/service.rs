//! [`IdempotentRetryLayer`] and its service: one key per logical request,
//! the same bytes on every attempt, retries as the [`RetryPolicy`] says.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use super::attempts::drive;
use super::body::{Read, RetryBody, keep};
use super::policy::{PROBLEM_LIMIT, RetryPolicy, Verdict, judge, judge_problem};
use super::{Attempts, ensure_key};
use crate::BoxError;

/// The request body failed while the layer read it to keep it, so nothing
/// was sent: what was read of it is not the request. The error of an
/// [`IdempotentRetry`] call (a [`BoxError`]) downcasts to it.
#[derive(Debug, thiserror::Error)]
#[error("the request body failed before it was sent: {source}")]
pub struct RequestBodyFailed {
    source: BoxError,
}

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
    type Response = Response<RetryBody<ResB>>;
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
    inner: S,
    policy: Arc<RetryPolicy>,
    req: Request<B>,
) -> Result<Response<RetryBody<ResB>>, BoxError>
where
    S: Service<Request<RetryBody<B>>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    let (mut parts, body) = req.into_parts();
    let key = ensure_key(&mut parts.headers);
    // Kept to be sent again, or sent once.
    let (kept, once) = if policy.allows(&parts.method) {
        match keep(body, policy.body_limit).await {
            Read::Kept(data, trailers) => (Some((data, trailers)), None),
            Read::Once { head, rest } => (None, Some(RetryBody::once(head, rest))),
            Read::Failed(e) => return Err(RequestBodyFailed { source: e.into() }.into()),
        }
    } else {
        (None, Some(RetryBody::once(None, body)))
    };
    let resendable = kept.is_some();
    let mut once = once;
    // The first attempt goes to the service that was polled ready; each
    // later one to a clone, polled ready first.
    let spare = inner.clone();
    let mut ready = Some(inner);
    let (outcome, attempts) = drive(
        &policy,
        &key,
        resendable,
        || BoxError::from("the retry deadline passed during an attempt"),
        move |_attempt| {
            let body = match (&kept, once.take()) {
                (Some((data, trailers)), _) => {
                    Some(RetryBody::kept(data.clone(), trailers.clone()))
                }
                (None, once) => once,
            };
            let request = body.map(|body| rebuild(&parts, body));
            let (service, is_ready) = match ready.take() {
                Some(service) => (service, true),
                None => (spare.clone(), false),
            };
            async move {
                match request {
                    Some(request) => attempt_once(service, is_ready, request).await,
                    // Not reached: a body sent once is never resent.
                    None => (
                        Err("the request body was already sent".into()),
                        Verdict::Final,
                    ),
                }
            }
        },
    )
    .await;
    with_attempts(outcome, attempts)
}

/// Sends one attempt (waiting for the service to be ready, after the
/// first) and judges its answer; a refusal's problem document is read (up
/// to [`PROBLEM_LIMIT`]) to judge.
async fn attempt_once<S, B, ResB>(
    mut inner: S,
    is_ready: bool,
    request: Request<RetryBody<B>>,
) -> (Result<Response<RetryBody<ResB>>, BoxError>, Verdict)
where
    S: Service<Request<RetryBody<B>>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    if !is_ready && let Err(e) = std::future::poll_fn(|cx| inner.poll_ready(cx)).await {
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
        Verdict::ReadProblem => {
            let (parts, body) = response.into_parts();
            // Boxed: the body is polled here, then handed to the caller,
            // and need not be `Unpin`.
            let (body, verdict) = match keep(Box::pin(body), PROBLEM_LIMIT).await {
                Read::Kept(read, trailers) => {
                    let verdict = judge_problem(parts.status, &read, &parts.headers, now);
                    (RetryBody::kept(read, trailers), verdict)
                }
                // Too long to judge: final, and returned whole.
                Read::Once { head, rest } => (RetryBody::resumed(head, rest), Verdict::Final),
                // The answer broke off: as for a transport failure.
                Read::Failed(e) => return (Err(e.into()), Verdict::Retry(None)),
            };
            (Ok(Response::from_parts(parts, body)), verdict)
        }
        verdict => (Ok(passthrough(response)), verdict),
    }
}

fn passthrough<B>(response: Response<B>) -> Response<RetryBody<B>> {
    response.map(RetryBody::passthrough)
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
