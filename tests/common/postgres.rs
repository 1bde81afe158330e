//! PostgreSQL for tests: a database of its own on the shared server
//! ([`TestDatabase`], dropped with it), or a private server in a temporary
//! directory ([`PrivatePostgres`]) that fault tests can kill, freeze and
//! restart; a store on a database of its own ([`pg_fixture`]), and a
//! plain connection for business rows and inspection ([`connect`]).
//!
//! The shared server is `TOWER_IDEMPOTENCY_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable`: Debian's
//! server offers TLS with a certificate nobody can verify, and the tests
//! built with the `tls` feature would refuse it). Where it cannot be
//! reached, or `initdb`/`postgres` are missing, the tests say `SKIPPED` and
//! pass; with `TOWER_IDEMPOTENCY_REQUIRE_POSTGRES=1` they fail instead.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::store::{PostgresStore, conformance};

use super::{free_port, say_skipped, unique};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable";

fn admin_url() -> String {
    std::env::var("TOWER_IDEMPOTENCY_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// PostgreSQL is missing: a failure under
/// `TOWER_IDEMPOTENCY_REQUIRE_POSTGRES=1`, else a skip that says so.
fn missing(test: &str, why: &str) -> Option<std::convert::Infallible> {
    if std::env::var("TOWER_IDEMPOTENCY_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
        panic!("{test}: {why} and TOWER_IDEMPOTENCY_REQUIRE_POSTGRES=1");
    }
    say_skipped(&format!(
        "SKIPPED {test}: {why} (run PostgreSQL on 127.0.0.1:5432 or set TOWER_IDEMPOTENCY_POSTGRES_URL)"
    ));
    None
}

/// Runs `sql` on `url` in a runtime of its own (usable from `Drop`).
fn run_sql_blocking(url: &str, sql: &str) -> Result<(), String> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            client.batch_execute(&sql).await.map_err(|e| e.to_string())
        })
    })
    .join()
    .unwrap_or_else(|_| Err("panicked".to_owned()))
}

/// A database of its own on the shared server, dropped with it.
pub struct TestDatabase {
    pub url: String,
    name: String,
    admin: String,
}

impl TestDatabase {
    /// Creates one, or returns `None` (after saying so) when the server
    /// cannot be reached.
    pub fn create_or_skip(test: &str) -> Option<Self> {
        let admin = admin_url();
        let name = format!("tower_idempotency_{}_{}", std::process::id(), unique());
        if let Err(e) = run_sql_blocking(&admin, &format!("CREATE DATABASE {name}")) {
            match missing(
                test,
                &format!("PostgreSQL at {admin} is not reachable ({e})"),
            ) {
                None => return None,
            }
        }
        let (base, query) = match admin.split_once('?') {
            Some((base, query)) => (base, format!("?{query}")),
            None => (admin.as_str(), String::new()),
        };
        let url = match base.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}{query}"),
            None => format!("{base}/{name}{query}"),
        };
        Some(Self { url, name, admin })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = run_sql_blocking(
            &self.admin,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// A private PostgreSQL server: a cluster made by `initdb` in a temporary
/// directory, on a free port, killed on drop.
pub struct PrivatePostgres {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    /// Whether it speaks TLS (the fixture then connects over its Unix
    /// socket).
    tls: bool,
}

/// Whether the tests run as root, where PostgreSQL must run as `postgres`.
fn as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.starts_with(b"0\n"))
}

/// `program args…`, as the `postgres` user when we are root.
fn command(program: &str) -> Command {
    if as_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--", program]);
        cmd
    } else {
        Command::new(program)
    }
}

impl PrivatePostgres {
    /// Starts one, or returns `None` (after saying so) when `initdb` or
    /// `postgres` is missing.
    pub fn start_or_skip(test: &str) -> Option<Self> {
        Self::start(test, None)
    }

    /// Starts one whose TCP clients must use TLS (`ssl = on` with the
    /// leaf certificate of `certs`, and only `hostssl` lines in
    /// `pg_hba.conf`: plaintext is rejected), or returns `None` as
    /// [`start_or_skip`](Self::start_or_skip) does.
    #[cfg(feature = "tls")]
    pub fn start_tls_or_skip(test: &str, certs: &super::tls::TestCerts) -> Option<Self> {
        Self::start(test, Some(([&certs.cert, &certs.key, &certs.ca], false)))
    }

    /// Like [`start_tls_or_skip`](Self::start_tls_or_skip), but taking
    /// plaintext TCP clients too (as a server with `ssl = on` and `host`
    /// lines does): a client that would fall back to plaintext could.
    #[cfg(feature = "tls")]
    pub fn start_tls_and_plaintext_or_skip(
        test: &str,
        certs: &super::tls::TestCerts,
    ) -> Option<Self> {
        Self::start(test, Some(([&certs.cert, &certs.key, &certs.ca], true)))
    }

    fn start(test: &str, tls: Option<([&PathBuf; 3], bool)>) -> Option<Self> {
        let dir = std::env::temp_dir().join(format!(
            "tower-idempotency-pg-{}-{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        if as_root() {
            let owned = Command::new("chown")
                .args(["postgres:", dir.to_str().expect("utf-8 temp dir")])
                .status();
            if !owned.is_ok_and(|s| s.success()) {
                match missing(test, "there is no `postgres` user to run a private server") {
                    None => return None,
                }
            }
        }
        let init = command("initdb")
            .args(["-D", dir.join("data").to_str().expect("utf-8")])
            .args(["-U", "postgres", "-A", "trust", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !init.is_ok_and(|s| s.success()) {
            match missing(test, "initdb failed or is not on the PATH") {
                None => return None,
            }
        }
        if let Some(([cert, key, ca], plaintext_too)) = tls {
            let data = dir.join("data");
            for (from, to) in [(cert, "server.crt"), (key, "server.key"), (ca, "ca.crt")] {
                let to = data.join(to);
                std::fs::copy(from, &to).expect("copy the server's certificate");
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
                    .expect("chmod");
                if as_root() {
                    let owned = Command::new("chown")
                        .args(["postgres:", to.to_str().expect("utf-8")])
                        .status();
                    assert!(owned.is_ok_and(|s| s.success()), "chown {}", to.display());
                }
            }
            let mut conf = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("postgresql.conf"))
                .expect("postgresql.conf");
            use std::io::Write;
            writeln!(
                conf,
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'ca.crt'"
            )
            .expect("write postgresql.conf");
            // The role `certified` must also present a client certificate
            // signed by the same CA.
            let plaintext = if plaintext_too {
                "hostnossl all all 127.0.0.0/8 trust\n"
            } else {
                "hostnossl all all 0.0.0.0/0 reject\n"
            };
            std::fs::write(
                data.join("pg_hba.conf"),
                format!(
                    "local all all trust\n\
                     hostssl all certified 127.0.0.0/8 trust clientcert=verify-ca\n\
                     hostssl all all 127.0.0.0/8 trust\n\
                     {plaintext}"
                ),
            )
            .expect("write pg_hba.conf");
        }
        let mut server = Self {
            child: None,
            port: free_port(),
            dir,
            tls: tls.is_some(),
        };
        server.launch();
        if server.tls {
            run_sql_blocking(&server.admin_url(), "CREATE ROLE certified LOGIN SUPERUSER")
                .expect("create the role that needs a client certificate");
        }
        Some(server)
    }

    /// Its URL over TCP (plaintext: on a TLS-only server, add an `sslmode`
    /// and trust the test CA).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Where the fixture itself connects: the TCP URL, or for a TLS
    /// server its Unix socket (which takes plaintext).
    fn admin_url(&self) -> String {
        if self.tls {
            format!(
                "host={} port={} user=postgres dbname=postgres",
                self.dir.display(),
                self.port
            )
        } else {
            self.url()
        }
    }

    fn launch(&mut self) {
        let data = self.dir.join("data");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("log file");
        let child = command("postgres")
            .args(["-D", data.to_str().expect("utf-8")])
            .args(["-p", &self.port.to_string()])
            .args(["-k", self.dir.to_str().expect("utf-8")])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_connections=50"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn postgres");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if run_sql_blocking(&self.admin_url(), "SELECT 1").is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        panic!(
            "postgres did not start on port {}; its log:\n{log}",
            self.port
        );
    }

    /// The postmaster and its children (backends and auxiliary processes,
    /// each in a session of its own, so a process group does not reach
    /// them).
    fn processes(&self) -> Vec<String> {
        let Ok(pid_file) = std::fs::read_to_string(self.dir.join("data/postmaster.pid")) else {
            return Vec::new();
        };
        let Some(postmaster) = pid_file.lines().next().map(str::trim).map(str::to_owned) else {
            return Vec::new();
        };
        let children = Command::new("pgrep")
            .args(["-P", &postmaster])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_default();
        std::iter::once(postmaster)
            .chain(children.split_whitespace().map(str::to_owned))
            .collect()
    }

    /// Sends `signal` to the server's processes.
    fn signal_all(&self, signal: &str) {
        let pids = self.processes();
        if !pids.is_empty() {
            let _ = Command::new("kill")
                .arg(signal)
                .args(&pids)
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Continues the process we started: `runuser` (when we are root) stops
    /// itself when its child stops, and must go on to reap it.
    fn continue_child(&self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
    }

    /// `kill -9` of the server and every backend: a crash. What was
    /// committed survives in the data directory.
    pub fn kill(&mut self) {
        self.signal_all("-KILL");
        self.continue_child();
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        // A crashed postmaster leaves its pid file; the next start checks
        // that the pid is gone and recovers.
    }

    /// Starts it again on the same port and data (crash recovery first).
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// `SIGSTOP` to every process of the server: it stops answering.
    pub fn freeze(&self) {
        self.signal_all("-STOP");
    }

    /// `SIGCONT`: it answers again.
    pub fn thaw(&self) {
        self.signal_all("-CONT");
        self.continue_child();
    }

    /// Closes every client connection of the server (as a failover or a
    /// network cut would).
    pub fn drop_connections(&self) {
        let _ = run_sql_blocking(
            &self.admin_url(),
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.thaw();
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A store on a database of its own, its table migrated.
pub struct PgFixture {
    pub store: PostgresStore,
    pub db: TestDatabase,
}

impl conformance::Fixture for PgFixture {
    type Store = PostgresStore;
    fn store(&self) -> &PostgresStore {
        &self.store
    }
}

/// A [`PgFixture`] on a new database named after `test`, or `None` (and
/// `SKIPPED`) without PostgreSQL.
pub async fn pg_fixture(test: &str) -> Option<PgFixture> {
    let db = TestDatabase::create_or_skip(test)?;
    let store = PostgresStore::builder(&db.url)
        .expect("a URL")
        .fallback_check(Duration::from_millis(100))
        .build()
        .expect("build");
    store.migrate().await.expect("migrate");
    Some(PgFixture { store, db })
}

/// A plain connection to `url` (for business rows and inspection).
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

/// The fingerprint the PostgreSQL tests claim with.
pub const FP: Fingerprint = Fingerprint::from_bytes([7; 32]);
/// A short lease, for tests that let one lapse.
pub const LEASE: Duration = Duration::from_millis(300);
