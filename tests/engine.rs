//! The engine on its own: leases, heartbeats, detachment, coalescing.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{TestStore, test_store};
use tokio::sync::Notify;
use tower_idempotency::engine::{Completion, Engine, EngineError, InFlightPolicy, Outcome};
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::fault::{Fault, Operation};
use tower_idempotency::store::{Claim, Store};

const FP: Fingerprint = Fingerprint::from_bytes([1; 32]);

fn key(name: &str) -> StoreKey {
    StoreKey::from_parts(b"engine-tests", name.as_bytes())
}

#[tokio::test(start_paused = true)]
async fn the_lease_is_renewed_while_a_slow_operation_runs() {
    let store = test_store();
    let lease = Duration::from_millis(300);
    let engine = Engine::new(store.clone())
        .lease(lease)
        .in_flight_policy(InFlightPolicy::Reject);
    let runs = Arc::new(AtomicUsize::new(0));
    let slow = {
        let (engine, runs) = (engine.clone(), runs.clone());
        tokio::spawn(async move {
            engine
                .run_stored(key("slow"), FP, move |_| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(3)).await; // ten leases
                    Ok::<_, std::io::Error>(Bytes::from_static(b"done"))
                })
                .await
        })
    };
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let dup = engine
            .run_stored(key("slow"), FP, |_| async {
                Ok::<_, std::io::Error>(Bytes::new())
            })
            .await;
        assert!(
            matches!(dup, Err(EngineError::InFlight)),
            "the slow owner keeps its claim: {dup:?}"
        );
    }
    let out = slow.await.unwrap().unwrap();
    assert_eq!(out, Outcome::Executed(Bytes::from_static(b"done")));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let replay = engine
        .run_stored(key("slow"), FP, |_| async {
            Ok::<_, std::io::Error>(Bytes::new())
        })
        .await;
    assert!(matches!(replay, Ok(Outcome::Replayed { .. })));
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_is_reported_and_the_outcome_not_stored() {
    let store = test_store();
    let engine = Engine::new(store.clone()).lease(Duration::from_millis(300));
    let proceed = Arc::new(Notify::new());
    let started = Arc::new(Notify::new());
    let run = {
        let (engine, proceed, started) = (engine.clone(), proceed.clone(), started.clone());
        tokio::spawn(async move {
            engine
                .run(key("lost"), FP, move |ctx| async move {
                    started.notify_one();
                    proceed.notified().await;
                    Ok::<_, std::io::Error>((
                        ctx.lease_lost(),
                        Completion::Store(Bytes::from_static(b"stale")),
                    ))
                })
                .await
        })
    };
    started.notified().await;
    // An operator purges the key (as a Redis that restarts empty would):
    // the owner's next renewal finds its claim gone.
    assert!(store.purge(key("lost")).await.unwrap());
    // The clock is paused: 250 ms later the renewals at a third and two
    // thirds of the 300 ms lease are due, and have run.
    tokio::time::sleep(Duration::from_millis(250)).await;
    proceed.notify_one();
    let out = run.await.unwrap().unwrap();
    assert_eq!(
        out,
        Outcome::Executed(true),
        "the operation saw its lease lost"
    );
    let claim = store
        .claim(key("lost"), FP, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(
        matches!(claim, Claim::Acquired(_)),
        "the stale outcome was not stored: {claim:?}"
    );
}

type Caller = tokio::task::JoinHandle<Result<Outcome<Bytes>, EngineError<std::io::Error>>>;

/// Starts `run_stored` on its own task with an operation that returns
/// `payload` once `proceed` is notified; returns when the operation is running.
async fn start_held(
    engine: &Engine<TestStore>,
    name: &'static str,
    payload: &'static [u8],
) -> (Caller, Arc<Notify>) {
    let proceed = Arc::new(Notify::new());
    let started = Arc::new(Notify::new());
    let caller = {
        let (engine, proceed, started) = (engine.clone(), proceed.clone(), started.clone());
        tokio::spawn(async move {
            engine
                .run_stored(key(name), FP, move |_| async move {
                    started.notify_one();
                    proceed.notified().await;
                    Ok::<_, std::io::Error>(Bytes::from_static(payload))
                })
                .await
        })
    };
    started.notified().await;
    (caller, proceed)
}

#[tokio::test]
async fn dropping_the_caller_detaches_the_execution() {
    let engine = Engine::new(test_store());
    let (caller, proceed) = start_held(&engine, "detach", b"finished").await;
    caller.abort();
    proceed.notify_one();
    let replay = engine
        .run_stored(key("detach"), FP, |_| async {
            Ok::<_, std::io::Error>(Bytes::from_static(b"second"))
        })
        .await
        .unwrap();
    assert_eq!(
        replay,
        Outcome::Replayed {
            payload: Bytes::from_static(b"finished"),
            coalesced: true
        }
    );
}

/// The waiter is woken by the release itself: on a paused clock, it runs
/// at the instant of the release, not at the end of its 10 s wait or of
/// the 30 s lease.
#[tokio::test(start_paused = true)]
async fn a_waiter_executes_itself_when_the_first_execution_releases() {
    let store = test_store();
    let engine = Engine::new(store.clone());
    let proceed = Arc::new(Notify::new());
    let started = Arc::new(Notify::new());
    let first = {
        let (engine, proceed, started) = (engine.clone(), proceed.clone(), started.clone());
        tokio::spawn(async move {
            engine
                .run(key("handover"), FP, move |_| async move {
                    started.notify_one();
                    proceed.notified().await;
                    Ok::<_, std::io::Error>(("failed", Completion::Release))
                })
                .await
        })
    };
    started.notified().await;
    let second = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let ran = engine
                .run(key("handover"), FP, |_| async {
                    Ok::<_, std::io::Error>(("ok", Completion::Store(Bytes::new())))
                })
                .await;
            (ran, tokio::time::Instant::now())
        })
    };
    // The waiter is registered once its wait was called.
    store.until_calls(Operation::Wait, 1).await;
    let released = tokio::time::Instant::now();
    proceed.notify_one();
    assert_eq!(first.await.unwrap().unwrap(), Outcome::Executed("failed"));
    let (ran, at) = second.await.unwrap();
    assert_eq!(
        ran.unwrap(),
        Outcome::Executed("ok"),
        "the waiter re-claimed and ran"
    );
    assert!(
        at - released < Duration::from_millis(100),
        "the waiter woke {:?} after the release",
        at - released
    );
}

#[tokio::test]
async fn a_fresh_owner_token_fences_each_grant() {
    let engine = Engine::new(test_store());
    let mut fences = Vec::new();
    for _ in 0..3 {
        let fence = engine
            .run(key("fences"), FP, |ctx| async move {
                Ok::<_, std::io::Error>((ctx.owner_token().fence(), Completion::Release))
            })
            .await
            .unwrap();
        let Outcome::Executed(fence) = fence else {
            panic!("released runs execute")
        };
        fences.push(fence);
    }
    assert!(
        fences.windows(2).all(|w| w[0] < w[1]),
        "fences grow: {fences:?}"
    );
}

#[tokio::test]
async fn executions_can_be_awaited_at_shutdown() {
    let engine = Engine::new(test_store());
    let (caller, proceed) = start_held(&engine, "shutdown", b"stored").await;
    caller.abort(); // the client went away; the execution is detached
    assert_eq!(engine.executions().running(), 1);
    let idle = tokio::spawn({
        let engine = engine.clone();
        async move { engine.executions().wait_idle().await }
    });
    // Nothing to wait for: the execution is held until `proceed`, so
    // `wait_idle` must not return. 50 ms is ample for a wait that did not
    // wait at all (it would return at its first poll).
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!idle.is_finished(), "still running");
    proceed.notify_one();
    tokio::time::timeout(Duration::from_secs(5), idle)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(engine.executions().running(), 0);
    let replay = engine
        .run_stored(key("shutdown"), FP, |_| async {
            Ok::<_, std::io::Error>(Bytes::new())
        })
        .await;
    assert!(
        matches!(replay, Ok(Outcome::Replayed { .. })),
        "the result was stored before idle"
    );
}

/// A store outage of many seconds as the operation finishes (a Redis
/// restart, a failover, `CLIENT PAUSE`): the completion is retried with
/// backoff while the lease keeps being renewed, so a duplicate waits
/// instead of executing, and the result is stored once the store is back.
#[tokio::test(start_paused = true)]
async fn a_short_store_outage_at_completion_does_not_lose_the_result() {
    let store = test_store();
    let lease = Duration::from_millis(900);
    let engine = Engine::new(store.clone())
        .lease(lease)
        .in_flight_policy(InFlightPolicy::Wait(Duration::from_secs(60)));
    let runs = Arc::new(AtomicUsize::new(0));
    // About 10 s of failed completions with the backoff capped at 1 s:
    // more than ten leases.
    store.inject(Operation::Complete, Fault::FailBefore, 18);
    let (first, proceed) = start_held(&engine, "outage", b"charged").await;
    proceed.notify_one();
    // While the completion fails, a duplicate arrives and waits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let duplicate = {
        let (engine, runs) = (engine.clone(), runs.clone());
        tokio::spawn(async move {
            engine
                .run_stored(key("outage"), FP, move |_| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(Bytes::from_static(b"again"))
                })
                .await
        })
    };
    let first = first.await.unwrap().unwrap();
    assert_eq!(first, Outcome::Executed(Bytes::from_static(b"charged")));
    let duplicate = duplicate.await.unwrap().unwrap();
    assert_eq!(
        duplicate.value(),
        &Bytes::from_static(b"charged"),
        "the duplicate waited for the stored result: {duplicate:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0, "nothing ran twice");
    // Long after the lease, a retry still replays.
    tokio::time::sleep(lease * 10).await;
    let retry = engine
        .run_stored(key("outage"), FP, |_| async {
            Ok::<_, std::io::Error>(Bytes::from_static(b"again"))
        })
        .await
        .unwrap();
    assert_eq!(retry.value(), &Bytes::from_static(b"charged"));
}

/// The completion took effect but its reply never came back, several times,
/// for longer than a lease: a renewal then finds the claim gone (it
/// completed), and the next completion attempt confirms the record instead
/// of giving up.
#[tokio::test(start_paused = true)]
async fn a_completion_whose_replies_are_lost_is_confirmed_by_its_retry() {
    let store = test_store();
    let lease = Duration::from_millis(300);
    let engine = Engine::new(store.clone()).lease(lease);
    store.inject(Operation::Complete, Fault::LoseReply, 6);
    let (first, proceed) = start_held(&engine, "lost-reply", b"charged").await;
    proceed.notify_one();
    assert_eq!(
        first.await.unwrap().unwrap(),
        Outcome::Executed(Bytes::from_static(b"charged"))
    );
    tokio::time::sleep(lease * 10).await;
    let retry = engine
        .run_stored(key("lost-reply"), FP, |_| async {
            Ok::<_, std::io::Error>(Bytes::from_static(b"again"))
        })
        .await
        .unwrap();
    assert!(matches!(retry, Outcome::Replayed { .. }), "{retry:?}");
    assert_eq!(retry.value(), &Bytes::from_static(b"charged"));
}

/// Renewals that fail for longer than the lease mean another process may
/// own the key now: the operation learns that its lease is lost.
#[tokio::test(start_paused = true)]
async fn lease_lost_turns_true_when_renewals_fail_for_longer_than_the_lease() {
    let store = test_store();
    let lease = Duration::from_millis(300);
    let engine = Engine::new(store.clone()).lease(lease);
    store.inject(Operation::Extend, Fault::FailBefore, usize::MAX);
    let started = tokio::time::Instant::now();
    let out = engine
        .run(key("renewals-fail"), FP, move |ctx| async move {
            while !ctx.lease_lost() && started.elapsed() < lease * 20 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok::<_, std::io::Error>((started.elapsed(), Completion::Release))
        })
        .await
        .unwrap();
    let Outcome::Executed(noticed) = out else {
        panic!("{out:?}")
    };
    assert!(
        noticed >= lease && noticed < lease * 2,
        "the loss was noticed after {noticed:?}, with a lease of {lease:?}"
    );
}
