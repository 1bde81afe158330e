//! Make any HTTP or gRPC endpoint safe to retry.
//!
//! A client sends an `Idempotency-Key` header; [`IdempotencyLayer`]
//! guarantees that the inner service runs at most once for that key (within
//! its scope and the retention window, across every process that shares the
//! [`Store`]) and that every retry receives the original response, byte for
//! byte, marked `Idempotent-Replayed: true`.
//!
//! # Example
//!
//! ```
//! # #[cfg(feature = "memory")] {
//! use axum::{Router, routing::post};
//! use tower::ServiceBuilder;
//! use tower_idempotency::{IdempotencyLayer, store::MemoryStore};
//!
//! async fn charge(body: String) -> (http::StatusCode, String) {
//!     (http::StatusCode::CREATED, format!("charged: {body}"))
//! }
//!
//! let app: Router = Router::new()
//!     .route("/charges", post(charge))
//!     .layer(ServiceBuilder::new().layer(IdempotencyLayer::new(MemoryStore::new())));
//! # drop(app);
//! # }
//! ```
//!
//! # Behaviour
//!
//! | situation | answer |
//! |---|---|
//! | method not guarded (default: all but `POST`, `PATCH`) | passed through, no store access |
//! | key header missing | 400 problem+json ([`optional`](IdempotencyLayer::optional) passes it through) |
//! | key empty, over 255 characters, not visible ASCII, or sent twice | 400 problem+json |
//! | key in the IETF draft's quoted form (`"abc"`) | the same key as `abc` |
//! | body larger than the limit (default 1 MiB) | 413 problem+json, not executed |
//! | new key | body read and fingerprinted first, then the key is claimed, the inner service called, the response stored and returned |
//! | same key and request, completed | the stored response, with `Idempotent-Replayed: true` |
//! | same key and request, in flight | waits for the first and returns its response (marked replayed); after the wait limit (default 10 s), 409 + `Retry-After` |
//! | same key, different request | 409 problem+json (configurable, e.g. 422) |
//! | inner service returns `Err` or panics | key released, error (or panic) propagated; a retry executes again |
//! | response body breaks off, or panics, after its head | the caller gets what there was and an error; the key completes as "outcome unknown" and retries get 409 |
//! | response 5xx, 408 or 429 | not stored, key released: a retry executes again |
//! | response larger than the stored-response limit, or `text/event-stream` | delivered once; the key completes as not replayable and retries get 409 |
//! | store unreachable or failing | 503 problem+json + `Retry-After`, not executed |
//! | client disconnects while the inner service runs | the execution finishes and is stored; the retry gets it |
//!
//! Refusals are RFC 9457 problem documents; see [`problem`] for their types.
//!
//! # gRPC
//!
//! The same layer wraps tonic servers. gRPC calls take the key from the
//! `idempotency-key` metadata, replays carry the original trailers
//! (`grpc-status`, `grpc-message`), storage is judged by `grpc-status`
//! ([`policy::GrpcStatusCode`]), and refusals are gRPC statuses rather than
//! HTTP errors. Calls without a key, or outside
//! [`grpc_methods`](IdempotencyLayer::grpc_methods), pass through, so
//! streaming RPCs are never stalled.
//! The inner service finds an [`IdempotencyInfo`] in the request extensions.
//!
//! # Placing the layer
//!
//! Put it **after** authentication (so [`scope`](IdempotencyLayer::scope)
//! can read the principal and unauthenticated requests claim nothing) and
//! after request decompression (so the fingerprint sees the real bytes), and
//! inside response compression. With axum, compose layers with
//! `ServiceBuilder` and apply them with one `.layer()` call, or use
//! `route_layer` to guard only matched routes.
//!
//! # Beyond HTTP
//!
//! The [`engine`] module runs any async operation at most once per key, for
//! queue consumers and jobs; the layer is one adapter over it.
//!
//! # Features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `memory` | yes | [`store::MemoryStore`] (moka) |
//! | `redis` | no | [`store::RedisStore`] (redis-rs, `ConnectionManager`) |
//! | `redis-cluster` | no | `RedisStoreBuilder::build_cluster`, and Redis Cluster connections for `RedisStore::with_connection` |
//! | `postgres` | no | [`store::PostgresStore`] (tokio-postgres, deadpool-postgres) and its in-transaction `fence` |
//! | `tls` | no | TLS to Redis (`rediss://`) and PostgreSQL (`sslmode`), pure Rust (rustls with `ring`, Mozilla's roots) |
//! | `sidecar` | no | [`sidecar`] and the `idempotency-sidecar` binary (implies `memory`, `redis`, `redis-cluster`, `tls`, `metrics`) |
//! | `client` | no | [`client::IdempotentRetryLayer`]: one key per request, safe retries |
//! | `reqwest` | no | `client::IdempotentRetryMiddleware` for `reqwest_middleware` (implies `client`) |
//! | `metrics` | no | counters, gauges and histograms through the `metrics` facade: outcomes, refusals, store errors and latency, completion retries, orphans pending, executions running, execution and wait times |
//! | `test-util` | no | [`store::conformance`] (the store contract as tests) and [`store::fault`] |
//!
//! # Words
//!
//! One word per idea, across the crate and its docs:
//!
//! - **key**: the client's `Idempotency-Key`; with the **scope** (the
//!   namespace of keys, usually one authenticated principal) it names a
//!   stored entry ([`key::StoreKey`], a hash of both).
//! - **fingerprint**: a hash of what makes two requests the same request
//!   (method, path, query, selected headers, body); a key reused with
//!   another fingerprint is refused.
//! - **execution**: one run of the inner service (or of an engine
//!   operation) for a key.
//! - **claim**: the right to execute a key, taken in the store before an
//!   execution; it lasts a **lease**, renewed while the execution runs. The
//!   **owner token** proves who holds it: a **fence** (a number that only
//!   grows across the claims of a key) and a **nonce** (unique per claim).
//! - **lost** (said only of a lease): the store says another execution owns
//!   the key, or renewals failed for a whole lease; a lost lease stores
//!   nothing.
//! - **orphan**: a claim whose reply never came back (a timeout, a caller
//!   that went away); it may have been applied with nobody to own it, so
//!   the store releases it by its nonce.
//! - **completion**: what an execution asks for its key at its end: store
//!   its outcome as a **record**, release the key, or decide later; the
//!   engine **settles** the key by it.
//! - **entry**: what a store holds for one key: a claim or a record (a
//!   Redis string, a PostgreSQL row, a memory map entry).
//! - **record**: a completed key's content, [`store::CompletedRecord`]: the
//!   request's fingerprint and a **payload**, kept for the retention; for
//!   the HTTP layer the payload is the encoded response (status, headers,
//!   body, trailers). A **replay** is an answer served from it, marked
//!   `Idempotent-Replayed: true`.
//! - **in flight**: a key whose claim is live; **outcome unknown**: a key
//!   whose execution committed its effect and whose response was never
//!   stored.
//! - **refusal**: an answer the layer gives instead of executing (a
//!   problem document, or a gRPC status), each of a [`problem::ProblemKind`].
//! - **fail closed**: when the store fails, refuse (503) rather than
//!   execute unguarded.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs, unsafe_code, unreachable_pub)]
#![warn(missing_debug_implementations, rust_2018_idioms)]

mod body;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
mod config;
pub mod engine;
pub mod fingerprint;
mod future;
mod grpc;
mod headers;
pub mod key;
mod layer;
mod observe;
mod payload;
pub mod policy;
pub mod problem;
mod service;
#[cfg(feature = "sidecar")]
#[cfg_attr(docsrs, doc(cfg(feature = "sidecar")))]
pub mod sidecar;
pub mod store;
mod time;

pub use body::{RequestBody, ResponseBody};
pub use config::{
    DEFAULT_REQUEST_BODY_LIMIT, DEFAULT_STORED_RESPONSE_LIMIT, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED,
};
pub use future::ResponseFuture;
pub use key::{IdempotencyKey, Scope};
pub use layer::IdempotencyLayer;
pub use policy::StorePolicy;
pub use service::{Idempotency, IdempotencyInfo};
pub use store::Store;

/// A boxed, thread-safe error, as used by `tower` and `http-body`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The README and the pages of `docs/`, compiled as doctests with every
/// feature on (as the README's test command runs them), so that their
/// examples keep compiling.
#[cfg(all(
    doctest,
    feature = "memory",
    feature = "redis",
    feature = "redis-cluster",
    feature = "postgres",
    feature = "client",
    feature = "reqwest",
    feature = "sidecar",
    feature = "tls",
    feature = "test-util",
    feature = "metrics",
    feature = "json"
))]
mod documents {
    #[doc = include_str!("../README.md")]
    struct Readme;
    #[doc = include_str!("../docs/client.md")]
    struct ClientPage;
    #[doc = include_str!("../docs/configuration.md")]
    struct ConfigurationPage;
    #[doc = include_str!("../docs/costs.md")]
    struct CostsPage;
    #[doc = include_str!("../docs/demo.md")]
    struct DemoPage;
    #[doc = include_str!("../docs/engine.md")]
    struct EnginePage;
    #[doc = include_str!("../docs/grpc.md")]
    struct GrpcPage;
    #[doc = include_str!("../docs/guarantees.md")]
    struct GuaranteesPage;
    #[doc = include_str!("../docs/observability.md")]
    struct ObservabilityPage;
    #[doc = include_str!("../docs/operating.md")]
    struct OperatingPage;
    #[doc = include_str!("../docs/postgres.md")]
    struct PostgresPage;
    #[doc = include_str!("../docs/redis.md")]
    struct RedisPage;
    #[doc = include_str!("../docs/requests.md")]
    struct RequestsPage;
    #[doc = include_str!("../docs/sidecar.md")]
    struct SidecarPage;
    #[doc = include_str!("../docs/your-own-store.md")]
    struct YourOwnStorePage;
}
