//! [`PostgresStore::warm_up`]: the pool's connections opened, and the
//! statements of every request prepared and run through PostgreSQL's
//! plan cache, before the first request arrives.

use tokio_postgres::types::ToSql;

use super::PostgresStore;
use super::pooled::Pooled;
use crate::store::StoreError;

/// How often each connection runs the claim and completion statements
/// while warming up. PostgreSQL plans a prepared statement afresh for its
/// first five runs (custom plans, about half a millisecond each for the
/// claim on a small machine); from the sixth on it uses a cached generic
/// plan where that costs no more, as it does for these statements.
pub(super) const REHEARSALS: usize = 6;

impl PostgresStore {
    /// Opens `connections` of the pool's connections (at most what the
    /// pool holds) and readies each for the requests that arrive first
    /// after a start: the statements a request uses are prepared, and the
    /// claim and completion statements are run six times each in a
    /// transaction that is rolled back (on a key of the warm-up's own, so
    /// nothing is left behind and no request's key is touched). So those
    /// requests do not each wait for a new connection, a cold server
    /// process, or PostgreSQL planning a statement afresh (it does for a
    /// prepared statement's first five runs). Call it after
    /// [`migrate`](Self::migrate), before serving; it returns how many
    /// connections it warmed.
    ///
    /// Without it, the payments demo started under load (32 clients at
    /// once, one key, 5 s) answered with a p99 of 65–143 ms; with the
    /// connections opened and the statements prepared, 2.6–3.6 ms; and in
    /// the first second alone, p99 8–14 ms with the statements only
    /// prepared, 4.5–5.8 ms with them also run (six starts each;
    /// BENCHMARKS.md). Connections are opened one after another; each
    /// one's opening and its rehearsal take the operation timeout each. If
    /// one fails, the call fails and those already open stay in the pool.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_idempotency::store::StoreError> {
    /// use tower_idempotency::store::PostgresStore;
    ///
    /// let store = PostgresStore::connect("postgres://postgres@127.0.0.1:5432/postgres").await?;
    /// store.migrate().await?;
    /// store.warm_up(16).await?;
    /// # Ok(()) }
    /// ```
    pub async fn warm_up(&self, connections: usize) -> Result<usize, StoreError> {
        let n = connections.min(self.inner.pool.status().max_size);
        // Each connection is held until all are open, so each is a new one.
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            // Opening (and preparing) and the rehearsal each within the
            // operation timeout: together they are some twenty round trips.
            let mut client = self
                .bounded("warm_up", async {
                    let client = Pooled::get(&self.inner.pool).await?;
                    self.prepare(&client).await?;
                    Ok(client)
                })
                .await?;
            self.bounded("warm_up", self.rehearse(&mut client)).await?;
            held.push(client);
        }
        Ok(held.len())
    }

    /// Prepares the statements of a request on `client`.
    async fn prepare(&self, client: &Pooled) -> Result<(), super::error::PgError> {
        let sql = &self.inner.sql;
        for statement in [
            &sql.claim,
            &sql.complete,
            &sql.release,
            &sql.extend,
            &sql.probe,
        ] {
            client.answer(client.prepare_cached(statement)).await?;
        }
        Ok(())
    }

    /// Runs the claim and completion [`REHEARSALS`] times on `client`, in
    /// a transaction it rolls back.
    async fn rehearse(&self, client: &mut Pooled) -> Result<(), super::error::PgError> {
        let sql = &self.inner.sql;
        // A key no request has (requests' keys are SHA-256 digests of 32
        // bytes; this one is longer), distinct per connection so warm-ups
        // of several processes never wait on each other's row.
        let mut key = b"tower-idempotency warm-up ".to_vec();
        key.extend_from_slice(&self.inner.kit.nonces.next().to_be_bytes());
        let key = key.as_slice();
        let fingerprint: &[u8] = &[0; 32];
        let (nonce, fence, lease_ms, keep_ms) = (0i64, -1i64, 1_000f64, 2_000f64);
        let label: Option<&str> = None;
        let claim: [&(dyn ToSql + Sync); 7] = [
            &key,
            &fingerprint,
            &nonce,
            &lease_ms,
            &keep_ms,
            &label,
            &label,
        ];
        // Fence -1 is never granted: the completion finds nothing.
        let complete: [&(dyn ToSql + Sync); 7] = [
            &key,
            &fence,
            &nonce,
            &fingerprint,
            &fingerprint,
            &lease_ms,
            &self.inner.channel,
        ];
        client.sending();
        if let Some(object) = client.object_mut() {
            let tx = object.transaction().await?;
            let claim_statement = tx.prepare_cached(&sql.claim).await?;
            let complete_statement = tx.prepare_cached(&sql.complete).await?;
            for _ in 0..REHEARSALS {
                tx.query(&claim_statement, &claim).await?;
                tx.query(&complete_statement, &complete).await?;
            }
            tx.rollback().await?;
        }
        client.finished();
        Ok(())
    }
}
