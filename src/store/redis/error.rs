//! Redis's errors, judged and named: which provably left the key alone,
//! and what kind of failure each is.

use redis::{RedisError, Value};

use crate::store::remote::call::Cause;
use crate::store::{StoreError, StoreErrorKind};

impl Cause for RedisError {
    /// A refused connection never carried the command, and Redis answers
    /// an error only for a script it did not run or that failed before its
    /// first write (the scripts validate first).
    fn unapplied(&self) -> bool {
        self.is_connection_refusal() || self.code().is_some()
    }

    fn answered(&self) -> bool {
        self.code().is_some()
    }

    fn timed_out(&self) -> bool {
        self.is_timeout()
    }

    fn into_store_error(self, op: &'static str) -> StoreError {
        let kind = match self.code() {
            Some("IDEM_CORRUPT" | "WRONGTYPE") => StoreErrorKind::Corrupt,
            Some("OOM") => StoreErrorKind::CapacityExceeded,
            _ if self.is_timeout() => StoreErrorKind::Timeout,
            _ => StoreErrorKind::Unavailable,
        };
        StoreError::new(kind, op).with_source(self)
    }
}

/// A reply no script of this store gives.
pub(super) fn corrupt(op: &'static str, reply: &Value) -> StoreError {
    StoreError::new(StoreErrorKind::Corrupt, op)
        .with_source(format!("unexpected reply from Redis: {reply:?}"))
}
