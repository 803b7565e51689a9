//! The worker's connections for handler transactions: created on first use, reused, and never
//! more of them than the worker has slots (one open transaction per running handler).

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::{Client, NoTls};

use crate::error::Error;

pub(crate) struct ConnectionPool {
    config: tokio_postgres::Config,
    idle: Mutex<Vec<Arc<Client>>>,
    permits: Arc<Semaphore>,
}

impl ConnectionPool {
    pub(crate) fn new(config: tokio_postgres::Config, size: usize) -> Arc<Self> {
        Arc::new(ConnectionPool {
            config,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(size.max(1))),
        })
    }

    pub(crate) async fn checkout(self: &Arc<Self>) -> Result<PooledConnection, Error> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| Error::connection("the worker's connection pool is closed"))?;
        let reused = {
            let mut idle = self.idle();
            // Connections die with the server or the network while idle; skip those.
            std::iter::from_fn(|| idle.pop()).find(|client| !client.is_closed())
        };
        let client = match reused {
            Some(client) => client,
            None => Arc::new(connect(&self.config).await?),
        };
        Ok(PooledConnection {
            client,
            pool: Arc::clone(self),
            permit: Some(permit),
            reusable: true,
        })
    }

    /// Drops the idle connections; checked-out ones are dropped when returned.
    pub(crate) fn close(&self) {
        self.permits.close();
        self.idle().clear();
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Arc<Client>>> {
        // A panic while holding this lock cannot leave the Vec inconsistent.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Opens a connection whose I/O is driven by a spawned task until the client is dropped.
pub(crate) async fn connect(config: &tokio_postgres::Config) -> Result<Client, Error> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| Error::postgres("connecting to Postgres failed", e))?;
    tokio::spawn(async move {
        // The error, if any, surfaces on the client's next query as a closed connection.
        let _ = connection.await;
    });
    Ok(client)
}

/// A connection checked out of the pool. Goes back to the pool when dropped, unless marked
/// unusable or closed.
pub(crate) struct PooledConnection {
    client: Arc<Client>,
    pool: Arc<ConnectionPool>,
    permit: Option<OwnedSemaphorePermit>,
    reusable: bool,
}

impl PooledConnection {
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Its state is unknown (e.g. a statement failed mid-transaction on a broken link): close
    /// it instead of handing it to the next task.
    pub(crate) fn discard(&mut self) {
        self.reusable = false;
    }

    /// Moves the checkout (connection and pool slot) into the returned value, leaving `self`
    /// empty, so that a value being dropped can hand its connection to a spawned task.
    pub(crate) fn take(&mut self) -> PooledConnection {
        PooledConnection {
            client: Arc::clone(&self.client),
            pool: Arc::clone(&self.pool),
            permit: self.permit.take(),
            reusable: std::mem::replace(&mut self.reusable, false),
        }
    }
}

impl Drop for PooledConnection {
    fn drop(&mut self) {
        if self.reusable
            && self.permit.is_some()
            && !self.client.is_closed()
            && !self.pool.permits.is_closed()
        {
            self.pool.idle().push(Arc::clone(&self.client));
        }
    }
}
