//! The contract of [`Store::wait`]: it wakes on a completion or a release,
//! returns at once when the claim is gone, and gives up at its timeout.

use std::time::Duration;

use super::{
    Instant, LONG_LEASE, LONG_RETENTION, WAKE_BOUND, acquire, check, claim, fp, fresh_key, record,
};
use crate::key::StoreKey;
use crate::store::{Claim, LeaseStatus, Store};

async fn wait_for_change<St: Store>(
    store: &St,
    key: StoreKey,
    change: impl std::future::Future<Output = ()>,
) {
    let Claim::InFlight { fence, .. } = claim(store, key, fp(1)).await else {
        panic!("the key must be in flight");
    };
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            store
                .wait(key, fence, Duration::from_secs(30))
                .await
                .expect("wait failed");
            start.elapsed()
        })
    };
    // Give the waiter time to block; it must still be waiting on the live
    // claim (a wait that returns at once would make the check below pass
    // whatever the store does on a change).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiter.is_finished(),
        "a wait on a live claim returned before the claim changed"
    );
    change.await;
    let waited = tokio::time::timeout(WAKE_BOUND, waiter)
        .await
        .expect("the waiter must wake soon after the change, not at its timeout")
        .expect("waiter task panicked");
    assert!(waited < WAKE_BOUND);
}

/// A waiter wakes when the claim it waits on completes.
pub async fn wait_wakes_on_completion<St: Store>(store: &St) {
    let key = fresh_key();
    let token = acquire(store, key, fp(1), LONG_LEASE).await;
    wait_for_change(store, key, async {
        let s = check(
            "complete",
            store.complete(key, token, record(fp(1), b"done"), LONG_RETENTION),
        )
        .await;
        assert_eq!(s, LeaseStatus::Held);
    })
    .await;
    assert!(matches!(
        claim(store, key, fp(1)).await,
        Claim::Completed(_)
    ));
}

/// A waiter wakes when the claim it waits on is released.
pub async fn wait_wakes_on_release<St: Store>(store: &St) {
    let key = fresh_key();
    let token = acquire(store, key, fp(1), LONG_LEASE).await;
    wait_for_change(store, key, async {
        assert_eq!(
            check("release", store.release(key, token)).await,
            LeaseStatus::Held
        );
    })
    .await;
}

/// Waiting on a claim that is already gone returns at once.
pub async fn wait_returns_at_once_when_the_claim_is_gone<St: Store>(store: &St) {
    let key = fresh_key();
    let start = Instant::now();
    store
        .wait(key, 12345, Duration::from_secs(30))
        .await
        .expect("wait failed");
    let token = acquire(store, key, fp(1), LONG_LEASE).await;
    store
        .wait(key, token.fence().wrapping_add(1), Duration::from_secs(30))
        .await
        .expect("wait failed");
    assert!(
        start.elapsed() < WAKE_BOUND,
        "waiting on a claim that is not there must not block"
    );
}

/// A wait on a live claim ends at its timeout.
pub async fn wait_gives_up_after_its_timeout<St: Store>(store: &St) {
    let key = fresh_key();
    let token = acquire(store, key, fp(1), LONG_LEASE).await;
    let start = Instant::now();
    store
        .wait(key, token.fence(), Duration::from_millis(300))
        .await
        .expect("wait failed");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "the wait ended early ({waited:?}) with the claim still live"
    );
    assert!(
        waited < WAKE_BOUND,
        "the wait outlived its timeout ({waited:?})"
    );
}
