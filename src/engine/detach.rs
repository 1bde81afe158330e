//! [`Detachable`]: a future that runs in its caller's task while the caller
//! waits for it, and carries on in a task of its own if the caller goes away.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Polls an execution inline, in the task of whoever awaits it, which costs
/// no task spawn, no task switch and no cross-thread wake-up. If it is
/// dropped before the execution finishes (the client disconnected, a timeout
/// layer gave up), the rest of the execution is spawned onto the current
/// tokio runtime, so dropping the caller never cancels it.
///
/// An execution that panicked is not spawned again: the panic unwound through
/// the caller's poll (as an inline call's would), and the execution's own
/// guards ran during the unwinding.
pub(super) struct Detachable<F: Future + Send + 'static> {
    /// Boxed so that it can move to a task after it was first polled.
    fut: Option<Pin<Box<F>>>,
    /// Set while the execution is polled; left set if the poll unwound.
    panicked: bool,
}

impl<F: Future + Send + 'static> Detachable<F> {
    pub(super) fn new(fut: F) -> Self {
        Self {
            fut: Some(Box::pin(fut)),
            panicked: false,
        }
    }
}

impl<F: Future + Send + 'static> Future for Detachable<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Some(fut) = this.fut.as_mut() else {
            // Only the engine polls it, and never after it is ready.
            return Poll::Pending;
        };
        this.panicked = true;
        let poll = fut.as_mut().poll(cx);
        this.panicked = false;
        if poll.is_ready() {
            this.fut = None;
        }
        poll
    }
}

impl<F: Future + Send + 'static> Drop for Detachable<F> {
    fn drop(&mut self) {
        let Some(fut) = self.fut.take() else { return };
        if self.panicked {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    // Its outcome is stored by the execution itself; the
                    // value was for the caller, who is gone.
                    drop(fut.await);
                });
            }
            // Outside a runtime nothing can poll it: dropping it releases
            // what it can, and its claim expires with its lease.
            Err(_) => tracing::warn!(
                "an idempotent execution was dropped outside a tokio runtime and cannot finish"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn runs_inline_when_awaited() {
        let here = std::thread::current().id();
        let ran_on = Detachable::new(async { std::thread::current().id() }).await;
        assert_eq!(ran_on, here);
    }

    #[tokio::test]
    async fn finishes_in_a_task_of_its_own_when_dropped_midway() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let finished = Arc::new(AtomicBool::new(false));
        let mut detachable = Box::pin(Detachable::new({
            let finished = finished.clone();
            async move {
                let _ = rx.await;
                finished.store(true, Ordering::SeqCst);
            }
        }));
        // Polled once (it waits on the channel), then dropped.
        assert!(futures_poll_once(detachable.as_mut()).is_pending());
        drop(detachable);
        let metrics = tokio::runtime::Handle::current().metrics();
        assert_eq!(metrics.num_alive_tasks(), 1, "the rest runs in a task");
        tx.send(()).unwrap();
        for _ in 0..1000 {
            if finished.load(Ordering::SeqCst) {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the detached execution did not finish");
    }

    #[tokio::test]
    async fn a_panicked_execution_is_not_spawned_again() {
        let dropped = Arc::new(AtomicBool::new(false));
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = Flag(dropped.clone());
        let mut detachable = Box::pin(Detachable::new(async move {
            let _flag = flag;
            panic!("boom");
        }));
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            futures_poll_once(detachable.as_mut())
        }));
        assert!(unwound.is_err(), "the panic reaches the caller's poll");
        assert!(dropped.load(Ordering::SeqCst), "guards ran while unwinding");
        // Dropping it now must not spawn a task that resumes a panicked future
        // (which would panic again in that task).
        drop(detachable);
        let metrics = tokio::runtime::Handle::current().metrics();
        assert_eq!(metrics.num_alive_tasks(), 0, "nothing was spawned");
    }

    fn futures_poll_once<F: Future>(fut: Pin<&mut F>) -> Poll<F::Output> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        fut.poll(&mut cx)
    }
}
