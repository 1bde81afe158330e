//! The rustls connector of a PostgreSQL connection (feature `tls`): the
//! trusted roots, the client's certificate, and for `sslmode=verify-ca` a
//! verifier that checks the chain and not the host name.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::StoreError;
use crate::store::tls::{TlsSettings, ensure_crypto_provider, refuse};

/// A connector trusting the configured roots (Mozilla's by default), with
/// the client's certificate if one was given; `check_names` is false for
/// `verify-ca` only.
pub(super) fn connector(
    settings: &TlsSettings,
    check_names: bool,
) -> Result<MakeRustlsConnect, StoreError> {
    ensure_crypto_provider();
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .ok_or_else(|| refuse("no rustls crypto provider is installed".to_owned()))?;
    let mut roots = RootCertStore::empty();
    match settings.roots_bundle()? {
        Some(pem) => {
            for certificate in CertificateDer::pem_slice_iter(&pem) {
                let certificate = certificate
                    .map_err(|e| refuse(format!("the TLS CA bundle is not PEM: {e}")))?;
                roots.add(certificate).map_err(|e| {
                    refuse(format!(
                        "the TLS CA bundle holds a certificate rustls refuses: {e}"
                    ))
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let roots = Arc::new(roots);
    let verifier: Arc<dyn ServerCertVerifier> = if check_names {
        WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| refuse(format!("cannot verify with these TLS roots: {e}")))?
    } else {
        if roots.is_empty() {
            return Err(refuse("no TLS root to verify with".to_owned()));
        }
        Arc::new(ChainOnly {
            roots,
            provider: provider.clone(),
        })
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| refuse(format!("rustls refuses its own protocol versions: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match settings.client_identity() {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => {
            let chain = CertificateDer::pem_slice_iter(chain)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| refuse(format!("the TLS client certificate is not PEM: {e}")))?;
            let key = PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| refuse(format!("the TLS client key is not PEM: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| refuse(format!("the TLS client certificate is refused: {e}")))?
        }
    };
    Ok(MakeRustlsConnect::new(config))
}

/// `sslmode=verify-ca`: the chain up to a trusted root (validity, usage,
/// signatures, with rustls's own check), and not whether the certificate
/// names the host dialled. The chain is checked by the same public rustls
/// function its own verifier uses, not by ignoring a name error, so no
/// later check of that verifier can be skipped by mistake.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let certificate = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &certificate,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
