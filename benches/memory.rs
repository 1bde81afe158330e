//! Memory: bytes per stored record and per in-flight claim on `MemoryStore`,
//! and the store's byte bound under a flood of unique keys.
//!
//! ```sh
//! cargo bench --all-features --bench memory
//! ```
//!
//! A counting global allocator measures the heap the store keeps (bytes
//! allocated minus bytes freed) around each step.

use std::time::Duration;

use bytes::Bytes;
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::{Claim, CompletedRecord, MemoryStore, Store};

#[path = "../tests/common/mod.rs"]
mod common;
use common::heap::{Counting, flood, live, typical_payload};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn key(i: u64) -> StoreKey {
    StoreKey::from_parts(b"bench", &i.to_be_bytes())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let fp = Fingerprint::from_bytes([7; 32]);
    let lease = Duration::from_secs(60);
    let retention = Duration::from_secs(3600);
    let n: u64 = 100_000;
    let payload = typical_payload();
    println!("memory bench (counting allocator, heap kept = allocated - freed)");
    println!("typical stored payload: {} bytes", payload.len());

    // Per in-flight claim.
    let store = MemoryStore::builder().max_in_flight(n as usize + 1).build();
    let before = live();
    let mut tokens = Vec::with_capacity(n as usize);
    let tokens_bytes = live() - before;
    for i in 0..n {
        match store.claim(key(i), fp, lease).await.unwrap() {
            Claim::Acquired(t) => tokens.push(t),
            other => panic!("{other:?}"),
        }
    }
    let per_claim = (live() - before - tokens_bytes) as f64 / n as f64;
    println!("in-flight claim: {per_claim:.0} bytes each ({n} claims held)");

    // Per completed record (the claims above complete into records).
    let before = live();
    for (i, t) in tokens.iter().enumerate() {
        let record = CompletedRecord {
            fingerprint: fp,
            payload: Bytes::copy_from_slice(&payload),
        };
        store
            .complete(key(i as u64), *t, record, retention)
            .await
            .unwrap();
    }
    let after_complete = live();
    // Completing frees the claim and keeps the record: add the claim back
    // to get what a record costs on its own.
    let per_record = (after_complete - before) as f64 / n as f64 + per_claim;
    println!(
        "completed record: {per_record:.0} bytes each, {:.0} bytes over its {}-byte payload ({n} records)",
        per_record - payload.len() as f64,
        payload.len()
    );
    drop(tokens);
    drop(store);

    // The byte bound under a flood of unique keys.
    let bound: u64 = 8 * 1024 * 1024;
    let keys: u64 = 200_000;
    let outcome = flood(bound, &Bytes::from(vec![b'y'; 1024]), keys, 1_000_000).await;
    println!(
        "flood: {keys} unique keys x 1 KiB ({} MiB offered) into a {} MiB store: \
         weighed size {:.2} MiB (bound holds: {}), heap kept {:.2} MiB, peak {:.2} MiB",
        keys * 1024 / (1024 * 1024),
        bound / (1024 * 1024),
        outcome.weighed as f64 / 1048576.0,
        outcome.weighed <= bound,
        outcome.kept_heap as f64 / 1048576.0,
        outcome.peak_heap as f64 / 1048576.0,
    );
    assert!(outcome.weighed <= bound, "the byte bound must hold");
}
