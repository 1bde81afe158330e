//! A counting allocator, a typical stored record and a flood of unique
//! keys, for the memory test (`tests/memory_bound.rs`) and the memory bench
//! (`benches/memory.rs`). A target that measures installs the allocator
//! itself:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: common::heap::Counting = common::heap::Counting;
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::{Claim, CompletedRecord, MemoryStore, Store};

/// Counts the bytes allocated and not yet freed, then defers to the system
/// allocator.
pub struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: delegates to the system allocator and only counts sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Bytes allocated and not yet freed, in the whole process.
pub fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// A payload the size of a typical stored payments response as the layer
/// encodes it (201, three headers and a 96-byte body: 207 bytes). Stores
/// treat payloads as opaque, so only the size matters here.
pub fn typical_payload() -> Bytes {
    Bytes::from(vec![b'r'; 207])
}

/// What a [`flood`] left behind.
pub struct Flood {
    /// The most heap the store held at any of about 50 checks, each made
    /// after the cache ran its pending evictions.
    pub peak_heap: isize,
    /// The heap the store held at the end.
    #[allow(dead_code, reason = "the memory bench reports it; the test does not")]
    pub kept_heap: isize,
    /// The store's own account of its records' weight at the end.
    pub weighed: u64,
}

/// Floods a store bounded at `bound` bytes with `keys` unique keys (from
/// `first_key` on) whose records are copies of `payload`, claiming and
/// completing each, and measures the heap the store holds.
pub async fn flood(bound: u64, payload: &Bytes, keys: u64, first_key: u64) -> Flood {
    let fp = Fingerprint::from_bytes([7; 32]);
    let lease = Duration::from_secs(60);
    let retention = Duration::from_secs(3600);
    let baseline = live();
    let store = MemoryStore::builder().max_bytes(bound).build();
    let mut peak_heap = 0;
    let check_every = (keys / 50).max(1);
    for i in 0..keys {
        let key = StoreKey::from_parts(b"flood", &(first_key + i).to_be_bytes());
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
            peak_heap = peak_heap.max(live() - baseline);
        }
    }
    let weighed = store.completed_bytes();
    let kept_heap = live() - baseline;
    Flood {
        peak_heap: peak_heap.max(kept_heap),
        kept_heap,
        weighed,
    }
}
