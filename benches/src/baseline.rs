//! The two baselines: the job queue a skilled engineer would write on Postgres without Sluice.
//!
//! One table with a partial index on queued rows. A worker is one connection that claims with
//! `UPDATE ... FOR UPDATE SKIP LOCKED ... RETURNING` (autocommit: the claim commits), runs the
//! no-op handler, and marks the job done in a second commit.
//!   naive:   one job per claim, one per completion (two commits per job)
//!   batched: up to 100 jobs per claim, all of them completed by one statement
//! Idle workers either poll with a short sleep or LISTEN (the producer NOTIFYs in its insert's
//! transaction) with a poll fallback.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Statement};

use crate::db;
use crate::record::{Milestones, Recorder};
use crate::Result;

pub const TABLE: &str = "sluice_bench.naive_job";
pub const NOTIFY_CHANNEL: &str = "sluice_bench_job";
/// Jobs per claim and per completion statement of the batched baseline.
pub const BATCH_CLAIM: usize = 100;
/// Rows per multi-row INSERT when a baseline enqueues in bulk (as Sluice does with enqueue_many).
pub const INSERT_BATCH: usize = crate::sluice_side::ENQUEUE_BATCH;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    Naive,
    Batched,
}

impl Baseline {
    pub fn system(self) -> &'static str {
        match self {
            Baseline::Naive => "naive",
            Baseline::Batched => "batched",
        }
    }

    pub fn claim_sql(self) -> String {
        match self {
            Baseline::Naive => format!(
                "UPDATE {TABLE} SET status = 'running'
                  WHERE id = (SELECT id FROM {TABLE} WHERE status = 'queued'
                               ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
                 RETURNING id, payload"
            ),
            Baseline::Batched => format!(
                "UPDATE {TABLE} SET status = 'running'
                  WHERE id = ANY(ARRAY(SELECT id FROM {TABLE} WHERE status = 'queued'
                                        ORDER BY id LIMIT {BATCH_CLAIM} FOR UPDATE SKIP LOCKED))
                 RETURNING id, payload"
            ),
        }
    }

    pub fn complete_sql(self) -> String {
        match self {
            Baseline::Naive => {
                format!("UPDATE {TABLE} SET status = 'done', finished_at = now() WHERE id = $1")
            }
            Baseline::Batched => format!(
                "UPDATE {TABLE} SET status = 'done', finished_at = now() WHERE id = ANY($1)"
            ),
        }
    }
}

/// Drops and recreates the baseline's table: every run starts from an empty one.
pub async fn recreate_table(client: &Client) -> Result<()> {
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS sluice_bench;
             DROP TABLE IF EXISTS {TABLE};
             CREATE TABLE {TABLE} (
                 id          bigserial PRIMARY KEY,
                 payload     jsonb NOT NULL,
                 status      text NOT NULL DEFAULT 'queued',
                 created_at  timestamptz NOT NULL DEFAULT now(),
                 finished_at timestamptz
             );
             CREATE INDEX naive_job_queued_idx ON {TABLE} (id) WHERE status = 'queued';"
        ))
        .await?;
    Ok(())
}

/// The baselines' bulk enqueue: one multi-row INSERT from an array per `INSERT_BATCH` rows,
/// through a statement prepared once per connection.
pub struct BulkInsert {
    statement: Statement,
}

impl BulkInsert {
    pub async fn prepare(client: &Client) -> Result<BulkInsert> {
        let statement = client
            .prepare_typed(
                &format!("INSERT INTO {TABLE} (payload) SELECT p FROM unnest($1::jsonb[]) AS p"),
                &[Type::JSONB_ARRAY],
            )
            .await?;
        Ok(BulkInsert { statement })
    }

    /// Inserts the inputs `range`.
    pub async fn insert(&self, client: &Client, range: Range<u64>) -> Result<()> {
        let inputs: Vec<Value> = range.map(Value::from).collect();
        for chunk in inputs.chunks(INSERT_BATCH) {
            client.execute(&self.statement, &[&chunk]).await?;
        }
        Ok(())
    }
}

/// Prepares and inserts: for filling the table before a measurement.
pub async fn insert_range(client: &Client, range: Range<u64>) -> Result<()> {
    BulkInsert::prepare(client)
        .await?
        .insert(client, range)
        .await
}

/// SQL that enqueues one job and, in the same statement (hence transaction), notifies the
/// listening workers.
pub fn insert_one_notify_sql() -> String {
    format!(
        "WITH job AS (INSERT INTO {TABLE} (payload) VALUES ($1) RETURNING id)
         SELECT pg_notify('{NOTIFY_CHANNEL}', '') FROM job"
    )
}

/// Jobs in the table, and how many of them are done.
pub async fn job_counts(client: &Client) -> Result<(i64, i64)> {
    let row = client
        .query_one(
            &format!("SELECT count(*), count(*) FILTER (WHERE status = 'done') FROM {TABLE}"),
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// How an idle worker waits for new jobs.
#[derive(Debug, Clone, Copy)]
pub enum Wake {
    Poll(Duration),
    Listen { fallback: Duration },
}

/// Baseline worker connections running until [`BaselineWorkers::stop`] (or drop).
pub struct BaselineWorkers {
    stop: watch::Sender<bool>,
    handles: Vec<JoinHandle<Result<()>>>,
    pub pids: Vec<i32>,
}

impl BaselineWorkers {
    /// Connects `connections` workers (LISTENing first with `Wake::Listen`), then starts them.
    /// Each counts the jobs it completed (after the commit) in `completions`.
    pub async fn start(
        dsn: &str,
        kind: Baseline,
        connections: usize,
        wake: Wake,
        recorder: &Arc<Recorder>,
        completions: &Arc<Milestones>,
    ) -> Result<BaselineWorkers> {
        let (stop, stopped) = watch::channel(false);
        let mut handles = Vec::new();
        let mut pids = Vec::new();
        for _ in 0..connections {
            let (client, notifications) = match wake {
                Wake::Listen { .. } => {
                    let (client, rx) = db::connect_listening(dsn).await?;
                    client
                        .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
                        .await?;
                    (client, Some(rx))
                }
                Wake::Poll(_) => (db::connect(dsn).await?, None),
            };
            pids.push(
                client
                    .query_one("SELECT pg_backend_pid()", &[])
                    .await?
                    .get(0),
            );
            let worker = BaselineWorker {
                client,
                notifications,
                kind,
                wake,
                recorder: Arc::clone(recorder),
                completions: Arc::clone(completions),
                stop: stopped.clone(),
            };
            handles.push(tokio::spawn(worker.run()));
        }
        Ok(BaselineWorkers {
            stop,
            handles,
            pids,
        })
    }

    /// Workers finish the batch in hand (claimed jobs are completed), then disconnect.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        let mut first_error = None;
        for handle in self.handles {
            let outcome = match handle.await {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(e) => e.into(),
            };
            first_error.get_or_insert(outcome);
        }
        first_error.map_or(Ok(()), Err)
    }
}

struct BaselineWorker {
    client: Client,
    notifications: Option<mpsc::UnboundedReceiver<String>>,
    kind: Baseline,
    wake: Wake,
    recorder: Arc<Recorder>,
    completions: Arc<Milestones>,
    stop: watch::Receiver<bool>,
}

impl BaselineWorker {
    async fn run(mut self) -> Result<()> {
        let claim = self.client.prepare(&self.kind.claim_sql()).await?;
        let complete = self.client.prepare(&self.kind.complete_sql()).await?;
        while !*self.stop.borrow() {
            let jobs = self.client.query(&claim, &[]).await?;
            if jobs.is_empty() {
                if !self.idle().await {
                    break;
                }
                continue;
            }
            let mut ids = Vec::with_capacity(jobs.len());
            for job in &jobs {
                ids.push(job.get::<_, i64>(0));
                // The no-op handler: decode the payload and record it.
                let payload: Value = job.get(1);
                self.recorder.record(payload.as_u64().unwrap_or(u64::MAX));
            }
            match self.kind {
                Baseline::Naive => self.client.execute(&complete, &[&ids[0]]).await?,
                Baseline::Batched => self.client.execute(&complete, &[&ids]).await?,
            };
            self.completions.add(ids.len(), Instant::now());
        }
        Ok(())
    }

    /// Waits for work after an empty claim; false when the worker should stop.
    async fn idle(&mut self) -> bool {
        let (wait, notifications) = match (self.wake, self.notifications.as_mut()) {
            (Wake::Listen { fallback }, Some(rx)) => (fallback, Some(rx)),
            (Wake::Poll(d), _) | (Wake::Listen { fallback: d }, None) => (d, None),
        };
        let notified = async {
            match notifications {
                Some(rx) => {
                    // A closed channel (the connection is gone) returns at once, and the next
                    // claim fails with the connection's error.
                    let _ = rx.recv().await;
                    // One claim loop serves every notification already queued.
                    while rx.try_recv().is_ok() {}
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = notified => true,
            _ = tokio::time::sleep(wait) => true,
            changed = self.stop.changed() => changed.is_ok() && !*self.stop.borrow(),
        }
    }
}
