//! The request and response body types the layer hands out.
//!
//! Both are public structs over private enums (the tower-http shape), so new
//! paths can be added without breaking the API, and `http-body-util` types
//! never appear in it. Both forward `is_end_stream` and `size_hint`, and
//! both end with the trailers frame when there is one: a gRPC replay without
//! its `grpc-status` trailer would be a broken stream.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::BoxError;
use crate::engine::{Completion, Decider};

pin_project! {
    /// The request body the inner service receives.
    ///
    /// For a guarded request it holds the bytes the layer read (to
    /// fingerprint them), exactly as sent, and the request's trailers; for a
    /// request the layer passes through it is the original body, untouched.
    pub struct RequestBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    /// The response body the layer returns.
    ///
    /// It is the inner service's own body when the response is passed
    /// through, or the stored bytes (and trailers) of a replay, or a refusal.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] inner: B },
        // Trailers are rare outside gRPC and a `HeaderMap` is 96 bytes:
        // boxed, they keep every body (and every response moved) small.
        Full { data: Option<Bytes>, trailers: Option<Box<HeaderMap>> },
        // What was buffered, then the rest of the inner body.
        Chained { prefix: Option<Bytes>, rest: Pin<Box<B>> },
        // What was buffered, then the error that stopped the inner body.
        Failed { prefix: Option<Bytes>, error: Option<BoxError> },
        Deciding { prefix: Option<Bytes>, rest: Pin<Box<B>>, decide: Option<Box<DecideAtEnd>> },
    }
}

/// How a response streamed to its caller ended, for an [`DecideAtEnd`].
pub(crate) enum End<'a> {
    /// It ended normally, with these trailers (if any).
    Finished(Option<&'a HeaderMap>),
    /// Its stream failed.
    Broke,
    /// The caller dropped it before the end.
    Dropped,
}

/// Decides a [`Completion::Later`](crate::engine::Completion::Later) once
/// the response it belongs to has been streamed to its end (or not).
pub(crate) struct DecideAtEnd {
    decider: Option<Decider>,
    decision: Option<Box<Decision>>,
}

type Decision = dyn FnOnce(End<'_>) -> Completion + Send + Sync;

impl DecideAtEnd {
    pub(crate) fn new(
        decider: Decider,
        decision: impl FnOnce(End<'_>) -> Completion + Send + Sync + 'static,
    ) -> Self {
        Self {
            decider: Some(decider),
            decision: Some(Box::new(decision)),
        }
    }

    fn end(&mut self, how: End<'_>) {
        if let (Some(decider), Some(decision)) = (self.decider.take(), self.decision.take()) {
            decider.decide(decision(how));
        }
    }
}

impl Drop for DecideAtEnd {
    fn drop(&mut self) {
        // Dropped while a panic unwinds (the body panicked as the caller
        // polled it): the stream broke off. Both are an unknown outcome;
        // the distinction is for the decision to see.
        if std::thread::panicking() {
            self.end(End::Broke);
        } else {
            self.end(End::Dropped);
        }
    }
}

/// A response body panicked while the layer read it, after its head: the
/// handler acted and its outcome is unknown, as when a body breaks off.
///
/// The panic is caught where the body is polled ([`next_frame`]) rather
/// than left to unwind: unwinding through the execution would drop its
/// lease guard, which releases the key, and a retry would run the handler
/// again.
#[derive(Debug, thiserror::Error)]
#[error("the response body panicked after its head: {message}")]
pub(crate) struct BodyPanicked {
    message: String,
}

impl BodyPanicked {
    fn new(payload: &(dyn std::any::Any + Send + 'static)) -> Self {
        let message = if let Some(message) = payload.downcast_ref::<&'static str>() {
            (*message).to_owned()
        } else if let Some(message) = payload.downcast_ref::<String>() {
            message.clone()
        } else {
            "(a panic payload that is not a string)".to_owned()
        };
        Self { message }
    }
}

/// The next frame of `body`, as [`http_body_util::BodyExt::frame`] gives
/// it, or the panic that polling it raised ([`BodyPanicked`]). After a
/// panic the body must not be polled again.
pub(crate) async fn next_frame<B: Body>(
    mut body: Pin<&mut B>,
) -> Result<Option<Result<Frame<B::Data>, B::Error>>, BodyPanicked> {
    std::future::poll_fn(|cx| {
        // The body is never polled again after a panic (the caller drops
        // it), so nothing observes the state the panic left it in.
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            body.as_mut().poll_frame(cx)
        }));
        match polled {
            Ok(Poll::Ready(frame)) => Poll::Ready(Ok(frame)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(BodyPanicked::new(&*payload))),
        }
    })
    .await
}

fn non_empty(data: Bytes) -> Option<Bytes> {
    (!data.is_empty()).then_some(data)
}

impl<B> Kind<B> {
    fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Kind::Full {
            data: non_empty(data),
            trailers: trailers.map(Box::new),
        }
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn passthrough(inner: B) -> Self {
        Self {
            kind: Kind::Inner { inner },
        }
    }

    /// A body with nothing in it, left behind while the real one is read.
    pub(crate) fn empty() -> Self {
        Self::buffered(Bytes::new(), None)
    }

    pub(crate) fn buffered(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: Kind::full(data, trailers),
        }
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(inner: B) -> Self {
        Self {
            kind: Kind::Inner { inner },
        }
    }

    pub(crate) fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: Kind::full(data, trailers),
        }
    }

    pub(crate) fn chained(prefix: Bytes, rest: Pin<Box<B>>) -> Self {
        Self {
            kind: Kind::Chained {
                prefix: non_empty(prefix),
                rest,
            },
        }
    }

    /// `prefix`, then the rest of the stream, whose end `decide` decides on.
    pub(crate) fn deciding_at_end(prefix: Bytes, rest: Pin<Box<B>>, decide: DecideAtEnd) -> Self {
        Self {
            kind: Kind::Deciding {
                prefix: non_empty(prefix),
                rest,
                decide: Some(Box::new(decide)),
            },
        }
    }

    pub(crate) fn failed(prefix: Bytes, error: BoxError) -> Self {
        Self {
            kind: Kind::Failed {
                prefix: non_empty(prefix),
                error: Some(error),
            },
        }
    }
}

impl<B> Kind<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            KindProj::Inner { inner } => inner.poll_frame(cx).map_err(Into::into),
            KindProj::Full { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(*t))))
            }
            KindProj::Chained { prefix, rest } => {
                if let Some(prefix) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                rest.as_mut().poll_frame(cx).map_err(Into::into)
            }
            KindProj::Failed { prefix, error } => {
                if let Some(prefix) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                Poll::Ready(error.take().map(Err))
            }
            KindProj::Deciding {
                prefix,
                rest,
                decide,
            } => {
                if let Some(prefix) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                let polled = rest.as_mut().poll_frame(cx).map_err(Into::into);
                if let (Poll::Ready(end), Some(j)) = (&polled, decide.as_mut()) {
                    match end {
                        Some(Ok(frame)) => {
                            if let Some(trailers) = frame.trailers_ref() {
                                j.end(End::Finished(Some(trailers)));
                            }
                        }
                        Some(Err(_)) => j.end(End::Broke),
                        None => j.end(End::Finished(None)),
                    }
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Kind::Inner { inner } => inner.is_end_stream(),
            Kind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Chained { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
            Kind::Failed { prefix, error } => prefix.is_none() && error.is_none(),
            // Never ends early: its decision must see the end.
            Kind::Deciding { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        let len = |b: &Option<Bytes>| b.as_ref().map_or(0, |b| b.len() as u64);
        match self {
            Kind::Inner { inner } => inner.size_hint(),
            Kind::Full { data, .. } => SizeHint::with_exact(len(data)),
            Kind::Chained { prefix, rest } | Kind::Deciding { prefix, rest, .. } => {
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(len(prefix)));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(len(prefix)));
                }
                hint
            }
            Kind::Failed { prefix, .. } => {
                let mut hint = SizeHint::new();
                hint.set_lower(len(prefix));
                hint
            }
        }
    }
}

/// The data frames of a body, joined. A body sent in one frame (the common
/// case) is kept as it came: no copy, no allocation.
#[derive(Default)]
pub(crate) struct Gathered {
    first: Option<Bytes>,
    more: Option<BytesMut>,
}

impl Gathered {
    pub(crate) fn len(&self) -> usize {
        match (&self.first, &self.more) {
            (_, Some(buf)) => buf.len(),
            (Some(first), None) => first.len(),
            (None, None) => 0,
        }
    }

    pub(crate) fn push(&mut self, chunk: Bytes) {
        match (&self.first, &mut self.more) {
            (_, Some(buf)) => buf.extend_from_slice(&chunk),
            (None, None) => self.first = Some(chunk),
            (Some(first), None) => {
                let mut buf = BytesMut::with_capacity(first.len() + chunk.len());
                buf.extend_from_slice(first);
                buf.extend_from_slice(&chunk);
                self.more = Some(buf);
            }
        }
    }

    pub(crate) fn into_bytes(self) -> Bytes {
        match (self.first, self.more) {
            (_, Some(buf)) => buf.freeze(),
            (first, None) => first.unwrap_or_default(),
        }
    }
}

/// Adds a trailers frame to those already seen (a body may send more than one).
pub(crate) fn merge_trailers(trailers: &mut Option<HeaderMap>, more: HeaderMap) {
    match trailers {
        Some(existing) => existing.extend(more),
        None => *trailers = Some(more),
    }
}

macro_rules! forward_body {
    ($ty:ident) => {
        impl<B> Body for $ty<B>
        where
            B: Body<Data = Bytes>,
            B::Error: Into<BoxError>,
        {
            type Data = Bytes;
            type Error = BoxError;

            #[inline]
            fn poll_frame(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
                self.project().kind.poll_frame(cx)
            }

            #[inline]
            fn is_end_stream(&self) -> bool {
                self.kind.is_end_stream()
            }

            #[inline]
            fn size_hint(&self) -> SizeHint {
                self.kind.size_hint()
            }
        }

        impl<B> std::fmt::Debug for $ty<B> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let variant = match &self.kind {
                    Kind::Inner { .. } => "Inner",
                    Kind::Full { .. } => "Full",
                    Kind::Chained { .. } => "Chained",
                    Kind::Failed { .. } => "Failed",
                    Kind::Deciding { .. } => "Deciding",
                };
                f.debug_struct(stringify!($ty))
                    .field("kind", &variant)
                    .finish()
            }
        }
    };
}

forward_body!(RequestBody);
forward_body!(ResponseBody);

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[test]
    fn a_body_in_one_frame_is_kept_without_a_copy() {
        let chunk = Bytes::from(vec![7u8; 100]);
        let mut gathered = Gathered::default();
        gathered.push(chunk.clone());
        assert_eq!(gathered.len(), 100);
        let data = gathered.into_bytes();
        assert_eq!(data.as_ptr(), chunk.as_ptr());
    }

    #[test]
    fn frames_are_joined_in_order() {
        let mut gathered = Gathered::default();
        assert_eq!(gathered.len(), 0);
        for part in [&b"ab"[..], b"", b"cde", b"f"] {
            gathered.push(Bytes::copy_from_slice(part));
        }
        assert_eq!(gathered.len(), 6);
        assert_eq!(gathered.into_bytes(), Bytes::from_static(b"abcdef"));
        assert!(Gathered::default().into_bytes().is_empty());
    }

    #[tokio::test]
    async fn full_body_yields_data_then_trailers_then_ends() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        let body: ResponseBody<Full<Bytes>> =
            ResponseBody::full(Bytes::from_static(b"abc"), Some(t.clone()));
        assert_eq!(body.size_hint().exact(), Some(3));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&t));
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"abc"));
    }

    #[tokio::test]
    async fn empty_full_body_is_end_of_stream_at_once() {
        let body: ResponseBody<Full<Bytes>> = ResponseBody::full(Bytes::new(), None);
        assert!(body.is_end_stream());
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "13".parse().unwrap());
        let trailers_only: ResponseBody<Full<Bytes>> =
            ResponseBody::full(Bytes::new(), Some(t.clone()));
        assert!(!trailers_only.is_end_stream());
        assert_eq!(trailers_only.collect().await.unwrap().trailers(), Some(&t));
    }

    #[tokio::test]
    async fn a_panic_while_a_body_is_polled_is_caught_as_an_error() {
        struct Panics;
        impl Body for Panics {
            type Data = Bytes;
            type Error = std::io::Error;
            fn poll_frame(
                self: Pin<&mut Self>,
                _cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
                panic!("boom");
            }
        }
        let mut panics = std::pin::pin!(Panics);
        let caught = next_frame(panics.as_mut()).await;
        assert!(
            matches!(&caught, Err(e) if e.to_string().contains("boom")),
            "{caught:?}"
        );
        let mut full = std::pin::pin!(Full::new(Bytes::from_static(b"x")));
        let first = next_frame(full.as_mut()).await;
        assert!(matches!(first, Ok(Some(Ok(ref frame))) if frame.is_data()));
        assert!(matches!(next_frame(full.as_mut()).await, Ok(None)));
    }

    #[tokio::test]
    async fn chained_and_failed_bodies_keep_the_prefix() {
        let rest = Box::pin(Full::new(Bytes::from_static(b"world")));
        let body = ResponseBody::chained(Bytes::from_static(b"hello "), rest);
        assert_eq!(body.size_hint().exact(), Some(11));
        assert_eq!(
            body.collect().await.unwrap().to_bytes(),
            Bytes::from_static(b"hello world")
        );

        let failed: ResponseBody<Full<Bytes>> =
            ResponseBody::failed(Bytes::from_static(b"x"), "boom".into());
        let mut failed = std::pin::pin!(failed);
        assert!(failed.frame().await.unwrap().unwrap().is_data());
        assert!(failed.frame().await.unwrap().is_err());
        assert!(failed.frame().await.is_none());
    }
}
