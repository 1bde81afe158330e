//! Helpers of the Redis tests: a store on a test server, warming it up,
//! claiming until acquired, counting script runs, and requests through a
//! ledger service.

use std::time::Duration;

use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::{Claim, RedisStore, Store};

use http::StatusCode;

use super::redis_server::RedisServer;
use super::{Answer, collect, send};

pub async fn store_for(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&server.url()).await.expect("connect")
}

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

pub async fn post_over_http(addr: std::net::SocketAddr, key: &'static str, gate: bool) -> Answer {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let mut req = ledger_request(key, gate);
    *req.uri_mut() = format!("http://{addr}/pay").parse().unwrap();
    let res = client.request(req).await.expect("request");
    collect(res).await
}

/// Loads the scripts and opens the store's connection with one claim.
pub async fn warm_up(store: &RedisStore) {
    let key = StoreKey::from_parts(b"", b"warm");
    store
        .claim(key, Fingerprint::of_bytes(b"x"), Duration::from_secs(1))
        .await
        .unwrap();
}

/// Claims a key until it is acquired, waiting on it meanwhile; returns how
/// long that took, or `None` after `limit`.
pub async fn acquire_within(
    store: &RedisStore,
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

/// The number of script runs the server has counted (`EVALSHA` and `EVAL`).
pub async fn script_runs(server: &RedisServer) -> u64 {
    server.calls("evalsha").await + server.calls("eval").await
}
