//! The store's operations: [`Store`] for [`RedisStore`], the script calls
//! they make, the connection's health ([`Health`]) and the release of
//! orphans ([`Remote`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Script, Value};

use super::error::corrupt;
use super::{Inner, RedisStore, entry};
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::store::remote::abandon::Orphan;
use crate::store::remote::call::{Failure, Health, bounded};
use crate::store::remote::wait::{self, Probe};
use crate::store::remote::{Kit, Remote, Unsettled, millis};
use crate::store::{
    Claim, CompletedRecord, LeaseStatus, OwnerToken, Store, StoreError, StoreErrorKind,
};

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Runs a script within the operation timeout, telling apart the
    /// failures after which it cannot have taken effect.
    pub(super) async fn call(
        &self,
        op: &'static str,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<Value, Failure> {
        let mut conn = self.inner.conn.get();
        let until = self.inner.kit.deadline();
        bounded(
            op,
            until,
            &*self.inner,
            invocation.invoke_async::<Value>(&mut conn),
        )
        .await
    }

    /// An invocation of `script` on `key` by the owner of `token`: the
    /// first argument of every fenced script is the owner token.
    fn by_owner<'s>(
        &self,
        script: &'s Script,
        key: StoreKey,
        token: OwnerToken,
    ) -> redis::ScriptInvocation<'s> {
        let mut invocation = script.key(self.key_name(key));
        invocation.arg(entry::token_arg(token));
        invocation
    }

    async fn fenced(
        &self,
        op: &'static str,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<LeaseStatus, StoreError> {
        match self.call(op, invocation).await? {
            Value::Int(1) => Ok(LeaseStatus::Held),
            Value::Int(0) => Ok(LeaseStatus::Lost),
            other => Err(corrupt(op, &other)),
        }
    }
}

impl<C: Clone + Send + 'static> Health for Inner<C> {
    fn answered(&self) {
        self.conn.answered();
    }

    /// After a few timeouts in a row the connection may be half-open, and
    /// a new one is opened (and a new subscription with it).
    fn timed_out(&self) {
        if self.conn.timed_out()
            && let Some(notifications) = &self.notifications
        {
            notifications.reset();
        }
    }
}

impl<C> Remote for Inner<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn kit(&self) -> &Kit {
        &self.kit
    }

    /// The claim may still arrive after this release (queued on an old
    /// connection): the release leaves its nonce behind for as long as the
    /// claim's entry would have lived.
    fn abandon_once(
        self: Arc<Self>,
        orphan: &Orphan,
    ) -> impl Future<Output = Result<(), Failure>> + Send {
        let keep = millis(orphan.keep(self.kit.fence_memory));
        let (name, nonce) = (orphan.name.clone(), entry::nonce_arg(orphan.nonce));
        let store = RedisStore { inner: self };
        async move {
            let mut invocation = store.inner.scripts.abandon.key(&name);
            invocation
                .arg(&nonce[..])
                .arg(&store.inner.channel)
                .arg(keep);
            if store.call("abandon", invocation).await? == Value::Int(1) {
                tracing::debug!("released an orphan");
            }
            Ok(())
        }
    }
}

impl<C> Store for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn claim(
        &self,
        key: StoreKey,
        fp: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let name = self.key_name(key);
        let nonce = self.inner.kit.nonces.next();
        let keep = millis(lease.saturating_add(self.inner.kit.fence_memory));
        let mut invocation = self.inner.scripts.claim.key(&name);
        invocation
            .arg(&fp.as_bytes()[..])
            .arg(millis(lease))
            .arg(keep)
            .arg(&entry::nonce_arg(nonce)[..]);
        // Until its reply is in, the claim may have been applied with nobody
        // to own it: if the reply never comes back, or this future is
        // dropped (the client went away), the guard queues its release as an
        // orphan.
        let mut unsettled = Unsettled::new(&self.inner, Orphan::new(name, nonce, lease));
        let reply = self
            .call("claim", invocation)
            .await
            .map_err(|failure| unsettled.failed(failure))?;
        unsettled.settled();
        match reply {
            Value::Int(fence) => match u64::try_from(fence) {
                Ok(fence) => Ok(Claim::Acquired(OwnerToken::new(fence, nonce))),
                Err(_) => Err(corrupt("claim", &reply)),
            },
            Value::BulkString(stored) => entry::parse(stored).ok_or_else(|| {
                StoreError::new(StoreErrorKind::Corrupt, "claim")
                    .with_source("an entry Redis returned is not one this store reads")
            }),
            other => Err(corrupt("claim", &other)),
        }
    }

    async fn complete(
        &self,
        key: StoreKey,
        token: OwnerToken,
        record: CompletedRecord,
        retention: Duration,
    ) -> Result<LeaseStatus, StoreError> {
        let mut invocation = self.by_owner(&self.inner.scripts.complete, key, token);
        invocation
            .arg(entry::done(token, &record))
            .arg(millis(retention))
            .arg(&self.inner.channel);
        self.fenced("complete", invocation).await
    }

    async fn release(&self, key: StoreKey, token: OwnerToken) -> Result<LeaseStatus, StoreError> {
        let mut invocation = self.by_owner(&self.inner.scripts.release, key, token);
        invocation.arg(&self.inner.channel);
        self.fenced("release", invocation).await
    }

    async fn extend(
        &self,
        key: StoreKey,
        token: OwnerToken,
        lease: Duration,
    ) -> Result<LeaseStatus, StoreError> {
        let mut invocation = self.by_owner(&self.inner.scripts.extend, key, token);
        // The entry outlives the renewed lease by the fence memory, as the
        // claim made it.
        invocation
            .arg(millis(lease))
            .arg(millis(lease.saturating_add(self.inner.kit.fence_memory)));
        self.fenced("extend", invocation).await
    }

    async fn wait(&self, key: StoreKey, fence: u64, timeout: Duration) -> Result<(), StoreError> {
        let name = self.key_name(key);
        let probe = || async {
            // Also marks the claim waited for, so its end is published.
            let mut invocation = self.inner.scripts.lease_left.key(&name);
            invocation.arg(entry::fence_arg(fence));
            match self.call("wait", invocation).await? {
                Value::Int(left) => Ok(match u64::try_from(left) {
                    Ok(left) => Probe::Live {
                        left: Some(Duration::from_millis(left)),
                    },
                    Err(_) => Probe::Gone,
                }),
                other => Err(corrupt("wait", &other)),
            }
        };
        wait::until_gone(
            self.inner.notifications.as_ref(),
            &name,
            timeout,
            self.inner.kit.fallback_check,
            probe,
        )
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.inner.conn.get();
        let until = self.inner.kit.deadline();
        let ping = redis::cmd("PING");
        bounded(
            "ping",
            until,
            &*self.inner,
            ping.query_async::<()>(&mut conn),
        )
        .await?;
        Ok(())
    }

    async fn purge(&self, key: StoreKey) -> Result<bool, StoreError> {
        let name = self.key_name(key);
        let mut invocation = self.inner.scripts.purge.key(&name);
        invocation.arg(&self.inner.channel).arg("1");
        match self.call("purge", invocation).await? {
            Value::Int(n) => Ok(n == 1),
            other => Err(corrupt("purge", &other)),
        }
    }
}
