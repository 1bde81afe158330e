//! The rows of "What happens to a request" (docs/requests.md) where
//! something fails, through the layer: a request body too large or broken,
//! a handler that errs or panics, a response body that breaks off, a store
//! that fails or returns a payload the layer cannot decode, and what is
//! stored (and what is not) when an answer should not be replayed; every
//! duration setting at its extremes.

mod common;

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::{Layer, ServiceExt};
use tower_idempotency::IdempotencyLayer;
use tower_idempotency::store::fault::{Fault, Operation};

fn setup() -> (Ledger, TestStore) {
    (Ledger::new(), test_store())
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
    store.inject(Operation::Claim, Fault::CorruptPayload, usize::MAX);
    let a = send(&svc, req(Some("k"), "{}")).await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(a.problem_type().ends_with("#variant.RecordUnreadable"));
    assert_eq!(
        ledger.count(),
        1,
        "an unreadable payload is never taken as absent"
    );
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
