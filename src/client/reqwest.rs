//! [`IdempotentRetryMiddleware`]: the retry policy as a
//! `reqwest_middleware::Middleware` (feature `reqwest`), for teams that
//! call APIs with reqwest. The decisions and the loop are the layer's own.

use std::sync::Arc;
use std::time::SystemTime;

use http::Extensions;
use reqwest::ResponseBuilderExt;
use reqwest_middleware::{Middleware, Next};

use super::attempts::{Answered, drive};
use super::body::{Read, RetryBody, keep};
use super::policy::{PROBLEM_LIMIT, RetryPolicy, Verdict, judge, judge_problem};
use super::{Attempts, ensure_key};

/// Sends each request with one idempotency key and retries it as the
/// [`RetryPolicy`] says, in a `reqwest_middleware` chain (feature
/// `reqwest`). What the [`IdempotentRetryLayer`](super::IdempotentRetryLayer)
/// does, with reqwest's types: a request whose body cannot be cloned (a
/// stream) or is larger than the body limit is sent once.
///
/// ```no_run
/// use reqwest_middleware::ClientBuilder;
/// use tower_idempotency::client::{Attempts, IdempotentRetryMiddleware, RetryPolicy};
///
/// # async fn example() -> Result<(), reqwest_middleware::Error> {
/// let client = ClientBuilder::new(reqwest::Client::new())
///     .with(IdempotentRetryMiddleware::new(RetryPolicy::default()))
///     .build();
/// let answer = client
///     .post("http://127.0.0.1:3000/process-payment")
///     .header("content-type", "application/json")
///     .body(r#"{"amount":100,"currency":"GHS"}"#)
///     .send()
///     .await?;
/// let attempts = answer.extensions().get::<Attempts>().map_or(1, |a| a.0);
/// println!("{} after {attempts} attempt(s)", answer.status());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct IdempotentRetryMiddleware {
    policy: Arc<RetryPolicy>,
}

impl IdempotentRetryMiddleware {
    /// A middleware retrying as `policy` says.
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl Default for IdempotentRetryMiddleware {
    fn default() -> Self {
        Self::new(RetryPolicy::default())
    }
}

impl Answered for reqwest::Response {
    fn status(&self) -> u16 {
        self.status().as_u16()
    }
}

/// The retry deadline passed while an attempt was under way.
#[derive(Debug, thiserror::Error)]
#[error("the retry deadline passed during an attempt")]
struct DeadlinePassed;

#[async_trait::async_trait]
impl Middleware for IdempotentRetryMiddleware {
    async fn handle(
        &self,
        mut req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let key = ensure_key(req.headers_mut());
        let policy = &self.policy;
        let small_enough = req.body().is_none_or(|body| {
            body.as_bytes()
                .is_some_and(|bytes| bytes.len() <= policy.body_limit)
        });
        let template = (policy.allows(req.method()) && small_enough)
            .then(|| req.try_clone())
            .flatten();
        let resendable = template.is_some();
        let mut first = Some(req);
        let (outcome, attempts) = drive(
            policy,
            &key,
            resendable,
            || reqwest_middleware::Error::middleware(DeadlinePassed),
            |_attempt| {
                let request = first
                    .take()
                    .or_else(|| template.as_ref().and_then(reqwest::Request::try_clone));
                let next = next.clone();
                let mut extensions = extensions.clone();
                async move {
                    let Some(request) = request else {
                        // Not reached: a request that cannot be cloned is
                        // sent once.
                        return (
                            Err(reqwest_middleware::Error::middleware(DeadlinePassed)),
                            Verdict::Final,
                        );
                    };
                    match next.run(request, &mut extensions).await {
                        Ok(response) => judged(response).await,
                        // A transport failure: the key makes sending it
                        // again safe.
                        Err(e) => (Err(e), Verdict::Retry(None)),
                    }
                }
            },
        )
        .await;
        outcome.map(|mut response| {
            response.extensions_mut().insert(Attempts(attempts));
            response
        })
    }
}

/// Judges an answer; a refusal's problem document is read (up to
/// [`PROBLEM_LIMIT`]) and given back as the response's body, followed by
/// the rest of it when it is longer.
async fn judged(
    response: reqwest::Response,
) -> (reqwest_middleware::Result<reqwest::Response>, Verdict) {
    let now = SystemTime::now();
    let verdict = judge(response.status(), response.headers(), now);
    if verdict != Verdict::ReadProblem {
        return (Ok(response), verdict);
    }
    // The URL does not survive the round trip through `http::Response`.
    let url = response.url().clone();
    let (parts, body) = http::Response::<reqwest::Body>::from(response).into_parts();
    let (body, verdict) = match keep(body, PROBLEM_LIMIT).await {
        Read::Kept(read, trailers) => {
            let verdict = judge_problem(parts.status, &read, &parts.headers, now);
            (RetryBody::kept(read, trailers), verdict)
        }
        // Too long to judge: final, and returned whole.
        Read::Once { head, rest } => (RetryBody::once(head, rest), Verdict::Final),
        // The answer broke off: as for a transport failure.
        Read::Failed(e) => return (Err(e.into()), Verdict::Retry(None)),
    };
    let mut rebuilt = http::Response::from_parts(parts, reqwest::Body::wrap(body));
    rebuilt.extensions_mut().extend(url_extension(url));
    (Ok(reqwest::Response::from(rebuilt)), verdict)
}

/// The extension `reqwest::Response::from` reads the response's URL from;
/// its type is private to reqwest, and only `ResponseBuilderExt` sets it.
fn url_extension(url: reqwest::Url) -> Extensions {
    http::Response::builder()
        .url(url)
        .body(())
        .map(|carrier| carrier.into_parts().0.extensions)
        .unwrap_or_default()
}
