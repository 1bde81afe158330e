//! The sidecar tests' upstream (counts executions, echoes what it saw),
//! a sidecar on a free port, and the requests they send it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use bytes::Bytes;
use http::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tower_idempotency::IdempotencyLayer;
use tower_idempotency::sidecar::{self, SidecarConfig};
use tower_idempotency::store::Store;

use super::Answer;

/// The backend: counts executions, echoes what it saw.
#[derive(Clone, Default)]
pub struct Upstream {
    pub executions: Arc<AtomicUsize>,
}

/// The upstream's handler: counts the execution, waits `x-delay-ms`,
/// answers 201 with what it saw (body and forwarding headers).
pub async fn charge(
    State(up): State<Upstream>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, [(&'static str, String); 2], String) {
    let n = up.executions.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some(ms) = headers
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let seen = |h: &str| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let all = |h: &str| {
        headers
            .get_all(h)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join("|")
    };
    let echo = format!(
        "exec={n} body={} xff={} proto={} fwd={} conn={} proxy={}/{}/{} far={} xfh={}",
        String::from_utf8_lossy(&body),
        all("x-forwarded-for"),
        seen("x-forwarded-proto"),
        all("forwarded"),
        seen("x-hop"),
        seen("proxy-authorization"),
        seen("proxy-authenticate"),
        seen("proxy-connection"),
        seen("x-far"),
        all("x-forwarded-host"),
    );
    (
        StatusCode::CREATED,
        [
            ("x-exec", n.to_string()),
            ("content-type", "text/plain".to_owned()),
        ],
        echo,
    )
}

/// Serves an [`Upstream`] on `listener` (`POST|PUT /charge`, `GET /hello`).
pub async fn start_upstream_on(listener: TcpListener, up: Upstream) {
    let app = axum::Router::new()
        .route("/charge", post(charge).put(charge))
        .route("/hello", get(|| async { "hello" }))
        .with_state(up);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
}

/// An [`Upstream`] on a free loopback port.
pub async fn start_upstream() -> (SocketAddr, Upstream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let up = Upstream::default();
    start_upstream_on(listener, up.clone()).await;
    (addr, up)
}

/// A sidecar serving on a free loopback port until [`Sidecar::shutdown`].
pub struct Sidecar {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

impl Sidecar {
    /// Starts one with `layer` and `config`.
    pub async fn start<St: Store>(layer: IdempotencyLayer<St>, config: SidecarConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            sidecar::serve(listener, layer, config, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            stop: Some(stop),
            done,
        }
    }

    /// Stops it, waiting (bounded) for it to drain.
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.done)
            .await
            .expect("drains")
            .unwrap();
    }
}

/// A plain HTTP/1 client.
pub fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A POST of `body` to the sidecar under `key`; the upstream waits
/// `delay_ms` before it answers.
pub async fn post_to(addr: SocketAddr, key: &str, body: &'static str, delay_ms: u64) -> Answer {
    let req = Request::post(format!("http://{addr}/charge"))
        .header("idempotency-key", key)
        .header("x-delay-ms", delay_ms.to_string())
        .header("connection", "x-hop")
        .header("x-hop", "secret")
        .body(Body::from(body))
        .unwrap();
    let res = client().request(req).await.expect("request");
    super::collect(res).await
}

/// The sidecar's configuration with `upstream` and every default.
pub fn config(upstream: SocketAddr) -> SidecarConfig {
    SidecarConfig::new(&format!("http://{upstream}")).unwrap()
}

/// A POST to the sidecar with extra request headers.
pub async fn post_with(addr: SocketAddr, key: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = Request::post(format!("http://{addr}/charge")).header("idempotency-key", key);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let res = client()
        .request(req.body(Body::from("{}")).unwrap())
        .await
        .expect("request");
    super::collect(res).await
}

/// An upstream that answers with a head and part of its body, then nothing,
/// with the socket left open. Counts the requests it read.
pub async fn start_stalling_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    tokio::spawn({
        let received = received.clone();
        async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let received = received.clone();
                tokio::spawn(async move {
                    if !read_request_head(&mut conn).await {
                        return;
                    }
                    received.fetch_add(1, Ordering::SeqCst);
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
                        .await;
                    // Keep the socket open, silent, until the peer leaves.
                    let _ = conn.read(&mut [0u8; 1024]).await;
                });
            }
        }
    });
    (addr, received)
}

/// Reads from `conn` until the end of a request's head (`\r\n\r\n`);
/// false when the peer left or failed first. (The upstreams here ignore
/// any body.)
pub async fn read_request_head(conn: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    let mut seen = Vec::new();
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// Waits (bounded) until `count` reaches `n`.
pub async fn until_count(count: &AtomicUsize, n: usize) {
    super::eventually(
        Duration::from_secs(5),
        &format!("the count reaches {n}"),
        || async { count.load(Ordering::SeqCst) >= n },
    )
    .await;
}

/// The status of `GET /_idempotency/health`.
pub async fn health(addr: SocketAddr) -> StatusCode {
    client()
        .get(
            format!("http://{addr}{}", sidecar::DEFAULT_HEALTH_PATH)
                .parse()
                .unwrap(),
        )
        .await
        .map(|res| res.status())
        .unwrap_or(StatusCode::BAD_GATEWAY)
}

/// Sends `raw` (a whole HTTP/1 request) and returns what came back.
pub async fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(raw).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}
