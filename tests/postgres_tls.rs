//! `PostgresStore` over TLS (feature `tls`): a private PostgreSQL with
//! `ssl = on` whose `pg_hba.conf` rejects every plaintext TCP client, its
//! certificate signed by a CA made for the test.

mod common;

use std::time::Duration;

use common::error_chain;
use common::postgres::PrivatePostgres;
use common::tls::TestCerts;
use deadpool_postgres::{ManagerConfig, Pool, RecyclingMethod};
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::postgres::{ConnectOptions, SslMode};
use tower_idempotency::store::{Claim, PostgresStore, Store, conformance};

/// The server's URL by the name its certificate carries.
fn url(server: &PrivatePostgres, sslmode: &str) -> String {
    format!(
        "postgres://postgres@localhost:{}/postgres?sslmode={sslmode}",
        server.port
    )
}

async fn tls_server(test: &str) -> Option<(TestCerts, PrivatePostgres)> {
    let certs = TestCerts::make_or_skip(test)?;
    let server = PrivatePostgres::start_tls_or_skip(test, &certs)?;
    Some((certs, server))
}

/// The store contract holds over TLS (`verify-full`, the private CA from a
/// file), for the pool and the `LISTEN` connection: the suite's wake-ups
/// come well within its bound with no fallback check to help.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_contract_holds_over_tls() {
    let Some((certs, server)) = tls_server("postgres over TLS").await else {
        return;
    };
    let store = PostgresStore::builder(&url(&server, "verify-full"))
        .unwrap()
        .tls_ca_file(&certs.ca)
        .fallback_check(Duration::from_secs(60))
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    conformance::run_all(&store).await;
}

/// A store on the user's own TLS pool, built from the same
/// `ConnectOptions`, with its `LISTEN` connection over TLS through the
/// user's own connector: the contract holds, wake-ups included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_on_your_own_tls_pool_listens_over_tls() {
    let Some((certs, server)) = tls_server("postgres own TLS pool").await else {
        return;
    };
    let options = ConnectOptions::from_url(&url(&server, "verify-full"))
        .unwrap()
        .tls_ca_file(&certs.ca);
    let manager = options
        .manager(ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        })
        .unwrap();
    let pool = Pool::builder(manager).max_size(8).build().unwrap();

    // The user's own connector, as a pool they built by hand would have.
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for certificate in rustls::pki_types::CertificateDer::pem_slice_iter(&certs.ca_pem()) {
        roots.add(certificate.unwrap()).unwrap();
    }
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let store = PostgresStore::builder_for_pool(pool, Some(options.config().clone()))
        .notifications_tls(tokio_postgres_rustls::MakeRustlsConnect::new(config))
        .fallback_check(Duration::from_secs(60))
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    conformance::run_all(&store).await;
}

/// A claim through `store` on a new key, which must fail with `expected` in
/// its error's chain.
async fn claim_fails(store: &PostgresStore, why: &str, expected: &str) {
    let key = StoreKey::from_parts(b"", format!("refused-{why}").as_bytes());
    let claim = store
        .claim(key, Fingerprint::of_bytes(b"x"), Duration::from_secs(30))
        .await;
    let e = claim.expect_err(why);
    let chain = error_chain(&e);
    assert!(chain.contains(expected), "{why}: {chain}");
}

/// `connect` fails, saying the certificate did not verify and why.
async fn connect_refused(url: &str, why: &str, expected: &str) {
    let e = PostgresStore::connect(url).await.expect_err(why);
    let chain = error_chain(&e);
    assert!(
        chain.contains("certificate did not verify") && chain.contains(expected),
        "{why}: {chain}"
    );
}

/// A certificate that does not verify is never a fallback to plaintext:
/// Mozilla's roots (which do not hold the test CA) fail `verify-full`,
/// `require` and the default `prefer` alike; a CA that did not sign the
/// certificate fails; a host name the certificate does not carry fails
/// `verify-full` (and `require`, which rustls checks as fully) but not
/// `verify-ca`; `disable` is rejected by a server that takes TLS only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_does_not_verify_fails_every_operation() {
    let Some((certs, server)) = tls_server("postgres TLS refusals").await else {
        return;
    };
    let Some(other) = TestCerts::make_or_skip("postgres TLS refusals") else {
        return;
    };
    for mode in ["verify-full", "require", "prefer"] {
        connect_refused(
            &url(&server, mode),
            &format!("Mozilla's roots, {mode}"),
            "invalid peer certificate",
        )
        .await;
    }
    // The default mode (none in the URL) is `prefer`: it tries TLS first.
    connect_refused(
        &format!("postgres://postgres@localhost:{}/postgres", server.port),
        "no sslmode",
        "invalid peer certificate",
    )
    .await;

    let wrong_ca = PostgresStore::builder(&url(&server, "verify-full"))
        .unwrap()
        .tls_ca_pem(other.ca_pem())
        .operation_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    claim_fails(&wrong_ca, "wrong CA", "certificate did not verify").await;
    let e = wrong_ca.migrate().await.expect_err("wrong CA");
    assert!(
        error_chain(&e).contains("invalid peer certificate"),
        "{}",
        error_chain(&e)
    );

    // The certificate names localhost and 127.0.0.1; `host` is what is
    // checked, `hostaddr` where the connection goes.
    let other_name = |mode: &str| {
        format!(
            "postgres://postgres@db.invalid:{}/postgres?hostaddr=127.0.0.1&sslmode={mode}",
            server.port
        )
    };
    for mode in ["verify-full", "require"] {
        let store = PostgresStore::builder(&other_name(mode))
            .unwrap()
            .tls_ca_file(&certs.ca)
            .build()
            .unwrap();
        let e = store.migrate().await.expect_err(mode);
        let chain = error_chain(&e);
        assert!(
            chain.contains("certificate did not verify") && chain.contains("not valid for name"),
            "{mode}: {chain}"
        );
    }
    let store = PostgresStore::builder(&other_name("verify-ca"))
        .unwrap()
        .tls_ca_file(&certs.ca)
        .build()
        .unwrap();
    store
        .migrate()
        .await
        .expect("verify-ca does not check the name");
    let key = StoreKey::from_parts(b"", b"verify-ca");
    let claim = store
        .claim(key, Fingerprint::of_bytes(b"x"), Duration::from_secs(30))
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired { .. }), "{claim:?}");
    // …but it does check the chain.
    let wrong_ca = PostgresStore::builder(&other_name("verify-ca"))
        .unwrap()
        .tls_ca_pem(other.ca_pem())
        .build()
        .unwrap();
    let e = wrong_ca.migrate().await.expect_err("verify-ca, wrong CA");
    assert!(
        error_chain(&e).contains("certificate did not verify"),
        "{}",
        error_chain(&e)
    );

    let plain = PostgresStore::builder(&url(&server, "disable"))
        .unwrap()
        .operation_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    claim_fails(&plain, "plaintext", "no encryption").await;
}

/// On a server that takes plaintext too, `prefer` still never falls back
/// to it: a certificate that does not verify fails, though `disable` on
/// the same server works; with the right CA it goes over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_never_falls_back_to_plaintext() {
    let Some(certs) = TestCerts::make_or_skip("postgres TLS prefer") else {
        return;
    };
    let Some(server) =
        PrivatePostgres::start_tls_and_plaintext_or_skip("postgres TLS prefer", &certs)
    else {
        return;
    };
    let plain = PostgresStore::builder(&url(&server, "disable"))
        .unwrap()
        .build()
        .unwrap();
    plain.migrate().await.expect("this server takes plaintext");
    for url in [
        url(&server, "prefer"),
        format!("postgres://postgres@localhost:{}/postgres", server.port),
    ] {
        connect_refused(&url, "prefer, Mozilla's roots", "invalid peer certificate").await;
    }

    let options = ConnectOptions::from_url(&format!(
        "postgres://postgres@localhost:{}/postgres",
        server.port
    ))
    .unwrap()
    .tls_ca_file(&certs.ca);
    assert_eq!(options.ssl_mode(), SslMode::Prefer);
    let pool = Pool::builder(
        options
            .manager(ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            })
            .unwrap(),
    )
    .build()
    .unwrap();
    let client = pool.get().await.unwrap();
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "prefer went over plaintext");
}

/// A server that asks for a client certificate gets the one given to the
/// builder; without one, it refuses the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_when_given() {
    let Some((certs, server)) = tls_server("postgres TLS client certificate").await else {
        return;
    };
    // The role `certified` must present a client certificate signed by
    // the test CA.
    let via_cert_address = format!(
        "postgres://certified@localhost:{}/postgres?sslmode=verify-full",
        server.port
    );
    let without = PostgresStore::builder(&via_cert_address)
        .unwrap()
        .tls_ca_file(&certs.ca)
        .operation_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let e = without.migrate().await.expect_err("no client certificate");
    assert!(
        error_chain(&e).contains("requires a valid client certificate"),
        "{}",
        error_chain(&e)
    );
    let with = PostgresStore::builder(&via_cert_address)
        .unwrap()
        .tls_ca_file(&certs.ca)
        .tls_client_identity(
            std::fs::read(&certs.cert).unwrap(),
            std::fs::read(&certs.key).unwrap(),
        )
        .build()
        .unwrap();
    with.migrate().await.expect("with a client certificate");
}
