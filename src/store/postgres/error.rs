//! PostgreSQL's errors, judged and named: which provably left the key
//! alone, and what kind of failure each is.

use deadpool_postgres::PoolError;
use tokio_postgres::error::SqlState;

use crate::store::remote::call::Cause;
use crate::store::{StoreError, StoreErrorKind};

/// A failed statement, before it is named for an operation.
pub(super) enum PgError {
    /// No connection from the pool (nothing was sent).
    Pool(PoolError),
    /// The statement failed.
    Database(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgError::Database(e)
    }
}

impl Cause for PgError {
    /// No connection was had from the pool (nothing was sent), or the
    /// server answered with an error (the statement's own transaction
    /// rolled back). A broken connection leaves it unknown.
    fn unapplied(&self) -> bool {
        match self {
            PgError::Database(e) => e.code().is_some(),
            PgError::Pool(_) => true,
        }
    }

    fn answered(&self) -> bool {
        matches!(self, PgError::Database(e) if e.code().is_some())
    }

    fn into_store_error(self, op: &'static str) -> StoreError {
        match self {
            #[cfg(feature = "tls")]
            PgError::Pool(PoolError::Backend(e)) | PgError::Database(e)
                if crate::store::tls::is_a_certificate_error(&e) =>
            {
                StoreError::new(StoreErrorKind::Unavailable, op).with_source(format!(
                    "the PostgreSQL server's TLS certificate did not verify: {}",
                    crate::store::error_chain(&e)
                ))
            }
            PgError::Pool(PoolError::Backend(e)) | PgError::Database(e) => {
                let kind = match e.code() {
                    Some(code) if *code == SqlState::QUERY_CANCELED => StoreErrorKind::Timeout,
                    _ => StoreErrorKind::Unavailable,
                };
                StoreError::new(kind, op).with_source(e)
            }
            PgError::Pool(PoolError::Timeout(_)) => StoreError::new(StoreErrorKind::Timeout, op)
                .with_source("no pooled connection in time"),
            PgError::Pool(e) => StoreError::new(StoreErrorKind::Unavailable, op).with_source(e),
        }
    }
}

/// A setting the store cannot work with.
pub(super) fn configure_error(e: impl Into<crate::BoxError>) -> StoreError {
    StoreError::configuration(e)
}

/// A row no statement of this store returns.
pub(super) fn corrupt(op: &'static str, e: impl Into<crate::BoxError>) -> StoreError {
    StoreError::new(StoreErrorKind::Corrupt, op).with_source(e)
}
