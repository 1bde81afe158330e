//! `RedisStore` against a real `redis-server` started per test.

mod common;

use std::time::Duration;

use common::redis_server::{RedisServer, redis_or_skip};
use tower_idempotency::store::{RedisStore, conformance};

async fn store_for(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&server.url()).await.expect("connect")
}

macro_rules! conformance_on_redis {
    ($($check:ident),+ $(,)?) => {
        mod conformance_on_redis {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let Some(server) = redis_or_skip(stringify!($check)) else { return };
                    conformance::$check(&store_for(&server).await).await;
                }
            )+
        }
    };
}

conformance_on_redis!(
    claim_is_exclusive_under_a_race,
    completed_records_are_replayed_exactly,
    complete_is_fenced_and_idempotent,
    expired_lease_is_taken_over_with_a_higher_fence,
    extend_keeps_a_claim_alive,
    extend_never_resurrects_an_expired_claim,
    release_frees_the_key_for_its_owner_only,
    records_expire_after_retention,
    wait_wakes_on_completion,
    wait_wakes_on_release,
    wait_returns_at_once_when_the_claim_is_gone,
    wait_gives_up_after_its_timeout,
    purge_drops_claims_and_records,
    keys_are_independent,
);

#[tokio::test]
async fn a_prefix_with_braces_is_refused() {
    let err = RedisStore::builder("redis://127.0.0.1:1")
        .unwrap()
        .prefix("a{b}")
        .build()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("prefix"));
}
