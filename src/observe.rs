//! Tracing events and metrics, in one place: one event per outcome, and
//! the metrics of docs/observability.md's table (every name, label and
//! meaning there comes from this module).
//!
//! Keys are never logged raw: events carry the first 8 bytes of the store
//! key's digest, which identifies a key in logs without revealing it.
//!
//! Without the `metrics` feature the metric functions compile to nothing:
//! no clock is read for them.

use crate::key::StoreKey;
use crate::problem::ProblemKind;
use crate::store::StoreError;

/// An outcome worth reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// The operation ran and its outcome was stored.
    Executed,
    /// The operation ran; nothing was stored, the key was released.
    Released,
    /// The operation failed, panicked or was cancelled; the key was released.
    Failed,
    /// A stored outcome was replayed.
    Replayed,
    /// A duplicate waited for the in-flight execution and got its outcome.
    Coalesced,
    /// The key was used with a different fingerprint.
    Mismatch,
    /// A duplicate was refused because the key is in flight.
    InFlight,
    /// The lease was found lost while renewing or completing.
    LeaseLost,
    /// A store operation failed.
    StoreError,
    /// The outcome could not be stored after retries.
    CompletionFailed,
    /// The store failed and the request ran unguarded (fail-open).
    FailedOpen,
    /// An earlier execution committed its effect and its outcome is unknown.
    OutcomeUnknown,
}

impl Event {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Event::Executed => "executed",
            Event::Released => "released",
            Event::Failed => "failed",
            Event::Replayed => "replayed",
            Event::Coalesced => "coalesced",
            Event::Mismatch => "mismatch",
            Event::InFlight => "in_flight",
            Event::LeaseLost => "lease_lost",
            Event::StoreError => "store_error",
            Event::CompletionFailed => "completion_failed",
            Event::FailedOpen => "failed_open",
            Event::OutcomeUnknown => "outcome_unknown",
        }
    }
}

/// Reports `event` for `key` (with the store error, if any).
pub(crate) fn event(event: Event, key: &StoreKey, error: Option<&StoreError>) {
    let outcome = event.as_str();
    match event {
        Event::LeaseLost => tracing::warn!(
            key = %key, outcome,
            "idempotency lease lost: another owner may execute this key; this outcome is stored only if nobody took the key over"
        ),
        Event::CompletionFailed => tracing::error!(
            key = %key, outcome, error = error.map(tracing::field::display),
            "idempotency outcome delivered, but the store did not confirm it while the lease lasted; a retry after the lease ends will execute again"
        ),
        Event::FailedOpen => tracing::warn!(
            key = %key, outcome, error = error.map(tracing::field::display),
            "idempotency store failed; executing WITHOUT idempotency (fail-open)"
        ),
        Event::StoreError => tracing::warn!(
            key = %key, outcome, error = error.map(tracing::field::display),
            "idempotency store operation failed"
        ),
        _ => tracing::debug!(key = %key, outcome, "idempotency outcome"),
    }
    #[cfg(feature = "metrics")]
    metrics::counter!("idempotency_events_total", "outcome" => outcome).increment(1);
}

/// Reports a refusal the layer answered itself.
pub(crate) fn refusal(kind: ProblemKind) {
    tracing::debug!(problem = kind.name(), "idempotency refusal");
    #[cfg(feature = "metrics")]
    metrics::counter!("idempotency_refusals_total", "problem" => kind.name()).increment(1);
}

/// Times a store operation (`idempotency_store_operation_seconds
/// {operation}`, from its first poll) and counts its failures
/// (`idempotency_store_errors_total{operation, kind}`). A wrapper that
/// polls the call in place: an `async fn` here would move the store's
/// future (tens of kilobytes in a debug build) through the stack. Without
/// the `metrics` feature it is the call itself.
#[cfg(feature = "metrics")]
pub(crate) fn store_call<F>(operation: &'static str, call: F) -> StoreCall<F> {
    StoreCall {
        call,
        operation,
        started: None,
    }
}

/// Counts a failed store operation that is not timed
/// (`idempotency_store_errors_total{operation, kind}`).
pub(crate) fn store_error(operation: &'static str, error: &StoreError) {
    #[cfg(feature = "metrics")]
    metrics::counter!(
        "idempotency_store_errors_total",
        "operation" => operation,
        "kind" => error.kind().name()
    )
    .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (operation, error);
}

/// Without the `metrics` feature: the call itself, untouched.
#[cfg(not(feature = "metrics"))]
#[inline(always)]
pub(crate) fn store_call<F>(_operation: &'static str, call: F) -> F {
    call
}

#[cfg(feature = "metrics")]
pin_project_lite::pin_project! {
    /// A store call, timed; see [`store_call`].
    pub(crate) struct StoreCall<F> {
        #[pin]
        call: F,
        operation: &'static str,
        started: Option<std::time::Instant>,
    }
}

#[cfg(feature = "metrics")]
impl<T, F> std::future::Future for StoreCall<F>
where
    F: std::future::Future<Output = Result<T, StoreError>>,
{
    type Output = Result<T, StoreError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let started = *this.started.get_or_insert_with(std::time::Instant::now);
        let result = std::task::ready!(this.call.poll(cx));
        let operation = *this.operation;
        metrics::histogram!("idempotency_store_operation_seconds", "operation" => operation)
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            store_error(operation, e);
        }
        std::task::Poll::Ready(result)
    }
}

/// The clock of a duplicate's wait for an in-flight execution: it starts
/// the first time the duplicate finds the key in flight, and records
/// `idempotency_duplicate_wait_seconds` when dropped, however the wait
/// ended (answered, refused, or its caller gone).
#[derive(Debug, Default)]
pub(crate) struct WaitClock(Option<tokio::time::Instant>);

impl WaitClock {
    /// How long the duplicate has waited (starting the clock at the first
    /// call).
    pub(crate) fn waited(&mut self) -> std::time::Duration {
        self.0
            .get_or_insert_with(tokio::time::Instant::now)
            .elapsed()
    }
}

#[cfg(feature = "metrics")]
impl Drop for WaitClock {
    fn drop(&mut self) {
        if let Some(started) = self.0 {
            metrics::histogram!("idempotency_duplicate_wait_seconds")
                .record(started.elapsed().as_secs_f64());
        }
    }
}

/// An execution started: `idempotency_executions_running` goes up.
/// Returns when, for [`execution_ended`] (the clock is read only with the
/// `metrics` feature).
pub(crate) fn execution_started() -> Option<std::time::Instant> {
    #[cfg(feature = "metrics")]
    {
        metrics::gauge!("idempotency_executions_running").increment(1.0);
        Some(std::time::Instant::now())
    }
    #[cfg(not(feature = "metrics"))]
    None
}

/// An execution ended (its key settled), `started` ago:
/// `idempotency_executions_running` goes down and
/// `idempotency_execution_seconds` records how long it ran.
pub(crate) fn execution_ended(started: Option<std::time::Instant>) {
    #[cfg(feature = "metrics")]
    {
        metrics::gauge!("idempotency_executions_running").decrement(1.0);
        if let Some(started) = started {
            metrics::histogram!("idempotency_execution_seconds")
                .record(started.elapsed().as_secs_f64());
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = started;
}

/// A completion attempt failed and will be retried:
/// `idempotency_completion_retries_total`.
pub(crate) fn completion_retry() {
    #[cfg(feature = "metrics")]
    metrics::counter!("idempotency_completion_retries_total").increment(1);
}

/// A key is completed as "outcome unknown" (its response broke off, or
/// its handler said so): `idempotency_outcome_unknown_completions_total`.
pub(crate) fn outcome_unknown_completion() {
    #[cfg(feature = "metrics")]
    metrics::counter!("idempotency_outcome_unknown_completions_total").increment(1);
}

/// `n` orphans were queued for release (positive) or left the queue
/// (negative): `idempotency_orphans_pending`.
#[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
pub(crate) fn orphans_pending(change: f64) {
    #[cfg(feature = "metrics")]
    metrics::gauge!("idempotency_orphans_pending").increment(change);
    #[cfg(not(feature = "metrics"))]
    let _ = change;
}
