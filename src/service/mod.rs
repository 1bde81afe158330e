//! [`Idempotency`]: the service the layer builds.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;
use tracing::Instrument;

use crate::BoxError;
use crate::body::{RequestBody, ResponseBody};
use crate::config::Config;
use crate::engine::{Begun, Engine, EngineError, ExecutionContext};
use crate::fingerprint::FingerprintHasher;
use crate::future::ResponseFuture;
use crate::grpc;
use crate::key::{IdempotencyKey, Scope, StoreKey};
use crate::observe::{self, Event};
use crate::problem::{Problem, ProblemKind};
use crate::store::{RequestLabel, Store, StoreErrorKind};

mod request;
mod response;

use request::{Pending, ReadError, prepare, read_body, too_large};
use response::{decide_completion, refusal, refusal_for, replay};

/// Middleware that makes the inner service safe to retry. Built by
/// [`IdempotencyLayer`](crate::IdempotencyLayer).
///
/// The inner service receives `Request<RequestBody<ReqBody>>`: for a guarded
/// request the body holds the bytes the layer read, exactly as sent; for
/// others it is the original body.
#[derive(Clone)]
pub struct Idempotency<S, St> {
    pub(crate) inner: S,
    /// One `Arc`, so that cloning the service (which axum does per request)
    /// costs one reference count.
    pub(crate) shared: Arc<Shared<St>>,
}

/// What every clone of an [`Idempotency`] shares.
pub(crate) struct Shared<St> {
    pub(crate) engine: Engine<St>,
    pub(crate) config: Config,
}

impl<S: fmt::Debug, St: fmt::Debug> fmt::Debug for Idempotency<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("engine", &self.shared.engine)
            .field("config", &self.shared.config)
            .finish()
    }
}

impl<S, St> Idempotency<S, St> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the middleware, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// What the inner service sees in the request's extensions on a guarded
/// request: the scope, the key, the fingerprint and the owner token, so a
/// handler can key its own rows by them (the only road to exactly-once
/// inside a database), and whether its lease was lost.
#[derive(Debug, Clone)]
pub struct IdempotencyInfo {
    scope: Scope,
    key: IdempotencyKey,
    execution: ExecutionContext,
}

impl IdempotencyInfo {
    /// The request's scope.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The client's idempotency key.
    pub fn key(&self) -> &IdempotencyKey {
        &self.key
    }

    /// The execution: store key, fingerprint, owner token, lease state.
    pub fn execution(&self) -> &ExecutionContext {
        &self.execution
    }
}

impl<S, St, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S, St>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: Store,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let config = &self.shared.config;
        // Unguarded methods cost this one check.
        let grpc = config
            .methods
            .contains(req.method())
            .then(|| grpc::is_grpc(req.headers()));
        let guarded = match grpc {
            None => false,
            // A layer cannot tell a streaming RPC from a unary one on the
            // wire: guard listed methods, or else calls that carry a key.
            Some(true) => match &config.grpc_methods {
                Some(methods) => methods.iter().any(|m| m == req.uri().path()),
                None => req.headers().contains_key(&config.key_header),
            },
            Some(false) => config.key_required || req.headers().contains_key(&config.key_header),
        };
        let grpc = grpc == Some(true);
        if !guarded {
            return ResponseFuture::passthrough(self.inner.call(req.map(RequestBody::passthrough)));
        }
        // What can be refused without waiting is refused here, so that the
        // boxed future carries only what the waiting needs.
        let (parts, body) = req.into_parts();
        let prepared = match prepare(config, &parts) {
            Ok(prepared) => prepared,
            Err((kind, detail)) => {
                let refusal = refusal_for(grpc, kind, detail);
                return ResponseFuture::guarded(Box::pin(std::future::ready(Ok(refusal))));
            }
        };
        let req = Request::from_parts(parts, RequestBody::passthrough(body));
        // The ready instance goes into the future; the clone stays behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let pending = Pending {
            inner,
            req,
            scope: prepared.scope,
            key: prepared.key,
        };
        let fut = guard(self.shared.clone(), pending, prepared.store_key, grpc);
        ResponseFuture::guarded(Box::pin(fut))
    }
}

type Reply<B, E> = Result<Response<ResponseBody<B>>, E>;

/// The guarded path, top to bottom: read the body (fingerprinting it),
/// claim the key (or learn its stored outcome, or wait for it), then run
/// the inner service under the claim; if the store fails, refuse (or fail
/// open, where configured, with the request still in hand).
///
/// This future is boxed once per guarded request, and every byte of it is
/// written and moved on each one, so it holds each thing once: the request
/// arrives already in `pending` (its body is read out of it and the bytes
/// put back), and moves into the operation only once the claim is held.
///
/// It is an `async` block rather than an `async fn`, as are the other
/// futures on the request path: an `async fn` moves its arguments into
/// locals and so keeps each twice in its future (rust-lang/rust#62958),
/// while a block uses its captures in place.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold its arguments twice"
)]
fn guard<S, St, ReqBody, ResBody>(
    shared: Arc<Shared<St>>,
    mut pending: Pending<S, ReqBody>,
    store_key: StoreKey,
    grpc: bool,
) -> impl Future<Output = Reply<ResBody, S::Error>> + Send + 'static
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: Store,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    async move {
        let (engine, config) = (&shared.engine, &shared.config);
        let limit = config.request_body_limit;
        let req = &mut pending.req;
        let mode = &config.fingerprint_mode;
        let hasher = mode.streams(grpc).then(|| {
            FingerprintHasher::new(
                req.method(),
                req.uri(),
                req.headers(),
                &config.fingerprint_headers,
            )
        });
        let body = std::mem::replace(req.body_mut(), RequestBody::empty());
        let fingerprint = match read_body(body, limit, hasher).await {
            Ok((data, trailers, Some(fingerprint))) => {
                *pending.req.body_mut() = RequestBody::buffered(data, trailers);
                fingerprint
            }
            Ok((data, trailers, None)) => {
                // A mode that needs the whole body, and the request's head.
                let req = std::mem::replace(&mut pending.req, Request::new(RequestBody::empty()));
                let (parts, _) = req.into_parts();
                let fingerprint = mode.fingerprint(&parts, &config.fingerprint_headers, &data);
                pending.req = Request::from_parts(parts, RequestBody::buffered(data, trailers));
                fingerprint
            }
            Err(ReadError::TooLarge) => {
                return Ok(refusal_for(
                    grpc,
                    ProblemKind::PayloadTooLarge,
                    Some(too_large(limit)),
                ));
            }
            Err(ReadError::Body(e)) => {
                return Ok(refusal_for(
                    grpc,
                    ProblemKind::BodyUnreadable,
                    Some(e.to_string()),
                ));
            }
        };
        let span = tracing::debug_span!("idempotency", key = %store_key);
        let label = RequestLabel::new(pending.req.method().as_str(), pending.req.uri().path());
        let begun = engine
            .begin::<std::convert::Infallible>(store_key, fingerprint, &label)
            .instrument(span.clone())
            .await;
        let acquired = match begun {
            Ok(Begun::Acquired(acquired)) => acquired,
            Ok(Begun::Replayed { payload, .. }) => return Ok(replay(grpc, &payload, config)),
            Err(EngineError::Mismatch) => {
                return Ok(refusal(
                    grpc,
                    Problem::new(ProblemKind::KeyMismatch).status(config.mismatch_status),
                ));
            }
            Err(EngineError::InFlight) => {
                return Ok(refusal(
                    grpc,
                    Problem::new(ProblemKind::InFlight).retry_after(config.retry_after),
                ));
            }
            Err(EngineError::OutcomeUnknown) => {
                return Ok(refusal(grpc, Problem::new(ProblemKind::OutcomeUnknown)));
            }
            Err(EngineError::Store(e)) if e.kind() == StoreErrorKind::Corrupt => {
                return Ok(refusal_for(grpc, ProblemKind::RecordUnreadable, None));
            }
            Err(EngineError::Store(e)) if config.fail_open => {
                observe::event(Event::FailedOpen, &store_key, Some(&e));
                let Pending { mut inner, req, .. } = pending;
                // Boxed: rare, and the inner future would otherwise enlarge
                // every guarded request's future.
                let unguarded = Box::pin(inner.call(req));
                return unguarded.await.map(|res| res.map(ResponseBody::inner));
            }
            Err(EngineError::Store(_)) => {
                return Ok(refusal(
                    grpc,
                    Problem::new(ProblemKind::StoreUnavailable).retry_after(config.retry_after),
                ));
            }
            Err(EngineError::Operation(never)) => match never {},
        };
        let Pending {
            mut inner,
            mut req,
            scope,
            key,
        } = pending;
        let run_shared = shared.clone();
        acquired
            .execute(move |execution| {
                req.extensions_mut().insert(IdempotencyInfo {
                    scope,
                    key,
                    execution,
                });
                // Called here, so that the operation's future holds the inner
                // future once, then the response handling in its place.
                inner
                    .call(req)
                    .then(move |response| decide_completion(response, grpc, run_shared))
            })
            .instrument(span)
            .await
    }
}
