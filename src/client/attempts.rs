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
        // Saturating: a `Retry-After` or a backoff may be as long as
        // `Duration::MAX`, and `Instant + Duration` panics past its range.
        let wait_ends = crate::time::deadline(Instant::now(), wait);
        let stop = if !resendable {
            Some("the body was not kept: sent once")
        } else if n >= policy.max_attempts {
            Some("attempt limit reached")
        } else if wait_ends >= deadline {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    struct Answer(u16);

    impl Answered for Answer {
        fn status(&self) -> u16 {
            self.0
        }
    }

    fn exact() -> RetryPolicy {
        RetryPolicy::default()
            .backoff(Duration::from_millis(100), 2.0, Duration::from_secs(1))
            .full_jitter(false)
            .max_attempts(5)
            .deadline(Duration::from_secs(60))
    }

    /// Runs the driver over `verdicts` (one per attempt, the last repeated)
    /// and returns the attempts made and the virtual time it took, with
    /// each attempt's start time.
    async fn run(
        policy: RetryPolicy,
        verdicts: Vec<Verdict>,
        resendable: bool,
    ) -> (u32, Vec<Duration>) {
        let started = Instant::now();
        let mut starts = Vec::new();
        let (outcome, attempts) = drive(
            &policy,
            "k",
            resendable,
            || "deadline".to_owned(),
            |n| {
                starts.push(started.elapsed());
                let index = usize::try_from(n - 1)
                    .unwrap_or(usize::MAX)
                    .min(verdicts.len() - 1);
                let verdict = verdicts[index];
                async move { (Ok::<_, String>(Answer(503)), verdict) }
            },
        )
        .await;
        assert!(outcome.is_ok());
        (attempts, starts)
    }

    fn ms(list: &[u64]) -> Vec<Duration> {
        list.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn waits_follow_the_backoff_up_to_the_attempt_limit() {
        let (attempts, starts) = run(exact(), vec![Verdict::Retry(None)], true).await;
        assert_eq!(attempts, 5);
        assert_eq!(starts, ms(&[0, 100, 300, 700, 1500]));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_replaces_the_backoff_and_a_final_answer_stops() {
        let verdicts = vec![
            Verdict::Retry(Some(Duration::from_secs(2))),
            Verdict::Retry(None),
            Verdict::Final,
        ];
        let (attempts, starts) = run(exact(), verdicts, true).await;
        assert_eq!(attempts, 3);
        assert_eq!(starts, ms(&[0, 2000, 2200]));
    }

    #[tokio::test(start_paused = true)]
    async fn no_wait_runs_past_the_deadline() {
        let policy = exact()
            .max_attempts(100)
            .deadline(Duration::from_millis(1000));
        let (attempts, starts) = run(policy, vec![Verdict::Retry(None)], true).await;
        // 0, 100, 300, 700; the next wait (800 ms) would end at 1500.
        assert_eq!(attempts, 4);
        assert_eq!(starts, ms(&[0, 100, 300, 700]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_cannot_be_resent_is_sent_once() {
        let (attempts, _) = run(exact(), vec![Verdict::Retry(None)], false).await;
        assert_eq!(attempts, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_past_the_deadline_ends_with_the_deadline_error() {
        let policy = exact().deadline(Duration::from_secs(1));
        let (outcome, attempts) = drive(
            &policy,
            "k",
            true,
            || "deadline passed".to_owned(),
            |_| async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                (Ok::<_, String>(Answer(200)), Verdict::Final)
            },
        )
        .await;
        assert_eq!(attempts, 1);
        assert_eq!(outcome.err().as_deref(), Some("deadline passed"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_longest_retry_after_stops_at_the_deadline_instead_of_panicking() {
        // `Retry-After: 18446744073709551615`, obeyed in full, within a
        // deadline as long as can be.
        let policy = exact()
            .retry_after_cap(Duration::MAX)
            .deadline(Duration::MAX);
        let verdicts = vec![Verdict::Retry(Some(Duration::from_secs(u64::MAX)))];
        let (attempts, starts) = run(policy, verdicts, true).await;
        assert_eq!(attempts, 1, "the wait would pass the deadline");
        assert_eq!(starts, ms(&[0]));
    }

    #[tokio::test(start_paused = true)]
    async fn the_longest_backoff_stops_at_the_deadline_instead_of_panicking() {
        let policy = exact()
            .backoff(Duration::from_secs(1), 1e300, Duration::MAX)
            .max_attempts(10)
            .deadline(Duration::MAX);
        // 1 s, then base × 1e300 (capped at `Duration::MAX`): past any
        // deadline.
        let (attempts, starts) = run(policy.clone(), vec![Verdict::Retry(None)], true).await;
        assert_eq!(attempts, 2);
        assert_eq!(starts, ms(&[0, 1000]));
        // With full jitter, the wait is a random part of `Duration::MAX`.
        let (attempts, _) = run(policy.full_jitter(true), vec![Verdict::Retry(None)], true).await;
        assert!((1..=10).contains(&attempts), "{attempts}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_budget_stops_the_retries() {
        let policy = exact().budget(Duration::from_secs(1), 0, 0.0);
        let (attempts, _) = run(policy, vec![Verdict::Retry(None)], true).await;
        assert_eq!(attempts, 1);
    }
}
