//! The layer behind a real server, driven over real loopback sockets.

mod common;

use std::sync::atomic::Ordering;

use axum::body::Body;
use common::*;
use http::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;
use tower::Layer;
use tower_idempotency::store::fault::Operation;

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn post_to(client: &HttpClient, addr: std::net::SocketAddr, key: &str, gate: bool) -> Answer {
    let mut b = Request::post(format!("http://{addr}/pay")).header("idempotency-key", key);
    if gate {
        b = b.header("x-gate", "1");
    }
    let res = client
        .request(b.body(Body::from(r#"{"amount":100}"#)).unwrap())
        .await
        .expect("request");
    collect(res).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_duplicates_execute_once_and_get_identical_bodies() {
    let ledger = Ledger::new();
    let store = test_store();
    let svc = layer(store.clone()).layer(ledger.infallible());
    let addr = serve(svc).await;
    let entered = ledger.entered.notified();
    let first = tokio::spawn(async move { post_to(&client(), addr, "dup", true).await });
    entered.await;
    let mut others = Vec::new();
    for _ in 0..99 {
        // One client each: one connection each.
        others.push(tokio::spawn(async move {
            post_to(&client(), addr, "dup", true).await
        }));
    }
    // Every duplicate is waiting on the first before it ends.
    store.until_calls(Operation::Wait, 99).await;
    ledger.open(100);
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let mut replayed = 0;
    for other in others {
        let other = other.await.unwrap();
        assert_eq!(other.status, first.status);
        assert_eq!(other.body, first.body, "every duplicate gets the same body");
        replayed += usize::from(other.replayed());
    }
    assert_eq!(
        replayed, 99,
        "every answer but the executing one is marked replayed"
    );
    assert_eq!(ledger.count(), 1, "one execution for 100 requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_disconnect_does_not_cancel_the_execution() {
    let ledger = Ledger::new();
    let svc = layer(test_store()).layer(ledger.infallible());
    // Signals when the server drops a request's future before it ended,
    // as it does when it notices the client went away.
    let dropped = std::sync::Arc::new(tokio::sync::Notify::new());
    let svc = {
        let dropped = dropped.clone();
        tower::service_fn(move |req: Request<Body>| {
            let fut = tower::ServiceExt::oneshot(svc.clone(), req);
            let guard = NotifyOnDrop(Some(dropped.clone()));
            async move {
                let res = fut.await;
                guard.disarm();
                res
            }
        })
    };
    let addr = serve(svc).await;

    let entered = ledger.entered.notified();
    let gone = dropped.notified();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = r#"{"amount":100}"#;
    let head = format!(
        "POST /pay HTTP/1.1\r\nhost: {addr}\r\nidempotency-key: gone\r\nx-gate: 1\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    entered.await;
    drop(stream);
    // The server noticed the closed connection and dropped the future.
    gone.await;
    let finished = ledger.done.notified();
    ledger.open(1);
    tokio::time::timeout(std::time::Duration::from_secs(10), finished)
        .await
        .expect("the execution was cancelled with its client");
    assert_eq!(
        ledger.finished.load(Ordering::SeqCst),
        1,
        "the execution ran to its end"
    );
    let retry = post_to(&client(), addr, "gone", false).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(
        retry.replayed(),
        "the client's retry gets the stored result"
    );
    assert_eq!(retry.headers["x-exec"], "1");
    assert_eq!(ledger.count(), 1);
}

/// Notifies when dropped, unless disarmed first.
struct NotifyOnDrop(Option<std::sync::Arc<tokio::sync::Notify>>);

impl NotifyOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for NotifyOnDrop {
    fn drop(&mut self) {
        if let Some(notify) = self.0.take() {
            notify.notify_one();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_are_byte_identical_over_the_wire() {
    let ledger = Ledger::new();
    let svc = layer(test_store()).layer(ledger.infallible());
    let addr = serve(svc).await;
    let c = client();
    let first = post_to(&c, addr, "wire", false).await;
    let second = post_to(&c, addr, "wire", false).await;
    assert!(second.replayed());
    assert_eq!(first.body, second.body);
    assert_eq!(first.status, second.status);
    for name in first.headers.keys() {
        // Per-response (date), per-caller (cookies) and hop-by-hop headers
        // are the only ones a replay may differ in.
        if ["date", "set-cookie", "connection", "x-hop"].contains(&name.as_str()) {
            continue;
        }
        let a: Vec<_> = first.headers.get_all(name).iter().collect();
        let b: Vec<_> = second.headers.get_all(name).iter().collect();
        assert_eq!(a, b, "header {name} differs in the replay");
    }
}
