//! The storage contract behind the guarantee, and its backends.
//!
//! A [`Store`] keeps, for each [`StoreKey`], either nothing, an in-flight
//! claim (a fingerprint, an [`OwnerToken`] and a lease deadline), or a
//! completed record (a fingerprint and an opaque payload, kept for the
//! retention window). Every operation is atomic per key, so the guarantee
//! holds across every process that shares the store:
//!
//! | operation | what it does |
//! |---|---|
//! | [`claim`](Store::claim) | acquires the key with a lease and a fresh owner token, or reports what is there (in flight with its fingerprint, or completed). An expired lease is taken over with a higher fence; fences never go backwards for a key, even after its entry expired or was purged, or the store forgot it. |
//! | [`complete`](Store::complete) | stores the record, only if the token still owns the key (fencing: an owner whose lease was taken over cannot overwrite the new owner's result). A lease that ran out without anyone taking the key over still owns it: the late answer is kept. Repeating it with the same token is harmless. |
//! | [`release`](Store::release) | drops the claim, only for the owning token. |
//! | [`extend`](Store::extend) | renews the lease, only for the owning token; an expired lease is never resurrected. |
//! | [`wait`](Store::wait) | returns once the observed claim is gone (completed, released or expired) or the timeout passes, without busy polling. |
//! | [`purge`](Store::purge) | drops whatever the key holds (an operator's tool). |
//!
//! The built-in stores also implement [`admin::Admin`], an operator's
//! interface: inspect one key, list keys by state, purge, and resolve a key
//! whose outcome is unknown.
//!
//! Remote stores should make each operation one round trip. The
//! [`conformance`] module (feature `test-util`) is the executable form of
//! this contract: run it against your own store.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use crate::BoxError;
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;

pub mod admin;
mod label;
pub(crate) use label::KeptLabel;
pub use label::{MAX_LABEL_METHOD, MAX_LABEL_PATH, RequestLabel};
#[cfg(feature = "memory")]
mod key_hasher;
#[cfg(feature = "memory")]
mod memory;
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use memory::{MemoryStore, MemoryStoreBuilder};

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{RedisStore, RedisStoreBuilder};

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use self::postgres::{FenceError, FenceTransaction, PostgresStore, PostgresStoreBuilder};

#[cfg(any(feature = "redis", feature = "postgres"))]
mod remote;

#[cfg(all(feature = "tls", any(feature = "redis", feature = "postgres")))]
mod tls;

/// The TLS setters of a remote store's builder (a type with a
/// `tls: TlsSettings` field), for the connections `$for` names: one text
/// and one behaviour for every builder.
#[cfg(any(feature = "redis", feature = "postgres"))]
macro_rules! tls_setters {
    ($for:literal) => {
        #[doc = concat!(
            "Trusts the certificates of the PEM bundle at `path` instead of Mozilla's roots, for ",
            $for,
            " (feature `tls`): for a server whose certificate a private CA signed, as managed ",
            "services use. The bundle replaces the default roots; put a public root in it too ",
            "if a server may present either. A bundle that cannot be read or holds no ",
            "certificate is refused when the store is built; a server certificate that does ",
            "not verify fails the connection, never a fallback to plaintext."
        )]
        #[cfg(feature = "tls")]
        #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
        pub fn tls_ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
            self.tls.roots_file(path.into());
            self
        }

        /// Like [`tls_ca_file`](Self::tls_ca_file), with the PEM bundle in
        /// memory.
        #[cfg(feature = "tls")]
        #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
        pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
            self.tls.roots_pem(pem.into());
            self
        }

        #[doc = concat!(
            "Presents this client certificate (a PEM chain) and its private key (PEM) on ",
            $for,
            ", to a server that asks clients for one (feature `tls`)."
        )]
        #[cfg(feature = "tls")]
        #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
        pub fn tls_client_identity(
            mut self,
            certificate_pem: impl Into<Vec<u8>>,
            key_pem: impl Into<Vec<u8>>,
        ) -> Self {
            self.tls.identity(certificate_pem.into(), key_pem.into());
            self
        }
    };
}
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) use tls_setters;

#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod conformance;
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod fault;

/// Proof of owning a key: a fence number and a unique nonce.
///
/// The fence grows with every grant of the same key and never goes
/// backwards: not after the key's entry expired or was purged, and not
/// after the store forgot it (a restart without persistence), because stores
/// derive it from their clock (the store server's, for a shared store) as
/// well as from the previous fence. So a downstream system can reject
/// writes that carry a lower fence than one it has already seen
/// (Kleppmann's fencing token). Fences are large numbers (the built-in
/// stores start from the clock in microseconds) and are compared, never
/// counted. The nonce makes tokens unique even between two stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OwnerToken {
    fence: u64,
    nonce: u64,
}

impl OwnerToken {
    /// Builds a token (for store implementations).
    pub const fn new(fence: u64, nonce: u64) -> Self {
        Self { fence, nonce }
    }

    /// The fencing number: higher means a later grant.
    pub const fn fence(&self) -> u64 {
        self.fence
    }

    /// The unique part of the token.
    pub const fn nonce(&self) -> u64 {
        self.nonce
    }
}

/// A completed key: the request's fingerprint and the stored outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedRecord {
    /// The fingerprint of the request that executed.
    pub fingerprint: Fingerprint,
    /// The stored outcome, opaque to the store (the HTTP layer puts the
    /// response here, encoded and versioned).
    pub payload: Bytes,
}

/// What [`Store::claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Claim {
    /// The caller now owns the key until the lease ends.
    Acquired(OwnerToken),
    /// Another owner holds a live claim.
    InFlight {
        /// The fingerprint the owner claimed with.
        fingerprint: Fingerprint,
        /// The owner's fence, to pass to [`Store::wait`].
        fence: u64,
    },
    /// The key completed within the retention window.
    Completed(CompletedRecord),
    /// An execution committed its effect (a store that fences the
    /// handler's own transaction, such as `PostgresStore::fence`) and then
    /// lost its lease without storing its outcome: what it answered is
    /// unknown, and the key must not run again. The layer answers 409
    /// `OutcomeUnknown`; if the execution stores its outcome late, later
    /// claims replay it.
    OutcomeUnknown {
        /// The fingerprint the execution claimed with.
        fingerprint: Fingerprint,
    },
}

/// Whether a fenced operation still found the caller's claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStatus {
    /// The token owned the key; the operation took effect.
    Held,
    /// The token no longer owns the key (the lease expired, was taken over,
    /// or the key was purged); nothing changed.
    Lost,
}

/// The kind of a [`StoreError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The store cannot be reached or refused the command.
    Unavailable,
    /// The store did not answer in time; the operation may or may not have
    /// taken effect.
    Timeout,
    /// The store is full (for example too many in-flight claims).
    CapacityExceeded,
    /// A stored entry cannot be read.
    Corrupt,
    /// A setting the store cannot work with (a URL that does not parse, a
    /// table name or prefix it refuses, a CA bundle with no certificate, a
    /// server whose TLS certificate does not verify): refused when the
    /// store is built, before it serves.
    Configuration,
}

impl StoreErrorKind {
    /// The kind as a metric label or log field: `unavailable`, `timeout`,
    /// `capacity_exceeded`, `corrupt` or `configuration`.
    pub fn name(self) -> &'static str {
        match self {
            StoreErrorKind::Unavailable => "unavailable",
            StoreErrorKind::Timeout => "timeout",
            StoreErrorKind::CapacityExceeded => "capacity_exceeded",
            StoreErrorKind::Corrupt => "corrupt",
            StoreErrorKind::Configuration => "configuration",
        }
    }
}

/// A store operation failed. The layer answers 503 (fail closed) and does
/// not execute.
#[derive(Debug, thiserror::Error)]
#[error("idempotency store {op} failed ({kind:?}){}", .source.as_ref().map(|s| format!(": {}", error_chain(&**s))).unwrap_or_default())]
pub struct StoreError {
    kind: StoreErrorKind,
    op: &'static str,
    #[source]
    source: Option<BoxError>,
}

impl StoreError {
    /// A setting the store refuses ([`StoreErrorKind::Configuration`]).
    #[cfg(any(feature = "redis", feature = "postgres"))]
    pub(crate) fn configuration(source: impl Into<BoxError>) -> Self {
        Self::new(StoreErrorKind::Configuration, "configure").with_source(source)
    }

    /// A new error of `kind` during operation `op` (e.g. `"claim"`).
    pub fn new(kind: StoreErrorKind, op: &'static str) -> Self {
        Self {
            kind,
            op,
            source: None,
        }
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// The operation that failed.
    pub fn operation(&self) -> &'static str {
        self.op
    }
}

/// The storage contract: atomic claim, fenced complete / release / extend,
/// waiting without polling, and purge. See the [module docs](self).
///
/// Implementations are cheap handles (`Clone`) shared by every request.
/// Methods may be written as `async fn` in an implementation; their futures
/// must be `Send`.
pub trait Store: Clone + Send + Sync + 'static {
    /// Atomically acquires `key` for `fingerprint` with a lease of `lease`,
    /// or reports what the key holds.
    fn claim(
        &self,
        key: StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// [`claim`](Self::claim), with what identifies the request (its
    /// method and path) for an operator's tools: a store that can keep it
    /// with the entry does ([`admin::Admin`] shows it). The layer claims
    /// through this. The default forgets the label and claims.
    fn claim_labelled(
        &self,
        key: StoreKey,
        fingerprint: Fingerprint,
        lease: Duration,
        label: &RequestLabel<'_>,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send {
        let _ = label;
        self.claim(key, fingerprint, lease)
    }

    /// Stores `record` for `retention`, if `token` still owns `key`: the
    /// claim the key holds is the one `token` was granted, even if its
    /// lease ran out (nobody took the key over, so no other execution
    /// exists and the answer is better kept than lost). After a takeover,
    /// [`LeaseStatus::Lost`].
    ///
    /// Completing again with the same token after a success returns
    /// [`LeaseStatus::Held`] and changes nothing.
    fn complete(
        &self,
        key: StoreKey,
        token: OwnerToken,
        record: CompletedRecord,
        retention: Duration,
    ) -> impl Future<Output = Result<LeaseStatus, StoreError>> + Send;

    /// Drops the claim on `key`, if `token` still owns it.
    fn release(
        &self,
        key: StoreKey,
        token: OwnerToken,
    ) -> impl Future<Output = Result<LeaseStatus, StoreError>> + Send;

    /// Renews the lease on `key` to `lease` from now, if `token` still owns it.
    fn extend(
        &self,
        key: StoreKey,
        token: OwnerToken,
        lease: Duration,
    ) -> impl Future<Output = Result<LeaseStatus, StoreError>> + Send;

    /// Waits until the claim with fence `fence` on `key` is gone, or
    /// `timeout` passes, whichever is first. Returns at once when the claim
    /// is already gone. The caller then claims again to learn the new state,
    /// so a spurious early return is harmless.
    fn wait(
        &self,
        key: StoreKey,
        fence: u64,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Drops whatever `key` holds. Returns whether it held a live claim or
    /// an unexpired record.
    fn purge(&self, key: StoreKey) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Checks that the store answers, within its operation timeout: what a
    /// readiness probe asks (the sidecar's `/_idempotency/ready`). The
    /// default answers at once, as a store inside the process always can;
    /// a store on a server sends it a command that changes nothing.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        std::future::ready(Ok(()))
    }
}

impl fmt::Display for LeaseStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LeaseStatus::Held => "held",
            LeaseStatus::Lost => "lost",
        })
    }
}

/// `e` and the errors it came from, as one line: a driver's error often
/// says only "db error" or "error performing TLS handshake", its source
/// says why.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut current = e.source();
    while let Some(cause) = current {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        current = cause.source();
    }
    text
}
