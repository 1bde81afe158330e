//! The memory floor for the benchmarks: what a user would write by hand on
//! moka without the crate. A `moka::sync::Cache` bounded by bytes as
//! `MemoryStore` bounds its records (LRU, a byte weigher, records kept for
//! the store's default retention of 24 h): look the key up and replay what
//! it holds, or run the handler and insert its collected response. No
//! fingerprint, no claim (two requests with one key at once both run), no
//! waiting, no release on failure: the floor's cost, not a guard to copy.
//!
//! One file, included by the payments example (`--hand-written-guard`
//! with `--store memory`) and by the in-process benchmarks, so both
//! measure the same floor.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

/// A stored response: its status, content type and body.
#[derive(Clone)]
pub struct Stored {
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: Bytes,
}

pub type Cache = moka::sync::Cache<Bytes, Stored>;

/// A cache of at most `max_bytes` of keys and bodies.
pub fn cache(max_bytes: u64) -> Cache {
    moka::sync::Cache::builder()
        .max_capacity(max_bytes)
        .weigher(|key: &Bytes, stored: &Stored| {
            u32::try_from(key.len() + stored.body.len() + 64).unwrap_or(u32::MAX)
        })
        .eviction_policy(moka::policy::EvictionPolicy::lru())
        .time_to_live(Duration::from_secs(24 * 60 * 60))
        .build()
}

pub async fn guard(State(cache): State<Cache>, request: Request, next: Next) -> Response {
    let Some(key) = request
        .headers()
        .get("idempotency-key")
        .map(|k| Bytes::copy_from_slice(k.as_bytes()))
    else {
        return next.run(request).await;
    };
    if let Some(stored) = cache.get(&key) {
        let mut response = (stored.status, stored.body).into_response();
        if let Some(content_type) = stored.content_type {
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, content_type);
        }
        return response;
    }
    let response = next.run(request).await;
    let (parts, body) = response.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    if !parts.status.is_server_error() {
        let stored = Stored {
            status: parts.status,
            content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
            body: body.clone(),
        };
        cache.insert(key, stored);
    }
    Response::from_parts(parts, Body::from(body))
}
