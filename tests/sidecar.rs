//! The sidecar in front of a real upstream HTTP server, over loopback.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use bytes::Bytes;
use common::Answer;
use common::redis_server::redis_or_skip;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tower_idempotency::IdempotencyLayer;
use tower_idempotency::sidecar::{self, SidecarConfig};
use tower_idempotency::store::{MemoryStore, RedisStore, Store};

/// The backend: counts executions, echoes what it saw.
#[derive(Clone, Default)]
struct Upstream {
    executions: Arc<AtomicUsize>,
}

async fn charge(
    State(up): State<Upstream>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, [(&'static str, String); 2], String) {
    let n = up.executions.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some(ms) = headers
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let seen = |h: &str| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let all = |h: &str| {
        headers
            .get_all(h)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join("|")
    };
    let echo = format!(
        "exec={n} body={} xff={} proto={} fwd={} conn={} proxy={}/{}/{} far={} xfh={}",
        String::from_utf8_lossy(&body),
        all("x-forwarded-for"),
        seen("x-forwarded-proto"),
        all("forwarded"),
        seen("x-hop"),
        seen("proxy-authorization"),
        seen("proxy-authenticate"),
        seen("proxy-connection"),
        seen("x-far"),
        all("x-forwarded-host"),
    );
    (
        StatusCode::CREATED,
        [
            ("x-exec", n.to_string()),
            ("content-type", "text/plain".to_owned()),
        ],
        echo,
    )
}

async fn start_upstream_on(listener: TcpListener, up: Upstream) {
    let app = axum::Router::new()
        .route("/charge", post(charge).put(charge))
        .route("/hello", get(|| async { "hello" }))
        .with_state(up);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
}

async fn start_upstream() -> (SocketAddr, Upstream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let up = Upstream::default();
    start_upstream_on(listener, up.clone()).await;
    (addr, up)
}

struct Sidecar {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

impl Sidecar {
    async fn start<St: Store>(layer: IdempotencyLayer<St>, config: SidecarConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            sidecar::serve(listener, layer, config, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            stop: Some(stop),
            done,
        }
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.done)
            .await
            .expect("drains")
            .unwrap();
    }
}

fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn post_to(addr: SocketAddr, key: &str, body: &'static str, delay_ms: u64) -> Answer {
    let req = Request::post(format!("http://{addr}/charge"))
        .header("idempotency-key", key)
        .header("x-delay-ms", delay_ms.to_string())
        .header("connection", "x-hop")
        .header("x-hop", "secret")
        .body(Body::from(body))
        .unwrap();
    let res = client().request(req).await.expect("request");
    common::collect(res).await
}

fn config(upstream: SocketAddr) -> SidecarConfig {
    SidecarConfig::new(&format!("http://{upstream}")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_reach_the_upstream_once_and_replay_identically() {
    let (up_addr, up) = start_upstream().await;
    let car = Sidecar::start(IdempotencyLayer::new(MemoryStore::new()), config(up_addr)).await;
    let first = post_to(car.addr, "k", "{\"amount\":1}", 0).await;
    let retry = post_to(car.addr, "k", "{\"amount\":1}", 0).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.headers["x-exec"], "1");
    assert_eq!(up.executions.load(Ordering::SeqCst), 1);
    let echo = first.text();
    assert!(
        echo.contains("body={\"amount\":1}"),
        "the body is forwarded: {echo}"
    );
    assert!(
        echo.contains("xff=127.0.0.1"),
        "X-Forwarded-For is added: {echo}"
    );
    assert!(echo.contains("proto=http"), "{echo}");
    assert!(
        echo.contains("fwd=for=127.0.0.1;proto=http;host=127.0.0.1:"),
        "Forwarded is added: {echo}"
    );
    assert!(
        echo.contains("conn=-"),
        "headers named by Connection are not forwarded: {echo}"
    );
    // A different body under the same key is refused.
    let other = post_to(car.addr, "k", "{\"amount\":2}", 0).await;
    assert_eq!(other.status, StatusCode::CONFLICT);
    assert_eq!(up.executions.load(Ordering::SeqCst), 1);
    // Unguarded methods pass straight through.
    let hello = client()
        .get(format!("http://{}/hello", car.addr).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        hello.into_body().collect().await.unwrap().to_bytes(),
        Bytes::from_static(b"hello")
    );
    car.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_duplicates_execute_upstream_once() {
    let (up_addr, up) = start_upstream().await;
    let car = Sidecar::start(IdempotencyLayer::new(MemoryStore::new()), config(up_addr)).await;
    let calls: Vec<_> = (0..32)
        .map(|_| tokio::spawn(post_to(car.addr, "dup", "{}", 300)))
        .collect();
    common::all_created_alike(calls).await;
    assert_eq!(up.executions.load(Ordering::SeqCst), 1);
    car.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502_and_a_later_retry_executes_once_it_is_back() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = listener.local_addr().unwrap();
    drop(listener);
    let car = Sidecar::start(IdempotencyLayer::new(MemoryStore::new()), config(up_addr)).await;
    let down = post_to(car.addr, "k", "{}", 0).await;
    assert_eq!(down.status, StatusCode::BAD_GATEWAY);
    assert!(
        down.problem_type()
            .ends_with("#variant.UpstreamUnavailable")
    );
    let up = Upstream::default();
    start_upstream_on(TcpListener::bind(up_addr).await.unwrap(), up.clone()).await;
    let back = post_to(car.addr, "k", "{}", 0).await;
    assert_eq!(back.status, StatusCode::CREATED, "the 502 released the key");
    assert!(!back.replayed());
    assert_eq!(up.executions.load(Ordering::SeqCst), 1);
    car.shutdown().await;
}

/// Retries as a client would while the answer is 504 (each wait is bounded
/// by the sidecar's upstream timeout), at most 50 times.
async fn retry_through_504s(addr: SocketAddr, key: &str) -> Answer {
    for _ in 0..50 {
        let answer = post_to(addr, key, "{}", 0).await;
        if answer.status != StatusCode::GATEWAY_TIMEOUT {
            return answer;
        }
    }
    panic!("still 504 after 50 retries");
}

/// The client's wait ends at `--upstream-timeout` with a 504, but the
/// upstream call goes on: its response is stored when it arrives, and the
/// client's retry waits for it and replays it. Nothing runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_keeps_running_after_the_504_and_its_response_is_replayed() {
    let (up_addr, up) = start_upstream().await;
    let car = Sidecar::start(
        IdempotencyLayer::new(MemoryStore::new()),
        config(up_addr).upstream_timeout(Duration::from_millis(200)),
    )
    .await;
    let slow = post_to(car.addr, "k", "{}", 1000).await;
    assert_eq!(slow.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(slow.problem_type().ends_with("#variant.UpstreamTimeout"));
    assert!(slow.headers.contains_key("retry-after"));
    let again = retry_through_504s(car.addr, "k").await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(again.replayed(), "the retry got the first call's response");
    assert_eq!(again.headers["x-exec"], "1");
    assert_eq!(up.executions.load(Ordering::SeqCst), 1);
    car.shutdown().await;
}

/// An upstream that never answers within the hard cap leaves the outcome
/// unknown: the key completes as such and retries are refused, never sent
/// upstream again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_completes_the_key_as_outcome_unknown() {
    let (up_addr, up) = start_upstream().await;
    let car = Sidecar::start(
        IdempotencyLayer::new(MemoryStore::new()),
        config(up_addr)
            .upstream_timeout(Duration::from_millis(200))
            .upstream_hard_timeout(Duration::from_millis(600)),
    )
    .await;
    let slow = post_to(car.addr, "k", "{}", 5000).await;
    assert_eq!(slow.status, StatusCode::GATEWAY_TIMEOUT);
    // Retries wait for the call in flight, which ends at the hard cap.
    let again = retry_through_504s(car.addr, "k").await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert!(
        again.problem_type().ends_with("#variant.OutcomeUnknown"),
        "{}",
        again.problem_type()
    );
    assert_eq!(up.executions.load(Ordering::SeqCst), 1);
    car.shutdown().await;
}

/// An upstream that reads the request and then drops the connection may
/// have acted on it: the outcome is unknown, and a retry is refused rather
/// than sent upstream again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_drops_the_connection_after_the_request_completes_as_outcome_unknown() {
    use tokio::io::AsyncReadExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    tokio::spawn({
        let received = received.clone();
        async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let received = received.clone();
                tokio::spawn(async move {
                    // Read the request head, then hang up without a word.
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut seen = Vec::new();
                    while let Ok(n) = conn.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                            received.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                });
            }
        }
    });
    let car = Sidecar::start(IdempotencyLayer::new(MemoryStore::new()), config(up_addr)).await;
    let first = post_to(car.addr, "k", "{}", 0).await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY);
    assert!(
        first.problem_type().ends_with("#variant.OutcomeUnknown"),
        "{}",
        first.problem_type()
    );
    let again = post_to(car.addr, "k", "{}", 0).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert!(again.problem_type().ends_with("#variant.OutcomeUnknown"));
    assert_eq!(
        received.load(Ordering::SeqCst),
        1,
        "the request reached the upstream once"
    );
    car.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_keeps_its_claim_through_renewal() {
    let (up_addr, up) = start_upstream().await;
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .lease(Duration::from_millis(300))
        .reject_in_flight();
    let car = Sidecar::start(layer, config(up_addr)).await;
    let first = tokio::spawn(post_to(car.addr, "slow", "{}", 1500));
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let dup = post_to(car.addr, "slow", "{}", 0).await;
        assert_eq!(
            dup.status,
            StatusCode::CONFLICT,
            "still held after several leases"
        );
    }
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(post_to(car.addr, "slow", "{}", 0).await.replayed());
    assert_eq!(up.executions.load(Ordering::SeqCst), 1);
    car.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_answers_without_the_upstream() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let nowhere = listener.local_addr().unwrap();
    drop(listener);
    let car = Sidecar::start(IdempotencyLayer::new(MemoryStore::new()), config(nowhere)).await;
    let res = client()
        .get(
            format!("http://{}{}", car.addr, sidecar::DEFAULT_HEALTH_PATH)
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    car.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_detached_execution_finish_and_be_stored() {
    let (up_addr, up) = start_upstream().await;
    let store = MemoryStore::new();
    let car = Sidecar::start(IdempotencyLayer::new(store.clone()), config(up_addr)).await;
    // A client that gives up while the upstream works.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(200),
        post_to(car.addr, "k", "{}", 800),
    )
    .await;
    assert!(gave_up.is_err());
    let started = std::time::Instant::now();
    car.shutdown().await;
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "shutdown waited for the execution"
    );
    // A new sidecar on the same store replays the stored result.
    let car = Sidecar::start(IdempotencyLayer::new(store), config(up_addr)).await;
    let retry = post_to(car.addr, "k", "{}", 0).await;
    assert!(retry.replayed());
    assert_eq!(up.executions.load(Ordering::SeqCst), 1);
    car.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_sharing_redis_execute_upstream_once() {
    let Some(server) = redis_or_skip("two_sidecars") else {
        return;
    };
    let (up_addr, up) = start_upstream().await;
    let a = Sidecar::start(
        IdempotencyLayer::new(RedisStore::connect(&server.url()).await.unwrap()),
        config(up_addr),
    )
    .await;
    let b = Sidecar::start(
        IdempotencyLayer::new(RedisStore::connect(&server.url()).await.unwrap()),
        config(up_addr),
    )
    .await;
    let calls: Vec<_> = (0..16)
        .map(|i| {
            tokio::spawn(post_to(
                if i % 2 == 0 { a.addr } else { b.addr },
                "fleet",
                "{}",
                300,
            ))
        })
        .collect();
    common::all_created_alike(calls).await;
    assert_eq!(up.executions.load(Ordering::SeqCst), 1);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_through_the_sidecar_over_h2c_replays_with_trailers() {
    let ledger = Arc::new(common::grpc_service::Ledger::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = listener.local_addr().unwrap();
    let upstream = tonic::transport::Server::builder()
        .add_service(common::grpc_service::PaymentsServer::new(ledger.clone()))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(upstream);
    let car = Sidecar::start(
        IdempotencyLayer::new(MemoryStore::new()),
        config(up_addr).upstream_h2c(true),
    )
    .await;
    let mut client = common::grpc_service::PaymentsClient::connect(car.addr)
        .await
        .unwrap();
    let first = client.charge(Some("g"), 100, "GHS").await.unwrap();
    let retry = client.charge(Some("g"), 100, "GHS").await.unwrap();
    assert!(common::grpc_service::replayed(&retry));
    assert_eq!(retry.get_ref(), first.get_ref());
    assert_eq!(ledger.executions.load(Ordering::SeqCst), 1);
    car.shutdown().await;
}

/// A POST to the sidecar with extra request headers.
async fn post_with(addr: SocketAddr, key: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = Request::post(format!("http://{addr}/charge")).header("idempotency-key", key);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let res = client()
        .request(req.body(Body::from("{}")).unwrap())
        .await
        .expect("request");
    common::collect(res).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_headers_are_hop_by_hop_and_never_reach_the_upstream() {
    let (up_addr, _up) = start_upstream().await;
    let car = Sidecar::start(IdempotencyLayer::new(MemoryStore::new()), config(up_addr)).await;
    let answer = post_with(
        car.addr,
        "proxy",
        &[
            ("proxy-authorization", "Basic c2VjcmV0"),
            ("proxy-authenticate", "Basic"),
            ("proxy-connection", "keep-alive"),
        ],
    )
    .await;
    assert!(answer.text().contains("proxy=-/-/-"), "{}", answer.text());
    car.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_supplied_forwarding_headers_are_replaced_unless_trusted() {
    let (up_addr, _up) = start_upstream().await;
    let spoofed = [("x-forwarded-for", "6.6.6.6"), ("forwarded", "for=6.6.6.6")];
    let car = Sidecar::start(IdempotencyLayer::new(MemoryStore::new()), config(up_addr)).await;
    let replaced = post_with(car.addr, "fwd-1", &spoofed).await.text();
    assert!(replaced.contains("xff=127.0.0.1 "), "{replaced}");
    assert!(!replaced.contains("6.6.6.6"), "{replaced}");
    car.shutdown().await;

    let trusting = config(up_addr).trust_forwarded_headers(true);
    let car = Sidecar::start(IdempotencyLayer::new(MemoryStore::new()), trusting).await;
    let appended = post_with(car.addr, "fwd-2", &spoofed).await.text();
    assert!(appended.contains("xff=6.6.6.6|127.0.0.1 "), "{appended}");
    assert!(
        appended.contains("fwd=for=6.6.6.6|for=127.0.0.1;"),
        "{appended}"
    );
    car.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_header_naming_thousands_of_headers_is_bounded() {
    let (up_addr, _up) = start_upstream().await;
    let car = Sidecar::start(IdempotencyLayer::new(MemoryStore::new()), config(up_addr)).await;
    // 20 000 names: the first is honoured (x-hop is dropped), names past
    // the bound are not looked at (x-far, the last one, is forwarded).
    let mut names: Vec<String> = vec!["x-hop".to_owned()];
    names.extend((0..19_998).map(|n| format!("x-n{n}")));
    names.push("x-far".to_owned());
    let connection = names.join(", ");
    let answer = post_with(
        car.addr,
        "conn",
        &[
            ("connection", &connection),
            ("x-hop", "secret"),
            ("x-far", "far"),
        ],
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED);
    assert!(answer.text().contains("conn=-"), "{}", answer.text());
    assert!(answer.text().contains("far=far"), "{}", answer.text());
    car.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up_addr, _up) = start_upstream().await;
    let car = Sidecar::start(
        IdempotencyLayer::new(MemoryStore::new()),
        config(up_addr).header_read_timeout(Duration::from_millis(300)),
    )
    .await;
    let mut slow = tokio::net::TcpStream::connect(car.addr).await.unwrap();
    slow.write_all(b"POST /charge HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // The sidecar closes the connection (with or without a 408 first).
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the slow client was not disconnected");
    car.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_wait_for_a_free_place() {
    let (up_addr, _up) = start_upstream().await;
    let car = Sidecar::start(
        IdempotencyLayer::new(MemoryStore::new()),
        config(up_addr).max_connections(1),
    )
    .await;
    let holder = tokio::net::TcpStream::connect(car.addr).await.unwrap();
    let waiting = tokio::spawn(post_with(car.addr, "limit", &[]));
    // The second connection is not served while the first holds the place.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "served past the connection limit");
    drop(holder);
    let answer = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once a place was free")
        .unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);
    car.shutdown().await;
}

/// Issue 22, item 1: the client's wait for the upstream bounds only the
/// request that went upstream. A retry sent while the first call runs waits
/// for it as any duplicate does (the layer's wait), and gets its answer,
/// never a 504 of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_duplicate_waits_for_the_answer_not_for_the_upstream_timeout() {
    let (up_addr, up) = start_upstream().await;
    let car = Sidecar::start(
        IdempotencyLayer::new(MemoryStore::new()).wait_for_in_flight(Duration::from_secs(10)),
        config(up_addr).upstream_timeout(Duration::from_millis(300)),
    )
    .await;
    let first = post_to(car.addr, "k", "{}", 1500).await;
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT);
    let detail = first.text();
    assert!(detail.contains("goes on"), "{detail}");
    // Sent at once: the execution still has about 1.2 s to go.
    let retry = post_to(car.addr, "k", "{}", 0).await;
    assert_eq!(
        retry.status,
        StatusCode::CREATED,
        "the retry waited for the running execution: {}",
        retry.text()
    );
    assert!(retry.replayed());
    assert_eq!(up.executions.load(Ordering::SeqCst), 1);
    car.shutdown().await;
}

/// When the layer's wait runs out first, the waiting duplicate gets 409 in
/// flight with `Retry-After`, not 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_duplicate_whose_wait_runs_out_gets_409_in_flight() {
    let (up_addr, up) = start_upstream().await;
    let car = Sidecar::start(
        IdempotencyLayer::new(MemoryStore::new()).wait_for_in_flight(Duration::from_millis(500)),
        config(up_addr).upstream_timeout(Duration::from_millis(200)),
    )
    .await;
    let first = post_to(car.addr, "k", "{}", 2000).await;
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT);
    let retry = post_to(car.addr, "k", "{}", 0).await;
    assert_eq!(retry.status, StatusCode::CONFLICT, "{}", retry.text());
    assert!(retry.problem_type().ends_with("#variant.InFlight"));
    assert!(retry.headers.contains_key("retry-after"));
    assert_eq!(up.executions.load(Ordering::SeqCst), 1);
    car.shutdown().await;
}

/// Issue 22, item 5: an unguarded request past the client's wait is cut
/// off, and its 504 says so instead of promising a stored response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unguarded_request_past_the_wait_is_told_it_was_cut_off() {
    let (up_addr, _up) = start_upstream().await;
    let car = Sidecar::start(
        IdempotencyLayer::new(MemoryStore::new()),
        config(up_addr).upstream_timeout(Duration::from_millis(200)),
    )
    .await;
    let req = Request::put(format!("http://{}/charge", car.addr))
        .header("x-delay-ms", "1000")
        .body(Body::from("{}"))
        .unwrap();
    let answer = common::collect(client().request(req).await.unwrap()).await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    let detail = answer.text();
    assert!(detail.contains("cut off"), "{detail}");
    assert!(!detail.contains("goes on"), "{detail}");
    car.shutdown().await;
}

/// An upstream that answers with a head and part of its body, then nothing,
/// with the socket left open. Counts the requests it read.
async fn start_stalling_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    tokio::spawn({
        let received = received.clone();
        async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let received = received.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut seen = Vec::new();
                    while let Ok(n) = conn.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                    received.fetch_add(1, Ordering::SeqCst);
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
                        .await;
                    // Keep the socket open, silent, until the peer leaves.
                    let _ = conn.read(&mut buf).await;
                });
            }
        }
    });
    (addr, received)
}

/// Waits (bounded) until `count` reaches `n`.
async fn until_count(count: &AtomicUsize, n: usize) {
    for _ in 0..500 {
        if count.load(Ordering::SeqCst) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("count {} never reached {n}", count.load(Ordering::SeqCst));
}

/// Issue 22, item 2: the hard timeout bounds the whole upstream exchange,
/// its response body included. A body that stalls is cut off at the hard
/// timeout and the key completes as outcome unknown: a retry waiting on it
/// is refused then, not sent upstream again nor left in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_response_body_completes_as_outcome_unknown_at_the_hard_timeout() {
    let (up_addr, received) = start_stalling_upstream().await;
    let car = Sidecar::start(
        IdempotencyLayer::new(MemoryStore::new()).wait_for_in_flight(Duration::from_secs(10)),
        config(up_addr)
            .upstream_timeout(Duration::from_millis(300))
            .upstream_hard_timeout(Duration::from_secs(1)),
    )
    .await;
    let first = post_to(car.addr, "stall", "{}", 0).await;
    assert_eq!(
        first.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        first.text()
    );
    // Sent at once, it waits on the stalled execution until the hard
    // timeout ends it.
    let retry = tokio::time::timeout(Duration::from_secs(5), post_to(car.addr, "stall", "{}", 0))
        .await
        .expect("the retry is answered");
    assert_eq!(retry.status, StatusCode::CONFLICT, "{}", retry.text());
    assert!(
        retry.problem_type().ends_with("#variant.OutcomeUnknown"),
        "{}",
        retry.text()
    );
    assert_eq!(received.load(Ordering::SeqCst), 1, "sent upstream once");
    car.shutdown().await;
}

/// A stalled upstream body does not hold the sidecar's drain: shutdown ends
/// once the hard timeout cut the body off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_while_an_upstream_body_stalls() {
    let (up_addr, received) = start_stalling_upstream().await;
    let car = Sidecar::start(
        IdempotencyLayer::new(MemoryStore::new()),
        config(up_addr).upstream_hard_timeout(Duration::from_secs(1)),
    )
    .await;
    let addr = car.addr;
    let client_call = tokio::spawn(async move {
        let req = Request::post(format!("http://{addr}/charge"))
            .header("idempotency-key", "stall")
            .body(Body::from("{}"))
            .unwrap();
        match client().request(req).await {
            Ok(res) => res.into_body().collect().await.is_ok(),
            Err(_) => false,
        }
    });
    until_count(&received, 1).await;
    // `shutdown` fails the test if the drain takes over 10 s.
    car.shutdown().await;
    assert!(
        !client_call.await.unwrap(),
        "the stalled body did not end well"
    );
}

async fn health(addr: SocketAddr) -> StatusCode {
    client()
        .get(
            format!("http://{addr}{}", sidecar::DEFAULT_HEALTH_PATH)
                .parse()
                .unwrap(),
        )
        .await
        .map(|res| res.status())
        .unwrap_or(StatusCode::BAD_GATEWAY)
}

/// Issue 22, item 3: a connection that sends nothing, or half an HTTP/2
/// preface, is closed when its first request has not come within the
/// header read timeout, and gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_first_request_give_their_places_back() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up_addr, _up) = start_upstream().await;
    let car = Sidecar::start(
        IdempotencyLayer::new(MemoryStore::new()),
        config(up_addr)
            .max_connections(2)
            .header_read_timeout(Duration::from_millis(500)),
    )
    .await;
    let mut silent = tokio::net::TcpStream::connect(car.addr).await.unwrap();
    let mut preface = tokio::net::TcpStream::connect(car.addr).await.unwrap();
    preface.write_all(b"PRI").await.unwrap();
    // Both are closed by the sidecar.
    for conn in [&mut silent, &mut preface] {
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "a connection without a request stayed open");
    }
    let answered = tokio::time::timeout(Duration::from_secs(5), health(car.addr)).await;
    assert_eq!(answered.ok(), Some(StatusCode::OK), "the places came back");
    car.shutdown().await;
}

/// Idle connections, HTTP/1 keep-alive and HTTP/2 alike, are closed after
/// the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_over_http1_and_http2() {
    use hyper_util::rt::TokioIo;
    let (up_addr, _up) = start_upstream().await;
    let car = Sidecar::start(
        IdempotencyLayer::new(MemoryStore::new()),
        config(up_addr)
            .max_connections(2)
            .idle_timeout(Duration::from_millis(400)),
    )
    .await;
    let health_request = || {
        Request::get(format!(
            "http://{}{}",
            car.addr,
            sidecar::DEFAULT_HEALTH_PATH
        ))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap()
    };
    // HTTP/1.1, kept alive after one request.
    let stream = tokio::net::TcpStream::connect(car.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let h1 = tokio::spawn(conn);
    let res = send.send_request(health_request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.into_body().collect().await.unwrap();
    // HTTP/2 (prior knowledge), one request.
    let stream = tokio::net::TcpStream::connect(car.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let h2 = tokio::spawn(conn);
    let res = send.send_request(health_request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.into_body().collect().await.unwrap();
    for (name, conn) in [("HTTP/1.1", h1), ("HTTP/2", h2)] {
        let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
        assert!(ended.is_ok(), "an idle {name} connection stayed open");
    }
    // Both places are free again.
    let answered = tokio::time::timeout(Duration::from_secs(5), health(car.addr)).await;
    assert_eq!(answered.ok(), Some(StatusCode::OK));
    car.shutdown().await;
}

/// Sends `raw` (a whole HTTP/1 request) and returns what came back.
async fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(raw).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// Issue 22, item 4: a client's own `X-Forwarded-Host` never reaches the
/// upstream: it is the authority the client asked for, or absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_host_is_the_requests_authority_never_the_clients_own() {
    use hyper_util::rt::TokioIo;
    let (up_addr, _up) = start_upstream().await;
    let car = Sidecar::start(IdempotencyLayer::new(MemoryStore::new()), config(up_addr)).await;
    // HTTP/1.0 without Host: none is sent.
    let answer = raw_exchange(
        car.addr,
        b"POST /charge HTTP/1.0\r\nidempotency-key: h10\r\nx-forwarded-host: evil.example\r\ncontent-length: 2\r\n\r\n{}",
    )
    .await;
    assert!(answer.contains("exec="), "{answer}");
    assert!(!answer.contains("evil"), "{answer}");
    assert!(answer.contains("xfh="), "{answer}");
    assert!(answer.ends_with("xfh="), "no X-Forwarded-Host: {answer}");
    // HTTP/1.1 with `Connection: host`: the Host the client sent.
    let answer = raw_exchange(
        car.addr,
        b"POST /charge HTTP/1.1\r\nhost: good.example\r\nconnection: host, close\r\nidempotency-key: h11\r\nx-forwarded-host: evil.example\r\ncontent-length: 2\r\n\r\n{}",
    )
    .await;
    assert!(!answer.contains("evil"), "{answer}");
    assert!(answer.contains("xfh=good.example"), "{answer}");
    // HTTP/2: the request's :authority.
    let stream = tokio::net::TcpStream::connect(car.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::post("http://h2.example/charge")
        .header("idempotency-key", "h2")
        .header("x-forwarded-host", "evil.example")
        .body(http_body_util::Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let answer = common::collect(send.send_request(req).await.unwrap()).await;
    let text = answer.text();
    assert!(!text.contains("evil"), "{text}");
    assert!(text.ends_with("xfh=h2.example"), "{text}");
    car.shutdown().await;

    // Behind a trusted proxy, its X-Forwarded-Host stays.
    let car = Sidecar::start(
        IdempotencyLayer::new(MemoryStore::new()),
        config(up_addr).trust_forwarded_headers(true),
    )
    .await;
    let kept = post_with(car.addr, "trusted", &[("x-forwarded-host", "shop.example")])
        .await
        .text();
    assert!(kept.ends_with("xfh=shop.example"), "{kept}");
    car.shutdown().await;
}

/// A client that sends a guarded request's head and never its body holds
/// neither its connection's place nor the drain: the body must arrive
/// within the client's wait (`upstream_timeout`), past which the request is
/// refused (400, the body unreadable) and nothing goes upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_body_never_comes_gives_its_place_back() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up_addr, up) = start_upstream().await;
    let car = Sidecar::start(
        IdempotencyLayer::new(MemoryStore::new()),
        config(up_addr)
            .max_connections(1)
            .upstream_timeout(Duration::from_millis(500)),
    )
    .await;
    let mut conn = tokio::net::TcpStream::connect(car.addr).await.unwrap();
    conn.write_all(
        b"POST /charge HTTP/1.1\r\nhost: x\r\nidempotency-key: no-body\r\ncontent-length: 10\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = conn.read(&mut buf).await {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "the request without its body was never ended");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("request body did not end"), "{answer}");
    let answered = tokio::time::timeout(Duration::from_secs(5), health(car.addr)).await;
    assert_eq!(answered.ok(), Some(StatusCode::OK), "the place came back");
    assert_eq!(up.executions.load(Ordering::SeqCst), 0);
    car.shutdown().await;
}
