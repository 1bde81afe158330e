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
    /// The request body the retry layer sends: the caller's body kept in
    /// memory (sent again on each attempt), or, when it was too large to
    /// keep, what was read of it followed by the rest, streamed once. The
    /// inner client service takes requests with this body. (The layer's
    /// responses carry it too, as [`RetryResponseBody`].)
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
            SendingProj::Once { head, rest } => {
                if let Some(head) = head.take() {
                    return Poll::Ready(Some(Ok(Frame::data(head))));
                }
                rest.poll_frame(cx)
                    .map(|f| f.map(|f| f.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            Sending::Kept { data, trailers } => data.is_none() && trailers.is_none(),
            Sending::Once { head, rest } => head.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            Sending::Kept { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Sending::Once { head, rest } => {
                let head = head.as_ref().map_or(0, |h| h.len() as u64);
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(head));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(head));
                }
                hint
            }
        }
    }
}

/// What reading a request body to keep it gave.
pub(crate) enum Read<B> {
    /// The whole body, within the limit.
    Kept(Bytes, Option<HeaderMap>),
    /// Too large (or failing): to be streamed once.
    Once(RetryBody<B>),
}

/// Reads `body` to keep it, up to `limit` bytes.
pub(crate) async fn keep<B>(mut body: B, limit: usize) -> Read<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    // A body that says it is larger than the limit is not read at all.
    if body.size_hint().lower() > limit as u64 {
        return Read::Once(RetryBody::once(None, body));
    }
    let mut kept = bytes::BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            // Send what was read and let the rest fail where it will.
            break;
        };
        match frame.into_data() {
            Ok(data) => {
                if kept.len().saturating_add(data.len()) > limit {
                    kept.extend_from_slice(&data);
                    return Read::Once(RetryBody::once(Some(kept.freeze()), body));
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

/// The response body the retry layer returns: the final attempt's own body,
/// untouched, or (for a 409 problem document it had to read to judge) the
/// bytes it read. The same type as [`RetryBody`]: kept bytes, or a stream.
pub type RetryResponseBody<B> = RetryBody<B>;

impl<B> RetryBody<B> {
    /// A response's own body, passed through.
    pub(crate) fn passthrough(inner: B) -> Self {
        Self::once(None, inner)
    }

    /// A body that was read whole.
    pub(crate) fn read(data: Bytes) -> Self {
        Self::kept(data, None)
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
        let Read::Once(once) = keep(body, 3).await else {
            panic!("too large to keep");
        };
        let sent = once.collect().await.unwrap().to_bytes();
        assert_eq!(sent, "abcdef", "nothing lost");
        let declared = Full::new(Bytes::from(vec![0u8; 10]));
        assert!(matches!(keep(declared, 3).await, Read::Once(_)));
    }
}
