//! Helpers of the Redis tests: a store on a test server, warming it up,
//! counting script runs, and ledger requests over HTTP.

use std::time::Duration;

use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::{RedisStore, Store};

use super::redis_server::RedisServer;
use super::{Answer, collect, ledger_request};

pub async fn store_for(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&server.url()).await.expect("connect")
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

/// The number of script runs the server has counted (`EVALSHA` and `EVAL`).
pub async fn script_runs(server: &RedisServer) -> u64 {
    server.calls("evalsha").await + server.calls("eval").await
}

/// The Redis key name `store` uses for the client's key `key` (global
/// scope).
pub fn store_key_name(store: &RedisStore, key: &str) -> String {
    store.key_name(StoreKey::new(
        &tower_idempotency::Scope::global(),
        &tower_idempotency::IdempotencyKey::parse(key.as_bytes()).expect("a valid key"),
    ))
}
