//! The table of "What happens to a request" (docs/requests.md), row by row,
//! through the layer; the rows where something fails are in
//! `http_failures.rs`.

mod common;

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use tower::{Layer, ServiceExt};
use tower_idempotency::store::fault::Operation;
use tower_idempotency::{IdempotencyLayer, Scope};

fn setup() -> (Ledger, TestStore) {
    (Ledger::new(), test_store())
}

#[tokio::test]
async fn unguarded_methods_pass_through_without_store_access() {
    let (ledger, store) = setup();
    let svc = layer(store.clone()).layer(ledger.service());
    for method in [
        Method::GET,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
    ] {
        for _ in 0..2 {
            let req = Request::builder()
                .method(method.clone())
                .uri("/pay")
                .header("idempotency-key", "k")
                .body(Body::empty())
                .unwrap();
            let a = send(&svc, req).await;
            assert!(!a.replayed());
        }
    }
    assert_eq!(ledger.count(), 10, "every unguarded request executes");
    assert_eq!(
        store.total_calls(),
        0,
        "unguarded requests never touch the store"
    );
}

#[tokio::test]
async fn guarded_methods_are_configurable() {
    let (ledger, store) = setup();
    let svc = layer(store.clone())
        .methods([Method::PUT])
        .layer(ledger.service());
    let put = || {
        Request::put("/pay")
            .header("idempotency-key", "k")
            .body(Body::from("x"))
            .unwrap()
    };
    send(&svc, put()).await;
    assert!(send(&svc, put()).await.replayed());
    send(&svc, req(Some("k"), "x")).await;
    assert_eq!(ledger.count(), 2, "PUT is guarded, POST no longer is");
}

#[tokio::test]
async fn missing_key_is_refused_with_400_problem() {
    let (ledger, store) = setup();
    let svc = layer(store.clone()).layer(ledger.service());
    let a = send(&svc, req(None, "{}")).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.headers["content-type"], "application/problem+json");
    assert_eq!(a.headers["cache-control"], "no-store");
    assert!(a.problem_type().ends_with("#variant.MissingKey"));
    assert_eq!(ledger.count(), 0);
    assert_eq!(store.total_calls(), 0);
}

#[tokio::test]
async fn optional_key_passes_keyless_requests_through() {
    let (ledger, store) = setup();
    let svc = layer(store.clone()).optional().layer(ledger.service());
    for _ in 0..2 {
        let a = send(&svc, req(None, "{}")).await;
        assert_eq!(a.status, StatusCode::CREATED);
        assert!(!a.replayed());
    }
    assert_eq!(ledger.count(), 2);
    assert_eq!(store.total_calls(), 0);
    // With a key it is still guarded.
    send(&svc, req(Some("k"), "{}")).await;
    assert!(send(&svc, req(Some("k"), "{}")).await.replayed());
    assert_eq!(ledger.count(), 3);
}

#[tokio::test]
async fn invalid_keys_are_refused_with_400_and_never_reach_the_store() {
    let (ledger, store) = setup();
    let svc = layer(store.clone()).layer(ledger.service());
    let long = "a".repeat(256);
    let huge = "a".repeat(65536);
    let bad: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        long.into_bytes(),
        huge.into_bytes(),
        "é".as_bytes().to_vec(),
        // (Control bytes such as 0x01 and 0x7f cannot be in an
        // `http::HeaderValue` at all; the key parser's unit tests cover them.)
        b"a\tb".to_vec(),
        b"k1, k2".to_vec(),
        b"\"unterminated".to_vec(),
    ];
    for value in bad {
        let r = Request::post("/pay")
            .header(
                "idempotency-key",
                http::HeaderValue::from_bytes(&value).unwrap(),
            )
            .body(Body::from("{}"))
            .unwrap();
        let a = send(&svc, r).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{value:?}");
        assert!(
            a.problem_type().ends_with("#variant.InvalidKey"),
            "{value:?}"
        );
    }
    let twice = Request::post("/pay")
        .header("idempotency-key", "k")
        .header("idempotency-key", "k")
        .body(Body::from("{}"))
        .unwrap();
    let a = send(&svc, twice).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.problem_type().ends_with("#variant.InvalidKey"));
    assert_eq!(ledger.count(), 0);
    assert_eq!(store.total_calls(), 0);

    let max = "a".repeat(255);
    let a = send(
        &svc,
        Request::post("/pay")
            .header("idempotency-key", max)
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::CREATED,
        "a 255-character key is accepted"
    );
}

#[tokio::test]
async fn quoted_key_is_the_same_key_as_the_bare_token() {
    let (ledger, store) = setup();
    let svc = layer(store).layer(ledger.service());
    let first = send(&svc, req(Some("\"order-1\""), "{}")).await;
    let second = send(&svc, req(Some("order-1"), "{}")).await;
    assert!(second.replayed());
    assert_eq!(first.body, second.body);
    assert_eq!(ledger.count(), 1);
}

#[tokio::test]
async fn new_key_executes_and_retries_replay_the_original_exactly() {
    let (ledger, store) = setup();
    let svc = layer(store).layer(ledger.service());
    let first = send(&svc, req(Some("k"), r#"{"amount":100}"#)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(
        !first.replayed(),
        "the executing request is not marked replayed"
    );
    assert_eq!(
        first.headers.get_all("set-cookie").iter().count(),
        2,
        "the executing caller gets its cookies"
    );
    for _ in 0..3 {
        let again = send(&svc, req(Some("k"), r#"{"amount":100}"#)).await;
        assert!(again.replayed());
        assert_eq!(again.status, first.status);
        assert_eq!(again.body, first.body);
        assert_eq!(again.headers["x-exec"], "1");
        let multi: Vec<_> = again.headers.get_all("x-multi").iter().collect();
        assert_eq!(
            multi,
            ["one", "two, three"],
            "repeated headers stay repeated, in order"
        );
        assert_eq!(
            again.headers["x-binary"].as_bytes(),
            &[0xfe, b'x', 0x80],
            "non-UTF-8 values stay exact"
        );
        assert_eq!(again.headers["content-type"], first.headers["content-type"]);
        assert!(
            again.headers.get("set-cookie").is_none(),
            "cookies are not replayed by default"
        );
        assert!(
            again.headers.get("connection").is_none(),
            "hop-by-hop headers are not replayed"
        );
        assert!(
            again.headers.get("x-hop").is_none(),
            "headers named by Connection are not replayed"
        );
    }
    assert_eq!(ledger.count(), 1);
}

#[tokio::test]
async fn set_cookie_replay_and_header_exclusion_are_opt_in() {
    let (ledger, store) = setup();
    let svc = layer(store)
        .replay_set_cookie(true)
        .exclude_replayed_header(http::HeaderName::from_static("x-exec"))
        .replay_header(http::HeaderName::from_static("x-replayed"))
        .layer(ledger.service());
    send(&svc, req(Some("k"), "{}")).await;
    let again = send(&svc, req(Some("k"), "{}")).await;
    assert_eq!(again.headers.get_all("set-cookie").iter().count(), 2);
    assert!(again.headers.get("x-exec").is_none());
    assert_eq!(again.headers["x-replayed"], "true");
}

#[tokio::test]
async fn handler_sees_idempotency_info() {
    let (ledger, store) = setup();
    let svc = layer(store).layer(ledger.service());
    send(&svc, req(Some("k"), "{}")).await;
    assert!(ledger.saw_info.load(std::sync::atomic::Ordering::SeqCst));
}

#[tokio::test]
async fn a_slow_upload_never_holds_the_key() {
    let (ledger, store) = setup();
    let svc = layer(store.clone()).layer(ledger.service());
    let (tx, slow_body) = channel_body_holding(1);
    tx.send(Ok(Bytes::from_static(b"{"))).await.unwrap();
    let slow = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, post(Some("k")).body(slow_body).unwrap()).await }
    });
    // Returns once the layer took the first chunk: it is reading the body.
    tx.send(Ok(Bytes::from_static(b"}"))).await.unwrap();
    assert_eq!(
        store.total_calls(),
        0,
        "nothing is claimed while the body is still arriving"
    );
    let fast = send(&svc, req(Some("k"), "{}")).await;
    assert_eq!(
        fast.status,
        StatusCode::CREATED,
        "another request with the key is not blocked by the upload"
    );
    drop(tx);
    let slow = slow.await.unwrap();
    assert!(
        slow.replayed(),
        "the finished upload replays the first execution"
    );
    assert_eq!(slow.body, fast.body);
    assert_eq!(ledger.count(), 1);
}

#[tokio::test]
async fn an_in_flight_duplicate_waits_and_gets_the_same_answer() {
    let (ledger, store) = setup();
    let svc = layer(store.clone()).layer(ledger.service());
    let gated = || {
        post(Some("k"))
            .header("x-gate", "1")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = start_gated(&svc, &ledger, "{}").await;
    let second = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, gated()).await }
    });
    store.until_calls(Operation::Wait, 1).await;
    assert!(!second.is_finished(), "the duplicate waits for the first");
    ledger.open(1);
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert!(!first.replayed());
    assert!(second.replayed(), "a coalesced answer is marked replayed");
    assert_eq!(first.status, second.status);
    assert_eq!(first.body, second.body);
    assert_eq!(ledger.count(), 1);
}

#[tokio::test]
async fn waiting_is_bounded_then_409_with_retry_after() {
    let (ledger, store) = setup();
    let svc = layer(store)
        .wait_for_in_flight(Duration::from_millis(200))
        .retry_after(Duration::from_secs(3))
        .layer(ledger.service());
    let first = start_gated(&svc, &ledger, "{}").await;
    let started = std::time::Instant::now();
    let second = send(&svc, req(Some("k"), "{}")).await;
    let waited = started.elapsed();
    assert_eq!(second.status, StatusCode::CONFLICT);
    assert!(second.problem_type().ends_with("#variant.InFlight"));
    assert_eq!(second.headers["retry-after"], "3");
    assert!(
        waited >= Duration::from_millis(190),
        "it waited ({waited:?})"
    );
    assert!(
        waited < Duration::from_secs(5),
        "but not much past the bound ({waited:?})"
    );
    ledger.open(1);
    let first = first.await.unwrap();
    let third = send(&svc, req(Some("k"), "{}")).await;
    assert!(third.replayed());
    assert_eq!(third.body, first.body);
    assert_eq!(ledger.count(), 1);
}

#[tokio::test]
async fn reject_policy_answers_409_at_once() {
    let (ledger, store) = setup();
    let svc = layer(store).reject_in_flight().layer(ledger.service());
    let first = start_gated(&svc, &ledger, "{}").await;
    let second = send(&svc, req(Some("k"), "{}")).await;
    assert_eq!(second.status, StatusCode::CONFLICT);
    assert!(second.problem_type().ends_with("#variant.InFlight"));
    assert_eq!(second.headers["retry-after"], "1");
    ledger.open(1);
    first.await.unwrap();
    assert_eq!(ledger.count(), 1);
}

#[tokio::test]
async fn a_different_request_under_the_same_key_is_refused() {
    let (ledger, store) = setup();
    let svc = layer(store).layer(ledger.service());
    let first = send(&svc, req(Some("k"), r#"{"amount":100}"#)).await;
    let other = send(&svc, req(Some("k"), r#"{"amount":999}"#)).await;
    assert_eq!(other.status, StatusCode::CONFLICT);
    assert!(other.problem_type().ends_with("#variant.KeyMismatch"));
    assert!(
        other.headers.get("retry-after").is_none(),
        "a mismatch is not retryable"
    );
    assert!(
        !other.text().contains("exec-1"),
        "a mismatch never leaks the stored response"
    );
    // Another path with the same body is a different request too.
    let path = send(
        &svc,
        Request::post("/refund")
            .header("idempotency-key", "k")
            .body(Body::from(r#"{"amount":100}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(path.status, StatusCode::CONFLICT);
    let original = send(&svc, req(Some("k"), r#"{"amount":100}"#)).await;
    assert!(original.replayed());
    assert_eq!(original.body, first.body);
    // The same body under a new key is a new request, not a conflict.
    assert_eq!(
        send(&svc, req(Some("k2"), r#"{"amount":100}"#))
            .await
            .status,
        StatusCode::CREATED
    );
    assert_eq!(ledger.count(), 2);
}

#[tokio::test]
async fn mismatch_while_in_flight_is_refused_at_once_and_status_is_configurable() {
    let (ledger, store) = setup();
    let svc = layer(store)
        .mismatch_status(StatusCode::UNPROCESSABLE_ENTITY)
        .layer(ledger.service());
    let first = start_gated(&svc, &ledger, "A").await;
    let other = tokio::time::timeout(Duration::from_secs(2), send(&svc, req(Some("k"), "B")))
        .await
        .expect("refused without waiting");
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(other.problem_type().ends_with("#variant.KeyMismatch"));
    ledger.open(1);
    first.await.unwrap();
    assert_eq!(ledger.count(), 1);
}

#[tokio::test]
async fn fingerprint_headers_make_a_mismatch() {
    let (ledger, store) = setup();
    let svc = layer(store)
        .fingerprint_headers([http::HeaderName::from_static("x-account")])
        .layer(ledger.service());
    let with = |acct: &'static str| {
        post(Some("k"))
            .header("x-account", acct)
            .body(Body::from("{}"))
            .unwrap()
    };
    send(&svc, with("a")).await;
    assert!(send(&svc, with("a")).await.replayed());
    assert_eq!(send(&svc, with("b")).await.status, StatusCode::CONFLICT);
    assert_eq!(ledger.count(), 1);
}

#[derive(Clone)]
struct Tenant(&'static str);

#[tokio::test]
async fn scopes_keep_tenants_apart() {
    let (ledger, store) = setup();
    let svc = layer(store)
        .scope(|parts| parts.extensions.get::<Tenant>().map(|t| Scope::from(t.0)))
        .layer(ledger.service());
    let as_tenant = |t: Option<&'static str>| {
        let mut r = req(Some("shared-key"), "{}");
        if let Some(t) = t {
            r.extensions_mut().insert(Tenant(t));
        }
        r
    };
    let a = send(&svc, as_tenant(Some("a"))).await;
    let b = send(&svc, as_tenant(Some("b"))).await;
    assert!(!b.replayed(), "tenant b executes on its own");
    assert_ne!(a.body, b.body, "and never sees tenant a's response");
    assert!(send(&svc, as_tenant(Some("a"))).await.replayed());
    assert_eq!(ledger.count(), 2);
    let none = send(&svc, as_tenant(None)).await;
    assert_eq!(none.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(none.problem_type().ends_with("#variant.ScopeUnavailable"));
    assert_eq!(ledger.count(), 2);
}

#[tokio::test]
async fn purge_lets_a_key_execute_again() {
    let (ledger, store) = setup();
    let layer = layer(store);
    let svc = layer.clone().layer(ledger.service());
    send(&svc, req(Some("k"), "{}")).await;
    let key = tower_idempotency::IdempotencyKey::parse(b"k").unwrap();
    assert!(layer.purge(&Scope::global(), &key).await.unwrap());
    assert!(!send(&svc, req(Some("k"), "{}")).await.replayed());
    assert_eq!(ledger.count(), 2);
}

#[test]
fn service_future_and_bodies_are_send_and_sync_where_frameworks_need_it() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let ledger = Ledger::new();
    let svc =
        IdempotencyLayer::new(tower_idempotency::store::MemoryStore::new()).layer(ledger.service());
    send_sync(&svc);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let fut = tower::Service::call(&mut svc.clone(), req(Some("k"), "{}"));
        send(&fut);
        let res = fut.await.unwrap();
        send(res.body());
    });
}

#[tokio::test]
async fn trailers_are_stored_and_replayed() {
    let inner = tower::service_fn(
        |_req: Request<tower_idempotency::RequestBody<Body>>| async {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            trailers.insert("x-checksum", http::HeaderValue::from_static("abc"));
            let body = http_body_util::Full::new(Bytes::from_static(b"\0\0\0\0\x02hi"))
                .with_trailers(async move { Some(Ok::<_, std::convert::Infallible>(trailers)) });
            Ok::<_, std::convert::Infallible>(http::Response::new(body))
        },
    );
    let svc = layer(test_store()).layer(inner);
    let first = collect(svc.clone().oneshot(req(Some("k"), "{}")).await.unwrap()).await;
    let again = collect(svc.clone().oneshot(req(Some("k"), "{}")).await.unwrap()).await;
    assert!(again.replayed());
    assert_eq!(again.body, first.body);
    let trailers = again
        .trailers
        .expect("the replay ends with the trailers frame");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-checksum"], "abc");
    assert_eq!(first.trailers, Some(trailers));
}

#[tokio::test(start_paused = true)]
async fn after_the_retention_window_a_key_is_a_new_request() {
    let (ledger, store) = setup();
    let svc = layer(store)
        .retention(Duration::from_secs(2))
        .layer(ledger.service());
    send(&svc, req(Some("k"), "{}")).await;
    tokio::time::advance(Duration::from_millis(1900)).await;
    assert!(
        send(&svc, req(Some("k"), "{}")).await.replayed(),
        "replayed within retention"
    );
    tokio::time::advance(Duration::from_millis(200)).await;
    let late = send(&svc, req(Some("k"), "{}")).await;
    assert!(!late.replayed(), "executed again after retention");
    assert_eq!(ledger.count(), 2);
}
