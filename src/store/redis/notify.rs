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

use crate::store::remote::wakers::{Registration, Subscription, Wakers};

pub(super) struct Notifier {
    client: redis::Client,
    channel: String,
    waiters: Arc<Wakers>,
    subscription: Subscription,
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
            waiters: Arc::default(),
            subscription: Subscription::new(connect_timeout, retry_every),
        }
    }

    /// Registers interest in the key `name`, making sure a subscription is
    /// running (best effort: without one, waiters fall back to re-checking).
    pub(super) async fn register(this: &Arc<Self>, name: &str) -> Registration {
        this.subscription.ensure(this.subscribe()).await;
        this.waiters.register(name)
    }

    /// Drops the subscription (its connection may be half-open), so that the
    /// next wait opens a new one at once.
    pub(super) fn resubscribe(&self) {
        self.subscription.reset();
    }

    /// Subscribes and starts routing the messages.
    async fn subscribe(&self) -> Result<JoinHandle<()>, redis::RedisError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(&self.channel).await?;
        let waiters = Arc::downgrade(&self.waiters);
        Ok(tokio::spawn(dispatch(waiters, pubsub.into_on_message())))
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
