//! The Sluice side of every scenario: a no-op task under a fresh name per run, workers run
//! in-process as tokio tasks (each its own registration and connection), enqueueing through
//! `sluice-client`, and the database half of the exactly-once check.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use sluice_client::{
    define_task, enqueue_many, TaskDefinition, TaskError, TaskOptions, Worker, WorkerStats,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::record::Recorder;
use crate::Result;

/// How many inputs one `sluice.enqueue_many` call carries.
pub const ENQUEUE_BATCH: usize = 1000;

/// The task name of the current run. Runs are sequential, and `TaskDefinition::name` is how
/// the client takes a name chosen at run time.
static TASK_NAME: RwLock<&str> = RwLock::new("sluice_bench_unset");

/// The no-op task; its input is the sequence number the handler records.
pub struct BenchTask;

impl TaskDefinition for BenchTask {
    const NAME: &'static str = "sluice_bench_unset";
    type Input = u64;
    type Output = ();

    fn name() -> &'static str {
        *TASK_NAME.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// Defines a task no earlier run or process used (so leftovers cannot interfere) and makes it
/// the name of [`BenchTask`].
pub async fn define_fresh_task(client: &Client, scenario: &str) -> Result<&'static str> {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    let clock = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() % 100_000)
        .unwrap_or(0);
    let name = format!(
        "bench_{scenario}_{}_{}_{clock}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    );
    // Leaked on purpose: one short string per run, and the client wants &'static str.
    let name: &'static str = Box::leak(name.into_boxed_str());
    let options = TaskOptions {
        // A deep queue must not be cancelled for waiting; the default is 5 minutes.
        schedule_timeout: Some(Duration::from_secs(3600)),
        ..TaskOptions::default()
    };
    define_task(client, name, &options).await?;
    *TASK_NAME.write().unwrap_or_else(|e| e.into_inner()) = name;
    Ok(name)
}

/// Enqueues the inputs `range` with `sluice.enqueue_many`, `ENQUEUE_BATCH` per call.
pub async fn enqueue_range(client: &Client, range: Range<u64>) -> Result<()> {
    let inputs: Vec<u64> = range.collect();
    for chunk in inputs.chunks(ENQUEUE_BATCH) {
        enqueue_many::<BenchTask>(client, chunk).await?;
    }
    Ok(())
}

/// Workers running in this process until [`SluiceWorkers::stop`] (or drop).
pub struct SluiceWorkers {
    stop: watch::Sender<bool>,
    handles: Vec<JoinHandle<Result<(), sluice_client::Error>>>,
    stats: Vec<WorkerStats>,
    pub names: Vec<String>,
}

impl SluiceWorkers {
    /// Starts `count` workers with `slots` each (None: the client's default) for the current
    /// task; their handlers only record the input in `recorder`.
    pub fn start(
        dsn: &str,
        label: &str,
        count: usize,
        slots: Option<i32>,
        recorder: &Arc<Recorder>,
    ) -> Result<SluiceWorkers> {
        let (stop, stopped) = watch::channel(false);
        let mut handles = Vec::new();
        let mut stats = Vec::new();
        let mut names = Vec::new();
        for i in 0..count {
            let name = format!("{label}_{i}");
            let recorder = Arc::clone(recorder);
            let mut builder = Worker::builder(dsn)
                .name(name.clone())
                .task::<BenchTask, _, _>(move |_ctx, seq: u64| {
                    recorder.record(seq);
                    std::future::ready(Ok::<(), TaskError>(()))
                });
            if let Some(slots) = slots {
                builder = builder.slots(slots);
            }
            let worker = builder.build()?;
            stats.push(worker.stats());
            let mut stopped = stopped.clone();
            handles.push(tokio::spawn(worker.run_until(async move {
                // Resolves on stop() and when the sender is dropped.
                let _ = stopped.wait_for(|stop| *stop).await;
            })));
            names.push(name);
        }
        Ok(SluiceWorkers {
            stop,
            handles,
            stats,
            names,
        })
    }

    /// When the last of `n` completions committed, as the workers saw their answers (the
    /// baselines' workers time their completions the same way), once all `n` have: a query
    /// asking Postgres whether any is left costs up to 20 ms after a drain (it passes over the
    /// dead index entries of every task just finished) and would be timed as drain.
    pub fn all_completed_at(&self, n: usize) -> Option<Instant> {
        let completed: u64 = self.stats.iter().map(WorkerStats::completed).sum();
        if completed < n as u64 {
            return None;
        }
        self.stats
            .iter()
            .filter_map(WorkerStats::last_ended_at)
            .max()
    }

    /// Waits until every worker is registered (live in `sluice.workers`).
    pub async fn wait_registered(&self, client: &Client, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let live: i64 = client
                .query_one(
                    "SELECT count(*) FROM sluice.workers WHERE name = ANY($1) AND stopped_at IS NULL",
                    &[&self.names],
                )
                .await?
                .get(0);
            if live as usize >= self.names.len() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "only {live} of {} workers registered after {timeout:?}",
                    self.names.len()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The backend pids of all the workers' sessions (they set application_name to
    /// "sluice worker <name>").
    pub async fn backend_pids(&self, client: &Client) -> Result<Vec<i32>> {
        let application_names: Vec<String> = self
            .names
            .iter()
            .map(|n| format!("sluice worker {n}"))
            .collect();
        Ok(client
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = ANY($1)",
                &[&application_names],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Graceful shutdown: in-flight handlers finish, completions are flushed, workers
    /// deregister.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        let mut first_error = None;
        for handle in self.handles {
            let outcome = match handle.await {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.into(),
                Err(e) => e.into(),
            };
            first_error.get_or_insert(outcome);
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Waits until no task of `task` is queued or running; returns when that was first seen.
pub async fn wait_all_finished(client: &Client, task: &str, stall: Duration) -> Result<Instant> {
    let unfinished = client
        // The table, not the sluice.tasks view: unfinished (queued or running, including tasks
        // running on claims held in memory, whose rows say queued) is `finished_at IS NULL`,
        // which the unfinished tasks' partial index serves. The view reads every row and
        // overlays the claims: polled every 2 ms, it took CPU from the drain it measured.
        .prepare(
            "SELECT count(*) FROM sluice.task_run WHERE task_name = $1 AND finished_at IS NULL",
        )
        .await?;
    let mut last = i64::MAX;
    let mut last_progress = Instant::now();
    loop {
        let open: i64 = client.query_one(&unfinished, &[&task]).await?.get(0);
        let seen = Instant::now();
        if open == 0 {
            return Ok(seen);
        }
        if open < last {
            last = open;
            last_progress = seen;
        } else if last_progress.elapsed() > stall {
            return Err(format!("{open} tasks of {task} still unfinished after {stall:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// How long a check waits for tasks left `running` by stopped workers to be requeued.
const RUNNING_SETTLE: Duration = Duration::from_secs(15);

async fn running_count(client: &Client, task: &str) -> Result<i64> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM sluice.tasks WHERE task_name = $1 AND status = 'running'",
            &[&task],
        )
        .await?
        .get(0))
}

/// Task counts by status in `sluice.tasks`.
pub async fn status_counts(client: &Client, task: &str) -> Result<BTreeMap<String, i64>> {
    Ok(client
        .query(
            "SELECT status::text, count(*) FROM sluice.tasks WHERE task_name = $1 GROUP BY 1",
            &[&task],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// The outcome of an exactly-once check, for a result's `ok` and `details`.
#[derive(Debug, Clone)]
pub struct Check {
    pub ok: bool,
    pub details: Value,
}

impl Check {
    pub fn failed(reason: impl Into<String>) -> Check {
        Check {
            ok: false,
            details: json!({ "error": reason.into() }),
        }
    }
}

/// Exactly once, after the workers stopped. A complete run: every input ran once and every
/// task succeeded. A run stopped early: nothing ran twice, every input that ran succeeded,
/// and nothing is left running.
pub async fn check(
    client: &Client,
    task: &str,
    recorder: &Recorder,
    complete_run: bool,
) -> Result<Check> {
    check_with_retention(client, task, recorder, complete_run, false).await
}

/// `check`, for a run during which retention deleted succeeded tasks (only those: failed and
/// cancelled ones are kept): a task not in the table any more succeeded and was deleted, so
/// no task may be failed, cancelled, queued or running, and at most every input succeeded.
pub async fn check_with_retention(
    client: &Client,
    task: &str,
    recorder: &Recorder,
    complete_run: bool,
    succeeded_deleted: bool,
) -> Result<Check> {
    let executions = recorder.check(complete_run);
    // Tasks assigned to a worker while it was deregistering stay `running` until the
    // scheduler notices the worker is gone and requeues them: give it that time.
    let settle_start = Instant::now();
    let running_after_stop = running_count(client, task).await?;
    let mut running = running_after_stop;
    while running > 0 && settle_start.elapsed() < RUNNING_SETTLE {
        tokio::time::sleep(Duration::from_millis(20)).await;
        running = running_count(client, task).await?;
    }
    let settle_ms = settle_start.elapsed().as_secs_f64() * 1000.0;
    let counts = status_counts(client, task).await?;
    let count = |status: &str| counts.get(status).copied().unwrap_or(0) as usize;
    let expected_succeeded = if complete_run {
        executions.inputs
    } else {
        executions.ran
    };
    let succeeded_ok = match succeeded_deleted {
        false => count("succeeded") == expected_succeeded,
        true => count("succeeded") <= expected_succeeded,
    };
    let db_ok = succeeded_ok
        && count("running") == 0
        && count("failed") == 0
        && count("cancelled") == 0
        && (!complete_run || count("queued") == 0);
    Ok(Check {
        ok: executions.ok() && db_ok,
        details: json!({
            "executions": executions.to_json(), "sluice_tasks": counts,
            "running_after_stop": running_after_stop, "running_settled_ms": settle_ms,
            "deleted_by_retention": if succeeded_deleted {
                json!(expected_succeeded.saturating_sub(count("succeeded")))
            } else {
                Value::Null
            },
        }),
    })
}

/// Removes a run's tasks and its definition, and vacuums the task table. Cleanup only, never
/// part of a measurement: runs do not pile millions of rows into the project database, and
/// each run starts without the previous runs' dead rows (the churn scenario is the one that
/// measures how Sluice lives with those).
pub async fn cleanup(dsn: &str, task: &str) {
    // Once more after a failure: rows left behind stay queued with no worker for them, and a
    // scheduler holding that many in memory reads new arrivals in slices (every later run and
    // `make test` on this database would measure that).
    for attempt in 1..=2 {
        match try_cleanup(dsn, task).await {
            Ok(()) => return,
            Err(e) => {
                let mut message = e.to_string();
                let mut source = e.source();
                while let Some(cause) = source {
                    message.push_str(&format!(": {cause}"));
                    source = cause.source();
                }
                eprintln!("warning: cleanup of task {task} failed (attempt {attempt}): {message}");
            }
        }
    }
}

async fn try_cleanup(dsn: &str, task: &str) -> Result<()> {
    let result: Result<()> = async {
        let client = crate::db::connect(dsn).await?;
        client
            .execute("DELETE FROM sluice.task_run WHERE task_name = $1", &[&task])
            .await?;
        client
            .execute(
                "DELETE FROM sluice.task_definition WHERE name = $1",
                &[&task],
            )
            .await?;
        client
            .batch_execute("VACUUM (ANALYZE) sluice.task_run")
            .await?;
        Ok(())
    }
    .await;
    result
}
