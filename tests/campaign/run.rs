//! The campaign itself: instances over one backend, clients with
//! duplicates and retries, the store faults and the crashes, and the
//! checker that judges the whole history.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::collect;
use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};
use tower_idempotency::engine::Executions;
use tower_idempotency::store::Store;
use tower_idempotency::store::fault::{Fault, FaultStore, Operation};
use tower_idempotency::{IdempotencyInfo, IdempotencyLayer, RequestBody, ResponseBody};

pub(crate) const INSTANCES: usize = 3;
pub(crate) const CLIENTS: usize = 12;
/// How many of the newest keys duplicates are drawn from.
pub(crate) const RECENT_KEYS: u64 = 24;
pub(crate) const LEASE: Duration = Duration::from_millis(600);
pub(crate) const WAIT: Duration = Duration::from_secs(2);

/// The campaign's knobs, from the environment.
pub(crate) struct Plan {
    pub(crate) seed: u64,
    pub(crate) duration: Duration,
    /// How many times the backend lost its data (a Redis restarted empty);
    /// bumped by whoever restarts it.
    pub(crate) data_losses: Arc<AtomicU64>,
}

impl Plan {
    pub(crate) fn from_env() -> Self {
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
pub(crate) struct Execution {
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
pub(crate) struct Ledger {
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
pub(crate) async fn handle(
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
pub(crate) async fn crash_of(crashed: &mut watch::Receiver<bool>) {
    let _ = crashed.wait_for(|c| *c).await;
}

/// What a client saw for one logical request (after its retries).
#[derive(Debug, Clone)]
pub(crate) struct Seen {
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
pub(crate) struct Summary {
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

pub(crate) fn request(key: &str, body: &'static str, delay_ms: u64) -> Request<Body> {
    Request::post("/pay")
        .header("idempotency-key", key)
        .header("x-delay-ms", delay_ms.to_string())
        .body(Body::from(body))
        .unwrap()
}

pub(crate) fn problem_type(body: &Bytes) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let t = v["type"].as_str()?;
    Some(t.rsplit('.').next().unwrap_or(t).to_owned())
}

pub(crate) type Service =
    BoxCloneSyncService<Request<Body>, Response<ResponseBody<Body>>, Infallible>;

/// Opens a new store handle on the backend for instance `i`.
pub(crate) type Connect<St> =
    Arc<dyn Fn(usize) -> Pin<Box<dyn Future<Output = St> + Send>> + Send + Sync>;

/// One instance, until it crashes: a layer over its own store handle.
pub(crate) struct Instance<St> {
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

pub(crate) type Instances<St> = Arc<Vec<Mutex<Instance<St>>>>;

/// Runs a campaign over `INSTANCES` instances, each with a store handle from
/// `connect` (all on one backend), and checks its history; panics with the
/// seed on a violation.
pub(crate) async fn campaign<St: Store>(backend: &str, connect: Connect<St>, plan: &Plan) {
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
