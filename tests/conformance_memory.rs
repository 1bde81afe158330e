//! The public store conformance suite, run against `MemoryStore`.

use tower_idempotency::store::MemoryStore;

tower_idempotency::store_conformance_tests!(MemoryStore::new());
