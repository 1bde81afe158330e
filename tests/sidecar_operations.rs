//! The `idempotency-sidecar` binary as an operator runs it: its Prometheus
//! metrics scraped over HTTP after traffic, its readiness check while
//! Redis goes down and comes back, and its logs as JSON lines or as plain
//! text without colour codes when stdout is not a terminal.
#![cfg(unix)]

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::body::Body;
use common::redis_server::redis_or_skip;
use common::sidecar::{client, post_to, start_upstream};
use http::{Request, StatusCode};
use tower_idempotency::sidecar::DEFAULT_READY_PATH;

/// The sidecar binary, running until dropped (then stopped with SIGTERM, as
/// an orchestrator would, and reaped).
struct Running {
    child: Option<Child>,
    /// Reads the child's stdout as it comes (a pipe left unread would
    /// block the child once its buffer is full), and returns it at exit.
    stdout: Option<std::thread::JoinHandle<Vec<u8>>>,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl Running {
    /// Starts the binary with `args` (beside its listen and metrics
    /// addresses), its stdout piped, and waits until it serves. The free
    /// ports are picked before the binary binds them, so another test may
    /// take one meanwhile: a start that fails with "Address already in
    /// use" is tried again on new ports (five times at most).
    async fn start(upstream: SocketAddr, args: &[&str]) -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            match Self::try_start(upstream, args).await {
                Ok(running) => return running,
                Err(stderr) if stderr.contains("Address already in use") => last = stderr,
                Err(stderr) => panic!("the sidecar exited before serving: {stderr}"),
            }
        }
        panic!("the sidecar found no free port in five tries: {last}");
    }

    /// One start on two new ports: the running binary, or what it wrote to
    /// stderr when it exited before serving.
    async fn try_start(upstream: SocketAddr, args: &[&str]) -> Result<Self, String> {
        let addr: SocketAddr = ([127, 0, 0, 1], common::free_port()).into();
        let metrics: SocketAddr = ([127, 0, 0, 1], common::free_port()).into();
        let mut child = Command::new(env!("CARGO_BIN_EXE_idempotency-sidecar"))
            .args(["--listen", &addr.to_string()])
            .args(["--upstream", &format!("http://{upstream}")])
            .args(["--metrics-listen", &metrics.to_string()])
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("NO_COLOR")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the sidecar binary");
        let mut pipe = child.stdout.take().expect("piped stdout");
        let stdout = std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = std::io::Read::read_to_end(&mut pipe, &mut out);
            out
        });
        let limit = Duration::from_secs(20);
        let started = std::time::Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
                }
                return Err(format!("({status}) {stderr}"));
            }
            // Bounded: a listener of another test on this port may never
            // answer.
            let health =
                tokio::time::timeout(Duration::from_millis(500), common::sidecar::health(addr));
            if health.await == Ok(StatusCode::OK) {
                // Another test's sidecar on this port answers too: only a
                // child still running is ours serving.
                if matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                continue;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the sidecar serves: not within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Self {
            child: Some(child),
            stdout: Some(stdout),
            addr,
            metrics,
        })
    }

    /// Stops it with SIGTERM and returns what it wrote to stdout.
    fn stop(mut self) -> String {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        wait_with_limit(&mut child, Duration::from_secs(20));
        // The child has exited: its stdout is closed, the reader ends.
        let output = self
            .stdout
            .take()
            .map(|reader| reader.join().unwrap_or_default())
            .unwrap_or_default();
        String::from_utf8_lossy(&output).into_owned()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits (bounded) for `child` to exit; kills it past `limit`.
fn wait_with_limit(child: &mut Child, limit: Duration) {
    let started = std::time::Instant::now();
    while child.try_wait().ok().flatten().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.wait();
}

/// `GET http://addr{path}`: the status, the content type and the body.
async fn get(addr: SocketAddr, path: &str) -> (StatusCode, String, String) {
    let req = Request::get(format!("http://{addr}{path}"))
        .body(Body::empty())
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), client().request(req))
        .await
        .expect("answered within 10 s")
        .expect("request");
    let content_type = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let answer = common::collect(res).await;
    (answer.status, content_type, answer.text())
}

/// The value of the sample `name` (with its labels as rendered, e.g.
/// `x_total{outcome="executed"}`) in a Prometheus text page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_over_http_and_count_the_traffic() {
    let Some(server) = redis_or_skip("sidecar metrics") else {
        return;
    };
    let (upstream, _) = start_upstream().await;
    let car = Running::start(
        upstream,
        &["--store", "redis", "--redis-url", &server.url()],
    )
    .await;
    let first = post_to(car.addr, "scraped", "{}", 0).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let replay = post_to(car.addr, "scraped", "{}", 0).await;
    assert!(replay.replayed());
    let missing = client()
        .request(
            Request::post(format!("http://{}/charge", car.addr))
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);

    let (status, content_type, page) = get(car.metrics, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    let count = |name: &str| sample(&page, name).unwrap_or_else(|| panic!("{name} in\n{page}"));
    assert_eq!(
        count(r#"idempotency_events_total{outcome="executed"}"#),
        1.0
    );
    assert_eq!(
        count(r#"idempotency_events_total{outcome="replayed"}"#),
        1.0
    );
    assert_eq!(
        count(r#"idempotency_refusals_total{problem="missing_key"}"#),
        1.0
    );
    assert_eq!(count("idempotency_executions_running"), 0.0);
    // Two claims, one completion, each timed; one execution.
    assert_eq!(
        count(r#"idempotency_store_operation_seconds_count{operation="claim"}"#),
        2.0
    );
    assert_eq!(
        count(r#"idempotency_store_operation_seconds_count{operation="complete"}"#),
        1.0
    );
    assert_eq!(count("idempotency_execution_seconds_count"), 1.0);
    assert!(
        page.contains(r#"idempotency_store_operation_seconds_bucket{operation="claim",le="0.5"}"#),
        "histograms have buckets:\n{page}"
    );
    let (status, _, _) = get(car.metrics, "/elsewhere").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    car.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_while_redis_is_down_and_health_does_not() {
    let Some(mut server) = redis_or_skip("sidecar readiness") else {
        return;
    };
    let (upstream, _) = start_upstream().await;
    let car = Running::start(
        upstream,
        &[
            "--store",
            "redis",
            "--redis-url",
            &server.url(),
            "--log-format",
            "json",
        ],
    )
    .await;
    let ready = || async { get(car.addr, DEFAULT_READY_PATH).await.0 };
    assert_eq!(ready().await, StatusCode::OK);
    server.kill();
    common::eventually(Duration::from_secs(10), "not ready", || async {
        ready().await == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert_eq!(
        common::sidecar::health(car.addr).await,
        StatusCode::OK,
        "alive all the same"
    );
    server.restart();
    common::eventually(Duration::from_secs(10), "ready again", || async {
        ready().await == StatusCode::OK
    })
    .await;
    // Each change is logged once, however many probes saw it.
    let out = car.stop();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect();
    let said = |level: &str, words: &str| {
        lines
            .iter()
            .filter(|l| {
                l["level"] == level && l["message"].as_str().is_some_and(|m| m.contains(words))
            })
            .count()
    };
    assert_eq!(said("WARN", "does not answer"), 1, "{out}");
    assert_eq!(said("INFO", "answers again"), 1, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let (upstream, _) = start_upstream().await;
    let car = Running::start(upstream, &["--log-format", "json"]).await;
    assert_eq!(
        post_to(car.addr, "logged", "{}", 0).await.status,
        StatusCode::CREATED
    );
    let out = car.stop();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect();
    let started = lines
        .iter()
        .find(|l| l["message"] == "idempotency sidecar ready")
        .unwrap_or_else(|| panic!("no start line in {out}"));
    assert_eq!(started["level"], "INFO");
    assert!(started["timestamp"].is_string());
    assert!(
        started["listen"].is_string(),
        "fields sit beside the message"
    );
    assert!(
        lines.iter().any(|l| l["message"] == "shutting down"),
        "{out}"
    );
    assert!(!out.contains('\u{1b}'), "no colour codes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_into_a_pipe_carry_no_colour_codes() {
    let (upstream, _) = start_upstream().await;
    let car = Running::start(upstream, &[]).await;
    let out = car.stop();
    assert!(out.contains("idempotency sidecar ready"), "{out}");
    assert!(!out.contains('\u{1b}'), "colour codes in a pipe: {out:?}");
}

/// The sidecar's own refusals are counted beside the layer's: an upstream
/// that cannot be reached is `upstream_unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecars_own_refusals_are_counted() {
    let nobody: SocketAddr = ([127, 0, 0, 1], common::free_port()).into();
    let car = Running::start(nobody, &[]).await;
    let refused = post_to(car.addr, "unreachable", "{}", 0).await;
    assert_eq!(refused.status, StatusCode::BAD_GATEWAY);
    let (_, _, page) = get(car.metrics, "/metrics").await;
    assert_eq!(
        sample(
            &page,
            r#"idempotency_refusals_total{problem="upstream_unavailable"}"#
        ),
        Some(1.0),
        "{page}"
    );
    car.stop();
}

/// A POST of JSON `body` to the sidecar under `key`.
async fn post_json(addr: SocketAddr, key: &str, body: &'static str) -> common::Answer {
    let req = Request::post(format!("http://{addr}/charge"))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), client().request(req))
        .await
        .expect("answered within 10 s")
        .expect("request");
    common::collect(res).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_compares_json_by_meaning_when_asked() {
    let first = r#"{"amount":1000,"currency":"eur","sent_at":"10:00"}"#;
    let respelled = r#"{ "currency": "eur", "amount": 1000, "sent_at": "10:00" }"#;
    let later = r#"{"sent_at":"10:05","amount":1000.0,"currency":"eur"}"#;

    // `--fingerprint json`: a re-serialised body is the same request.
    let (upstream, up) = start_upstream().await;
    let car = Running::start(upstream, &["--fingerprint", "json"]).await;
    assert_eq!(
        post_json(car.addr, "j", first).await.status,
        StatusCode::CREATED
    );
    let again = post_json(car.addr, "j", respelled).await;
    assert!(again.replayed(), "{}", again.text());
    let moved = post_json(car.addr, "j", later).await;
    assert_eq!(moved.status, StatusCode::CONFLICT, "the timestamp counts");
    drop(car);

    // With the timestamp ignored, the later retry is the same request too.
    let car = Running::start(
        upstream,
        &["--fingerprint", "json", "--fingerprint-ignore", "/sent_at"],
    )
    .await;
    assert_eq!(
        post_json(car.addr, "i", first).await.status,
        StatusCode::CREATED
    );
    assert!(post_json(car.addr, "i", later).await.replayed());
    drop(car);

    // The default compares bytes.
    let car = Running::start(upstream, &[]).await;
    assert_eq!(
        post_json(car.addr, "b", first).await.status,
        StatusCode::CREATED
    );
    let moved = post_json(car.addr, "b", respelled).await;
    assert_eq!(moved.status, StatusCode::CONFLICT);
    drop(car);
    assert_eq!(up.executions.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[test]
fn fingerprint_flags_that_cannot_work_exit_2() {
    for args in [
        &["--fingerprint-ignore", "/sent_at"][..],
        &["--fingerprint", "json", "--fingerprint-ignore", "sent_at"],
        &["--fingerprint", "json", "--fingerprint-ignore", "/a~2"],
        &["--fingerprint", "meaning"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_idempotency-sidecar"))
            .args(["--upstream", "http://127.0.0.1:1"])
            .args(args)
            .env_remove("IDEMPOTENCY_FINGERPRINT")
            .env_remove("IDEMPOTENCY_FINGERPRINT_IGNORE")
            .output()
            .expect("run the sidecar binary");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("fingerprint"), "{args:?}: {stderr}");
    }
}
