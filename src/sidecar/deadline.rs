//! [`DeadlineBody`]: a body that must end by a deadline, on both sides of
//! the proxy.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::BoxError;

pin_project! {
    /// A body that ends with a [`BodyTimedOut`] error if it has not ended by
    /// its deadline: a peer that stops sending, or trickles forever, must
    /// not hold a request (its key, its lease, its connection's place, the
    /// shutdown drain) for as long as its socket stays open.
    pub(super) struct DeadlineBody<B> {
        #[pin]
        inner: B,
        // Boxed: the upstream client takes only `Unpin` bodies.
        timer: Pin<Box<Sleep>>,
        deadline: Instant,
        what: &'static str,
        limit: Duration,
    }
}

impl<B> DeadlineBody<B> {
    /// `inner`, which must end by `deadline`; `what` names it and `limit`
    /// is the bound it was given, for the error.
    pub(super) fn new(inner: B, deadline: Instant, what: &'static str, limit: Duration) -> Self {
        Self {
            inner,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            deadline,
            what,
            limit,
        }
    }
}

/// A body did not end within its bound.
#[derive(Debug, thiserror::Error)]
#[error("{what} did not end within {limit:?}")]
pub(super) struct BodyTimedOut {
    what: &'static str,
    limit: Duration,
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let timed_out = || {
            let error = BodyTimedOut {
                what: this.what,
                limit: *this.limit,
            };
            Poll::Ready(Some(Err(error.into())))
        };
        // The clock first: a body that always has more ready is bounded too
        // (the timer only says so once the runtime has fired it).
        if Instant::now() >= *this.deadline {
            return timed_out();
        }
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match this.timer.as_mut().poll(cx) {
            Poll::Ready(()) => timed_out(),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_fails_at_its_deadline() {
        let stalls = StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, std::convert::Infallible>,
        >());
        let limit = Duration::from_secs(3);
        let started = Instant::now();
        let body = DeadlineBody::new(stalls, started + limit, "the test body", limit);
        let error = body.collect().await.err().map(|e| e.to_string());
        assert_eq!(
            error.as_deref(),
            Some("the test body did not end within 3s")
        );
        assert_eq!(started.elapsed(), limit);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_with_more_always_ready_fails_past_its_deadline() {
        let endless = StreamBody::new(futures_util::stream::repeat_with(|| {
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"x")))
        }));
        let limit = Duration::from_secs(1);
        let mut body = Box::pin(DeadlineBody::new(
            endless,
            Instant::now() + limit,
            "endless",
            limit,
        ));
        assert!(body.frame().await.is_some_and(|f| f.is_ok()));
        tokio::time::advance(limit).await;
        assert!(body.frame().await.is_some_and(|f| f.is_err()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_ends_in_time_is_untouched() {
        let limit = Duration::from_secs(1);
        let body = DeadlineBody::new(
            Full::new(Bytes::from_static(b"whole")),
            Instant::now() + limit,
            "whole",
            limit,
        );
        assert_eq!(body.collect().await.unwrap().to_bytes(), "whole");
    }
}
