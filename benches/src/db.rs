//! Connections, waiting for the cluster, and telling connection trouble (retry the run) from
//! real failures.

use std::future::{poll_fn, Future};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::{Error, Result};

/// How long to wait for the cluster to come back (`scripts/dev.sh install` restarts it).
pub const CLUSTER_WAIT: Duration = Duration::from_secs(180);

/// How many times one measurement is attempted when the cluster goes away under it.
const RUN_ATTEMPTS: u32 = 4;

/// Connects and drives the connection on its own task.
pub async fn connect(dsn: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Connects and forwards every notification's channel name, for LISTENing sessions.
pub async fn connect_listening(dsn: &str) -> Result<(Client, mpsc::UnboundedReceiver<String>)> {
    let (client, mut connection) = tokio_postgres::connect(dsn, NoTls).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.channel().to_string());
            }
        }
    });
    Ok((client, rx))
}

/// Waits until the cluster accepts connections and has the extension.
pub async fn wait_for_cluster(dsn: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let mut said = false;
    loop {
        let last_error = match connect(dsn).await {
            Ok(client) => match client
                .query_opt("SELECT 1 FROM pg_extension WHERE extname = 'sluice'", &[])
                .await
            {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => "the sluice extension is not installed in this database".to_string(),
                Err(e) => describe(&e),
            },
            Err(e) => describe(e.as_ref()),
        };
        if start.elapsed() > timeout {
            return Err(format!(
                "the cluster at \"{dsn}\" is not usable after {timeout:?}: {last_error} \
                 (`scripts/dev.sh start`)"
            )
            .into());
        }
        if !said {
            eprintln!("waiting for the cluster: {last_error}");
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Prints the settings that make the numbers meaningful, and warns when they are not durable.
pub async fn print_server_settings(dsn: &str) -> Result<()> {
    let client = connect(dsn).await?;
    let row = client
        .query_one(
            "SELECT current_setting('server_version'), current_setting('fsync'),
                    current_setting('synchronous_commit'), current_setting('shared_buffers'),
                    (SELECT extversion FROM pg_extension WHERE extname = 'sluice')",
            &[],
        )
        .await?;
    let (version, fsync, sync_commit, shared_buffers, sluice): (
        String,
        String,
        String,
        String,
        String,
    ) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    println!(
        "server: PostgreSQL {version}, fsync={fsync}, synchronous_commit={sync_commit}, \
         shared_buffers={shared_buffers}, sluice {sluice}"
    );
    if fsync != "on" || sync_commit != "on" {
        eprintln!("!!! the cluster is not durable (fsync/synchronous_commit off): numbers are not comparable");
    }
    Ok(())
}

/// Key of the advisory lock that keeps two benchmark invocations from running at once: they
/// would share the baseline table and the notification channel, and each other's CPUs.
const BENCH_LOCK_KEY: i64 = 0x51ce_be7c;

/// Takes the benchmark lock (waiting for another invocation to finish); held as long as the
/// returned session lives.
pub async fn lock_out_other_benches(dsn: &str) -> Result<Client> {
    let client = connect(dsn).await?;
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&BENCH_LOCK_KEY])
        .await?
        .get(0);
    if !locked {
        eprintln!("another sluice-bench is running on this cluster: waiting for it to finish");
        client
            .execute("SELECT pg_advisory_lock($1)", &[&BENCH_LOCK_KEY])
            .await?;
    }
    Ok(client)
}

/// When the server started: a run during which it changed was disturbed by a restart.
pub async fn server_started_at(client: &Client) -> Result<String> {
    Ok(client
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await?
        .get(0))
}

/// The error of a run that the cluster disturbed: retried like a connection failure.
#[derive(Debug)]
pub struct Disturbed(pub String);

impl std::fmt::Display for Disturbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "run disturbed: {}", self.0)
    }
}

impl std::error::Error for Disturbed {}

/// Whether the error comes from the cluster going away (a restart, a dropped database), rather
/// than from the benchmark or Sluice misbehaving.
pub fn is_connection_error(error: &Error) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
    while let Some(e) = current {
        if e.is::<Disturbed>() || e.is::<std::io::Error>() {
            return true;
        }
        if let Some(pg) = e.downcast_ref::<tokio_postgres::Error>() {
            if pg.is_closed() {
                return true;
            }
            if let Some(code) = pg.code() {
                let code = code.code();
                // 08: connection exception; 57P0x: admin/crash shutdown, cannot connect now;
                // 3D000: the database was dropped (dev.sh recreates it).
                if code.starts_with("08") || code.starts_with("57P0") || code == "3D000" {
                    return true;
                }
            }
        }
        if let Some(client_error) = e.downcast_ref::<sluice_client::Error>() {
            if client_error.kind() == sluice_client::ErrorKind::Connection {
                return true;
            }
        }
        current = e.source();
    }
    false
}

/// The error and its causes on one line: tokio-postgres says only "db error" and keeps
/// Postgres' message in its source.
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// Runs one measurement, again (after the cluster is back) when the cluster went away during
/// it or restarted under it: those numbers would say nothing about Sluice or the baselines.
pub async fn retrying<T, F, Fut>(dsn: &str, what: &str, mut run: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 1;
    loop {
        let result = async {
            let started_at = server_started_at(&connect(dsn).await?).await?;
            let value = run().await?;
            let now = server_started_at(&connect(dsn).await?).await?;
            if now != started_at {
                return Err(Disturbed(format!("the server restarted at {now}")).into());
            }
            Ok(value)
        }
        .await;
        match result {
            Ok(value) => return Ok(value),
            Err(e) if attempt < RUN_ATTEMPTS && is_connection_error(&e) => {
                eprintln!(
                    "{what}: {}; waiting for the cluster and running it again",
                    describe(e.as_ref())
                );
                // Let a restart in progress finish before probing.
                tokio::time::sleep(Duration::from_secs(2)).await;
                wait_for_cluster(dsn, CLUSTER_WAIT).await?;
                attempt += 1;
            }
            Err(e) => return Err(describe(e.as_ref()).into()),
        }
    }
}
