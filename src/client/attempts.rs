//! The retry loop itself, shared by every client integration: attempts
//! until an answer is final or a limit is reached, with the waits, the
//! deadline, the budget and one event per attempt.

use std::fmt::Display;
use std::future::Future;

use tokio::time::Instant;

use super::policy::{RetryPolicy, Verdict};

/// What an attempt's answer shows in its event.
pub(crate) trait Answered {
    /// Its HTTP status.
    fn status(&self) -> u16;
}

impl<B> Answered for http::Response<B> {
    fn status(&self) -> u16 {
        self.status().as_u16()
    }
}

/// Runs `attempt(n)` for n = 1, 2, … until its verdict is final, or
/// `resendable` is false (the request can be sent only once), or the
/// attempt limit, the deadline or the budget stops it. Each attempt is
/// bounded by the deadline (`deadline_passed` makes the error then).
/// Returns the last outcome and how many attempts were made.
pub(crate) async fn drive<R, E, F, Fut>(
    policy: &RetryPolicy,
    key: &str,
    resendable: bool,
    deadline_passed: impl Fn() -> E,
    mut attempt: F,
) -> (Result<R, E>, u32)
where
    R: Answered,
    E: Display,
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = (Result<R, E>, Verdict)>,
{
    let deadline = crate::time::deadline(Instant::now(), policy.deadline);
    policy.deposit();
    let mut n: u32 = 0;
    loop {
        n = n.saturating_add(1);
        let (outcome, verdict) = match tokio::time::timeout_at(deadline, attempt(n)).await {
            Ok(done) => done,
            Err(_) => (Err(deadline_passed()), Verdict::Final),
        };
        let retry_after = match verdict {
            Verdict::Retry(after) => after,
            Verdict::Final | Verdict::ReadProblem => {
                report(n, key, &outcome, None, "final");
                return (outcome, n);
            }
        };
        let wait = policy.wait(n, retry_after, fastrand::f64());
        let stop = if !resendable {
            Some("the body was not kept: sent once")
        } else if n >= policy.max_attempts {
            Some("attempt limit reached")
        } else if Instant::now() + wait >= deadline {
            Some("the deadline would pass during the wait")
        } else if !policy.withdraw() {
            Some("the retry budget is spent")
        } else {
            None
        };
        if let Some(why) = stop {
            report(n, key, &outcome, None, why);
            return (outcome, n);
        }
        report(n, key, &outcome, Some(wait), "retrying");
        drop(outcome);
        tokio::time::sleep(wait).await;
    }
}

/// One event per attempt, and (with `metrics`) one count.
fn report<R: Answered, E: Display>(
    attempt: u32,
    key: &str,
    outcome: &Result<R, E>,
    wait: Option<std::time::Duration>,
    next: &'static str,
) {
    let wait_ms = wait.map(|w| u64::try_from(w.as_millis()).unwrap_or(u64::MAX));
    match outcome {
        Ok(answer) => tracing::debug!(
            target: "tower_idempotency::client",
            attempt, key, status = answer.status(), wait_ms, next,
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
