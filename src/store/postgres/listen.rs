//! Cross-process wake-ups for waiters, over PostgreSQL `LISTEN`/`NOTIFY`.
//!
//! One connection per store, outside the pool, listens on the channel
//! `<table>_done`, opened on the first wait. Completion and release send a
//! `NOTIFY` with the key's name in the same statement, delivered when it
//! commits. A dispatcher task routes each notification to the local waiters
//! of that key. A notification sent while the connection is down is lost,
//! so waiters never rely on it alone: they also re-check at their fallback
//! interval. When the connection breaks, the next wait opens a new one.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::task::JoinHandle;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{AsyncMessage, Client, NoTls, Socket};

use crate::store::remote::wakers::{Registration, Subscription, Wakers};

/// The TLS of a connection the store opens itself.
#[derive(Clone)]
pub(super) enum Connector {
    Plain,
    #[cfg(feature = "tls")]
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Connector {
    pub(super) fn opener(self) -> Opener {
        match self {
            Connector::Plain => opener(NoTls),
            #[cfg(feature = "tls")]
            Connector::Rustls(tls) => opener(tls),
        }
    }
}

/// What a connection sends on its own: notifications, notices, its end.
type Messages = Pin<Box<dyn Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Send>>;

type Opening =
    Pin<Box<dyn Future<Output = Result<(Client, Messages), tokio_postgres::Error>> + Send>>;

/// Opens the `LISTEN` connection with some TLS connector: the store's own,
/// or the one a user's pool uses.
pub(super) type Opener = Arc<dyn Fn(tokio_postgres::Config) -> Opening + Send + Sync>;

/// An [`Opener`] connecting through `tls`.
pub(super) fn opener<T>(tls: T) -> Opener
where
    T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    Arc::new(move |config: tokio_postgres::Config| {
        let tls = tls.clone();
        Box::pin(async move {
            let (client, mut connection) = config.connect(tls).await?;
            let messages: Messages = Box::pin(futures_util::stream::poll_fn(move |cx| {
                connection.poll_message(cx)
            }));
            Ok((client, messages))
        })
    })
}

pub(super) struct Listener {
    config: tokio_postgres::Config,
    open: Opener,
    channel: String,
    waiters: Arc<Wakers>,
    subscription: Subscription,
}

impl Listener {
    pub(super) fn new(
        config: tokio_postgres::Config,
        open: Opener,
        channel: String,
        connect_timeout: Duration,
        retry_every: Duration,
    ) -> Self {
        Self {
            config,
            open,
            channel,
            waiters: Arc::default(),
            subscription: Subscription::new(connect_timeout, retry_every),
        }
    }

    /// Registers interest in the key `name`, making sure the listening
    /// connection is up (best effort: without it, waiters re-check).
    pub(super) async fn register(this: &Arc<Self>, name: &str) -> Registration {
        this.subscription.ensure(this.listen()).await;
        this.waiters.register(name)
    }

    /// Opens the connection, starts routing its notifications, and listens.
    async fn listen(&self) -> Result<JoinHandle<()>, tokio_postgres::Error> {
        let (client, messages) = (self.open)(self.config.clone()).await?;
        let task = tokio::spawn(dispatch(Arc::downgrade(&self.waiters), messages));
        // The channel is the table name and a suffix: a plain identifier,
        // quoted like the table (the same channel `pg_notify` names, as it
        // is lower case), so that no name is ever read as a keyword.
        if let Err(e) = client
            .batch_execute(&format!("LISTEN {}", super::sql::quoted(&self.channel)))
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
