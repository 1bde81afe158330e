//! The store's operations: [`Store`] for [`PostgresStore`], the calls
//! they make, and the release of orphans ([`Remote`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::error::{PgError, corrupt};
use super::pooled::Pooled;
use super::row::{fence_param, ms, nonce_param, read_claim};
use super::{Inner, PostgresStore};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::store::remote::abandon::Orphan;
use crate::store::remote::call::Failure;
use crate::store::remote::wait::{self, Probe};
use crate::store::remote::{self, Kit, Remote, Unsettled};
use crate::store::{
    Claim, CompletedRecord, LeaseStatus, OwnerToken, RequestLabel, Store, StoreError,
    StoreErrorKind,
};

/// How soon a waiter looks again at a live claim it could not mark as
/// waited for (so its completion would not notify).
pub(super) const MARK_RETRY: Duration = Duration::from_millis(50);

impl PostgresStore {
    /// Runs `op` within the operation timeout.
    pub(super) async fn bounded<T>(
        &self,
        op: &'static str,
        work: impl Future<Output = Result<T, PgError>>,
    ) -> Result<T, StoreError> {
        let until = self.inner.kit.deadline();
        Ok(self.call(op, until, work).await?)
    }

    /// Runs `op` until `until`, telling apart the failures after which it
    /// cannot have taken effect.
    pub(super) async fn call<T>(
        &self,
        op: &'static str,
        until: tokio::time::Instant,
        work: impl Future<Output = Result<T, PgError>>,
    ) -> Result<T, Failure> {
        self.ensure_cleanup();
        remote::call::bounded(op, until, &(), work).await
    }

    /// Orphans, claims whose reply never came back (a timeout, a dropped
    /// connection, a caller that went away during the claim), waiting to be
    /// released in the background. At most 1 024 wait per store; beyond
    /// that, an orphan expires with its lease.
    pub fn orphans_pending(&self) -> usize {
        self.inner.kit.abandoner.pending()
    }

    pub(super) async fn query(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.bounded(op, async {
            let client = Pooled::get(&self.inner.pool).await?;
            let statement = client.answer(client.prepare_cached(sql)).await?;
            client.answer(client.query(&statement, params)).await
        })
        .await
    }

    pub(super) async fn execute(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        self.bounded(op, async {
            let client = Pooled::get(&self.inner.pool).await?;
            let statement = client.answer(client.prepare_cached(sql)).await?;
            client.answer(client.execute(&statement, params)).await
        })
        .await
    }

    /// Whether the claim with `fence` on `key` is still live, marking it
    /// as waited for when the store has notifications (its completion or
    /// release then notifies; a store without them marks nothing). The waiter
    /// looks again when the lease ends (a dead owner's claim can then be
    /// taken over), and, for a live claim the probe could not mark (its row
    /// locked by its owner's fenced transaction, or changing under the
    /// probe), after [`MARK_RETRY`] at the latest.
    pub(super) async fn probe_claim(&self, key: StoreKey, fence: u64) -> Result<Probe, StoreError> {
        let fence = i64::try_from(fence).unwrap_or(i64::MAX);
        // Without notifications nobody listens: a mark would only make the
        // completion notify for nothing.
        let listening = self.inner.notifications.is_some();
        let rows = self
            .query(
                "wait",
                &self.inner.sql.probe,
                &[&key.as_bytes().as_slice(), &fence, &listening],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Err(corrupt("wait", "the probe returned no row"));
        };
        let live = row.try_get::<_, bool>(0).map_err(|e| corrupt("wait", e))?;
        let marked = row.try_get::<_, bool>(1).map_err(|e| corrupt("wait", e))?;
        let left_ms = row
            .try_get::<_, Option<f64>>(2)
            .map_err(|e| corrupt("wait", e))?;
        // A millisecond past the deadline, so that the next look finds the
        // lease over rather than a sliver of it.
        let left = left_ms
            .and_then(|ms| Duration::try_from_secs_f64(ms.max(0.0) / 1000.0).ok())
            .map(|d| d.saturating_add(Duration::from_millis(1)));
        Ok(match (live, marked || !listening) {
            (false, _) => Probe::Gone,
            (true, true) => Probe::Live { left },
            (true, false) => Probe::Live {
                left: Some(left.map_or(MARK_RETRY, |left| left.min(MARK_RETRY))),
            },
        })
    }

    pub(super) async fn fenced(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<LeaseStatus, StoreError> {
        let rows = self.query(op, sql, params).await?;
        let held = match rows.first() {
            Some(row) => row.try_get::<_, bool>(0).map_err(|e| corrupt(op, e))?,
            None => return Err(corrupt(op, "no row")),
        };
        Ok(if held {
            LeaseStatus::Held
        } else {
            LeaseStatus::Lost
        })
    }
}

impl Store for PostgresStore {
    async fn claim(
        &self,
        key: StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.claim_labelled(key, fingerprint, lease, &RequestLabel::default())
            .await
    }

    async fn claim_labelled(
        &self,
        key: StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
        label: &RequestLabel<'_>,
    ) -> Result<Claim, StoreError> {
        let nonce = i64::from_ne_bytes(self.inner.kit.nonces.next().to_ne_bytes());
        // The row outlives the lease by the fence memory (the extend
        // statement keeps it so), the same meaning as on Redis.
        let keep = lease.saturating_add(self.inner.kit.fence_memory);
        let known = |text| Some(text).filter(|t: &&str| !t.is_empty());
        let (method, path) = (known(label.method()), known(label.path()));
        let params: [&(dyn ToSql + Sync); 7] = [
            &key.as_bytes().as_slice(),
            &fingerprint.as_bytes().as_slice(),
            &nonce,
            &ms(lease),
            &ms(keep),
            &method,
            &path,
        ];
        // One connection for the (up to three) attempts, within one bound.
        let until = self.inner.kit.deadline();
        let client = self
            .call("claim", until, Pooled::get(&self.inner.pool))
            .await?;
        // Until its reply is in, the claim may have been applied with nobody
        // to own it: if the reply never comes back, or this future is
        // dropped (the client went away), the guard queues its release, as
        // an orphan, by its nonce.
        let mut unsettled = Unsettled::new(
            &self.inner,
            Orphan::new(key.to_hex(), u64::from_ne_bytes(nonce.to_ne_bytes()), lease),
        );
        // A row committed by another transaction after this statement's
        // snapshot was taken is seen by the insert's conflict check but not
        // by the statement's read: no row comes back. The next attempt sees
        // it.
        for _ in 0..3 {
            let sent = self
                .call("claim", until, async {
                    let statement = client
                        .answer(client.prepare_cached(&self.inner.sql.claim))
                        .await?;
                    client.answer(client.query(&statement, &params)).await
                })
                .await;
            let rows = sent.map_err(|failure| unsettled.failed(failure))?;
            if let Some(row) = rows.first() {
                unsettled.settled();
                return read_claim(row, nonce).map_err(|e| corrupt("claim", e));
            }
        }
        unsettled.settled();
        Err(StoreError::new(StoreErrorKind::Unavailable, "claim")
            .with_source("the key changed under three claims in a row"))
    }

    async fn complete(
        &self,
        key: StoreKey,
        token: OwnerToken,
        record: CompletedRecord,
        retention: Duration,
    ) -> Result<LeaseStatus, StoreError> {
        self.fenced(
            "complete",
            &self.inner.sql.complete,
            &[
                &key.as_bytes().as_slice(),
                &fence_param(token),
                &nonce_param(token),
                &record.payload.as_ref(),
                &record.fingerprint.as_bytes().as_slice(),
                &ms(retention),
                &self.inner.channel,
            ],
        )
        .await
    }

    async fn release(&self, key: StoreKey, token: OwnerToken) -> Result<LeaseStatus, StoreError> {
        // A released claim whose effect was committed answers "outcome
        // unknown" for the fence memory from now, then expires.
        self.fenced(
            "release",
            &self.inner.sql.release,
            &[
                &key.as_bytes().as_slice(),
                &fence_param(token),
                &nonce_param(token),
                &self.inner.channel,
                &ms(self.inner.kit.fence_memory),
            ],
        )
        .await
    }

    async fn extend(
        &self,
        key: StoreKey,
        token: OwnerToken,
        lease: Duration,
    ) -> Result<LeaseStatus, StoreError> {
        let rows = self
            .execute(
                "extend",
                &self.inner.sql.extend,
                &[
                    &key.as_bytes().as_slice(),
                    &fence_param(token),
                    &nonce_param(token),
                    &ms(lease),
                    // The row's life moves with the lease, so the cleanup
                    // never removes a claim its owner is renewing.
                    &ms(lease.saturating_add(self.inner.kit.fence_memory)),
                ],
            )
            .await?;
        Ok(if rows == 1 {
            LeaseStatus::Held
        } else {
            LeaseStatus::Lost
        })
    }

    async fn wait(&self, key: StoreKey, fence: u64, timeout: Duration) -> Result<(), StoreError> {
        let probe = || self.probe_claim(key, fence);
        wait::until_gone(
            self.inner.notifications.as_ref(),
            &key.to_hex(),
            timeout,
            self.inner.kit.fallback_check,
            probe,
        )
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.query("ping", "SELECT 1", &[]).await.map(drop)
    }

    async fn purge(&self, key: StoreKey) -> Result<bool, StoreError> {
        let rows = self
            .query(
                "purge",
                &self.inner.sql.purge,
                &[&key.as_bytes().as_slice()],
            )
            .await?;
        match rows.first() {
            Some(row) => row.try_get::<_, bool>(0).map_err(|e| corrupt("purge", e)),
            None => Ok(false),
        }
    }
}

/// The release may reach the database before the claim (which may still
/// be on a connection that stopped answering): it then leaves the nonce
/// behind, and the late claim refuses (see the `abandon` statement).
impl Remote for Inner {
    fn kit(&self) -> &Kit {
        &self.kit
    }

    fn abandon_once(
        self: Arc<Self>,
        orphan: &Orphan,
    ) -> impl Future<Output = Result<(), Failure>> + Send {
        let nonce = i64::from_ne_bytes(orphan.nonce.to_ne_bytes());
        let keep = ms(orphan.keep(self.kit.fence_memory));
        let name = orphan.name.clone();
        let store = PostgresStore { inner: self };
        async move {
            let until = store.inner.kit.deadline();
            store
                .call("abandon", until, async {
                    let params: [&(dyn ToSql + Sync); 4] =
                        [&name.as_str(), &nonce, &store.inner.channel, &keep];
                    let client = Pooled::get(&store.inner.pool).await?;
                    let statement = client
                        .answer(client.prepare_cached(&store.inner.sql.abandon))
                        .await?;
                    client.answer(client.query(&statement, &params)).await?;
                    Ok(())
                })
                .await
        }
    }
}
