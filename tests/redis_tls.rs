//! `RedisStore` over TLS (feature `tls`): a private `redis-server` that
//! speaks TLS only, its certificate signed by a CA made for the test.

mod common;

use std::time::Duration;

use common::error_chain;
use common::redis_server::RedisServer;
use common::tls::TestCerts;
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::{Claim, RedisStore, Store, StoreErrorKind, conformance};

fn rediss_url(server: &RedisServer) -> String {
    format!("rediss://localhost:{}", server.port)
}

/// The store contract holds over TLS, with the private CA from a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_contract_holds_over_tls() {
    let Some(certs) = TestCerts::make_or_skip("redis over TLS") else {
        return;
    };
    let Some(server) = RedisServer::start_tls_or_skip("redis over TLS", &certs, false) else {
        return;
    };
    // No fallback check within the suite's wake-up bound: waiters are woken
    // by notifications, over TLS too.
    let store = RedisStore::builder(&rediss_url(&server))
        .unwrap()
        .tls_ca_file(&certs.ca)
        .fallback_check(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    conformance::run_all(&store).await;
}

/// A claim through `store` on a new key, which must fail, with `expected`
/// in its error's chain: the connection is refused before anything is sent.
async fn claim_fails(store: &RedisStore, why: &str, expected: &str) {
    let key = StoreKey::from_parts(b"", format!("refused-{why}").as_bytes());
    let claim = store
        .claim(key, Fingerprint::of_bytes(b"x"), Duration::from_secs(30))
        .await;
    let e = claim.expect_err(why);
    let chain = error_chain(&e);
    assert!(chain.contains(expected), "{why}: {chain}");
}

/// Building a store whose server's certificate does not verify fails,
/// saying so, with `expected` in the error's chain.
async fn build_refused(
    builder: tower_idempotency::store::RedisStoreBuilder,
    why: &str,
    expected: &str,
) {
    let e = builder.build().await.expect_err(why);
    assert_eq!(e.kind(), StoreErrorKind::Configuration, "{why}");
    let chain = error_chain(&e);
    assert!(
        chain.contains("certificate did not verify") && chain.contains(expected),
        "{why}: {chain}"
    );
}

/// A certificate that does not verify is never a fallback to plaintext:
/// a CA that did not sign the server's certificate, Mozilla's roots (which
/// do not hold the test CA) or a name the certificate does not carry fail
/// the store's build, so a process refuses to start; a plain `redis://`
/// URL to the TLS port fails every operation. Nothing is claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_does_not_verify_fails_every_operation() {
    let Some(certs) = TestCerts::make_or_skip("redis TLS refusals") else {
        return;
    };
    let Some(other) = TestCerts::make_or_skip("redis TLS refusals") else {
        return;
    };
    let Some(server) = RedisServer::start_tls_or_skip("redis TLS refusals", &certs, false) else {
        return;
    };
    let timeout = Duration::from_millis(500);
    build_refused(
        RedisStore::builder(&rediss_url(&server))
            .unwrap()
            .operation_timeout(timeout)
            .tls_ca_pem(other.ca_pem()),
        "wrong CA",
        "invalid peer certificate",
    )
    .await;
    build_refused(
        RedisStore::builder(&rediss_url(&server))
            .unwrap()
            .operation_timeout(timeout),
        "Mozilla's roots",
        "invalid peer certificate",
    )
    .await;
    build_refused(
        RedisStore::builder(&format!("rediss://127.0.0.2:{}", server.port))
            .unwrap()
            .operation_timeout(timeout)
            .tls_ca_file(&certs.ca),
        "wrong name",
        "not valid for name",
    )
    .await;
    let plain = RedisStore::builder(&format!("redis://localhost:{}", server.port))
        .unwrap()
        .operation_timeout(timeout)
        .build()
        .await
        .unwrap();
    claim_fails(&plain, "plaintext", "").await;
    // The right CA still works on the same server.
    let right = RedisStore::builder(&rediss_url(&server))
        .unwrap()
        .tls_ca_pem(certs.ca_pem())
        .build()
        .await
        .unwrap();
    for why in ["plaintext"] {
        let key = StoreKey::from_parts(b"", format!("refused-{why}").as_bytes());
        assert!(
            matches!(
                right
                    .claim(key, Fingerprint::of_bytes(b"x"), Duration::from_secs(30))
                    .await,
                Ok(Claim::Acquired(_))
            ),
            "{why}: nothing was claimed through the refused connection"
        );
    }
}

/// A Redis that asks for client certificates refuses a store without one,
/// and serves one that presents a certificate its CA signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_when_asked_for() {
    let Some(certs) = TestCerts::make_or_skip("redis TLS client certificates") else {
        return;
    };
    let Some(server) =
        RedisServer::start_tls_or_skip("redis TLS client certificates", &certs, true)
    else {
        return;
    };
    // Refused at the handshake (the build fails) or at the first command.
    let without = RedisStore::builder(&rediss_url(&server))
        .unwrap()
        .operation_timeout(Duration::from_millis(500))
        .tls_ca_file(&certs.ca)
        .build()
        .await;
    if let Ok(without) = without {
        claim_fails(&without, "no client certificate", "").await;
    }
    let key_pem = std::fs::read(&certs.key).unwrap();
    let cert_pem = std::fs::read(&certs.cert).unwrap();
    let with = RedisStore::builder(&rediss_url(&server))
        .unwrap()
        .tls_ca_file(&certs.ca)
        .tls_client_identity(cert_pem, key_pem)
        .build()
        .await
        .unwrap();
    let key = StoreKey::from_parts(b"", b"identified");
    assert!(matches!(
        with.claim(key, Fingerprint::of_bytes(b"x"), Duration::from_secs(30))
            .await,
        Ok(Claim::Acquired(_))
    ));
    // Its key never shows in the builder's `Debug`.
    let shown = format!(
        "{:?}",
        RedisStore::builder(&rediss_url(&server))
            .unwrap()
            .tls_client_identity(b"CERT".to_vec(), b"SECRET-KEY".to_vec())
    );
    assert!(
        !shown.contains("SECRET") && !shown.contains("83, 69, 67"),
        "{shown}"
    );
}

/// A CA bundle that holds no certificate is refused when the store is
/// built, not left to fail every connection later.
#[tokio::test]
async fn a_ca_bundle_without_a_certificate_is_refused() {
    for pem in [b"".to_vec(), b"not a certificate".to_vec()] {
        let built = RedisStore::builder("rediss://localhost:1")
            .unwrap()
            .tls_ca_pem(pem)
            .build()
            .await;
        let e = built.expect_err("refused");
        let shown = format!("{e}: {:?}", std::error::Error::source(&e));
        assert!(shown.contains("CA bundle"), "{shown}");
    }
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
    let shown = format!("{e}: {:?}", std::error::Error::source(&e));
    assert!(shown.contains("not rediss://"), "{shown}");
}

/// A Redis that is down is not a certificate that does not verify: the
/// store builds (and connects once Redis is back), as without TLS.
#[tokio::test]
async fn a_tls_store_still_builds_while_redis_is_down() {
    let Some(certs) = TestCerts::make_or_skip("redis TLS while down") else {
        return;
    };
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = nowhere.local_addr().unwrap().port();
    drop(nowhere);
    let built = RedisStore::builder(&format!("rediss://localhost:{port}"))
        .unwrap()
        .operation_timeout(Duration::from_millis(300))
        .tls_ca_file(&certs.ca)
        .build()
        .await;
    assert!(built.is_ok(), "{:?}", built.err());
}

/// `#insecure` (every check of the certificate off) is refused when the
/// store is built, for a single server and for cluster nodes alike.
#[tokio::test]
async fn an_insecure_url_is_refused() {
    let e = RedisStore::builder("rediss://localhost:1/#insecure")
        .unwrap()
        .build()
        .await
        .expect_err("#insecure");
    assert!(error_chain(&e).contains("#insecure"), "{}", error_chain(&e));
    #[cfg(feature = "redis-cluster")]
    {
        let e = RedisStore::builder("rediss://localhost:1")
            .unwrap()
            .build_cluster(&["rediss://localhost:1", "rediss://localhost:2/#insecure"])
            .await
            .expect_err("#insecure");
        assert!(error_chain(&e).contains("#insecure"), "{}", error_chain(&e));
    }
}
