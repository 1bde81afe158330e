//! [`Running`]: an operation while it runs under its lease.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::key::StoreKey;
use crate::observe::{self, Event};
use crate::store::{LeaseStatus, OwnerToken, Store, StoreError};
use crate::time::deadline;

use super::lease::{Lease, mark_lost, release};

type Renewal = Pin<Box<dyn Future<Output = Result<LeaseStatus, StoreError>> + Send>>;

pin_project! {
    /// Polls the operation in place while renewing the lease every third of
    /// it, and releases the key if it is dropped before the operation ends
    /// (the operation panicked, or the runtime shut down under it).
    ///
    /// A hand-written future rather than an `async` block: an `async` block
    /// that takes the operation's future and awaits it keeps two copies of
    /// it (the captured one and the awaited one), and this one keeps one.
    /// The timer is created only if the operation is still pending after its
    /// first poll, so an operation that finishes at once costs no timer.
    ///
    /// Renewals that fail for longer than a lease mark the lease lost (the
    /// store may have let it expire, and another process may own the key).
    /// The operation's output comes with the [`Lease`] as it stands, for
    /// the completion that follows.
    pub(super) struct Running<St: Store, F> {
        #[pin]
        op: F,
        #[pin]
        tick: Option<Sleep>,
        renewal: Option<Renewal>,
        // `None` once the operation ended (the key is then settled by the caller).
        store: Option<St>,
        key: StoreKey,
        token: OwnerToken,
        lease: Duration,
        lost: Arc<AtomicBool>,
        renewing: bool,
        // When the store last confirmed the lease: the claim's reply, then
        // the sending of each renewal it accepted.
        state: Lease,
        // When the renewal under way was sent.
        renewal_sent: Instant,
    }

    impl<St: Store, F> PinnedDrop for Running<St, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(store) = this.store.take() {
                let (key, token) = (*this.key, *this.token);
                observe::event(Event::Failed, &key, None);
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move { release(&store, key, token).await });
                }
            }
        }
    }
}

impl<St: Store, F: Future> Running<St, F> {
    pub(super) fn new(
        op: F,
        store: St,
        key: StoreKey,
        token: OwnerToken,
        lease: Duration,
        lost: Arc<AtomicBool>,
    ) -> Self {
        let now = Instant::now();
        Self {
            op,
            tick: None,
            renewal: None,
            store: Some(store),
            key,
            token,
            lease,
            lost,
            renewing: true,
            state: Lease::new(now),
            renewal_sent: now,
        }
    }
}

impl<St: Store, F: Future> Future for Running<St, F> {
    type Output = (F::Output, Lease);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(output) = this.op.as_mut().poll(cx) {
            // Disarm the release: the caller stores or releases the outcome.
            *this.store = None;
            *this.renewal = None;
            let lease = Lease {
                confirmed: this.state.confirmed,
                lost: this.lost.load(Ordering::Acquire),
            };
            return Poll::Ready((output, lease));
        }
        let Some(store) = this.store.as_ref() else {
            return Poll::Pending;
        };
        let period = *this.lease / 3;
        while *this.renewing {
            if let Some(renewal) = this.renewal.as_mut() {
                let renewed = match renewal.as_mut().poll(cx) {
                    Poll::Pending => break,
                    Poll::Ready(renewed) => renewed,
                };
                *this.renewal = None;
                let answer = match renewed {
                    Ok(status) => Some(status),
                    Err(e) => {
                        observe::event(Event::StoreError, this.key, Some(&e));
                        None
                    }
                };
                // Failed renewals keep being tried while the lease may still
                // be valid (the store may come back before it ends).
                if this
                    .state
                    .renewed(*this.renewal_sent, answer, Instant::now(), *this.lease)
                {
                    mark_lost(this.lost, this.key);
                    *this.renewing = false;
                    break;
                }
            }
            let Some(mut tick) = this.tick.as_mut().as_pin_mut() else {
                this.tick.set(Some(tokio::time::sleep_until(deadline(
                    Instant::now(),
                    period,
                ))));
                continue;
            };
            if tick.as_mut().poll(cx).is_pending() {
                break;
            }
            *this.renewal_sent = tick.deadline();
            let next = deadline(tick.deadline(), period);
            tick.reset(next);
            let (store, key, token, lease) = (store.clone(), *this.key, *this.token, *this.lease);
            *this.renewal = Some(Box::pin(async move {
                observe::store_call("extend", store.extend(key, token, lease)).await
            }));
        }
        Poll::Pending
    }
}
