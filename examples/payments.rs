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
//! the layer, to measure its cost). Stops cleanly on Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use clap::Parser;
use serde::{Deserialize, Serialize};
use tower::ServiceBuilder;
use tower_idempotency::IdempotencyLayer;
use tower_idempotency::store::MemoryStore;
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
    ledger: Arc<Mutex<Vec<Payment>>>,
    next_id: Arc<AtomicU64>,
    id_prefix: Arc<str>,
}

fn bad_request(error: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({ "error": error })),
    )
        .into_response()
}

async fn process_payment(State(state): State<AppState>, body: Bytes) -> Response {
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
    tokio::time::sleep(state.delay).await;
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let payment = Payment {
        id: format!("pay_{}_{n:06}", state.id_prefix),
        amount: charge.amount,
        message: format!("Charged {} {}", charge.amount, charge.currency),
        currency: charge.currency,
    };
    state
        .ledger
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(payment.clone());
    tracing::info!(id = %payment.id, amount = payment.amount, currency = %payment.currency, "charged");
    (StatusCode::CREATED, Json(payment)).into_response()
}

async fn list_payments(State(state): State<AppState>) -> Json<Vec<Payment>> {
    Json(
        state
            .ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
    )
}

async fn healthz() -> &'static str {
    "ok"
}

fn app(args: &Args) -> Router {
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let state = AppState {
        delay: Duration::from_millis(args.delay_ms),
        ledger: Arc::default(),
        next_id: Arc::new(AtomicU64::new(1)),
        id_prefix: format!("{started:x}").into(),
    };
    let charges = Router::new().route("/process-payment", post(process_payment));
    let charges = if args.no_idempotency {
        charges
    } else {
        // `route_layer`: only matched routes are guarded, so a 404 stays a 404.
        charges.route_layer(ServiceBuilder::new().layer(IdempotencyLayer::new(MemoryStore::new())))
    };
    charges
        .route("/payments", get(list_payments))
        .route("/healthz", get(healthz))
        .with_state(state)
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

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,tower_idempotency=debug")),
        )
        .init();
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.addr))?;
    tracing::info!(
        "payments demo listening on http://{} (idempotency {}, memory store, {} ms per charge)",
        listener.local_addr()?,
        if args.no_idempotency { "OFF" } else { "on" },
        args.delay_ms
    );
    axum::serve(listener, app(&args))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}
