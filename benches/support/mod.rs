//! What the benches share: the routes, the requests, a runtime, fresh keys.
#![allow(dead_code)]

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tower::{ServiceBuilder, ServiceExt};
use tower_idempotency::IdempotencyLayer;
use tower_idempotency::store::Store;

pub(crate) const BODY_64: &[u8] =
    br#"{"amount":100,"currency":"GHS","reference":"order-000000000042"}"#;

pub(crate) async fn handler(body: Bytes) -> (StatusCode, Bytes) {
    (StatusCode::CREATED, body)
}

/// `with_state(())` turns the handlers into services once, as `axum::serve`
/// does: a `Router` called without it converts (and layers) each handler
/// again on every request, which a served app never pays.
pub(crate) fn routes() -> Router {
    unprepared_routes().with_state(())
}

pub(crate) fn unprepared_routes() -> Router {
    Router::new().route("/pay", post(handler).get(|| async { "ok" }))
}

pub(crate) fn guarded<St: Store>(store: St) -> Router {
    unprepared_routes()
        .layer(ServiceBuilder::new().layer(IdempotencyLayer::new(store)))
        .with_state(())
}

pub(crate) fn post_req(key: Option<&str>) -> Request<Body> {
    let mut b = Request::post("/pay").header("content-type", "application/json");
    if let Some(key) = key {
        b = b.header("idempotency-key", key);
    }
    b.body(Body::from(Bytes::from_static(BODY_64))).unwrap()
}

pub(crate) fn get_req() -> Request<Body> {
    Request::get("/pay").body(Body::empty()).unwrap()
}

pub(crate) async fn call(router: &Router, req: Request<Body>) -> StatusCode {
    let res = router.clone().oneshot(req).await.unwrap();
    let status = res.status();
    black_box(res.into_body().collect().await.unwrap());
    status
}

/// A new key into `store` as a first request leaves it: claimed (a 30 s
/// lease), then completed with `payload` (kept a day).
pub(crate) async fn store_new_key<St: Store>(
    store: &St,
    key: tower_idempotency::key::StoreKey,
    fp: tower_idempotency::fingerprint::Fingerprint,
    payload: Bytes,
) -> tower_idempotency::store::LeaseStatus {
    use tower_idempotency::store::{Claim, CompletedRecord};
    let Claim::Acquired(token) = store.claim(key, fp, Duration::from_secs(30)).await.unwrap()
    else {
        panic!("a fresh key is acquired")
    };
    let record = CompletedRecord {
        fingerprint: fp,
        payload,
    };
    let retention = Duration::from_secs(86_400);
    black_box(store.complete(key, token, record, retention).await.unwrap())
}

pub(crate) static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

pub(crate) fn fresh_key() -> String {
    format!("key-{}", NEXT_KEY.fetch_add(1, Ordering::Relaxed))
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The memory floor (the payments demo's `--hand-written-guard` with
/// `--store memory`): a moka cache bounded by bytes as `MemoryStore` bounds
/// its records; one lookup before the handler, one insert of the collected
/// response after. No fingerprint, no claim, no waiting.
mod memory_floor;

pub(crate) mod floor {
    use super::*;

    /// The routes behind the floor, on a cache of at most 64 MiB (the
    /// memory store's default bound).
    pub(crate) fn guarded() -> Router {
        let cache = super::memory_floor::cache(64 << 20);
        unprepared_routes()
            .layer(axum::middleware::from_fn_with_state(
                cache,
                super::memory_floor::guard,
            ))
            .with_state(())
    }
}
