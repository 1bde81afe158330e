//! The support module of every test and bench target: a ledger service, a
//! fault-injecting store, a server (here); a throwaway `redis-server`
//! (`redis_server`) and a TCP proxy that breaks the network on command
//! (`fault_proxy`); a counting allocator and floods of records (`heap`);
//! the gRPC demo's service (`grpc_service`, from `examples/`).
//!
//! Every target includes it the same way: `mod common;` in `tests/`, and
//! `#[path = "../tests/common/mod.rs"] mod common;` in `benches/`.
#![allow(dead_code)]

#[cfg(any(feature = "redis", feature = "client", feature = "postgres"))]
pub mod fault_proxy;
#[path = "../../examples/grpc_payments/service.rs"]
pub mod grpc_service;
pub mod heap;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis-cluster")]
pub mod redis_cluster;
#[cfg(feature = "redis")]
pub mod redis_server;
#[cfg(feature = "redis")]
pub mod redis_store;
#[cfg(feature = "sidecar")]
pub mod sidecar;
#[cfg(feature = "tls")]
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::{Notify, Semaphore};
use tower::{Service, ServiceExt};
use tower_idempotency::engine::ExecutionContext;
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::fault::FaultStore;
use tower_idempotency::store::{Claim, MemoryStore, Store};
use tower_idempotency::{IdempotencyInfo, IdempotencyLayer, RequestBody, StorePolicy};

/// An inner service that counts its executions and behaves as the request's
/// headers say:
/// - `x-status: N` answers with status N;
/// - `x-gate: 1` waits for a permit from [`Ledger::open`] after entering;
/// - `x-body-bytes: N` answers with N bytes;
/// - `x-fail: 1` returns `Err`; `x-panic: 1` panics;
/// - `x-policy: store|skip|unknown` sets a `StorePolicy` extension.
///
/// It answers `exec-<n>:<request body>` with headers `x-exec: <n>`, two
/// `set-cookie`s, a repeated `x-multi`, and a `connection`-scoped header.
#[derive(Clone)]
pub struct Ledger {
    pub executions: Arc<AtomicUsize>,
    /// Executions that ran to the end (not cancelled).
    pub finished: Arc<AtomicUsize>,
    pub entered: Arc<Notify>,
    /// Notified (one permit) each time an execution ran to its end.
    pub done: Arc<Notify>,
    gate: Arc<Semaphore>,
    pub saw_info: Arc<AtomicBool>,
    pub last_body: Arc<std::sync::Mutex<Bytes>>,
}

impl Ledger {
    pub fn new() -> Self {
        Self {
            executions: Arc::default(),
            finished: Arc::default(),
            entered: Arc::default(),
            done: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
            saw_info: Arc::default(),
            last_body: Arc::default(),
        }
    }

    pub fn count(&self) -> usize {
        self.executions.load(Ordering::SeqCst)
    }

    /// Lets `n` gated executions finish.
    pub fn open(&self, n: usize) {
        self.gate.add_permits(n);
    }

    pub fn service(
        &self,
    ) -> impl Service<
        Request<RequestBody<Body>>,
        Response = Response<Body>,
        Error = TestError,
        Future = impl std::future::Future<Output = Result<Response<Body>, TestError>> + Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static {
        let ledger = self.clone();
        tower::service_fn(move |req: Request<RequestBody<Body>>| {
            let ledger = ledger.clone();
            async move { ledger.handle(req).await }
        })
    }

    async fn handle(&self, req: Request<RequestBody<Body>>) -> Result<Response<Body>, TestError> {
        let n = self.executions.fetch_add(1, Ordering::SeqCst) + 1;
        if req.extensions().get::<IdempotencyInfo>().is_some() {
            self.saw_info.store(true, Ordering::SeqCst);
        }
        let headers = req.headers().clone();
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let status = header("x-status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(201u16);
        let gated = header("x-gate").is_some();
        let fail = header("x-fail").is_some();
        let panic = header("x-panic").is_some();
        let body_bytes: Option<usize> = header("x-body-bytes").and_then(|s| s.parse().ok());
        let policy = header("x-policy");
        let body = req
            .into_body()
            .collect()
            .await
            .map_err(|_| TestError("body"))?
            .to_bytes();
        *self.last_body.lock().unwrap() = body.clone();
        self.entered.notify_waiters();
        if gated {
            let permit = self
                .gate
                .acquire()
                .await
                .map_err(|_| TestError("gate closed"))?;
            permit.forget();
        }
        self.finished.fetch_add(1, Ordering::SeqCst);
        self.done.notify_one();
        if fail {
            return Err(TestError("handler failed"));
        }
        if panic {
            panic!("handler panicked on purpose");
        }
        let payload = match body_bytes {
            Some(len) => Bytes::from(vec![b'z'; len]),
            None => {
                let mut p = format!("exec-{n}:").into_bytes();
                p.extend_from_slice(&body);
                Bytes::from(p)
            }
        };
        let mut res = Response::new(Body::from(payload));
        *res.status_mut() = StatusCode::from_u16(status).unwrap();
        let h = res.headers_mut();
        h.insert("x-exec", HeaderValue::from(n));
        h.insert(
            "content-type",
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.append(
            "set-cookie",
            HeaderValue::from_static("session=abc; Path=/"),
        );
        h.append(
            "set-cookie",
            HeaderValue::from_static("theme=dark; Expires=Mon, 21 Oct 2030 07:28:00 GMT"),
        );
        h.append("x-multi", HeaderValue::from_static("one"));
        h.append("x-multi", HeaderValue::from_static("two, three"));
        h.append(
            "x-binary",
            HeaderValue::from_bytes(&[0xfe, b'x', 0x80]).unwrap(),
        );
        h.insert("connection", HeaderValue::from_static("x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        match policy.as_deref() {
            Some("store") => {
                res.extensions_mut().insert(StorePolicy::Store);
            }
            Some("skip") => {
                res.extensions_mut().insert(StorePolicy::DoNotStore);
            }
            Some("unknown") => {
                res.extensions_mut().insert(StorePolicy::OutcomeUnknown);
            }
            _ => {}
        }
        Ok(res)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TestError(pub &'static str);

impl std::fmt::Display for TestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for TestError {}

/// The tests' store: the in-memory store behind a [`FaultStore`], which
/// counts every call and fails, delays or corrupts chosen ones
/// (`inject`), or all of them (`fail_all`, until `clear`).
pub type TestStore<St = MemoryStore> = FaultStore<St>;

/// A fresh [`TestStore`] on a memory store of its own.
pub fn test_store() -> TestStore {
    FaultStore::new(MemoryStore::new())
}

/// A POST to `/pay` with the given key and body.
pub fn post(key: Option<&str>) -> http::request::Builder {
    let mut b = Request::post("/pay").header("content-type", "application/json");
    if let Some(key) = key {
        b = b.header("idempotency-key", key);
    }
    b
}

pub fn req(key: Option<&str>, body: &'static str) -> Request<Body> {
    post(key).body(Body::from(body)).unwrap()
}

/// A collected response.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub trailers: Option<http::HeaderMap>,
}

impl Answer {
    pub fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    pub fn problem_type(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).expect("problem+json body");
        v["type"].as_str().unwrap_or_default().to_owned()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn collect<B>(res: Response<B>) -> Answer
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = res.into_parts();
    let collected = body.collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

/// Awaits duplicate calls: every one must answer 201, all with the same
/// body.
pub async fn all_created_alike(calls: Vec<tokio::task::JoinHandle<Answer>>) {
    let mut bodies = Vec::new();
    for call in calls {
        let answer = call.await.expect("a call panicked");
        assert_eq!(answer.status, StatusCode::CREATED);
        bodies.push(answer.body);
    }
    assert!(bodies.iter().all(|b| *b == bodies[0]));
}

/// Sends one request through a clone of the service.
pub async fn send<Svc>(svc: &Svc, req: Request<Body>) -> Answer
where
    Svc: Service<Request<Body>, Response = Response<tower_idempotency::ResponseBody<Body>>> + Clone,
    Svc::Error: std::fmt::Debug,
{
    let res = svc.clone().oneshot(req).await.expect("service error");
    collect(res).await
}

/// Starts an axum server on a free loopback port serving `svc` on every path.
pub async fn serve<Svc>(svc: Svc) -> SocketAddr
where
    Svc: Service<Request<Body>, Error = Infallible> + Clone + Send + Sync + 'static,
    Svc::Response: axum::response::IntoResponse,
    Svc::Future: Send + 'static,
{
    let app = axum::Router::new().fallback_service(svc);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

pub fn layer(store: TestStore) -> IdempotencyLayer<TestStore> {
    IdempotencyLayer::new(store)
}

/// Reads the execution context off a handler's request (for engine tests).
pub fn context_of(req: &Request<RequestBody<Body>>) -> Option<ExecutionContext> {
    req.extensions()
        .get::<IdempotencyInfo>()
        .map(|i| i.execution().clone())
}

impl Ledger {
    /// The ledger as an infallible service (handler errors become 500s), as
    /// axum's router requires.
    pub fn infallible(
        &self,
    ) -> impl Service<
        Request<RequestBody<Body>>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl std::future::Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static {
        let svc = self.service();
        tower::service_fn(move |req: Request<RequestBody<Body>>| {
            let svc = svc.clone();
            async move {
                Ok::<_, Infallible>(match svc.oneshot(req).await {
                    Ok(res) => res,
                    Err(_) => {
                        let mut res = Response::new(Body::from("failed"));
                        *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                        res
                    }
                })
            }
        })
    }
}

/// A request body fed through a channel: a test can send chunks (or an
/// error) when it likes, to model slow uploads and broken streams.
pub struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|o| o.map(|r| r.map(http_body::Frame::data)))
    }
}

/// A body whose chunks are sent through the returned sender; it ends when
/// the sender is dropped.
pub fn channel_body() -> (
    tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    Body,
) {
    channel_body_holding(64)
}

/// A [`channel_body`] that holds at most `chunks` unread chunks, so a send
/// past them returns only once the reader took one.
pub fn channel_body_holding(
    chunks: usize,
) -> (
    tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    Body,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(chunks);
    (tx, Body::new(ChannelBody { rx }))
}

/// Starts a gated request with key `k` and `body` on its own task, and
/// returns once its handler has been entered (so the key is in flight).
pub async fn start_gated<Svc>(
    svc: &Svc,
    ledger: &Ledger,
    body: &'static str,
) -> tokio::task::JoinHandle<Answer>
where
    Svc: Service<Request<Body>, Response = Response<tower_idempotency::ResponseBody<Body>>>
        + Clone
        + Send
        + Sync
        + 'static,
    Svc::Future: Send,
    Svc::Error: std::fmt::Debug + Send,
{
    let entered = ledger.entered.notified();
    let svc = svc.clone();
    let gated = post(Some("k"))
        .header("x-gate", "1")
        .body(Body::from(body))
        .unwrap();
    let handle = tokio::spawn(async move { send(&svc, gated).await });
    entered.await;
    handle
}

/// `e` and the errors it came from, as one line (`a: b: c`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut chain = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    chain
}

/// Polls `check` every 10 ms until it holds; fails the test, naming
/// `what`, when it does not within `limit`. The one way a test waits for
/// something to happen (never a sleep of a guessed length).
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Prints past the test harness's output capture (which swallows what a
/// passing test prints), so a skip is never silent.
pub fn say_skipped(line: &str) {
    use std::io::Write;
    match std::fs::OpenOptions::new().write(true).open("/dev/stderr") {
        Ok(mut stderr) => {
            let _ = writeln!(stderr, "{line}");
        }
        Err(_) => eprintln!("{line}"),
    }
}

pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// How long until `store` acquires a new key (each try a key never used
/// before), or `None` after `limit`: how long a store takes to serve again
/// after a fault.
pub async fn first_claim_within<St: Store>(store: &St, limit: Duration) -> Option<Duration> {
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        let key = StoreKey::from_parts(b"probe", &unique().to_be_bytes());
        if let Ok(Claim::Acquired(_)) = store
            .claim(
                key,
                Fingerprint::of_bytes(b"probe"),
                Duration::from_secs(30),
            )
            .await
        {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A request to the [`Ledger`] under `key`, held at its gate until
/// [`Ledger::open`] when `gate` is set.
pub fn ledger_request(key: &str, gate: bool) -> http::Request<axum::body::Body> {
    let mut b = http::Request::post("/pay").header("idempotency-key", key);
    if gate {
        b = b.header("x-gate", "1");
    }
    b.body(axum::body::Body::from(r#"{"amount":100}"#)).unwrap()
}

pub fn ledger_request_k() -> http::Request<axum::body::Body> {
    ledger_request("k", false)
}

/// Retries (for up to 5 s) while the store answers 503, as a client would
/// while Redis comes back; returns the first other answer.
pub async fn retry_until_available<Svc>(
    svc: &Svc,
    request: fn() -> http::Request<axum::body::Body>,
) -> Answer
where
    Svc: tower::Service<
            http::Request<axum::body::Body>,
            Response = http::Response<tower_idempotency::ResponseBody<axum::body::Body>>,
        > + Clone,
    Svc::Error: std::fmt::Debug,
{
    for _ in 0..50 {
        let answer = send(svc, request()).await;
        if answer.status != StatusCode::SERVICE_UNAVAILABLE {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the store did not become available again within 5 s");
}

/// Claims a key until it is acquired, waiting on it meanwhile; returns how
/// long that took, or `None` after `limit`.
pub async fn acquire_within<St: Store>(
    store: &St,
    key: StoreKey,
    limit: Duration,
) -> Option<Duration> {
    let started = std::time::Instant::now();
    let fp = Fingerprint::of_bytes(b"x");
    while started.elapsed() < limit {
        match store.claim(key, fp, Duration::from_secs(30)).await {
            Ok(Claim::Acquired(_)) => return Some(started.elapsed()),
            Ok(Claim::InFlight { fence, .. }) => {
                let _ = store.wait(key, fence, Duration::from_secs(1)).await;
            }
            Ok(other) => panic!("{other:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    None
}
