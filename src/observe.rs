//! Tracing events and metrics for each outcome, in one place.
//!
//! Keys are never logged raw: events carry the first 8 bytes of the store
//! key's digest, which identifies a key in logs without revealing it.

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
            "idempotency lease lost: another owner may execute this key; this outcome is not stored"
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
