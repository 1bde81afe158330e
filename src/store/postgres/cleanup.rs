//! The background task that removes expired rows, in bounded batches, off
//! the request path.

use std::sync::Weak;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::{Inner, PostgresStore};

/// Every `every`, removes expired rows ([`PostgresStore::remove_expired`]);
/// ends when the store is dropped. A failed round is logged and retried at
/// the next tick.
pub(super) fn spawn(
    runtime: &tokio::runtime::Handle,
    inner: Weak<Inner>,
    every: Duration,
) -> JoinHandle<()> {
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate: skip it, the store was just used.
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let store = PostgresStore { inner };
            match store.remove_expired().await {
                Ok(0) => {}
                Ok(removed) => tracing::debug!(removed, "removed expired idempotency rows"),
                Err(e) => tracing::warn!(error = %e, "could not remove expired idempotency rows"),
            }
        }
    })
}
