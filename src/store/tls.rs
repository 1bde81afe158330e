//! What the remote stores share about TLS (feature `tls`): the roots a
//! connection trusts, the client's own certificate, the crypto provider,
//! and telling a certificate that did not verify from a server that is
//! down.

use std::path::PathBuf;

use crate::store::StoreError;

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
pub(crate) struct TlsSettings {
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
pub(crate) fn ensure_crypto_provider() {
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

/// A configuration error about TLS.
pub(crate) fn refuse(why: String) -> StoreError {
    StoreError::configuration(why)
}

/// Refuses a PEM bundle that holds no certificate (or a malformed one): it
/// would trust nothing, and every connection would fail later with a vague
/// error.
fn certificates_in(pem: &[u8], source: &str) -> Result<(), StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut found = 0usize;
    for certificate in CertificateDer::pem_slice_iter(pem) {
        certificate.map_err(|e| refuse(format!("the TLS CA bundle {source} is not PEM: {e}")))?;
        found = found.saturating_add(1);
    }
    if found == 0 {
        return Err(refuse(format!(
            "the TLS CA bundle {source} holds no certificate"
        )));
    }
    Ok(())
}

impl TlsSettings {
    pub(crate) fn roots_file(&mut self, path: PathBuf) {
        self.roots = Some(Roots::File(path));
    }

    pub(crate) fn roots_pem(&mut self, pem: Vec<u8>) {
        self.roots = Some(Roots::Pem(pem));
    }

    pub(crate) fn identity(&mut self, certificate_pem: Vec<u8>, key_pem: Vec<u8>) {
        self.identity = Some((certificate_pem, key_pem));
    }

    /// Whether anything was set (else a TLS connection uses Mozilla's
    /// roots and no client certificate).
    pub(crate) fn is_set(&self) -> bool {
        self.roots.is_some() || self.identity.is_some()
    }

    /// The CA bundle that replaces the default roots, read and checked to
    /// hold certificates; `None` for the default roots.
    pub(crate) fn roots_bundle(&self) -> Result<Option<Vec<u8>>, StoreError> {
        match &self.roots {
            None => Ok(None),
            Some(Roots::Pem(pem)) => {
                certificates_in(pem, "given")?;
                Ok(Some(pem.clone()))
            }
            Some(Roots::File(path)) => {
                let pem = std::fs::read(path).map_err(|e| {
                    refuse(format!(
                        "cannot read the TLS CA bundle {}: {e}",
                        path.display()
                    ))
                })?;
                certificates_in(&pem, &path.display().to_string())?;
                Ok(Some(pem))
            }
        }
    }

    /// The client's certificate chain and key, PEM.
    pub(crate) fn client_identity(&self) -> Option<(&[u8], &[u8])> {
        self.identity
            .as_ref()
            .map(|(certificate, key)| (certificate.as_slice(), key.as_slice()))
    }
}

/// Whether `e`, or an error it came from, says that the server's
/// certificate did not verify (rather than that the server is down).
pub(crate) fn is_a_certificate_error(e: &(dyn std::error::Error + 'static)) -> bool {
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
        // Some clients keep the rustls error as text only.
        if e.to_string().contains("invalid peer certificate") {
            return true;
        }
        current = e.source();
    }
    false
}
