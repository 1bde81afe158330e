//! The bodies of the retry layer: the request body it sends (kept to be
//! sent again, or streamed once) and the response body it returns.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;

use crate::BoxError;

pin_project! {
    /// A body the retry layer keeps or streams. On requests, the inner
    /// client service takes it: the caller's body kept in memory (sent
    /// again on each attempt), or, when it was too large to keep, what was
    /// read of it followed by the rest, streamed once. On the layer's
    /// responses: the final attempt's own body, untouched, or (for a
    /// problem document it had to read to judge) the bytes it read,
    /// followed by the rest of the stream when the document was longer
    /// than it reads.
    #[derive(Debug)]
    pub struct RetryBody<B> {
        #[pin]
        state: Sending<B>,
    }
}

pin_project! {
    #[project = SendingProj]
    #[derive(Debug)]
    enum Sending<B> {
        // A body kept whole.
        Kept {
            data: Option<Bytes>,
            trailers: Option<HeaderMap>,
        },
        // A body streamed once: what was read while trying to keep it,
        // then the rest.
        Once {
            head: Option<Bytes>,
            #[pin]
            rest: B,
        },
        // The same, for a response body read in place to judge it: a body
        // that is not `Unpin` cannot move once polled, so it was boxed
        // before the first poll.
        Resumed {
            head: Option<Bytes>,
            rest: Pin<Box<B>>,
        },
    }
}

impl<B> RetryBody<B> {
    /// A kept body, to send (again).
    pub(crate) fn kept(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            state: Sending::Kept {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }

    /// A body to stream once: `head` (read already), then `rest`.
    pub(crate) fn once(head: Option<Bytes>, rest: B) -> Self {
        Self {
            state: Sending::Once { head, rest },
        }
    }

    /// A boxed body read in part: `head` (read already), then `rest`.
    pub(crate) fn resumed(head: Option<Bytes>, rest: Pin<Box<B>>) -> Self {
        Self {
            state: Sending::Resumed { head, rest },
        }
    }
}

impl<B> Body for RetryBody<B>
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
        match self.project().state.project() {
            SendingProj::Kept { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            SendingProj::Once { head, rest } => head_then(head, rest, cx),
            SendingProj::Resumed { head, rest } => head_then(head, rest.as_mut(), cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            Sending::Kept { data, trailers } => data.is_none() && trailers.is_none(),
            Sending::Once { head, rest } => head.is_none() && rest.is_end_stream(),
            Sending::Resumed { head, rest } => head.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            Sending::Kept { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Sending::Once { head, rest } => hint_after(head.as_ref(), rest.size_hint()),
            Sending::Resumed { head, rest } => hint_after(head.as_ref(), rest.size_hint()),
        }
    }
}

/// The next frame of a body read in part: `head`, then `rest`'s frames.
fn head_then<B>(
    head: &mut Option<Bytes>,
    rest: Pin<&mut B>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if let Some(head) = head.take() {
        return Poll::Ready(Some(Ok(Frame::data(head))));
    }
    rest.poll_frame(cx)
        .map(|f| f.map(|f| f.map_err(Into::into)))
}

/// The size of `head` followed by a body of size `rest`.
fn hint_after(head: Option<&Bytes>, rest: SizeHint) -> SizeHint {
    let head = head.map_or(0, |h| h.len() as u64);
    let mut hint = SizeHint::new();
    hint.set_lower(rest.lower().saturating_add(head));
    if let Some(upper) = rest.upper() {
        hint.set_upper(upper.saturating_add(head));
    }
    hint
}

/// What reading a body to keep it gave.
pub(crate) enum Read<B: Body> {
    /// The whole body, within the limit.
    Kept(Bytes, Option<HeaderMap>),
    /// Larger than the limit: what was read of it (if anything), then the
    /// rest, unread. To be streamed once.
    Once {
        /// What was read.
        head: Option<Bytes>,
        /// The rest of the body.
        rest: B,
    },
    /// The body failed before its end.
    Failed(B::Error),
}

/// Reads `body` to keep it, up to `limit` bytes.
pub(crate) async fn keep<B>(mut body: B, limit: usize) -> Read<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    // A body that says it is larger than the limit is not read at all.
    if body.size_hint().lower() > limit as u64 {
        return Read::Once {
            head: None,
            rest: body,
        };
    }
    let mut kept = bytes::BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        // What was read before a failure is not the body: sent, it would
        // reach the server as a whole (and executable) request.
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => return Read::Failed(e),
        };
        match frame.into_data() {
            Ok(data) => {
                if kept.len().saturating_add(data.len()) > limit {
                    kept.extend_from_slice(&data);
                    return Read::Once {
                        head: Some(kept.freeze()),
                        rest: body,
                    };
                }
                kept.extend_from_slice(&data);
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    Read::Kept(kept.freeze(), trailers)
}

impl<B> RetryBody<B> {
    /// A response's own body, passed through.
    pub(crate) fn passthrough(inner: B) -> Self {
        Self::once(None, inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    #[tokio::test]
    async fn a_body_within_the_limit_is_kept_and_sent_whole_each_time() {
        let Read::Kept(data, trailers) = keep(Full::new(Bytes::from_static(b"abc")), 3).await
        else {
            panic!("kept");
        };
        assert!(trailers.is_none());
        for _ in 0..2 {
            let sent = RetryBody::<Full<Bytes>>::kept(data.clone(), None)
                .collect()
                .await
                .unwrap()
                .to_bytes();
            assert_eq!(sent, "abc");
        }
    }

    #[tokio::test]
    async fn a_body_past_the_limit_is_streamed_once_whole() {
        let chunks = ["ab", "cd", "ef"].map(|c| {
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(c.as_bytes())))
        });
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        let Read::Once { head, rest } = keep(body, 3).await else {
            panic!("too large to keep");
        };
        let sent = RetryBody::once(head, rest)
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(sent, "abcdef", "nothing lost");
        let declared = Full::new(Bytes::from(vec![0u8; 10]));
        assert!(matches!(
            keep(declared, 3).await,
            Read::Once { head: None, .. }
        ));
    }

    /// A stream of `frames`, then an error.
    fn failing(frames: &[&'static str]) -> impl Body<Data = Bytes, Error = std::io::Error> + Unpin {
        let frames = frames
            .iter()
            .copied()
            .map(|f| Ok(Frame::data(Bytes::from_static(f.as_bytes()))))
            .chain([Err(std::io::Error::other("the stream broke"))])
            .collect::<Vec<_>>();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_body_that_fails_after_some_data_is_a_failure_not_a_shorter_body() {
        let Read::Failed(error) = keep(failing(&["part1"]), 1024).await else {
            panic!("the body failed: nothing of it may be sent");
        };
        assert_eq!(error.to_string(), "the stream broke");
    }

    #[tokio::test]
    async fn a_body_that_fails_before_any_data_is_a_failure_not_an_empty_body() {
        let Read::Failed(error) = keep(failing(&[]), 1024).await else {
            panic!("the body failed: an empty body may not be sent");
        };
        assert_eq!(error.to_string(), "the stream broke");
    }

    #[tokio::test]
    async fn a_long_body_is_read_only_to_the_limit_then_resumed_whole() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};

        const CHUNK: usize = 1024;
        const CHUNKS: usize = 1024;
        let chunk = |i: usize| Bytes::from(vec![(i % 251) as u8; CHUNK]);
        let pulled = Arc::new(AtomicUsize::new(0));
        let frames = {
            let pulled = pulled.clone();
            (0..CHUNKS).map(move |i| {
                pulled.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(Frame::data(chunk(i)))
            })
        };
        // Boxed, as a response body that need not be `Unpin` is.
        let body = Box::pin(StreamBody::new(futures_util::stream::iter(frames)));
        let Read::Once { head, rest } = keep(body, 64 * CHUNK).await else {
            panic!("longer than the limit");
        };
        assert_eq!(
            pulled.load(Ordering::SeqCst),
            65,
            "read up to the first frame past the limit, no further"
        );
        assert_eq!(head.as_ref().map(Bytes::len), Some(65 * CHUNK));
        let whole = RetryBody::resumed(head, rest)
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let expected: Vec<u8> = (0..CHUNKS).flat_map(|i| chunk(i).to_vec()).collect();
        assert_eq!(whole.len(), expected.len());
        assert!(whole == expected, "byte for byte");
        assert_eq!(pulled.load(Ordering::SeqCst), CHUNKS);
    }
}
