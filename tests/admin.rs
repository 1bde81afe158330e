//! The operator's tools: `store::admin::Admin` on every built-in store and
//! the `idempotency-admin` binary over Redis, Redis Cluster and PostgreSQL.
//! Each command on each state (absent, in flight, completed, outcome
//! unknown, unreadable), its refusals and exit codes, its JSON parsed; an
//! outcome-unknown key made by the sidecar in front of an upstream that
//! resets after the request was sent, then resolved both ways; an
//! unreadable record refused with 500, purged, then executed.

mod common;

use std::time::{Duration, SystemTime};

use axum::body::Body;
use bytes::Bytes;
use common::{Ledger, post, req, send};
use http::{HeaderMap, HeaderValue, StatusCode};
use tower::Layer;
use tower_idempotency::fingerprint::{Fingerprint, FingerprintHasher};
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::admin::{Admin, Purged, Resolution, Resolved, State};
use tower_idempotency::store::{
    Claim, CompletedRecord, MemoryStore, RequestLabel, Store, StoreError,
};
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, Scope};

const LEASE: Duration = Duration::from_secs(60);

fn key(text: &str) -> StoreKey {
    StoreKey::new(
        &Scope::global(),
        &IdempotencyKey::parse(text.as_bytes()).unwrap(),
    )
}

/// A request through the layer that completes its key as "outcome
/// unknown" (the handler says so, as the sidecar does for an upstream that
/// broke off).
fn unknown_outcome(key: &str) -> http::Request<Body> {
    post(Some(key))
        .header("x-policy", "unknown")
        .body(Body::from("{}"))
        .unwrap()
}

/// The layer's fingerprint of `req(_, "{}")`.
fn fingerprint_of_req() -> Fingerprint {
    let uri: http::Uri = "/pay".parse().unwrap();
    let mut hasher = FingerprintHasher::new(&http::Method::POST, &uri, &HeaderMap::new(), &[]);
    hasher.update(b"{}");
    hasher.finish()
}

/// Makes `key` unreadable: a claim of `req(_, "{}")` and a completion
/// whose payload no reader accepts.
pub async fn complete_unreadable<S: Store>(store: &S, key: StoreKey) {
    let fingerprint = fingerprint_of_req();
    let Ok(Claim::Acquired(token)) = store.claim(key, fingerprint, LEASE).await else {
        panic!("a new key is acquired");
    };
    let record = CompletedRecord {
        fingerprint,
        payload: Bytes::from_static(b"not a payload of this crate"),
    };
    store
        .complete(key, token, record, Duration::from_secs(600))
        .await
        .unwrap();
}

/// Every command of the library API on every state, on a memory store.
#[tokio::test]
async fn the_library_api_on_every_state() -> Result<(), StoreError> {
    let store = MemoryStore::new();
    let ledger = Ledger::new();
    let svc = IdempotencyLayer::new(store.clone()).layer(ledger.service());

    let absent = store.inspect(key("nothing")).await?;
    assert_eq!(absent.state, State::Absent);
    assert_eq!(absent.key_hash, key("nothing").to_hex());
    assert_eq!(
        store.purge_entry(key("nothing"), false).await?,
        Purged::Nothing
    );
    assert_eq!(
        store.resolve(key("nothing"), Resolution::Release).await?,
        Resolved::Refused(State::Absent)
    );

    // Completed through the layer: its answer, method and path, times.
    let before = SystemTime::now() - Duration::from_secs(1);
    assert_eq!(
        send(&svc, req(Some("done"), "{}")).await.status,
        StatusCode::CREATED
    );
    let done = store.inspect(key("done")).await?;
    assert_eq!(done.state, State::Completed);
    let answer = done.answer.as_ref().unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);
    assert!(answer.body.starts_with(b"exec-1:"));
    assert_eq!(done.method.as_deref(), Some("POST"));
    assert_eq!(done.path.as_deref(), Some("/pay"));
    assert!(done.claimed_at.unwrap() >= before && done.completed_at.unwrap() >= before);
    assert!(done.expires_in.unwrap() > Duration::from_secs(3600));
    assert_eq!(
        store.resolve(key("done"), Resolution::Release).await?,
        Resolved::Refused(State::Completed),
        "only an outcome-unknown key is resolved"
    );

    // In flight: purge refuses without force.
    let label = RequestLabel::new("PUT", "/orders/7?secret=1");
    let claim = store
        .claim_labelled(key("busy"), Fingerprint::from_bytes([1; 32]), LEASE, &label)
        .await?;
    assert!(matches!(claim, Claim::Acquired(_)));
    let busy = store.inspect(key("busy")).await?;
    assert_eq!(busy.state, State::InFlight);
    assert_eq!(busy.path.as_deref(), Some("/orders/7"), "no query");
    assert!(busy.lease_left.unwrap() > Duration::from_secs(50));
    assert_eq!(
        store.purge_entry(key("busy"), false).await?,
        Purged::RefusedLiveClaim
    );
    assert_eq!(store.inspect(key("busy")).await?.state, State::InFlight);

    // Outcome unknown, resolved both ways.
    for k in ["lost-1", "lost-2"] {
        send(&svc, unknown_outcome(k)).await;
    }
    let lost = store.list(Some(State::OutcomeUnknown), 10).await?;
    assert_eq!(lost.len(), 2);
    assert!(lost[0].claimed_at <= lost[1].claimed_at, "oldest first");
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let answer = Resolution::Respond {
        status: StatusCode::CREATED,
        headers,
        body: Bytes::from_static(b"{\"id\":\"pay_1\"}"),
    };
    assert_eq!(
        store.resolve(key("lost-1"), answer).await?,
        Resolved::Stored
    );
    let executed = ledger.count();
    let retry = send(&svc, unknown_outcome("lost-1")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(&retry.body[..], b"{\"id\":\"pay_1\"}");
    assert_eq!(retry.headers["content-type"], "application/json");
    assert_eq!(
        store.resolve(key("lost-2"), Resolution::Release).await?,
        Resolved::Released
    );
    let retry = send(&svc, req(Some("lost-2"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed());
    assert_eq!(ledger.count(), executed + 1, "the released key executed");

    // Unreadable: refused by the layer until purged.
    complete_unreadable(&store, key("broken")).await;
    let broken = store.inspect(key("broken")).await?;
    assert_eq!(broken.state, State::Unreadable);
    assert!(broken.problem.is_some());
    let refused = send(&svc, req(Some("broken"), "{}")).await;
    assert_eq!(refused.status, StatusCode::INTERNAL_SERVER_ERROR);

    // Listing: every state but absent, by state, with a limit.
    let all = store.list(None, 100).await?;
    let states: Vec<State> = all.iter().map(|s| s.state).collect();
    for state in [State::Completed, State::InFlight, State::Unreadable] {
        assert!(states.contains(&state), "{state} in {states:?}");
    }
    assert!(!states.contains(&State::Absent));
    assert_eq!(store.list(Some(State::Completed), 1).await?.len(), 1);
    assert_eq!(store.list(None, 0).await?.len(), 0);

    assert_eq!(
        store.purge_entry(key("broken"), false).await?,
        Purged::Dropped
    );
    let executed = ledger.count();
    let again = send(&svc, req(Some("broken"), "{}")).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(ledger.count(), executed + 1, "the purged key executed");
    assert_eq!(store.purge_entry(key("busy"), true).await?, Purged::Dropped);
    assert_eq!(store.inspect(key("busy")).await?.state, State::Absent);
    Ok(())
}

#[cfg(feature = "admin")]
#[path = "admin/tool.rs"]
mod tool;

#[cfg(feature = "admin")]
#[path = "admin/redis.rs"]
mod redis_tool;

#[cfg(all(feature = "admin", feature = "sidecar"))]
#[path = "admin/sidecar.rs"]
mod sidecar_tool;
