//! Releasing orphans (claims whose reply never came back), in the
//! background and within a bound.
//!
//! An orphan (a timeout, a dropped connection, a caller that went away
//! while its claim was under way) may still have been applied: nobody
//! would own it, and duplicates would wait for it until its lease ran out.
//! The claim's nonce is known, so the orphan can be released by it once
//! the store's server answers. These releases go through one bounded queue
//! per store and one worker task that sends them one at a time, so that an
//! outage at thousands of requests a second costs a fixed amount of memory
//! and no task per request, and the server is not flooded when it comes
//! back. When the queue is full, an orphan is left to expire with its
//! lease.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::mpsc;

use super::Remote;
use crate::time::Backoff;

/// How many orphans may wait to be released, per store.
pub(crate) const QUEUE_BOUND: usize = 1024;
use tokio::time::Instant;

/// The pauses after releases that failed: 50 ms, doubling up to 1 s.
const RETRY: Backoff = Backoff::new(Duration::from_millis(50), 2.0, Duration::from_secs(1));

/// A claim whose reply never came back (an "orphan": it may have been
/// applied with nobody to own it): its key name and nonce, and when its
/// lease ends (after which releasing it is pointless).
#[derive(Debug)]
pub(crate) struct Orphan {
    pub(crate) name: String,
    pub(crate) nonce: u64,
    pub(crate) until: Instant,
}

impl Orphan {
    /// The claim on `name` sent now with `nonce`, for `lease`.
    pub(crate) fn new(name: String, nonce: u64, lease: Duration) -> Self {
        Self {
            name,
            nonce,
            until: crate::time::deadline(Instant::now(), lease),
        }
    }

    /// How long a release that found no claim leaves the nonce behind for
    /// a late copy of the claim to meet: the lease left, and the fence
    /// memory after it (as long as the claim's entry would have lived).
    pub(crate) fn keep(&self, fence_memory: Duration) -> Duration {
        self.until
            .saturating_duration_since(Instant::now())
            .saturating_add(fence_memory)
    }
}

/// Sends releases of orphans, one at a time, through a bounded queue.
pub(crate) struct Abandoner {
    queue: OnceLock<mpsc::UnboundedSender<Orphan>>,
    pending: Arc<AtomicUsize>,
}

impl Abandoner {
    pub(crate) fn new() -> Self {
        Self {
            queue: OnceLock::new(),
            pending: Arc::default(),
        }
    }

    /// Orphans waiting to be released (queued or being retried).
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Queues `orphan` for release, starting the worker on first use; the
    /// worker makes its attempts through `remote` while it exists. Returns
    /// `false` when the queue is full or no runtime can run the worker: the
    /// orphan then expires with its lease.
    pub(crate) fn push<R: Remote>(&self, orphan: Orphan, remote: Weak<R>) -> bool {
        let queue = match self.queue.get() {
            Some(queue) => queue,
            None => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return false;
                };
                self.queue.get_or_init(|| {
                    // Bounded by `pending`, which counts the orphans queued
                    // and those the worker holds for another attempt.
                    let (tx, rx) = mpsc::unbounded_channel();
                    runtime.spawn(work(rx, Arc::downgrade(&self.pending), remote));
                    tx
                })
            }
        };
        // The gauge goes up before the worker can take it down.
        crate::observe::orphans_pending(1.0);
        if self.pending.fetch_add(1, Ordering::AcqRel) < QUEUE_BOUND && queue.send(orphan).is_ok() {
            return true;
        }
        crate::observe::orphans_pending(-1.0);
        self.pending.fetch_sub(1, Ordering::AcqRel);
        tracing::debug!("too many idempotency orphans queued; this one expires with its lease");
        false
    }
}

/// The worker: one release at a time, oldest first; while the server does not
/// answer it backs off, keeping the order, and drops orphans whose lease
/// has ended. It stops when the store (and so the queue's sender) is gone.
/// It holds the store weakly, and never across a pause.
async fn work<R: Remote>(
    mut rx: mpsc::UnboundedReceiver<Orphan>,
    pending: Weak<AtomicUsize>,
    remote: Weak<R>,
) {
    let mut retrying: VecDeque<Orphan> = VecDeque::new();
    let mut failures = 0u32;
    loop {
        let next = match retrying.pop_front() {
            Some(orphan) => orphan,
            None => match rx.recv().await {
                Some(orphan) => orphan,
                None => return,
            },
        };
        let settled = |n: usize| {
            if let Some(pending) = pending.upgrade() {
                pending.fetch_sub(n, Ordering::AcqRel);
            }
            crate::observe::orphans_pending(-(n as f64));
        };
        if Instant::now() >= next.until {
            settled(1);
            continue;
        }
        let released = {
            let Some(remote) = remote.upgrade() else {
                // The store is gone: what it queued will never be released
                // here, and must not stay in the gauge.
                rx.close();
                let mut left = 1 + retrying.len();
                while rx.try_recv().is_ok() {
                    left += 1;
                }
                crate::observe::orphans_pending(-(left as f64));
                return;
            };
            remote.abandon_once(&next).await
        };
        match released {
            Ok(()) => {
                settled(1);
                failures = 0;
            }
            Err(_) => {
                retrying.push_front(next);
                failures = failures.saturating_add(1);
                tokio::time::sleep(RETRY.before(failures)).await;
                // Take in what queued up meanwhile, behind the older ones,
                // dropping what expired.
                while let Ok(more) = rx.try_recv() {
                    retrying.push_back(more);
                }
                let before = retrying.len();
                let now = Instant::now();
                retrying.retain(|orphan| orphan.until > now);
                settled(before - retrying.len());
            }
        }
    }
}
