//! `payments.v1.Payments`, written by hand: prost messages and a tonic
//! service with no `.proto` compiler and no build script.
//!
//! ```proto
//! service Payments {
//!   rpc Charge(ChargeRequest) returns (ChargeReply);                    // unary
//!   rpc ListCharges(ListChargesRequest) returns (stream ChargeReply);   // server streaming
//! }
//! message ChargeRequest { uint64 amount = 1; string currency = 2; }
//! message ChargeReply { string id = 1; uint64 amount = 2; string currency = 3; string message = 4; }
//! message ListChargesRequest {}
//! ```
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Body as HttpBody;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::{NamedService, ServerStreamingService, UnaryService};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

pub const CHARGE: &str = "/payments.v1.Payments/Charge";
pub const LIST_CHARGES: &str = "/payments.v1.Payments/ListCharges";

#[derive(Clone, PartialEq, prost::Message)]
pub struct ChargeRequest {
    #[prost(uint64, tag = "1")]
    pub amount: u64,
    #[prost(string, tag = "2")]
    pub currency: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ChargeReply {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(uint64, tag = "2")]
    pub amount: u64,
    #[prost(string, tag = "3")]
    pub currency: String,
    #[prost(string, tag = "4")]
    pub message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListChargesRequest {}

/// The charges this process executed, and how.
#[derive(Default)]
pub struct Ledger {
    pub charges: Mutex<Vec<ChargeReply>>,
    pub executions: AtomicU64,
    /// Simulated processing time of a charge.
    pub delay: Mutex<Duration>,
    /// How many of the next charges answer `UNAVAILABLE` (with
    /// `grpc-retry-pushback-ms: 200`) instead of charging.
    pub unavailable_next: AtomicU64,
}

/// The `Payments` server.
#[derive(Clone)]
pub struct PaymentsServer {
    ledger: Arc<Ledger>,
}

impl PaymentsServer {
    pub fn new(ledger: Arc<Ledger>) -> Self {
        Self { ledger }
    }
}

impl NamedService for PaymentsServer {
    const NAME: &'static str = "payments.v1.Payments";
}

struct Charge(Arc<Ledger>);

impl UnaryService<ChargeRequest> for Charge {
    type Response = ChargeReply;
    type Future = BoxFuture<Response<ChargeReply>, Status>;

    fn call(&mut self, request: Request<ChargeRequest>) -> Self::Future {
        let ledger = self.0.clone();
        Box::pin(async move {
            let n = ledger.executions.fetch_add(1, Ordering::SeqCst) + 1;
            let busy = ledger
                .unavailable_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if busy {
                let mut metadata = tonic::metadata::MetadataMap::new();
                metadata.insert(
                    "grpc-retry-pushback-ms",
                    tonic::metadata::MetadataValue::from_static("200"),
                );
                return Err(Status::with_metadata(
                    tonic::Code::Unavailable,
                    "card network busy",
                    metadata,
                ));
            }
            let charge = request.into_inner();
            // Test hooks: amounts that make the card network fail.
            match charge.amount {
                0 => return Err(Status::invalid_argument("amount must be positive")),
                13 => return Err(Status::internal("card network failed")),
                _ => {}
            }
            if charge.currency.len() != 3
                || !charge.currency.bytes().all(|b| b.is_ascii_alphabetic())
            {
                return Err(Status::invalid_argument("currency must be 3 letters"));
            }
            let delay = *ledger.delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            let reply = ChargeReply {
                id: format!("pay_{n:06}"),
                amount: charge.amount,
                message: format!("Charged {} {}", charge.amount, charge.currency),
                currency: charge.currency,
            };
            ledger.charges.lock().unwrap().push(reply.clone());
            Ok(Response::new(reply))
        })
    }
}

struct ListCharges(Arc<Ledger>);

type ChargeStream = Pin<Box<dyn futures_core::Stream<Item = Result<ChargeReply, Status>> + Send>>;

impl ServerStreamingService<ListChargesRequest> for ListCharges {
    type Response = ChargeReply;
    type ResponseStream = ChargeStream;
    type Future = BoxFuture<Response<ChargeStream>, Status>;

    fn call(&mut self, _request: Request<ListChargesRequest>) -> Self::Future {
        let charges = self.0.charges.lock().unwrap().clone();
        Box::pin(async move {
            let stream: ChargeStream =
                Box::pin(futures_util::stream::iter(charges.into_iter().map(Ok)));
            Ok(Response::new(stream))
        })
    }
}

impl<B> Service<http::Request<B>> for PaymentsServer
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let ledger = self.ledger.clone();
        match req.uri().path() {
            CHARGE => Box::pin(async move {
                let mut grpc =
                    tonic::server::Grpc::new(ProstCodec::<ChargeReply, ChargeRequest>::default());
                Ok(grpc.unary(Charge(ledger), req).await)
            }),
            LIST_CHARGES => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::<
                    ChargeReply,
                    ListChargesRequest,
                >::default());
                Ok(grpc.server_streaming(ListCharges(ledger), req).await)
            }),
            _ => Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

/// A small client for the two methods, over a channel or any gRPC service
/// (for example the channel behind `IdempotentRetryLayer`).
#[derive(Clone)]
pub struct PaymentsClient<T = tonic::transport::Channel> {
    grpc: tonic::client::Grpc<T>,
}

impl PaymentsClient {
    pub async fn connect(addr: std::net::SocketAddr) -> Result<Self, tonic::transport::Error> {
        Ok(Self::with_service(channel_to(addr).await?))
    }
}

/// A channel to `addr`.
pub async fn channel_to(
    addr: std::net::SocketAddr,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect()
        .await
}

/// A channel behind the client retry layer: one `idempotency-key` per call
/// (kept when the call has one), retried on UNAVAILABLE, ABORTED (in
/// flight) and RESOURCE_EXHAUSTED, `grpc-retry-pushback-ms` honoured.
#[cfg(feature = "client")]
pub type RetryingChannel = tower_idempotency::client::IdempotentRetry<
    tower::util::MapRequest<
        tonic::transport::Channel,
        fn(
            http::Request<tower_idempotency::client::RetryBody<tonic::body::Body>>,
        ) -> http::Request<tonic::body::Body>,
    >,
>;

#[cfg(feature = "client")]
impl PaymentsClient<RetryingChannel> {
    /// A client whose calls go through the retry layer.
    pub async fn connect_retrying(
        addr: std::net::SocketAddr,
        policy: tower_idempotency::client::RetryPolicy,
    ) -> Result<Self, tonic::transport::Error> {
        use tower::Layer;
        let to_tonic: fn(
            http::Request<tower_idempotency::client::RetryBody<tonic::body::Body>>,
        ) -> http::Request<tonic::body::Body> = |req| req.map(tonic::body::Body::new);
        let channel = tower::util::MapRequestLayer::new(to_tonic).layer(channel_to(addr).await?);
        let retrying = tower_idempotency::client::IdempotentRetryLayer::new(policy).layer(channel);
        Ok(Self::with_service(retrying))
    }
}

impl<T> PaymentsClient<T>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: HttpBody<Data = Bytes> + Send + 'static,
    <T::ResponseBody as HttpBody>::Error: Into<tonic::codegen::StdError>,
{
    pub fn with_service(service: T) -> Self {
        Self {
            grpc: tonic::client::Grpc::new(service),
        }
    }

    /// Wraps `message` with `key` as its `idempotency-key` metadata (if
    /// given) and waits until the channel is ready.
    async fn prepare<M>(&mut self, message: M, key: Option<&str>) -> Result<Request<M>, Status> {
        let mut request = Request::new(message);
        if let Some(key) = key {
            let value = key
                .parse()
                .map_err(|_| Status::invalid_argument("bad key"))?;
            request.metadata_mut().insert("idempotency-key", value);
        }
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.into().to_string()))?;
        Ok(request)
    }

    /// Calls `Charge`, with `key` as the `idempotency-key` metadata if given.
    pub async fn charge(
        &mut self,
        key: Option<&str>,
        amount: u64,
        currency: &str,
    ) -> Result<Response<ChargeReply>, Status> {
        let request = self
            .prepare(
                ChargeRequest {
                    amount,
                    currency: currency.to_owned(),
                },
                key,
            )
            .await?;
        let path = http::uri::PathAndQuery::from_static(CHARGE);
        self.grpc.unary(request, path, ProstCodec::default()).await
    }

    /// Calls `ListCharges` and collects the stream.
    pub async fn list_charges(&mut self, key: Option<&str>) -> Result<Vec<ChargeReply>, Status> {
        let request = self.prepare(ListChargesRequest {}, key).await?;
        let path = http::uri::PathAndQuery::from_static(LIST_CHARGES);
        let mut stream = self
            .grpc
            .server_streaming(request, path, ProstCodec::default())
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(reply) = stream.message().await? {
            out.push(reply);
        }
        Ok(out)
    }
}

/// Whether a response carries the replay marker in its metadata.
pub fn replayed<T>(response: &Response<T>) -> bool {
    response
        .metadata()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}
