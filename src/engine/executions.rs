//! [`Executions`]: the executions an engine is running, for a graceful
//! shutdown to wait on.

use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Counts the executions running in an engine's tasks, so a server can let
/// them finish (and be stored) before it exits.
///
/// Executions are detached from their callers, so a graceful HTTP shutdown,
/// which waits for open connections, does not wait for an execution whose
/// client already went away. [`wait_idle`](Self::wait_idle) does.
#[derive(Debug, Clone, Default)]
pub struct Executions {
    inner: Arc<ExecutionsInner>,
}

#[derive(Debug, Default)]
struct ExecutionsInner {
    running: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

impl Executions {
    /// How many executions are running now.
    pub fn running(&self) -> usize {
        self.inner.running.load(Ordering::Acquire)
    }

    /// Waits until no execution is running.
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.inner.idle.notified();
            if self.running() == 0 {
                return;
            }
            idle.await;
        }
    }

    pub(super) fn start(&self) -> ExecutionGuard {
        self.inner.running.fetch_add(1, Ordering::AcqRel);
        ExecutionGuard(self.inner.clone())
    }
}

pub(super) struct ExecutionGuard(Arc<ExecutionsInner>);

impl Drop for ExecutionGuard {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
