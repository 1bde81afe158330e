//! [`Idempotency`]: the service the layer builds.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body::Body;
use http_body_util::BodyExt;
use tower_service::Service;
use tracing::Instrument;

use crate::BoxError;
use crate::body::{End, EndJudge, RequestBody, ResponseBody};
use crate::config::Config;
use crate::engine::{Completion, Engine, EngineError, ExecutionContext, Outcome};
use crate::fingerprint::{Fingerprint, FingerprintHasher};
use crate::future::ResponseFuture;
use crate::grpc::{self, GrpcStatusCode};
use crate::key::{IdempotencyKey, Scope, StoreKey};
use crate::observe::{self, Event};
use crate::policy::{ReplayFilter, StorePolicy, is_event_stream};
use crate::problem::{Problem, ProblemKind};
use crate::record::{StoredOutcome, encode_response};
use crate::store::{Store, StoreErrorKind};

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
                let refusal = refused(grpc, kind, detail);
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
        let fut = guard(self.shared.clone(), Some(pending), prepared.store_key, grpc);
        ResponseFuture::guarded(Box::pin(fut))
    }
}

type Reply<B, E> = Result<Response<ResponseBody<B>>, E>;

fn refuse<B>(grpc: bool, problem: Problem) -> Response<ResponseBody<B>> {
    observe::refusal(problem.kind);
    if grpc {
        return grpc::refusal(&problem, ResponseBody::full(Bytes::new(), None));
    }
    problem.into_response(|bytes| ResponseBody::full(bytes, None))
}

/// What a guarded request yields before its body is read.
struct Prepared {
    scope: Scope,
    key: IdempotencyKey,
    store_key: StoreKey,
}

/// A guarded request on its way to the inner service: the operation takes
/// it (or the layer, failing open when the store is down).
struct Pending<S, ReqBody> {
    inner: S,
    req: Request<RequestBody<ReqBody>>,
    scope: Scope,
    key: IdempotencyKey,
}

/// Reads the key and the scope and checks the declared length: all that can
/// be refused before waiting for anything.
fn prepare(
    config: &Config,
    parts: &http::request::Parts,
) -> Result<Prepared, (ProblemKind, Option<String>)> {
    let key = match IdempotencyKey::from_header_values(
        parts.headers.get_all(&config.key_header).iter(),
    ) {
        Ok(Some(key)) => key,
        Ok(None) => return Err((ProblemKind::MissingKey, None)),
        Err(e) => return Err((ProblemKind::InvalidKey, Some(e.to_string()))),
    };
    let scope = match &config.scope {
        None => Scope::global(),
        Some(scope_of) => match scope_of(parts) {
            Some(scope) => scope,
            None => return Err((ProblemKind::ScopeUnavailable, None)),
        },
    };
    let limit = config.request_body_limit;
    if declared_length(&parts.headers).is_some_and(|len| len > limit as u64) {
        return Err((ProblemKind::PayloadTooLarge, Some(too_large(limit))));
    }
    Ok(Prepared {
        store_key: StoreKey::new(&scope, &key),
        scope,
        key,
    })
}

/// Reads the body (fingerprinting it), then runs the request through the
/// engine.
///
/// This future is boxed once per guarded request, and every byte of it is
/// written and moved on each one, so it holds each thing once: the request
/// arrives already in `pending`, where the operation takes it from (its
/// body is read out of it and the bytes put back), and nothing is copied
/// into a second place.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold its arguments twice"
)]
fn guard<S, St, ReqBody, ResBody>(
    shared: Arc<Shared<St>>,
    mut pending: Option<Pending<S, ReqBody>>,
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
    // An `async` block rather than an `async fn`: an `async fn` moves its
    // arguments into locals, keeping each twice in its future
    // (rust-lang/rust#62958); a block uses its captures in place.
    async move {
        let (engine, config) = (&shared.engine, &shared.config);
        let limit = config.request_body_limit;
        // `pending` is `Some` until the operation takes it, below; the
        // `else` only spares this code an `expect`.
        let Some(Pending { req, .. }) = pending.as_mut() else {
            return Ok(refused(grpc, ProblemKind::BodyUnreadable, None));
        };
        let hasher = FingerprintHasher::new(
            req.method(),
            req.uri(),
            req.headers(),
            &config.fingerprint_headers,
        );
        let body = std::mem::replace(req.body_mut(), RequestBody::empty());
        let fingerprint = match read_body(body, limit, hasher).await {
            Ok((data, trailers, fingerprint)) => {
                if let Some(Pending { req, .. }) = pending.as_mut() {
                    *req.body_mut() = RequestBody::buffered(data, trailers);
                }
                fingerprint
            }
            Err(ReadError::TooLarge) => {
                return Ok(refused(
                    grpc,
                    ProblemKind::PayloadTooLarge,
                    Some(too_large(limit)),
                ));
            }
            Err(ReadError::Body(e)) => {
                return Ok(refused(
                    grpc,
                    ProblemKind::BodyUnreadable,
                    Some(e.to_string()),
                ));
            }
        };
        let run_shared = shared.clone();
        let result = engine
            .run(store_key, fingerprint, |execution| {
                // The engine calls the operation at most once, and only here.
                let Pending {
                    mut inner,
                    mut req,
                    scope,
                    key,
                } = pending.take().expect("operation called once");
                req.extensions_mut().insert(IdempotencyInfo {
                    scope,
                    key,
                    execution,
                });
                // Called here, so that the operation's future holds the inner
                // future once, then the response handling in its place.
                inner
                    .call(req)
                    .then(move |response| settle_response(response, grpc, run_shared))
            })
            .instrument(tracing::debug_span!("idempotency", key = %store_key))
            .await;

        // The fail-open call is awaited after this `match`, so that `result`
        // is not kept in the future beside it.
        let failed_open = match result {
            Ok(Outcome::Executed(response)) => return Ok(response),
            Ok(Outcome::Replayed { payload, .. }) => return Ok(replay(grpc, &payload, config)),
            Err(EngineError::Operation(e)) => return Err(e),
            Err(EngineError::Mismatch) => {
                return Ok(refuse(
                    grpc,
                    Problem::new(ProblemKind::KeyMismatch).status(config.mismatch_status),
                ));
            }
            Err(EngineError::InFlight) => {
                return Ok(refuse(
                    grpc,
                    Problem::new(ProblemKind::InFlight).retry_after(config.retry_after),
                ));
            }
            Err(EngineError::Store(e)) => {
                if e.kind() == StoreErrorKind::Corrupt {
                    return Ok(refused(grpc, ProblemKind::RecordUnreadable, None));
                }
                match pending.take() {
                    Some(Pending { mut inner, req, .. }) if config.fail_open => {
                        observe::event(Event::FailedOpen, &store_key, Some(&e));
                        // Boxed: rare, and the inner future would otherwise
                        // enlarge every guarded request's future.
                        Box::pin(inner.call(req))
                    }
                    _ => {
                        return Ok(refuse(
                            grpc,
                            Problem::new(ProblemKind::StoreUnavailable)
                                .retry_after(config.retry_after),
                        ));
                    }
                }
            }
        };
        failed_open.await.map(|res| res.map(ResponseBody::inner))
    }
}

fn refused<B>(grpc: bool, kind: ProblemKind, detail: Option<String>) -> Response<ResponseBody<B>> {
    let mut problem = Problem::new(kind);
    if let Some(detail) = detail {
        problem = problem.detail(detail);
    }
    refuse(grpc, problem)
}

fn too_large(limit: usize) -> String {
    format!("the request body must be at most {limit} bytes")
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

enum ReadError {
    TooLarge,
    Body(BoxError),
}

/// Reads the whole request body (within `limit`), fingerprinting it as it
/// comes, and keeps its bytes and trailers for the inner service.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold its arguments twice"
)]
fn read_body<B>(
    body: B,
    limit: usize,
    mut hasher: FingerprintHasher,
) -> impl Future<Output = Result<(Bytes, Option<HeaderMap>, Fingerprint), ReadError>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    // A block, not an `async fn`, so the body and the hasher are kept once
    // (see `guard`).
    async move {
        if body.size_hint().lower() > limit as u64 {
            return Err(ReadError::TooLarge);
        }
        let mut body = std::pin::pin!(body);
        let mut data = Gathered::default();
        let mut trailers: Option<HeaderMap> = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ReadError::Body(e.into()))?;
            let frame = match frame.into_data() {
                Ok(chunk) => {
                    if data.len().saturating_add(chunk.len()) > limit {
                        return Err(ReadError::TooLarge);
                    }
                    hasher.update(&chunk);
                    data.push(chunk);
                    continue;
                }
                Err(frame) => frame,
            };
            if let Ok(t) = frame.into_trailers() {
                merge_trailers(&mut trailers, t);
            }
        }
        let data = data.into_bytes();
        Ok((data, trailers, hasher.finish()))
    }
}

/// The data frames of a body, joined. A body sent in one frame (the common
/// case) is kept as it came: no copy, no allocation.
#[derive(Default)]
struct Gathered {
    first: Option<Bytes>,
    more: Option<BytesMut>,
}

impl Gathered {
    fn len(&self) -> usize {
        match (&self.first, &self.more) {
            (_, Some(buf)) => buf.len(),
            (Some(first), None) => first.len(),
            (None, None) => 0,
        }
    }

    fn push(&mut self, chunk: Bytes) {
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

    fn into_bytes(self) -> Bytes {
        match (self.first, self.more) {
            (_, Some(buf)) => buf.freeze(),
            (first, None) => first.unwrap_or_default(),
        }
    }
}

/// Adds a trailers frame to those already seen (a body may send more than one).
fn merge_trailers(trailers: &mut Option<HeaderMap>, more: HeaderMap) {
    match trailers {
        Some(existing) => existing.extend(more),
        None => *trailers = Some(more),
    }
}

/// Runs in the execution, once the inner service answered: decides what to
/// store and what to hand the caller.
async fn settle_response<ResBody, E, St: Store>(
    response: Result<Response<ResBody>, E>,
    grpc: bool,
    shared: Arc<Shared<St>>,
) -> Result<(Response<ResponseBody<ResBody>>, Completion), E>
where
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    let config = &shared.config;
    let response = response?;
    let (mut parts, body) = response.into_parts();
    // Decide now where the outcome is already known: the handler's own
    // verdict, an HTTP status, or a gRPC Trailers-Only status. A gRPC
    // outcome that arrives in the trailers is judged after the body.
    let decided = match parts.extensions.get::<StorePolicy>() {
        Some(StorePolicy::OutcomeUnknown) => {
            let completion = unknown_outcome(parts.status, config);
            let response = Response::from_parts(parts, ResponseBody::inner(body));
            return Ok((response, completion));
        }
        Some(policy) => Some(*policy == StorePolicy::Store),
        None if !grpc => Some((config.should_store)(&parts)),
        None => grpc::status_in(&parts.headers).map(|code| {
            parts.extensions.insert(code);
            (config.should_store)(&parts)
        }),
    };
    if decided == Some(false) {
        let response = Response::from_parts(parts, ResponseBody::inner(body));
        return Ok((response, Completion::Release));
    }
    if is_event_stream(&parts.headers) {
        let not_replayable = StoredOutcome::NotReplayable {
            status: parts.status,
        };
        let response = Response::from_parts(parts, ResponseBody::inner(body));
        return Ok((response, Completion::Store(not_replayable.encode())));
    }
    let mut body = Box::pin(body);
    let limit = config.stored_response_limit;
    let mut buf = Gathered::default();
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                // The response broke off after its head: the handler acted,
                // and what it did is unknown. The caller gets what there was
                // and the error; the key completes as "outcome unknown" (or
                // is released, where the endpoint opted in).
                let completion = unknown_outcome(parts.status, config);
                let failed = ResponseBody::failed(buf.into_bytes(), e.into());
                return Ok((Response::from_parts(parts, failed), completion));
            }
        };
        match frame.into_data() {
            Ok(data) => {
                if buf.len().saturating_add(data.len()) > limit {
                    buf.push(data);
                    if decided.is_none() {
                        // A gRPC status still to come in the trailers
                        // decides, once the rest has streamed to the caller.
                        let (decider, later) = Completion::later();
                        let judge = trailers_judge(decider, &parts, shared.clone());
                        let body = ResponseBody::judged(buf.into_bytes(), body, judge);
                        return Ok((Response::from_parts(parts, body), later));
                    }
                    let not_replayable = StoredOutcome::NotReplayable {
                        status: parts.status,
                    };
                    let body = ResponseBody::chained(buf.into_bytes(), body);
                    let response = Response::from_parts(parts, body);
                    return Ok((response, Completion::Store(not_replayable.encode())));
                }
                buf.push(data);
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    merge_trailers(&mut trailers, t);
                }
            }
        }
    }
    let data = buf.into_bytes();
    if decided.is_none() {
        // A gRPC response without a `grpc-status` is broken: judge it as
        // INTERNAL, which the default predicate does not store.
        let code = trailers
            .as_ref()
            .and_then(grpc::status_in)
            .or_else(|| grpc::web_trailers(&parts.headers, &data).and_then(|t| grpc::status_in(&t)))
            .unwrap_or(GrpcStatusCode(13));
        parts.extensions.insert(code);
        if !(config.should_store)(&parts) {
            let response = Response::from_parts(parts, ResponseBody::full(data, trailers));
            return Ok((response, Completion::Release));
        }
    }
    let filter = ReplayFilter::new(
        &parts.headers,
        config.replay_set_cookie,
        &config.excluded_headers,
    );
    let stored = encode_response(
        parts.status,
        &parts.headers,
        |name| filter.keeps(name),
        &data,
        trailers.as_ref(),
    );
    let body = ResponseBody::full(data, trailers);
    Ok((Response::from_parts(parts, body), Completion::Store(stored)))
}

/// Judges an oversized gRPC response by the `grpc-status` of its trailers
/// once it has streamed to its end: "not replayable" where the predicate
/// would store it, released where it would not (a retryable status), and
/// "outcome unknown" where the stream broke or the caller dropped it first.
fn trailers_judge<St: Store>(
    decider: crate::engine::Decider,
    parts: &http::response::Parts,
    shared: Arc<Shared<St>>,
) -> EndJudge {
    let (status, headers) = (parts.status, parts.headers.clone());
    EndJudge::new(decider, move |end| match end {
        End::Finished(trailers) => {
            let code = trailers
                .and_then(grpc::status_in)
                .unwrap_or(GrpcStatusCode(13));
            let mut judged = Response::new(());
            *judged.status_mut() = status;
            *judged.headers_mut() = headers;
            judged.extensions_mut().insert(code);
            let (judged, ()) = judged.into_parts();
            if (shared.config.should_store)(&judged) {
                Completion::Store(StoredOutcome::NotReplayable { status }.encode())
            } else {
                Completion::Release
            }
        }
        End::Broke | End::Dropped => unknown_outcome(status, &shared.config),
    })
}

/// What to do with a key whose outcome is unknown: complete it as such, or
/// release it where the endpoint opted in.
fn unknown_outcome(status: http::StatusCode, config: &Config) -> Completion {
    if config.release_unknown_outcomes {
        return Completion::Release;
    }
    Completion::Store(StoredOutcome::OutcomeUnknown { status }.encode())
}

/// Builds the replay of a stored outcome.
fn replay<B>(grpc: bool, payload: &Bytes, config: &Config) -> Response<ResponseBody<B>> {
    match StoredOutcome::decode(payload) {
        Ok(StoredOutcome::Response(stored)) => {
            let mut res = Response::new(ResponseBody::full(stored.body, stored.trailers));
            *res.status_mut() = stored.status;
            *res.headers_mut() = stored.headers;
            res.headers_mut().insert(
                config.replay_header.clone(),
                HeaderValue::from_static("true"),
            );
            res
        }
        Ok(StoredOutcome::NotReplayable { status }) => refused(
            grpc,
            ProblemKind::NotReplayable,
            Some(format!(
                "the request with this key was executed (status {}), but its response was too large or streaming to store",
                status.as_u16()
            )),
        ),
        Ok(StoredOutcome::OutcomeUnknown { status }) => refused(
            grpc,
            ProblemKind::OutcomeUnknown,
            Some(format!(
                "the request with this key was executed (status {}), but its response broke off, so its outcome is unknown; check its effect before sending it again with a new key",
                status.as_u16()
            )),
        ),
        Err(e) => {
            tracing::error!(error = %e, "stored idempotency record cannot be decoded");
            refused(grpc, ProblemKind::RecordUnreadable, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
