//! The metrics of docs/observability.md's table, each checked where it is
//! emitted: store errors by operation and kind, store operation latency,
//! completion retries, executions running and their time, a duplicate's
//! wait, outcome-unknown completions. Each test records into a recorder of
//! its own on a current-thread runtime (the recorder is the thread's), so
//! tests never see each other's figures.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{Ledger, send, test_store};
use http::StatusCode;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshot, Snapshotter};
use tokio::sync::Notify;
use tower::Layer;
use tower_idempotency::IdempotencyLayer;
use tower_idempotency::engine::{Engine, EngineError, Outcome};
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::fault::{Fault, Operation};

const FP: Fingerprint = Fingerprint::from_bytes([9; 32]);

/// Runs `test` on a current-thread runtime (paused clock) with a recorder
/// of its own; returns what was recorded. `test` gets a snapshotter to
/// look while it runs (a snapshot takes the histograms' samples with it).
fn recorded<F: Future<Output = ()>>(
    test: impl FnOnce(Snapshotter) -> F,
) -> Vec<(String, Labels, DebugValue)> {
    recorded_on(true, test)
}

/// [`recorded`], on a clock that is paused or not.
///
/// A snapshot drains what it reads: after one taken during the test, the
/// final snapshot holds what changed since (a gauge's change, not its
/// value).
fn recorded_on<F: Future<Output = ()>>(
    paused: bool,
    test: impl FnOnce(Snapshotter) -> F,
) -> Vec<(String, Labels, DebugValue)> {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(paused)
        .build()
        .expect("a runtime");
    let during = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || runtime.block_on(test(during)));
    flatten(snapshotter.snapshot())
}

type Labels = Vec<(String, String)>;

fn flatten(snapshot: Snapshot) -> Vec<(String, Labels, DebugValue)> {
    snapshot
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (key.name().to_owned(), labels, value)
        })
        .collect()
}

/// The value recorded under `name` with exactly `labels`.
fn value<'a>(
    recorded: &'a [(String, Labels, DebugValue)],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<&'a DebugValue> {
    recorded.iter().find_map(|(n, l, v)| {
        let same = l.len() == labels.len()
            && labels
                .iter()
                .all(|(k, want)| l.iter().any(|(lk, lv)| lk == k && lv == want));
        (n == name && same).then_some(v)
    })
}

fn counter(recorded: &[(String, Labels, DebugValue)], name: &str, labels: &[(&str, &str)]) -> u64 {
    match value(recorded, name, labels) {
        Some(DebugValue::Counter(n)) => *n,
        None => 0,
        Some(other) => panic!("{name} is not a counter: {other:?}"),
    }
}

fn samples(
    recorded: &[(String, Labels, DebugValue)],
    name: &str,
    labels: &[(&str, &str)],
) -> usize {
    match value(recorded, name, labels) {
        Some(DebugValue::Histogram(samples)) => samples.len(),
        None => 0,
        Some(other) => panic!("{name} is not a histogram: {other:?}"),
    }
}

fn gauge(recorded: &[(String, Labels, DebugValue)], name: &str) -> f64 {
    match value(recorded, name, &[]) {
        Some(DebugValue::Gauge(g)) => g.into_inner(),
        other => panic!("{name} is not a gauge: {other:?}"),
    }
}

fn key(name: &str) -> StoreKey {
    StoreKey::from_parts(b"metrics", name.as_bytes())
}

#[test]
fn store_errors_are_counted_by_operation_and_kind_and_completions_retried() {
    let recorded = recorded(|_| async {
        let store = test_store();
        let engine = Engine::new(store.clone());
        store.inject(Operation::Claim, Fault::FailBefore, 1);
        let refused = engine
            .run_stored(key("a"), FP, |_| async {
                Ok::<_, std::io::Error>(Bytes::new())
            })
            .await;
        assert!(matches!(refused, Err(EngineError::Store(_))));
        // Two failed completions, retried, then stored.
        store.inject(Operation::Complete, Fault::FailBefore, 2);
        let ran = engine
            .run_stored(key("b"), FP, |_| async {
                Ok::<_, std::io::Error>(Bytes::from_static(b"paid"))
            })
            .await;
        assert!(matches!(ran, Ok(Outcome::Executed(_))), "{ran:?}");
    });
    let errors = |operation, kind| {
        counter(
            &recorded,
            "idempotency_store_errors_total",
            &[("operation", operation), ("kind", kind)],
        )
    };
    assert_eq!(errors("claim", "unavailable"), 1);
    assert_eq!(errors("complete", "unavailable"), 2);
    assert_eq!(
        counter(&recorded, "idempotency_completion_retries_total", &[]),
        2
    );
    let timed = |operation| {
        samples(
            &recorded,
            "idempotency_store_operation_seconds",
            &[("operation", operation)],
        )
    };
    assert_eq!(timed("claim"), 2, "failures are timed too");
    assert_eq!(timed("complete"), 3);
    assert_eq!(samples(&recorded, "idempotency_execution_seconds", &[]), 1);
    assert_eq!(gauge(&recorded, "idempotency_executions_running"), 0.0);
    assert_eq!(
        counter(
            &recorded,
            "idempotency_events_total",
            &[("outcome", "executed")]
        ),
        1
    );
}

#[test]
fn a_duplicate_wait_is_timed_and_running_executions_counted() {
    let recorded = recorded(|now| async move {
        let engine = Engine::new(test_store());
        let (entered, proceed) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let first = tokio::spawn({
            let (engine, entered, proceed) = (engine.clone(), entered.clone(), proceed.clone());
            async move {
                engine
                    .run_stored(key("dup"), FP, move |_| async move {
                        entered.notify_one();
                        proceed.notified().await;
                        Ok::<_, std::io::Error>(Bytes::from_static(b"once"))
                    })
                    .await
            }
        });
        entered.notified().await;
        assert_eq!(
            gauge(&flatten(now.snapshot()), "idempotency_executions_running"),
            1.0,
            "the gauge counts the execution while it runs"
        );
        let duplicate = tokio::spawn({
            let engine = engine.clone();
            async move {
                engine
                    .run_stored(key("dup"), FP, |_| async {
                        Ok::<_, std::io::Error>(Bytes::new())
                    })
                    .await
            }
        });
        // The paused clock moves only when every task waits: the duplicate
        // is then waiting on the key.
        tokio::time::sleep(Duration::from_millis(200)).await;
        proceed.notify_one();
        assert!(first.await.unwrap().is_ok());
        let coalesced = duplicate.await.unwrap();
        assert!(
            matches!(coalesced, Ok(Outcome::Replayed { .. })),
            "{coalesced:?}"
        );
    });
    assert_eq!(
        samples(&recorded, "idempotency_duplicate_wait_seconds", &[]),
        1
    );
    assert_eq!(
        gauge(&recorded, "idempotency_executions_running"),
        -1.0,
        "down by one since the snapshot that read 1: back to none running"
    );
    assert_eq!(
        counter(
            &recorded,
            "idempotency_events_total",
            &[("outcome", "coalesced")]
        ),
        1
    );
}

#[test]
fn an_outcome_unknown_completion_is_counted() {
    let recorded = recorded(|_| async {
        let ledger = Ledger::new();
        let svc = IdempotencyLayer::new(test_store()).layer(ledger.service());
        let req = || {
            common::post(Some("unknown"))
                .header("x-policy", "unknown")
                .body(axum::body::Body::from("{}"))
                .unwrap()
        };
        assert_eq!(send(&svc, req()).await.status, StatusCode::CREATED);
        let refused = send(&svc, req()).await;
        assert_eq!(refused.status, StatusCode::CONFLICT);
    });
    assert_eq!(
        counter(
            &recorded,
            "idempotency_outcome_unknown_completions_total",
            &[]
        ),
        1
    );
    assert_eq!(
        counter(
            &recorded,
            "idempotency_refusals_total",
            &[("problem", "outcome_unknown")]
        ),
        1
    );
}

/// Orphans waiting for their release are a gauge: up while the server is
/// frozen (the claims' replies never came back), back to zero once it
/// answers and the releases are done.
#[cfg(feature = "redis")]
#[test]
fn orphans_pending_rise_during_an_outage_and_fall_after_it() {
    use tower_idempotency::store::{RedisStore, Store};
    let Some(server) = common::redis_server::redis_or_skip("orphans gauge") else {
        return;
    };
    let recorded = recorded_on(false, |now| async move {
        let store = RedisStore::builder(&server.url())
            .unwrap()
            .operation_timeout(Duration::from_millis(100))
            .build()
            .await
            .unwrap();
        common::redis_store::warm_up(&store).await;
        server.freeze();
        for n in 0..3u8 {
            let lost = store
                .claim(key(&format!("orphan-{n}")), FP, Duration::from_secs(60))
                .await;
            assert!(lost.is_err(), "Redis is frozen");
        }
        assert_eq!(
            gauge(&flatten(now.snapshot()), "idempotency_orphans_pending"),
            3.0
        );
        server.thaw();
        common::eventually(Duration::from_secs(10), "the releases are done", || async {
            store.orphans_pending() == 0
        })
        .await;
    });
    assert_eq!(
        gauge(&recorded, "idempotency_orphans_pending"),
        -3.0,
        "down by three since the snapshot that read 3: none pending"
    );
}

/// The running gauge comes back down however an execution ends: its
/// operation panicking, or its caller going away while it runs (it goes on
/// detached, and ends later).
#[test]
fn the_running_gauge_comes_back_down_after_a_panic_and_a_dropped_caller() {
    let recorded = recorded_on(false, |_| async move {
        let engine = Engine::new(test_store());
        let panicked = tokio::spawn({
            let engine = engine.clone();
            async move {
                engine
                    .run_stored(key("panics"), FP, |_| async {
                        if key("panics") == key("panics") {
                            panic!("the operation panics on purpose");
                        }
                        Ok::<_, std::io::Error>(Bytes::new())
                    })
                    .await
            }
        });
        assert!(panicked.await.unwrap_err().is_panic());
        let (entered, proceed) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let caller = tokio::spawn({
            let (engine, entered, proceed) = (engine.clone(), entered.clone(), proceed.clone());
            async move {
                engine
                    .run_stored(key("dropped"), FP, move |_| async move {
                        entered.notify_one();
                        proceed.notified().await;
                        Ok::<_, std::io::Error>(Bytes::from_static(b"late"))
                    })
                    .await
            }
        });
        entered.notified().await;
        caller.abort();
        let _ = caller.await;
        assert_eq!(engine.executions().running(), 1, "it goes on detached");
        proceed.notify_one();
        tokio::time::timeout(Duration::from_secs(10), engine.executions().wait_idle())
            .await
            .expect("the detached execution ends");
    });
    assert_eq!(gauge(&recorded, "idempotency_executions_running"), 0.0);
    assert_eq!(
        samples(&recorded, "idempotency_execution_seconds", &[]),
        2,
        "both were timed"
    );
}
