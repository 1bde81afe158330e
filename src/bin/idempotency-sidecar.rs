//! `idempotency-sidecar`: makes any HTTP backend safe to retry.
//!
//! ```sh
//! cargo run --release --features sidecar --bin idempotency-sidecar -- \
//!     --listen 127.0.0.1:8080 --upstream http://127.0.0.1:8081
//! ```
//!
//! Every flag also reads an environment variable (`IDEMPOTENCY_…`, listed
//! by `--help`).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use http::{HeaderName, Method, StatusCode};
use tower_idempotency::IdempotencyLayer;
use tower_idempotency::fingerprint::{InvalidJsonPointer, JsonPointer};
use tower_idempotency::sidecar::{self, SidecarConfig};
use tower_idempotency::store::{MemoryStore, RedisStore, Store};
use tracing_subscriber::EnvFilter;

/// A reverse proxy that puts an idempotency layer in front of any HTTP
/// backend: requests carrying an Idempotency-Key execute at most once, and
/// every retry gets the original response, byte for byte.
#[derive(Debug, Parser)]
#[command(name = "idempotency-sidecar", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "IDEMPOTENCY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The backend to protect, as http://host:port.
    #[arg(long, env = "IDEMPOTENCY_UPSTREAM")]
    upstream: String,
    /// Speak HTTP/2 without TLS (h2c) to the upstream instead of HTTP/1.1.
    #[arg(long, env = "IDEMPOTENCY_UPSTREAM_H2C")]
    upstream_h2c: bool,
    /// How long a client waits for the upstream, from when its request goes
    /// upstream, before it gets 504; the call goes on and its response is
    /// kept for the client's retry (which waits for it up to --wait, like any
    /// duplicate). A request's body must arrive within it too. Durations:
    /// 250ms, 30s, 5m, 1h30m, 2d (or a bare number of seconds).
    #[arg(long, env = "IDEMPOTENCY_UPSTREAM_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    upstream_timeout: Duration,
    /// How long the whole upstream exchange, response body included, may
    /// take; past it, its outcome is unknown and retries with the key are
    /// refused (409).
    #[arg(long, env = "IDEMPOTENCY_UPSTREAM_HARD_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    upstream_hard_timeout: Duration,
    /// Where claims and records live: memory (this process only), redis
    /// (shared by every sidecar on the same Redis) or redis-cluster (the
    /// same on a Redis Cluster).
    #[arg(long, env = "IDEMPOTENCY_STORE", value_enum, default_value_t = StoreKind::Memory)]
    store: StoreKind,
    /// The Redis to use with --store redis; with --store redis-cluster, the
    /// cluster's seed nodes, comma-separated.
    #[arg(
        long,
        env = "IDEMPOTENCY_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// A PEM bundle of the CA that signed the Redis server's certificate,
    /// trusted (in place of Mozilla's roots) on rediss:// URLs.
    #[arg(long, env = "IDEMPOTENCY_TLS_CA_FILE")]
    tls_ca_file: Option<std::path::PathBuf>,
    /// Prefix of the Redis key names.
    #[arg(long, env = "IDEMPOTENCY_REDIS_PREFIX", default_value = "idem")]
    redis_prefix: String,
    /// The idempotency key header.
    #[arg(long, env = "IDEMPOTENCY_HEADER", default_value = "Idempotency-Key", value_parser = parse_header_name)]
    header: HeaderName,
    /// Guarded methods, comma-separated; others pass straight through.
    #[arg(long, env = "IDEMPOTENCY_METHODS", value_delimiter = ',', default_value = "POST,PATCH", value_parser = parse_method)]
    methods: Vec<Method>,
    /// Let guarded requests without a key through unguarded (by default they
    /// get 400).
    #[arg(long, env = "IDEMPOTENCY_OPTIONAL")]
    optional: bool,
    /// Take each request's scope (the namespace of its keys) from this
    /// header, e.g. an API key or tenant id set by the gateway; it is
    /// hashed. Requests without it are refused. Without this flag every
    /// caller shares one namespace.
    #[arg(long, env = "IDEMPOTENCY_SCOPE_HEADER", value_parser = parse_header_name)]
    scope_header: Option<HeaderName>,
    /// Largest request body read, in bytes; larger requests get 413.
    #[arg(long, env = "IDEMPOTENCY_REQUEST_BODY_LIMIT", default_value_t = tower_idempotency::DEFAULT_REQUEST_BODY_LIMIT)]
    request_body_limit: usize,
    /// Largest response stored, in bytes; larger ones are delivered once and
    /// then "not replayable".
    #[arg(long, env = "IDEMPOTENCY_STORED_RESPONSE_LIMIT", default_value_t = tower_idempotency::DEFAULT_STORED_RESPONSE_LIMIT)]
    stored_response_limit: usize,
    /// How long responses are replayed.
    #[arg(long, env = "IDEMPOTENCY_RETENTION", default_value = "24h", value_parser = parse_duration)]
    retention: Duration,
    /// Claim lease, renewed every third of it while the upstream works.
    #[arg(long, env = "IDEMPOTENCY_LEASE", default_value = "30s", value_parser = parse_duration)]
    lease: Duration,
    /// How long a duplicate waits for the first request before 409.
    #[arg(long, env = "IDEMPOTENCY_WAIT", default_value = "10s", value_parser = parse_duration)]
    wait: Duration,
    /// Answer duplicates of in-flight requests with 409 at once instead of
    /// waiting.
    #[arg(long, env = "IDEMPOTENCY_REJECT_IN_FLIGHT")]
    reject_in_flight: bool,
    /// Status for a key reused with a different request (409, or 422 as in
    /// the IETF draft).
    #[arg(long, env = "IDEMPOTENCY_MISMATCH_STATUS", default_value = "409", value_parser = parse_status)]
    mismatch_status: StatusCode,
    /// How a request's body is compared with the one its key was first
    /// used with: `bytes` (exactly as sent) or `json` (a JSON body by its
    /// meaning: member order, whitespace and escapes do not count; a body
    /// that is not JSON, or not sent as JSON, by its bytes).
    #[arg(long, env = "IDEMPOTENCY_FINGERPRINT", value_enum, default_value_t = FingerprintKind::Bytes)]
    fingerprint: FingerprintKind,
    /// With `--fingerprint json`: a JSON Pointer (RFC 6901) to a field left
    /// out of the comparison, such as /metadata/sent_at. Repeat the flag
    /// for more; the environment variable holds one.
    #[arg(long, value_name = "POINTER", env = "IDEMPOTENCY_FINGERPRINT_IGNORE", value_parser = parse_pointer)]
    fingerprint_ignore: Vec<JsonPointer>,
    /// Keep client-supplied X-Forwarded-For, Forwarded and X-Forwarded-Host
    /// headers and append this hop (by default they are replaced: clients
    /// can spoof them). Only behind a proxy you trust to set them.
    #[arg(long, env = "IDEMPOTENCY_TRUST_FORWARDED_HEADERS")]
    trust_forwarded_headers: bool,
    /// How long a client may take to send a request's head (HTTP/1), and a
    /// new connection (HTTP/1 or HTTP/2) to send its first request, before
    /// it is disconnected.
    #[arg(long, env = "IDEMPOTENCY_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    header_read_timeout: Duration,
    /// How long a client connection may stay open with no request in flight
    /// (HTTP/1 keep-alive and HTTP/2) before it is closed.
    #[arg(long, env = "IDEMPOTENCY_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// How often HTTP/2 client connections are pinged; one that does not
    /// answer within the same interval is disconnected.
    #[arg(long, env = "IDEMPOTENCY_KEEP_ALIVE_INTERVAL", default_value = "20s", value_parser = parse_duration)]
    keep_alive_interval: Duration,
    /// Most open client connections; more wait until one closes.
    #[arg(long, env = "IDEMPOTENCY_MAX_CONNECTIONS", default_value_t = sidecar::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Path of the sidecar's own health check (liveness: 200 while the
    /// process serves).
    #[arg(long, env = "IDEMPOTENCY_HEALTH_PATH", default_value = sidecar::DEFAULT_HEALTH_PATH)]
    health_path: String,
    /// Path of the readiness check: 200 while the store answers, 503 while
    /// it does not.
    #[arg(long, env = "IDEMPOTENCY_READY_PATH", default_value = sidecar::DEFAULT_READY_PATH)]
    ready_path: String,
    /// Serve Prometheus metrics on this address (GET /metrics), a listener
    /// of its own; off by default.
    #[arg(long, env = "IDEMPOTENCY_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Log lines as text (colour codes only on a terminal, and never with
    /// NO_COLOR set to a non-empty value) or as JSON, one object per line.
    #[arg(long, env = "IDEMPOTENCY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// On SIGTERM or Ctrl-C, how long to let open requests and executions
    /// finish (and be stored) before exiting.
    #[arg(long, env = "IDEMPOTENCY_DRAIN_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    drain_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FingerprintKind {
    Bytes,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    Memory,
    Redis,
    RedisCluster,
}

/// A duration as `humantime` reads it (`250ms`, `30s`, `1h30m`, `2d`), or a
/// bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(seconds) = s.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration such as 250ms, 30s, 1h30m or 2d: {e}"))
}

fn parse_header_name(s: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(s.trim().as_bytes())
        .map_err(|_| format!("{s:?} is not a valid header name"))
}

fn parse_pointer(s: &str) -> Result<JsonPointer, String> {
    s.parse().map_err(|e: InvalidJsonPointer| e.to_string())
}

fn parse_method(s: &str) -> Result<Method, String> {
    Method::from_bytes(s.trim().to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("{s:?} is not a valid method"))
}

fn parse_status(s: &str) -> Result<StatusCode, String> {
    let status: StatusCode = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a status code"))?;
    if status.is_client_error() || status.is_server_error() {
        Ok(status)
    } else {
        Err(format!("{s:?} must be a 4xx or 5xx status"))
    }
}

fn configure<St: Store>(args: &Args, store: St) -> IdempotencyLayer<St> {
    let mut layer = IdempotencyLayer::new(store)
        .key_header(args.header.clone())
        .methods(args.methods.clone())
        .request_body_limit(args.request_body_limit)
        .stored_response_limit(args.stored_response_limit)
        .retention(args.retention)
        .lease(args.lease)
        .mismatch_status(args.mismatch_status);
    layer = if args.reject_in_flight {
        layer.reject_in_flight()
    } else {
        layer.wait_for_in_flight(args.wait)
    };
    if args.optional {
        layer = layer.optional();
    }
    if let Some(header) = &args.scope_header {
        layer = layer.scope(sidecar::scope_from_header(header.clone()));
    }
    if args.fingerprint == FingerprintKind::Json {
        layer = layer.fingerprint_json_ignoring(args.fingerprint_ignore.iter().cloned());
    }
    layer
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run<St: Store>(args: Args, store: St) -> Result<(), Box<dyn std::error::Error>> {
    let config = SidecarConfig::new(&args.upstream)?
        .upstream_h2c(args.upstream_h2c)
        .upstream_timeout(args.upstream_timeout)
        .upstream_hard_timeout(args.upstream_hard_timeout)
        .health_path(args.health_path.clone())
        .ready_path(args.ready_path.clone())
        .trust_forwarded_headers(args.trust_forwarded_headers)
        .header_read_timeout(args.header_read_timeout)
        .idle_timeout(args.idle_timeout)
        .keep_alive_interval(args.keep_alive_interval)
        .max_connections(args.max_connections);
    let layer = configure(&args, store);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?, upstream = %args.upstream, store = ?args.store,
        "idempotency sidecar ready"
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(sidecar::serve(listener, layer, config, async {
        let _ = stop_rx.await;
    }));
    shutdown_signal().await;
    tracing::info!(drain_timeout = ?args.drain_timeout, "shutting down");
    let _ = stop_tx.send(());
    match tokio::time::timeout(args.drain_timeout, server).await {
        Ok(joined) => joined??,
        Err(_) => tracing::warn!("drain timeout reached; exiting with work in flight"),
    }
    Ok(())
}

/// Logs to stdout as `format` says, filtered by `RUST_LOG` (default
/// `info`).
fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        // One JSON object per line, the event's fields beside `message`.
        LogFormat::Json => logs.json().flatten_event(true).try_init(),
        // Colour codes only on a terminal, and never with NO_COLOR set: a
        // log file or collector gets plain text.
        LogFormat::Text => logs.with_ansi(colour()).try_init(),
    };
}

fn colour() -> bool {
    colour_for(
        std::io::IsTerminal::is_terminal(&std::io::stdout()),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// Colour codes on a terminal, unless `NO_COLOR` is set to a non-empty
/// value (the no-color.org convention).
fn colour_for(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Histogram buckets for every `*_seconds` metric: 0.5 ms to a minute,
/// with edges just past the default bounds (a 0.5 s Redis timeout, a 1 s
/// PostgreSQL one, a 10 s duplicate wait), so that what hits a bound is
/// told apart from what came in under it.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.6, 1.0, 1.2, 2.5, 5.0, 10.0,
    12.0, 30.0, 60.0,
];

/// Most metrics scrapes served at once; more wait in the listen backlog.
const METRICS_CONNECTIONS: usize = 16;

/// Installs the Prometheus recorder and serves its text format at
/// `GET /metrics` on `addr`, on a listener of its own.
async fn serve_metrics(addr: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)?
        .install_recorder()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} for metrics: {e}"))?;
    tracing::info!(metrics = %listener.local_addr()?, "serving Prometheus metrics at /metrics");
    // A scrape drains the histograms; the upkeep bounds what they hold
    // between scrapes.
    tokio::spawn({
        let handle = handle.clone();
        async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                handle.run_upkeep();
            }
        }
    });
    let places = std::sync::Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(place) = places.clone().acquire_owned().await else {
                return;
            };
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<_>| {
                    let answer = metrics_answer(&req, || handle.render());
                    async move { Ok::<_, std::convert::Infallible>(answer) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                // A scrape takes milliseconds; a connection is closed after
                // a minute whatever it does.
                let _ = tokio::time::timeout(Duration::from_secs(60), connection).await;
                drop(place);
            });
        }
    });
    Ok(())
}

/// The answer of the metrics listener to `req`: the rendered metrics at
/// `GET /metrics`, 404 elsewhere, 405 for other methods.
fn metrics_answer<B>(
    req: &http::Request<B>,
    render: impl FnOnce() -> String,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let (status, content_type, body) = if req.uri().path() != "/metrics" {
        (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n".to_owned(),
        )
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "GET /metrics\n".to_owned(),
        )
    } else {
        // Prometheus 3 refuses a scrape without a version in its type.
        (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
        )
    };
    let mut res = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    res
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if !args.fingerprint_ignore.is_empty() && args.fingerprint != FingerprintKind::Json {
        Args::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--fingerprint-ignore needs --fingerprint json",
            )
            .exit();
    }
    init_logs(args.log_format);
    match start(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // In the log (JSON lines included) and on stderr.
            tracing::error!(error = %e, "idempotency sidecar stopped");
            eprintln!("idempotency-sidecar: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The Redis store's builder for `url`, trusting `--tls-ca-file` if given.
fn redis_builder(
    args: &Args,
    url: &str,
) -> Result<tower_idempotency::store::RedisStoreBuilder, Box<dyn std::error::Error>> {
    let builder = RedisStore::builder(url)?;
    Ok(match &args.tls_ca_file {
        Some(path) => builder.tls_ca_file(path),
        None => builder,
    })
}

async fn start(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(addr) = args.metrics_listen {
        serve_metrics(addr).await?;
    }
    match args.store {
        StoreKind::Memory => run(args, MemoryStore::new()).await,
        StoreKind::Redis => {
            let store = redis_builder(&args, &args.redis_url)?
                .prefix(args.redis_prefix.clone())
                .build()
                .await?;
            run(args, store).await
        }
        StoreKind::RedisCluster => {
            let nodes: Vec<String> = args
                .redis_url
                .split(',')
                .map(|n| n.trim().to_owned())
                .collect();
            let store = redis_builder(&args, &nodes[0])?
                .prefix(args.redis_prefix.clone())
                .build_cluster(&nodes)
                .await?;
            run(args, store).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(
            parse_duration("1s 500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5_400));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3 fortnights").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn statuses_and_methods() {
        assert_eq!(
            parse_status("422").unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert!(parse_status("200").is_err());
        assert!(parse_status("abc").is_err());
        assert_eq!(parse_method("post").unwrap(), Method::POST);
        assert!(parse_header_name("bad header").is_err());
    }

    #[test]
    fn colour_only_on_a_terminal_and_never_with_no_color() {
        use std::ffi::OsStr;
        assert!(colour_for(true, None));
        assert!(colour_for(true, Some(OsStr::new(""))), "empty is unset");
        assert!(!colour_for(true, Some(OsStr::new("1"))));
        assert!(!colour_for(false, None), "a pipe or a file");
    }

    #[test]
    fn every_flag_is_documented() {
        use clap::CommandFactory;
        Args::command().debug_assert();
        for arg in Args::command().get_arguments() {
            assert!(arg.get_help().is_some(), "--{} has no help", arg.get_id());
        }
    }
}
