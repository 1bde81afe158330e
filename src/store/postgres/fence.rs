//! [`PostgresStore::fence`]: the key marked "effect committed" inside the
//! handler's own transaction.

use std::future::Future;

use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

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

/// The types of the fence statement's parameters: the key, the fence and
/// the nonce.
const FENCE_TYPES: [Type; 3] = [Type::BYTEA, Type::INT8, Type::INT8];

/// A transaction [`PostgresStore::fence`] can mark a key in.
///
/// - deadpool-postgres's [`Transaction`](deadpool_postgres::Transaction)
///   (what `client.transaction()` gives on a pooled connection): the fence
///   statement is prepared once per connection, in the pool's statement
///   cache, as the store's own statements are. Pass this one when you have
///   it.
/// - tokio-postgres's [`Transaction`](tokio_postgres::Transaction): the
///   statement goes unnamed, and the server parses and plans it each time
///   (about 80 µs of the server's CPU per call, measured on a small
///   machine), in the same single round trip.
///
/// The trait is sealed: these are the two transactions it knows.
pub trait FenceTransaction: Sync + sealed::Sealed {
    /// Runs the fence statement `sql` with its three `params` and answers
    /// its rows. Not for calling directly: [`PostgresStore::fence`] does.
    #[doc(hidden)]
    fn fence_rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync); 3],
    ) -> impl Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for tokio_postgres::Transaction<'_> {}
    impl Sealed for deadpool_postgres::Transaction<'_> {}
}

impl FenceTransaction for tokio_postgres::Transaction<'_> {
    async fn fence_rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync); 3],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let [key, fence, nonce] = *params;
        self.query_typed(
            sql,
            &[
                (key, FENCE_TYPES[0].clone()),
                (fence, FENCE_TYPES[1].clone()),
                (nonce, FENCE_TYPES[2].clone()),
            ],
        )
        .await
    }
}

impl FenceTransaction for deadpool_postgres::Transaction<'_> {
    async fn fence_rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync); 3],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let statement = self.prepare_typed_cached(sql, &FENCE_TYPES).await?;
        self.query(&statement, params).await
    }
}

impl PostgresStore {
    /// Marks the key of `execution` "effect committed" inside `tx`, if the
    /// execution still owns it; see [the type's docs](Self#exactly-once-effects-inside-the-database).
    ///
    /// Call it in the transaction that writes the handler's business rows,
    /// after them and before committing: it locks the key's row until the
    /// transaction ends (a takeover waits for it), and costs one round
    /// trip (two the first time on a connection with deadpool's
    /// transaction, which prepares the statement then). On
    /// [`FenceError::Lost`], roll back. `tx` is a tokio-postgres
    /// or deadpool-postgres transaction ([`FenceTransaction`]); with
    /// deadpool's, the statement is prepared once per connection.
    pub async fn fence<T: FenceTransaction>(
        &self,
        tx: &T,
        execution: &ExecutionContext,
    ) -> Result<(), FenceError> {
        let key = execution.store_key();
        let token = execution.owner_token();
        let key = key.as_bytes().as_slice();
        let (fence, nonce) = (fence_param(token), nonce_param(token));
        let rows = tx
            .fence_rows(&self.inner.sql.fence, &[&key, &fence, &nonce])
            .await?;
        if rows.is_empty() {
            Err(FenceError::Lost)
        } else {
            Ok(())
        }
    }
}
