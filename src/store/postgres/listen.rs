//! PostgreSQL's feed of released keys: one connection per store, outside
//! the pool, listening on `<table>_done` (see
//! [`remote::notify`](crate::store::remote::notify) for the rest), and the
//! TLS connector it opens with: the store's own, or the one a user's pool
//! uses.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};

use futures_util::{Stream, StreamExt};
use tokio::task::JoinHandle;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{AsyncMessage, Client, NoTls, Socket};

use crate::store::remote::notify::{Feed, route};
use crate::store::remote::wakers::Wakers;

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

/// The `LISTEN` connection on the channel `<table>_done`, where completion
/// and release send the key's name (hex) in the same statement, delivered
/// when it commits.
pub(super) struct Listen {
    pub(super) config: tokio_postgres::Config,
    pub(super) open: Opener,
    pub(super) channel: String,
}

impl Feed for Listen {
    type Error = tokio_postgres::Error;

    /// Opens the connection, starts routing its notifications, and listens.
    async fn open(&self, waiters: Weak<Wakers>) -> Result<JoinHandle<()>, tokio_postgres::Error> {
        let (client, messages) = (self.open)(self.config.clone()).await?;
        let names = messages
            .take_while(|message| std::future::ready(message.is_ok()))
            .filter_map(|message| {
                std::future::ready(match message {
                    Ok(AsyncMessage::Notification(notification)) => {
                        Some(notification.payload().to_owned())
                    }
                    _ => None,
                })
            });
        let task = tokio::spawn(route(waiters, Box::pin(names)));
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
        // The client lives as long as the routing: dropping it would close
        // the connection.
        Ok(tokio::spawn(async move {
            let _client = client;
            let _ = task.await;
        }))
    }
}
