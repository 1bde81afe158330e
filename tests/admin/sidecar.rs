//! An outcome-unknown key made by the sidecar for real, then found and
//! resolved with `idempotency-admin`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt as _};

use super::*;
use crate::common::redis_server::redis_or_skip;
use crate::redis_tool::store_and_tool;
use crate::tool::BodyFile;

/// An upstream that reads each request and closes the connection without
/// answering: the sidecar cannot know whether it acted.
async fn start_resetting_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let count = received.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                // The head, then as many body bytes as it announces.
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&seen).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if seen.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                let _ = socket.shutdown().await;
            });
        }
    });
    (addr, received)
}

/// An outcome-unknown key made for real (the sidecar in front of an
/// upstream that resets after the request was sent), found by the scope
/// the client sent, and resolved both ways through the sidecar.
#[tokio::test]
async fn outcome_unknown_from_the_sidecar_resolved_both_ways() {
    use crate::common::sidecar::{Sidecar, client, config};
    use tower_idempotency::sidecar::scope_from_header;

    let Some(server) = redis_or_skip("outcome_unknown_from_the_sidecar_resolved_both_ways") else {
        return;
    };
    let (store, tool, _) = store_and_tool(&server).await;
    let (upstream, received) = start_resetting_upstream().await;
    let layer = IdempotencyLayer::new(store)
        .scope(scope_from_header(http::HeaderName::from_static("x-tenant")));
    let sidecar = Sidecar::start(layer, config(upstream)).await;
    let addr = sidecar.addr;
    let call = |key: &'static str| async move {
        let req = http::Request::post(format!("http://{addr}/charge"))
            .header("idempotency-key", key)
            .header("x-tenant", "acme")
            .body(Body::from("{\"amount\":100}"))
            .unwrap();
        crate::common::collect(client().request(req).await.unwrap()).await
    };
    for k in ["pay-1", "pay-2"] {
        assert_eq!(call(k).await.status, StatusCode::BAD_GATEWAY);
        let retry = call(k).await;
        assert_eq!(retry.status, StatusCode::CONFLICT);
        assert!(retry.problem_type().ends_with("#variant.OutcomeUnknown"));
    }
    assert_eq!(received.load(Ordering::SeqCst), 2);

    let unscoped = tool.run(&["inspect", "pay-1", "--json"]).await.object();
    assert_eq!(unscoped["state"], "absent", "the scope is part of the key");
    let seen = tool
        .run(&["inspect", "pay-1", "--scope", "acme", "--json"])
        .await
        .object();
    assert_eq!(seen["state"], "outcome_unknown");
    assert_eq!(seen["status"], 502);

    let body = BodyFile::new(b"{\"id\":\"ch_1\",\"amount\":100}");
    let resolved = tool
        .run(&[
            "resolve",
            "pay-1",
            "--scope",
            "acme",
            "--respond-status",
            "201",
            "--respond-header",
            "Content-Type: application/json",
            "--respond-body",
            body.path(),
        ])
        .await;
    assert_eq!(resolved.code, 0, "{resolved:?}");
    let retry = call("pay-1").await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(&retry.body[..], b"{\"id\":\"ch_1\",\"amount\":100}");

    let released = tool
        .run(&["resolve", "pay-2", "--scope", "acme", "--release"])
        .await;
    assert_eq!(released.code, 0, "{released:?}");
    assert_eq!(call("pay-2").await.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        received.load(Ordering::SeqCst),
        3,
        "the released key reached the upstream again; the resolved one did not"
    );
    sidecar.shutdown().await;
}
