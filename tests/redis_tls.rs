//! `RedisStore` over TLS (feature `tls`): a private `redis-server` that
//! speaks TLS only, its certificate signed by a CA made for the test.

mod common;

use std::time::Duration;

use common::redis_server::RedisServer;
use common::tls::TestCerts;
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::{Claim, RedisStore, Store, conformance};

fn rediss_url(server: &RedisServer) -> String {
    format!("rediss://localhost:{}", server.port)
}

/// The store contract holds over TLS, with the private CA from a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_contract_holds_over_tls() {
    let Some(certs) = TestCerts::make_or_skip("redis over TLS") else {
        return;
    };
    let Some(server) = RedisServer::start_tls_or_skip("redis over TLS", &certs) else {
        return;
    };
    let store = RedisStore::builder(&rediss_url(&server))
        .unwrap()
        .tls_ca_file(&certs.ca)
        .build()
        .await
        .unwrap();
    conformance::run_all(&store).await;
}

/// A claim through `store` on a new key, which must fail: the connection
/// is refused before anything is sent.
async fn claim_fails(store: &RedisStore, why: &str) {
    let key = StoreKey::from_parts(b"", format!("refused-{why}").as_bytes());
    let claim = store
        .claim(key, Fingerprint::of_bytes(b"x"), Duration::from_secs(30))
        .await;
    assert!(claim.is_err(), "{why}: {claim:?}");
}

/// A certificate that does not verify is never a fallback to plaintext:
/// a CA that did not sign the server's certificate, Mozilla's roots (which
/// do not hold the test CA), a name the certificate does not carry, or a
/// plain `redis://` URL to the TLS port all fail, and nothing is claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_does_not_verify_fails_every_operation() {
    let Some(certs) = TestCerts::make_or_skip("redis TLS refusals") else {
        return;
    };
    let Some(other) = TestCerts::make_or_skip("redis TLS refusals") else {
        return;
    };
    let Some(server) = RedisServer::start_tls_or_skip("redis TLS refusals", &certs) else {
        return;
    };
    let timeout = Duration::from_millis(500);
    let wrong_ca = RedisStore::builder(&rediss_url(&server))
        .unwrap()
        .operation_timeout(timeout)
        .tls_ca_pem(other.ca_pem())
        .build()
        .await
        .unwrap();
    claim_fails(&wrong_ca, "wrong CA").await;
    let default_roots = RedisStore::builder(&rediss_url(&server))
        .unwrap()
        .operation_timeout(timeout)
        .build()
        .await
        .unwrap();
    claim_fails(&default_roots, "Mozilla's roots").await;
    let wrong_name = RedisStore::builder(&format!("rediss://127.0.0.2:{}", server.port))
        .unwrap()
        .operation_timeout(timeout)
        .tls_ca_file(&certs.ca)
        .build()
        .await
        .unwrap();
    claim_fails(&wrong_name, "wrong name").await;
    let plain = RedisStore::builder(&format!("redis://localhost:{}", server.port))
        .unwrap()
        .operation_timeout(timeout)
        .build()
        .await
        .unwrap();
    claim_fails(&plain, "plaintext").await;
    // The right CA still works on the same server.
    let right = RedisStore::builder(&rediss_url(&server))
        .unwrap()
        .tls_ca_pem(certs.ca_pem())
        .build()
        .await
        .unwrap();
    let key = StoreKey::from_parts(b"", b"after");
    assert!(matches!(
        right
            .claim(key, Fingerprint::of_bytes(b"x"), Duration::from_secs(30))
            .await,
        Ok(Claim::Acquired(_))
    ));
}

/// TLS settings on a plain `redis://` URL are a configuration error, not a
/// silent plaintext connection.
#[tokio::test]
async fn tls_settings_on_a_plain_url_are_refused() {
    let built = RedisStore::builder("redis://127.0.0.1:1")
        .unwrap()
        .tls_ca_pem(b"not used".to_vec())
        .build()
        .await;
    let e = built.expect_err("refused");
    assert!(e.to_string().contains("configure"), "{e}");
}
