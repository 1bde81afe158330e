//! `idempotency-admin`: inspect, list, purge and resolve the keys of a
//! tower-idempotency store (Redis, Redis Cluster or PostgreSQL).
//!
//! ```text
//! idempotency-admin --store redis inspect order-1042
//! idempotency-admin --store postgres list --state outcome-unknown --json
//! idempotency-admin --store redis purge order-1042 --force
//! idempotency-admin --store redis resolve order-1042 --release
//! idempotency-admin --store redis resolve order-1042 --respond-status 201 \
//!     --respond-header 'Content-Type: application/json' --respond-body answer.json
//! ```
//!
//! Exit status: 0 on success (an absent key included), 1 when the store
//! fails or the command is refused (purging a live claim without
//! `--force`, resolving a key whose outcome is not unknown), 2 on bad
//! usage. Keys are never logged; a stored body is printed only with
//! `inspect --body`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tower_idempotency::key::StoreKey;
use tower_idempotency::store::admin::{Admin, MAX_LIST, Purged, Resolution, Resolved, State};
use tower_idempotency::store::{PostgresStore, RedisStore, StoreError, StoreErrorKind};
use tower_idempotency::{IdempotencyKey, Scope};

/// The largest body `resolve --respond-body` reads.
const MAX_RESPOND_BODY: u64 = 64 * 1024 * 1024;

/// Inspect, list, purge and resolve the keys of a tower-idempotency store.
///
/// The defaults are the sidecar's and the payments example's, so the tool
/// finds their keys without more flags.
#[derive(Parser, Debug)]
#[command(name = "idempotency-admin", version)]
struct Cli {
    /// The store: redis, redis-cluster or postgres.
    #[arg(long, env = "IDEMPOTENCY_STORE", value_enum)]
    store: StoreKind,
    /// The Redis (--store redis); with --store redis-cluster, the
    /// cluster's seed nodes, comma-separated.
    #[arg(
        long,
        env = "IDEMPOTENCY_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// The PostgreSQL database (--store postgres); `sslmode` as libpq
    /// reads it.
    #[arg(
        long,
        env = "IDEMPOTENCY_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
    )]
    postgres_url: String,
    /// Prefix of the Redis key names.
    #[arg(long, env = "IDEMPOTENCY_REDIS_PREFIX", default_value = tower_idempotency::store::redis::DEFAULT_PREFIX)]
    prefix: String,
    /// The PostgreSQL table.
    #[arg(long, env = "IDEMPOTENCY_POSTGRES_TABLE", default_value = tower_idempotency::store::postgres::DEFAULT_TABLE)]
    table: String,
    /// A PEM bundle of the CA that signed the server's certificate,
    /// trusted in place of Mozilla's roots (rediss:// URLs, and PostgreSQL
    /// with an sslmode that asks for TLS).
    #[arg(long, env = "IDEMPOTENCY_TLS_CA_FILE")]
    tls_ca_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum StoreKind {
    Redis,
    RedisCluster,
    Postgres,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// What one key holds: state, fence, lease or expiry, stored answer.
    Inspect {
        #[command(flatten)]
        key: KeyArgs,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Print the stored body too (never printed otherwise).
        #[arg(long)]
        body: bool,
    },
    /// Keys by state, oldest claim first.
    List {
        /// Only keys in this state (without it: every key that holds
        /// something).
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// At most this many keys (at most 10000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=MAX_LIST as i64))]
        limit: u32,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Drops what a key holds, so the next request with it executes.
    Purge {
        #[command(flatten)]
        key: KeyArgs,
        /// Drop a live claim too (its execution may still be running: a
        /// retry would then run beside it).
        #[arg(long)]
        force: bool,
    },
    /// Settles a key whose outcome is unknown: release it (the next retry
    /// executes) or store the answer retries get.
    Resolve {
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        how: ResolveArgs,
    },
}

#[derive(Args, Debug)]
struct KeyArgs {
    /// The idempotency key, as the client sent it.
    key: String,
    /// The value of the scope header the client sent (the sidecar's
    /// --scope-header), hashed as the sidecar hashes it; without it (or
    /// --scope-raw), the global scope.
    #[arg(long)]
    scope: Option<String>,
    /// The scope's own bytes, as a layer's scope function returns them
    /// (`Scope::from(tenant_id)`), not hashed.
    #[arg(long, conflicts_with = "scope")]
    scope_raw: Option<String>,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = true)]
struct ResolveArgs {
    /// Release the key: the next retry executes. Only after checking that
    /// the effect did not happen.
    #[arg(long, conflicts_with_all = ["respond_status", "respond_header", "respond_body"])]
    release: bool,
    /// Store this status as the answer every retry gets.
    #[arg(long, value_parser = parse_status)]
    respond_status: Option<StatusCode>,
    /// A header of the stored answer, `Name: value` (repeatable).
    #[arg(long, requires = "respond_status", value_parser = parse_header)]
    respond_header: Vec<(HeaderName, HeaderValue)>,
    /// A file whose bytes are the stored answer's body.
    #[arg(long, requires = "respond_status")]
    respond_body: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum StateArg {
    InFlight,
    Completed,
    OutcomeUnknown,
    Unreadable,
}

impl From<StateArg> for State {
    fn from(state: StateArg) -> Self {
        match state {
            StateArg::InFlight => State::InFlight,
            StateArg::Completed => State::Completed,
            StateArg::OutcomeUnknown => State::OutcomeUnknown,
            StateArg::Unreadable => State::Unreadable,
        }
    }
}

fn parse_status(text: &str) -> Result<StatusCode, String> {
    let code: u16 = text
        .parse()
        .map_err(|_| format!("not a status code: {text}"))?;
    match StatusCode::from_u16(code) {
        Ok(status) if (200..600).contains(&code) => Ok(status),
        _ => Err(format!("not a final status code (200 to 599): {code}")),
    }
}

fn parse_header(text: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("expected 'Name: value', got {text:?}"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("not a header name: {:?}", name.trim()))?;
    let value = HeaderValue::from_str(value.trim())
        .map_err(|_| format!("not a header value for {name}"))?;
    Ok((name, value))
}

/// Why the tool stops: bad usage (2), or the store failed or refused (1).
enum Failure {
    Usage(String),
    Store(String),
}

impl From<StoreError> for Failure {
    /// A setting the store refuses (a URL that does not parse, a table
    /// name it does not take, a CA file without a certificate) is bad
    /// usage; anything else is the store failing.
    fn from(e: StoreError) -> Self {
        match e.kind() {
            StoreErrorKind::Configuration => Failure::Usage(e.to_string()),
            _ if schema_missing(&e) => Failure::Store(format!(
                "{e}\n(the table is missing, or older than this tool: every instance of the store creates and updates it at start with PostgresStore::migrate, and the tool changes no schema; check --postgres-url and --table)"
            )),
            _ => Failure::Store(e.to_string()),
        }
    }
}

/// Whether PostgreSQL answered `e` with "no such table" or "no such
/// column" (SQLSTATE 42P01 or 42703): the store's table is missing, or
/// was made by an older version and not migrated since.
fn schema_missing(e: &StoreError) -> bool {
    use tokio_postgres::error::SqlState;
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(pg) = cause.downcast_ref::<tokio_postgres::Error>() {
            return matches!(
                pg.code(),
                Some(code) if *code == SqlState::UNDEFINED_TABLE || *code == SqlState::UNDEFINED_COLUMN
            );
        }
        source = cause.source();
    }
    false
}

/// The store key the layer uses for `args`: the client's key parsed as
/// the layer parses the header, the scope as the sidecar's
/// `--scope-header` derives it.
fn store_key(args: &KeyArgs) -> Result<StoreKey, Failure> {
    let key = IdempotencyKey::parse(args.key.as_bytes())
        .map_err(|e| Failure::Usage(format!("not a valid idempotency key: {e}")))?;
    let scope = match (&args.scope, &args.scope_raw) {
        (Some(value), _) => Scope::from_header_value(value.as_bytes()),
        (None, Some(raw)) => Scope::from(raw.clone()),
        (None, None) => Scope::global(),
    };
    Ok(StoreKey::new(&scope, &key))
}

mod output;

use output::{describe, print_line, print_table, put_body, short_duration};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Store(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.store {
        StoreKind::Redis => {
            let mut builder = RedisStore::builder(&cli.redis_url)?.prefix(cli.prefix.clone());
            if let Some(ca) = &cli.tls_ca_file {
                builder = builder.tls_ca_file(ca);
            }
            let store = builder.build().await?;
            command(&store, cli.command).await
        }
        StoreKind::RedisCluster => {
            let nodes: Vec<String> = cli
                .redis_url
                .split(',')
                .map(|n| n.trim().to_owned())
                .filter(|n| !n.is_empty())
                .collect();
            let Some(first) = nodes.first() else {
                return Err(Failure::Usage("--redis-url names no node".into()));
            };
            let mut builder = RedisStore::builder(first)?.prefix(cli.prefix.clone());
            if let Some(ca) = &cli.tls_ca_file {
                builder = builder.tls_ca_file(ca);
            }
            let store = builder.build_cluster(&nodes).await?;
            command(&store, cli.command).await
        }
        StoreKind::Postgres => {
            let mut builder = PostgresStore::builder(&cli.postgres_url)?
                .table(cli.table.clone())
                .pool_size(2)
                .cleanup_every(None);
            if let Some(ca) = &cli.tls_ca_file {
                builder = builder.tls_ca_file(ca);
            }
            let store = builder.build()?;
            command(&store, cli.command).await
        }
    }
}

async fn command<S: Admin>(store: &S, command: Command) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match command {
        Command::Inspect { key, json, body } => {
            let seen = store.inspect(store_key(&key)?).await?;
            if json {
                let mut object = describe(&seen, SystemTime::now());
                if body && let Some(answer) = &seen.answer {
                    put_body(&mut object, &answer.body);
                }
                print_line(&mut out, &object.to_string());
            } else {
                print_table(&mut out, &seen, SystemTime::now());
                if body && let Some(answer) = &seen.answer {
                    print_line(&mut out, "body:");
                    let _ = out.write_all(&answer.body);
                    print_line(&mut out, "");
                }
            }
            Ok(())
        }
        Command::List { state, limit, json } => {
            let limit = usize::try_from(limit).unwrap_or(MAX_LIST);
            let seen = store.list(state.map(State::from), limit).await?;
            let now = SystemTime::now();
            if json {
                for one in &seen {
                    print_line(&mut out, &describe(one, now).to_string());
                }
            } else {
                print_line(
                    &mut out,
                    &format!(
                        "{:<64}  {:<15}  {:>10}  {:>6}  {:<6}  PATH",
                        "KEY_HASH", "STATE", "AGE", "STATUS", "METHOD"
                    ),
                );
                for one in &seen {
                    let age = one
                        .age(now)
                        .map_or_else(|| "-".to_owned(), short_duration);
                    let status = one
                        .answer
                        .as_ref()
                        .map_or_else(|| "-".to_owned(), |a| a.status.as_u16().to_string());
                    print_line(
                        &mut out,
                        &format!(
                            "{:<64}  {:<15}  {:>10}  {:>6}  {:<6}  {}",
                            one.key_hash,
                            one.state,
                            age,
                            status,
                            one.method.as_deref().unwrap_or("-"),
                            one.path.as_deref().unwrap_or("-"),
                        ),
                    );
                }
            }
            Ok(())
        }
        Command::Purge { key, force } => match store.purge_entry(store_key(&key)?, force).await? {
            Purged::Dropped => {
                print_line(&mut out, "purged: the key is new");
                Ok(())
            }
            Purged::Nothing => {
                print_line(&mut out, "nothing to purge: the key held nothing live");
                Ok(())
            }
            Purged::RefusedLiveClaim => Err(Failure::Store(
                "refused: the key holds a live claim (its execution may be running); --force drops it"
                    .into(),
            )),
            _ => Err(Failure::Store("the store answered something new".into())),
        },
        Command::Resolve { key, how } => {
            let resolution = if how.release {
                Resolution::Release
            } else {
                let Some(status) = how.respond_status else {
                    return Err(Failure::Usage(
                        "give --release or --respond-status".into(),
                    ));
                };
                let mut headers = HeaderMap::new();
                for (name, value) in how.respond_header {
                    headers.append(name, value);
                }
                let body = match &how.respond_body {
                    Some(path) => read_body(path)?,
                    None => Bytes::new(),
                };
                Resolution::Respond {
                    status,
                    headers,
                    body,
                }
            };
            match store.resolve(store_key(&key)?, resolution).await? {
                Resolved::Released => {
                    print_line(&mut out, "resolved: released; the next retry executes");
                    Ok(())
                }
                Resolved::Stored => {
                    print_line(&mut out, "resolved: retries get the stored answer");
                    Ok(())
                }
                Resolved::Refused(state) => Err(Failure::Store(format!(
                    "refused: the key is {state}, not outcome_unknown; only a key whose outcome is unknown can be resolved"
                ))),
                Resolved::Changed => Err(Failure::Store(
                    "refused: the key changed while it was being resolved (its execution stored its answer late, or someone else resolved it); nothing was overwritten: inspect it again"
                        .into(),
                )),
                _ => Err(Failure::Store("the store answered something new".into())),
            }
        }
    }
}

/// The body file, at most [`MAX_RESPOND_BODY`] bytes (read with that
/// bound, so a pipe or a device cannot make it read without end).
fn read_body(path: &std::path::Path) -> Result<Bytes, Failure> {
    use std::io::Read;
    let usage =
        |e: std::io::Error| Failure::Usage(format!("--respond-body {}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(usage)?;
    let mut body = Vec::new();
    file.take(MAX_RESPOND_BODY.saturating_add(1))
        .read_to_end(&mut body)
        .map_err(usage)?;
    if body.len() as u64 > MAX_RESPOND_BODY {
        return Err(Failure::Usage(format!(
            "--respond-body {}: more than the {MAX_RESPOND_BODY} bytes accepted",
            path.display()
        )));
    }
    Ok(Bytes::from(body))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::output::rfc3339;
    use super::*;

    #[test]
    fn the_command_line_parses_as_documented() {
        Cli::command_for_test().debug_assert();
        let cli = Cli::try_parse_from([
            "idempotency-admin",
            "--store",
            "redis",
            "resolve",
            "k",
            "--scope",
            "tenant",
            "--respond-status",
            "201",
            "--respond-header",
            "Content-Type: application/json",
            "--respond-header",
            "X-A: 1",
        ])
        .unwrap();
        match cli.command {
            Command::Resolve { key, how } => {
                assert_eq!(key.scope.as_deref(), Some("tenant"));
                assert_eq!(how.respond_status, Some(StatusCode::CREATED));
                assert_eq!(how.respond_header.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            &["--store", "redis", "resolve", "k"][..],
            &[
                "--store",
                "redis",
                "resolve",
                "k",
                "--release",
                "--respond-status",
                "201",
            ],
            &[
                "--store",
                "redis",
                "resolve",
                "k",
                "--respond-header",
                "A: b",
            ],
            &["--store", "redis", "resolve", "k", "--respond-status", "99"],
            &[
                "--store",
                "redis",
                "resolve",
                "k",
                "--respond-status",
                "201",
                "--respond-header",
                "no colon",
            ],
            &["--store", "redis", "list", "--limit", "0"],
            &["--store", "redis", "list", "--state", "absent"],
            &["--store", "memcached", "list"],
        ] {
            let args = std::iter::once("idempotency-admin").chain(bad.iter().copied());
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_time_past_the_year_9999_is_left_out_not_a_panic() {
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert_eq!(rfc3339(far, true), None);
        let near = SystemTime::UNIX_EPOCH + Duration::from_secs(1);
        assert_eq!(
            rfc3339(near, false).as_deref(),
            Some("1970-01-01T00:00:01Z")
        );
    }

    #[test]
    fn durations_for_a_person() {
        assert_eq!(short_duration(Duration::from_secs(42)), "42s");
        assert_eq!(short_duration(Duration::from_secs(192)), "3m12s");
        assert_eq!(short_duration(Duration::from_secs(5 * 3600 + 180)), "5h3m");
        assert_eq!(
            short_duration(Duration::from_secs(2 * 86_400 + 4 * 3600)),
            "2d4h"
        );
    }

    impl Cli {
        fn command_for_test() -> clap::Command {
            <Cli as clap::CommandFactory>::command()
        }
    }
}
