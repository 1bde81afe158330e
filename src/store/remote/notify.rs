//! Cross-process wake-ups for waiters: a backend's feed of the key names
//! whose claim is gone (Redis pub/sub, PostgreSQL `LISTEN`), routed to the
//! local waiters of each key.
//!
//! One feed per store, opened on the first wait. A notification sent while
//! the feed is down is missed, so waiters never rely on it alone: they also
//! re-check at their fallback interval. When the feed ends, the next wait
//! opens a new one.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::task::JoinHandle;

use super::wakers::{Registration, Subscription, Wakers};

/// How a backend hears that claims are gone.
pub(crate) trait Feed: Send + Sync + 'static {
    type Error: std::error::Error + 'static;

    /// Opens the server's stream of key names whose claim is gone, and
    /// spawns the task that routes them to `waiters` (with [`route`]); the
    /// task ends with the stream.
    fn open(
        &self,
        waiters: Weak<Wakers>,
    ) -> impl Future<Output = Result<JoinHandle<()>, Self::Error>> + Send;
}

/// A store's notifications: its feed, the local waiters, and the feed's
/// state (running, or when it was last tried).
pub(crate) struct Notifications<F> {
    feed: F,
    waiters: Arc<Wakers>,
    subscription: Subscription,
}

impl<F: Feed> Notifications<F> {
    /// Opening the feed is bounded by `open_timeout`, and tried again at
    /// most every `retry_every`.
    pub(crate) fn new(feed: F, open_timeout: Duration, retry_every: Duration) -> Self {
        Self {
            feed,
            waiters: Arc::default(),
            subscription: Subscription::new(open_timeout, retry_every),
        }
    }

    /// Registers interest in the key `name`, making sure the feed is
    /// running (best effort: without it, waiters re-check).
    pub(crate) async fn register(&self, name: &str) -> Registration {
        self.subscription
            .ensure(self.feed.open(Arc::downgrade(&self.waiters)))
            .await;
        self.waiters.register(name)
    }

    /// Ends the feed (its connection may be half-open), so that the next
    /// wait opens a new one at once.
    #[cfg(feature = "redis")]
    pub(crate) fn reset(&self) {
        self.subscription.reset();
    }
}

/// Wakes the local waiters of each name until the stream ends or the store
/// is gone.
pub(crate) async fn route(waiters: Weak<Wakers>, names: impl Stream<Item = String> + Unpin) {
    let mut names = names;
    while let Some(name) = names.next().await {
        let Some(waiters) = waiters.upgrade() else {
            return;
        };
        waiters.wake(&name);
    }
    tracing::debug!("idempotency notifications ended; the next wait opens them again");
}
