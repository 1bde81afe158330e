//! The layer in front of a tonic server, driven by a real tonic client over
//! loopback: keys from metadata, gRPC statuses, trailers replayed.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::grpc_service::{CHARGE, Ledger, PaymentsClient, PaymentsServer, replayed};
use common::{TestStore, test_store};
use tonic::Code;
use tower_idempotency::IdempotencyLayer;

async fn start(
    layer: IdempotencyLayer<TestStore>,
    delay: Duration,
) -> (Arc<Ledger>, PaymentsClient) {
    let ledger = Arc::new(Ledger::default());
    *ledger.delay.lock().unwrap() = delay;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .layer(layer)
        .add_service(PaymentsServer::new(ledger.clone()))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);
    let client = PaymentsClient::connect(addr).await.unwrap();
    (ledger, client)
}

fn executions(ledger: &Ledger) -> u64 {
    ledger.executions.load(Ordering::SeqCst)
}

#[tokio::test]
async fn a_replayed_charge_is_the_same_message_with_status_ok_and_the_marker() {
    let (ledger, mut client) = start(IdempotencyLayer::new(test_store()), Duration::ZERO).await;
    let first = client.charge(Some("k"), 100, "GHS").await.unwrap();
    let retry = client
        .charge(Some("k"), 100, "GHS")
        .await
        .expect("status OK, trailers replayed");
    assert!(!replayed(&first));
    assert!(replayed(&retry), "the replay marker is in the metadata");
    assert_eq!(retry.get_ref(), first.get_ref());
    assert_eq!(executions(&ledger), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_duplicate_charges_execute_once() {
    let (ledger, client) = start(
        IdempotencyLayer::new(test_store()),
        Duration::from_millis(300),
    )
    .await;
    let calls: Vec<_> = (0..32)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.charge(Some("dup"), 100, "GHS").await })
        })
        .collect();
    let mut replies = Vec::new();
    for call in calls {
        replies.push(call.await.unwrap().expect("every duplicate succeeds"));
    }
    assert!(replies.iter().all(|r| r.get_ref() == replies[0].get_ref()));
    assert_eq!(replies.iter().filter(|r| !replayed(r)).count(), 1);
    assert_eq!(executions(&ledger), 1);
}

#[tokio::test]
async fn an_internal_error_is_not_stored_and_a_retry_runs_again() {
    let (ledger, mut client) = start(IdempotencyLayer::new(test_store()), Duration::ZERO).await;
    // Amount 13 makes the handler return Status::internal (Trailers-Only).
    assert_eq!(
        client
            .charge(Some("k"), 13, "GHS")
            .await
            .unwrap_err()
            .code(),
        Code::Internal
    );
    let retry = client.charge(Some("k"), 13, "GHS").await.unwrap_err();
    assert_eq!(retry.code(), Code::Internal);
    assert!(retry.metadata().get("idempotent-replayed").is_none());
    assert_eq!(executions(&ledger), 2, "INTERNAL is treated like a 5xx");
}

#[tokio::test]
async fn an_invalid_argument_is_stored_and_replayed_as_the_same_status() {
    let (ledger, mut client) = start(IdempotencyLayer::new(test_store()), Duration::ZERO).await;
    let first = client.charge(Some("k"), 0, "GHS").await.unwrap_err();
    let retry = client.charge(Some("k"), 0, "GHS").await.unwrap_err();
    assert_eq!(first.code(), Code::InvalidArgument);
    assert_eq!(retry.code(), Code::InvalidArgument);
    assert_eq!(retry.message(), first.message());
    assert_eq!(
        retry
            .metadata()
            .get("idempotent-replayed")
            .map(|v| v.to_str().unwrap()),
        Some("true")
    );
    assert_eq!(executions(&ledger), 1);
}

#[tokio::test]
async fn refusals_arrive_as_grpc_statuses() {
    // Invalid key.
    let (ledger, mut client) = start(IdempotencyLayer::new(test_store()), Duration::ZERO).await;
    let long = "k".repeat(300);
    let status = client.charge(Some(&long), 100, "GHS").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("Idempotency-Key is invalid"),
        "{}",
        status.message()
    );
    // Key reused with a different message.
    client.charge(Some("k"), 100, "GHS").await.unwrap();
    let status = client.charge(Some("k"), 200, "GHS").await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(executions(&ledger), 1);

    // Missing key on a listed method.
    let layer = IdempotencyLayer::new(test_store()).grpc_methods([CHARGE]);
    let (ledger, mut client) = start(layer, Duration::ZERO).await;
    assert_eq!(
        client.charge(None, 100, "GHS").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(executions(&ledger), 0);

    // In flight, with the reject policy.
    let layer = IdempotencyLayer::new(test_store()).reject_in_flight();
    let (ledger, client) = start(layer, Duration::from_millis(500)).await;
    let first = tokio::spawn({
        let mut client = client.clone();
        async move { client.charge(Some("k"), 100, "GHS").await }
    });
    // The first call is in its handler (500 ms long).
    common::eventually(
        Duration::from_secs(5),
        "the first call executes",
        || async { executions(&ledger) == 1 },
    )
    .await;
    let status = client
        .clone()
        .charge(Some("k"), 100, "GHS")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    first.await.unwrap().unwrap();
    assert_eq!(executions(&ledger), 1);

    // Store unavailable.
    let store = test_store();
    store.fail_all();
    let (ledger, mut client) = start(IdempotencyLayer::new(store), Duration::ZERO).await;
    assert_eq!(
        client
            .charge(Some("k"), 100, "GHS")
            .await
            .unwrap_err()
            .code(),
        Code::Unavailable
    );
    assert_eq!(executions(&ledger), 0);

    // Request too large.
    let layer = IdempotencyLayer::new(test_store()).request_body_limit(8);
    let (ledger, mut client) = start(layer, Duration::ZERO).await;
    let status = client
        .charge(Some("k"), 100, "a very long currency")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(executions(&ledger), 0);
}

#[tokio::test]
async fn streaming_calls_pass_through() {
    let store = test_store();
    let layer = IdempotencyLayer::new(store.clone()).grpc_methods([CHARGE]);
    let (_ledger, mut client) = start(layer, Duration::ZERO).await;
    client.charge(Some("c1"), 100, "GHS").await.unwrap();
    client.charge(Some("c2"), 200, "GHS").await.unwrap();
    let calls = store.total_calls();
    // A key on an unlisted (streaming) method does not guard it.
    let listed = client.list_charges(Some("s")).await.unwrap();
    let again = client.list_charges(Some("s")).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(again, listed);
    assert_eq!(
        store.total_calls(),
        calls,
        "the stream never touched the store"
    );

    // Without a list, a keyless stream passes through too.
    let store = test_store();
    let (_ledger, mut client) = start(IdempotencyLayer::new(store.clone()), Duration::ZERO).await;
    assert!(client.list_charges(None).await.unwrap().is_empty());
    assert_eq!(store.total_calls(), 0);
}

#[tokio::test]
async fn one_service_can_be_layered_with_named_layer() {
    use tonic::service::LayerExt;
    let ledger = Arc::new(Ledger::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let guarded =
        IdempotencyLayer::new(test_store()).named_layer(PaymentsServer::new(ledger.clone()));
    let server = tonic::transport::Server::builder()
        .add_service(guarded)
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);
    let mut client = PaymentsClient::connect(addr).await.unwrap();
    let first = client.charge(Some("k"), 100, "GHS").await.unwrap();
    let retry = client.charge(Some("k"), 100, "GHS").await.unwrap();
    assert!(replayed(&retry));
    assert_eq!(retry.get_ref(), first.get_ref());
    assert_eq!(executions(&ledger), 1);
}

mod by_hand {
    //! gRPC-Web and oversized gRPC responses, from services written by hand.
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::body::Body;
    use bytes::{BufMut, Bytes, BytesMut};
    use http::{HeaderMap, HeaderValue, Request, Response};
    use http_body_util::BodyExt;
    use tower::{Layer, ServiceExt};
    use tower_idempotency::{IdempotencyLayer, RequestBody};

    use super::common::{collect, test_store};

    /// A gRPC-Web body: one message frame, then the trailer frame.
    fn grpc_web_body(message: &[u8], status: u32) -> Bytes {
        let mut buf = BytesMut::new();
        buf.put_u8(0);
        buf.put_u32(message.len() as u32);
        buf.put_slice(message);
        let trailers = format!("grpc-status: {status}\r\ngrpc-message: m\r\n");
        buf.put_u8(0x80);
        buf.put_u32(trailers.len() as u32);
        buf.put_slice(trailers.as_bytes());
        buf.freeze()
    }

    fn call(content_type: &'static str) -> Request<Body> {
        Request::post("/pay.v1.Payments/Charge")
            .header("content-type", content_type)
            .header("idempotency-key", "k")
            .body(Body::from("\0\0\0\0\x02hi"))
            .unwrap()
    }

    /// A service that counts its executions and answers what `respond`
    /// builds from the execution's number (from 0).
    fn counting(
        executions: Arc<AtomicUsize>,
        respond: impl Fn(usize) -> Response<Body> + Clone + Send + 'static,
    ) -> impl tower::Service<
        Request<RequestBody<Body>>,
        Response = Response<Body>,
        Error = std::convert::Infallible,
        Future = impl std::future::Future<Output = Result<Response<Body>, std::convert::Infallible>>
                 + Send
                 + 'static,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |_req: Request<RequestBody<Body>>| {
            let n = executions.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(respond(n)))
        })
    }

    /// A gRPC-Web answer with `status` in its trailer frame (encoded as
    /// text when `text`).
    fn web_answer(status: u32, text: bool) -> impl Fn(usize) -> Response<Body> + Clone {
        move |n| {
            let binary = grpc_web_body(format!("charge-{n}").as_bytes(), status);
            let (body, content_type) = if text {
                use base64::Engine;
                let encoded = base64::engine::general_purpose::STANDARD.encode(&binary);
                (Bytes::from(encoded), "application/grpc-web-text+proto")
            } else {
                (binary, "application/grpc-web+proto")
            };
            let mut res = Response::new(Body::from(body));
            res.headers_mut()
                .insert("content-type", HeaderValue::from_static(content_type));
            res
        }
    }

    #[tokio::test]
    async fn grpc_web_statuses_are_read_from_the_trailer_frame() {
        for (content_type, text) in [
            ("application/grpc-web+proto", false),
            ("application/grpc-web-text+proto", true),
        ] {
            // OK: stored and replayed.
            let executions = Arc::new(AtomicUsize::new(0));
            let svc = IdempotencyLayer::new(test_store())
                .layer(counting(executions.clone(), web_answer(0, text)));
            let first = collect(svc.clone().oneshot(call(content_type)).await.unwrap()).await;
            let again = collect(svc.clone().oneshot(call(content_type)).await.unwrap()).await;
            assert!(again.replayed(), "{content_type}: an OK call is stored");
            assert_eq!(again.body, first.body);
            assert_eq!(executions.load(Ordering::SeqCst), 1);
            // UNAVAILABLE: not stored, so a retry runs again.
            let executions = Arc::new(AtomicUsize::new(0));
            let svc = IdempotencyLayer::new(test_store())
                .layer(counting(executions.clone(), web_answer(14, text)));
            svc.clone().oneshot(call(content_type)).await.unwrap();
            let again = collect(svc.clone().oneshot(call(content_type)).await.unwrap()).await;
            assert!(!again.replayed(), "{content_type}: UNAVAILABLE is released");
            assert_eq!(executions.load(Ordering::SeqCst), 2);
        }
    }

    /// A gRPC answer larger than the stored limit (4 KiB), with `status` in
    /// its trailers.
    fn large_answer(status: &'static str) -> impl Fn(usize) -> Response<Body> + Clone {
        move |_| {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static(status));
            let body = http_body_util::Full::new(Bytes::from(vec![0u8; 4096]))
                .with_trailers(async move { Some(Ok(trailers)) });
            let mut res = Response::new(Body::new(body));
            res.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            res
        }
    }

    #[tokio::test]
    async fn an_oversized_grpc_response_is_judged_by_its_trailers() {
        // UNAVAILABLE in the trailers: released, so a retry runs again.
        let executions = Arc::new(AtomicUsize::new(0));
        let svc = IdempotencyLayer::new(test_store())
            .stored_response_limit(1024)
            .layer(counting(executions.clone(), large_answer("14")));
        let first = collect(svc.clone().oneshot(call("application/grpc")).await.unwrap()).await;
        assert_eq!(first.body.len(), 4096, "the caller gets the whole response");
        assert_eq!(first.trailers.unwrap()["grpc-status"], "14");
        let again = collect(svc.clone().oneshot(call("application/grpc")).await.unwrap()).await;
        assert_eq!(again.body.len(), 4096, "a retryable status is not stored");
        assert_eq!(executions.load(Ordering::SeqCst), 2);

        // OK in the trailers: executed once, then "not replayable".
        let executions = Arc::new(AtomicUsize::new(0));
        let svc = IdempotencyLayer::new(test_store())
            .stored_response_limit(1024)
            .layer(counting(executions.clone(), large_answer("0")));
        let first = collect(svc.clone().oneshot(call("application/grpc")).await.unwrap()).await;
        assert_eq!(first.body.len(), 4096);
        let again = collect(svc.clone().oneshot(call("application/grpc")).await.unwrap()).await;
        assert_eq!(again.headers["grpc-status"], "9", "not replayable");
        assert_eq!(executions.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_oversized_grpc_response_dropped_midway_is_an_unknown_outcome() {
        let executions = Arc::new(AtomicUsize::new(0));
        let svc = IdempotencyLayer::new(test_store())
            .stored_response_limit(1024)
            .layer(counting(executions.clone(), large_answer("0")));
        let res = svc.clone().oneshot(call("application/grpc")).await.unwrap();
        drop(res);
        let again = collect(svc.clone().oneshot(call("application/grpc")).await.unwrap()).await;
        assert_eq!(again.headers["grpc-status"], "9");
        assert!(
            again.headers["grpc-message"]
                .to_str()
                .unwrap()
                .contains("unknown"),
            "{:?}",
            again.headers["grpc-message"]
        );
        assert_eq!(executions.load(Ordering::SeqCst), 1);
    }
}

/// The client retry layer on a tonic channel: the demo's client through
/// `IdempotentRetryLayer`, against the layer on the server.
#[cfg(feature = "client")]
mod retrying_client {
    use super::*;
    use common::fault_proxy::FaultProxy;
    use tower_idempotency::client::RetryPolicy;

    async fn server() -> (Arc<Ledger>, std::net::SocketAddr) {
        let ledger = Arc::new(Ledger::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .layer(IdempotencyLayer::new(test_store()))
            .add_service(PaymentsServer::new(ledger.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        tokio::spawn(server);
        (ledger, addr)
    }

    fn exact() -> RetryPolicy {
        RetryPolicy::default()
            .backoff(Duration::from_millis(100), 2.0, Duration::from_secs(1))
            .full_jitter(false)
    }

    /// The answer is lost after the server charged: the retry, with the
    /// key the layer chose, replays it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_answer_is_retried_with_the_same_key_and_replayed() {
        let (ledger, addr) = server().await;
        let proxy = FaultProxy::start(addr).await.unwrap();
        let mut client = PaymentsClient::connect_retrying(proxy.addr(), exact())
            .await
            .unwrap();
        // A first call finishes the HTTP/2 handshake (the server's SETTINGS
        // acknowledgement may still be on its way after `connect`): then
        // the next bytes the server sends are the charge's answer.
        client.list_charges(None).await.unwrap();
        proxy.swallow_answers(1);
        let reply = client.charge(None, 100, "GHS").await.expect("in the end");
        assert!(replayed(&reply), "the original answer, replayed");
        assert_eq!(executions(&ledger), 1);
    }

    /// UNAVAILABLE with `grpc-retry-pushback-ms: 200`: retried after 200 ms.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unavailable_is_retried_after_the_pushback() {
        let (ledger, addr) = server().await;
        ledger.unavailable_next.store(1, Ordering::SeqCst);
        let mut client = PaymentsClient::connect_retrying(addr, exact())
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let reply = client.charge(None, 100, "GHS").await.expect("retried");
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(!replayed(&reply));
        // The refusal was not stored: the retry charged.
        assert_eq!(executions(&ledger), 2);
        assert_eq!(ledger.charges.lock().unwrap().len(), 1);
    }

    /// A mismatch (FAILED_PRECONDITION) is final.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mismatch_is_not_retried() {
        let (ledger, addr) = server().await;
        let mut client = PaymentsClient::connect_retrying(addr, exact())
            .await
            .unwrap();
        client.charge(Some("k"), 100, "GHS").await.unwrap();
        let started = std::time::Instant::now();
        let refused = client.charge(Some("k"), 500, "GHS").await.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition);
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "no wait, no retry"
        );
        assert_eq!(executions(&ledger), 1);
    }
}
