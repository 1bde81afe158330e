//! [`Admin`](crate::store::admin::Admin) for [`MemoryStore`]: every key is
//! in this process, read under its shard's lock.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::time::Instant;

use super::{Completed, MemoryStore, SHARDS, lock};
use crate::key::StoreKey;
use crate::store::admin::Purged;
use crate::store::admin::sealed::{Backend, Expected, FenceClock, Noted, Oldest, Raw};
use crate::store::{CompletedRecord, KeptLabel, StoreError};

impl MemoryStore {
    fn raw_of(&self, key: &StoreKey, now: Instant) -> (Raw, Noted) {
        let claims = self.shard(key);
        let claim = claims
            .map
            .get(key)
            .map(|c| (c.token.fence(), c.deadline, c.label.clone()));
        drop(claims);
        match claim {
            Some((fence, deadline, label)) if deadline > now => (
                Raw::InFlight {
                    fence,
                    lease_left: deadline.saturating_duration_since(now),
                },
                Noted {
                    label,
                    completed_at: None,
                },
            ),
            claim => match self.live_completed(key, now) {
                Some(done) => record(&done, now),
                None => (
                    Raw::Absent {
                        fence: claim.map(|(fence, _, _)| fence),
                    },
                    Noted::default(),
                ),
            },
        }
    }
}

/// A completed record as an operator sees it. It was stored `retention`
/// before its expiry: read on tokio's clock, told on the wall clock.
fn record(done: &Completed, now: Instant) -> (Raw, Noted) {
    let since =
        now.saturating_duration_since(done.expires_at.checked_sub(done.retention).unwrap_or(now));
    let raw = Raw::Record {
        fence: Some(done.owner.fence()),
        payload: done.record.payload.clone(),
        expires_in: Some(done.expires_at.saturating_duration_since(now)),
    };
    let noted = Noted {
        label: done.label.clone(),
        completed_at: SystemTime::now().checked_sub(since),
    };
    (raw, noted)
}

impl Backend for MemoryStore {
    const CLOCK: FenceClock = FenceClock::MicrosTimes(SHARDS as u64);

    async fn read(&self, key: StoreKey) -> Result<(Raw, Noted), StoreError> {
        Ok(self.raw_of(&key, Instant::now()))
    }

    async fn scan(&self, oldest: &mut Oldest) -> Result<(), StoreError> {
        let now = Instant::now();
        for shard in self.inner.shards.iter() {
            let live: Vec<(StoreKey, u64, Instant, KeptLabel)> = lock(shard)
                .map
                .iter()
                .filter(|(_, c)| c.deadline > now)
                .map(|(key, c)| (*key, c.token.fence(), c.deadline, c.label.clone()))
                .collect();
            for (key, fence, deadline, label) in live {
                let raw = Raw::InFlight {
                    fence,
                    lease_left: deadline.saturating_duration_since(now),
                };
                let noted = Noted {
                    label,
                    completed_at: None,
                };
                oldest.offer(raw.inspect_with(key, Self::CLOCK, noted));
            }
        }
        for (key, done) in self.inner.completed.iter() {
            if done.expires_at > now {
                let (raw, noted) = record(&done, now);
                oldest.offer(raw.inspect_with(*key, Self::CLOCK, noted));
            }
        }
        Ok(())
    }

    async fn drop_entry(&self, key: StoreKey, force: bool) -> Result<Purged, StoreError> {
        let now = Instant::now();
        let mut claims = self.shard(&key);
        let live = claims.map.get(&key).is_some_and(|c| c.deadline > now);
        if live && !force {
            return Ok(Purged::RefusedLiveClaim);
        }
        // Removing the claim drops its channel, which wakes its waiters.
        if claims.map.remove(&key).is_some() {
            self.free_places(1);
        }
        let had_record = self
            .inner
            .completed
            .remove(&key)
            .is_some_and(|c| c.expires_at > now);
        drop(claims);
        Ok(if live || had_record {
            Purged::Dropped
        } else {
            Purged::Nothing
        })
    }

    async fn replace(
        &self,
        key: StoreKey,
        fence: u64,
        expected: &Expected,
        payload: Option<Bytes>,
    ) -> Result<bool, StoreError> {
        // A memory store's claims never outlive their lease unsettled.
        let Expected::Record(was) = expected else {
            return Ok(false);
        };
        let now = Instant::now();
        // The shard's lock keeps a claim from slipping in between.
        let _claims = self.shard(&key);
        let Some(done) = self.live_completed(&key, now) else {
            return Ok(false);
        };
        if done.owner.fence() != fence || done.record.payload != *was {
            return Ok(false);
        }
        match payload {
            None => self.inner.completed.invalidate(&key),
            Some(payload) => {
                let retention = done.expires_at.saturating_duration_since(now);
                let replaced = Completed {
                    record: CompletedRecord {
                        fingerprint: done.record.fingerprint,
                        payload,
                    },
                    label: done.label.clone(),
                    owner: done.owner,
                    expires_at: done.expires_at,
                    retention: retention.max(Duration::from_millis(1)),
                };
                self.inner.completed.insert(key, replaced);
            }
        }
        Ok(true)
    }
}
