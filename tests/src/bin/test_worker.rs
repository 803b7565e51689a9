//! A worker process for the integration tests: `test_worker <dsn> <task name> <slots>`.
//!
//! Every execution is logged in `sluice_test.execution` (autocommit, so a killed process leaves
//! its trace). The input drives the handler:
//!   {"sleep_ms": n}                      sleep before finishing
//!   {"linger_after_cancel_ms": n}        cancelled during the sleep, keep running n ms
//!   {"effect": true}                     write sluice_test.effect and complete in one transaction
//!   {"pause_before_commit_ms": n}        with effect, on attempt 1 only: after the write, mark the
//!                                        execution 'paused_before_commit' and pause n ms before
//!                                        the commit (the test kills the process there)
//!   {"sleep_on_attempt": k}             sleep only on attempt k (0: every attempt)
//!   {"fail_attempts": n, "fatal": bool}  fail attempts 1..=n (non-retryable if fatal)
//!   {"fail_unless_flag": "name"}         fail (fatally) unless sluice_test.flag has that name
//!   {"spawn": {"task", "count", "batch", "pause_ms"}}  spawn children, wait, count successes
//!   {"spawn_runs": {"workflow", "inputs"}}  spawn child workflow runs, wait, count successes
//!   {"durable_memo": {"steps", "pause_after", "pause_ms"}}  a durable task: memo steps
//!                                        "step1".."step<steps>", each logging its run in
//!                                        sluice_test.memo_run (autocommit) and memoising
//!                                        {"step", "attempt", "worker_pid"}; after step
//!                                        `pause_after`, if that step ran in this execution (not
//!                                        replayed), mark the execution 'paused_after_memo' and
//!                                        pause pause_ms (the test kills the process there).
//!                                        Output "memos": the values, in order.
//! A handler that sees its cancellation signal records outcome 'cancelled'.
//! Output: {"worker_pid": pid, "attempt": attempt}.

use serde::{Deserialize, Serialize};
use sluice_client::{TaskContext, TaskDefinition, TaskError, Worker};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::Mutex;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

static TASK_NAME: OnceLock<String> = OnceLock::new();

struct TestTask;

#[derive(Serialize, Deserialize, Default)]
struct Input {
    #[serde(default)]
    sleep_ms: u64,
    /// After seeing the cancellation signal during the sleep, keep running this long.
    #[serde(default)]
    linger_after_cancel_ms: u64,
    #[serde(default)]
    effect: bool,
    #[serde(default)]
    pause_before_commit_ms: u64,
    #[serde(default)]
    sleep_on_attempt: i32,
    #[serde(default)]
    fail_attempts: i32,
    #[serde(default)]
    fatal: bool,
    /// Fail (fatally) unless sluice_test.flag has a row with this name.
    #[serde(default)]
    fail_unless_flag: Option<String>,
    /// Spawn `count` children of `task` (inputs {"n": i}), `batch` per call with `pause_ms`
    /// between calls, wait for them, and output how many succeeded.
    #[serde(default)]
    spawn: Option<SpawnPlan>,
    /// Spawn one run of `workflow` per input, wait, and output how many succeeded.
    #[serde(default)]
    spawn_runs: Option<SpawnRuns>,
    /// A workflow step's input: {"input": <run input>, "parents": {...}, "skipped": [...]}.
    /// The run input's entry for this worker's task name (if any) drives the step as above.
    #[serde(default)]
    input: Option<serde_json::Value>,
    #[serde(default)]
    parents: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    skipped: Option<Vec<String>>,
    /// Durable memo steps (see the module comment).
    #[serde(default)]
    durable_memo: Option<DurableMemo>,
}

#[derive(Serialize, Deserialize, Clone)]
struct DurableMemo {
    steps: u32,
    #[serde(default)]
    pause_after: u32,
    #[serde(default)]
    pause_ms: u64,
}

#[derive(Serialize, Deserialize, Clone)]
struct SpawnRuns {
    workflow: String,
    inputs: Vec<serde_json::Value>,
}

#[derive(Serialize, Deserialize, Clone)]
struct SpawnPlan {
    task: String,
    count: usize,
    batch: usize,
    #[serde(default)]
    pause_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct Output {
    worker_pid: u32,
    attempt: i32,
    /// For a workflow step: the parents whose outputs it was given, and those skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    parents: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<Vec<String>>,
    /// For a spawning task: how many children succeeded, and how many there were.
    #[serde(skip_serializing_if = "Option::is_none")]
    children_succeeded: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    children: Option<usize>,
    /// For a durable_memo task: the memoised values, in step order.
    #[serde(skip_serializing_if = "Option::is_none")]
    memos: Option<Vec<serde_json::Value>>,
}

impl TaskDefinition for TestTask {
    const NAME: &'static str = "test_task";
    type Input = Input;
    type Output = Output;
    fn name() -> &'static str {
        TASK_NAME.get().map(String::as_str).unwrap_or(Self::NAME)
    }
}

/// The execution log's own autocommit connection, reopened after Postgres restarts.
struct Log {
    dsn: String,
    client: Mutex<Option<Client>>,
}

impl Log {
    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, TaskError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, connection) = tokio_postgres::connect(&self.dsn, NoTls).await?;
            tokio::spawn(connection);
            *guard = Some(client);
        }
        let client = guard
            .as_ref()
            .ok_or_else(|| TaskError::retryable("no log connection"))?;
        match client.execute(sql, params).await {
            Ok(n) => Ok(n),
            Err(e) => {
                *guard = None;
                Err(e.into())
            }
        }
    }
}

async fn handle(log: Arc<Log>, ctx: TaskContext, input: Input) -> Result<Output, TaskError> {
    let step_parents = input
        .parents
        .as_ref()
        .map(|p| p.keys().cloned().collect::<Vec<_>>());
    let step_skipped = input.skipped.clone();
    let input = match input
        .input
        .as_ref()
        .and_then(|run_input| run_input.get(TestTask::name()))
    {
        Some(behaviour) => serde_json::from_value(behaviour.clone())
            .map_err(|e| TaskError::fatal(format!("bad step behaviour: {e}")))?,
        None => input,
    };
    let pid = std::process::id() as i32;
    log.execute(
        "INSERT INTO sluice_test.execution (task_id, attempt, worker_pid, started_at)
         VALUES ($1, $2, $3, clock_timestamp())",
        &[&ctx.task_id(), &ctx.attempt(), &pid],
    )
    .await?;
    let sleep_now = input.sleep_on_attempt == 0 || input.sleep_on_attempt == ctx.attempt();
    if input.sleep_ms > 0 && sleep_now {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(input.sleep_ms)) => {}
            _ = ctx.cancelled() => {
                tokio::time::sleep(Duration::from_millis(input.linger_after_cancel_ms)).await;
                log.execute(
                    "UPDATE sluice_test.execution SET finished_at = clock_timestamp(), outcome = 'cancelled'
                      WHERE task_id = $1 AND attempt = $2 AND worker_pid = $3",
                    &[&ctx.task_id(), &ctx.attempt(), &pid],
                )
                .await?;
                return Err(TaskError::retryable("cancelled"));
            }
        }
    }
    let mut children = None;
    if let Some(plan) = &input.spawn_runs {
        let ids = ctx
            .spawn_workflow_json(&plan.workflow, &plan.inputs)
            .await
            .map_err(|e| TaskError::retryable(e.to_string()))?;
        let states = ctx
            .wait_runs(&ids)
            .await
            .map_err(|e| TaskError::retryable(e.to_string()))?;
        children = Some((
            states.iter().filter(|s| s.status == "succeeded").count(),
            states.len(),
        ));
    }
    if let Some(plan) = &input.spawn {
        let mut ids = Vec::new();
        for start in (0..plan.count).step_by(plan.batch.max(1)) {
            let end = (start + plan.batch.max(1)).min(plan.count);
            let inputs: Vec<serde_json::Value> = (start..end)
                .map(|n| serde_json::json!({ "n": n }))
                .collect();
            ids.extend(
                ctx.spawn_json(&plan.task, &inputs)
                    .await
                    .map_err(|e| TaskError::retryable(e.to_string()))?,
            );
            tokio::time::sleep(Duration::from_millis(plan.pause_ms)).await;
        }
        let outcomes = ctx
            .wait_children::<serde_json::Value>(&ids)
            .await
            .map_err(|e| TaskError::retryable(e.to_string()))?;
        children = Some((
            outcomes.iter().filter(|o| o.result.is_ok()).count(),
            outcomes.len(),
        ));
    }
    let mut memos = None;
    if let Some(plan) = &input.durable_memo {
        let mut values = Vec::new();
        for step in 1..=plan.steps {
            let name = format!("step{step}");
            let ran = std::sync::atomic::AtomicBool::new(false);
            let value: serde_json::Value = ctx
                .memo(&name, || async {
                    ran.store(true, std::sync::atomic::Ordering::SeqCst);
                    log.execute(
                        "INSERT INTO sluice_test.memo_run (task_id, attempt, step, worker_pid, ran_at)
                         VALUES ($1, $2, $3, $4, clock_timestamp())",
                        &[&ctx.task_id(), &ctx.attempt(), &name, &pid],
                    )
                    .await?;
                    Ok(serde_json::json!({
                        "step": step, "attempt": ctx.attempt(), "worker_pid": pid
                    }))
                })
                .await?;
            values.push(value);
            if step == plan.pause_after
                && plan.pause_ms > 0
                && ran.load(std::sync::atomic::Ordering::SeqCst)
            {
                log.execute(
                    "UPDATE sluice_test.execution SET outcome = 'paused_after_memo'
                      WHERE task_id = $1 AND attempt = $2 AND worker_pid = $3",
                    &[&ctx.task_id(), &ctx.attempt(), &pid],
                )
                .await?;
                tokio::time::sleep(Duration::from_millis(plan.pause_ms)).await;
            }
        }
        memos = Some(values);
    }
    let output = Output {
        worker_pid: pid as u32,
        attempt: ctx.attempt(),
        parents: step_parents,
        skipped: step_skipped,
        children_succeeded: children.map(|c| c.0),
        children: children.map(|c| c.1),
        memos,
    };
    let (task_id, attempt) = (ctx.task_id(), ctx.attempt());
    let finish_params: [&(dyn ToSql + Sync); 3] = [&task_id, &attempt, &pid];
    let mark_finished = log.execute(
        "UPDATE sluice_test.execution SET finished_at = clock_timestamp(), outcome = 'finished'
          WHERE task_id = $1 AND attempt = $2 AND worker_pid = $3",
        &finish_params,
    );
    if let Some(flag) = &input.fail_unless_flag {
        let found = log
            .execute("SELECT 1 FROM sluice_test.flag WHERE name = $1", &[flag])
            .await?;
        if found == 0 {
            mark_finished.await?;
            return Err(TaskError::fatal(format!("flag {flag} is not set")));
        }
    }
    if ctx.attempt() <= input.fail_attempts {
        mark_finished.await?;
        let message = format!("planned failure of attempt {}", ctx.attempt());
        return Err(if input.fatal {
            TaskError::fatal(message)
        } else {
            TaskError::retryable(message)
        });
    }
    if input.effect {
        let tx = ctx
            .transaction()
            .await
            .map_err(|e| TaskError::retryable(e.to_string()))?;
        tx.client()
            .execute(
                "INSERT INTO sluice_test.effect (task_id, attempt, note) VALUES ($1, $2, 'written')",
                &[&ctx.task_id(), &ctx.attempt()],
            )
            .await?;
        if input.pause_before_commit_ms > 0 && ctx.attempt() == 1 {
            // Tell the test (through the autocommit log) that the write is done but not yet
            // committed: the moment to kill this process.
            log.execute(
                "UPDATE sluice_test.execution SET outcome = 'paused_before_commit'
                  WHERE task_id = $1 AND attempt = $2 AND worker_pid = $3",
                &finish_params,
            )
            .await?;
            tokio::time::sleep(Duration::from_millis(input.pause_before_commit_ms)).await;
        }
        mark_finished.await?;
        tx.commit_with(&output)
            .await
            .map_err(|e| TaskError::retryable(e.to_string()))?;
        return Ok(output);
    }
    mark_finished.await?;
    Ok(output)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dsn, task, slots] = args.as_slice() else {
        eprintln!("usage: test_worker <dsn> <task name> <slots>");
        std::process::exit(2);
    };
    TASK_NAME.set(task.clone()).expect("task name set once");
    let slots: i32 = slots.parse().expect("slots must be a number");

    let log = Arc::new(Log {
        dsn: dsn.clone(),
        client: Mutex::new(None),
    });

    // How often the worker fetches without a notification (WorkerProcess::spawn_polling).
    let poll_ms: u64 = std::env::var("SLUICE_TEST_WORKER_POLL_MS")
        .map(|ms| ms.parse().expect("SLUICE_TEST_WORKER_POLL_MS is a number"))
        .unwrap_or(500);
    let mut builder = Worker::builder(dsn.clone());
    // Labels for placement tests, a JSON object (set by WorkerProcess::spawn_labelled).
    if let Ok(labels) = std::env::var("SLUICE_TEST_WORKER_LABELS") {
        let labels: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&labels).expect("SLUICE_TEST_WORKER_LABELS is a JSON object");
        for (name, value) in labels {
            builder = builder.label(name, value);
        }
    }
    let worker = builder
        .name(format!("test_worker-{}", std::process::id()))
        .slots(slots)
        .heartbeat_interval(Duration::from_millis(500))
        .poll_interval(Duration::from_millis(poll_ms))
        .shutdown_timeout(Duration::from_secs(10))
        .task::<TestTask, _, _>(move |ctx, input| handle(log.clone(), ctx, input))
        .build()
        .expect("worker config");
    if let Err(e) = worker.run().await {
        eprintln!("test_worker: {e}");
        std::process::exit(1);
    }
}
