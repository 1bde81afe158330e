//! The readiness check: whether the store answers, asked once a second
//! however many probes come.

use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use tokio::time::Instant;

use crate::body::ResponseBody;
use crate::store::Store;

/// The bound on one readiness check, whatever the store's own timeouts.
const READY_CHECK_LIMIT: Duration = Duration::from_secs(2);

/// How long one ping's answer serves the readiness checks that follow.
const READY_ANSWER_REUSE: Duration = Duration::from_secs(1);

/// The readiness check, shared by every connection: one ping at a time,
/// its answer reused for [`READY_ANSWER_REUSE`] (probes from many load
/// balancers cost the store one ping a second), and a log line when the
/// answer changes (WARN when the store stops answering, INFO when it is
/// back).
pub(super) struct Readiness<St> {
    store: St,
    /// When the last ping ended, and why it failed.
    last: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
}

impl<St: Store> Readiness<St> {
    pub(super) fn new(store: St) -> Self {
        Self {
            store,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether the store answers. A caller waits for at most the ping in
    /// flight ([`READY_CHECK_LIMIT`]), then shares its answer.
    async fn check(&self) -> Result<(), String> {
        let mut last = self.last.lock().await;
        if let Some((at, answer)) = &*last
            && at.elapsed() < READY_ANSWER_REUSE
        {
            return answer.clone();
        }
        let answer = match tokio::time::timeout(READY_CHECK_LIMIT, self.store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {READY_CHECK_LIMIT:?}")),
        };
        let was_ready = last.as_ref().is_none_or(|(_, before)| before.is_ok());
        match (&answer, was_ready) {
            (Err(e), true) => tracing::warn!(
                error = %e,
                "sidecar not ready: its idempotency store does not answer"
            ),
            (Ok(()), false) => tracing::info!("sidecar ready: its idempotency store answers again"),
            _ => {}
        }
        *last = Some((Instant::now(), answer.clone()));
        answer
    }

    /// The readiness check's answer: 200 while the store answers a ping
    /// within [`READY_CHECK_LIMIT`], else 503 with `Retry-After`.
    pub(super) async fn answer<B>(&self) -> Response<ResponseBody<B>> {
        if self.check().await.is_ok() {
            return Response::new(ResponseBody::full(Bytes::from_static(b"ready"), None));
        }
        let mut res = Response::new(ResponseBody::full(
            Bytes::from_static(b"not ready: the idempotency store does not answer"),
            None,
        ));
        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        res.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("1"),
        );
        res
    }
}
