//! A throwaway `redis-server` per test: free loopback port, temporary
//! directory, killed on drop; killable, restartable and freezable for fault
//! tests.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, say_skipped, unique};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

/// Starts a server, or returns `None` (after saying so) when `redis-server`
/// is not installed. With `TOWER_IDEMPOTENCY_REQUIRE_REDIS=1` a missing
/// server is a failure instead.
pub fn redis_or_skip(test: &str) -> Option<RedisServer> {
    RedisServer::start_with(test, &[])
}

impl RedisServer {
    pub fn start_with(test: &str, extra: &[&str]) -> Option<Self> {
        installed(test)?;
        Some(Self::launched(extra, free_port()))
    }

    /// Like [`start_with`](Self::start_with), on a port whose cluster bus
    /// port (10 000 higher) is free too.
    pub fn start_with_cluster_port(test: &str, extra: &[&str]) -> Option<Self> {
        installed(test)?;
        Some(Self::launched(extra, cluster_port()))
    }

    /// A server that speaks TLS only, on its port, with `certs`' leaf as
    /// its certificate, listening on 127.0.0.1 and 127.0.0.2 (a name its
    /// certificate does not carry); with `client_certificates`, clients
    /// must present one signed by the same CA.
    #[cfg(feature = "tls")]
    pub fn start_tls_or_skip(
        test: &str,
        certs: &super::tls::TestCerts,
        client_certificates: bool,
    ) -> Option<Self> {
        installed(test)?;
        let port = free_port();
        let mut args = tls_args(certs, port);
        args.extend(
            [
                "--tls-auth-clients",
                if client_certificates { "yes" } else { "no" },
                "--bind",
                "127.0.0.1",
                "127.0.0.2",
            ]
            .map(str::to_owned),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::launched_tls_or_skip(test, &args, port)
    }

    /// Like [`start_with_cluster_port`](Self::start_with_cluster_port),
    /// speaking TLS only, to clients and on the cluster bus.
    #[cfg(feature = "tls")]
    pub fn start_tls_with_cluster_port(
        test: &str,
        certs: &super::tls::TestCerts,
        extra: &[&str],
    ) -> Option<Self> {
        installed(test)?;
        let port = cluster_port();
        let mut args = tls_args(certs, port);
        args.extend(
            [
                "--tls-auth-clients",
                "no",
                "--tls-cluster",
                "yes",
                "--tls-replication",
                "yes",
            ]
            .map(str::to_owned),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::launched_tls_or_skip(test, &args, port)
    }

    /// Launches a TLS server; one that exits at once was built without TLS
    /// (or refused these settings): a skip that says so, or a failure under
    /// `TOWER_IDEMPOTENCY_REQUIRE_TLS=1`.
    #[cfg(feature = "tls")]
    fn launched_tls_or_skip(test: &str, args: &[&str], port: u16) -> Option<Self> {
        match Self::try_launched(args, port) {
            Ok(server) => Some(server),
            Err(log) => {
                let why = format!("redis-server would not speak TLS ({})", log.trim());
                if std::env::var("TOWER_IDEMPOTENCY_REQUIRE_TLS").is_ok_and(|v| v == "1") {
                    panic!("{test}: {why} and TOWER_IDEMPOTENCY_REQUIRE_TLS=1");
                }
                say_skipped(&format!("SKIPPED {test}: {why}"));
                None
            }
        }
    }

    fn launched(extra: &[&str], port: u16) -> Self {
        match Self::try_launched(extra, port) {
            Ok(server) => server,
            Err(log) => panic!("redis-server did not start on port {port}: {log}"),
        }
    }

    /// Starts one, or returns what it logged when it exited at once.
    fn try_launched(extra: &[&str], port: u16) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!(
            "tower-idempotency-{}-{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut server = Self {
            child: None,
            port,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.try_launch()?;
        Ok(server)
    }

    /// Whether the server process is running (not killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn launch(&mut self) {
        if let Err(log) = self.try_launch() {
            panic!("redis-server did not start on port {}: {log}", self.port);
        }
    }

    /// Starts the process and waits until its port takes connections; when
    /// it exits first, returns the end of its log.
    fn try_launch(&mut self) -> Result<(), String> {
        let log_path = self.dir.join("server.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--enable-debug-command", "yes"])
            .args(&self.extra)
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .is_some_and(|child| child.try_wait().is_ok_and(|status| status.is_some()));
            if exited {
                self.child = None;
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(tail.into_iter().rev().collect::<Vec<_>>().join(" / "));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err("nothing listened within 10 s".to_owned())
    }

    /// The server's address.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `kill -9`: the server and everything it held are gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again, empty, on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    fn signal(&self, sig: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args([sig, &child.id().to_string()])
                .status()
                .expect("kill");
            assert!(status.success());
        }
    }

    /// The server process's id, while it runs.
    #[allow(dead_code)] // Used by the benches only.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `kill -STOP`: the server stops answering but keeps its sockets.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// `kill -CONT`.
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    /// A plain connection for inspecting and poking the server.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.url()).unwrap();
        client.get_multiplexed_async_connection().await.unwrap()
    }

    /// The number of calls of `command` since the last `CONFIG RESETSTAT`.
    pub async fn calls(&self, command: &str) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    pub async fn reset_stats(&self) {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.thaw();
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free port whose cluster bus port (10 000 higher) is free too.
fn cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// A TLS-only server's arguments: TLS on `port`, no plaintext port, the
/// leaf of `certs` as its certificate, their CA for clients.
#[cfg(feature = "tls")]
fn tls_args(certs: &super::tls::TestCerts, port: u16) -> Vec<String> {
    let path = |p: &std::path::Path| p.to_str().expect("a UTF-8 path").to_owned();
    vec![
        "--port".to_owned(),
        "0".to_owned(),
        "--tls-port".to_owned(),
        port.to_string(),
        "--tls-cert-file".to_owned(),
        path(&certs.cert),
        "--tls-key-file".to_owned(),
        path(&certs.key),
        "--tls-ca-cert-file".to_owned(),
        path(&certs.ca),
    ]
}

/// `Some` when `redis-server` is on the PATH; see [`missing`].
fn installed(test: &str) -> Option<()> {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    if found {
        Some(())
    } else {
        missing(test, "redis-server")
    }
}

/// A missing tool: a failure under `TOWER_IDEMPOTENCY_REQUIRE_REDIS=1`,
/// else a skip that says so. Always `None`.
pub fn missing(test: &str, tool: &str) -> Option<()> {
    if std::env::var("TOWER_IDEMPOTENCY_REQUIRE_REDIS").is_ok_and(|v| v == "1") {
        panic!("{test}: {tool} is not on the PATH and TOWER_IDEMPOTENCY_REQUIRE_REDIS=1");
    }
    say_skipped(&format!(
        "SKIPPED {test}: {tool} is not on the PATH (install redis-server and redis-tools to run the Redis tests)"
    ));
    None
}
