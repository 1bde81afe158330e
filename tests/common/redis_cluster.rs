//! A throwaway local Redis Cluster: three primaries on free loopback ports
//! in a temporary directory, created with `redis-cli --cluster create`,
//! stopped on drop. No Docker. Each primary is a [`RedisServer`], so one can
//! be killed or frozen; `cluster-require-full-coverage no` keeps the other
//! shards serving when one is down.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::redis_server::RedisServer;

pub struct RedisCluster {
    pub primaries: Vec<RedisServer>,
    /// The CA of a cluster that speaks TLS only (clients and bus).
    tls_ca: Option<std::path::PathBuf>,
}

/// The settings every primary gets.
const CLUSTER_ARGS: [&str; 8] = [
    "--cluster-enabled",
    "yes",
    "--cluster-config-file",
    "nodes.conf",
    "--cluster-node-timeout",
    "2000",
    "--cluster-require-full-coverage",
    "no",
];

impl RedisCluster {
    /// Starts a cluster, or returns `None` (after saying so) when
    /// `redis-server` or `redis-cli` is missing; with
    /// `TOWER_IDEMPOTENCY_REQUIRE_REDIS=1` a missing one is a failure.
    pub fn start_or_skip(test: &str) -> Option<Self> {
        let cluster = Self::start_unformed_or_skip(test)?;
        cluster.form();
        Some(cluster)
    }

    /// Starts the three primaries without forming the cluster, so that they
    /// can be configured first (for example, to announce the address of a
    /// proxy in front of each); [`form`](Self::form) then forms it.
    pub fn start_unformed_or_skip(test: &str) -> Option<Self> {
        cli_installed(test)?;
        let mut primaries = Vec::new();
        for _ in 0..3 {
            primaries.push(RedisServer::start_with_cluster_port(test, &CLUSTER_ARGS)?);
        }
        Some(Self {
            primaries,
            tls_ca: None,
        })
    }

    /// Starts and forms a cluster that speaks TLS only, to clients and on
    /// its bus, with the leaf of `certs` on every node; `None` as
    /// [`start_or_skip`](Self::start_or_skip), or when `redis-server` has
    /// no TLS.
    #[cfg(feature = "tls")]
    pub fn start_tls_or_skip(test: &str, certs: &super::tls::TestCerts) -> Option<Self> {
        cli_installed(test)?;
        let mut primaries = Vec::new();
        for _ in 0..3 {
            primaries.push(RedisServer::start_tls_with_cluster_port(
                test,
                certs,
                &CLUSTER_ARGS,
            )?);
        }
        let cluster = Self {
            primaries,
            tls_ca: Some(certs.ca.clone()),
        };
        cluster.form();
        Some(cluster)
    }

    /// `redis-cli`, over TLS to a TLS cluster.
    fn cli(&self) -> Command {
        let mut cli = Command::new("redis-cli");
        if let Some(ca) = &self.tls_ca {
            cli.arg("--tls").arg("--cacert").arg(ca);
        }
        cli
    }

    /// Forms the cluster of the primaries and waits until it serves.
    pub fn form(&self) {
        self.create();
        self.wait_until_ok();
    }

    fn addresses(&self) -> Vec<String> {
        self.primaries
            .iter()
            .map(|p| format!("127.0.0.1:{}", p.port))
            .collect()
    }

    /// `redis://` URLs of the primaries (`rediss://` for a TLS cluster).
    pub fn urls(&self) -> Vec<String> {
        let scheme = if self.tls_ca.is_some() {
            "rediss"
        } else {
            "redis"
        };
        self.primaries
            .iter()
            .map(|p| format!("{scheme}://127.0.0.1:{}", p.port))
            .collect()
    }

    fn create(&self) {
        for _attempt in 0..5 {
            let status = self
                .cli()
                .arg("--cluster")
                .arg("create")
                .args(self.addresses())
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("run redis-cli");
            if status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("redis-cli --cluster create failed five times");
    }

    fn wait_until_ok(&self) {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            let ok = self.primaries.iter().all(|p| {
                self.cli()
                    .args(["-p", &p.port.to_string(), "cluster", "info"])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
            });
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the cluster did not reach cluster_state:ok within 30 s");
    }

    /// The index of the primary that serves `key_name` (by `CLUSTER
    /// KEYSLOT` and the slot ranges `--cluster create` assigns in order).
    pub fn primary_of(&self, key_name: &str) -> usize {
        let live = self
            .primaries
            .iter()
            .find(|p| p.is_running())
            .expect("a live primary");
        let out = self
            .cli()
            .args(["-p", &live.port.to_string(), "cluster", "keyslot", key_name])
            .output()
            .expect("redis-cli");
        let slot: u32 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a slot number");
        match slot {
            0..=5460 => 0,
            5461..=10922 => 1,
            _ => 2,
        }
    }
}

/// `Some` when `redis-cli` is on the PATH.
fn cli_installed(test: &str) -> Option<()> {
    let cli = Command::new("redis-cli")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    if cli {
        Some(())
    } else {
        super::redis_server::missing(test, "redis-cli")
    }
}
