//! A pooled connection that goes back to the pool only when its last
//! statement was answered.
//!
//! One whose statement timed out, or whose caller went away mid-statement,
//! may be half-open: its server side gone without a word (a failover, a
//! NAT that forgot it), which the pool cannot see, and every later
//! statement on it would time out too. Such a connection is closed instead
//! of reused, and the pool opens a new one when it is next needed.

use std::future::Future;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_postgres::{Object, Pool};

use super::error::PgError;

pub(super) struct Pooled {
    object: Option<Object>,
    /// Whether every statement sent on it got an answer.
    answered: AtomicBool,
}

impl Pooled {
    /// A connection from `pool` (bounded by the pool's wait timeout).
    pub(super) async fn get(pool: &Pool) -> Result<Self, PgError> {
        let object = pool.get().await.map_err(PgError::Pool)?;
        Ok(Self {
            object: Some(object),
            answered: AtomicBool::new(true),
        })
    }

    /// Runs `statement`, noting whether the server answered it (a result,
    /// or an error with an SQLSTATE).
    pub(super) async fn answer<T>(
        &self,
        statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, PgError> {
        self.answered.store(false, Ordering::Relaxed);
        let result = statement.await;
        if result
            .as_ref()
            .map_or_else(|e| e.code().is_some(), |_| true)
        {
            self.answered.store(true, Ordering::Relaxed);
        }
        Ok(result?)
    }

    /// Marks statements sent through the object itself (a transaction)
    /// as under way, until [`finished`](Self::finished).
    pub(super) fn sending(&self) {
        self.answered.store(false, Ordering::Relaxed);
    }

    /// The statements under way were answered.
    pub(super) fn finished(&self) {
        self.answered.store(true, Ordering::Relaxed);
    }

    /// The connection itself, for a transaction.
    pub(super) fn object_mut(&mut self) -> Option<&mut Object> {
        self.object.as_mut()
    }
}

impl Deref for Pooled {
    type Target = deadpool_postgres::ClientWrapper;

    fn deref(&self) -> &Self::Target {
        // Only taken in `drop`.
        match &self.object {
            Some(object) => object,
            None => unreachable!("a pooled connection is only taken when dropped"),
        }
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if !self.answered.load(Ordering::Relaxed)
            && let Some(object) = self.object.take()
        {
            // Out of the pool, and closed as it is dropped.
            drop(Object::take(object));
        }
    }
}
