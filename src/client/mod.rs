//! The client side (feature `client`): [`IdempotentRetryLayer`] sends each
//! logical request with one idempotency key and retries it safely.
//!
//! A server that honours idempotency keys is half the protocol. The client
//! must send one key per logical request, resend the same bytes, back off,
//! honour `Retry-After`, and know when to stop. The layer, in front of any
//! HTTP client service (`hyper_util`'s legacy client, or anything that is a
//! `Service<Request<RetryBody<B>>>`):
//!
//! - gives each request a key: a random UUID (v4) in `Idempotency-Key`,
//!   unless the request carries one already; every attempt sends the same
//!   key and the same bytes;
//! - keeps the body to send it again, up to [`RetryPolicy::body_limit`]
//!   (1 MiB by default): **a larger or endless streaming body is sent once
//!   and never retried**; a body that fails while it is read is not sent
//!   at all (the call fails with [`RequestBodyFailed`]);
//! - retries what [`RetryPolicy`] says (transport failures, 409 in flight,
//!   429, 502, 503, 504; never a mismatch, an "outcome unknown" whatever
//!   its status, or another 4xx), after an exponential backoff with full
//!   jitter or the server's `Retry-After` (up to a cap), within an attempt
//!   limit, a deadline and a retry budget shared by every clone;
//! - returns the final answer as it came, with the [`Attempts`] it took in
//!   the response's extensions. Every attempt is a `tracing` event (target
//!   `tower_idempotency::client`); with the `metrics` feature, the counter
//!   `idempotency_client_attempts_total{outcome}` counts them.
//!
//! ```no_run
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_idempotency::client::{Attempts, IdempotentRetryLayer, RetryBody, RetryPolicy};
//!
//! # async fn example() -> Result<(), tower_idempotency::BoxError> {
//! let http = Client::builder(TokioExecutor::new()).build_http::<RetryBody<Full<Bytes>>>();
//! let client = ServiceBuilder::new()
//!     .layer(IdempotentRetryLayer::new(RetryPolicy::default()))
//!     .service(http);
//! let charge = http::Request::post("http://127.0.0.1:3000/process-payment")
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from_static(br#"{"amount":100,"currency":"GHS"}"#)))?;
//! let answer = client.oneshot(charge).await?;
//! let attempts = answer.extensions().get::<Attempts>().map_or(1, |a| a.0);
//! println!("{} after {attempts} attempt(s)", answer.status());
//! # Ok(())
//! # }
//! ```

//!
//! # gRPC
//!
//! The layer works on a tonic `Channel` too (it takes tonic's body, so a
//! `map_request` converts [`RetryBody`] to it): the key goes in the
//! `idempotency-key` metadata, and a Trailers-Only answer with
//! UNAVAILABLE, ABORTED (the server layer's "in flight") or
//! RESOURCE_EXHAUSTED is retried, after `grpc-retry-pushback-ms` when the
//! server sends one. See [`RetryPolicy`] for the whole table.

mod attempts;
mod body;
mod policy;
#[cfg(feature = "reqwest")]
mod reqwest;
mod service;

#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub use self::reqwest::IdempotentRetryMiddleware;
pub use body::RetryBody;
pub use policy::{
    DEFAULT_BASE, DEFAULT_BODY_LIMIT, DEFAULT_CAP, DEFAULT_DEADLINE, DEFAULT_FACTOR,
    DEFAULT_MAX_ATTEMPTS, DEFAULT_RETRY_AFTER_CAP, RetryPolicy,
};
pub use service::{IdempotentRetry, IdempotentRetryLayer, RequestBodyFailed};

/// Gives the request a key (a random UUID v4 in `Idempotency-Key`) unless
/// it has one, and returns it, for every attempt to send.
fn ensure_key(headers: &mut http::HeaderMap) -> String {
    const KEY_HEADER: &str = "idempotency-key";
    if !headers.contains_key(KEY_HEADER) {
        let key = uuid::Uuid::new_v4().hyphenated().to_string();
        if let Ok(value) = http::HeaderValue::from_str(&key) {
            headers.insert(KEY_HEADER, value);
        }
    }
    headers
        .get(KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// How many attempts a request took (in the final response's extensions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempts(pub u32);
