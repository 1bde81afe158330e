//! Redis's feed of released keys: pub/sub on the channel `<prefix>:done`,
//! where completion and release publish the key's name (see
//! [`remote::notify`](crate::store::remote::notify) for the rest).
//!
//! Pub/sub is at-most-once, so waiters also wake at their fallback check
//! and at the end of the lease they wait on.

use std::sync::Weak;

use futures_util::StreamExt;
use tokio::task::JoinHandle;

use crate::store::remote::notify::{Feed, route};
use crate::store::remote::wakers::Wakers;

/// A subscription to the store's channel.
pub(super) struct PubSub {
    pub(super) client: redis::Client,
    pub(super) channel: String,
}

impl Feed for PubSub {
    type Error = redis::RedisError;

    async fn open(&self, waiters: Weak<Wakers>) -> Result<JoinHandle<()>, redis::RedisError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(&self.channel).await?;
        let names = pubsub.into_on_message().filter_map(|message| {
            std::future::ready(String::from_utf8(message.get_payload_bytes().to_vec()).ok())
        });
        Ok(tokio::spawn(route(waiters, Box::pin(names))))
    }
}
