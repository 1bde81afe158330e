//! The layout of an entry in Redis (format 2), as the client reads it: a
//! 59-byte header of fixed offsets, then the lease deadline or the payload.
//! The scripts that write it are in the `scripts` module.

use std::time::Duration;

use bytes::Bytes;

use crate::fingerprint::Fingerprint;
use crate::store::admin::sealed::Raw;
use crate::store::{Claim, CompletedRecord, OwnerToken};

/// Length of the header before the tail.
pub(super) const HEADER: usize = 59;
const VERSION: u8 = b'2';
const FENCE: std::ops::Range<usize> = 3..19;
const FINGERPRINT: std::ops::Range<usize> = 27..59;

/// The fence as the scripts store and compare it: 16 decimal digits. A
/// fence that does not fit matches no entry.
pub(super) fn fence_arg(fence: u64) -> String {
    format!("{fence:016}")
}

/// The owner token as the scripts compare it: the fence's 16 digits, then
/// the nonce's 8 bytes.
pub(super) fn token_arg(token: OwnerToken) -> Vec<u8> {
    let mut arg = Vec::with_capacity(24);
    push_token(&mut arg, token);
    arg
}

fn push_token(buf: &mut Vec<u8>, token: OwnerToken) {
    buf.extend_from_slice(fence_arg(token.fence()).as_bytes());
    buf.extend_from_slice(&nonce_arg(token.nonce()));
}

/// The nonce as the scripts store it: 8 bytes, big-endian.
pub(super) fn nonce_arg(nonce: u64) -> [u8; 8] {
    nonce.to_be_bytes()
}

/// The done entry the completion script stores as it is: the header of
/// `token`'s grant with `record`'s fingerprint, then the payload.
pub(super) fn done(token: OwnerToken, record: &CompletedRecord) -> Vec<u8> {
    let mut done = Vec::with_capacity(HEADER.saturating_add(record.payload.len()));
    done.extend_from_slice(&[VERSION, b'd', b'0']);
    push_token(&mut done, token);
    done.extend_from_slice(record.fingerprint.as_bytes());
    done.extend_from_slice(&record.payload);
    done
}

/// An entry a claim returned instead of a grant: in flight or done. `None`
/// for anything else (an entry in another state, or damaged).
pub(super) fn parse(record: Vec<u8>) -> Option<Claim> {
    if record.len() < HEADER || record[0] != VERSION {
        return None;
    }
    let fingerprint = Fingerprint::from_bytes(record[FINGERPRINT].try_into().ok()?);
    match record[1] {
        b'i' => {
            let digits = &record[FENCE];
            if !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let fence = std::str::from_utf8(digits).ok()?.parse().ok()?;
            Some(Claim::InFlight { fingerprint, fence })
        }
        b'd' => Some(Claim::Completed(CompletedRecord {
            fingerprint,
            payload: Bytes::from(record).slice(HEADER..),
        })),
        _ => None,
    }
}

/// Any entry, as an operator sees it: `pttl` is the key's time to live,
/// `now` the server's clock (ms). Never panics, whatever the bytes.
pub(super) fn read(entry: Vec<u8>, pttl: Option<Duration>, now: u64) -> Raw {
    let unreadable = |problem: &str| Raw::Unreadable {
        problem: problem.to_owned(),
    };
    if entry.len() < HEADER || entry[0] != VERSION {
        return unreadable("unknown entry format");
    }
    let digits = &entry[FENCE];
    let fence = digits
        .iter()
        .all(u8::is_ascii_digit)
        .then(|| std::str::from_utf8(digits).ok()?.parse::<u64>().ok())
        .flatten();
    match (entry[1], fence) {
        // A claim would replay a done entry whose fence it cannot read
        // (it reads the fingerprint and payload alone), but it cannot be
        // resolved by its fence: the operator sees it as damaged, and
        // purges it.
        (_, None) => unreadable("unreadable fence"),
        (b'd', fence) => Raw::Record {
            fence,
            payload: Bytes::from(entry).slice(HEADER..),
            expires_in: pttl,
        },
        (b'i' | b'f', Some(fence)) => {
            let tail = &entry[HEADER..];
            let end = tail
                .iter()
                .position(|b| !b.is_ascii_digit())
                .unwrap_or(tail.len());
            let Some(deadline) = std::str::from_utf8(&tail[..end])
                .ok()
                .and_then(|d| d.parse::<u64>().ok())
            else {
                return unreadable("unreadable lease");
            };
            // A free entry's released nonces: `;` and 8 bytes each, as a
            // claim reads them (it fails on anything else).
            let released = &tail[end..];
            if entry[1] == b'f'
                && !released.is_empty()
                && (released[0] != b';' || !(released.len() - 1).is_multiple_of(8))
            {
                return unreadable("unreadable released nonces");
            }
            if entry[1] == b'i' && deadline > now {
                Raw::InFlight {
                    fence,
                    lease_left: Duration::from_millis(deadline - now),
                }
            } else {
                Raw::Absent { fence: Some(fence) }
            }
        }
        _ => unreadable("unknown state"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(state: u8, fence: &str) -> Vec<u8> {
        let mut r = vec![VERSION, state, b'0'];
        r.extend_from_slice(fence.as_bytes());
        r.extend_from_slice(&nonce_arg(7));
        r.extend_from_slice(&[9; 32]);
        r
    }

    #[test]
    fn reads_records_in_flight_and_done() {
        let mut r = header(b'i', "0000000000000042");
        r.extend_from_slice(b"1700000000000");
        match parse(r) {
            Some(Claim::InFlight { fingerprint, fence }) => {
                assert_eq!(fence, 42);
                assert_eq!(fingerprint, Fingerprint::from_bytes([9; 32]));
            }
            other => panic!("{other:?}"),
        }
        let mut r = header(b'd', "0000000000000042");
        r.extend_from_slice(b"payload");
        match parse(r) {
            Some(Claim::Completed(record)) => assert_eq!(&record.payload[..], b"payload"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_damaged_records_without_panicking() {
        let good = {
            let mut r = header(b'd', "0000000000000042");
            r.extend_from_slice(b"payload");
            r
        };
        for cut in 0..HEADER {
            assert!(parse(good[..cut].to_vec()).is_none(), "cut at {cut}");
        }
        let mut r = good.clone();
        r[0] = b'1';
        assert!(parse(r).is_none());
        let mut r = good.clone();
        r[1] = b'f';
        assert!(parse(r).is_none());
        let mut r = header(b'i', "00000000000000x2");
        r.extend_from_slice(b"1");
        assert!(parse(r).is_none());
        let mut r = header(b'i', "+000000000000042");
        r.extend_from_slice(b"1");
        assert!(parse(r).is_none());
    }

    #[test]
    fn a_done_record_reads_back_as_it_was_built() {
        let record = CompletedRecord {
            fingerprint: Fingerprint::from_bytes([3; 32]),
            payload: Bytes::from_static(b"answer"),
        };
        let built = done(OwnerToken::new(42, 7), &record);
        let mut want = header(b'd', "0000000000000042");
        want[27..].copy_from_slice(&[3; 32]);
        want.extend_from_slice(b"answer");
        assert_eq!(built, want);
        match parse(built) {
            Some(Claim::Completed(got)) => {
                assert_eq!(got.fingerprint, record.fingerprint);
                assert_eq!(got.payload, record.payload);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_operator_reads_every_state_and_never_panics() {
        let mut live = header(b'i', "0000000000000042");
        live.extend_from_slice(b"2000");
        match read(live.clone(), None, 1500) {
            Raw::InFlight { fence, lease_left } => {
                assert_eq!(fence, 42);
                assert_eq!(lease_left, Duration::from_millis(500));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            read(live, None, 2000),
            Raw::Absent { fence: Some(42) }
        ));
        let mut free = header(b'f', "0000000000000042");
        free.extend_from_slice(b"2000;12345678");
        assert!(matches!(
            read(free, None, 0),
            Raw::Absent { fence: Some(42) }
        ));
        let mut done = header(b'd', "0000000000000042");
        done.extend_from_slice(b"answer");
        match read(done.clone(), Some(Duration::from_secs(9)), 0) {
            Raw::Record {
                fence,
                payload,
                expires_in,
            } => {
                assert_eq!(fence, Some(42));
                assert_eq!(&payload[..], b"answer");
                assert_eq!(expires_in, Some(Duration::from_secs(9)));
            }
            other => panic!("{other:?}"),
        }
        for cut in 0..HEADER {
            assert!(matches!(
                read(done[..cut].to_vec(), None, 0),
                Raw::Unreadable { .. }
            ));
        }
        let mut odd = done.clone();
        odd[1] = b'x';
        assert!(matches!(read(odd, None, 0), Raw::Unreadable { .. }));
        // A done entry whose fence cannot be read cannot be resolved:
        // damaged. A free entry's nonces must be whole, as a claim reads
        // them.
        let mut no_fence = done.clone();
        no_fence[5] = b'x';
        assert!(matches!(read(no_fence, None, 0), Raw::Unreadable { .. }));
        let mut torn = header(b'f', "0000000000000042");
        torn.extend_from_slice(b"2000;1234567");
        assert!(matches!(read(torn, None, 0), Raw::Unreadable { .. }));
        let mut odd_tail = header(b'f', "0000000000000042");
        odd_tail.extend_from_slice(b"2000x12345678");
        assert!(matches!(read(odd_tail, None, 0), Raw::Unreadable { .. }));
    }

    #[test]
    fn token_is_the_fence_digits_then_the_nonce_bytes() {
        let token = token_arg(OwnerToken::new(42, 0x0102_0304_0506_0708));
        assert_eq!(&token[..16], b"0000000000000042");
        assert_eq!(&token[16..], &[1, 2, 3, 4, 5, 6, 7, 8]);
    }
}
