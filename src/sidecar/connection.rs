//! One client connection: its limits (first request, idle), what it has
//! in flight, and the task that closes it when a limit passes.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a connection may stay without a request.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConnectionLimits {
    /// From accept to its first request: protocol detection, the HTTP/2
    /// preface and the first head alike.
    pub(super) first_request: Duration,
    /// With nothing in flight, after its last request.
    pub(super) idle: Duration,
    /// From a graceful close (idle, or the server stopping) to its end, with
    /// nothing in flight: a peer that ignores the close is cut off.
    pub(super) grace: Duration,
}

/// What a connection's requests tell its supervisor.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Load {
    /// Requests being handled, their response bodies included.
    in_flight: usize,
    /// How many requests have ended: a change means the connection was
    /// busy since it was last looked at.
    ended: u64,
}

impl Load {
    /// Whether any request has arrived (one is in flight, or one ended).
    pub(super) fn arrived(&self) -> bool {
        self.in_flight > 0 || self.ended > 0
    }
}

/// One request being handled, counted in its connection's [`Load`] until
/// dropped.
pub(super) struct Handling(Arc<watch::Sender<Load>>);

impl Handling {
    pub(super) fn begin(load: Arc<watch::Sender<Load>>) -> Self {
        load.send_modify(|load| {
            load.in_flight = load.in_flight.saturating_add(1);
        });
        Self(load)
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.send_modify(|load| {
            load.in_flight = load.in_flight.saturating_sub(1);
            load.ended = load.ended.saturating_add(1);
        });
    }
}

pin_project! {
    /// A response body that keeps its request counted until it is dropped
    /// (sent, or abandoned), so that a connection streaming a response is
    /// never taken for idle.
    pub(super) struct Tracked<B> {
        #[pin]
        inner: B,
        handling: Handling,
    }
}

impl<B> Tracked<B> {
    pub(super) fn new(inner: B, handling: Handling) -> Self {
        Self { inner, handling }
    }
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Drives one client connection to its end, and closes it when it has gone
/// too long without a request: from accept to the first request (so a peer
/// that sends nothing, or half an HTTP/2 preface, frees its place), and
/// idle after its last one, HTTP/1 and HTTP/2 alike. A connection asked to
/// close gracefully (idle, or the server stopping) that has nothing in
/// flight and is still open after the grace period is dropped. Returns the
/// connection's error, if it ended with one.
pub(super) async fn supervise<C, E>(
    connection: C,
    close_gracefully: impl Fn(Pin<&mut C>),
    mut load: watch::Receiver<Load>,
    mut stopping: watch::Receiver<bool>,
    limits: ConnectionLimits,
) -> Option<E>
where
    C: Future<Output = Result<(), E>>,
{
    let mut connection = std::pin::pin!(connection);
    let accepted = Instant::now();
    let mut idle_since = accepted;
    let mut closing_since: Option<Instant> = None;
    let mut load_open = true;
    let mut stop_open = true;
    let mut ended = 0;
    loop {
        let now = *load.borrow_and_update();
        if now.ended != ended {
            // Requests ended since the last look: idle from now on.
            ended = now.ended;
            idle_since = Instant::now();
        }
        let wake = if now.in_flight > 0 {
            None
        } else if let Some(since) = closing_since {
            // From the later of the close and the last request's end: a
            // response that just ended gets the whole grace to be flushed.
            Some(crate::time::deadline(since.max(idle_since), limits.grace))
        } else if !now.arrived() {
            Some(crate::time::deadline(accepted, limits.first_request))
        } else {
            Some(crate::time::deadline(idle_since, limits.idle))
        };
        let far = crate::time::deadline(Instant::now(), crate::time::FAR_FUTURE);
        tokio::select! {
            result = connection.as_mut() => return result.err(),
            changed = load.changed(), if load_open => {
                // Looked at from the top of the loop.
                if changed.is_err() {
                    load_open = false;
                }
            }
            () = tokio::time::sleep_until(wake.unwrap_or(far)), if wake.is_some() => {
                // A request may have begun (or ended) since `now` was
                // read: take the change in first, then look again.
                if load.has_changed().unwrap_or(false) {
                    continue;
                }
                if closing_since.is_some() || !now.arrived() {
                    // No request of its own to lose: cut it off.
                    return None;
                }
                close_gracefully(connection.as_mut());
                closing_since = Some(Instant::now());
            }
            stopped = stopping.changed(), if stop_open && closing_since.is_none() => {
                if stopped.is_err() {
                    stop_open = false;
                }
                close_gracefully(connection.as_mut());
                closing_since = Some(Instant::now());
            }
        }
    }
}
