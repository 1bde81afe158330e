//! TLS settings of a [`RedisStoreBuilder`](super::RedisStoreBuilder)
//! (feature `tls`): the roots a `rediss://` connection trusts, and the
//! client's own certificate.

use std::path::PathBuf;

use crate::store::{StoreError, StoreErrorKind};

/// Where the trusted roots come from.
#[derive(Debug, Clone)]
enum Roots {
    /// A PEM bundle in a file, read when the store is built.
    File(PathBuf),
    /// A PEM bundle in memory.
    Pem(Vec<u8>),
}

/// What a builder was told about TLS.
#[derive(Debug, Clone, Default)]
pub(super) struct TlsSettings {
    roots: Option<Roots>,
    /// The client's certificate chain and private key, PEM.
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsSettings {
    pub(super) fn roots_file(&mut self, path: PathBuf) {
        self.roots = Some(Roots::File(path));
    }

    pub(super) fn roots_pem(&mut self, pem: Vec<u8>) {
        self.roots = Some(Roots::Pem(pem));
    }

    pub(super) fn identity(&mut self, certificate_pem: Vec<u8>, key_pem: Vec<u8>) {
        self.identity = Some((certificate_pem, key_pem));
    }

    /// Whether anything was set (else a `rediss://` URL uses Mozilla's
    /// roots and no client certificate).
    pub(super) fn is_set(&self) -> bool {
        self.roots.is_some() || self.identity.is_some()
    }

    /// The certificates as redis-rs takes them, the roots' file read.
    pub(super) fn certificates(&self) -> Result<redis::TlsCertificates, StoreError> {
        let root_cert = match &self.roots {
            None => None,
            Some(Roots::Pem(pem)) => Some(pem.clone()),
            Some(Roots::File(path)) => Some(std::fs::read(path).map_err(|e| {
                StoreError::new(StoreErrorKind::Unavailable, "configure").with_source(format!(
                    "cannot read the TLS CA bundle {}: {e}",
                    path.display()
                ))
            })?),
        };
        let client_tls = self
            .identity
            .as_ref()
            .map(|(cert, key)| redis::ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.clone(),
            });
        Ok(redis::TlsCertificates {
            client_tls,
            root_cert,
        })
    }
}
