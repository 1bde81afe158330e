//! A counting global allocator and a typical stored record, shared by the
//! memory test (`tests/memory_bound.rs`) and the memory bench
//! (`benches/memory.rs`), which include this file with `#[path]`. Including
//! it installs the allocator for the whole binary.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use bytes::Bytes;
use tower_idempotency::record::{StoredOutcome, StoredResponse};

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

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated and not yet freed, in the whole process.
pub fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// A typical stored payments response, as the layer encodes it: 201, three
/// headers and a 96-byte body (207 bytes in all).
pub fn typical_payload() -> Bytes {
    let mut headers = http::HeaderMap::new();
    headers.insert("content-type", "application/json".parse().unwrap());
    headers.insert("content-length", "96".parse().unwrap());
    headers.insert("location", "/payments/pay_000042".parse().unwrap());
    StoredOutcome::Response(StoredResponse {
        status: http::StatusCode::CREATED,
        headers,
        body: Bytes::from(vec![b'x'; 96]),
        trailers: None,
    })
    .encode()
}
