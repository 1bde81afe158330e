//! A randomized fault campaign: the at-most-once promise checked under
//! store, server, network and process faults, on the memory store, on Redis
//! and on Redis Cluster.
//!
//! Several instances (each a layer over its own handle on one shared
//! backend, wrapped in a `FaultStore`) serve many concurrent clients. The
//! clients send keys with duplicates (concurrent and sequential), retry on
//! 409 in flight and 503 like a real client, sometimes change the body
//! under a used key, and sometimes go away mid-request. Handlers record
//! every execution in a ledger and take random time, some longer than the
//! lease. Meanwhile a fault task injects store faults at random: failing
//! before an operation, applying it and losing its reply, delaying it
//! (sometimes a completion by more than a lease: a stall). Instances crash
//! at random: their executions freeze mid-handler, their store handle goes
//! dead, their clients see the connection reset, and a new instance (new
//! layer, new store handle) takes their place. On Redis, a TCP proxy per
//! instance adds latency, drops connections, black-holes them and leaves
//! them half-open, and the server itself is paused, put to sleep, made to
//! forget its scripts, and killed and restarted.
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
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use common::collect;
use http::{Request, Response, StatusCode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};
use tower_idempotency::engine::Executions;
use tower_idempotency::store::fault::{Fault, FaultStore, Operation};
use tower_idempotency::store::{MemoryStore, Store};
use tower_idempotency::{IdempotencyInfo, IdempotencyLayer, RequestBody, ResponseBody};

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
    /// Whether its instance crashed (while it ran, or later).
    crashed: watch::Receiver<bool>,
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
/// for (`x-delay-ms`), answers 201 with the execution's id. If its instance
/// crashes meanwhile, it freezes for good: nothing of it reaches the store.
async fn handle(
    ledger: Arc<Ledger>,
    crashed: watch::Receiver<bool>,
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
            crashed: crashed.clone(),
        });
    let mut crashed = crashed;
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(delay)) => {}
        () = crash_of(&mut crashed) => std::future::pending::<()>().await,
    }
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = StatusCode::CREATED;
    Ok(res)
}

/// Returns once the instance `crashed` watches has crashed.
async fn crash_of(crashed: &mut watch::Receiver<bool>) {
    let _ = crashed.wait_for(|c| *c).await;
}

/// What a client saw for one logical request (after its retries).
#[derive(Debug, Clone)]
struct Seen {
    key: String,
    status: StatusCode,
    body: Bytes,
    problem: Option<String>,
    /// How many data losses of the backend came before the request, if no
    /// other came before its answer.
    epoch: Option<u64>,
}

/// The figures of one campaign.
#[derive(Debug, Default)]
struct Summary {
    requests: usize,
    attempts: usize,
    abandoned: usize,
    /// Attempts cut by their instance's crash (the client saw a reset).
    resets: usize,
    crashes: usize,
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

type Service = BoxCloneSyncService<Request<Body>, Response<ResponseBody<Body>>, Infallible>;

/// Opens a new store handle on the backend for instance `i`.
type Connect<St> = Arc<dyn Fn(usize) -> Pin<Box<dyn Future<Output = St> + Send>> + Send + Sync>;

/// One instance, until it crashes: a layer over its own store handle.
struct Instance<St> {
    store: FaultStore<St>,
    service: Service,
    executions: Executions,
    crashed: watch::Sender<bool>,
}

impl<St: Store> Instance<St> {
    fn new(store: St, ledger: &Arc<Ledger>) -> Self {
        let store = FaultStore::new(store);
        let layer = IdempotencyLayer::new(store.clone())
            .lease(LEASE)
            .wait_for_in_flight(WAIT)
            .retry_after(Duration::from_millis(50));
        let (crashed, watching) = watch::channel(false);
        let ledger = ledger.clone();
        let service = layer.layer(tower::service_fn(move |req| {
            handle(ledger.clone(), watching.clone(), req)
        }));
        Self {
            store,
            executions: layer.executions().clone(),
            service: BoxCloneSyncService::new(service),
            crashed,
        }
    }

    /// The process dies: its store handle answers nothing any more, its
    /// handlers freeze, its clients see their connections reset.
    fn crash(&self) {
        self.store.clear();
        for op in [
            Operation::Claim,
            Operation::Complete,
            Operation::Release,
            Operation::Extend,
            Operation::Wait,
            Operation::Purge,
        ] {
            self.store.inject(op, Fault::FailBefore, usize::MAX);
        }
        self.crashed.send_replace(true);
    }
}

type Instances<St> = Arc<Vec<Mutex<Instance<St>>>>;

/// Runs a campaign over `INSTANCES` instances, each with a store handle from
/// `connect` (all on one backend), and checks its history; panics with the
/// seed on a violation.
async fn campaign<St: Store>(backend: &str, connect: Connect<St>, plan: &Plan) {
    eprintln!(
        "campaign on {backend}: seed {} for {:?} (TOWER_IDEMPOTENCY_CAMPAIGN_SEED={} reproduces the choices)",
        plan.seed, plan.duration, plan.seed
    );
    let ledger = Arc::new(Ledger {
        next: AtomicU64::new(0),
        by_key: Mutex::default(),
        data_losses: plan.data_losses.clone(),
    });
    let mut instances = Vec::new();
    for i in 0..INSTANCES {
        instances.push(Mutex::new(Instance::new(connect(i).await, &ledger)));
    }
    let instances: Instances<St> = Arc::new(instances);
    let deadline = Instant::now() + plan.duration;
    let summary = Arc::new(Mutex::new(Summary::default()));
    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));

    // The fault task: a random fault on a random instance every few tens of
    // milliseconds, none after the deadline.
    let fault_task = {
        let (instances, summary) = (instances.clone(), summary.clone());
        let mut rng = SmallRng::seed_from_u64(plan.seed ^ 0xfa17);
        tokio::spawn(async move {
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(rng.random_range(10..80))).await;
                let store = instances[rng.random_range(0..INSTANCES)]
                    .lock()
                    .unwrap()
                    .store
                    .clone();
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
                let lease_ms = LEASE.as_millis() as u64;
                let fault = match rng.random_range(0..3) {
                    0 => Fault::FailBefore,
                    1 => Fault::LoseReply,
                    // A stall: the completion arrives after the lease ran
                    // out and another owner may have taken the key over
                    // (a process pause, a slow network). The fence must
                    // refuse it.
                    _ if op == Operation::Complete && rng.random_bool(0.2) => Fault::Delay(
                        Duration::from_millis(rng.random_range(lease_ms..lease_ms * 5 / 2)),
                    ),
                    _ => Fault::Delay(Duration::from_millis(rng.random_range(1..lease_ms / 4))),
                };
                // One fault at a time per operation: faults that piled up
                // would hit one execution's renewals in a row.
                if store.planned(op) > 0 {
                    continue;
                }
                store.inject(op, fault, 1);
                let name = match fault {
                    Fault::Delay(d) if d >= LEASE => format!("{op:?}/Stall"),
                    _ => format!(
                        "{op:?}/{}",
                        format!("{fault:?}").split('(').next().unwrap_or("?")
                    ),
                };
                *summary.lock().unwrap().faults.entry(name).or_default() += 1;
            }
            for instance in instances.iter() {
                instance.lock().unwrap().store.clear();
            }
        })
    };

    // The crash task: now and then an instance dies mid-flight and a new
    // one (a new layer over a new store handle) takes its place.
    let crash_task = {
        let (instances, summary, ledger) = (instances.clone(), summary.clone(), ledger.clone());
        let connect = connect.clone();
        let mut rng = SmallRng::seed_from_u64(plan.seed ^ 0xc4a5);
        tokio::spawn(async move {
            loop {
                let pause = Duration::from_millis(rng.random_range(1000..4000));
                if Instant::now() + pause >= deadline {
                    break;
                }
                tokio::time::sleep(pause).await;
                let i = rng.random_range(0..INSTANCES);
                instances[i].lock().unwrap().crash();
                let replacement = Instance::new(connect(i).await, &ledger);
                *instances[i].lock().unwrap() = replacement;
                summary.lock().unwrap().crashes += 1;
            }
        })
    };

    // The clients. A request takes a new key, or (mostly) one of the
    // newest ones: duplicates, concurrent and sequential.
    let newest = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let data_losses = plan.data_losses.clone();
        let (instances, newest, summary, seen) = (
            instances.clone(),
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
                let epoch = data_losses.load(Ordering::SeqCst);
                let mut attempts = 0;
                let mut resets = 0;
                let outcome = loop {
                    attempts += 1;
                    let (svc, mut crashed) = {
                        let instance = instances[rng.random_range(0..INSTANCES)].lock().unwrap();
                        (instance.service.clone(), instance.crashed.subscribe())
                    };
                    let call = svc.oneshot(request(key, body, delay));
                    if goes_away {
                        // The client disconnects mid-request.
                        let wait = Duration::from_millis(rng.random_range(0..200));
                        let _ = tokio::time::timeout(wait, call).await;
                        break None;
                    }
                    let answered = tokio::select! {
                        answered = call => Some(answered),
                        () = crash_of(&mut crashed) => None,
                    };
                    let Some(answered) = answered else {
                        // The instance crashed: the connection was reset,
                        // and the client retries (on another instance).
                        resets += 1;
                        if attempts < 20 {
                            continue;
                        }
                        break None;
                    };
                    let answer = collect(answered.expect("infallible")).await;
                    let problem = problem_type(&answer.body);
                    let retry = matches!(answer.status, StatusCode::SERVICE_UNAVAILABLE)
                        || problem.as_deref() == Some("InFlight");
                    if retry && attempts < 20 {
                        tokio::time::sleep(Duration::from_millis(rng.random_range(10..60))).await;
                        continue;
                    }
                    let after = data_losses.load(Ordering::SeqCst);
                    break Some(Seen {
                        key: key.clone(),
                        status: answer.status,
                        body: answer.body,
                        problem,
                        epoch: (epoch == after).then_some(epoch),
                    });
                };
                let mut s = summary.lock().unwrap();
                s.requests += 1;
                s.attempts += attempts;
                s.resets += resets;
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
    crash_task.await.expect("the crash task panicked");

    // Liveness: once the faults stop, every key used is answerable within
    // a lease and a wait.
    let used: Vec<String> = ledger.executions().keys().cloned().collect();
    let mut finally: HashMap<String, Bytes> = HashMap::new();
    for key in &used {
        let svc = instances[0].lock().unwrap().service.clone();
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
                epoch: Some(plan.data_losses.load(Ordering::SeqCst)),
            });
        }
    }

    // No execution left running (but those frozen in a crashed instance).
    for instance in instances.iter() {
        let executions = instance.lock().unwrap().executions.clone();
        tokio::time::timeout(Duration::from_secs(10), executions.wait_idle())
            .await
            .unwrap_or_else(|_| panic!("seed {}: executions left running", plan.seed));
    }

    // The checker.
    let executions = ledger.executions();
    let mut summary = std::mem::take(&mut *summary.lock().unwrap());
    summary.executions = executions.values().map(Vec::len).sum();
    summary.keys_checked = used.len();
    let mut problems = Vec::new();
    // Keys with an explained double execution, and whether only data
    // losses explain it.
    let mut explained: HashMap<&str, bool> = HashMap::new();
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
                if pair[0].context.lease_lost() && *pair[0].crashed.borrow() {
                    Some("the earlier instance crashed mid-execution")
                } else if pair[0].context.lease_lost() {
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
                for cause in &causes {
                    *summary.explained_by.entry(*cause).or_default() += 1;
                }
                summary.explained_doubles += 1;
                // A key that ran again only because the backend lost its
                // data still answers one result per data epoch.
                let by_data_loss_only = causes.iter().all(|c| c.starts_with("Redis restarted"));
                explained.insert(key.as_str(), by_data_loss_only);
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
    // The first answer per key (and, for keys that ran again after a data
    // loss, per data epoch).
    let mut answered: HashMap<(&str, Option<u64>), &Bytes> = HashMap::new();
    let seen = seen.lock().unwrap();
    for s in seen.iter() {
        if s.status.is_success() {
            if !bodies.contains(&s.body) {
                problems.push(format!(
                    "key {}: a 2xx without a recorded execution: {:?}",
                    s.key, s.body
                ));
            }
            let slot = match explained.get(s.key.as_str()) {
                None => (s.key.as_str(), None),
                Some(true) if s.epoch.is_some() => (s.key.as_str(), s.epoch),
                // A lease lost: the stale owner's caller got its result.
                Some(_) => continue,
            };
            match answered.get(&slot) {
                Some(first) if *first != &s.body => problems.push(format!(
                    "key {}: answers differ: {:?} and {:?}",
                    s.key, first, s.body
                )),
                Some(_) => summary.replays_verified += 1,
                None => {
                    answered.insert(slot, &s.body);
                }
            }
        } else if s.problem.as_deref() == Some("KeyMismatch") {
            summary.mismatches_refused += 1;
        }
    }
    eprintln!("campaign on {backend}, seed {}: {summary:#?}", plan.seed);
    if summary.executions == 0 || summary.replays_verified == 0 {
        problems.push(format!("nothing was executed or replayed: {summary:?}"));
    }
    problems.dedup();
    problems.truncate(20);
    assert!(
        problems.is_empty(),
        "seed {} on {backend}: the checker found problems (the first 20):\n{}",
        plan.seed,
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_holds_under_random_store_faults_on_the_memory_store() {
    let store = MemoryStore::new();
    let plan = Plan::from_env();
    let connect: Connect<MemoryStore> = Arc::new(move |_| {
        let store = store.clone();
        Box::pin(async move { store })
    });
    campaign("memory", connect, &plan).await;
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

/// The campaign on `server`, with its server and network faults;
/// `persistent` says whether a restart keeps every write (then it explains
/// nothing). Each instance reaches Redis through a fault proxy of its own.
#[cfg(feature = "redis")]
async fn redis_campaign(
    backend: &str,
    server: common::redis_server::RedisServer,
    persistent: bool,
) {
    use common::fault_proxy::FaultProxy;
    use tower_idempotency::store::RedisStore;
    let mut proxies = Vec::new();
    for _ in 0..INSTANCES {
        proxies.push(Arc::new(
            FaultProxy::start(server.addr()).await.expect("a proxy"),
        ));
    }
    let urls: Vec<String> = proxies.iter().map(|p| p.redis_url()).collect();
    let connect: Connect<RedisStore> = Arc::new(move |i| {
        let url = urls[i].clone();
        Box::pin(async move { RedisStore::connect(&url).await.expect("connect") })
    });
    let plan = Plan::from_env();
    let server_faults = server_faults(server, &plan, persistent);
    // The proxies outlive the fault task: the liveness check needs them.
    let network_faults = network_faults(proxies.clone(), &plan);
    campaign(backend, connect, &plan).await;
    let (server_faults, _server) = server_faults.await.expect("the server fault task panicked");
    let network_faults = network_faults
        .await
        .expect("the network fault task panicked");
    eprintln!(
        "campaign on {backend}, seed {}: server faults {server_faults:?}, network faults {network_faults:?}",
        plan.seed
    );
}

/// Faults of the server itself, beside the store faults: Redis stops
/// answering for a while (`CLIENT PAUSE`, `DEBUG SLEEP`), forgets its
/// scripts (`SCRIPT FLUSH`), or is killed and restarted (empty, unless
/// `persistent`).
#[cfg(feature = "redis")]
fn server_faults(
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
}

/// Faults of the network between an instance and Redis, one at a time on a
/// random instance's proxy: latency for a while, dropped connections, a
/// black hole for a while (sometimes longer than the lease: what was sent
/// into it arrives late, after another owner may have taken the key), and
/// half-open connections.
#[cfg(feature = "redis")]
fn network_faults(
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

/// The campaign on a local three-primary Redis Cluster, each instance with
/// a cluster connection of its own, with the store faults, the crashes, and
/// nodes paused now and then.
#[cfg(feature = "redis-cluster")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_holds_under_random_faults_on_redis_cluster() {
    use redis::cluster_async::ClusterConnection;
    use tower_idempotency::store::RedisStore;
    let Some(cluster) = common::redis_cluster::RedisCluster::start_or_skip("campaign on cluster")
    else {
        return;
    };
    let urls = cluster.urls();
    let connect: Connect<RedisStore<ClusterConnection>> = Arc::new(move |_| {
        let urls = urls.clone();
        Box::pin(async move {
            RedisStore::builder(&urls[0])
                .expect("a URL")
                .build_cluster(&urls)
                .await
                .expect("a cluster connection")
        })
    });
    let plan = Plan::from_env();
    let node_faults = {
        let mut rng = SmallRng::seed_from_u64(plan.seed ^ 0xc105);
        let deadline = Instant::now() + plan.duration;
        let mut conns = Vec::new();
        for primary in &cluster.primaries {
            conns.push(primary.conn().await);
        }
        tokio::spawn(async move {
            let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
                let conn = &mut conns[rng.random_range(0..3)];
                let (name, cmd) = if rng.random_bool(0.6) {
                    let mut cmd = redis::cmd("CLIENT");
                    cmd.arg("PAUSE").arg(rng.random_range(50..400)).arg("ALL");
                    ("CLIENT PAUSE on a primary", cmd)
                } else {
                    let mut cmd = redis::cmd("SCRIPT");
                    cmd.arg("FLUSH");
                    ("SCRIPT FLUSH on a primary", cmd)
                };
                if cmd.query_async::<()>(conn).await.is_ok() {
                    *counts.entry(name).or_default() += 1;
                }
            }
            counts
        })
    };
    campaign("redis cluster", connect, &plan).await;
    let node_faults = node_faults.await.expect("the node fault task panicked");
    eprintln!(
        "campaign on redis cluster, seed {}: node faults {node_faults:?}",
        plan.seed
    );
}

/// The campaign on PostgreSQL, each instance with a store of its own (on
/// one shared pool) on one database of its own, with the store faults and
/// the crashes.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_holds_under_random_faults_on_postgres() {
    use tower_idempotency::store::PostgresStore;
    let Some(db) = common::postgres::TestDatabase::create_or_skip("campaign on postgres") else {
        return;
    };
    let url = db.url.clone();
    let first = PostgresStore::connect(&url).await.expect("a store");
    first.migrate().await.expect("migrate");
    // One pool for every instance: a crashed instance's handlers freeze
    // for good and keep its store, so pools of their own would keep their
    // connections open until the server ran out of them (a process that
    // really crashes closes its connections). Each instance still has its
    // own `LISTEN` connection.
    let config: tokio_postgres::Config = url.parse().expect("a URL");
    let manager = deadpool_postgres::Manager::from_config(
        config.clone(),
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(16)
        .wait_timeout(Some(Duration::from_secs(1)))
        .create_timeout(Some(Duration::from_secs(1)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .expect("a pool");
    let connect: Connect<PostgresStore> = Arc::new(move |_| {
        let (pool, config) = (pool.clone(), config.clone());
        Box::pin(async move {
            PostgresStore::builder_for_pool(pool, Some(config))
                .fallback_check(Duration::from_millis(200))
                .build()
                .expect("a store")
        })
    });
    let plan = Plan::from_env();
    campaign("postgres", connect, &plan).await;
    drop(db);
}
