//! Values as the statements take them, and the rows they return.

use std::time::Duration;

use tokio_postgres::Row;

use super::sql;
use crate::fingerprint::Fingerprint;
use crate::store::remote::millis;
use crate::store::{Claim, CompletedRecord, OwnerToken};

/// A fence as a parameter (fences are below `i64::MAX`: they start from
/// the clock in microseconds).
pub(super) fn fence_param(token: OwnerToken) -> i64 {
    i64::try_from(token.fence()).unwrap_or(i64::MAX)
}

/// A nonce as a parameter: its bits, in a `bigint`.
pub(super) fn nonce_param(token: OwnerToken) -> i64 {
    i64::from_ne_bytes(token.nonce().to_ne_bytes())
}

/// Milliseconds as a parameter (`$n::float8 * interval '1 millisecond'`):
/// [`millis`], exact as a `float8` (below 2^53).
pub(super) fn ms(d: Duration) -> f64 {
    millis(d) as f64
}

/// Reads the row a claim statement returned.
pub(super) fn read_claim(row: &Row, nonce: i64) -> Result<Claim, tokio_postgres::Error> {
    let acquired: bool = row.try_get(0)?;
    let fence: i64 = row.try_get(1)?;
    let fence = u64::try_from(fence).unwrap_or(0);
    if acquired {
        let nonce = u64::from_ne_bytes(nonce.to_ne_bytes());
        return Ok(Claim::Acquired(OwnerToken::new(fence, nonce)));
    }
    let state: i16 = row.try_get(2)?;
    let fingerprint = fingerprint_of(row.try_get(3)?);
    let effect_committed: bool = row.try_get(5)?;
    let lapsed: bool = row.try_get(6)?;
    Ok(match state {
        sql::COMPLETED => {
            let payload: &[u8] = row.try_get(4)?;
            Claim::Completed(CompletedRecord {
                fingerprint,
                payload: bytes::Bytes::copy_from_slice(payload),
            })
        }
        sql::CLAIMED if effect_committed && lapsed => Claim::OutcomeUnknown { fingerprint },
        _ => Claim::InFlight { fingerprint, fence },
    })
}

pub(super) fn fingerprint_of(bytes: &[u8]) -> Fingerprint {
    let mut array = [0u8; 32];
    if bytes.len() == array.len() {
        array.copy_from_slice(bytes);
    }
    Fingerprint::from_bytes(array)
}
