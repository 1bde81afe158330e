//! [`IdempotencyLayer`]: the builder of the configuration, and the
//! `tower::Layer` impl.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode, request, response};
use tower_layer::Layer;

use crate::config::Config;
use crate::engine::{Engine, InFlightPolicy};
use crate::fingerprint::FingerprintMode;
#[cfg(feature = "json")]
use crate::fingerprint::JsonPointer;
use crate::key::{IdempotencyKey, Scope, StoreKey};
use crate::service::{Idempotency, Shared};
use crate::store::{Store, StoreError};

/// Makes the wrapped service safe to retry with an `Idempotency-Key`.
///
/// See the [crate docs](crate) for the behaviour and an example. Every
/// setter takes typed values and none can fail or panic; the defaults are
/// listed on each.
#[derive(Clone)]
pub struct IdempotencyLayer<St> {
    engine: Engine<St>,
    config: Config,
}

impl<St: fmt::Debug> fmt::Debug for IdempotencyLayer<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("engine", &self.engine)
            .field("config", &self.config)
            .finish()
    }
}

impl<St: Store> IdempotencyLayer<St> {
    /// A layer over `store` with the defaults: guards `POST` and
    /// `PATCH`, requires the `Idempotency-Key` header, one global scope,
    /// 1 MiB request and stored-response limits, 24 h retention, 30 s lease,
    /// waits up to 10 s for an in-flight duplicate, answers 409 on a
    /// mismatch, fails closed.
    pub fn new(store: St) -> Self {
        Self {
            engine: Engine::new(store),
            config: Config::default(),
        }
    }

    fn config(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut self.config);
        self
    }

    /// The methods the layer guards (default `POST`, `PATCH`); others pass
    /// through untouched, without store access.
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.config(|c| c.methods = methods)
    }

    /// The key header (default `Idempotency-Key`). For gRPC, metadata keys
    /// are headers too: `idempotency-key`.
    pub fn key_header(self, name: HeaderName) -> Self {
        self.config(|c| c.key_header = name)
    }

    /// Passes guarded requests without a key through, unguarded (by default
    /// they are refused with 400).
    pub fn optional(self) -> Self {
        self.config(|c| c.key_required = false)
    }

    /// Refuses guarded requests without a key with 400 (the default).
    pub fn required(self) -> Self {
        self.config(|c| c.key_required = true)
    }

    /// Derives each request's [`Scope`] (the namespace of its keys), for
    /// example from the principal an authentication layer put in the
    /// request's extensions. Returning `None` refuses the request with 500
    /// ([`ScopeUnavailable`](crate::problem::ProblemKind::ScopeUnavailable)):
    /// it means the layer runs before authentication.
    ///
    /// ```
    /// # #[cfg(feature = "memory")] {
    /// use tower_idempotency::{IdempotencyLayer, Scope, store::MemoryStore};
    ///
    /// #[derive(Clone)]
    /// struct Principal(String);
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new())
    ///     .scope(|req| req.extensions.get::<Principal>().map(|p| Scope::from(p.0.clone())));
    /// # drop(layer);
    /// # }
    /// ```
    ///
    /// Without a scope function every caller shares one namespace: one
    /// caller could receive or block another's result. Set one in any
    /// multi-tenant service.
    pub fn scope<F>(self, scope: F) -> Self
    where
        F: Fn(&request::Parts) -> Option<Scope> + Send + Sync + 'static,
    {
        self.config(|c| c.scope = Some(Arc::new(scope)))
    }

    /// Request headers included in the fingerprint (default none), so the
    /// same key with a different value of one of them is a mismatch.
    pub fn fingerprint_headers(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        let names = names.into_iter().collect();
        self.config(|c| c.fingerprint_headers = names)
    }

    /// Compares JSON request bodies by meaning, not bytes: a retry that
    /// re-serialises the same JSON with other member order, whitespace or
    /// escapes is the same request and gets the replay, where byte
    /// comparison would answer 409. Bodies that are not JSON, or not sent
    /// as JSON, are still compared by their bytes, and gRPC calls always
    /// are. [`FingerprintMode::json`] says exactly what is equal (numbers
    /// included) and what falls back to bytes.
    ///
    /// ```
    /// # #[cfg(feature = "memory")] {
    /// use tower_idempotency::{IdempotencyLayer, store::MemoryStore};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).fingerprint_json();
    /// # drop(layer);
    /// # }
    /// ```
    ///
    /// The mode is part of every fingerprint: keys stored before a change
    /// of mode answer their retries with the mismatch status until they
    /// expire, rather than replay (gRPC calls, compared by their bytes in
    /// either mode, excepted).
    #[cfg(feature = "json")]
    #[cfg_attr(docsrs, doc(cfg(feature = "json")))]
    pub fn fingerprint_json(self) -> Self {
        self.fingerprint_mode(FingerprintMode::json())
    }

    /// Like [`fingerprint_json`](Self::fingerprint_json), leaving the
    /// fields the JSON Pointers name out of the comparison: a client
    /// timestamp or a trace id in the body. See
    /// [`FingerprintMode::json_ignoring`].
    ///
    /// ```
    /// # #[cfg(feature = "memory")] {
    /// use tower_idempotency::{IdempotencyLayer, fingerprint::JsonPointer, store::MemoryStore};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).fingerprint_json_ignoring([
    ///     JsonPointer::from_static("/metadata/sent_at"),
    ///     JsonPointer::from_static("/trace_id"),
    /// ]);
    /// # drop(layer);
    /// # }
    /// ```
    #[cfg(feature = "json")]
    #[cfg_attr(docsrs, doc(cfg(feature = "json")))]
    pub fn fingerprint_json_ignoring(
        self,
        pointers: impl IntoIterator<Item = JsonPointer>,
    ) -> Self {
        self.fingerprint_mode(FingerprintMode::json_ignoring(pointers))
    }

    /// Hashes what `f` makes of each guarded request's head and body in
    /// place of the body (form fields, a protobuf message, anything your
    /// code can compare by meaning); it applies to gRPC calls too. See
    /// [`FingerprintMode::with`].
    ///
    /// ```
    /// # #[cfg(feature = "memory")] {
    /// use tower_idempotency::{IdempotencyLayer, store::MemoryStore};
    ///
    /// // Compare form bodies by their fields, in any order.
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).fingerprint_with(|_parts, body| {
    ///     let mut fields: Vec<&[u8]> = body.split(|&b| b == b'&').collect();
    ///     fields.sort_unstable();
    ///     fields.join(&b'&')
    /// });
    /// # drop(layer);
    /// # }
    /// ```
    pub fn fingerprint_with<F, M>(self, f: F) -> Self
    where
        F: Fn(&request::Parts, &[u8]) -> M + Send + Sync + 'static,
        M: AsRef<[u8]>,
    {
        self.fingerprint_mode(FingerprintMode::with(f))
    }

    /// How request bodies enter the fingerprint (default
    /// [`FingerprintMode::bytes`]).
    pub fn fingerprint_mode(self, mode: FingerprintMode) -> Self {
        self.config(|c| c.fingerprint_mode = mode)
    }

    /// The largest request body read, in bytes (default 1 MiB); larger
    /// requests get 413 and are not executed.
    pub fn request_body_limit(self, bytes: usize) -> Self {
        self.config(|c| c.request_body_limit = bytes)
    }

    /// The largest response body stored, in bytes (default 1 MiB). A larger
    /// response is delivered to its caller, and the key is completed as "not
    /// replayable": retries get 409 and never execute again.
    pub fn stored_response_limit(self, bytes: usize) -> Self {
        self.config(|c| c.stored_response_limit = bytes)
    }

    /// How long completed responses are replayed (default 24 h). Choose more
    /// than your clients' retry horizon.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.engine = self.engine.retention(retention);
        self
    }

    /// How long a claim lives without renewal (default 30 s; renewed every
    /// third of it while the handler runs). A process that dies loses its
    /// claim after one lease, and a retry may then execute again.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.engine = self.engine.lease(lease);
        self
    }

    /// Makes a duplicate of an in-flight request wait for the first one, up
    /// to `timeout`, and answer with its response (the default, 10 s). After
    /// the timeout it gets 409 with `Retry-After`.
    pub fn wait_for_in_flight(mut self, timeout: Duration) -> Self {
        self.engine = self.engine.in_flight_policy(InFlightPolicy::Wait(timeout));
        self
    }

    /// Answers a duplicate of an in-flight request with 409 and
    /// `Retry-After` at once, instead of waiting.
    pub fn reject_in_flight(mut self) -> Self {
        self.engine = self.engine.in_flight_policy(InFlightPolicy::Reject);
        self
    }

    /// The status for a key reused with a different request (default 409;
    /// the IETF draft recommends 422).
    pub fn mismatch_status(self, status: StatusCode) -> Self {
        self.config(|c| c.mismatch_status = status)
    }

    /// Decides which responses are stored (default
    /// [`default_should_store`](crate::policy::default_should_store): all but
    /// 5xx, 408 and 429). A response not stored releases the key, so a retry
    /// executes again. A handler's [`StorePolicy`](crate::StorePolicy)
    /// extension overrides this for one response.
    pub fn store_when<F>(self, predicate: F) -> Self
    where
        F: Fn(&response::Parts) -> bool + Send + Sync + 'static,
    {
        self.config(|c| c.should_store = Arc::new(predicate))
    }

    /// The header that marks replayed responses (default `Idempotent-Replayed`).
    pub fn replay_header(self, name: HeaderName) -> Self {
        self.config(|c| c.replay_header = name)
    }

    /// When the store fails, run the request **without** idempotency and log
    /// a warning, instead of answering 503. Only for endpoints where a
    /// duplicate is cheaper than an outage; never for payments.
    pub fn fail_open(self) -> Self {
        self.config(|c| c.fail_open = true)
    }

    /// When the store fails, answer 503 with `Retry-After` and do not
    /// execute (the default).
    pub fn fail_closed(self) -> Self {
        self.config(|c| c.fail_open = false)
    }

    /// Releases the key when the outcome is unknown (the response body broke
    /// off after its head), so a retry executes again, instead of
    /// completing it as "outcome unknown" and refusing every retry (the
    /// default). Only for endpoints where running twice is harmless.
    pub fn release_unknown_outcomes(self) -> Self {
        self.config(|c| c.release_unknown_outcomes = true)
    }

    /// Also replay `Set-Cookie` (default off: cookies belong to one caller).
    pub fn replay_set_cookie(self, replay: bool) -> Self {
        self.config(|c| c.replay_set_cookie = replay)
    }

    /// Never store or replay this response header (for example a request id
    /// or rate-limit header). May be called more than once.
    pub fn exclude_replayed_header(self, name: HeaderName) -> Self {
        self.config(|c| c.excluded_headers.push(name))
    }

    /// The `Retry-After` sent with 409 (in flight) and 503 (default 1 s).
    pub fn retry_after(self, after: Duration) -> Self {
        self.config(|c| c.retry_after = after)
    }

    /// The gRPC methods (paths such as `/payments.v1.Payments/Charge`) the
    /// layer guards; other gRPC calls pass through untouched.
    ///
    /// A layer cannot tell a streaming RPC from a unary one on the wire, and
    /// it must read a guarded request's whole body before calling the
    /// service, which would stall a client-streaming or bidirectional call.
    /// So by default a gRPC call is guarded only when it carries an
    /// `idempotency-key` (send keys on unary calls only), and a keyless one
    /// passes through. With a list, the listed methods require a key
    /// (missing: `INVALID_ARGUMENT`) and every other method passes through,
    /// key or not.
    pub fn grpc_methods<I, P>(self, paths: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        let paths = paths.into_iter().map(Into::into).collect();
        self.config(|c| c.grpc_methods = Some(paths))
    }

    /// The executions running behind this layer (and every service it
    /// built): wait for them at shutdown so none is cut off before its
    /// response is stored.
    ///
    /// ```no_run
    /// # #[cfg(feature = "memory")]
    /// # async fn shutdown(layer: tower_idempotency::IdempotencyLayer<tower_idempotency::store::MemoryStore>) {
    /// // after the server stopped accepting and drained its connections:
    /// layer.executions().wait_idle().await;
    /// # }
    /// ```
    pub fn executions(&self) -> &crate::engine::Executions {
        self.engine.executions()
    }

    /// The store.
    pub fn store(&self) -> &St {
        self.engine.store()
    }

    /// Drops whatever is stored for `key` in `scope` (an operator's tool):
    /// the next request with it executes again. Returns whether anything was
    /// stored.
    pub async fn purge(&self, scope: &Scope, key: &IdempotencyKey) -> Result<bool, StoreError> {
        self.engine.store().purge(StoreKey::new(scope, key)).await
    }
}

impl<S, St: Store> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            shared: Arc::new(Shared {
                engine: self.engine.clone(),
                config: self.config.clone(),
            }),
        }
    }
}
