//! The stored form of an HTTP response: a versioned binary payload, the
//! content of a completed key's record.
//!
//! The payload keeps everything a replay needs, exactly: the status, every
//! header value in order (repeated headers stay repeated, non-UTF-8 values
//! stay byte-exact), the body bytes, and the trailers (gRPC's `grpc-status`
//! lives there). It starts with a magic tag and a version byte, so a payload
//! written by a newer release is refused as [`PayloadError::UnknownVersion`]
//! rather than misread, and a damaged one as [`PayloadError::Corrupt`]. Both
//! make the layer fail closed: a payload that cannot be read is never taken
//! as "absent", which would execute the request again.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

const MAGIC: &[u8; 4] = b"TIDR";
const VERSION: u8 = 1;
const KIND_RESPONSE: u8 = 0;
const KIND_NOT_REPLAYABLE: u8 = 1;
const KIND_OUTCOME_UNKNOWN: u8 = 2;
/// The most header entries a payload may hold: what one `HeaderMap` holds
/// (its capacity is at most 32 768 slots, three quarters of them usable),
/// less the spare one a replay adds. A real response never comes close.
const MAX_HEADERS: usize = 24_575;

/// A response as stored for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredResponse {
    /// The status code.
    pub(crate) status: StatusCode,
    /// The replayable headers, in order, repeated names kept.
    pub(crate) headers: HeaderMap,
    /// The body bytes.
    pub(crate) body: Bytes,
    /// The trailers, if the response ended with a trailers frame.
    pub(crate) trailers: Option<HeaderMap>,
}

/// What was stored for a completed key.
// Values are short-lived (decoded, then turned into a response), so the size
// difference between the variants costs nothing worth an extra allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum StoredOutcome {
    /// A full response to replay.
    Response(StoredResponse),
    /// The request executed, but its response was too large (or streaming)
    /// to store. Retries get a clear error and never execute again.
    NotReplayable {
        /// The status the execution answered with.
        status: StatusCode,
    },
    /// The request executed, but its response broke off after its head, so
    /// what the handler did is unknown. Retries are refused and never
    /// execute again.
    OutcomeUnknown {
        /// The status the execution answered with.
        status: StatusCode,
    },
}

/// A stored payload that cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum PayloadError {
    /// The bytes are not a payload of this crate, or are truncated or damaged.
    #[error("stored idempotency payload is corrupt")]
    Corrupt,
    /// The payload was written in a format version this release does not know.
    #[error("stored idempotency payload has unknown format version {0}")]
    UnknownVersion(u8),
}

impl StoredOutcome {
    /// Encodes the outcome as a payload.
    pub(crate) fn encode(&self) -> Bytes {
        match self {
            StoredOutcome::Response(r) => {
                encode_response(r.status, &r.headers, |_| true, &r.body, r.trailers.as_ref())
            }
            StoredOutcome::NotReplayable { status } => encode_status(KIND_NOT_REPLAYABLE, *status),
            StoredOutcome::OutcomeUnknown { status } => {
                encode_status(KIND_OUTCOME_UNKNOWN, *status)
            }
        }
    }

    /// Decodes a payload; never panics, whatever the bytes.
    pub(crate) fn decode(bytes: &Bytes) -> Result<Self, PayloadError> {
        let mut r = Reader { buf: bytes, pos: 0 };
        if r.take(4)? != MAGIC {
            return Err(PayloadError::Corrupt);
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(PayloadError::UnknownVersion(version));
        }
        let kind = r.u8()?;
        let status = StatusCode::from_u16(r.u16()?).map_err(|_| PayloadError::Corrupt)?;
        let outcome = match kind {
            KIND_RESPONSE => {
                let headers = r.headers()?;
                let body_len = usize::try_from(r.u64()?).map_err(|_| PayloadError::Corrupt)?;
                let body = r.take_bytes(body_len)?;
                let trailers = match r.u8()? {
                    0 => None,
                    1 => Some(r.headers()?),
                    _ => return Err(PayloadError::Corrupt),
                };
                StoredOutcome::Response(StoredResponse {
                    status,
                    headers,
                    body,
                    trailers,
                })
            }
            KIND_NOT_REPLAYABLE => StoredOutcome::NotReplayable { status },
            KIND_OUTCOME_UNKNOWN => StoredOutcome::OutcomeUnknown { status },
            _ => return Err(PayloadError::Corrupt),
        };
        if r.pos != bytes.len() {
            return Err(PayloadError::Corrupt);
        }
        Ok(outcome)
    }
}

/// Encodes a response payload straight from borrowed parts, keeping the
/// headers `keep` accepts, so the layer can store a filtered view of a
/// response's headers without copying them into a new map first.
pub(crate) fn encode_response(
    status: StatusCode,
    headers: &HeaderMap,
    keep: impl Fn(&HeaderName) -> bool,
    body: &Bytes,
    trailers: Option<&HeaderMap>,
) -> Bytes {
    // Sized exactly, so a stored payload holds no spare capacity that the
    // store's byte bound would not see.
    let len = MAGIC.len()
        + 4 // version, kind, status
        + headers_len(headers.iter().filter(|(name, _)| keep(name)))
        + 8
        + body.len()
        + 1
        + trailers.map_or(0, |t| headers_len(t.iter()));
    let mut buf = BytesMut::with_capacity(len);
    buf.put_slice(MAGIC);
    buf.put_u8(VERSION);
    buf.put_u8(KIND_RESPONSE);
    buf.put_u16(status.as_u16());
    put_headers(&mut buf, headers.iter().filter(|(name, _)| keep(name)));
    buf.put_u64(body.len() as u64);
    buf.put_slice(body);
    match trailers {
        None => buf.put_u8(0),
        Some(t) => {
            buf.put_u8(1);
            put_headers(&mut buf, t.iter());
        }
    }
    debug_assert_eq!(buf.len(), len);
    buf.freeze()
}

/// A payload of a kind that keeps only the status.
fn encode_status(kind: u8, status: StatusCode) -> Bytes {
    let mut buf = BytesMut::with_capacity(8);
    buf.put_slice(MAGIC);
    buf.put_u8(VERSION);
    buf.put_u8(kind);
    buf.put_u16(status.as_u16());
    buf.freeze()
}

/// The encoded length of `headers` (see [`put_headers`]).
fn headers_len<'a>(headers: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>) -> usize {
    4 + headers
        .map(|(name, value)| 2 + name.as_str().len() + 4 + value.len())
        .sum::<usize>()
}

fn put_headers<'a>(
    buf: &mut BytesMut,
    headers: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
) {
    // The count goes first; write a placeholder and fill it in at the end.
    let count_at = buf.len();
    buf.put_u32(0);
    let mut count: u32 = 0;
    for (name, value) in headers {
        // Header names are at most 64 KiB by construction in `http`.
        buf.put_u16(name.as_str().len() as u16);
        buf.put_slice(name.as_str().as_bytes());
        buf.put_u32(value.len() as u32);
        buf.put_slice(value.as_bytes());
        count += 1;
    }
    buf[count_at..count_at + 4].copy_from_slice(&count.to_be_bytes());
}

struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], PayloadError> {
        let end = self.pos.checked_add(n).ok_or(PayloadError::Corrupt)?;
        let slice = self.buf.get(self.pos..end).ok_or(PayloadError::Corrupt)?;
        self.pos = end;
        Ok(slice)
    }

    fn take_bytes(&mut self, n: usize) -> Result<Bytes, PayloadError> {
        let start = self.pos;
        self.take(n)?;
        Ok(self.buf.slice(start..self.pos))
    }

    fn u8(&mut self) -> Result<u8, PayloadError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PayloadError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, PayloadError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, PayloadError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn headers(&mut self) -> Result<HeaderMap, PayloadError> {
        let count = self.u32()? as usize;
        // Each entry takes at least 6 bytes: refuse counts the buffer cannot
        // hold before allocating for them, and counts no `HeaderMap` can hold
        // (the map's own constructors panic past its maximum size).
        if count > self.buf.len().saturating_sub(self.pos) / 6 || count > MAX_HEADERS {
            return Err(PayloadError::Corrupt);
        }
        // One spare slot: a replay adds its marker header.
        let mut map = HeaderMap::try_with_capacity(count + 1).map_err(|_| PayloadError::Corrupt)?;
        for _ in 0..count {
            let name_len = usize::from(self.u16()?);
            let name =
                HeaderName::from_bytes(self.take(name_len)?).map_err(|_| PayloadError::Corrupt)?;
            let value_len = self.u32()? as usize;
            // A slice of the payload (no copy), checked as `from_bytes` would.
            let value = HeaderValue::from_maybe_shared(self.take_bytes(value_len)?)
                .map_err(|_| PayloadError::Corrupt)?;
            map.try_append(name, value)
                .map_err(|_| PayloadError::Corrupt)?;
        }
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> StoredResponse {
        let mut headers = HeaderMap::new();
        headers.append("x-multi", HeaderValue::from_static("one"));
        headers.append("x-multi", HeaderValue::from_static("two, three"));
        headers.append(
            "x-bin",
            HeaderValue::from_bytes(&[0xff, 0x80, b'a']).unwrap(),
        );
        headers.append(
            "content-disposition",
            HeaderValue::from_static("attachment; filename=\"a,b.txt\""),
        );
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        StoredResponse {
            status: StatusCode::CREATED,
            headers,
            body: Bytes::from_static(&[0, 1, 2, 255, 254]),
            trailers: Some(trailers),
        }
    }

    #[test]
    fn round_trips_repeated_binary_headers_body_and_trailers() {
        let outcome = StoredOutcome::Response(sample());
        let decoded = StoredOutcome::decode(&outcome.encode()).unwrap();
        assert_eq!(decoded, outcome);
        let StoredOutcome::Response(r) = decoded else {
            unreachable!()
        };
        let multi: Vec<_> = r.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["one", "two, three"]);
    }

    #[test]
    fn round_trips_not_replayable_and_no_trailers() {
        let nr = StoredOutcome::NotReplayable {
            status: StatusCode::OK,
        };
        assert_eq!(StoredOutcome::decode(&nr.encode()).unwrap(), nr);
        let unknown = StoredOutcome::OutcomeUnknown {
            status: StatusCode::CREATED,
        };
        assert_eq!(StoredOutcome::decode(&unknown.encode()).unwrap(), unknown);
        let mut r = sample();
        r.trailers = None;
        let o = StoredOutcome::Response(r);
        assert_eq!(StoredOutcome::decode(&o.encode()).unwrap(), o);
    }

    #[test]
    fn refuses_unknown_versions_and_garbage() {
        let mut bytes = StoredOutcome::Response(sample()).encode().to_vec();
        bytes[4] = 9;
        assert_eq!(
            StoredOutcome::decode(&Bytes::from(bytes)),
            Err(PayloadError::UnknownVersion(9))
        );
        assert_eq!(
            StoredOutcome::decode(&Bytes::from_static(b"garbage")),
            Err(PayloadError::Corrupt)
        );
        let good = StoredOutcome::Response(sample()).encode();
        for cut in 0..good.len() {
            assert!(StoredOutcome::decode(&good.slice(..cut)).is_err());
        }
        let mut trailing = good.to_vec();
        trailing.push(0);
        assert_eq!(
            StoredOutcome::decode(&Bytes::from(trailing)),
            Err(PayloadError::Corrupt)
        );
    }

    /// A payload head (magic, version, kind, status) followed by `rest`.
    fn record_with(rest: &[u8]) -> Bytes {
        let mut bytes = b"TIDR\x01\x00\x00\xc8".to_vec();
        bytes.extend_from_slice(rest);
        Bytes::from(bytes)
    }

    #[test]
    fn a_record_claiming_more_headers_than_a_header_map_holds_is_corrupt_not_a_panic() {
        // 30 000 entries of 6 bytes each: more than `HeaderMap` can hold
        // (it panics above about 24 576 when asked for the capacity), yet
        // within what the bytes could frame.
        for count in [24_577u32, 30_000, 40_000] {
            let mut rest = count.to_be_bytes().to_vec();
            rest.resize(4 + count as usize * 6, 0);
            assert_eq!(
                StoredOutcome::decode(&record_with(&rest)),
                Err(PayloadError::Corrupt),
                "{count} headers"
            );
        }
    }

    #[test]
    fn a_record_with_more_valid_headers_than_a_header_map_holds_is_corrupt_not_a_panic() {
        // Distinct, valid names: the map fills up while appending.
        let count = 40_000u32;
        let mut rest = count.to_be_bytes().to_vec();
        for n in 0..count {
            let name = format!("h{n}");
            rest.extend_from_slice(&(name.len() as u16).to_be_bytes());
            rest.extend_from_slice(name.as_bytes());
            rest.extend_from_slice(&0u32.to_be_bytes());
        }
        rest.extend_from_slice(&0u64.to_be_bytes());
        rest.push(0);
        assert_eq!(
            StoredOutcome::decode(&record_with(&rest)),
            Err(PayloadError::Corrupt)
        );
    }

    /// A response with random headers (repeated names, any bytes a header
    /// value may hold), body and trailers.
    fn any_response() -> impl Strategy<Value = StoredResponse> {
        let header = (
            proptest::sample::select(vec!["a", "x-multi", "set-cookie", "grpc-status", "x"]),
            proptest::collection::vec(
                any::<u8>().prop_filter("header value byte", |b| *b >= 0x20 && *b != 0x7f),
                0..40,
            ),
        );
        let headers = proptest::collection::vec(header, 0..12).prop_map(|pairs| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                if let Ok(value) = HeaderValue::from_bytes(&value) {
                    map.append(HeaderName::from_static(name), value);
                }
            }
            map
        });
        (
            100u16..600,
            headers.clone(),
            proptest::collection::vec(any::<u8>(), 0..2048),
            proptest::option::of(headers),
        )
            .prop_map(|(status, headers, body, trailers)| StoredResponse {
                status: StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
                headers,
                body: Bytes::from(body),
                trailers,
            })
    }

    /// How a stored payload may be damaged: cut short, a length or count
    /// field overwritten with a large or random value, or a byte flipped.
    #[derive(Debug, Clone)]
    enum Damage {
        Truncate(prop::sample::Index),
        OverwriteU32(prop::sample::Index, u32),
        OverwriteU64(prop::sample::Index, u64),
        Flip(prop::sample::Index, u8),
    }

    fn any_damage() -> impl Strategy<Value = Damage> {
        let large_u32 = prop_oneof![
            Just(u32::MAX),
            Just(24_576u32),
            Just(1u32 << 16),
            any::<u32>()
        ];
        let large_u64 = prop_oneof![Just(u64::MAX), Just(1u64 << 40), any::<u64>()];
        prop_oneof![
            any::<prop::sample::Index>().prop_map(Damage::Truncate),
            (any::<prop::sample::Index>(), large_u32).prop_map(|(i, v)| Damage::OverwriteU32(i, v)),
            (any::<prop::sample::Index>(), large_u64).prop_map(|(i, v)| Damage::OverwriteU64(i, v)),
            (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(i, v)| Damage::Flip(i, v)),
        ]
    }

    fn damaged(record: &Bytes, damage: &Damage) -> Bytes {
        let mut bytes = record.to_vec();
        if bytes.is_empty() {
            return Bytes::new();
        }
        match damage {
            Damage::Truncate(at) => bytes.truncate(at.index(bytes.len())),
            Damage::OverwriteU32(at, v) => {
                let at = at.index(bytes.len().saturating_sub(3).max(1));
                let end = (at + 4).min(bytes.len());
                bytes[at..end].copy_from_slice(&v.to_be_bytes()[..end - at]);
            }
            Damage::OverwriteU64(at, v) => {
                let at = at.index(bytes.len().saturating_sub(7).max(1));
                let end = (at + 8).min(bytes.len());
                bytes[at..end].copy_from_slice(&v.to_be_bytes()[..end - at]);
            }
            Damage::Flip(at, mask) => {
                let at = at.index(bytes.len());
                bytes[at] ^= mask;
            }
        }
        Bytes::from(bytes)
    }

    proptest! {
        // Many cases: decoding is what stands between a hostile or damaged
        // stored value and the process.
        #![proptest_config(ProptestConfig::with_cases(2_048))]

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut with_magic = b"TIDR\x01".to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = StoredOutcome::decode(&Bytes::from(bytes));
            let _ = StoredOutcome::decode(&Bytes::from(with_magic));
        }

        #[test]
        fn records_round_trip_and_damaged_records_never_panic(
            response in any_response(),
            damages in proptest::collection::vec(any_damage(), 1..4),
        ) {
            let outcome = StoredOutcome::Response(response);
            let record = outcome.encode();
            prop_assert_eq!(StoredOutcome::decode(&record), Ok(outcome));
            let mut bytes = record;
            for damage in &damages {
                bytes = damaged(&bytes, damage);
                let _ = StoredOutcome::decode(&bytes);
            }
        }
    }
}
