//! The layer in front of a tonic server, driven by a real tonic client over
//! loopback (SPEC §6).

mod common;
#[path = "../examples/grpc_payments/service.rs"]
mod service;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::TestStore;
use service::{CHARGE, Ledger, PaymentsClient, PaymentsServer, replayed};
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
    let (ledger, mut client) = start(IdempotencyLayer::new(TestStore::new()), Duration::ZERO).await;
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
        IdempotencyLayer::new(TestStore::new()),
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
    let (ledger, mut client) = start(IdempotencyLayer::new(TestStore::new()), Duration::ZERO).await;
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
    let (ledger, mut client) = start(IdempotencyLayer::new(TestStore::new()), Duration::ZERO).await;
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
    let (ledger, mut client) = start(IdempotencyLayer::new(TestStore::new()), Duration::ZERO).await;
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
    let layer = IdempotencyLayer::new(TestStore::new()).grpc_methods([CHARGE]);
    let (ledger, mut client) = start(layer, Duration::ZERO).await;
    assert_eq!(
        client.charge(None, 100, "GHS").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(executions(&ledger), 0);

    // In flight, with the reject policy.
    let layer = IdempotencyLayer::new(TestStore::new()).reject_in_flight();
    let (ledger, client) = start(layer, Duration::from_millis(500)).await;
    let first = tokio::spawn({
        let mut client = client.clone();
        async move { client.charge(Some("k"), 100, "GHS").await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let status = client
        .clone()
        .charge(Some("k"), 100, "GHS")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    first.await.unwrap().unwrap();
    assert_eq!(executions(&ledger), 1);

    // Store unavailable.
    let store = TestStore::new();
    store.set_failing(true);
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
    let layer = IdempotencyLayer::new(TestStore::new()).request_body_limit(8);
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
    let store = TestStore::new();
    let layer = IdempotencyLayer::new(store.clone()).grpc_methods([CHARGE]);
    let (_ledger, mut client) = start(layer, Duration::ZERO).await;
    client.charge(Some("c1"), 100, "GHS").await.unwrap();
    client.charge(Some("c2"), 200, "GHS").await.unwrap();
    let calls = store.calls();
    // A key on an unlisted (streaming) method does not guard it.
    let listed = client.list_charges(Some("s")).await.unwrap();
    let again = client.list_charges(Some("s")).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(again, listed);
    assert_eq!(store.calls(), calls, "the stream never touched the store");

    // Without a list, a keyless stream passes through too.
    let store = TestStore::new();
    let (_ledger, mut client) = start(IdempotencyLayer::new(store.clone()), Duration::ZERO).await;
    assert!(client.list_charges(None).await.unwrap().is_empty());
    assert_eq!(store.calls(), 0);
}

#[tokio::test]
async fn one_service_can_be_layered_with_named_layer() {
    use tonic::service::LayerExt;
    let ledger = Arc::new(Ledger::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let guarded =
        IdempotencyLayer::new(TestStore::new()).named_layer(PaymentsServer::new(ledger.clone()));
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
