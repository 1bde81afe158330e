//! Throwaway TLS certificates for tests: a CA and a certificate it signed
//! for `localhost` and `127.0.0.1` (server and client use), made with the
//! `openssl` command in a temporary directory, removed on drop. No key
//! material is committed.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::{say_skipped, unique};

pub struct TestCerts {
    pub dir: PathBuf,
    /// The CA's certificate, PEM.
    pub ca: PathBuf,
    /// The leaf's certificate and key, PEM.
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCerts {
    /// Makes a CA and a leaf, or returns `None` (after saying so) when
    /// `openssl` is missing; with `TOWER_IDEMPOTENCY_REQUIRE_TLS=1` that is
    /// a failure instead.
    pub fn make_or_skip(test: &str) -> Option<Self> {
        let found = Command::new("openssl")
            .arg("version")
            .stdout(Stdio::null())
            .status()
            .is_ok();
        if !found {
            if std::env::var("TOWER_IDEMPOTENCY_REQUIRE_TLS").is_ok_and(|v| v == "1") {
                panic!("{test}: openssl is not on the PATH and TOWER_IDEMPOTENCY_REQUIRE_TLS=1");
            }
            say_skipped(&format!(
                "SKIPPED {test}: openssl is not on the PATH (it makes the test certificates)"
            ));
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "tower-idempotency-tls-{}-{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let certs = Self {
            ca: dir.join("ca.crt"),
            cert: dir.join("leaf.crt"),
            key: dir.join("leaf.key"),
            dir,
        };
        let ca_key = certs.dir.join("ca.key");
        let csr = certs.dir.join("leaf.csr");
        let ext = certs.dir.join("leaf.ext");
        std::fs::write(
            &ext,
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n",
        )
        .expect("write the extensions");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&certs.dir)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let path = |p: &PathBuf| p.to_str().expect("a UTF-8 path").to_owned();
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &path(&ca_key),
            "-out",
            &path(&certs.ca),
            "-days",
            "2",
            "-subj",
            "/CN=tower-idempotency test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &path(&certs.key),
            "-out",
            &path(&csr),
            "-subj",
            "/CN=localhost",
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &path(&csr),
            "-CA",
            &path(&certs.ca),
            "-CAkey",
            &path(&ca_key),
            "-CAcreateserial",
            "-out",
            &path(&certs.cert),
            "-days",
            "2",
            "-extfile",
            &path(&ext),
        ]);
        Some(certs)
    }

    /// The CA's certificate, PEM.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(&self.ca).expect("read the CA")
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
