//! Buffering a guarded request: what can be refused before any waiting,
//! and reading (and fingerprinting) its body within the limit.

use std::future::Future;

use bytes::Bytes;
use http::{HeaderMap, Request, header};
use http_body::Body;
use http_body_util::BodyExt;

use crate::BoxError;
use crate::body::{Gathered, RequestBody, merge_trailers};
use crate::config::Config;
use crate::fingerprint::{Fingerprint, FingerprintHasher};
use crate::key::{IdempotencyKey, Scope, StoreKey};
use crate::problem::ProblemKind;

/// What a guarded request yields before its body is read.
pub(super) struct Prepared {
    pub(super) scope: Scope,
    pub(super) key: IdempotencyKey,
    pub(super) store_key: StoreKey,
}

/// A guarded request on its way to the inner service: the operation takes
/// it (or the layer, failing open when the store is down).
pub(super) struct Pending<S, ReqBody> {
    pub(super) inner: S,
    pub(super) req: Request<RequestBody<ReqBody>>,
    pub(super) scope: Scope,
    pub(super) key: IdempotencyKey,
}

/// Reads the key and the scope and checks the declared length: all that can
/// be refused before waiting for anything.
pub(super) fn prepare(
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

pub(super) fn too_large(limit: usize) -> String {
    format!("the request body must be at most {limit} bytes")
}

pub(super) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub(super) enum ReadError {
    TooLarge,
    Body(BoxError),
}

/// Reads the whole request body (within `limit`), fingerprinting it as it
/// comes when given a `hasher` (bytes mode), and keeps its bytes and
/// trailers for the inner service.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold its arguments twice"
)]
pub(super) fn read_body<B>(
    body: B,
    limit: usize,
    mut hasher: Option<FingerprintHasher>,
) -> impl Future<Output = Result<(Bytes, Option<HeaderMap>, Option<Fingerprint>), ReadError>>
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
                    if let Some(hasher) = &mut hasher {
                        hasher.update(&chunk);
                    }
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
        Ok((data, trailers, hasher.map(FingerprintHasher::finish)))
    }
}
