//! [`Connection`]: the store's Redis connection, replaced when it stops
//! answering.
//!
//! A connection can go half-open: the server's side is gone (a restart
//! behind a load balancer, a NAT or firewall that forgot the flow, a peer
//! that vanished) and the client's side never hears of it. Nothing fails on
//! it; every command simply times out, for as long as TCP keepalive takes
//! to notice (hours by default). `redis`'s connection manager reconnects
//! on errors that say the connection dropped, not on timeouts, so the store
//! watches for them itself: after [`TIMEOUTS_BEFORE_REOPENING`] timeouts in
//! a row with no answer in between, it opens a new connection and sends
//! later commands there. A Redis that is only slow (a long `DEBUG SLEEP`, a
//! `CLIENT PAUSE`) costs one needless reconnection.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use redis::RedisError;

/// How many timeouts in a row, with no answer between them, make the store
/// open a new connection.
pub(super) const TIMEOUTS_BEFORE_REOPENING: u32 = 2;

type Opening<C> = Pin<Box<dyn Future<Output = Result<C, RedisError>> + Send>>;

/// Opens a new connection like the first one.
pub(super) type Reopen<C> = Arc<dyn Fn() -> Opening<C> + Send + Sync>;

/// The connection the store's commands go to. See the [module docs](self).
pub(super) struct Connection<C> {
    shared: Arc<Shared<C>>,
    /// `None` for a connection the user built: the store cannot make another.
    reopen: Option<Reopen<C>>,
}

struct Shared<C> {
    current: Mutex<C>,
    /// Timeouts since the last answer.
    timeouts: AtomicU32,
    /// A new connection is being opened.
    reopening: AtomicBool,
}

impl<C: Clone + Send + 'static> Connection<C> {
    pub(super) fn new(conn: C, reopen: Option<Reopen<C>>) -> Self {
        Self {
            shared: Arc::new(Shared {
                current: Mutex::new(conn),
                timeouts: AtomicU32::new(0),
                reopening: AtomicBool::new(false),
            }),
            reopen,
        }
    }

    /// The connection to send a command on.
    pub(super) fn get(&self) -> C {
        self.shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Redis answered a command (a value or an error reply).
    pub(super) fn answered(&self) {
        // A load first: the common case writes nothing.
        if self.shared.timeouts.load(Ordering::Relaxed) != 0 {
            self.shared.timeouts.store(0, Ordering::Relaxed);
        }
    }

    /// A command timed out. Returns whether this started opening a new
    /// connection.
    pub(super) fn timed_out(&self) -> bool {
        let timeouts = self.shared.timeouts.fetch_add(1, Ordering::Relaxed) + 1;
        if timeouts < TIMEOUTS_BEFORE_REOPENING {
            return false;
        }
        let Some(reopen) = self.reopen.clone() else {
            return false;
        };
        if self.shared.reopening.swap(true, Ordering::AcqRel) {
            return false;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.shared.reopening.store(false, Ordering::Release);
            return false;
        };
        let shared = self.shared.clone();
        runtime.spawn(async move {
            match reopen().await {
                Ok(conn) => {
                    tracing::warn!(
                        "Redis commands timed out {TIMEOUTS_BEFORE_REOPENING} times in a row; \
                         the store opened a new connection"
                    );
                    *shared.current.lock().unwrap_or_else(PoisonError::into_inner) = conn;
                    shared.timeouts.store(0, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not open a new Redis connection; will try again");
                }
            }
            shared.reopening.store(false, Ordering::Release);
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn counting(opened: &Arc<AtomicUsize>) -> Reopen<usize> {
        let opened = opened.clone();
        Arc::new(move || {
            let n = opened.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move { Ok(n) })
        })
    }

    #[tokio::test]
    async fn timeouts_in_a_row_open_a_new_connection_and_an_answer_resets_the_count() {
        let opened = Arc::new(AtomicUsize::new(0));
        let conn = Connection::new(0usize, Some(counting(&opened)));
        assert!(!conn.timed_out());
        conn.answered();
        assert!(!conn.timed_out(), "the answer reset the count");
        assert!(conn.timed_out(), "two in a row");
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(opened.load(Ordering::SeqCst), 1);
        assert_eq!(conn.get(), 1, "later commands go to the new connection");
        assert!(!conn.timed_out(), "the count starts again");
    }

    #[tokio::test]
    async fn a_connection_the_user_built_is_kept() {
        let conn = Connection::new(7usize, None);
        for _ in 0..5 {
            assert!(!conn.timed_out());
        }
        assert_eq!(conn.get(), 7);
    }
}
