//! The whole protocol end to end, over real sockets: the client's
//! `IdempotentRetryLayer` → a TCP proxy that loses answers → the server's
//! `IdempotencyLayer` over a handler that counts its executions.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use common::fault_proxy::FaultProxy;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Notify;
use tower::{Layer, ServiceExt};
use tower_idempotency::IdempotencyLayer;
use tower_idempotency::client::{
    Attempts, IdempotentRetry, IdempotentRetryLayer, RequestBodyFailed, RetryBody, RetryPolicy,
};
use tower_idempotency::problem::ProblemKind;
use tower_idempotency::store::MemoryStore;

type HttpClient = Client<HttpConnector, RetryBody<Full<Bytes>>>;

/// A client for requests with body `B` (the layer sends `RetryBody<B>`).
fn http_client<B>() -> Client<HttpConnector, B>
where
    B: http_body::Body + Send,
    B::Data: Send,
{
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_test_writer()
        .try_init();
    Client::builder(TokioExecutor::new()).build_http()
}

fn retrying(policy: RetryPolicy) -> IdempotentRetry<HttpClient> {
    IdempotentRetryLayer::new(policy).layer(http_client())
}

/// Exact waits (no jitter): 100 ms, then 200 ms, …
fn exact_policy() -> RetryPolicy {
    RetryPolicy::default()
        .backoff(Duration::from_millis(100), 2.0, Duration::from_secs(1))
        .full_jitter(false)
}

/// A server: the layer over a handler that counts its executions and
/// answers 201 `charge-<n>`, or what `answer` says for execution n.
async fn server(
    answer: impl Fn(usize) -> Option<Response<Body>> + Clone + Send + Sync + 'static,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let executions = Arc::new(AtomicUsize::new(0));
    let handler = {
        let executions = executions.clone();
        tower::service_fn(move |_req: Request<tower_idempotency::RequestBody<Body>>| {
            let n = executions.fetch_add(1, Ordering::SeqCst) + 1;
            let answer = answer.clone();
            async move {
                Ok::<_, Infallible>(answer(n).unwrap_or_else(|| {
                    let mut res = Response::new(Body::from(format!("charge-{n}")));
                    *res.status_mut() = StatusCode::CREATED;
                    res
                }))
            }
        })
    };
    let svc = IdempotencyLayer::new(MemoryStore::new()).layer(handler);
    (common::serve(svc).await, executions)
}

/// A bare server (no idempotency layer): counts the requests it gets and
/// answers each with `answer()`.
async fn bare_server(
    answer: impl Fn() -> Response<Body> + Clone + Send + Sync + 'static,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let requests = Arc::new(AtomicUsize::new(0));
    let svc = {
        let requests = requests.clone();
        tower::service_fn(move |_req: Request<Body>| {
            requests.fetch_add(1, Ordering::SeqCst);
            let res = answer();
            async move { Ok::<_, Infallible>(res) }
        })
    };
    (common::serve(svc).await, requests)
}

/// A problem document of `kind`, answered with `status`, as the server
/// side writes it.
fn problem(kind: ProblemKind, status: StatusCode) -> Response<Body> {
    let doc = format!(
        r#"{{"type":"{}","title":"{}","status":{}}}"#,
        kind.type_uri(),
        kind.title(),
        status.as_u16()
    );
    let mut res = Response::new(Body::from(doc));
    *res.status_mut() = status;
    res.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/problem+json"),
    );
    res
}

/// What the sidecar answers when the upstream broke off after executing.
fn outcome_unknown_502() -> Response<Body> {
    problem(ProblemKind::OutcomeUnknown, StatusCode::BAD_GATEWAY)
}

/// A long problem document: `LONG_CHUNKS` chunks of `LONG_CHUNK` bytes
/// (1 MiB), of which the server sends `LONG_HELD` (128 KiB, twice what the
/// client reads to judge) until its gate opens.
const LONG_CHUNK: usize = 8 * 1024;
const LONG_CHUNKS: usize = 128;
const LONG_HELD: usize = 16;

fn long_chunk(i: usize) -> Bytes {
    Bytes::from(vec![b'a' + (i % 26) as u8; LONG_CHUNK])
}

fn long_document() -> Vec<u8> {
    (0..LONG_CHUNKS)
        .flat_map(|i| long_chunk(i).to_vec())
        .collect()
}

/// A bare server answering a 409 problem document of 1 MiB, chunked, held
/// after its first 128 KiB until the returned gate is notified: a client
/// that reads it whole cannot answer before then.
async fn long_problem_server() -> (SocketAddr, Arc<AtomicUsize>, Arc<Notify>) {
    let gate = Arc::new(Notify::new());
    let answer = {
        let gate = gate.clone();
        move || {
            let gate = gate.clone();
            let chunks = futures_util::stream::unfold(0, move |i| {
                let gate = gate.clone();
                async move {
                    if i == LONG_CHUNKS {
                        return None;
                    }
                    if i == LONG_HELD {
                        gate.notified().await;
                    }
                    Some((Ok::<_, Infallible>(long_chunk(i)), i + 1))
                }
            });
            let mut res = Response::new(Body::from_stream(chunks));
            *res.status_mut() = StatusCode::CONFLICT;
            res.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("application/problem+json"),
            );
            res
        }
    };
    let (addr, requests) = bare_server(answer).await;
    (addr, requests, gate)
}

fn charge(addr: SocketAddr, key: Option<&str>, body: &'static str) -> Request<Full<Bytes>> {
    let mut req = Request::post(format!("http://{addr}/charge"));
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    req.body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

fn attempts<B>(res: &Response<B>) -> u32 {
    res.extensions().get::<Attempts>().map_or(0, |a| a.0)
}

/// The test that makes the crate worth adopting: the server charges, the
/// answer is lost on the way back, the client retries with the same key
/// and gets the original answer, replayed; the handler ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_is_retried_with_the_same_key_and_replayed_not_executed_again() {
    let (addr, executions) = server(|_| None).await;
    let proxy = FaultProxy::start(addr).await.unwrap();
    proxy.swallow_answers(2);
    let client = retrying(exact_policy());
    let started = Instant::now();
    let res = client
        .oneshot(charge(proxy.addr(), None, "amount=100"))
        .await
        .expect("an answer in the end");
    let took = started.elapsed();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(
        res.headers()
            .get("idempotent-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..]),
        "the original answer, replayed"
    );
    assert_eq!(attempts(&res), 3);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "charge-1", "the first execution's answer");
    assert_eq!(executions.load(Ordering::SeqCst), 1, "one execution");
    assert_eq!(proxy.accepted(), 3, "one connection per attempt");
    // Waits of 100 ms then 200 ms, no jitter.
    assert!(
        took >= Duration::from_millis(300),
        "waited the backoff: {took:?}"
    );
}

/// The client keeps a key the caller set, on every attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_caller_set_is_kept() {
    let (addr, executions) = server(|_| None).await;
    let proxy = FaultProxy::start(addr).await.unwrap();
    proxy.swallow_answers(1);
    let res = retrying(exact_policy())
        .oneshot(charge(proxy.addr(), Some("order-42"), "amount=100"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(attempts(&res), 2);
    // The same key again, from another client: a replay, not a charge.
    let again = retrying(exact_policy())
        .oneshot(charge(addr, Some("order-42"), "amount=100"))
        .await
        .unwrap();
    assert_eq!(attempts(&again), 1);
    assert_eq!(
        again.into_body().collect().await.unwrap().to_bytes(),
        "charge-1"
    );
    assert_eq!(executions.load(Ordering::SeqCst), 1);
}

/// 503 with `Retry-After: 1`: the client waits the second the server asked
/// for (not its 100 ms backoff), then gets the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_obeyed() {
    let (addr, executions) = server(|n| {
        (n == 1).then(|| {
            let mut res = Response::new(Body::from("busy"));
            *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            res.headers_mut()
                .insert("retry-after", http::HeaderValue::from_static("1"));
            res
        })
    })
    .await;
    let started = Instant::now();
    let res = retrying(exact_policy())
        .oneshot(charge(addr, None, "amount=100"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(attempts(&res), 2);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // A 503 is not stored: the second attempt executed.
    assert_eq!(executions.load(Ordering::SeqCst), 2);
}

/// A key reused with another body is refused (409 mismatch) and never
/// retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatch_is_final() {
    let (addr, executions) = server(|_| None).await;
    let client = retrying(exact_policy());
    let first = client
        .clone()
        .oneshot(charge(addr, Some("k-1"), "amount=100"))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let started = Instant::now();
    let refused = client
        .oneshot(charge(addr, Some("k-1"), "amount=500"))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    assert_eq!(attempts(&refused), 1, "never retried");
    assert!(started.elapsed() < Duration::from_millis(100));
    let body = refused.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("KeyMismatch"),
        "the body as sent"
    );
    assert_eq!(executions.load(Ordering::SeqCst), 1);
}

/// A dead server: attempts until the deadline, then the last error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_is_retried_until_the_deadline() {
    // A proxy to a port nobody listens on (port 1, privileged: no test
    // server can take it): every attempt is accepted, then closed, and
    // counted.
    let dead = SocketAddr::from(([127, 0, 0, 1], 1));
    let proxy = FaultProxy::start(dead).await.unwrap();
    let policy = exact_policy()
        .max_attempts(100)
        .deadline(Duration::from_millis(1500));
    let started = Instant::now();
    let result = retrying(policy)
        .oneshot(charge(proxy.addr(), None, "amount=100"))
        .await;
    let took = started.elapsed();
    assert!(result.is_err(), "no answer: {result:?}");
    assert!(
        took < Duration::from_millis(1500),
        "stopped at the deadline: {took:?}"
    );
    // Waits of 100, 200, 400, 800 ms: the fifth would pass the deadline.
    assert_eq!(proxy.accepted(), 4, "attempts within 1.5 s");
}

/// A method outside the list is sent once, whatever happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_not_allowed_is_sent_once() {
    let (addr, _) = server(|_| None).await;
    let proxy = FaultProxy::start(addr).await.unwrap();
    proxy.swallow_answers(1);
    let result = retrying(exact_policy().methods([http::Method::PUT]))
        .oneshot(charge(proxy.addr(), None, "amount=100"))
        .await;
    assert!(result.is_err());
    assert_eq!(proxy.accepted(), 1);
}

/// A request body that yields `frames`, then fails.
type FailingBody = StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>,
>;

fn failing_body(frames: &[&'static str]) -> FailingBody {
    let frames: Vec<_> = frames
        .iter()
        .copied()
        .map(|f| Ok(Frame::data(Bytes::from_static(f.as_bytes()))))
        .chain([Err(std::io::Error::other("the caller's stream broke"))])
        .collect();
    StreamBody::new(futures_util::stream::iter(frames))
}

/// A request body that fails (after "part1", or before any data) fails the
/// call: nothing reaches the server, which would take what was read for
/// the whole request and execute it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_fails_is_not_sent_at_all() {
    let (addr, executions) = server(|_| None).await;
    let proxy = FaultProxy::start(addr).await.unwrap();
    let client: IdempotentRetry<Client<HttpConnector, RetryBody<FailingBody>>> =
        IdempotentRetryLayer::new(exact_policy()).layer(http_client());
    let cases: [&[&'static str]; 2] = [&["part1"], &[]];
    for frames in cases {
        let request = Request::post(format!("http://{}/charge", proxy.addr()))
            .body(failing_body(frames))
            .unwrap();
        let Err(error) = client.clone().oneshot(request).await else {
            panic!("the body failed: {frames:?}");
        };
        assert!(
            error.downcast_ref::<RequestBodyFailed>().is_some(),
            "{error}"
        );
        assert_eq!(
            error.to_string(),
            "the request body failed before it was sent: the caller's stream broke"
        );
    }
    assert_eq!(proxy.accepted(), 0, "not even a connection");
    assert_eq!(executions.load(Ordering::SeqCst), 0, "never executed");
}

/// The sidecar's "outcome unknown" comes as a 502 (or 504): the request
/// executed, and it is never sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_unknown_answered_with_502_is_final() {
    let (addr, requests) = bare_server(outcome_unknown_502).await;
    let res = retrying(exact_policy())
        .oneshot(charge(addr, None, "amount=100"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(attempts(&res), 1);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains(ProblemKind::OutcomeUnknown.type_uri()),
        "the document as sent"
    );
    assert_eq!(requests.load(Ordering::SeqCst), 1, "attempted exactly once");
}

/// A 502 without a problem document is still retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_502_is_retried() {
    let (addr, requests) = bare_server(|| {
        let mut res = Response::new(Body::from("bad gateway"));
        *res.status_mut() = StatusCode::BAD_GATEWAY;
        res
    })
    .await;
    let res = retrying(exact_policy().max_attempts(3))
        .oneshot(charge(addr, None, "amount=100"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(attempts(&res), 3);
    assert_eq!(requests.load(Ordering::SeqCst), 3);
}

/// A chunked 409 problem document of 1 MiB is read only up to 64 KiB (the
/// answer comes while the server still holds the rest): too long to judge,
/// it is final, and the caller gets it byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_problem_document_is_not_read_whole_and_is_returned_whole() {
    let (addr, requests, gate) = long_problem_server().await;
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        retrying(exact_policy()).oneshot(charge(addr, None, "amount=100")),
    )
    .await
    .expect("an answer before the server sent the rest: the body was read whole")
    .unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(attempts(&res), 1, "too long to judge: final");
    gate.notify_one();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), LONG_CHUNKS * LONG_CHUNK);
    assert!(body == long_document(), "byte for byte");
    assert_eq!(requests.load(Ordering::SeqCst), 1);
}

/// The same policy as a `reqwest_middleware` middleware.
#[cfg(feature = "reqwest")]
mod with_reqwest {
    use super::*;
    use tower_idempotency::client::IdempotentRetryMiddleware;

    fn client(policy: RetryPolicy) -> reqwest_middleware::ClientWithMiddleware {
        reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
            .with(IdempotentRetryMiddleware::new(policy))
            .build()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_answer_is_retried_with_the_same_key_and_replayed() {
        let (addr, executions) = server(|_| None).await;
        let proxy = FaultProxy::start(addr).await.unwrap();
        proxy.swallow_answers(1);
        let res = client(exact_policy())
            .post(format!("http://{}/charge", proxy.addr()))
            .body("amount=100")
            .send()
            .await
            .expect("an answer in the end");
        assert_eq!(res.status(), StatusCode::CREATED);
        assert_eq!(
            res.headers()
                .get("idempotent-replayed")
                .map(|v| v.as_bytes()),
            Some(&b"true"[..])
        );
        assert_eq!(res.extensions().get::<Attempts>().map(|a| a.0), Some(2));
        assert_eq!(res.text().await.unwrap(), "charge-1");
        assert_eq!(executions.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mismatch_is_final_and_its_body_is_kept() {
        let (addr, executions) = server(|_| None).await;
        let client = client(exact_policy());
        let url = format!("http://{addr}/charge");
        let first = client
            .post(&url)
            .header("idempotency-key", "k-2")
            .body("amount=100")
            .send()
            .await
            .unwrap();
        assert_eq!(first.status(), StatusCode::CREATED);
        let refused = client
            .post(&url)
            .header("idempotency-key", "k-2")
            .body("amount=500")
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::CONFLICT);
        assert_eq!(refused.extensions().get::<Attempts>().map(|a| a.0), Some(1));
        assert!(refused.text().await.unwrap().contains("KeyMismatch"));
        assert_eq!(executions.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outcome_unknown_answered_with_502_is_final() {
        let (addr, requests) = bare_server(outcome_unknown_502).await;
        let res = client(exact_policy())
            .post(format!("http://{addr}/charge"))
            .body("amount=100")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(res.extensions().get::<Attempts>().map(|a| a.0), Some(1));
        assert!(
            res.text()
                .await
                .unwrap()
                .contains(ProblemKind::OutcomeUnknown.type_uri())
        );
        assert_eq!(requests.load(Ordering::SeqCst), 1, "attempted exactly once");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_problem_document_is_not_read_whole_and_is_returned_whole() {
        let (addr, requests, gate) = long_problem_server().await;
        let url = format!("http://{addr}/charge");
        let res = tokio::time::timeout(
            Duration::from_secs(10),
            client(exact_policy()).post(&url).body("amount=100").send(),
        )
        .await
        .expect("an answer before the server sent the rest: the body was read whole")
        .unwrap();
        assert_eq!(res.status(), StatusCode::CONFLICT);
        assert_eq!(res.extensions().get::<Attempts>().map(|a| a.0), Some(1));
        assert_eq!(res.url().as_str(), url, "the URL survives the rebuild");
        gate.notify_one();
        let body = res.bytes().await.unwrap();
        assert_eq!(body.len(), LONG_CHUNKS * LONG_CHUNK);
        assert!(body == long_document(), "byte for byte");
        assert_eq!(requests.load(Ordering::SeqCst), 1);
    }
}
