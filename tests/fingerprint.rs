//! Comparing requests by meaning (SPEC §3) through the layer: JSON bodies
//! by their canonical form, ignored fields, a user's function, and the mode
//! in every fingerprint.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use common::*;
use http::{Request, Response, StatusCode};
use tower::{Layer, ServiceExt};
use tower_idempotency::fingerprint::JsonPointer;
use tower_idempotency::{IdempotencyLayer, RequestBody};

/// A POST of `body` as `content_type` under key `k`.
fn post_as(content_type: &str, body: impl Into<String>) -> Request<Body> {
    Request::post("/pay")
        .header("idempotency-key", "k")
        .header("content-type", content_type)
        .body(Body::from(body.into()))
        .unwrap()
}

fn json(body: impl Into<String>) -> Request<Body> {
    post_as("application/json", body)
}

/// Sends `first`, then `then`, through a fresh store under `layer`'s mode:
/// whether the second was replayed (the handler then ran once) or refused
/// as a mismatch (409, the handler ran once too).
async fn second_is_replayed(
    configure: impl Fn(IdempotencyLayer<TestStore>) -> IdempotencyLayer<TestStore>,
    first: Request<Body>,
    then: Request<Body>,
) -> bool {
    let ledger = Ledger::new();
    let svc = configure(layer(test_store())).layer(ledger.service());
    let a = send(&svc, first).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text());
    let b = send(&svc, then).await;
    assert_eq!(ledger.count(), 1, "the handler ran once");
    if b.replayed() {
        assert_eq!(b.status, a.status);
        assert_eq!(b.body, a.body, "the original answer, byte for byte");
        true
    } else {
        assert_eq!(b.status, StatusCode::CONFLICT, "{}", b.text());
        assert!(b.problem_type().ends_with("#variant.KeyMismatch"));
        false
    }
}

const CHARGE: &str = r#"{"amount":1000,"currency":"eur","card":{"last4":"4242","exp":"12/30"},"tags":["a","b"],"note":"café"}"#;

#[tokio::test]
async fn the_same_json_spelled_otherwise_is_replayed() {
    let respelled = "{ \"tags\" : [\"a\", \"b\"],\n  \"note\": \"caf\\u00e9\",\n  \"card\": {\"exp\": \"12\\/30\", \"last4\": \"4242\"},\n  \"currency\": \"eur\", \"amount\": 1000.0 }";
    let layer = IdempotencyLayer::fingerprint_json;
    assert!(second_is_replayed(layer, json(CHARGE), json(respelled)).await);
    // Bytes mode (the default) tells them apart.
    assert!(!second_is_replayed(|l| l, json(CHARGE), json(respelled)).await);
    // Any JSON media type counts, with parameters.
    assert!(
        second_is_replayed(
            layer,
            json(CHARGE),
            post_as("application/vnd.charge+json; charset=utf-8", respelled)
        )
        .await
    );
}

#[tokio::test]
async fn a_changed_value_member_or_order_is_a_mismatch() {
    let layer = IdempotencyLayer::fingerprint_json;
    let big = CHARGE.replace("1000", "9007199254740992");
    for (first, other) in [
        (CHARGE.to_owned(), CHARGE.replace("1000", "1001")),
        (
            CHARGE.to_owned(),
            CHARGE.replace(r#""amount":1000"#, r#""amount":"1000""#),
        ),
        (
            CHARGE.to_owned(),
            CHARGE.replace(r#""note":"café""#, r#""note":"cafe""#),
        ),
        (
            CHARGE.to_owned(),
            CHARGE.replace(r#"["a","b"]"#, r#"["b","a"]"#),
        ),
        (
            CHARGE.to_owned(),
            CHARGE.replace(r#""currency""#, r#""extra":null,"currency""#),
        ),
        (
            CHARGE.to_owned(),
            CHARGE.replace(r#""4242","#, r#""4242","cvc":"123","#),
        ),
        // 2^53 and 2^53 + 1 round to one double; they are two amounts.
        (
            big.clone(),
            big.replace("9007199254740992", "9007199254740993"),
        ),
    ] {
        assert!(
            !second_is_replayed(layer, json(first), json(other.clone())).await,
            "{other}"
        );
    }
}

#[tokio::test]
async fn ignored_fields_do_not_count_and_the_rest_does() {
    let first = r#"{"amount":1000,"metadata":{"sent_at":"2026-12-07T10:00:00Z","trace":"x1"},"lines":[{"sku":"a","ts":1}]}"#;
    let retry = r#"{"lines":[{"ts":2,"sku":"a"}],"metadata":{"trace":"x1","sent_at":"2026-12-07T10:00:05Z"},"amount":1000}"#;
    let ignoring = |l: IdempotencyLayer<TestStore>| {
        l.fingerprint_json_ignoring([
            JsonPointer::from_static("/metadata/sent_at"),
            JsonPointer::from_static("/lines/0/ts"),
        ])
    };
    assert!(second_is_replayed(ignoring, json(first), json(retry)).await);
    // Without the pointers, the timestamps count.
    assert!(
        !second_is_replayed(IdempotencyLayer::fingerprint_json, json(first), json(retry)).await
    );
    // An ignored member left out entirely is the same request too.
    let without = r#"{"amount":1000,"metadata":{"trace":"x1"},"lines":[{"sku":"a"}]}"#;
    assert!(second_is_replayed(ignoring, json(first), json(without)).await);
    // A field that is not ignored still counts.
    let changed = retry.replace("x1", "x2");
    assert!(!second_is_replayed(ignoring, json(first), json(changed)).await);
}

#[tokio::test]
async fn what_is_not_json_is_compared_by_its_bytes() {
    let layer = IdempotencyLayer::fingerprint_json;
    // Not valid JSON: the same bytes replay, other bytes do not.
    let broken = r#"{"amount": 1000,"#;
    assert!(second_is_replayed(layer, json(broken), json(broken)).await);
    assert!(!second_is_replayed(layer, json(broken), json(r#"{"amount":1000,"#)).await);
    // JSON sent as another media type, or with none: bytes.
    let a = r#"{"a":1,"b":2}"#;
    let b = r#"{"b":2,"a":1}"#;
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/jsonx",
    ] {
        assert!(
            !second_is_replayed(layer, post_as(content_type, a), post_as(content_type, b)).await,
            "{content_type}"
        );
    }
    let bare = |body: &'static str| {
        Request::post("/pay")
            .header("idempotency-key", "k")
            .body(Body::from(body))
            .unwrap()
    };
    assert!(!second_is_replayed(layer, bare(a), bare(b)).await);
    assert!(second_is_replayed(layer, bare(a), bare(a)).await);
    // A member named twice: bytes.
    let twice = r#"{"a":1,"a":2}"#;
    assert!(!second_is_replayed(layer, json(twice), json(r#"{"a":1, "a":2}"#)).await);
}

#[tokio::test]
async fn a_body_nested_10_000_deep_is_compared_by_its_bytes() {
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_spaced = format!("{} {}", "[".repeat(10_000), "]".repeat(10_000));
    let layer = |l: IdempotencyLayer<TestStore>| l.fingerprint_json().request_body_limit(1 << 20);
    assert!(second_is_replayed(layer, json(deep.clone()), json(deep.clone())).await);
    assert!(!second_is_replayed(layer, json(deep), json(deep_spaced)).await);
    // Unclosed, a million deep: no overflow either.
    let open = "[".repeat(1_000_000);
    assert!(second_is_replayed(layer, json(open.clone()), json(open)).await);
}

#[tokio::test]
async fn a_record_made_under_one_mode_never_matches_another() {
    let store = test_store();
    let ledger = Ledger::new();
    let bytes = layer(store.clone()).layer(ledger.service());
    let json_mode = layer(store.clone())
        .fingerprint_json()
        .layer(ledger.service());
    let ignoring = layer(store.clone())
        .fingerprint_json_ignoring([JsonPointer::from_static("/sent_at")])
        .layer(ledger.service());
    let first = send(&bytes, json(CHARGE)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    // The very same bytes, fingerprinted under another mode: a mismatch.
    let again = send(&json_mode, json(CHARGE)).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.text());
    let again = send(&ignoring, json(CHARGE)).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.text());
    assert_eq!(ledger.count(), 1);
    // And under the mode it was made in, the replay.
    assert!(send(&bytes, json(CHARGE)).await.replayed());

    // Two sets of ignored pointers are two modes.
    let store = test_store();
    let one = layer(store.clone())
        .fingerprint_json_ignoring([
            JsonPointer::from_static("/a"),
            JsonPointer::from_static("/b"),
        ])
        .layer(ledger.service());
    let other = layer(store.clone())
        .fingerprint_json_ignoring([JsonPointer::from_static("/b")])
        .layer(ledger.service());
    assert_eq!(send(&one, json(CHARGE)).await.status, StatusCode::CREATED);
    assert_eq!(
        send(&other, json(CHARGE)).await.status,
        StatusCode::CONFLICT
    );
    // The same set in another order, or with a pointer twice, is the same
    // mode.
    let same = layer(store)
        .fingerprint_json_ignoring([
            JsonPointer::from_static("/b"),
            JsonPointer::from_static("/a"),
            JsonPointer::from_static("/b"),
        ])
        .layer(ledger.service());
    assert!(send(&same, json(CHARGE)).await.replayed());
}

#[tokio::test]
async fn the_method_path_query_and_selected_headers_count_in_every_mode() {
    let store = test_store();
    let ledger = Ledger::new();
    let svc = layer(store)
        .fingerprint_json()
        .fingerprint_headers([http::HeaderName::from_static("x-tenant")])
        .layer(ledger.service());
    let with = |uri: &str, tenant: &str| {
        Request::post(uri)
            .header("idempotency-key", "k")
            .header("content-type", "application/json")
            .header("x-tenant", tenant)
            .body(Body::from(CHARGE))
            .unwrap()
    };
    assert_eq!(
        send(&svc, with("/pay?x=1", "t1")).await.status,
        StatusCode::CREATED
    );
    for (uri, tenant) in [("/pay?x=2", "t1"), ("/other?x=1", "t1"), ("/pay?x=1", "t2")] {
        let a = send(&svc, with(uri, tenant)).await;
        assert_eq!(a.status, StatusCode::CONFLICT, "{uri} {tenant}");
    }
    let a = send(&svc, with("/pay?x=1", "t1")).await;
    assert!(a.replayed());
    assert_eq!(ledger.count(), 1);
}

#[tokio::test]
async fn the_handler_gets_the_bytes_as_sent() {
    let ledger = Ledger::new();
    let svc = layer(test_store())
        .fingerprint_json()
        .layer(ledger.service());
    let spaced = "{ \"b\" : 1 ,  \"a\" : 2 }";
    let a = send(&svc, json(spaced)).await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(&ledger.last_body.lock().unwrap()[..], spaced.as_bytes());
}

#[tokio::test]
async fn a_function_of_yours_decides_what_counts() {
    // Form bodies by their fields, in any order.
    let form = |l: IdempotencyLayer<TestStore>| {
        l.fingerprint_with(|_parts, body| {
            let mut fields: Vec<&[u8]> = body.split(|&b| b == b'&').collect();
            fields.sort_unstable();
            fields.join(&b'&')
        })
    };
    let as_form = |body: &str| post_as("application/x-www-form-urlencoded", body);
    assert!(second_is_replayed(form, as_form("a=1&b=2"), as_form("b=2&a=1")).await);
    assert!(!second_is_replayed(form, as_form("a=1&b=2"), as_form("b=2&a=2")).await);
    // It sees the request's head too.
    let by_header = |l: IdempotencyLayer<TestStore>| {
        l.fingerprint_with(|parts, _body| {
            parts
                .headers
                .get("x-order")
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default()
        })
    };
    let order = |o: &str, body: &str| {
        Request::post("/pay")
            .header("idempotency-key", "k")
            .header("x-order", o)
            .body(Body::from(body.to_owned()))
            .unwrap()
    };
    assert!(second_is_replayed(by_header, order("7", "x"), order("7", "y")).await);
    assert!(!second_is_replayed(by_header, order("7", "x"), order("8", "x")).await);
}

/// A gRPC service that answers OK (trailers-only) and counts its calls.
fn grpc_ok(
    calls: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<RequestBody<Body>>,
    Response = Response<Body>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<Response<Body>, std::convert::Infallible>>
             + Send
             + 'static,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_req: Request<RequestBody<Body>>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let res = Response::builder()
            .header("content-type", "application/grpc+json")
            .header("grpc-status", "0")
            .body(Body::empty())
            .unwrap();
        std::future::ready(Ok(res))
    })
}

#[tokio::test]
async fn grpc_calls_stay_on_bytes() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer(test_store())
        .fingerprint_json()
        .layer(grpc_ok(calls.clone()));
    let call = |body: &'static str| {
        Request::post("/pay.v1.Payments/Charge")
            .header("content-type", "application/grpc+json")
            .header("idempotency-key", "k")
            .body(Body::from(body))
            .unwrap()
    };
    let first = collect(svc.clone().oneshot(call(r#"{"a":1,"b":2}"#)).await.unwrap()).await;
    assert_eq!(first.headers["grpc-status"], "0");
    let same = collect(svc.clone().oneshot(call(r#"{"a":1,"b":2}"#)).await.unwrap()).await;
    assert_eq!(same.headers["grpc-status"], "0");
    let reordered = collect(svc.clone().oneshot(call(r#"{"b":2,"a":1}"#)).await.unwrap()).await;
    assert_eq!(
        reordered.headers["grpc-status"], "9",
        "a gRPC call's bytes count, whatever its content type says"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[derive(Clone, Debug, PartialEq)]
struct Marker(u32);

#[tokio::test]
async fn the_handler_gets_the_request_as_sent_in_every_mode() {
    use http_body_util::BodyExt;
    // What the handler saw: method, URI, a header, an extension, the body
    // and its trailers.
    type Seen = (
        String,
        String,
        String,
        Option<Marker>,
        bytes::Bytes,
        Option<String>,
    );
    let seen: Arc<std::sync::Mutex<Vec<Seen>>> = Arc::default();
    let handler = {
        let seen = seen.clone();
        tower::service_fn(move |req: Request<RequestBody<Body>>| {
            let seen = seen.clone();
            async move {
                let (parts, body) = req.into_parts();
                let collected = body.collect().await.unwrap();
                let trailer = collected
                    .trailers()
                    .and_then(|t| t.get("x-checksum"))
                    .map(|v| v.to_str().unwrap().to_owned());
                seen.lock().unwrap().push((
                    parts.method.to_string(),
                    parts.uri.to_string(),
                    parts.headers["x-tenant"].to_str().unwrap().to_owned(),
                    parts.extensions.get::<Marker>().cloned(),
                    collected.to_bytes(),
                    trailer,
                ));
                Ok::<_, std::convert::Infallible>(
                    Response::builder().status(201).body(Body::empty()).unwrap(),
                )
            }
        })
    };
    let body = "{ \"b\" : 1 ,  \"a\" : 2 }";
    let request = |key: &str| {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", http::HeaderValue::from_static("abc"));
        let with_trailers = http_body_util::Full::new(bytes::Bytes::from(body))
            .with_trailers(async move { Some(Ok::<_, std::convert::Infallible>(trailers)) });
        let mut req = Request::post("/pay?x=1")
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .header("x-tenant", "t1")
            .body(Body::new(with_trailers))
            .unwrap();
        req.extensions_mut().insert(Marker(7));
        req
    };
    let modes = [
        layer(test_store()),
        layer(test_store()).fingerprint_json(),
        layer(test_store()).fingerprint_with(|_, body| body.to_vec()),
    ];
    for (i, l) in modes.into_iter().enumerate() {
        let svc = l.layer(handler.clone());
        let a = collect(svc.oneshot(request(&format!("k{i}"))).await.unwrap()).await;
        assert_eq!(a.status, StatusCode::CREATED);
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    for s in seen.iter() {
        assert_eq!(
            s,
            &(
                "POST".to_owned(),
                "/pay?x=1".to_owned(),
                "t1".to_owned(),
                Some(Marker(7)),
                bytes::Bytes::from(body),
                Some("abc".to_owned())
            )
        );
    }
}

#[tokio::test]
async fn a_function_mode_record_never_matches_bytes_or_json() {
    let store = test_store();
    let ledger = Ledger::new();
    let identity = layer(store.clone())
        .fingerprint_with(|_, body| body.to_vec())
        .layer(ledger.service());
    let bytes = layer(store.clone()).layer(ledger.service());
    let json_mode = layer(store).fingerprint_json().layer(ledger.service());
    assert_eq!(
        send(&identity, json(CHARGE)).await.status,
        StatusCode::CREATED
    );
    // The function returns the very bytes: still another mode.
    assert_eq!(
        send(&bytes, json(CHARGE)).await.status,
        StatusCode::CONFLICT
    );
    assert_eq!(
        send(&json_mode, json(CHARGE)).await.status,
        StatusCode::CONFLICT
    );
    assert!(send(&identity, json(CHARGE)).await.replayed());
    assert_eq!(ledger.count(), 1);
}
