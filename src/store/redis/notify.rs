//! Cross-process wake-ups for waiters, over Redis pub/sub.
//!
//! One subscription per store, on the channel `<prefix>:done`, opened on the
//! first wait. A dispatcher task routes each published key name to the local
//! waiters of that key. Pub/sub is at-most-once (a message sent while the
//! connection is down is lost), so waiters never rely on it alone: they
//! also wake at their fallback check and at the end of the lease they wait
//! on. When the subscription breaks, the next wait opens a new one.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::store::wakers::{Registration, Wakers};

pub(super) struct Notifier {
    client: redis::Client,
    channel: String,
    connect_timeout: Duration,
    retry_every: Duration,
    waiters: Arc<Wakers>,
    dispatcher: tokio::sync::Mutex<Dispatcher>,
}

#[derive(Default)]
struct Dispatcher {
    task: Option<JoinHandle<()>>,
    last_attempt: Option<Instant>,
}

impl Notifier {
    pub(super) fn new(
        client: redis::Client,
        channel: String,
        connect_timeout: Duration,
        retry_every: Duration,
    ) -> Self {
        Self {
            client,
            channel,
            connect_timeout,
            retry_every,
            waiters: Arc::default(),
            dispatcher: tokio::sync::Mutex::default(),
        }
    }

    /// Registers interest in the key `name`, making sure a subscription is
    /// running (best effort: without one, waiters fall back to re-checking).
    pub(super) async fn register(this: &Arc<Self>, name: &str) -> Registration {
        this.ensure_subscribed().await;
        this.waiters.register(name)
    }

    /// Drops the subscription (its connection may be half-open), so that the
    /// next wait opens a new one at once. Best effort: skipped while a
    /// subscription is being opened.
    pub(super) fn resubscribe(&self) {
        if let Ok(mut dispatcher) = self.dispatcher.try_lock() {
            if let Some(task) = dispatcher.task.take() {
                task.abort();
            }
            dispatcher.last_attempt = None;
        }
    }

    async fn ensure_subscribed(&self) {
        let mut dispatcher = self.dispatcher.lock().await;
        if dispatcher.task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let now = Instant::now();
        if dispatcher
            .last_attempt
            .is_some_and(|at| now < crate::time::deadline(at, self.retry_every))
        {
            return;
        }
        dispatcher.last_attempt = Some(now);
        let subscribe = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(&self.channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(self.connect_timeout, subscribe).await {
            Ok(Ok(pubsub)) => {
                let waiters = Arc::downgrade(&self.waiters);
                dispatcher.task = Some(tokio::spawn(dispatch(waiters, pubsub.into_on_message())));
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "idempotency notifications unavailable; waiters re-check instead")
            }
            Err(_) => {
                tracing::debug!("idempotency notifications timed out; waiters re-check instead")
            }
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        if let Some(task) = self.dispatcher.get_mut().task.take() {
            task.abort();
        }
    }
}

async fn dispatch(waiters: Weak<Wakers>, mut messages: redis::aio::PubSubStream) {
    while let Some(message) = messages.next().await {
        let Some(waiters) = waiters.upgrade() else {
            return;
        };
        if let Ok(name) = std::str::from_utf8(message.get_payload_bytes()) {
            waiters.wake(name);
        }
    }
    tracing::debug!("idempotency notification subscription ended; the next wait resubscribes");
}
