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
        ExecutionGuard {
            executions: self.inner.clone(),
            started: crate::observe::execution_started(),
        }
    }
}

/// One running execution, counted until its key is settled.
pub(super) struct ExecutionGuard {
    executions: Arc<ExecutionsInner>,
    /// When it started (read only with the `metrics` feature).
    started: Option<std::time::Instant>,
}

impl Drop for ExecutionGuard {
    fn drop(&mut self) {
        crate::observe::execution_ended(self.started);
        if self.executions.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.executions.idle.notify_waiters();
        }
    }
}
