//! A client that charges once, however flaky the network: one charge sent
//! through `IdempotentRetryLayer`, each attempt printed.
//!
//! Start the payments example, then run this:
//!
//! ```sh
//! cargo run --example payments &
//! cargo run --features client --example client
//! ```
//!
//! Flags: `--url` (default `http://127.0.0.1:3000/process-payment`),
//! `--amount` (default 100), `--currency` (default `GHS`), `--key`
//! (default: a new UUID), `--max-attempts` (default 5), `--deadline`
//! (default `30s`). It prints every attempt (its status or error, the wait
//! before the next, the key) and the final answer, and exits 0 when the
//! final answer is 2xx, 1 otherwise.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_idempotency::client::{Attempts, IdempotentRetryLayer, RetryBody, RetryPolicy};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Sends one charge, retried safely.
#[derive(Debug, Parser)]
#[command(about = "One charge through tower-idempotency's retrying client")]
struct Args {
    /// Where to send the charge.
    #[arg(long, default_value = "http://127.0.0.1:3000/process-payment")]
    url: String,
    /// The amount to charge.
    #[arg(long, default_value_t = 100)]
    amount: u64,
    /// Its currency (3 letters).
    #[arg(long, default_value = "GHS")]
    currency: String,
    /// The idempotency key (default: a new UUID, chosen by the layer).
    #[arg(long)]
    key: Option<String>,
    /// How many attempts in all.
    #[arg(long, default_value_t = 5)]
    max_attempts: u32,
    /// The bound on the whole charge, every attempt and wait included.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    deadline: Duration,
}

/// Prints the client layer's attempt events as they happen.
struct PrintAttempts {
    started: std::time::Instant,
    last_wait: Arc<Mutex<Option<u64>>>,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PrintAttempts {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != "tower_idempotency::client" {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let waited = self
            .last_wait
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(fields.wait_ms.unwrap_or(0));
        println!(
            "attempt {} answered at {:>6} ms (after a wait of {} ms): {}  key={}  -> {}",
            fields.attempt,
            self.started.elapsed().as_millis(),
            waited.unwrap_or(0),
            fields.outcome,
            fields.key,
            fields.next,
        );
    }
}

#[derive(Default)]
struct Fields {
    attempt: u64,
    key: String,
    outcome: String,
    wait_ms: Option<u64>,
    next: String,
}

impl tracing::field::Visit for Fields {
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        match field.name() {
            "attempt" => self.attempt = value,
            "status" => self.outcome = format!("HTTP {value}"),
            "wait_ms" => self.wait_ms = Some(value),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "key" => self.key = value.to_owned(),
            "next" => self.next = value.to_owned(),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "error" => self.outcome = format!("error: {value:?}"),
            "key" => self.key = format!("{value:?}").trim_matches('"').to_owned(),
            "next" => self.next = format!("{value:?}").trim_matches('"').to_owned(),
            _ => {}
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::registry()
        .with(PrintAttempts {
            started: std::time::Instant::now(),
            last_wait: Arc::default(),
        })
        .with(
            tracing_subscriber::filter::Targets::new()
                .with_target("tower_idempotency::client", tracing::Level::DEBUG),
        )
        .init();

    let http = Client::builder(TokioExecutor::new()).build_http::<RetryBody<Full<Bytes>>>();
    let policy = RetryPolicy::default()
        .max_attempts(args.max_attempts)
        .deadline(args.deadline);
    let client = ServiceBuilder::new()
        .layer(IdempotentRetryLayer::new(policy))
        .service(http);

    let body = serde_json::json!({ "amount": args.amount, "currency": args.currency }).to_string();
    let mut request = http::Request::post(&args.url).header("content-type", "application/json");
    if let Some(key) = &args.key {
        request = request.header("idempotency-key", key);
    }
    let request = match request.body(Full::new(Bytes::from(body))) {
        Ok(request) => request,
        Err(e) => {
            eprintln!("cannot build the request: {e}");
            return ExitCode::FAILURE;
        }
    };
    match client.oneshot(request).await {
        Ok(response) => {
            let status = response.status();
            let attempts = response.extensions().get::<Attempts>().map_or(1, |a| a.0);
            let replayed = response
                .headers()
                .get("idempotent-replayed")
                .is_some_and(|v| v == "true");
            let body = match response.into_body().collect().await {
                Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
                Err(e) => format!("(body unreadable: {e})"),
            };
            println!(
                "final answer after {attempts} attempt(s): {status}{}\n{body}",
                if replayed { " (replayed)" } else { "" }
            );
            if status.is_success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            println!("no answer: {e}");
            ExitCode::FAILURE
        }
    }
}
