//! The layer's configuration: what the service reads on every request.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode, request, response};

use crate::fingerprint::FingerprintMode;
use crate::key::Scope;

/// The default key header, `Idempotency-Key`.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The default replay marker header, `Idempotent-Replayed` (as Stripe spells it).
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The default request body limit: 1 MiB.
pub const DEFAULT_REQUEST_BODY_LIMIT: usize = 1024 * 1024;
/// The default stored-response limit: 1 MiB.
pub const DEFAULT_STORED_RESPONSE_LIMIT: usize = 1024 * 1024;

pub(crate) type ScopeFn = dyn Fn(&request::Parts) -> Option<Scope> + Send + Sync;
pub(crate) type StorePredicate = dyn Fn(&response::Parts) -> bool + Send + Sync;

/// Everything the service reads per request, built by
/// [`IdempotencyLayer`](crate::IdempotencyLayer)'s setters and shared by
/// every clone of the service (inside its one `Arc`).
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) methods: Vec<Method>,
    pub(crate) key_header: HeaderName,
    pub(crate) key_required: bool,
    pub(crate) scope: Option<Arc<ScopeFn>>,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) fingerprint_mode: FingerprintMode,
    pub(crate) request_body_limit: usize,
    pub(crate) stored_response_limit: usize,
    pub(crate) mismatch_status: StatusCode,
    pub(crate) should_store: Arc<StorePredicate>,
    pub(crate) replay_header: HeaderName,
    pub(crate) fail_open: bool,
    pub(crate) release_unknown_outcomes: bool,
    pub(crate) replay_set_cookie: bool,
    pub(crate) excluded_headers: Vec<HeaderName>,
    pub(crate) retry_after: Duration,
    pub(crate) grpc_methods: Option<Vec<String>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            methods: vec![Method::POST, Method::PATCH],
            key_header: IDEMPOTENCY_KEY,
            key_required: true,
            scope: None,
            fingerprint_headers: Vec::new(),
            fingerprint_mode: FingerprintMode::bytes(),
            request_body_limit: DEFAULT_REQUEST_BODY_LIMIT,
            stored_response_limit: DEFAULT_STORED_RESPONSE_LIMIT,
            mismatch_status: StatusCode::CONFLICT,
            should_store: Arc::new(crate::policy::default_should_store),
            replay_header: IDEMPOTENT_REPLAYED,
            fail_open: false,
            release_unknown_outcomes: false,
            replay_set_cookie: false,
            excluded_headers: Vec::new(),
            retry_after: Duration::from_secs(1),
            grpc_methods: None,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("methods", &self.methods)
            .field("key_header", &self.key_header)
            .field("key_required", &self.key_required)
            .field("scoped", &self.scope.is_some())
            .field("fingerprint_headers", &self.fingerprint_headers)
            .field("fingerprint_mode", &self.fingerprint_mode)
            .field("request_body_limit", &self.request_body_limit)
            .field("stored_response_limit", &self.stored_response_limit)
            .field("mismatch_status", &self.mismatch_status)
            .field("replay_header", &self.replay_header)
            .field("fail_open", &self.fail_open)
            .field("release_unknown_outcomes", &self.release_unknown_outcomes)
            .field("replay_set_cookie", &self.replay_set_cookie)
            .field("excluded_headers", &self.excluded_headers)
            .field("retry_after", &self.retry_after)
            .field("grpc_methods", &self.grpc_methods)
            .finish_non_exhaustive()
    }
}
