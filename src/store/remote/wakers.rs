//! [`Wakers`]: the local waiters of each key, for a store whose wake-ups
//! come from its server (Redis pub/sub, PostgreSQL `LISTEN`).
//!
//! A store registers a waiter's interest in a key name, and its dispatcher
//! task wakes every local waiter of a name when the server says the name's
//! claim is gone. Names nobody waits on are forgotten as their last waiter
//! leaves, so the map is bounded by the number of waiting requests. The
//! dispatcher task itself is kept by a [`Subscription`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use tokio::sync::Notify;

/// The waiters of each key name. See the [module docs](self).
#[derive(Debug, Default)]
pub(crate) struct Wakers {
    map: Mutex<HashMap<String, Weak<Notify>>>,
}

impl Wakers {
    /// Registers interest in `name` until the registration is dropped.
    pub(crate) fn register(self: &Arc<Self>, name: &str) -> Registration {
        let notify = {
            let mut map = self.lock();
            match map.get(name).and_then(Weak::upgrade) {
                Some(existing) => existing,
                None => {
                    let fresh = Arc::new(Notify::new());
                    map.insert(name.to_owned(), Arc::downgrade(&fresh));
                    fresh
                }
            }
        };
        Registration {
            notify,
            name: name.to_owned(),
            wakers: self.clone(),
        }
    }

    /// Wakes every waiter registered on `name` now.
    pub(crate) fn wake(&self, name: &str) {
        let target = self.lock().get(name).and_then(Weak::upgrade);
        if let Some(notify) = target {
            notify.notify_waiters();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<Notify>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A waiter's interest in one key name; dropping it forgets the name when
/// it was the last one.
#[derive(Debug)]
pub(crate) struct Registration {
    notify: Arc<Notify>,
    name: String,
    wakers: Arc<Wakers>,
}

impl Registration {
    /// Completes at the next wake-up of the name (create it before checking
    /// the key, so a wake-up in between is not missed).
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = self.wakers.lock();
        // Ours is the last strong reference: nobody else waits on this name.
        if Arc::strong_count(&self.notify) == 1 {
            map.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wake_reaches_every_waiter_of_the_name_and_names_are_forgotten() {
        let wakers = Arc::new(Wakers::default());
        let a = wakers.register("k");
        let b = wakers.register("k");
        let other = wakers.register("other");
        {
            let (na, nb, no) = (a.notified(), b.notified(), other.notified());
            tokio::pin!(na, nb, no);
            na.as_mut().enable();
            nb.as_mut().enable();
            no.as_mut().enable();
            wakers.wake("k");
            na.await;
            nb.await;
            assert!(
                futures_util::FutureExt::now_or_never(no).is_none(),
                "another name is not woken"
            );
        }
        drop((a, b, other));
        assert!(wakers.lock().is_empty());
    }
}

/// The task that routes a store's wake-ups to its [`Wakers`]: opened on the
/// first wait, opened again by a later wait once it ended (its connection
/// broke), but not more often than once per `retry_every`, and within
/// `open_timeout`. Aborted when dropped.
#[derive(Debug)]
pub(crate) struct Subscription {
    open_timeout: std::time::Duration,
    retry_every: std::time::Duration,
    state: tokio::sync::Mutex<SubscriptionState>,
}

#[derive(Debug, Default)]
struct SubscriptionState {
    task: Option<tokio::task::JoinHandle<()>>,
    last_attempt: Option<tokio::time::Instant>,
}

impl Subscription {
    pub(crate) fn new(open_timeout: std::time::Duration, retry_every: std::time::Duration) -> Self {
        Self {
            open_timeout,
            retry_every,
            state: tokio::sync::Mutex::default(),
        }
    }

    /// Makes sure the task runs, starting it with `open` if it does not and
    /// the last attempt is old enough. Best effort: when it cannot be
    /// opened, waiters fall back to re-checking their keys.
    pub(crate) async fn ensure<F, E>(&self, open: F)
    where
        F: Future<Output = Result<tokio::task::JoinHandle<()>, E>>,
        E: std::error::Error + 'static,
    {
        let mut state = self.state.lock().await;
        if state.task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let now = tokio::time::Instant::now();
        if state
            .last_attempt
            .is_some_and(|at| now < crate::time::deadline(at, self.retry_every))
        {
            return;
        }
        state.last_attempt = Some(now);
        match tokio::time::timeout(self.open_timeout, open).await {
            Ok(Ok(task)) => state.task = Some(task),
            Ok(Err(e)) => {
                let error = crate::store::error_chain(&e);
                // A certificate that does not verify will not fix itself:
                // say so where an operator looks.
                #[cfg(feature = "tls")]
                if crate::store::tls::is_a_certificate_error(&e) {
                    tracing::warn!(
                        %error,
                        "idempotency notifications: the server's TLS certificate did not verify; waiters re-check instead"
                    );
                    return;
                }
                tracing::debug!(%error, "idempotency notifications unavailable; waiters re-check instead")
            }
            Err(_) => {
                tracing::debug!("idempotency notifications timed out; waiters re-check instead")
            }
        }
    }

    /// Ends the task (its connection may be half-open), so that the next
    /// wait opens a new one at once. Best effort: skipped while one is being
    /// opened.
    #[cfg(feature = "redis")]
    pub(crate) fn reset(&self) {
        if let Ok(mut state) = self.state.try_lock() {
            if let Some(task) = state.task.take() {
                task.abort();
            }
            state.last_attempt = None;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(task) = self.state.get_mut().task.take() {
            task.abort();
        }
    }
}
