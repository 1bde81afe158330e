//! Faults of a Redis server and of the network in front of it, beside the
//! store faults of every campaign.
#![cfg(feature = "redis")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::common;
use crate::run::Plan;

/// Faults of the server itself, beside the store faults: Redis stops
/// answering for a while (`CLIENT PAUSE`, `DEBUG SLEEP`), forgets its
/// scripts (`SCRIPT FLUSH`), or is killed and restarted (empty, unless
/// `persistent`).
#[cfg(feature = "redis")]
pub(crate) fn server_faults(
    server: common::redis_server::RedisServer,
    plan: &Plan,
    persistent: bool,
) -> tokio::task::JoinHandle<(
    BTreeMap<&'static str, usize>,
    common::redis_server::RedisServer,
)> {
    let mut rng = SmallRng::seed_from_u64(plan.seed ^ 0x5e7e);
    let deadline = Instant::now() + plan.duration;
    let data_losses = plan.data_losses.clone();
    let mut server = server;
    tokio::spawn(async move {
        let mut conn = server.conn().await;
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
            let (name, cmd) = match rng.random_range(0..8) {
                0 => {
                    // `kill -9` and a restart: without persistence every
                    // claim and record is gone.
                    if !persistent {
                        data_losses.fetch_add(1, Ordering::SeqCst);
                    }
                    server = tokio::task::spawn_blocking(move || {
                        server.restart();
                        server
                    })
                    .await
                    .expect("restart");
                    conn = server.conn().await;
                    *counts.entry("kill -9 and restart").or_default() += 1;
                    continue;
                }
                1..=3 => {
                    let mut cmd = redis::cmd("CLIENT");
                    cmd.arg("PAUSE").arg(rng.random_range(50..400)).arg("ALL");
                    ("CLIENT PAUSE", cmd)
                }
                4 | 5 => {
                    let mut cmd = redis::cmd("DEBUG");
                    cmd.arg("SLEEP").arg(0.2);
                    ("DEBUG SLEEP", cmd)
                }
                _ => {
                    let mut cmd = redis::cmd("SCRIPT");
                    cmd.arg("FLUSH");
                    ("SCRIPT FLUSH", cmd)
                }
            };
            if cmd.query_async::<()>(&mut conn).await.is_ok() {
                *counts.entry(name).or_default() += 1;
            }
        }
        (counts, server)
    })
}

/// Faults of the network between an instance and Redis, one at a time on a
/// random instance's proxy: latency for a while, dropped connections, a
/// black hole for a while (sometimes longer than the lease: what was sent
/// into it arrives late, after another owner may have taken the key), and
/// half-open connections.
#[cfg(feature = "redis")]
pub(crate) fn network_faults(
    proxies: Vec<Arc<common::fault_proxy::FaultProxy>>,
    plan: &Plan,
) -> tokio::task::JoinHandle<BTreeMap<&'static str, usize>> {
    let mut rng = SmallRng::seed_from_u64(plan.seed ^ 0x7c9);
    let deadline = Instant::now() + plan.duration;
    tokio::spawn(async move {
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..1000))).await;
            let proxy = &proxies[rng.random_range(0..proxies.len())];
            let name = match rng.random_range(0..4) {
                0 => {
                    proxy.set_latency(Duration::from_millis(rng.random_range(20..300)));
                    tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
                    proxy.heal();
                    "latency"
                }
                1 => {
                    proxy.drop_connections();
                    "dropped connections"
                }
                2 => {
                    proxy.set_black_hole(true);
                    tokio::time::sleep(Duration::from_millis(rng.random_range(100..1500))).await;
                    proxy.heal();
                    "black hole"
                }
                _ => {
                    proxy.half_open();
                    "half-open connections"
                }
            };
            *counts.entry(name).or_default() += 1;
        }
        for proxy in &proxies {
            proxy.heal();
        }
        counts
    })
}
