//! The payments demo over gRPC: a unary `Charge` RPC made safe to retry by
//! the same layer, wrapping a tonic server.
//!
//! Run with:
//!
//! ```sh
//! cargo run --example grpc_payments
//! ```
//!
//! It starts a `payments.v1.Payments` server on `--addr` (default
//! `127.0.0.1:50051`) behind `IdempotencyLayer`, then acts as a client:
//! it charges with an `idempotency-key`, retries with the same key (the
//! answer is the same message, marked `idempotent-replayed: true` in its
//! metadata, and the charge ran once), and reuses the key for another
//! amount (refused with `FAILED_PRECONDITION`). `--serve` keeps serving
//! afterwards; `--store redis --redis-url …` uses Redis (needs
//! `--features redis`). With `--features client`, its client goes through
//! `client::IdempotentRetryLayer` (retries on UNAVAILABLE, ABORTED and
//! RESOURCE_EXHAUSTED with the same `idempotency-key`). The service is
//! hand-written (no `protoc`): see `service.rs`.

mod service;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use service::{Ledger, PaymentsClient, PaymentsServer, replayed};
use tower_idempotency::IdempotencyLayer;
use tower_idempotency::store::{MemoryStore, Store};

/// The gRPC payments demo.
#[derive(Debug, Parser)]
struct Args {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: SocketAddr,
    /// Simulated processing time of a charge, in milliseconds.
    #[arg(long, default_value_t = 500)]
    delay_ms: u64,
    /// Keep serving after the client demo.
    #[arg(long)]
    serve: bool,
    /// Where idempotency records live: `memory` or `redis`.
    #[arg(long, default_value = "memory")]
    store: String,
    /// The Redis to use with `--store redis`.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
}

async fn run<St: Store>(args: Args, store: St) -> Result<(), Box<dyn std::error::Error>> {
    let ledger = Arc::new(Ledger::default());
    *ledger.delay.lock().unwrap() = Duration::from_millis(args.delay_ms);
    let incoming = tonic::transport::server::TcpIncoming::bind(args.addr)?;
    let server = tonic::transport::Server::builder()
        .layer(IdempotencyLayer::new(store))
        .add_service(PaymentsServer::new(ledger.clone()))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = tokio::signal::ctrl_c().await;
        });
    let server = tokio::spawn(server);
    println!("payments.v1.Payments listening on {}", args.addr);

    #[cfg(feature = "client")]
    let mut client = PaymentsClient::connect_retrying(
        args.addr,
        tower_idempotency::client::RetryPolicy::default(),
    )
    .await?;
    #[cfg(not(feature = "client"))]
    let mut client = PaymentsClient::connect(args.addr).await?;
    let first = client.charge(Some("order-42"), 100, "GHS").await?;
    println!(
        "first:  {:?} (replayed: {})",
        first.get_ref(),
        replayed(&first)
    );
    let retry = client.charge(Some("order-42"), 100, "GHS").await?;
    println!(
        "retry:  {:?} (replayed: {})",
        retry.get_ref(),
        replayed(&retry)
    );
    match client.charge(Some("order-42"), 500, "GHS").await {
        Ok(reply) => println!("reused: unexpectedly accepted: {:?}", reply.get_ref()),
        Err(status) => println!("reused: {:?}: {}", status.code(), status.message()),
    }
    println!(
        "charges executed: {}",
        ledger.executions.load(Ordering::SeqCst)
    );

    if args.serve {
        println!("serving until Ctrl-C");
        server.await??;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    match args.store.as_str() {
        "memory" => run(args, MemoryStore::new()).await,
        #[cfg(feature = "redis")]
        "redis" => {
            let store = tower_idempotency::store::RedisStore::connect(&args.redis_url).await?;
            run(args, store).await
        }
        #[cfg(not(feature = "redis"))]
        "redis" => Err("this build has no Redis support: run with `--features redis`".into()),
        other => Err(format!("unknown store {other:?}: use memory or redis").into()),
    }
}
