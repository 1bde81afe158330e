//! `MemoryStore::max_bytes` bounds the heap its completed records take, not
//! only their weighed size: a flood of unique keys, small records and large,
//! measured with a counting global allocator (allocated minus freed bytes).
//! It fails if records are charged too little for their cache entries (they
//! were charged 160 bytes, and small records then took twice the bound).
//!
//! This binary holds one test, so nothing else allocates while it measures.

use std::time::Duration;

use bytes::Bytes;
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::{Claim, CompletedRecord, MemoryStore, Store};

#[path = "common/heap.rs"]
mod heap;
use heap::{live, typical_payload};

/// Floods a store bounded at `bound` bytes with `keys` unique keys whose
/// records are `payload`, and returns the most heap it kept at any check.
async fn peak_heap_under_flood(bound: u64, payload: &Bytes, keys: u64, first_key: u64) -> isize {
    let fp = Fingerprint::from_bytes([7; 32]);
    let lease = Duration::from_secs(60);
    let retention = Duration::from_secs(3600);
    let baseline = live();
    let store = MemoryStore::builder().max_bytes(bound).build();
    let mut peak = 0;
    let check_every = (keys / 50).max(1);
    for i in 0..keys {
        let key = StoreKey::from_parts(b"bound", &(first_key + i).to_be_bytes());
        let Claim::Acquired(token) = store.claim(key, fp, lease).await.unwrap() else {
            panic!("a fresh key is acquired");
        };
        let record = CompletedRecord {
            fingerprint: fp,
            payload: Bytes::copy_from_slice(payload),
        };
        store.complete(key, token, record, retention).await.unwrap();
        if i % check_every == check_every - 1 {
            // Let the cache finish its pending evictions before measuring.
            store.completed_bytes();
            peak = peak.max(live() - baseline);
        }
    }
    assert!(
        store.completed_bytes() <= bound,
        "the weighed size stays bounded"
    );
    peak
}

/// What an evicted record may keep allocated for a while: moka's hash table
/// frees a removed entry only once no thread can still be reading it
/// (crossbeam's epoch-based reclamation, which defers up to 64 objects per
/// thread before it collects), so a few recently evicted records outlive
/// their eviction. Only large records make this visible.
const DEFERRED_RECORDS: isize = 64;

#[tokio::test(flavor = "current_thread")]
async fn max_bytes_bounds_the_heap_records_take() {
    const BOUND: u64 = 8 * 1024 * 1024;
    // 10 % for what the bound cannot see exactly: the cache's hash table
    // grows in steps, and its housekeeping buffers a few entries.
    let slack = (BOUND / 10) as isize;
    let small = typical_payload();
    let large = Bytes::from(vec![b'y'; 4096]);
    let huge = Bytes::from(vec![b'z'; 256 * 1024]);
    let cases = [
        ("small", &small, 36_000),
        ("4 KiB", &large, 6_000),
        ("256 KiB", &huge, 400),
    ];
    for (name, payload, keys) in cases {
        // Enough keys to fill the store three to six times over.
        let peak = peak_heap_under_flood(BOUND, payload, keys, keys * 10).await;
        let allowed = BOUND as isize + slack.max(DEFERRED_RECORDS * payload.len() as isize);
        eprintln!("{name}: peak heap {peak} bytes, bound {BOUND}, allowed {allowed}");
        assert!(
            peak <= allowed,
            "{name} records ({} bytes each): the store kept {peak} bytes of heap \
             against a bound of {BOUND}",
            payload.len()
        );
    }
}
