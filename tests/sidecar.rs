//! The sidecar in front of a real upstream HTTP server, over loopback:
//! duplicates, outcomes, renewal, waiting, shutdown, gRPC. What it does
//! with connections and proxy headers is in `sidecar_connections.rs`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use bytes::Bytes;
use common::Answer;
use common::redis_server::redis_or_skip;
use common::sidecar::*;
use http::Request;
use http_body_util::BodyExt;
use tokio::net::TcpListener;
use tower_idempotency::IdempotencyLayer;
use tower_idempotency::sidecar::{self};
use tower_idempotency::store::{MemoryStore, RedisStore};

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
    // The passing of leases is the point: a duplicate every 400 ms, 1.2 s
    // in all (four leases of 300 ms), finds the claim still held.
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

/// Readiness probes share one ping: many at once cost the store one, an
/// answer serves the probes of the next second, and a store that stops
/// answering turns the check to 503 within about that second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_probes_share_one_ping_a_second() {
    use tower_idempotency::store::fault::{FaultStore, Operation};

    let (up_addr, _) = start_upstream().await;
    let store = FaultStore::new(MemoryStore::new());
    let car = Sidecar::start(IdempotencyLayer::new(store.clone()), config(up_addr)).await;
    let ready = move || async move {
        client()
            .get(
                format!("http://{}{}", car.addr, sidecar::DEFAULT_READY_PATH)
                    .parse()
                    .unwrap(),
            )
            .await
            .map(|res| res.status())
            .unwrap_or(StatusCode::BAD_GATEWAY)
    };
    let probes: Vec<_> = (0..20).map(|_| tokio::spawn(ready())).collect();
    for probe in probes {
        assert_eq!(probe.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(store.calls(Operation::Ping), 1, "twenty probes, one ping");
    store.fail_all();
    common::eventually(Duration::from_secs(5), "not ready", || async {
        ready().await == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    store.clear();
    common::eventually(Duration::from_secs(5), "ready again", || async {
        ready().await == StatusCode::OK
    })
    .await;
    assert!(
        store.calls(Operation::Ping) <= 8,
        "about one ping a second: {}",
        store.calls(Operation::Ping)
    );
}

/// A health or readiness path the sidecar could never answer is refused
/// before it serves.
#[tokio::test]
async fn paths_it_could_not_answer_are_refused_at_start() {
    let cases = [
        config("127.0.0.1:9".parse().unwrap()).ready_path(""),
        config("127.0.0.1:9".parse().unwrap()).ready_path("ready"),
        config("127.0.0.1:9".parse().unwrap()).health_path("health"),
        config("127.0.0.1:9".parse().unwrap()).ready_path(sidecar::DEFAULT_HEALTH_PATH),
    ];
    for config in cases {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let served = tokio::time::timeout(
            Duration::from_secs(5),
            sidecar::serve(
                listener,
                IdempotencyLayer::new(MemoryStore::new()),
                config,
                async {},
            ),
        )
        .await
        .expect("refused at once");
        let error = served.expect_err("refused");
        assert!(
            matches!(error, sidecar::SidecarError::InvalidPath { .. }),
            "{error}"
        );
    }
}
