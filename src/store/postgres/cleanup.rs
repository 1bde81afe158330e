//! The background task that removes expired rows, in bounded batches, off
//! the request path.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, Weak};
use std::time::Duration;

use tokio::task::JoinHandle;

use super::{Inner, PostgresStore};
use crate::store::StoreError;

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

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.cleanup_task().take() {
            task.abort();
        }
    }
}

impl Inner {
    pub(super) fn cleanup_task(&self) -> std::sync::MutexGuard<'_, Option<JoinHandle<()>>> {
        self.cleanup.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl PostgresStore {
    /// Removes expired rows now, in batches of the configured size, and
    /// returns how many. The background task does this on its own; call it
    /// from a scheduled job if you turned the task off.
    pub async fn remove_expired(&self) -> Result<u64, StoreError> {
        let batch = i64::from(self.inner.cleanup_batch);
        let mut removed = 0u64;
        loop {
            let rows = self
                .execute("cleanup", &self.inner.sql.cleanup, &[&batch])
                .await?;
            removed = removed.saturating_add(rows);
            if rows < u64::from(self.inner.cleanup_batch) {
                return Ok(removed);
            }
        }
    }

    /// Stops the background cleanup task for good (it also stops when the
    /// last handle on the store is dropped).
    pub fn stop_cleanup(&self) {
        self.inner.cleanup_started.store(true, Ordering::Release);
        if let Some(task) = self.inner.cleanup_task().take() {
            task.abort();
        }
    }

    /// Starts the cleanup task, once, on the current runtime.
    pub(super) fn ensure_cleanup(&self) {
        if self.inner.cleanup_started.load(Ordering::Acquire) {
            return;
        }
        let (Some(every), Ok(runtime)) = (
            self.inner.cleanup_every,
            tokio::runtime::Handle::try_current(),
        ) else {
            return;
        };
        let mut task = self.inner.cleanup_task();
        if self.inner.cleanup_started.swap(true, Ordering::AcqRel) {
            return;
        }
        *task = Some(spawn(&runtime, Arc::downgrade(&self.inner), every));
    }
}
