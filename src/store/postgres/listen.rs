//! Cross-process wake-ups for waiters, over PostgreSQL `LISTEN`/`NOTIFY`.
//!
//! One connection per store, outside the pool, listens on the channel
//! `<table>_done`, opened on the first wait. Completion and release send a
//! `NOTIFY` with the key's name in the same statement, delivered when it
//! commits. A dispatcher task routes each notification to the local waiters
//! of that key. A notification sent while the connection is down is lost,
//! so waiters never rely on it alone: they also re-check at their fallback
//! interval. When the connection breaks, the next wait opens a new one.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::store::wakers::{Registration, Wakers};

pub(super) struct Listener {
    config: tokio_postgres::Config,
    channel: String,
    connect_timeout: Duration,
    retry_every: Duration,
    waiters: Arc<Wakers>,
    dispatcher: tokio::sync::Mutex<Dispatcher>,
}

#[derive(Default)]
struct Dispatcher {
    task: Option<JoinHandle<()>>,
    last_attempt: Option<Instant>,
}

impl Listener {
    pub(super) fn new(
        config: tokio_postgres::Config,
        channel: String,
        connect_timeout: Duration,
        retry_every: Duration,
    ) -> Self {
        Self {
            config,
            channel,
            connect_timeout,
            retry_every,
            waiters: Arc::default(),
            dispatcher: tokio::sync::Mutex::default(),
        }
    }

    /// Registers interest in the key `name`, making sure the listening
    /// connection is up (best effort: without it, waiters re-check).
    pub(super) async fn register(this: &Arc<Self>, name: &str) -> Registration {
        this.ensure_listening().await;
        this.waiters.register(name)
    }

    async fn ensure_listening(&self) {
        let mut dispatcher = self.dispatcher.lock().await;
        if dispatcher.task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let now = Instant::now();
        if dispatcher
            .last_attempt
            .is_some_and(|at| now < crate::time::deadline(at, self.retry_every))
        {
            return;
        }
        dispatcher.last_attempt = Some(now);
        match tokio::time::timeout(self.connect_timeout, self.listen()).await {
            Ok(Ok(task)) => dispatcher.task = Some(task),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "idempotency notifications unavailable; waiters re-check instead")
            }
            Err(_) => {
                tracing::debug!("idempotency notifications timed out; waiters re-check instead")
            }
        }
    }

    /// Opens the connection, starts routing its notifications, and listens.
    async fn listen(&self) -> Result<JoinHandle<()>, tokio_postgres::Error> {
        let (client, mut connection) = self.config.connect(NoTls).await?;
        let messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        let task = tokio::spawn(dispatch(Arc::downgrade(&self.waiters), messages));
        // The channel is the table name and a suffix: a plain identifier.
        if let Err(e) = client
            .batch_execute(&format!("LISTEN {}", self.channel))
            .await
        {
            task.abort();
            return Err(e);
        }
        // The client lives as long as the dispatcher: dropping it would
        // close the connection.
        Ok(tokio::spawn(async move {
            let _client = client;
            let _ = task.await;
        }))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(task) = self.dispatcher.get_mut().task.take() {
            task.abort();
        }
    }
}

async fn dispatch(
    waiters: Weak<Wakers>,
    mut messages: impl futures_util::Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Unpin,
) {
    while let Some(Ok(message)) = messages.next().await {
        let Some(waiters) = waiters.upgrade() else {
            return;
        };
        if let AsyncMessage::Notification(notification) = message {
            waiters.wake(notification.payload());
        }
    }
    tracing::debug!("idempotency notification connection ended; the next wait listens again");
}
