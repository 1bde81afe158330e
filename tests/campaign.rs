//! A randomized fault campaign: the at-most-once promise checked under
//! store faults, on the memory store and on Redis.
//!
//! Several instances (each a layer over its own handle on one shared
//! backend, wrapped in a `FaultStore`) serve many concurrent clients. The
//! clients send keys with duplicates (concurrent and sequential), retry on
//! 409 in flight and 503 like a real client, sometimes change the body
//! under a used key, and sometimes go away mid-request. Handlers record
//! every execution in a ledger and take random time, some longer than the
//! lease. Meanwhile a fault task injects store faults at random: failing
//! before an operation, applying it and losing its reply, delaying it.
//!
//! At the end a checker judges the whole history: at most one execution
//! per key, every answer for a key byte-identical, no 2xx without a
//! recorded execution, fences that never go backwards, every key
//! answerable once the faults stop, and no execution left running.
//!
//! The seed comes from `TOWER_IDEMPOTENCY_CAMPAIGN_SEED` (default: random,
//! printed) and the duration from `TOWER_IDEMPOTENCY_CAMPAIGN_SECS`
//! (default 8 seconds per backend). A failure prints the seed that
//! reproduces its schedule of choices (thread timing still varies).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use common::collect;
use http::{Request, Response, StatusCode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_idempotency::store::fault::{Fault, FaultStore, Operation};
use tower_idempotency::store::{MemoryStore, Store};
use tower_idempotency::{IdempotencyInfo, IdempotencyLayer, RequestBody};

const INSTANCES: usize = 3;
const CLIENTS: usize = 12;
/// How many of the newest keys duplicates are drawn from.
const RECENT_KEYS: u64 = 24;
const LEASE: Duration = Duration::from_millis(600);
const WAIT: Duration = Duration::from_secs(2);

/// The campaign's knobs, from the environment.
struct Plan {
    seed: u64,
    duration: Duration,
    /// How many times the backend lost its data (a Redis restarted empty);
    /// bumped by whoever restarts it.
    data_losses: Arc<AtomicU64>,
}

impl Plan {
    fn from_env() -> Self {
        let seed = std::env::var("TOWER_IDEMPOTENCY_CAMPAIGN_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| SmallRng::from_os_rng().random());
        let secs = std::env::var("TOWER_IDEMPOTENCY_CAMPAIGN_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(8);
        Self {
            seed,
            duration: Duration::from_secs(secs),
            data_losses: Arc::default(),
        }
    }
}

/// One execution of the handler, as the ledger saw it.
#[derive(Debug, Clone)]
struct Execution {
    id: u64,
    fence: u64,
    body: Bytes,
    /// How many data losses of the backend came before it started.
    epoch: u64,
    /// Shares the execution's lease state, so the checker sees whether the
    /// lease was lost, even after the handler returned.
    context: tower_idempotency::engine::ExecutionContext,
}

/// Every execution, per idempotency key, in the order they started.
struct Ledger {
    next: AtomicU64,
    by_key: Mutex<BTreeMap<String, Vec<Execution>>>,
    data_losses: Arc<AtomicU64>,
}

impl Ledger {
    fn executions(&self) -> BTreeMap<String, Vec<Execution>> {
        self.by_key.lock().unwrap().clone()
    }
}

/// The handler: records the execution, takes the time the client asked
/// for (`x-delay-ms`), answers 201 with the execution's id.
async fn handle(
    ledger: Arc<Ledger>,
    req: Request<RequestBody<Body>>,
) -> Result<Response<Body>, Infallible> {
    let info = req.extensions().get::<IdempotencyInfo>().cloned();
    let delay = req
        .headers()
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0u64);
    let Some(info) = info else {
        return Ok(Response::new(Body::from("unguarded")));
    };
    let id = ledger.next.fetch_add(1, Ordering::SeqCst);
    let body = Bytes::from(format!("exec-{id}:{}", info.key().as_str()));
    ledger
        .by_key
        .lock()
        .unwrap()
        .entry(info.key().as_str().to_owned())
        .or_default()
        .push(Execution {
            id,
            fence: info.execution().owner_token().fence(),
            body: body.clone(),
            epoch: ledger.data_losses.load(Ordering::SeqCst),
            context: info.execution().clone(),
        });
    tokio::time::sleep(Duration::from_millis(delay)).await;
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = StatusCode::CREATED;
    Ok(res)
}

/// What a client saw for one logical request (after its retries).
#[derive(Debug, Clone)]
struct Seen {
    key: String,
    status: StatusCode,
    body: Bytes,
    problem: Option<String>,
}

/// The figures of one campaign.
#[derive(Debug, Default)]
struct Summary {
    requests: usize,
    attempts: usize,
    abandoned: usize,
    faults: BTreeMap<String, usize>,
    executions: usize,
    replays_verified: usize,
    mismatches_refused: usize,
    keys_checked: usize,
    explained_doubles: usize,
    explained_by: BTreeMap<&'static str, usize>,
}

fn request(key: &str, body: &'static str, delay_ms: u64) -> Request<Body> {
    Request::post("/pay")
        .header("idempotency-key", key)
        .header("x-delay-ms", delay_ms.to_string())
        .body(Body::from(body))
        .unwrap()
}

fn problem_type(body: &Bytes) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let t = v["type"].as_str()?;
    Some(t.rsplit('.').next().unwrap_or(t).to_owned())
}

/// Runs a campaign over `stores` (one handle per instance, all on one
/// backend) and checks its history; panics with the seed on a violation.
async fn campaign<St: Store>(backend: &str, stores: Vec<St>, plan: &Plan) -> Summary {
    eprintln!(
        "campaign on {backend}: seed {} for {:?} (TOWER_IDEMPOTENCY_CAMPAIGN_SEED={} reproduces the choices)",
        plan.seed, plan.duration, plan.seed
    );
    let ledger = Arc::new(Ledger {
        next: AtomicU64::new(0),
        by_key: Mutex::default(),
        data_losses: plan.data_losses.clone(),
    });
    let faulty: Vec<FaultStore<St>> = stores.into_iter().map(FaultStore::new).collect();
    let layers: Vec<_> = faulty
        .iter()
        .map(|store| {
            IdempotencyLayer::new(store.clone())
                .lease(LEASE)
                .wait_for_in_flight(WAIT)
                .retry_after(Duration::from_millis(50))
        })
        .collect();
    let services: Vec<_> = layers
        .iter()
        .map(|layer| {
            let ledger = ledger.clone();
            layer.layer(tower::service_fn(move |req| handle(ledger.clone(), req)))
        })
        .collect();
    let deadline = Instant::now() + plan.duration;
    let summary = Arc::new(Mutex::new(Summary::default()));
    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));

    // The fault task: a random fault on a random instance every few tens of
    // milliseconds, none after the deadline.
    let fault_task = {
        let (faulty, summary) = (faulty.clone(), summary.clone());
        let mut rng = SmallRng::seed_from_u64(plan.seed ^ 0xfa17);
        tokio::spawn(async move {
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(rng.random_range(10..80))).await;
                let store = &faulty[rng.random_range(0..faulty.len())];
                let op = [
                    Operation::Claim,
                    Operation::Complete,
                    Operation::Release,
                    Operation::Extend,
                    Operation::Wait,
                ][rng.random_range(0..5)];
                // A long execution is the main caller of `extend`, so it
                // may meet several renewal faults in a row and lose its
                // lease: the checker explains such a double execution by
                // the lost lease (the README's at-least-once limit).
                let fault = match rng.random_range(0..3) {
                    0 => Fault::FailBefore,
                    1 => Fault::LoseReply,
                    _ => Fault::Delay(Duration::from_millis(
                        rng.random_range(1..LEASE.as_millis() as u64 / 4),
                    )),
                };
                // One fault at a time per operation: faults that piled up
                // would hit one execution's renewals in a row.
                if store.planned(op) > 0 {
                    continue;
                }
                store.inject(op, fault, 1);
                let name = format!(
                    "{op:?}/{}",
                    format!("{fault:?}").split('(').next().unwrap_or("?")
                );
                *summary.lock().unwrap().faults.entry(name).or_default() += 1;
            }
            for store in &faulty {
                store.clear();
            }
        })
    };

    // The clients. A request takes a new key, or (mostly) one of the
    // newest ones: duplicates, concurrent and sequential.
    let newest = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (services, newest, summary, seen) = (
            services.clone(),
            newest.clone(),
            summary.clone(),
            seen.clone(),
        );
        let mut rng = SmallRng::seed_from_u64(plan.seed.wrapping_add(c as u64));
        clients.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let n = if rng.random_bool(0.2) {
                    newest.fetch_add(1, Ordering::SeqCst) + 1
                } else {
                    newest
                        .load(Ordering::SeqCst)
                        .saturating_sub(rng.random_range(0..RECENT_KEYS))
                };
                let key = &format!("k{n}");
                // One body per key; sometimes another one under a used key.
                let body = if rng.random_bool(0.05) {
                    "changed"
                } else {
                    "original"
                };
                let delay = if rng.random_bool(0.1) {
                    rng.random_range(LEASE.as_millis() as u64..2 * LEASE.as_millis() as u64)
                } else {
                    rng.random_range(0..100)
                };
                let goes_away = rng.random_bool(0.1);
                let mut attempts = 0;
                let outcome = loop {
                    attempts += 1;
                    let svc = services[rng.random_range(0..services.len())].clone();
                    let call = svc.oneshot(request(key, body, delay));
                    if goes_away {
                        // The client disconnects mid-request.
                        let wait = Duration::from_millis(rng.random_range(0..200));
                        let _ = tokio::time::timeout(wait, call).await;
                        break None;
                    }
                    let answer = collect(call.await.expect("infallible")).await;
                    let problem = problem_type(&answer.body);
                    let retry = matches!(answer.status, StatusCode::SERVICE_UNAVAILABLE)
                        || problem.as_deref() == Some("InFlight");
                    if retry && attempts < 20 {
                        tokio::time::sleep(Duration::from_millis(rng.random_range(10..60))).await;
                        continue;
                    }
                    break Some(Seen {
                        key: key.clone(),
                        status: answer.status,
                        body: answer.body,
                        problem,
                    });
                };
                let mut s = summary.lock().unwrap();
                s.requests += 1;
                s.attempts += attempts;
                match outcome {
                    Some(outcome) => seen.lock().unwrap().push(outcome),
                    None => s.abandoned += 1,
                }
            }
        }));
    }
    for client in clients {
        client.await.expect("a client panicked");
    }
    fault_task.await.expect("the fault task panicked");

    // Liveness: once the faults stop, every key used is answerable within
    // a lease and a wait.
    let used: Vec<String> = ledger.executions().keys().cloned().collect();
    let mut finally: HashMap<String, Bytes> = HashMap::new();
    for key in &used {
        let svc = services[0].clone();
        let started = Instant::now();
        let answer = loop {
            let answer = collect(
                svc.clone()
                    .oneshot(request(key, "original", 0))
                    .await
                    .unwrap(),
            )
            .await;
            let problem = problem_type(&answer.body);
            let busy = answer.status == StatusCode::SERVICE_UNAVAILABLE
                || problem.as_deref() == Some("InFlight");
            if !busy || started.elapsed() > LEASE + WAIT + Duration::from_secs(1) {
                break (answer, problem);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (answer, problem) = answer;
        assert!(
            answer.status.is_success() || problem.as_deref() == Some("KeyMismatch"),
            "seed {}: key {key} is stuck after the faults stopped: {} {:?}",
            plan.seed,
            answer.status,
            problem
        );
        if answer.status.is_success() {
            finally.insert(key.clone(), answer.body.clone());
            seen.lock().unwrap().push(Seen {
                key: key.clone(),
                status: answer.status,
                body: answer.body,
                problem,
            });
        }
    }

    // No execution left running.
    for layer in &layers {
        tokio::time::timeout(Duration::from_secs(10), layer.executions().wait_idle())
            .await
            .unwrap_or_else(|_| panic!("seed {}: executions left running", plan.seed));
    }

    // The checker.
    let executions = ledger.executions();
    let mut summary = std::mem::take(&mut *summary.lock().unwrap());
    summary.executions = executions.values().map(Vec::len).sum();
    summary.keys_checked = used.len();
    let mut problems = Vec::new();
    let mut explained = HashSet::new();
    for (key, runs) in &executions {
        if runs.len() > 1 {
            let ids: Vec<u64> = runs.iter().map(|r| r.id).collect();
            // A later execution is explained when every earlier one lost
            // its lease (the store let it expire while it ran), and the
            // newest owner's result is the one kept: a stale owner never
            // overwrites it (the fence check).
            let newest_kept = finally
                .get(key)
                .is_none_or(|body| runs.last().is_some_and(|r| r.body == *body));
            if !newest_kept {
                problems.push(format!(
                    "key {key}: a stale owner's result was kept, not the newest execution's ({ids:?})"
                ));
            }
            // Or when the backend lost its data between the two (Redis
            // restarted empty: the README's "as safe as your Redis").
            let explained_by = |pair: &[Execution]| {
                if pair[0].context.lease_lost() {
                    Some("the earlier lease was lost")
                } else if pair[1].epoch > pair[0].epoch {
                    Some("Redis restarted empty between them")
                } else {
                    None
                }
            };
            let causes: Option<Vec<&str>> = runs.windows(2).map(explained_by).collect();
            if let Some(causes) = causes {
                if summary.explained_doubles < 5 {
                    eprintln!(
                        "key {key} executed {} times (ids {ids:?}): explained, {}",
                        runs.len(),
                        causes.join("; ")
                    );
                }
                for cause in causes {
                    *summary.explained_by.entry(cause).or_default() += 1;
                }
                summary.explained_doubles += 1;
                explained.insert(key.as_str());
            } else {
                problems.push(format!(
                    "key {key} executed {} times (ids {ids:?}) with no lease lost and no data lost",
                    runs.len()
                ));
            }
        }
        if runs.windows(2).any(|w| w[1].fence <= w[0].fence) {
            problems.push(format!("key {key}: fences went backwards: {runs:?}"));
        }
    }
    let bodies: HashSet<&Bytes> = executions.values().flatten().map(|e| &e.body).collect();
    let mut answered: HashMap<&str, &Bytes> = HashMap::new();
    let seen = seen.lock().unwrap();
    for s in seen.iter() {
        if s.status.is_success() {
            if !bodies.contains(&s.body) {
                problems.push(format!(
                    "key {}: a 2xx without a recorded execution: {:?}",
                    s.key, s.body
                ));
            }
            match answered.get(s.key.as_str()) {
                Some(_) if explained.contains(s.key.as_str()) => {}
                Some(first) if *first != &s.body => problems.push(format!(
                    "key {}: answers differ: {:?} and {:?}",
                    s.key, first, s.body
                )),
                Some(_) => summary.replays_verified += 1,
                None => {
                    answered.insert(&s.key, &s.body);
                }
            }
        } else if s.problem.as_deref() == Some("KeyMismatch") {
            summary.mismatches_refused += 1;
        }
    }
    eprintln!("campaign on {backend}, seed {}: {summary:#?}", plan.seed);
    problems.dedup();
    problems.truncate(20);
    assert!(
        problems.is_empty(),
        "seed {} on {backend}: the checker found problems (the first 20):\n{}",
        plan.seed,
        problems.join("\n")
    );
    summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_holds_under_random_store_faults_on_the_memory_store() {
    let store = MemoryStore::new();
    let plan = Plan::from_env();
    let summary = campaign("memory", vec![store.clone(); INSTANCES], &plan).await;
    assert!(
        summary.executions > 0 && summary.replays_verified > 0,
        "{summary:?}"
    );
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_holds_under_random_store_faults_on_redis() {
    let Some(server) = common::redis_server::redis_or_skip("campaign on redis") else {
        return;
    };
    redis_campaign("redis", server, false).await;
}

/// With `appendonly yes` and `appendfsync always`, a `kill -9` loses
/// nothing: a restart explains no double execution.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_holds_under_random_faults_on_a_redis_that_persists_every_write() {
    let Some(server) = common::redis_server::RedisServer::start_with(
        "campaign on persistent redis",
        &["--appendonly", "yes", "--appendfsync", "always"],
    ) else {
        return;
    };
    redis_campaign("redis with appendfsync always", server, true).await;
}

/// The campaign on `server`, with its server faults; `persistent` says
/// whether a restart keeps every write (then it explains nothing).
#[cfg(feature = "redis")]
async fn redis_campaign(
    backend: &str,
    server: common::redis_server::RedisServer,
    persistent: bool,
) {
    use tower_idempotency::store::RedisStore;
    let mut stores = Vec::new();
    for _ in 0..INSTANCES {
        stores.push(RedisStore::connect(&server.url()).await.expect("connect"));
    }
    let plan = Plan::from_env();
    // Faults of the server itself, beside the store faults: Redis stops
    // answering for a while (`CLIENT PAUSE`, `DEBUG SLEEP`), forgets its
    // scripts (`SCRIPT FLUSH`), or is killed and restarted empty.
    let server_faults = {
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
                        // record and claim is lost.
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
    };
    let summary = campaign(backend, stores, &plan).await;
    let (server_faults, _server) = server_faults.await.expect("the server fault task panicked");
    eprintln!(
        "campaign on {backend}, seed {}: server faults {server_faults:?}",
        plan.seed
    );
    assert!(
        summary.executions > 0 && summary.replays_verified > 0,
        "{summary:?}"
    );
}
