//! TLS for a [`RedisStoreBuilder`](super::RedisStoreBuilder) (feature
//! `tls`): the shared settings as redis-rs takes them, and a certificate
//! that does not verify refused when the store is built.

use std::time::Duration;

use crate::store::StoreError;
use crate::store::tls::{TlsSettings, is_a_certificate_error, refuse};

/// The certificates as redis-rs takes them, the roots' file read: a bundle
/// replaces the default roots (redis-rs takes one root store).
pub(super) fn certificates(settings: &TlsSettings) -> Result<redis::TlsCertificates, StoreError> {
    let root_cert = settings.roots_bundle()?;
    let client_tls = settings
        .client_identity()
        .map(|(cert, key)| redis::ClientTlsConfig {
            client_cert: cert.to_vec(),
            client_key: key.to_vec(),
        });
    Ok(redis::TlsCertificates {
        client_tls,
        root_cert,
    })
}

/// Refuses a `rediss://…#insecure` address: it turns off every check of
/// the server's certificate, which this store never does (a private CA
/// goes in [`tls_ca_file`](super::RedisStoreBuilder::tls_ca_file)).
pub(super) fn refuse_insecure(info: &redis::ConnectionInfo) -> Result<(), StoreError> {
    if let redis::ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
        return Err(refuse(format!(
            "{} asks (with #insecure) not to verify the server's TLS certificate; \
             the store always verifies it: give the server's CA with tls_ca_file instead",
            info.addr()
        )));
    }
    Ok(())
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
        Ok(Err(e)) if is_a_certificate_error(&e) => Err(refuse(format!(
            "the Redis server's TLS certificate did not verify: {e}"
        ))),
        _ => Ok(()),
    }
}
