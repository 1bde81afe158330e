//! The table of "What happens to a request" (docs/requests.md), row by row,
//! through the layer.

mod common;

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use tower::{Layer, ServiceExt};
use tower_idempotency::store::fault::{Fault, Operation};
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
async fn body_over_the_limit_gets_413_and_is_not_executed() {
    let (ledger, store) = setup();
    let svc = layer(store.clone())
        .request_body_limit(16)
        .layer(ledger.service());
    // Declared length.
    let a = send(
        &svc,
        Request::post("/pay")
            .header("idempotency-key", "a")
            .body(Body::from(vec![b'x'; 17]))
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(a.problem_type().ends_with("#variant.PayloadTooLarge"));
    // Streamed without a length.
    let chunks = futures_chunks(vec![
        Bytes::from_static(b"0123456789"),
        Bytes::from_static(b"0123456789"),
    ]);
    let r = Request::post("/pay")
        .header("idempotency-key", "b")
        .body(chunks)
        .unwrap();
    assert_eq!(send(&svc, r).await.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(ledger.count(), 0);
    assert_eq!(store.total_calls(), 0, "an oversized body claims nothing");

    // Exactly at the limit: executed, and the handler gets the same bytes.
    let chunks = futures_chunks(vec![
        Bytes::from_static(b"01234567"),
        Bytes::from_static(b"89abcdef"),
    ]);
    let r = Request::post("/pay")
        .header("idempotency-key", "c")
        .body(chunks)
        .unwrap();
    assert_eq!(send(&svc, r).await.status, StatusCode::CREATED);
    assert_eq!(&ledger.last_body.lock().unwrap()[..], b"0123456789abcdef");
}

fn futures_chunks(chunks: Vec<Bytes>) -> Body {
    let (tx, body) = channel_body();
    for c in chunks {
        tx.try_send(Ok(c)).unwrap();
    }
    body
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
async fn a_broken_request_body_is_refused_and_not_executed() {
    let (ledger, store) = setup();
    let svc = layer(store.clone()).layer(ledger.service());
    let (tx, body) = channel_body();
    tx.send(Ok(Bytes::from_static(b"part"))).await.unwrap();
    tx.send(Err(std::io::Error::other("reset"))).await.unwrap();
    let a = send(&svc, post(Some("k")).body(body).unwrap()).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.problem_type().ends_with("#variant.BodyUnreadable"));
    assert_eq!(ledger.count(), 0);
    assert_eq!(store.total_calls(), 0);
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

#[tokio::test]
async fn an_inner_error_releases_the_key_and_propagates() {
    let (ledger, store) = setup();
    let svc = layer(store).layer(ledger.service());
    let failing = post(Some("k"))
        .header("x-fail", "1")
        .body(Body::from("{}"))
        .unwrap();
    let err = svc.clone().oneshot(failing).await.unwrap_err();
    assert_eq!(err, TestError("handler failed"));
    let retry = send(&svc, req(Some("k"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed());
    assert_eq!(ledger.count(), 2, "a retry after an error executes again");
}

#[tokio::test]
async fn retryable_statuses_are_not_stored() {
    for status in ["500", "503", "408", "429"] {
        let (ledger, store) = setup();
        let svc = layer(store).layer(ledger.service());
        let r = || {
            post(Some("k"))
                .header("x-status", status)
                .body(Body::from("{}"))
                .unwrap()
        };
        assert_eq!(send(&svc, r()).await.status.as_str(), status);
        let again = send(&svc, r()).await;
        assert!(!again.replayed(), "{status} is not replayed");
        assert_eq!(ledger.count(), 2, "{status}: a retry executes again");
    }
    for status in ["200", "402", "404", "422"] {
        let (ledger, store) = setup();
        let svc = layer(store).layer(ledger.service());
        let r = || {
            post(Some("k"))
                .header("x-status", status)
                .body(Body::from("{}"))
                .unwrap()
        };
        send(&svc, r()).await;
        let again = send(&svc, r()).await;
        assert!(again.replayed(), "{status} is stored");
        assert_eq!(again.status.as_str(), status);
        assert_eq!(ledger.count(), 1);
    }
}

#[tokio::test]
async fn the_store_predicate_and_the_handler_override_decide_storage() {
    let (ledger, store) = setup();
    let svc = layer(store)
        .store_when(|parts| parts.status.is_success())
        .layer(ledger.service());
    let r = |key, status: &'static str, policy: Option<&'static str>| {
        let mut b = post(Some(key)).header("x-status", status);
        if let Some(p) = policy {
            b = b.header("x-policy", p);
        }
        b.body(Body::from("{}")).unwrap()
    };
    send(&svc, r("a", "402", None)).await;
    assert!(
        !send(&svc, r("a", "402", None)).await.replayed(),
        "the custom predicate refuses 402"
    );
    send(&svc, r("b", "500", Some("store"))).await;
    let b = send(&svc, r("b", "500", Some("store"))).await;
    assert!(b.replayed(), "the handler asked to store its 500");
    assert_eq!(b.status, StatusCode::INTERNAL_SERVER_ERROR);
    send(&svc, r("c", "201", Some("skip"))).await;
    assert!(
        !send(&svc, r("c", "201", Some("skip"))).await.replayed(),
        "the handler asked not to store its 201"
    );
    assert_eq!(ledger.count(), 5);
}

#[tokio::test]
async fn an_oversized_response_is_delivered_once_and_never_re_executed() {
    let (ledger, store) = setup();
    let svc = layer(store)
        .stored_response_limit(1024)
        .layer(ledger.service());
    let r = || {
        post(Some("k"))
            .header("x-body-bytes", "5000")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = send(&svc, r()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        first.body.len(),
        5000,
        "the first caller receives the whole body"
    );
    let retry = send(&svc, r()).await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    assert!(retry.problem_type().ends_with("#variant.NotReplayable"));
    assert!(retry.text().contains("201"));
    assert_eq!(
        ledger.count(),
        1,
        "not replayable never means executed again"
    );
    // At the limit it is stored.
    let at = || {
        post(Some("k2"))
            .header("x-body-bytes", "1024")
            .body(Body::from("{}"))
            .unwrap()
    };
    send(&svc, at()).await;
    assert_eq!(send(&svc, at()).await.body.len(), 1024);
}

#[tokio::test]
async fn store_failure_fails_closed_with_503() {
    let (ledger, store) = setup();
    store.fail_all();
    let svc = layer(store.clone()).layer(ledger.service());
    let a = send(&svc, req(Some("k"), "{}")).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(a.problem_type().ends_with("#variant.StoreUnavailable"));
    assert_eq!(a.headers["retry-after"], "1");
    assert_eq!(ledger.count(), 0, "nothing runs unguarded");
    store.clear();
    assert_eq!(
        send(&svc, req(Some("k"), "{}")).await.status,
        StatusCode::CREATED,
        "it recovers by itself"
    );
}

#[tokio::test]
async fn fail_open_executes_unguarded_when_the_store_fails() {
    let (ledger, store) = setup();
    store.fail_all();
    let svc = layer(store).fail_open().layer(ledger.service());
    assert_eq!(
        send(&svc, req(Some("k"), "{}")).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        send(&svc, req(Some("k"), "{}")).await.status,
        StatusCode::CREATED
    );
    assert_eq!(ledger.count(), 2);
}

#[tokio::test]
async fn an_unreadable_record_fails_closed() {
    let (ledger, store) = setup();
    let svc = layer(store.clone()).layer(ledger.service());
    send(&svc, req(Some("k"), "{}")).await;
    store.inject(Operation::Claim, Fault::CorruptRecord, usize::MAX);
    let a = send(&svc, req(Some("k"), "{}")).await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(a.problem_type().ends_with("#variant.RecordUnreadable"));
    assert_eq!(
        ledger.count(),
        1,
        "an unreadable record is never taken as absent"
    );
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

#[tokio::test]
async fn a_panicking_handler_releases_the_key_and_the_panic_propagates() {
    let (ledger, store) = setup();
    let svc = layer(store.clone()).layer(ledger.service());
    let panicking = post(Some("k"))
        .header("x-panic", "1")
        .body(Body::from("{}"))
        .unwrap();
    let outcome = tokio::spawn({
        let svc = svc.clone();
        async move { svc.oneshot(panicking).await }
    })
    .await;
    assert!(
        outcome.unwrap_err().is_panic(),
        "the handler's panic reaches the caller"
    );
    // The release is spawned by the dying task.
    store.until_calls(Operation::Release, 1).await;
    let retry = send(&svc, req(Some("k"), "{}")).await;
    assert_eq!(
        retry.status,
        StatusCode::CREATED,
        "the key was released, not left in flight"
    );
    assert_eq!(ledger.count(), 2);
}

#[tokio::test]
async fn behind_catch_panic_a_panic_is_a_500_and_the_retry_executes() {
    let (ledger, store) = setup();
    let svc = tower::ServiceBuilder::new()
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .layer(layer(store.clone()))
        .service(ledger.service());
    let panicking = post(Some("k"))
        .header("x-panic", "1")
        .body(Body::from("{}"))
        .unwrap();
    let res = svc.clone().oneshot(panicking).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    store.until_calls(Operation::Release, 1).await;
    let retry = svc.clone().oneshot(req(Some("k"), "{}")).await.unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
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

/// An inner service whose first response body breaks off after "partial";
/// later ones end normally after it.
fn breaking_off_once(
    executions: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> impl tower::Service<
    Request<tower_idempotency::RequestBody<Body>>,
    Response = http::Response<Body>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<http::Response<Body>, std::convert::Infallible>>
             + Send
             + 'static,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_req: Request<tower_idempotency::RequestBody<Body>>| {
        let n = executions.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            let (tx, body) = channel_body();
            tx.send(Ok(Bytes::from_static(b"partial"))).await.unwrap();
            if n == 0 {
                tx.send(Err(std::io::Error::other("upstream reset")))
                    .await
                    .unwrap();
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(body))
        }
    })
}

#[tokio::test]
async fn a_response_body_that_breaks_off_completes_the_key_as_outcome_unknown() {
    let executions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let svc = layer(test_store()).layer(breaking_off_once(executions.clone()));
    let res = svc.clone().oneshot(req(Some("k"), "{}")).await.unwrap();
    let err = res.into_body().collect().await;
    assert!(err.is_err(), "the caller sees the body error");
    for _ in 0..2 {
        let retry = send(&svc, req(Some("k"), "{}")).await;
        assert_eq!(retry.status, StatusCode::CONFLICT);
        assert!(
            retry.problem_type().ends_with("#variant.OutcomeUnknown"),
            "{}",
            retry.problem_type()
        );
        assert!(!retry.headers.contains_key("retry-after"));
    }
    assert_eq!(
        executions.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the handler acted once; its outcome is unknown, so it never runs again"
    );
}

/// A response body that yields "partial", then panics when polled again.
struct PanicsAfterFirstChunk {
    sent: bool,
}

impl http_body::Body for PanicsAfterFirstChunk {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.sent {
            panic!("the response body panicked on purpose");
        }
        self.sent = true;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
            b"partial",
        )))))
    }
}

/// Issue 14: a response body that panics after its head is an unknown
/// outcome, like one that breaks off: the key completes as "outcome
/// unknown" and the handler never runs again. The caller gets what there
/// was and the panic as the body's error. Before, the panic unwound through
/// the execution's lease guard, which released the key: the caller's task
/// died and a retry ran the handler a second time.
#[tokio::test]
async fn a_response_body_that_panics_after_its_head_completes_the_key_as_outcome_unknown() {
    let executions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let inner = {
        let executions = executions.clone();
        tower::service_fn(move |_req: Request<tower_idempotency::RequestBody<Body>>| {
            executions.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                let body = Body::new(PanicsAfterFirstChunk { sent: false });
                Ok::<_, std::convert::Infallible>(http::Response::new(body))
            }
        })
    };
    let svc = layer(test_store()).layer(inner);
    let first = tokio::spawn({
        let svc = svc.clone();
        async move {
            let res = svc.oneshot(req(Some("k"), "{}")).await.unwrap();
            res.into_body().collect().await.is_err()
        }
    })
    .await;
    assert!(
        matches!(first, Ok(true)),
        "the caller gets the body's error, not the panic: {first:?}"
    );
    for _ in 0..2 {
        let retry = send(&svc, req(Some("k"), "{}")).await;
        assert_eq!(retry.status, StatusCode::CONFLICT);
        assert!(
            retry.problem_type().ends_with("#variant.OutcomeUnknown"),
            "{}",
            retry.problem_type()
        );
    }
    assert_eq!(
        executions.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the handler acted once; its outcome is unknown, so it never runs again"
    );
}

#[tokio::test]
async fn release_unknown_outcomes_lets_a_broken_response_run_again() {
    let executions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let svc = layer(test_store())
        .release_unknown_outcomes()
        .layer(breaking_off_once(executions.clone()));
    let res = svc.clone().oneshot(req(Some("k"), "{}")).await.unwrap();
    let err = res.into_body().collect().await;
    assert!(err.is_err(), "the caller sees the body error");
    let retry = send(&svc, req(Some("k"), "{}")).await;
    assert!(
        !retry.replayed(),
        "nothing was stored for the broken response"
    );
    assert_eq!(&retry.body[..], b"partial");
    assert_eq!(executions.load(std::sync::atomic::Ordering::SeqCst), 2);
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

/// Every `Duration` setting at its extremes: `Duration::MAX` saturates and
/// zero is raised to the minimum, and a first request, an in-flight
/// duplicate (waited for, and refused) and a replay all go through without a
/// panic.
#[tokio::test(start_paused = true)]
async fn every_duration_setting_at_zero_or_max_runs_first_duplicate_and_replay_without_a_panic() {
    for extreme in [Duration::MAX, Duration::ZERO] {
        let (ledger, store) = setup();
        let configure = |layer: IdempotencyLayer<TestStore>| {
            layer.lease(extreme).retention(extreme).retry_after(extreme)
        };
        let svc = configure(layer(store.clone()))
            .wait_for_in_flight(extreme)
            .layer(ledger.service());
        let refusing = configure(layer(store.clone()))
            .reject_in_flight()
            .layer(ledger.service());
        let first = start_gated(&svc, &ledger, "{}").await;
        // Let a few lease renewals come due (the clock is paused).
        tokio::time::sleep(Duration::from_millis(20)).await;
        let refused = send(&refusing, req(Some("k"), "{}")).await;
        assert_eq!(refused.status, StatusCode::CONFLICT, "{extreme:?}");
        assert!(refused.headers.contains_key("retry-after"));
        let waiting = tokio::spawn({
            let svc = svc.clone();
            async move { send(&svc, req(Some("k"), "{}")).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        ledger.open(1);
        let first = first.await.unwrap();
        let replay = send(&svc, req(Some("k"), "{}")).await;
        assert!(replay.replayed(), "{extreme:?}");
        assert_eq!(replay.body, first.body);
        let waited = waiting.await.unwrap();
        if extreme == Duration::MAX {
            assert_eq!(waited.body, first.body, "the duplicate waited");
        } else {
            assert_eq!(waited.status, StatusCode::CONFLICT, "a zero wait refuses");
        }
        assert_eq!(ledger.count(), 1, "{extreme:?}");
    }
}

#[tokio::test]
async fn a_handler_that_marks_its_outcome_unknown_is_never_run_again() {
    let (ledger, store) = setup();
    let svc = layer(store).layer(ledger.service());
    let unknown = || {
        post(Some("k"))
            .header("x-policy", "unknown")
            .header("x-status", "504")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = send(&svc, unknown()).await;
    assert_eq!(
        first.status,
        StatusCode::GATEWAY_TIMEOUT,
        "the caller gets the handler's answer"
    );
    let retry = send(&svc, unknown()).await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    assert!(retry.problem_type().ends_with("#variant.OutcomeUnknown"));
    assert_eq!(ledger.count(), 1);
}
