//! The payments demo: `POST /process-payment` made safe to retry.
//!
//! Run with:
//!
//! ```sh
//! cargo run --example payments
//! ```
//!
//! then, in another terminal:
//!
//! ```sh
//! # First charge: takes about 2 s (simulated processing), answers 201.
//! curl -i -X POST localhost:3000/process-payment \
//!      -H 'Idempotency-Key: order-42' -H 'Content-Type: application/json' \
//!      -d '{"amount": 100, "currency": "GHS"}'
//! # Same key, same body: instant, identical body, `idempotent-replayed: true`.
//! curl -i -X POST localhost:3000/process-payment \
//!      -H 'Idempotency-Key: order-42' -H 'Content-Type: application/json' \
//!      -d '{"amount": 100, "currency": "GHS"}'
//! # Same key, different body: 409 problem+json, nothing charged.
//! curl -i -X POST localhost:3000/process-payment \
//!      -H 'Idempotency-Key: order-42' -H 'Content-Type: application/json' \
//!      -d '{"amount": 500, "currency": "GHS"}'
//! # The ledger: one charge.
//! curl localhost:3000/payments
//! ```
//!
//! Flags: `--addr` (default `127.0.0.1:3000`), `--delay-ms` (simulated
//! processing time, default 2000), `--no-idempotency` (same routes without
//! the layer, to measure its cost), `--store memory|redis|redis-cluster|postgres`,
//! `--prefill N` (store N records before serving), `--memory-max-mib`
//! (the in-memory store's bound, default 64), `--fingerprint bytes|json`
//! (`json`: a retry whose JSON body has other member order, whitespace or
//! escapes is still the same charge; needs `--features json`),
//! `--hand-written-guard` (with `--store memory`, `redis` or `postgres`: a
//! hand-written guard on a moka cache, Redis or PostgreSQL instead of the
//! layer, the benchmarks' floors), `--unfenced-ledger` (with `--store
//! postgres`: the ledger row without the fence, as the floor writes it; for
//! benchmarks only), `--redis-url` (default `redis://127.0.0.1:6379`, or the cluster's seed
//! nodes, comma-separated; needs `--features redis` or `--features
//! redis-cluster`) and `--postgres-url` (default
//! `postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable`; needs
//! `--features postgres`), `--tls-ca-file` (a CA bundle for `rediss://` and
//! for PostgreSQL's `sslmode=verify-full`; needs `--features tls`). Two instances on two ports sharing one Redis form a small
//! fleet:
//!
//! ```sh
//! cargo run --features redis --example payments -- --store redis --addr 127.0.0.1:3000 &
//! cargo run --features redis --example payments -- --store redis --addr 127.0.0.1:3001 &
//! ```
//!
//! With `--store postgres`, the idempotency records and the ledger live in
//! one database (tables `idempotency_keys` and `payments`, created at
//! start), and each charge writes its ledger row in a transaction fenced by
//! `PostgresStore::fence`: a charge whose claim was taken over (a pause
//! longer than the lease) rolls back instead of committing a second row.
//! `GET /payments` reads the table, so every instance shows the same
//! ledger.
//!
//! Stops cleanly on Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use clap::Parser;
use serde::{Deserialize, Serialize};
use tower::ServiceBuilder;
use tower_idempotency::fingerprint::FingerprintMode;
use tower_idempotency::store::{MemoryStore, Store};
use tower_idempotency::{IdempotencyInfo, IdempotencyLayer};
use tracing_subscriber::EnvFilter;

/// The payments demo server.
#[derive(Debug, Parser)]
#[command(about = "A payments API made safe to retry with tower-idempotency")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    addr: SocketAddr,
    /// Simulated processing time of a charge, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    delay_ms: u64,
    /// Serve the same routes without the idempotency layer.
    #[arg(long)]
    no_idempotency: bool,
    /// Where idempotency records live.
    #[arg(long, value_enum, default_value_t = StoreKind::Memory)]
    store: StoreKind,
    /// The Redis to use with `--store redis`; with `--store redis-cluster`,
    /// the cluster's seed nodes, comma-separated.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// The database to use with `--store postgres`.
    #[arg(
        long,
        default_value = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
    )]
    postgres_url: String,
    /// A PEM bundle of the CA that signed the server's certificate, trusted
    /// (in place of Mozilla's roots) on `rediss://` URLs and PostgreSQL URLs
    /// whose `sslmode` asks for TLS; needs a build with `--features tls`.
    #[arg(long)]
    tls_ca_file: Option<std::path::PathBuf>,
    /// With `--store memory`, `redis` or `postgres`: guard the charge route
    /// with a hand-written guard instead of the layer (the benchmarks'
    /// floors). Memory: a moka cache bounded by bytes as the store is, one
    /// lookup before the work, one insert of the response after. Redis: one
    /// `SET NX PX GET` before the work, one `SET PX` of the response after.
    /// PostgreSQL: `INSERT … ON CONFLICT DO NOTHING` before the work, one
    /// `UPDATE` of the response after, one `SELECT` per replay.
    #[arg(long)]
    hand_written_guard: bool,
    /// With `--store postgres`: write each charge's ledger row without the
    /// fence, in a transaction of its own, as the hand-written guard's
    /// ledger does (the benchmarks' like-for-like comparison). A charge
    /// whose claim was taken over may then be recorded twice: never for
    /// real use.
    #[arg(long)]
    unfenced_ledger: bool,
    /// Store this many completed records (of the size of a charge's) before
    /// serving, for the benchmarks that compare a nearly empty store with a
    /// full one.
    #[arg(long, default_value_t = 0)]
    prefill: u64,
    /// The in-memory store's bound on its records, in MiB.
    #[arg(long, default_value_t = 64)]
    memory_max_mib: u64,
    /// How a retry's body is compared with the first request's: `bytes`
    /// (exactly as sent) or `json` (by meaning: member order, whitespace
    /// and escapes do not count; needs a build with `--features json`).
    #[arg(long, value_enum, default_value_t = FingerprintKind::Bytes)]
    fingerprint: FingerprintKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FingerprintKind {
    /// The body's bytes, exactly as sent.
    Bytes,
    /// A JSON body by its meaning.
    Json,
}

/// The layer's fingerprint mode for `--fingerprint`.
fn fingerprint_mode(args: &Args) -> Result<FingerprintMode, Box<dyn std::error::Error>> {
    match args.fingerprint {
        FingerprintKind::Bytes => Ok(FingerprintMode::bytes()),
        #[cfg(feature = "json")]
        FingerprintKind::Json => Ok(FingerprintMode::json()),
        #[cfg(not(feature = "json"))]
        FingerprintKind::Json => {
            Err("this build has no JSON fingerprints: run with `--features json`".into())
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    /// In this process only.
    Memory,
    /// Shared by every instance pointed at the same Redis.
    Redis,
    /// Shared by every instance pointed at the same Redis Cluster.
    RedisCluster,
    /// Shared by every instance pointed at the same PostgreSQL database,
    /// with the ledger in the same database.
    Postgres,
}

#[derive(Debug, Deserialize)]
struct ChargeRequest {
    amount: u64,
    currency: String,
}

#[derive(Debug, Clone, Serialize)]
struct Payment {
    id: String,
    amount: u64,
    currency: String,
    message: String,
}

#[derive(Clone)]
struct AppState {
    delay: Duration,
    ledger: Ledger,
    next_id: Arc<AtomicU64>,
    id_prefix: Arc<str>,
}

/// Where charges are recorded.
#[derive(Clone)]
enum Ledger {
    /// In this process.
    Memory(Arc<Mutex<Vec<Payment>>>),
    /// In the `payments` table, each row fenced by the idempotency store
    /// (unless `fenced` is false: `--unfenced-ledger`).
    #[cfg(feature = "postgres")]
    Postgres {
        pool: deadpool_postgres::Pool,
        store: tower_idempotency::store::PostgresStore,
        fenced: bool,
    },
}

impl Ledger {
    /// Records `payment`; with PostgreSQL, only if this execution still owns
    /// its idempotency key (`info`), in the same transaction.
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    async fn record(
        &self,
        payment: &Payment,
        info: Option<&IdempotencyInfo>,
    ) -> Result<(), Response> {
        match self {
            Ledger::Memory(payments) => {
                payments
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(payment.clone());
                Ok(())
            }
            #[cfg(feature = "postgres")]
            Ledger::Postgres {
                pool,
                store,
                fenced,
            } => {
                let unavailable = |e: &dyn std::fmt::Display| {
                    tracing::warn!(error = %e, "ledger unavailable");
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Json(serde_json::json!({ "error": "ledger unavailable" })),
                    )
                        .into_response()
                };
                let mut client = pool.get().await.map_err(|e| unavailable(&e))?;
                let tx = client.transaction().await.map_err(|e| unavailable(&e))?;
                let amount = i64::try_from(payment.amount).unwrap_or(i64::MAX);
                // Prepared once per connection (the pool's statement cache).
                let insert = tx
                    .prepare_cached(
                        "INSERT INTO payments (id, amount, currency, message) VALUES ($1, $2, $3, $4)",
                    )
                    .await
                    .map_err(|e| unavailable(&e))?;
                tx.execute(
                    &insert,
                    &[&payment.id, &amount, &payment.currency, &payment.message],
                )
                .await
                .map_err(|e| unavailable(&e))?;
                if let Some(info) = info.filter(|_| *fenced) {
                    match store.fence(&tx, info.execution()).await {
                        Ok(()) => {}
                        Err(tower_idempotency::store::FenceError::Lost) => {
                            // Dropping `tx` rolls the row back.
                            return Err((
                                StatusCode::CONFLICT,
                                Json(serde_json::json!({ "error": "this charge's claim was taken over; nothing was recorded" })),
                            )
                                .into_response());
                        }
                        Err(e) => return Err(unavailable(&e)),
                    }
                }
                tx.commit().await.map_err(|e| unavailable(&e))
            }
        }
    }

    async fn list(&self) -> Result<Vec<Payment>, Response> {
        match self {
            Ledger::Memory(payments) => {
                Ok(payments.lock().unwrap_or_else(|e| e.into_inner()).clone())
            }
            #[cfg(feature = "postgres")]
            Ledger::Postgres { pool, .. } => {
                let failed = |e: &dyn std::fmt::Display| {
                    tracing::warn!(error = %e, "ledger unavailable");
                    StatusCode::SERVICE_UNAVAILABLE.into_response()
                };
                let client = pool.get().await.map_err(|e| failed(&e))?;
                let rows = client
                    .query("SELECT id, amount, currency, message FROM payments ORDER BY created_at, id", &[])
                    .await
                    .map_err(|e| failed(&e))?;
                Ok(rows
                    .iter()
                    .map(|row| Payment {
                        id: row.get(0),
                        amount: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
                        currency: row.get(2),
                        message: row.get(3),
                    })
                    .collect())
            }
        }
    }
}

fn bad_request(error: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({ "error": error })),
    )
        .into_response()
}

async fn process_payment(
    State(state): State<AppState>,
    info: Option<Extension<IdempotencyInfo>>,
    body: Bytes,
) -> Response {
    let Ok(charge) = serde_json::from_slice::<ChargeRequest>(&body) else {
        return bad_request(
            "Invalid body: expected {\"amount\": <positive integer>, \"currency\": \"<3 letters>\"}",
        );
    };
    if charge.amount == 0 {
        return bad_request("Invalid body: amount must be a positive integer");
    }
    if charge.currency.len() != 3 || !charge.currency.bytes().all(|b| b.is_ascii_alphabetic()) {
        return bad_request("Invalid body: currency must be 3 letters");
    }
    // The card network.
    // (A zero-length sleep would still wait for the timer's next 1 ms tick.)
    if !state.delay.is_zero() {
        tokio::time::sleep(state.delay).await;
    }
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let payment = Payment {
        id: format!("pay_{}_{n:06}", state.id_prefix),
        amount: charge.amount,
        message: format!("Charged {} {}", charge.amount, charge.currency),
        currency: charge.currency,
    };
    if let Err(refused) = state
        .ledger
        .record(&payment, info.as_ref().map(|i| &i.0))
        .await
    {
        return refused;
    }
    tracing::info!(id = %payment.id, amount = payment.amount, currency = %payment.currency, "charged");
    (StatusCode::CREATED, Json(payment)).into_response()
}

async fn list_payments(State(state): State<AppState>) -> Response {
    match state.ledger.list().await {
        Ok(payments) => Json(payments).into_response(),
        Err(refused) => refused,
    }
}

async fn healthz() -> &'static str {
    "ok"
}

/// Builds the router; `guard` wraps the charge route with the layer.
fn app(
    args: &Args,
    ledger: Ledger,
    guard: impl FnOnce(Router<AppState>) -> Router<AppState>,
) -> Router {
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let state = AppState {
        delay: Duration::from_millis(args.delay_ms),
        ledger,
        next_id: Arc::new(AtomicU64::new(1)),
        id_prefix: format!("{started:x}").into(),
    };
    let charges = Router::new().route("/process-payment", post(process_payment));
    let charges = if args.no_idempotency {
        charges
    } else {
        guard(charges)
    };
    charges
        .route("/payments", get(list_payments))
        .route("/healthz", get(healthz))
        .with_state(state)
}

fn memory_ledger() -> Ledger {
    Ledger::Memory(Arc::default())
}

/// One pool for the idempotency store and the ledger; both tables made if
/// missing.
#[cfg(feature = "postgres")]
async fn postgres_ledger(
    args: &Args,
) -> Result<(Ledger, tower_idempotency::store::PostgresStore), Box<dyn std::error::Error>> {
    // `sslmode` as libpq reads it (`verify-full` included), and the same
    // TLS for the pool and the store's `LISTEN` connection.
    let options = tower_idempotency::store::postgres::ConnectOptions::from_url(&args.postgres_url)?;
    let options = match &args.tls_ca_file {
        None => options,
        #[cfg(feature = "tls")]
        Some(path) => options.tls_ca_file(path),
        #[cfg(not(feature = "tls"))]
        Some(_) => return Err("--tls-ca-file needs a build with `--features tls`".into()),
    };
    let manager = options.manager(deadpool_postgres::ManagerConfig {
        recycling_method: deadpool_postgres::RecyclingMethod::Fast,
    })?;
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(32)
        .wait_timeout(Some(Duration::from_secs(1)))
        .create_timeout(Some(Duration::from_secs(1)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()?;
    let store = tower_idempotency::store::PostgresStore::builder_for_pool(pool.clone(), None)
        .notifications(options)
        .build()?;
    // The first statement: a server whose certificate does not verify
    // stops the demo here, before it serves a charge.
    store.migrate().await?;
    // Every connection the pool may open, opened now: a start under load
    // does not make its first requests wait for them.
    store.warm_up(32).await?;
    // Instances may start together: they take turns on an advisory lock
    // (concurrent `CREATE TABLE IF NOT EXISTS` can fail on the catalog).
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(hashtext('payments demo ledger'));
         CREATE TABLE IF NOT EXISTS payments (
             id         text        PRIMARY KEY,
             amount     bigint      NOT NULL,
             currency   text        NOT NULL,
             message    text        NOT NULL,
             created_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    tx.commit().await?;
    drop(client);
    Ok((
        Ledger::Postgres {
            pool,
            store: store.clone(),
            fenced: !args.unfenced_ledger,
        },
        store,
    ))
}

/// The memory floor for the benchmarks (`--hand-written-guard` with
/// `--store memory`): a moka cache bounded by bytes, one lookup before the
/// handler, one insert of the collected response after; the same file the
/// in-process benchmarks measure.
#[path = "../benches/support/memory_floor.rs"]
mod hand_written_memory;

/// The PostgreSQL floor for the benchmarks: what a user would write by hand
/// on the same pool. `INSERT … ON CONFLICT DO NOTHING` claims the key
/// before the work; one `UPDATE` stores the response after it; a key that
/// was already there is read with one `SELECT` and replayed, or refused
/// while its response is missing. The ledger row is written as the layer's
/// demo writes it, in its own transaction (without a fence). No
/// fingerprint, no lease, no fencing, no waiting, no release on failure:
/// the floor's cost, not a guard to copy.
#[cfg(feature = "postgres")]
mod hand_written_postgres {
    use axum::body::Body;
    use axum::extract::{Request, State};
    use axum::http::{StatusCode, header};
    use axum::middleware::Next;
    use axum::response::{IntoResponse, Response};

    pub async fn migrate(pool: &deadpool_postgres::Pool) -> Result<(), Box<dyn std::error::Error>> {
        pool.get()
            .await?
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS floor_keys (
                     key    text     PRIMARY KEY,
                     status smallint,
                     body   bytea
                 )",
            )
            .await?;
        Ok(())
    }

    pub async fn guard(
        State(pool): State<deadpool_postgres::Pool>,
        request: Request,
        next: Next,
    ) -> Response {
        let Some(key) = request
            .headers()
            .get("idempotency-key")
            .map(|k| String::from_utf8_lossy(k.as_bytes()).into_owned())
        else {
            return next.run(request).await;
        };
        let Ok(client) = pool.get().await else {
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        };
        // Prepared once per connection, as the store prepares its own.
        let Ok(insert) = client
            .prepare_cached("INSERT INTO floor_keys (key) VALUES ($1) ON CONFLICT DO NOTHING")
            .await
        else {
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        };
        let inserted = client.execute(&insert, &[&key]).await;
        match inserted {
            Err(_) => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
            Ok(0) => {
                let stored = match client
                    .prepare_cached("SELECT status, body FROM floor_keys WHERE key = $1")
                    .await
                {
                    Ok(select) => client.query_opt(&select, &[&key]).await,
                    Err(e) => Err(e),
                };
                return match stored {
                    Ok(Some(row)) => match (
                        row.get::<_, Option<i16>>(0),
                        row.get::<_, Option<Vec<u8>>>(1),
                    ) {
                        (Some(status), Some(body)) => (
                            StatusCode::from_u16(u16::try_from(status).unwrap_or(500))
                                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                            [(header::CONTENT_TYPE, "application/json")],
                            body,
                        )
                            .into_response(),
                        _ => StatusCode::CONFLICT.into_response(),
                    },
                    _ => StatusCode::SERVICE_UNAVAILABLE.into_response(),
                };
            }
            Ok(_) => {}
        }
        // The connection goes back to the pool while the handler runs.
        drop(client);
        let response = next.run(request).await;
        let (parts, body) = response.into_parts();
        let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        };
        let status = i16::try_from(parts.status.as_u16()).unwrap_or(500);
        let stored = match pool.get().await {
            Ok(client) => match client
                .prepare_cached("UPDATE floor_keys SET status = $2, body = $3 WHERE key = $1")
                .await
            {
                Ok(update) => client
                    .execute(&update, &[&key, &status, &body.as_ref()])
                    .await
                    .is_ok(),
                Err(_) => false,
            },
            Err(_) => false,
        };
        if !stored {
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        Response::from_parts(parts, Body::from(body))
    }
}

/// The Redis floor for the benchmarks: what a user would write by hand
/// without the crate, on one connection manager. `SET key claimed NX PX
/// <lease> GET` claims the key, or returns what it holds: a stored
/// response (3 digits of status, then the body) is replayed, a claim in
/// flight refused; after the handler, `SET key <response> PX <retention>`.
/// No fingerprint, no lease renewal, no fencing, no waiting, no release
/// on failure: the floor's cost, not a guard to copy.
#[cfg(feature = "redis")]
mod hand_written {
    use axum::body::Body;
    use axum::extract::{Request, State};
    use axum::http::{StatusCode, header};
    use axum::middleware::Next;
    use axum::response::{IntoResponse, Response};
    use redis::aio::ConnectionManager;

    pub async fn guard(
        State(mut conn): State<ConnectionManager>,
        request: Request,
        next: Next,
    ) -> Response {
        let Some(key) = request
            .headers()
            .get("idempotency-key")
            .map(|k| format!("floor:{}", String::from_utf8_lossy(k.as_bytes())))
        else {
            return next.run(request).await;
        };
        let held: Result<Option<Vec<u8>>, _> = redis::cmd("SET")
            .arg(&key)
            .arg("claimed")
            .arg("NX")
            .arg("PX")
            .arg(30_000)
            .arg("GET")
            .query_async(&mut conn)
            .await;
        match held {
            Err(_) => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
            Ok(Some(stored)) => {
                let status = std::str::from_utf8(stored.get(..3).unwrap_or_default())
                    .ok()
                    .and_then(|s| s.parse::<u16>().ok())
                    .and_then(|s| StatusCode::from_u16(s).ok());
                return match status {
                    Some(status) => (
                        status,
                        [(header::CONTENT_TYPE, "application/json")],
                        stored.get(3..).unwrap_or_default().to_vec(),
                    )
                        .into_response(),
                    None => StatusCode::CONFLICT.into_response(),
                };
            }
            Ok(None) => {}
        }
        let response = next.run(request).await;
        let (parts, body) = response.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        };
        let mut stored = parts.status.as_str().as_bytes().to_vec();
        stored.extend_from_slice(&bytes);
        let set: Result<(), _> = redis::cmd("SET")
            .arg(&key)
            .arg(stored)
            .arg("PX")
            .arg(86_400_000)
            .query_async(&mut conn)
            .await;
        if set.is_err() {
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        Response::from_parts(parts, Body::from(bytes))
    }
}

/// `route_layer`: only matched routes are guarded, so a 404 stays a 404.
fn guard_with<St: Store>(
    store: St,
    mode: FingerprintMode,
) -> impl FnOnce(Router<AppState>) -> Router<AppState> {
    move |router| {
        router.route_layer(
            ServiceBuilder::new().layer(IdempotencyLayer::new(store).fingerprint_mode(mode)),
        )
    }
}

/// Stores `n` completed records of a charge's size (`--prefill`), from 64
/// tasks at once, under keys no client sends.
async fn prefill<St: Store + Clone>(store: &St, n: u64) -> Result<(), Box<dyn std::error::Error>> {
    use tower_idempotency::fingerprint::Fingerprint;
    use tower_idempotency::key::StoreKey;
    use tower_idempotency::store::{Claim, CompletedRecord};
    const TASKS: u64 = 64;
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let store = store.clone();
        tasks.spawn(async move {
            let fp = Fingerprint::of_bytes(b"prefill");
            let payload = Bytes::from(vec![b'p'; 207]);
            let mut i = task;
            while i < n {
                let key = StoreKey::from_parts(b"prefill", &i.to_be_bytes());
                if let Claim::Acquired(token) =
                    store.claim(key, fp, Duration::from_secs(30)).await?
                {
                    let record = CompletedRecord {
                        fingerprint: fp,
                        payload: payload.clone(),
                    };
                    store
                        .complete(key, token, record, Duration::from_secs(86_400))
                        .await?;
                }
                i = i.saturating_add(TASKS);
            }
            Ok::<_, tower_idempotency::store::StoreError>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    tracing::info!(
        records = n,
        seconds = started.elapsed().as_secs_f64(),
        "prefilled the store"
    );
    Ok(())
}

/// `--prefill`, then the guard.
async fn prefilled<St: Store + Clone>(
    store: St,
    n: u64,
    mode: FingerprintMode,
) -> Result<impl FnOnce(Router<AppState>) -> Router<AppState>, Box<dyn std::error::Error>> {
    if n > 0 {
        prefill(&store, n).await?;
    }
    Ok(guard_with(store, mode))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}

/// The Redis store's builder for `url`, trusting `--tls-ca-file` if given.
#[cfg(feature = "redis")]
fn redis_builder(
    args: &Args,
    url: &str,
) -> Result<tower_idempotency::store::RedisStoreBuilder, Box<dyn std::error::Error>> {
    let builder = tower_idempotency::store::RedisStore::builder(url)
        .map_err(|e| format!("cannot use Redis at {url}: {e}"))?;
    match &args.tls_ca_file {
        None => Ok(builder),
        #[cfg(feature = "tls")]
        Some(path) => Ok(builder.tls_ca_file(path)),
        #[cfg(not(feature = "tls"))]
        Some(_) => Err("--tls-ca-file needs a build with `--features tls`".into()),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,tower_idempotency=debug")),
        )
        // Colour codes only on a terminal: a log file or collector gets
        // plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let args = Args::parse();
    let mode = fingerprint_mode(&args)?;
    if args.hand_written_guard && args.store == StoreKind::RedisCluster {
        return Err("--hand-written-guard is for --store memory, redis or postgres".into());
    }
    if args.unfenced_ledger && (args.store != StoreKind::Postgres || args.hand_written_guard) {
        return Err("--unfenced-ledger is for --store postgres with the layer".into());
    }
    let router = match args.store {
        StoreKind::Memory if args.hand_written_guard => {
            let cache = hand_written_memory::cache(args.memory_max_mib.saturating_mul(1 << 20));
            app(&args, memory_ledger(), move |router| {
                router.route_layer(axum::middleware::from_fn_with_state(
                    cache,
                    hand_written_memory::guard,
                ))
            })
        }
        StoreKind::Memory => {
            let store = MemoryStore::builder()
                .max_bytes(args.memory_max_mib.saturating_mul(1 << 20))
                .build();
            app(
                &args,
                memory_ledger(),
                prefilled(store, args.prefill, mode.clone()).await?,
            )
        }
        #[cfg(feature = "redis")]
        StoreKind::Redis if args.hand_written_guard => {
            // The same connection settings as the store's (`TCP_NODELAY`).
            use redis::IntoConnectionInfo;
            let info = args
                .redis_url
                .as_str()
                .into_connection_info()
                .map_err(|e| format!("cannot use Redis at {}: {e}", args.redis_url))?;
            let nodelay = info.tcp_settings().clone().set_nodelay(true);
            let conn = redis::Client::open(info.set_tcp_settings(nodelay))
                .map_err(|e| format!("cannot use Redis at {}: {e}", args.redis_url))?
                .get_connection_manager()
                .await
                .map_err(|e| format!("cannot use Redis at {}: {e}", args.redis_url))?;
            app(&args, memory_ledger(), move |router| {
                router.route_layer(axum::middleware::from_fn_with_state(
                    conn,
                    hand_written::guard,
                ))
            })
        }
        #[cfg(feature = "redis")]
        StoreKind::Redis => {
            let store = redis_builder(&args, &args.redis_url)?
                .build()
                .await
                .map_err(|e| format!("cannot use Redis at {}: {e}", args.redis_url))?;
            app(
                &args,
                memory_ledger(),
                prefilled(store, args.prefill, mode.clone()).await?,
            )
        }
        #[cfg(not(feature = "redis"))]
        StoreKind::Redis => {
            return Err("this build has no Redis support: run with `--features redis`".into());
        }
        #[cfg(feature = "redis-cluster")]
        StoreKind::RedisCluster => {
            let nodes: Vec<&str> = args.redis_url.split(',').map(str::trim).collect();
            let store = redis_builder(&args, nodes[0])?
                .build_cluster(&nodes)
                .await
                .map_err(|e| format!("cannot use Redis Cluster at {}: {e}", args.redis_url))?;
            app(&args, memory_ledger(), guard_with(store, mode.clone()))
        }
        #[cfg(feature = "postgres")]
        StoreKind::Postgres if args.hand_written_guard => {
            let (ledger, _) = postgres_ledger(&args)
                .await
                .map_err(|e| format!("cannot use PostgreSQL at {}: {e}", args.postgres_url))?;
            let Ledger::Postgres { pool, .. } = &ledger else {
                unreachable!("postgres_ledger makes a PostgreSQL ledger")
            };
            let pool = pool.clone();
            hand_written_postgres::migrate(&pool).await?;
            app(&args, ledger, move |router| {
                router.route_layer(axum::middleware::from_fn_with_state(
                    pool,
                    hand_written_postgres::guard,
                ))
            })
        }
        #[cfg(feature = "postgres")]
        StoreKind::Postgres => {
            let (ledger, store) = postgres_ledger(&args)
                .await
                .map_err(|e| format!("cannot use PostgreSQL at {}: {e}", args.postgres_url))?;
            app(&args, ledger, guard_with(store, mode.clone()))
        }
        #[cfg(not(feature = "postgres"))]
        StoreKind::Postgres => {
            return Err(
                "this build has no PostgreSQL support: run with `--features postgres`".into(),
            );
        }
        #[cfg(not(feature = "redis-cluster"))]
        StoreKind::RedisCluster => {
            return Err(
                "this build has no Redis Cluster support: run with `--features redis-cluster`"
                    .into(),
            );
        }
    };
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.addr))?;
    tracing::info!(
        "payments demo listening on http://{} (idempotency {}, {:?} store, {} ms per charge)",
        listener.local_addr()?,
        if args.no_idempotency { "OFF" } else { "on" },
        args.store,
        args.delay_ms
    );
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}
