//! The one way a remote store calls its server: bounded by a deadline, its
//! failure judged (provably not applied, or unknown) and named for the
//! operation.

use std::future::Future;

use tokio::time::Instant;

use crate::store::{StoreError, StoreErrorKind};

/// A backend's own error, before it is named for an operation.
pub(crate) trait Cause {
    /// The server provably did not apply the command: nothing was sent, or
    /// the server refused it with an error (and wrote nothing).
    fn unapplied(&self) -> bool;
    /// The server answered (an error reply): its connection is alive.
    fn answered(&self) -> bool;
    /// The driver's own timeout fired.
    fn timed_out(&self) -> bool {
        false
    }
    /// The error of `op`, with its kind.
    fn into_store_error(self, op: &'static str) -> StoreError;
}

/// What a call tells about the connection it went on (a backend that
/// replaces a half-open connection listens; others ignore it).
pub(crate) trait Health {
    /// The server answered.
    fn answered(&self) {}
    /// The call timed out: the connection may be half-open.
    fn timed_out(&self) {}
}

impl Health for () {}

/// A remote call that failed, and whether it provably did not take effect
/// (a claim that did not need no release).
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) error: StoreError,
    pub(crate) unapplied: bool,
}

impl From<Failure> for StoreError {
    fn from(failure: Failure) -> Self {
        failure.error
    }
}

/// Runs `call` for `op` until `until`: a timeout is a failure that may have
/// been applied; an error is judged by its [`Cause`].
pub(crate) async fn bounded<T, E: Cause>(
    op: &'static str,
    until: Instant,
    health: &impl Health,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, Failure> {
    match tokio::time::timeout_at(until, call).await {
        Ok(Ok(value)) => {
            health.answered();
            Ok(value)
        }
        Ok(Err(e)) => {
            if e.answered() {
                health.answered();
            } else if e.timed_out() {
                health.timed_out();
            }
            Err(Failure {
                unapplied: e.unapplied(),
                error: e.into_store_error(op),
            })
        }
        Err(_) => {
            health.timed_out();
            Err(Failure {
                error: StoreError::new(StoreErrorKind::Timeout, op),
                unapplied: false,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::Duration;

    use super::*;

    struct Refused;
    impl Cause for Refused {
        fn unapplied(&self) -> bool {
            true
        }
        fn answered(&self) -> bool {
            true
        }
        fn into_store_error(self, op: &'static str) -> StoreError {
            StoreError::new(StoreErrorKind::Unavailable, op)
        }
    }

    #[derive(Default)]
    struct Seen {
        answered: Cell<u32>,
        timed_out: Cell<u32>,
    }
    impl Health for Seen {
        fn answered(&self) {
            self.answered.set(self.answered.get() + 1);
        }
        fn timed_out(&self) {
            self.timed_out.set(self.timed_out.get() + 1);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_may_have_applied_and_an_error_reply_did_not() {
        let seen = Seen::default();
        let until = Instant::now() + Duration::from_millis(10);
        let slow = bounded::<(), Refused>("claim", until, &seen, std::future::pending()).await;
        let failure = slow.expect_err("timed out");
        assert_eq!(failure.error.kind(), StoreErrorKind::Timeout);
        assert!(!failure.unapplied);
        assert_eq!(seen.timed_out.get(), 1);

        let until = Instant::now() + Duration::from_millis(10);
        let refused = bounded::<(), _>("claim", until, &seen, async { Err(Refused) }).await;
        let failure = refused.expect_err("refused");
        assert_eq!(failure.error.kind(), StoreErrorKind::Unavailable);
        assert!(failure.unapplied);
        assert_eq!(seen.answered.get(), 1);
    }
}
