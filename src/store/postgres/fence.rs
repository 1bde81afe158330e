//! [`PostgresStore::fence`]: the key marked "effect committed" inside the
//! handler's own transaction.

use tokio_postgres::types::Type;

use super::PostgresStore;
use super::row::{fence_param, nonce_param};
use crate::engine::ExecutionContext;

/// Why [`PostgresStore::fence`] refused to mark the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FenceError {
    /// This execution no longer owns the key (its lease expired and another
    /// execution took it over, or the key was purged): roll the transaction
    /// back.
    #[error("this execution no longer owns its idempotency key; roll the transaction back")]
    Lost,
    /// The statement failed (roll back too).
    #[error("the idempotency fence statement failed")]
    Database(#[from] tokio_postgres::Error),
}

impl PostgresStore {
    /// Marks the key of `execution` "effect committed" inside `tx`, if the
    /// execution still owns it; see [the type's docs](Self#exactly-once-effects-inside-the-database).
    ///
    /// Call it in the transaction that writes the handler's business rows,
    /// after them and before committing: it locks the key's row until the
    /// transaction ends (a takeover waits for it), and costs one round
    /// trip. On [`FenceError::Lost`], roll back.
    pub async fn fence(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        execution: &ExecutionContext,
    ) -> Result<(), FenceError> {
        let key = execution.store_key();
        let token = execution.owner_token();
        let rows = tx
            .query_typed(
                &self.inner.sql.fence,
                &[
                    (&key.as_bytes().as_slice(), Type::BYTEA),
                    (&fence_param(token), Type::INT8),
                    (&nonce_param(token), Type::INT8),
                ],
            )
            .await?;
        if rows.is_empty() {
            Err(FenceError::Lost)
        } else {
            Ok(())
        }
    }
}
