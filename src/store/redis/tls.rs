//! TLS settings of a [`RedisStoreBuilder`](super::RedisStoreBuilder)
//! (feature `tls`): the roots a `rediss://` connection trusts, and the
//! client's own certificate.

use std::path::PathBuf;
use std::time::Duration;

use crate::store::{StoreError, StoreErrorKind};

/// Where the trusted roots come from.
#[derive(Debug, Clone)]
enum Roots {
    /// A PEM bundle in a file, read when the store is built.
    File(PathBuf),
    /// A PEM bundle in memory.
    Pem(Vec<u8>),
}

/// What a builder was told about TLS. Its `Debug` never shows the client's
/// key.
#[derive(Clone, Default)]
pub(super) struct TlsSettings {
    roots: Option<Roots>,
    /// The client's certificate chain and private key, PEM.
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("roots", &self.roots)
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Makes `ring` the process's rustls crypto provider unless one is set:
/// redis-rs asks rustls for the process default when it connects, which
/// panics when more than one provider is compiled in (another crate of the
/// application may enable `aws-lc-rs`) and none was chosen.
pub(super) fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // rustls 0.23.48 marks ring's provider deprecated for its lack of
        // post-quantum key exchange; ring is kept for building with a C
        // compiler alone on every target (the README says so).
        #[allow(deprecated)]
        let ring = rustls::crypto::ring::default_provider();
        // Another thread may have installed one meanwhile: either is fine.
        let _ = ring.install_default();
    }
}

/// Refuses a PEM bundle that holds no certificate (or a malformed one): it
/// would trust nothing, and every connection would fail later with a vague
/// error.
fn certificates_in(pem: &[u8], source: &str) -> Result<(), StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let refuse = |why: String| {
        StoreError::new(StoreErrorKind::Unavailable, "configure")
            .with_source(format!("the TLS CA bundle {source} {why}"))
    };
    let mut found = 0usize;
    for certificate in CertificateDer::pem_slice_iter(pem) {
        certificate.map_err(|e| refuse(format!("is not PEM: {e}")))?;
        found = found.saturating_add(1);
    }
    if found == 0 {
        return Err(refuse("holds no certificate".to_owned()));
    }
    Ok(())
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
            Some(Roots::Pem(pem)) => {
                certificates_in(pem, "given")?;
                Some(pem.clone())
            }
            Some(Roots::File(path)) => {
                let pem = std::fs::read(path).map_err(|e| {
                    StoreError::new(StoreErrorKind::Unavailable, "configure").with_source(format!(
                        "cannot read the TLS CA bundle {}: {e}",
                        path.display()
                    ))
                })?;
                certificates_in(&pem, &path.display().to_string())?;
                Some(pem)
            }
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

/// Whether `e`, or an error it came from, says that the server's
/// certificate did not verify (rather than that the server is down).
fn is_a_certificate_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(e) = current {
        if e.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
        {
            return true;
        }
        // redis-rs keeps the rustls error as text in some paths.
        if e.to_string().contains("invalid peer certificate") {
            return true;
        }
        current = e.source();
    }
    false
}

/// Over TLS, one connection tried now (bounded by `timeout`): a server
/// whose certificate does not verify is a configuration error. A server
/// that is down or slow is not: the store connects lazily and serves once
/// it is back.
pub(super) async fn refuse_a_certificate_that_does_not_verify(
    client: &redis::Client,
    timeout: Duration,
) -> Result<(), StoreError> {
    if !matches!(
        client.get_connection_info().addr(),
        redis::ConnectionAddr::TcpTls { .. }
    ) {
        return Ok(());
    }
    match tokio::time::timeout(timeout, client.get_multiplexed_async_connection()).await {
        Ok(Err(e)) if is_a_certificate_error(&e) => {
            Err(
                StoreError::new(StoreErrorKind::Unavailable, "configure").with_source(format!(
                    "the Redis server's TLS certificate did not verify: {e}"
                )),
            )
        }
        _ => Ok(()),
    }
}
