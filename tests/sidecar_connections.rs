//! The sidecar's connections and proxy headers, over loopback: hop-by-hop
//! and forwarding headers, limits on connections and on what a client may
//! hold (headers never finished, a body that never comes, idle
//! connections).

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use common::sidecar::*;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::TokioExecutor;
use tower_idempotency::IdempotencyLayer;
use tower_idempotency::sidecar::{self};
use tower_idempotency::store::MemoryStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_headers_are_hop_by_hop_and_never_reach_the_upstream() {
    let (up_addr, _up) = start_upstream().await;
    let car = Sidecar::start(IdempotencyLayer::new(MemoryStore::new()), config(up_addr)).await;
    let answer = post_with(
        car.addr,
        "proxy",
        &[
            ("proxy-authorization", "Basic c2VjcmV0"),
            ("proxy-authenticate", "Basic"),
            ("proxy-connection", "keep-alive"),
        ],
    )
    .await;
    assert!(answer.text().contains("proxy=-/-/-"), "{}", answer.text());
    car.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_supplied_forwarding_headers_are_replaced_unless_trusted() {
    let (up_addr, _up) = start_upstream().await;
    let spoofed = [("x-forwarded-for", "6.6.6.6"), ("forwarded", "for=6.6.6.6")];
    let car = Sidecar::start(IdempotencyLayer::new(MemoryStore::new()), config(up_addr)).await;
    let replaced = post_with(car.addr, "fwd-1", &spoofed).await.text();
    assert!(replaced.contains("xff=127.0.0.1 "), "{replaced}");
    assert!(!replaced.contains("6.6.6.6"), "{replaced}");
    car.shutdown().await;

    let trusting = config(up_addr).trust_forwarded_headers(true);
    let car = Sidecar::start(IdempotencyLayer::new(MemoryStore::new()), trusting).await;
    let appended = post_with(car.addr, "fwd-2", &spoofed).await.text();
    assert!(appended.contains("xff=6.6.6.6|127.0.0.1 "), "{appended}");
    assert!(
        appended.contains("fwd=for=6.6.6.6|for=127.0.0.1;"),
        "{appended}"
    );
    car.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_header_naming_thousands_of_headers_is_bounded() {
    let (up_addr, _up) = start_upstream().await;
    let car = Sidecar::start(IdempotencyLayer::new(MemoryStore::new()), config(up_addr)).await;
    // 20 000 names: the first is honoured (x-hop is dropped), names past
    // the bound are not looked at (x-far, the last one, is forwarded).
    let mut names: Vec<String> = vec!["x-hop".to_owned()];
    names.extend((0..19_998).map(|n| format!("x-n{n}")));
    names.push("x-far".to_owned());
    let connection = names.join(", ");
    let answer = post_with(
        car.addr,
        "conn",
        &[
            ("connection", &connection),
            ("x-hop", "secret"),
            ("x-far", "far"),
        ],
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED);
    assert!(answer.text().contains("conn=-"), "{}", answer.text());
    assert!(answer.text().contains("far=far"), "{}", answer.text());
    car.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up_addr, _up) = start_upstream().await;
    let car = Sidecar::start(
        IdempotencyLayer::new(MemoryStore::new()),
        config(up_addr).header_read_timeout(Duration::from_millis(300)),
    )
    .await;
    let mut slow = tokio::net::TcpStream::connect(car.addr).await.unwrap();
    slow.write_all(b"POST /charge HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // The sidecar closes the connection (with or without a 408 first).
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the slow client was not disconnected");
    car.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_wait_for_a_free_place() {
    let (up_addr, _up) = start_upstream().await;
    let car = Sidecar::start(
        IdempotencyLayer::new(MemoryStore::new()),
        config(up_addr).max_connections(1),
    )
    .await;
    let holder = tokio::net::TcpStream::connect(car.addr).await.unwrap();
    let waiting = tokio::spawn(post_with(car.addr, "limit", &[]));
    // The second connection is not served while the first holds the place.
    // Served, it would answer within a few milliseconds (the upstream
    // answers at once); 300 ms leaves it ample time to show it was not.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "served past the connection limit");
    drop(holder);
    let answer = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once a place was free")
        .unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);
    car.shutdown().await;
}

/// Issue 22, item 3: a connection that sends nothing, or half an HTTP/2
/// preface, is closed when its first request has not come within the
/// header read timeout, and gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_first_request_give_their_places_back() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up_addr, _up) = start_upstream().await;
    let car = Sidecar::start(
        IdempotencyLayer::new(MemoryStore::new()),
        config(up_addr)
            .max_connections(2)
            .header_read_timeout(Duration::from_millis(500)),
    )
    .await;
    let mut silent = tokio::net::TcpStream::connect(car.addr).await.unwrap();
    let mut preface = tokio::net::TcpStream::connect(car.addr).await.unwrap();
    preface.write_all(b"PRI").await.unwrap();
    // Both are closed by the sidecar.
    for conn in [&mut silent, &mut preface] {
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "a connection without a request stayed open");
    }
    let answered = tokio::time::timeout(Duration::from_secs(5), health(car.addr)).await;
    assert_eq!(answered.ok(), Some(StatusCode::OK), "the places came back");
    car.shutdown().await;
}

/// Idle connections, HTTP/1 keep-alive and HTTP/2 alike, are closed after
/// the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_over_http1_and_http2() {
    use hyper_util::rt::TokioIo;
    let (up_addr, _up) = start_upstream().await;
    let car = Sidecar::start(
        IdempotencyLayer::new(MemoryStore::new()),
        config(up_addr)
            .max_connections(2)
            .idle_timeout(Duration::from_millis(400)),
    )
    .await;
    let health_request = || {
        Request::get(format!(
            "http://{}{}",
            car.addr,
            sidecar::DEFAULT_HEALTH_PATH
        ))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap()
    };
    // HTTP/1.1, kept alive after one request.
    let stream = tokio::net::TcpStream::connect(car.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let h1 = tokio::spawn(conn);
    let res = send.send_request(health_request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.into_body().collect().await.unwrap();
    // HTTP/2 (prior knowledge), one request.
    let stream = tokio::net::TcpStream::connect(car.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let h2 = tokio::spawn(conn);
    let res = send.send_request(health_request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.into_body().collect().await.unwrap();
    for (name, conn) in [("HTTP/1.1", h1), ("HTTP/2", h2)] {
        let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
        assert!(ended.is_ok(), "an idle {name} connection stayed open");
    }
    // Both places are free again.
    let answered = tokio::time::timeout(Duration::from_secs(5), health(car.addr)).await;
    assert_eq!(answered.ok(), Some(StatusCode::OK));
    car.shutdown().await;
}

/// Issue 22, item 4: a client's own `X-Forwarded-Host` never reaches the
/// upstream: it is the authority the client asked for, or absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_host_is_the_requests_authority_never_the_clients_own() {
    use hyper_util::rt::TokioIo;
    let (up_addr, _up) = start_upstream().await;
    let car = Sidecar::start(IdempotencyLayer::new(MemoryStore::new()), config(up_addr)).await;
    // HTTP/1.0 without Host: none is sent.
    let answer = raw_exchange(
        car.addr,
        b"POST /charge HTTP/1.0\r\nidempotency-key: h10\r\nx-forwarded-host: evil.example\r\ncontent-length: 2\r\n\r\n{}",
    )
    .await;
    assert!(answer.contains("exec="), "{answer}");
    assert!(!answer.contains("evil"), "{answer}");
    assert!(answer.contains("xfh="), "{answer}");
    assert!(answer.ends_with("xfh="), "no X-Forwarded-Host: {answer}");
    // HTTP/1.1 with `Connection: host`: the Host the client sent.
    let answer = raw_exchange(
        car.addr,
        b"POST /charge HTTP/1.1\r\nhost: good.example\r\nconnection: host, close\r\nidempotency-key: h11\r\nx-forwarded-host: evil.example\r\ncontent-length: 2\r\n\r\n{}",
    )
    .await;
    assert!(!answer.contains("evil"), "{answer}");
    assert!(answer.contains("xfh=good.example"), "{answer}");
    // HTTP/2: the request's :authority.
    let stream = tokio::net::TcpStream::connect(car.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::post("http://h2.example/charge")
        .header("idempotency-key", "h2")
        .header("x-forwarded-host", "evil.example")
        .body(http_body_util::Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let answer = common::collect(send.send_request(req).await.unwrap()).await;
    let text = answer.text();
    assert!(!text.contains("evil"), "{text}");
    assert!(text.ends_with("xfh=h2.example"), "{text}");
    car.shutdown().await;

    // Behind a trusted proxy, its X-Forwarded-Host stays.
    let car = Sidecar::start(
        IdempotencyLayer::new(MemoryStore::new()),
        config(up_addr).trust_forwarded_headers(true),
    )
    .await;
    let kept = post_with(car.addr, "trusted", &[("x-forwarded-host", "shop.example")])
        .await
        .text();
    assert!(kept.ends_with("xfh=shop.example"), "{kept}");
    car.shutdown().await;
}

/// A client that sends a guarded request's head and never its body holds
/// neither its connection's place nor the drain: the body must arrive
/// within the client's wait (`upstream_timeout`), past which the request is
/// refused (400, the body unreadable) and nothing goes upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_body_never_comes_gives_its_place_back() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up_addr, up) = start_upstream().await;
    let car = Sidecar::start(
        IdempotencyLayer::new(MemoryStore::new()),
        config(up_addr)
            .max_connections(1)
            .upstream_timeout(Duration::from_millis(500)),
    )
    .await;
    let mut conn = tokio::net::TcpStream::connect(car.addr).await.unwrap();
    conn.write_all(
        b"POST /charge HTTP/1.1\r\nhost: x\r\nidempotency-key: no-body\r\ncontent-length: 10\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = conn.read(&mut buf).await {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "the request without its body was never ended");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("request body did not end"), "{answer}");
    let answered = tokio::time::timeout(Duration::from_secs(5), health(car.addr)).await;
    assert_eq!(answered.ok(), Some(StatusCode::OK), "the place came back");
    assert_eq!(up.executions.load(Ordering::SeqCst), 0);
    car.shutdown().await;
}

/// An upstream that speaks HTTP/1.0 (Python's `http.server` does): the
/// client's answer is still HTTP/1.1, the first as the replay, and the
/// client's connection stays open for its next request. Before, the first
/// answer carried the upstream's version (`HTTP/1.0`) and the replay
/// `HTTP/1.1`.
#[tokio::test]
async fn an_http_1_0_upstream_answers_the_client_in_its_own_version() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = upstream.accept().await {
            tokio::spawn(async move {
                if !read_request_head(&mut conn).await {
                    return;
                }
                let _ = conn
                    .write_all(b"HTTP/1.0 201 Created\r\ncontent-type: text/plain\r\n\r\ncharged")
                    .await;
                // HTTP/1.0 without a length: the body ends with the connection.
            });
        }
    });
    let car = Sidecar::start(IdempotencyLayer::new(MemoryStore::new()), config(up_addr)).await;
    let request = b"POST /charge HTTP/1.1\r\nhost: a.example\r\nidempotency-key: v10\r\ncontent-length: 2\r\n\r\n{}";
    // Both requests on one connection: the first answer keeps it open.
    let mut conn = tokio::net::TcpStream::connect(car.addr).await.unwrap();
    let mut answers = Vec::new();
    for _ in 0..2 {
        conn.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).ends_with("charged") {
            let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
                .await
                .expect("answered")
                .unwrap();
            assert_ne!(
                n,
                0,
                "the connection stays open: {}",
                String::from_utf8_lossy(&answer)
            );
            answer.extend_from_slice(&buf[..n]);
        }
        answers.push(String::from_utf8_lossy(&answer).into_owned());
    }
    for answer in &answers {
        assert!(answer.starts_with("HTTP/1.1 201 Created\r\n"), "{answer}");
    }
    assert!(
        answers[1].contains("idempotent-replayed: true"),
        "{}",
        answers[1]
    );
    car.shutdown().await;
}
