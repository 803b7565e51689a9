//! Durable tasks end to end: memoised steps, durable sleeps and event waits through the real
//! scheduler and real workers. A suspended task (sleeping, waiting for an event) holds no worker
//! slot and consumes no retry; a later attempt replays the task's record instead of running
//! its steps again; a replay that takes another step than the record has fails the task.
//!
//! Most tests run their handlers in an in-process `sluice_client::Worker` (a tokio task); the
//! one that kills a worker mid-task uses a `test_worker` process.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sluice_client::{
    define_task, enqueue, enqueue_many, push_event, EnqueueOptions, TaskContext, TaskDefinition,
    TaskError, TaskOptions, Worker, WorkerBuilder,
};
use sluice_tests::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

const WORKER: &str = env!("CARGO_BIN_EXE_test_worker");

// Worker helpers ---------------------------------------------------------------------------------

/// An in-process worker running on its own tokio task until [`InProcessWorker::stop`].
struct InProcessWorker {
    name: String,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), sluice_client::Error>>>,
}

/// A builder for a worker named `<prefix>_<unique suffix>` with `slots` slots, heartbeating and
/// polling often (the defaults are 5 s and 1 s).
fn worker_builder(prefix: &str, slots: i32) -> (WorkerBuilder, String) {
    let name = unique(prefix);
    let builder = Worker::builder(shared_dsn())
        .name(name.clone())
        .slots(slots)
        .heartbeat_interval(Duration::from_millis(500))
        .poll_interval(Duration::from_millis(200))
        .shutdown_timeout(Duration::from_secs(5));
    (builder, name)
}

async fn start_worker(client: &Client, builder: WorkerBuilder, name: String) -> InProcessWorker {
    let worker = builder.build().expect("worker configuration");
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run_until(async move {
        let _ = stop_rx.await;
    }));
    let mut worker = InProcessWorker {
        name,
        stop: Some(stop_tx),
        handle: Some(handle),
    };
    worker.wait_registered(client).await;
    worker
}

impl InProcessWorker {
    /// Waits until the worker is registered (live in sluice.workers); panics with its error if
    /// it stopped instead.
    async fn wait_registered(&mut self, client: &Client) {
        let name = self.name.clone();
        let handle = self.handle.as_ref().expect("a running worker");
        wait_until(
            Duration::from_secs(20),
            &format!("worker {name} to register"),
            || async {
                if handle.is_finished() {
                    return Ok(false);
                }
                let live: i64 = client
                    .query_one(
                        "SELECT count(*) FROM sluice.workers WHERE name = $1 AND stopped_at IS NULL",
                        &[&name],
                    )
                    .await
                    .map_err(|e| e.to_string())?
                    .get(0);
                if live == 1 {
                    Ok(true)
                } else {
                    Err(format!("{live} live registrations"))
                }
            },
        )
        .await;
        if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
            let result = self.handle.take().expect("a handle").await;
            panic!(
                "worker {} stopped before registering: {result:?}",
                self.name
            );
        }
    }

    /// Running attempts of this worker, per sluice.workers.
    async fn running(&self, client: &Client) -> i64 {
        client
            .query_one(
                "SELECT running FROM sluice.workers WHERE name = $1 AND stopped_at IS NULL",
                &[&self.name],
            )
            .await
            .expect("reading sluice.workers")
            .get(0)
    }

    /// Graceful shutdown; panics if the worker ended with an error.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let handle = self.handle.take().expect("a running worker");
        let result = tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .unwrap_or_else(|_| panic!("worker {} did not shut down in 30 s", self.name))
            .expect("the worker task panicked");
        if let Err(e) = result {
            panic!("worker {} ended with an error: {e}", self.name);
        }
    }
}

// Reading tasks and steps ------------------------------------------------------------------------

/// One task as the tests look at it (times as epoch seconds).
#[derive(Debug, Clone)]
struct TaskRow {
    status: String,
    attempt: i32,
    failures: i32,
    lost_attempts: i32,
    worker_id: Option<i64>,
    output: Option<Value>,
    last_error: Option<String>,
    enqueued_at: f64,
    run_at: f64,
    finished_at: Option<f64>,
}

async fn task_row(client: &Client, id: i64) -> TaskRow {
    let r = client
        .query_one(
            "SELECT status::text, attempt, failures, lost_attempts, worker_id, output, last_error,
                    extract(epoch FROM enqueued_at)::float8,
                    extract(epoch FROM run_at)::float8,
                    extract(epoch FROM finished_at)::float8
               FROM sluice.tasks WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap_or_else(|e| panic!("reading task {id}: {e}"));
    TaskRow {
        status: r.get(0),
        attempt: r.get(1),
        failures: r.get(2),
        lost_attempts: r.get(3),
        worker_id: r.get(4),
        output: r.get(5),
        last_error: r.get(6),
        enqueued_at: r.get(7),
        run_at: r.get(8),
        finished_at: r.get(9),
    }
}

/// One durable step, with its times as epoch seconds.
#[derive(Debug, Clone)]
struct StepRow {
    seq: i32,
    kind: String,
    name: String,
    state: String,
    value: Option<Value>,
    filter: Option<String>,
    event_id: Option<i64>,
    wake_at: Option<f64>,
    recorded_at: f64,
    resolved_at: Option<f64>,
}

async fn step_rows(client: &Client, task_id: i64) -> Vec<StepRow> {
    client
        .query(
            "SELECT seq, kind, name, state, value, filter, event_id,
                    extract(epoch FROM wake_at)::float8,
                    extract(epoch FROM recorded_at)::float8,
                    extract(epoch FROM resolved_at)::float8
               FROM sluice.durable_steps WHERE task_id = $1 ORDER BY seq",
            &[&task_id],
        )
        .await
        .expect("reading sluice.durable_steps")
        .iter()
        .map(|r| StepRow {
            seq: r.get(0),
            kind: r.get(1),
            name: r.get(2),
            state: r.get(3),
            value: r.get(4),
            filter: r.get(5),
            event_id: r.get(6),
            wake_at: r.get(7),
            recorded_at: r.get(8),
            resolved_at: r.get(9),
        })
        .collect()
}

/// Waits until the task is suspended at its step `seq` of kind `kind`: the step is recorded and
/// still waiting, and the task is back in the queue without a worker.
async fn wait_suspended(client: &Client, id: i64, seq: i32, kind: &str) -> (TaskRow, StepRow) {
    wait_until(
        Duration::from_secs(20),
        &format!("task {id} to suspend at its {kind} step {seq}"),
        || async {
            let steps = step_rows(client, id).await;
            let task = task_row(client, id).await;
            let step = steps.iter().find(|s| s.seq == seq);
            match step {
                Some(s)
                    if s.kind == kind
                        && s.state == "waiting"
                        && task.status == "queued"
                        && task.worker_id.is_none() =>
                {
                    Ok((task, s.clone()))
                }
                _ => Err(format!("task {task:?}, steps {steps:?}")),
            }
        },
    )
    .await
}

/// Waits until the task is finished (succeeded, failed or cancelled); returns its row.
async fn wait_done(client: &Client, id: i64, timeout: Duration) -> TaskRow {
    wait_finished(client, &[id], timeout).await;
    task_row(client, id).await
}

/// The attempts of a task that ended as failures (they consume retries).
async fn failed_attempts(client: &Client, id: i64) -> Vec<(i32, String, Option<String>)> {
    attempts(client, id)
        .await
        .into_iter()
        .filter(|(_, outcome, _)| outcome == "failed" || outcome == "timed_out")
        .collect()
}

fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

// 1. A durable sleep holds no slot ---------------------------------------------------------------

#[derive(Serialize, Deserialize, Clone)]
struct SleepInput {
    sleep_ms: u64,
}

task_type!(SleepyTask, "durable_sleepy", SleepInput, Value);
task_type!(PlainTask, "durable_plain", Value, Value);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_durable_task_frees_its_only_slot_for_a_plain_task_and_then_resumes() {
    let client = connect(&shared_dsn()).await;
    // No retries: were a suspension counted as a failure, the task would fail.
    define_task(&client, SleepyTask::name(), &TaskOptions::default())
        .await
        .expect("defining the sleepy task");
    define_task(&client, PlainTask::name(), &TaskOptions::default())
        .await
        .expect("defining the plain task");
    let sleepy_calls = counter();
    let calls = Arc::clone(&sleepy_calls);
    let (builder, name) = worker_builder("durable_one_slot", 1);
    let builder = builder
        .task::<SleepyTask, _, _>(move |ctx: TaskContext, input: SleepInput| {
            let calls = Arc::clone(&calls);
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                ctx.sleep_for(Duration::from_millis(input.sleep_ms)).await?;
                Ok(json!({"slept_ms": input.sleep_ms, "attempt": ctx.attempt()}))
            }
        })
        .task::<PlainTask, _, _>(|ctx: TaskContext, _input: Value| async move {
            Ok(json!({"plain": true, "attempt": ctx.attempt()}))
        });
    let worker = start_worker(&client, builder, name).await;

    let a = enqueue::<SleepyTask>(
        &client,
        &SleepInput { sleep_ms: 2000 },
        &EnqueueOptions::default(),
    )
    .await
    .expect("enqueuing A");
    let (suspended, sleep_step) = wait_suspended(&client, a, 0, "sleep").await;
    assert!(
        suspended.run_at >= sleep_step.wake_at.expect("a sleep has its end") - 0.001,
        "A waits in the queue until its sleep is over: {suspended:?} {sleep_step:?}"
    );
    assert_eq!(
        worker.running(&client).await,
        0,
        "the only slot is free while A sleeps"
    );

    // B on the same one-slot worker, while A sleeps.
    let b = enqueue::<PlainTask>(&client, &json!({}), &EnqueueOptions::default())
        .await
        .expect("enqueuing B");
    let b_row = wait_done(&client, b, Duration::from_secs(20)).await;
    assert_eq!(b_row.status, "succeeded", "{b_row:?}");
    assert_eq!(b_row.output, Some(json!({"plain": true, "attempt": 1})));

    let a_row = wait_done(&client, a, Duration::from_secs(30)).await;
    assert_eq!(
        a_row.status,
        "succeeded",
        "{}",
        describe_tasks(&client, &[a]).await
    );
    assert_eq!(
        a_row.output,
        Some(json!({"slept_ms": 2000, "attempt": 2})),
        "attempt 1 suspended, attempt 2 resumed after the sleep and finished"
    );
    assert_eq!(
        (a_row.failures, a_row.lost_attempts),
        (0, 0),
        "a suspension consumes no retry and is no lost attempt: {a_row:?}"
    );
    assert_eq!(failed_attempts(&client, a).await, vec![]);
    assert_eq!(
        sleepy_calls.load(Ordering::SeqCst),
        2,
        "the handler ran twice"
    );

    let b_finished = b_row.finished_at.expect("B finished");
    let a_finished = a_row.finished_at.expect("A finished");
    let wake_at = sleep_step.wake_at.expect("a sleep has its end");
    assert!(
        b_finished < a_finished,
        "B finished before A: B at {b_finished}, A at {a_finished}"
    );
    assert!(
        b_finished < wake_at,
        "B ran while A slept: B finished at {b_finished}, A's sleep ended at {wake_at}"
    );
    assert!(
        a_finished - a_row.enqueued_at >= 2.0,
        "A took at least its 2 s sleep: {a_row:?}"
    );
    assert!(a_finished >= wake_at, "A finished after its sleep ended");

    // A's record: one sleep of 2 s, done.
    let steps = step_rows(&client, a).await;
    assert_eq!(steps.len(), 1, "{steps:?}");
    let s = &steps[0];
    assert_eq!(
        (s.seq, s.kind.as_str(), s.name.as_str(), s.state.as_str()),
        (0, "sleep", "sleep", "done"),
        "{s:?}"
    );
    assert!(
        s.wake_at.expect("wake_at") - s.recorded_at >= 2.0,
        "the sleep lasts 2 s from when it was recorded: {s:?}"
    );
    assert!(
        s.resolved_at.is_some_and(|r| r >= wake_at),
        "the sleep was over when it resolved: {s:?}"
    );
    worker.stop().await;
}

// 2. A killed worker's durable task resumes without re-running its memoised steps ---------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_task_on_a_killed_worker_resumes_without_rerunning_its_memoised_steps() {
    let client = connect(&shared_dsn()).await;
    create_durable_test_tables(&client).await;
    let task = define_unique_task(&client, "durable_memo_kill", "").await;
    let mut doomed = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 1);
    let doomed_pid = doomed.pid() as i32;
    // Three memo steps; after step 2 (when it ran, not replayed) the handler pauses 30 s.
    let id = enqueue_sql(
        &client,
        &task,
        json!({"durable_memo": {"steps": 3, "pause_after": 2, "pause_ms": 30000}}),
    )
    .await;
    wait_execution(&client, id, Some("paused_after_memo")).await;
    assert_eq!(
        memo_runs(&client, id).await,
        vec![
            ("step1".to_string(), 1, doomed_pid),
            ("step2".to_string(), 1, doomed_pid)
        ],
        "steps 1 and 2 ran once each before the pause"
    );
    assert_eq!(
        durable_steps(&client, id).await,
        vec![
            (0, "memo".into(), "step1".into(), "done".into()),
            (1, "memo".into(), "step2".into(), "done".into())
        ],
        "both values are recorded before the pause"
    );
    doomed.kill();

    let survivor = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 1);
    let survivor_pid = survivor.pid() as i32;
    let row = wait_done(&client, id, Duration::from_secs(40)).await;
    assert_eq!(
        row.status,
        "succeeded",
        "{}\nsurvivor stderr: {}",
        describe_tasks(&client, &[id]).await,
        survivor.stderr()
    );
    assert_eq!(
        (row.attempt, row.lost_attempts, row.failures),
        (2, 1, 0),
        "attempt 1 lost with the killed worker, attempt 2 on the survivor: {row:?}"
    );
    // Side effects: steps 1 and 2 exactly once (on the killed worker), step 3 once (survivor).
    assert_eq!(
        memo_runs(&client, id).await,
        vec![
            ("step1".to_string(), 1, doomed_pid),
            ("step2".to_string(), 1, doomed_pid),
            ("step3".to_string(), 2, survivor_pid)
        ],
        "the survivor replayed steps 1 and 2 and ran only step 3"
    );
    assert_eq!(
        row.output,
        Some(json!({
            "worker_pid": survivor_pid,
            "attempt": 2,
            "memos": [
                {"step": 1, "attempt": 1, "worker_pid": doomed_pid},
                {"step": 2, "attempt": 1, "worker_pid": doomed_pid},
                {"step": 3, "attempt": 2, "worker_pid": survivor_pid}
            ]
        })),
        "the output carries the memoised values of the killed attempt"
    );
    let steps = step_rows(&client, id).await;
    let record: Vec<(i32, &str, &str, &str, i32)> = steps
        .iter()
        .map(|s| {
            (
                s.seq,
                s.kind.as_str(),
                s.name.as_str(),
                s.state.as_str(),
                s.value
                    .as_ref()
                    .and_then(|v| v["attempt"].as_i64())
                    .unwrap_or(-1) as i32,
            )
        })
        .collect();
    assert_eq!(
        record,
        vec![
            (0, "memo", "step1", "done", 1),
            (1, "memo", "step2", "done", 1),
            (2, "memo", "step3", "done", 2)
        ],
        "{steps:?}"
    );
    let seen = attempts(&client, id).await;
    let outcomes: Vec<(i32, &str)> = seen.iter().map(|(a, o, _)| (*a, o.as_str())).collect();
    assert_eq!(outcomes, vec![(1, "lost"), (2, "succeeded")], "{seen:?}");
    assert_eq!(
        executions(&client, id).await,
        vec![
            (1, doomed_pid, Some("paused_after_memo".into())),
            (2, survivor_pid, Some("finished".into()))
        ],
        "one execution paused on the killed worker, one finished on the survivor"
    );
}

// 3. Event waits ---------------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Clone)]
struct WaitInput {
    key: String,
    #[serde(default)]
    filter: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct WaitOutput {
    /// The event's payload, or None when the wait timed out.
    payload: Option<Value>,
    attempt: i32,
}

/// The handler of the waiting tasks: one wait_for_event, its result as the output.
async fn wait_for_it(
    calls: Arc<AtomicUsize>,
    ctx: TaskContext,
    input: WaitInput,
) -> Result<WaitOutput, TaskError> {
    calls.fetch_add(1, Ordering::SeqCst);
    let payload = ctx
        .wait_for_event(
            &input.key,
            input.filter.as_deref(),
            input.timeout_ms.map(Duration::from_millis),
        )
        .await?;
    Ok(WaitOutput {
        payload,
        attempt: ctx.attempt(),
    })
}

/// The tasks an event woke (sluice.events.woke_task_ids), or None if there is no such event.
async fn woke_task_ids(client: &Client, event_id: i64) -> Option<Vec<i64>> {
    client
        .query_opt(
            "SELECT woke_task_ids FROM sluice.events WHERE id = $1",
            &[&event_id],
        )
        .await
        .expect("reading sluice.events")
        .map(|r| r.get(0))
}

/// Defines `T` and starts a one-slot worker named `<prefix>_...` serving it with `wait_for_it`,
/// counting its handler calls in `calls`.
async fn start_waiter<T>(client: &Client, prefix: &str, calls: &Arc<AtomicUsize>) -> InProcessWorker
where
    T: TaskDefinition<Input = WaitInput, Output = WaitOutput>,
{
    define_task(client, T::name(), &TaskOptions::default())
        .await
        .expect("defining the task");
    let handler_calls = Arc::clone(calls);
    let (builder, name) = worker_builder(prefix, 1);
    let builder = builder
        .task::<T, _, _>(move |ctx, input| wait_for_it(Arc::clone(&handler_calls), ctx, input));
    start_worker(client, builder, name).await
}

/// Enqueues one task of `T` waiting for `key` (and `filter`) for at most `timeout_ms`.
async fn enqueue_wait<T>(client: &Client, key: &str, filter: Option<&str>, timeout_ms: u64) -> i64
where
    T: TaskDefinition<Input = WaitInput>,
{
    enqueue::<T>(
        client,
        &WaitInput {
            key: key.to_string(),
            filter: filter.map(str::to_string),
            timeout_ms: Some(timeout_ms),
        },
        &EnqueueOptions::default(),
    )
    .await
    .expect("enqueuing the waiting task")
}

task_type!(WaitFiltered, "durable_wait_filtered", WaitInput, WaitOutput);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_task_ignores_a_non_matching_event_and_resumes_with_the_matching_ones_payload() {
    let client = connect(&shared_dsn()).await;
    let calls = counter();
    let worker = start_waiter::<WaitFiltered>(&client, "durable_waiter", &calls).await;

    let key = unique("durable_evt");
    let filter = r#"$.kind == "go""#;
    let c = enqueue_wait::<WaitFiltered>(&client, &key, Some(filter), 30_000).await;
    let (suspended, step) = wait_suspended(&client, c, 0, "wait_event").await;
    assert_eq!(step.name, key, "the step is named by its event key");
    assert_eq!(step.filter.as_deref(), Some(filter));
    assert!(
        step.wake_at.expect("a wait with a timeout") - step.recorded_at >= 29.0,
        "the wait times out 30 s after it began: {step:?}"
    );
    assert!(
        suspended.run_at >= step.wake_at.unwrap() - 0.001,
        "C waits in the queue until its timeout (or the event): {suspended:?}"
    );
    assert_eq!(
        worker.running(&client).await,
        0,
        "no slot held while waiting"
    );

    // A non-matching event: C stays waiting, in the queue, with no slot.
    let other = push_event(&client, &key, &json!({"kind": "stop", "n": 1}))
        .await
        .expect("pushing the non-matching event");
    assert_eq!(
        woke_task_ids(&client, other).await,
        Some(vec![]),
        "a payload the filter rejects wakes nothing"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let still = task_row(&client, c).await;
    assert_eq!(
        (still.status.as_str(), still.worker_id),
        ("queued", None),
        "C is still queued without a worker: {still:?}"
    );
    let steps = step_rows(&client, c).await;
    assert_eq!(
        (steps.len(), steps[0].state.as_str(), steps[0].event_id),
        (1, "waiting", None),
        "{steps:?}"
    );
    assert_eq!(worker.running(&client).await, 0);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "C did not run again");

    // The matching event wakes C, which resumes with its payload.
    let payload = json!({"kind": "go", "n": 42, "note": "matching"});
    let matching = push_event(&client, &key, &payload)
        .await
        .expect("pushing the matching event");
    assert_eq!(
        woke_task_ids(&client, matching).await,
        Some(vec![c]),
        "the matching event woke C"
    );
    let row = wait_done(&client, c, Duration::from_secs(20)).await;
    assert_eq!(
        row.status,
        "succeeded",
        "{}",
        describe_tasks(&client, &[c]).await
    );
    let output: WaitOutput =
        serde_json::from_value(row.output.clone().expect("an output")).expect("C's output decodes");
    assert_eq!(
        output,
        WaitOutput {
            payload: Some(payload.clone()),
            attempt: 2
        }
    );
    assert_eq!((row.failures, row.lost_attempts), (0, 0), "{row:?}");
    assert!(
        row.finished_at.unwrap() - row.enqueued_at < 25.0,
        "C resumed on the event, not at its 30 s timeout: {row:?}"
    );
    let steps = step_rows(&client, c).await;
    assert_eq!(steps.len(), 1, "{steps:?}");
    assert_eq!(
        (
            steps[0].state.as_str(),
            steps[0].value.as_ref(),
            steps[0].event_id
        ),
        ("done", Some(&payload), Some(matching)),
        "the step records the matching event and its payload: {steps:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2, "the handler ran twice");
    worker.stop().await;
}

task_type!(WaitTimeout, "durable_wait_timeout", WaitInput, WaitOutput);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_without_its_event_times_out_with_none() {
    let client = connect(&shared_dsn()).await;
    let calls = counter();
    let worker = start_waiter::<WaitTimeout>(&client, "durable_timeout", &calls).await;

    let d = enqueue_wait::<WaitTimeout>(&client, &unique("durable_never"), None, 2000).await;
    let (_, step) = wait_suspended(&client, d, 0, "wait_event").await;
    let row = wait_done(&client, d, Duration::from_secs(30)).await;
    assert_eq!(
        row.status,
        "succeeded",
        "{}",
        describe_tasks(&client, &[d]).await
    );
    let output: WaitOutput =
        serde_json::from_value(row.output.clone().expect("an output")).expect("D's output");
    assert_eq!(
        output,
        WaitOutput {
            payload: None,
            attempt: 2
        },
        "the wait timed out: no payload"
    );
    assert_eq!((row.failures, row.lost_attempts), (0, 0), "{row:?}");
    let finished = row.finished_at.expect("finished");
    assert!(
        finished - row.enqueued_at >= 2.0,
        "D waited its 2 s timeout: {row:?}"
    );
    assert!(
        finished >= step.wake_at.expect("a timeout"),
        "{row:?} {step:?}"
    );
    let steps = step_rows(&client, d).await;
    assert_eq!(steps.len(), 1, "{steps:?}");
    assert_eq!(
        (
            steps[0].kind.as_str(),
            steps[0].state.as_str(),
            steps[0].value.as_ref(),
            steps[0].event_id
        ),
        ("wait_event", "timed_out", None, None),
        "{steps:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2, "the handler ran twice");
    worker.stop().await;
}

task_type!(WaitRollback, "durable_wait_rollback", WaitInput, WaitOutput);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_pushed_in_a_rolled_back_transaction_wakes_nothing() {
    let mut client = connect(&shared_dsn()).await;
    let calls = counter();
    let worker = start_waiter::<WaitRollback>(&client, "durable_rollback", &calls).await;

    let key = unique("durable_rb");
    let e = enqueue_wait::<WaitRollback>(&client, &key, None, 30_000).await;
    let (before, _) = wait_suspended(&client, e, 0, "wait_event").await;

    let rolled_back = {
        let tx = client.transaction().await.expect("BEGIN");
        let event = push_event(&tx, &key, &json!({"n": 1}))
            .await
            .expect("pushing in the transaction");
        // Inside the transaction the push did wake the task ...
        let woke: Vec<i64> = tx
            .query_one(
                "SELECT woke_task_ids FROM sluice.events WHERE id = $1",
                &[&event],
            )
            .await
            .expect("reading the event in its transaction")
            .get(0);
        assert_eq!(
            woke,
            vec![e],
            "inside its transaction the push wakes the task"
        );
        tx.rollback().await.expect("ROLLBACK");
        event
    };
    // ... and the rollback undid all of it.
    assert_eq!(
        woke_task_ids(&client, rolled_back).await,
        None,
        "the rolled-back event is gone"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = task_row(&client, e).await;
    assert_eq!(
        (after.status.as_str(), after.worker_id, after.attempt),
        ("queued", None, 1),
        "the task still waits: {after:?}"
    );
    assert!(
        (after.run_at - before.run_at).abs() < 0.001,
        "its wake-up time is unchanged: {before:?} {after:?}"
    );
    let steps = step_rows(&client, e).await;
    assert_eq!(
        (steps.len(), steps[0].state.as_str(), steps[0].event_id),
        (1, "waiting", None),
        "{steps:?}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the task did not run again"
    );

    // The same push, committed, does wake it.
    let committed = push_event(&client, &key, &json!({"n": 2}))
        .await
        .expect("pushing for real");
    assert_eq!(woke_task_ids(&client, committed).await, Some(vec![e]));
    let row = wait_done(&client, e, Duration::from_secs(20)).await;
    let output: WaitOutput =
        serde_json::from_value(row.output.clone().expect("an output")).expect("the output");
    assert_eq!(
        (row.status.as_str(), output),
        (
            "succeeded",
            WaitOutput {
                payload: Some(json!({"n": 2})),
                attempt: 2
            }
        ),
        "resumed with the committed event's payload"
    );
    worker.stop().await;
}

task_type!(WaitLate, "durable_wait_late", WaitInput, WaitOutput);

/// An event pushed after a wait's timeout has passed does not end the wait, even when the task
/// has not run again yet (here: no worker for it at that moment): the wait timed out first.
///
/// FAILS until sluice._wake_waiters (sql/durable.sql) only ends waits whose timeout has not
/// passed (`AND (d.wake_at IS NULL OR d.wake_at > clock_timestamp())`): today the late event
/// marks the step done with its payload and the task resumes with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_pushed_after_the_waits_timeout_does_not_end_the_wait() {
    let client = connect(&shared_dsn()).await;
    let calls = counter();
    let first = start_waiter::<WaitLate>(&client, "durable_late_first", &calls).await;
    let key = unique("durable_late");
    let id = enqueue_wait::<WaitLate>(&client, &key, None, 1000).await;
    let (_, step) = wait_suspended(&client, id, 0, "wait_event").await;
    // No worker for the task while its timeout passes.
    first.stop().await;
    let timeout_at = step.wake_at.expect("a wait with a timeout");
    wait_until(
        Duration::from_secs(20),
        "the wait's timeout to pass",
        || async {
            let now: f64 = client
                .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            if now > timeout_at + 0.5 {
                Ok(())
            } else {
                Err(format!("now {now}, timeout at {timeout_at}"))
            }
        },
    )
    .await;
    assert_eq!(task_row(&client, id).await.status, "queued");

    let late = push_event(&client, &key, &json!({"late": true}))
        .await
        .expect("pushing the late event");
    assert_eq!(
        woke_task_ids(&client, late).await,
        Some(vec![]),
        "an event after the wait's timeout wakes nothing; steps: {:?}",
        step_rows(&client, id).await
    );

    let second = start_waiter::<WaitLate>(&client, "durable_late_second", &calls).await;
    let row = wait_done(&client, id, Duration::from_secs(20)).await;
    let output: WaitOutput =
        serde_json::from_value(row.output.clone().expect("an output")).expect("the output");
    assert_eq!(
        (row.status.as_str(), output.payload),
        ("succeeded", None),
        "the wait timed out before the event: {row:?}"
    );
    let steps = step_rows(&client, id).await;
    assert_eq!(
        (steps[0].state.as_str(), steps[0].event_id),
        ("timed_out", None),
        "{steps:?}"
    );
    second.stop().await;
}

task_type!(
    WaitCancelled,
    "durable_wait_cancelled",
    WaitInput,
    WaitOutput
);

/// A waiting task that was cancelled is not woken by a later event: the event does not list
/// it in woke_task_ids, and the cancelled task's record is left as it was.
///
/// FAILS until sluice._wake_waiters (sql/durable.sql) only ends the waits of unfinished tasks
/// (or cancelling a task resolves its waiting steps): today the event marks the cancelled
/// task's step done with its payload and reports the task as woken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_does_not_wake_a_cancelled_waiting_task() {
    let client = connect(&shared_dsn()).await;
    let calls = counter();
    let worker = start_waiter::<WaitCancelled>(&client, "durable_cancelled", &calls).await;
    let key = unique("durable_cx");
    let id = enqueue_wait::<WaitCancelled>(&client, &key, None, 30_000).await;
    wait_suspended(&client, id, 0, "wait_event").await;
    assert!(
        sluice_client::cancel(&client, id).await.expect("cancel"),
        "the waiting task is cancelled"
    );
    assert_eq!(task_row(&client, id).await.status, "cancelled");

    let event = push_event(&client, &key, &json!({"after": "cancel"}))
        .await
        .expect("pushing");
    let steps = step_rows(&client, id).await;
    assert_eq!(
        woke_task_ids(&client, event).await,
        Some(vec![]),
        "a cancelled task is not woken; steps: {steps:?}"
    );
    assert_eq!(
        (steps[0].event_id, steps[0].value.as_ref()),
        (None, None),
        "the cancelled task's record does not take the event: {steps:?}"
    );
    let row = task_row(&client, id).await;
    assert_eq!((row.status.as_str(), row.output), ("cancelled", None));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "it never ran again");
    worker.stop().await;
}

// 4. Replay divergence ---------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Clone)]
struct DivergeInput {
    /// "memo_name": memo "a" then a sleep, and on replay memo "b" at step 0.
    /// "kind": memo "a" then a sleep, and on replay a sleep at step 0.
    variant: String,
}

task_type!(Diverging, "durable_diverging", DivergeInput, Value);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_takes_another_step_fails_the_task_with_replay_diverged() {
    let client = connect(&shared_dsn()).await;
    // Retries left: the divergence must fail the task anyway (it is not retryable).
    let options = TaskOptions {
        retries: Some(3),
        backoff_factor: Some(1.0),
        ..TaskOptions::default()
    };
    define_task(&client, Diverging::name(), &options)
        .await
        .expect("defining the task");
    let calls = counter();
    let handler_calls = Arc::clone(&calls);
    let (builder, name) = worker_builder("durable_diverge", 2);
    let builder = builder.task::<Diverging, _, _>(move |ctx: TaskContext, input: DivergeInput| {
        let calls = Arc::clone(&handler_calls);
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            if ctx.attempt() == 1 {
                ctx.memo("a", || async { Ok(1) }).await?;
                ctx.sleep_for(Duration::from_millis(300)).await?;
            } else if input.variant == "memo_name" {
                ctx.memo("b", || async { Ok(2) }).await?;
            } else {
                ctx.sleep_for(Duration::from_millis(300)).await?;
            }
            Ok(json!("finished"))
        }
    });
    let worker = start_worker(&client, builder, name).await;

    let ids = enqueue_many::<Diverging>(
        &client,
        &[
            DivergeInput {
                variant: "memo_name".into(),
            },
            DivergeInput {
                variant: "kind".into(),
            },
        ],
    )
    .await
    .expect("enqueuing");
    wait_finished(&client, &ids, Duration::from_secs(30)).await;
    let expected = [
        r#"the record has memo("a") there, the handler asked for memo("b")"#,
        r#"the record has memo("a") there, the handler asked for sleep("sleep")"#,
    ];
    for (id, detail) in ids.iter().zip(expected) {
        let row = task_row(&client, *id).await;
        assert_eq!(
            row.status,
            "failed",
            "a diverged replay fails the task: {}",
            describe_tasks(&client, &[*id]).await
        );
        let error = row.last_error.clone().unwrap_or_default();
        assert!(
            error.contains("replay diverged at step 0"),
            "last_error names the divergence: {error}"
        );
        assert!(
            error.contains(detail),
            "last_error says what was recorded and what was asked: {error}"
        );
        assert_eq!(
            (row.attempt, row.failures),
            (2, 1),
            "one failure, not retried although retries remain: {row:?}"
        );
        assert_eq!(row.output, None);
        // The record is left as the first attempt made it.
        let steps = durable_steps(&client, *id).await;
        assert_eq!(
            steps,
            vec![
                (0, "memo".into(), "a".into(), "done".into()),
                (1, "sleep".into(), "sleep".into(), "waiting".into())
            ],
            "{steps:?}"
        );
    }
    // Failed for good: no third run of either.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 4, "two runs per task");
    for id in &ids {
        assert_eq!(task_row(&client, *id).await.status, "failed");
    }
    worker.stop().await;
}

// 5. Sleeping tasks overlap on a single slot -----------------------------------------------------

task_type!(Napper, "durable_napper", SleepInput, Value);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleeping_durable_tasks_on_a_one_slot_worker_sleep_at_the_same_time() {
    let client = connect(&shared_dsn()).await;
    define_task(&client, Napper::name(), &TaskOptions::default())
        .await
        .expect("defining the task");
    let calls = counter();
    let handler_calls = Arc::clone(&calls);
    let (builder, name) = worker_builder("durable_nappers", 1);
    let builder = builder.task::<Napper, _, _>(move |ctx: TaskContext, input: SleepInput| {
        let calls = Arc::clone(&handler_calls);
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            ctx.sleep_for(Duration::from_millis(input.sleep_ms)).await?;
            Ok(json!({"attempt": ctx.attempt()}))
        }
    });
    let worker = start_worker(&client, builder, name).await;

    let ids = enqueue_many::<Napper>(&client, &vec![SleepInput { sleep_ms: 1000 }; 3])
        .await
        .expect("enqueuing");
    wait_finished(&client, &ids, Duration::from_secs(30)).await;

    let mut recorded = Vec::new();
    let mut finished = Vec::new();
    for id in &ids {
        let row = task_row(&client, *id).await;
        assert_eq!(
            row.status,
            "succeeded",
            "{}",
            describe_tasks(&client, &ids).await
        );
        assert_eq!(row.output, Some(json!({"attempt": 2})), "{row:?}");
        assert_eq!((row.failures, row.lost_attempts), (0, 0), "{row:?}");
        let steps = step_rows(&client, *id).await;
        assert_eq!(steps.len(), 1, "{steps:?}");
        assert_eq!(
            (steps[0].kind.as_str(), steps[0].state.as_str()),
            ("sleep", "done")
        );
        let finished_at = row.finished_at.expect("finished");
        assert!(
            finished_at >= steps[0].wake_at.expect("wake_at"),
            "task {id} finished after its sleep: {row:?} {steps:?}"
        );
        recorded.push(steps[0].recorded_at);
        finished.push(finished_at);
    }
    let last_recorded = recorded.iter().cloned().fold(f64::MIN, f64::max);
    let first_recorded = recorded.iter().cloned().fold(f64::MAX, f64::min);
    let first_finished = finished.iter().cloned().fold(f64::MAX, f64::min);
    let last_finished = finished.iter().cloned().fold(f64::MIN, f64::max);
    assert!(
        last_recorded < first_finished,
        "all three slept at once on the one slot: sleeps began at {recorded:?}, tasks finished \
         at {finished:?}"
    );
    assert!(
        last_finished - first_recorded < 3.0,
        "three 1 s sleeps took {:.2} s in all, as long as three in a row would",
        last_finished - first_recorded
    );
    assert_eq!(calls.load(Ordering::SeqCst), 6, "two runs per task");
    worker.stop().await;
}

// 6. A workflow step that waits for an event -----------------------------------------------------

#[derive(Serialize, Deserialize, Clone)]
struct ApprovalRun {
    key: String,
}

task_type!(
    AwaitApproval,
    "durable_step_await",
    sluice_client::StepInput<ApprovalRun>,
    Value
);

/// A workflow step's task is a task like any other: it can wait for an event, suspended
/// without a slot, and the run goes on with the event's payload as the step's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_step_waits_for_an_event_without_a_slot_and_the_run_goes_on() {
    let client = connect(&shared_dsn()).await;
    define_task(&client, AwaitApproval::name(), &TaskOptions::default())
        .await
        .expect("defining the step task");
    let workflow = unique("durable_approval_wf");
    let mut builder = sluice_client::WorkflowBuilder::<ApprovalRun>::new(workflow.clone());
    builder.step::<AwaitApproval>("await_approval", &[]);
    builder
        .define(&client)
        .await
        .expect("defining the workflow");

    let (worker_builder, name) = worker_builder("durable_step_waiter", 1);
    let worker_builder = worker_builder.task::<AwaitApproval, _, _>(|ctx, input| async move {
        let payload = ctx
            .wait_for_event(&input.input.key, None, Some(Duration::from_secs(60)))
            .await?;
        Ok(json!({ "approved_by": payload.and_then(|p| p.get("by").cloned()) }))
    });
    let worker = start_worker(&client, worker_builder, name).await;

    let key = unique("durable_approval");
    let run_id = sluice_client::run_workflow(&client, &workflow, &ApprovalRun { key: key.clone() })
        .await
        .expect("starting the run");
    let task_id: i64 = wait_until(
        Duration::from_secs(30),
        "the step to suspend on its wait",
        || async {
            let row = client
                .query_opt(
                    "SELECT t.id FROM sluice.tasks t
                   JOIN sluice.durable_steps d ON d.task_id = t.id AND d.kind = 'wait_event'
                  WHERE t.run_id = $1 AND t.status = 'queued' AND d.state = 'waiting'",
                    &[&run_id],
                )
                .await
                .map_err(|e| e.to_string())?;
            row.map(|r| r.get::<_, i64>(0))
                .ok_or_else(|| "not yet".to_string())
        },
    )
    .await;
    assert_eq!(
        worker.running(&client).await,
        0,
        "the waiting step holds no slot"
    );
    let status: String = client
        .query_one(
            "SELECT status::text FROM sluice.runs WHERE id = $1",
            &[&run_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "running", "the run waits with its step");

    let event = push_event(&client, &key, &json!({"by": "ann"}))
        .await
        .expect("pushing");
    assert_eq!(woke_task_ids(&client, event).await, Some(vec![task_id]));
    let output: Value = wait_until(Duration::from_secs(30), "the run to succeed", || async {
        let row = client
            .query_one(
                "SELECT status::text, steps->'await_approval'->'output' FROM sluice.runs WHERE id = $1",
                &[&run_id],
            )
            .await
            .map_err(|e| e.to_string())?;
        let status: String = row.get(0);
        match status.as_str() {
            "succeeded" => Ok(row.get::<_, Value>(1)),
            "failed" | "cancelled" => panic!("run {run_id} ended {status}"),
            other => Err(other.to_string()),
        }
    })
    .await;
    assert_eq!(output, json!({"approved_by": "ann"}));
    worker.stop().await;
}

// 7. Sleeping until a point in time --------------------------------------------------------------

#[derive(Serialize, Deserialize, Clone)]
struct SleepUntilInput {
    /// Epoch seconds.
    until: f64,
}

task_type!(SleepUntil, "durable_sleep_until", SleepUntilInput, Value);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleep_until_suspends_until_that_time_and_then_continues() {
    let client = connect(&shared_dsn()).await;
    define_task(&client, SleepUntil::name(), &TaskOptions::default())
        .await
        .expect("defining the task");
    let (builder, name) = worker_builder("durable_sleep_until", 1);
    let builder = builder.task::<SleepUntil, _, _>(|ctx, input| async move {
        let until = std::time::UNIX_EPOCH + Duration::from_secs_f64(input.until);
        ctx.sleep_until(until).await?;
        Ok(json!({"attempt": ctx.attempt()}))
    });
    let worker = start_worker(&client, builder, name).await;

    let now: f64 = client
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .await
        .unwrap()
        .get(0);
    let until = now + 1.5;
    let id = enqueue::<SleepUntil>(
        &client,
        &SleepUntilInput { until },
        &EnqueueOptions::default(),
    )
    .await
    .expect("enqueuing");
    let (suspended, step) = wait_suspended(&client, id, 0, "sleep").await;
    let wake_at = step.wake_at.expect("a sleep has an end");
    assert!(
        (wake_at - until).abs() < 0.001,
        "the sleep ends at the given time: {step:?}"
    );
    assert!(
        (suspended.run_at - until).abs() < 0.001,
        "the task waits in the queue until then: {suspended:?}"
    );
    let done = wait_done(&client, id, Duration::from_secs(20)).await;
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert!(
        done.finished_at.expect("finished") >= until,
        "it continued no earlier than the time it slept until: {done:?}"
    );
    assert_eq!(
        done.output,
        Some(json!({"attempt": 2})),
        "one suspension, one resumption"
    );
    worker.stop().await;
}
