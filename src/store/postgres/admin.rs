//! [`Admin`](crate::store::admin::Admin) for [`PostgresStore`]: one row
//! read by its key, every row read in fence order (oldest first, by the
//! index on fence and key), a row changed only by its key and fence.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio_postgres::Row;

use super::PostgresStore;
use super::error::corrupt;
use super::sql::{CLAIMED, COMPLETED};
use crate::key::StoreKey;
use crate::store::admin::Purged;
use crate::store::admin::sealed::{Backend, Expected, Noted, Oldest, Raw};
use crate::store::{KeptLabel, RequestLabel, StoreError};

/// Rows read per page while listing.
const PAGE: i64 = 500;
/// `state` of a released claim.
const RELEASED: i16 = 2;

/// The key and what its row holds, from the columns the operator's
/// statements read.
#[allow(clippy::type_complexity)]
fn seen(row: &Row) -> Result<(Option<StoreKey>, i64, Raw, Noted), tokio_postgres::Error> {
    let key: &[u8] = row.try_get(0)?;
    let key = <[u8; 32]>::try_from(key).ok().map(StoreKey::from_bytes);
    let fence: i64 = row.try_get(1)?;
    let state: i16 = row.try_get(2)?;
    let live: bool = row.try_get(4)?;
    let kept: bool = row.try_get(5)?;
    let effect_committed: bool = row.try_get(6)?;
    let lease_left = duration(row.try_get(7)?);
    let expires_in = duration(row.try_get(8)?);
    let known = u64::try_from(fence).ok();
    let raw = match (state, known) {
        (_, None) => Raw::Unreadable {
            problem: format!("negative fence {fence}"),
        },
        (COMPLETED, Some(fence)) if kept => {
            let payload: Option<&[u8]> = row.try_get(3)?;
            Raw::Record {
                fence: Some(fence),
                payload: Bytes::copy_from_slice(payload.unwrap_or_default()),
                expires_in: Some(expires_in),
            }
        }
        (CLAIMED, Some(fence)) if live => Raw::InFlight { fence, lease_left },
        (CLAIMED, Some(fence)) if effect_committed && kept => Raw::UnknownClaim {
            fence,
            expires_in: Some(expires_in),
        },
        (CLAIMED | COMPLETED | RELEASED, fence) => Raw::Absent { fence },
        (other, _) => Raw::Unreadable {
            problem: format!("unknown state {other}"),
        },
    };
    let method: Option<String> = row.try_get(9)?;
    let path: Option<String> = row.try_get(10)?;
    let completed_at: Option<f64> = row.try_get(11)?;
    let noted = Noted {
        label: KeptLabel::of(&RequestLabel::new(
            method.as_deref().unwrap_or_default(),
            path.as_deref().unwrap_or_default(),
        )),
        completed_at: completed_at
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .and_then(|since| SystemTime::UNIX_EPOCH.checked_add(since)),
    };
    Ok((key, fence, raw, noted))
}

/// Milliseconds as the statements give them: negative or not a number
/// reads as zero.
fn duration(ms: f64) -> Duration {
    Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(Duration::ZERO)
}

impl Backend for PostgresStore {
    async fn read(&self, key: StoreKey) -> Result<(Raw, Noted), StoreError> {
        let rows = self
            .query(
                "inspect",
                &self.inner.sql.inspect,
                &[&key.as_bytes().as_slice()],
            )
            .await?;
        match rows.first() {
            Some(row) => {
                let (_, _, raw, noted) = seen(row).map_err(|e| corrupt("inspect", e))?;
                Ok((raw, noted))
            }
            None => Ok((Raw::Absent { fence: None }, Noted::default())),
        }
    }

    async fn scan(&self, oldest: &mut Oldest) -> Result<(), StoreError> {
        let mut after: (i64, Vec<u8>) = (i64::MIN, Vec::new());
        loop {
            let rows = self
                .query(
                    "list",
                    &self.inner.sql.list,
                    &[&after.0, &after.1.as_slice(), &PAGE],
                )
                .await?;
            for row in &rows {
                let (key, fence, raw, noted) = seen(row).map_err(|e| corrupt("list", e))?;
                let name: &[u8] = row.try_get(0).map_err(|e| corrupt("list", e))?;
                after = (fence, name.to_vec());
                match key {
                    Some(key) => oldest.offer(raw.inspect_with(key, Self::CLOCK, noted)),
                    // A key of another length is no key of this crate.
                    None => continue,
                }
            }
            // Rows come oldest first: once enough are kept, later ones
            // would not be.
            if rows.len() < PAGE as usize || oldest.full() {
                return Ok(());
            }
        }
    }

    async fn drop_entry(&self, key: StoreKey, force: bool) -> Result<Purged, StoreError> {
        let rows = self
            .query(
                "purge",
                &self.inner.sql.drop_entry,
                &[&key.as_bytes().as_slice(), &force],
            )
            .await?;
        let row = rows.first().ok_or_else(|| corrupt("purge", "no row"))?;
        let held: Option<bool> = row.try_get(0).map_err(|e| corrupt("purge", e))?;
        let live: bool = row.try_get(1).map_err(|e| corrupt("purge", e))?;
        Ok(match held {
            Some(true) => Purged::Dropped,
            Some(false) => Purged::Nothing,
            None if live && !force => Purged::RefusedLiveClaim,
            None => Purged::Nothing,
        })
    }

    async fn replace(
        &self,
        key: StoreKey,
        fence: u64,
        expected: &Expected,
        payload: Option<Bytes>,
    ) -> Result<bool, StoreError> {
        let Ok(fence) = i64::try_from(fence) else {
            return Ok(false);
        };
        let release = payload.is_none();
        let payload = payload.as_deref();
        let (state, was) = match expected {
            Expected::Record(was) => (COMPLETED, Some(&was[..])),
            Expected::UnknownClaim => (CLAIMED, None),
        };
        let rows = self
            .query(
                "resolve",
                &self.inner.sql.resolve,
                &[
                    &key.as_bytes().as_slice(),
                    &fence,
                    &release,
                    &payload,
                    &state,
                    &was,
                ],
            )
            .await?;
        let row = rows.first().ok_or_else(|| corrupt("resolve", "no row"))?;
        row.try_get(0).map_err(|e| corrupt("resolve", e))
    }
}
