//! `Store::wait` for a remote store: probe the claim, sleep until a
//! notification, the fallback check, the lease's end or the caller's
//! bound, and probe again.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::notify::{Feed, Notifications};
use crate::store::StoreError;
use crate::time::deadline;

/// What a probe of the claim a waiter waits on found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// The claim is gone (completed, released, expired, taken over).
    Gone,
    /// The claim is live; `left` is its lease left, where the server says.
    Live { left: Option<Duration> },
}

/// Waits until the claim `probe` looks at is gone, a notification for
/// `name` comes, or `timeout` passes; probes again at every
/// `fallback_check` (a notification may be missed) and at the lease's end. A
/// return is a hint to look again, never a promise that the claim is gone.
pub(crate) async fn until_gone<F, P, Fut>(
    notifications: Option<&Notifications<F>>,
    name: &str,
    timeout: Duration,
    fallback_check: Duration,
    mut probe: P,
) -> Result<(), StoreError>
where
    F: Feed,
    P: FnMut() -> Fut,
    Fut: Future<Output = Result<Probe, StoreError>>,
{
    let until = deadline(Instant::now(), timeout);
    // Registered before the first probe, so that a wake-up between a probe
    // and the sleep after it is not missed.
    let registration = match notifications {
        Some(notifications) => Some(notifications.register(name).await),
        None => None,
    };
    loop {
        // Created before the probe: it sees every wake-up from here on.
        let notified = registration.as_ref().map(|r| r.notified());
        let left = match probe().await? {
            Probe::Gone => return Ok(()),
            Probe::Live { left } => left,
        };
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        let mut next = deadline(now, fallback_check).min(until);
        if let Some(left) = left {
            next = next.min(deadline(now, left));
        }
        match notified {
            Some(notified) => {
                if tokio::time::timeout_at(next, notified).await.is_ok() {
                    return Ok(());
                }
            }
            None => tokio::time::sleep_until(next).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::sync::Weak;

    use tokio::task::JoinHandle;

    use super::*;
    use crate::store::remote::wakers::Wakers;

    /// A feed that never opens: waiters rely on their probes.
    struct Silent;
    impl Feed for Silent {
        type Error = std::io::Error;
        async fn open(&self, _: Weak<Wakers>) -> Result<JoinHandle<()>, std::io::Error> {
            Err(std::io::Error::other("no feed"))
        }
    }

    /// Probes that answer `answers` in turn, counting the calls.
    async fn wait_with(answers: &[Probe], timeout: Duration) -> (u32, Duration) {
        let calls = Cell::new(0u32);
        let started = Instant::now();
        until_gone::<Silent, _, _>(None, "k", timeout, Duration::from_secs(1), || {
            let n = calls.get();
            calls.set(n + 1);
            let answer = answers.get(n as usize).copied().unwrap_or(Probe::Gone);
            async move { Ok(answer) }
        })
        .await
        .unwrap();
        (calls.get(), started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_gone_claim_returns_at_once() {
        let (calls, took) = wait_with(&[Probe::Gone], Duration::from_secs(30)).await;
        assert_eq!((calls, took), (1, Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_per_fallback_check_until_the_claim_is_gone() {
        let live = Probe::Live { left: None };
        let (calls, took) =
            wait_with(&[live, live, live, Probe::Gone], Duration::from_secs(30)).await;
        assert_eq!((calls, took), (4, Duration::from_secs(3)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_end_comes_before_the_fallback_check() {
        let ending = Probe::Live {
            left: Some(Duration::from_millis(200)),
        };
        let (calls, took) = wait_with(&[ending, Probe::Gone], Duration::from_secs(30)).await;
        assert_eq!((calls, took), (2, Duration::from_millis(200)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_callers_bound_ends_the_wait() {
        let live = Probe::Live { left: None };
        let (calls, took) = wait_with(&[live; 10], Duration::from_millis(2500)).await;
        assert_eq!((calls, took), (4, Duration::from_millis(2500)));
    }
}
