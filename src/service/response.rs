//! Settling an executed response (what to store, what to hand the
//! caller), replaying a stored one, and rendering refusals.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response};
use http_body::Body;

use crate::BoxError;
use crate::body::{DecideAtEnd, End, Gathered, ResponseBody, merge_trailers, next_frame};
use crate::config::Config;
use crate::engine::Completion;
use crate::grpc::{self, GrpcStatusCode};
use crate::headers::ReplayHeaders;
use crate::observe;
use crate::payload::{StoredOutcome, encode_response};
use crate::policy::{StorePolicy, is_event_stream};
use crate::problem::{Problem, ProblemKind};
use crate::store::Store;

use super::Shared;

/// The refusal `problem`, as gRPC or HTTP answers it, counted.
pub(super) fn refusal<B>(grpc: bool, problem: Problem) -> Response<ResponseBody<B>> {
    observe::refusal(problem.kind);
    if grpc {
        return grpc::refusal(&problem, ResponseBody::full(Bytes::new(), None));
    }
    problem.into_response(|bytes| ResponseBody::full(bytes, None))
}

/// The refusal of `kind`, with an optional detail.
pub(super) fn refusal_for<B>(
    grpc: bool,
    kind: ProblemKind,
    detail: Option<String>,
) -> Response<ResponseBody<B>> {
    let mut problem = Problem::new(kind);
    if let Some(detail) = detail {
        problem = problem.detail(detail);
    }
    refusal(grpc, problem)
}

/// Runs in the execution, once the inner service answered: decides the
/// response into the [`Completion`] the engine settles the key by, and the
/// response to hand the caller.
pub(super) async fn decide_completion<ResBody, E, St: Store>(
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
    // policy, an HTTP status, or a gRPC Trailers-Only status. A gRPC
    // outcome that arrives in the trailers is decided after the body.
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
    loop {
        let frame = match next_frame(body.as_mut()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(panicked) => {
                // The body panicked after its head: the handler acted, and
                // what it did is unknown, as when a body breaks off. The
                // panic stops here: unwinding through the execution would
                // release the key and a retry would run the handler again.
                // The caller gets what there was and the panic as the
                // body's error.
                tracing::error!(error = %panicked, "an idempotent response body panicked");
                let completion = unknown_outcome(parts.status, config);
                let failed = ResponseBody::failed(buf.into_bytes(), panicked.into());
                return Ok((Response::from_parts(parts, failed), completion));
            }
        };
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
                        let decide = decide_by_trailers(decider, &parts, shared.clone());
                        let body = ResponseBody::deciding_at_end(buf.into_bytes(), body, decide);
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
        // A gRPC response without a `grpc-status` is broken: decide it as
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
    let replay = ReplayHeaders::of(
        &parts.headers,
        config.replay_set_cookie,
        &config.excluded_headers,
    );
    let stored = encode_response(
        parts.status,
        &parts.headers,
        |name| replay.keeps(name),
        &data,
        trailers.as_ref(),
    );
    let body = ResponseBody::full(data, trailers);
    Ok((Response::from_parts(parts, body), Completion::Store(stored)))
}

/// Decides an oversized gRPC response by the `grpc-status` of its trailers
/// once it has streamed to its end: "not replayable" where the predicate
/// would store it, released where it would not (a retryable status), and
/// "outcome unknown" where the stream broke or the caller dropped it first.
pub(super) fn decide_by_trailers<St: Store>(
    decider: crate::engine::Decider,
    parts: &http::response::Parts,
    shared: Arc<Shared<St>>,
) -> DecideAtEnd {
    let (status, headers) = (parts.status, parts.headers.clone());
    DecideAtEnd::new(decider, move |end| match end {
        End::Finished(trailers) => {
            let code = trailers
                .and_then(grpc::status_in)
                .unwrap_or(GrpcStatusCode(13));
            let mut head = Response::new(());
            *head.status_mut() = status;
            *head.headers_mut() = headers;
            head.extensions_mut().insert(code);
            let (head, ()) = head.into_parts();
            if (shared.config.should_store)(&head) {
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
pub(super) fn unknown_outcome(status: http::StatusCode, config: &Config) -> Completion {
    if config.release_unknown_outcomes {
        return Completion::Release;
    }
    observe::outcome_unknown_completion();
    Completion::Store(StoredOutcome::OutcomeUnknown { status }.encode())
}

/// Builds the replay of a stored outcome.
pub(super) fn replay<B>(grpc: bool, payload: &Bytes, config: &Config) -> Response<ResponseBody<B>> {
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
        Ok(StoredOutcome::NotReplayable { status }) => refusal_for(
            grpc,
            ProblemKind::NotReplayable,
            Some(format!(
                "the request with this key was executed (status {}), but its response was too large or streaming to store",
                status.as_u16()
            )),
        ),
        Ok(StoredOutcome::OutcomeUnknown { status }) => refusal_for(
            grpc,
            ProblemKind::OutcomeUnknown,
            Some(format!(
                "the request with this key was executed (status {}), but its response broke off, so its outcome is unknown; check its effect before sending it again with a new key",
                status.as_u16()
            )),
        ),
        Err(e) => {
            tracing::error!(error = %e, "stored idempotency payload cannot be decoded");
            refusal_for(grpc, ProblemKind::RecordUnreadable, None)
        }
    }
}
