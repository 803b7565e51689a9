//! Workflow step conditions end to end: `wait_for` and `cancel_if` made of events (with
//! jsonpath filters that may name the run's input) and sleeps, combined as an AND of
//! or-groups, through the real scheduler and real worker processes.
//!
//! What this file proves: a step whose wait_for names an event waits (status 'waiting', no
//! task, no worker slot) until a matching event is pushed in a transaction that commits, and
//! its task then gets the payloads under "events"; an or-group starts the step on whichever of
//! its conditions comes first, an AND only once all are met; cancel_if cancels the step and so
//! the run (on_failure runs) while it waits, and cancels its task while queued or running (the
//! handler is signalled); a replayed run waits again; invalid conditions are rejected with
//! 22023 naming the step and the problem; the typed client's conditions are stored normalized
//! and a handler reads the awaited payload through `StepInput::event`.
//! The last four tests (a step waiting after its parent, cancel_if alone, a cancel_if filter
//! naming the input while the task runs, woke_run_ids once per run) found bugs, since fixed.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sluice_client::{
    define_task, push_event, Condition, Conditions, StepInput, StepOptions, TaskDefinition,
    TaskOptions, Worker, WorkflowBuilder,
};
use sluice_tests::*;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_postgres::Client;

const WORKER: &str = env!("CARGO_BIN_EXE_test_worker");

// Helpers --------------------------------------------------------------------------------------

/// Pushes an event in its own transaction; returns its id.
async fn push(client: &Client, key: &str, payload: Value) -> i64 {
    push_event(client, key, &payload)
        .await
        .unwrap_or_else(|e| panic!("push_event({key}, {payload}): {e}"))
}

/// The run as sluice.runs shows it, as JSON.
async fn run_view(client: &Client, run_id: i64) -> Value {
    client
        .query_one(
            "SELECT to_jsonb(r) FROM sluice.runs r WHERE r.id = $1",
            &[&run_id],
        )
        .await
        .unwrap_or_else(|e| panic!("reading run {run_id}: {e}"))
        .get(0)
}

/// One step as sluice.runs shows it: {"status", "task_id", "output", "error", ...} (nulls
/// left out).
async fn step_view(client: &Client, run_id: i64, step: &str) -> Value {
    run_view(client, run_id).await["steps"][step].clone()
}

/// The step's rows in sluice.step_condition as (kind, event key or "sleep", met), wait_for
/// first, each kind in spec order.
async fn condition_rows(client: &Client, run_id: i64, step: &str) -> Vec<(String, String, bool)> {
    client
        .query(
            "SELECT kind, coalesce(event_key, 'sleep'), met_at IS NOT NULL
               FROM sluice.step_condition WHERE run_id = $1 AND step = $2
              ORDER BY kind DESC, grp, pos",
            &[&run_id, &step],
        )
        .await
        .expect("reading sluice.step_condition")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// `(kind, what, met)` as [`condition_rows`] returns it, for expected values.
fn cond(kind: &str, what: &str, met: bool) -> (String, String, bool) {
    (kind.to_string(), what.to_string(), met)
}

/// The runs whose step conditions an event met (sluice.events.woke_run_ids).
async fn woke_run_ids(client: &Client, event_id: i64) -> Vec<i64> {
    client
        .query_one(
            "SELECT woke_run_ids FROM sluice.events WHERE id = $1",
            &[&event_id],
        )
        .await
        .unwrap_or_else(|e| panic!("reading event {event_id}: {e}"))
        .get(0)
}

/// The step's task, if it has one yet.
async fn step_task(client: &Client, run_id: i64, step: &str) -> Option<i64> {
    client
        .query_one(
            "SELECT task_id FROM sluice.workflow_step WHERE run_id = $1 AND step = $2",
            &[&run_id, &step],
        )
        .await
        .unwrap_or_else(|e| panic!("reading step {step} of run {run_id}: {e}"))
        .get(0)
}

/// Waits until the step's task exists (its wait is over); returns the task id.
async fn wait_step_task(client: &Client, run_id: i64, step: &str, timeout: Duration) -> i64 {
    wait_until(
        timeout,
        &format!("step {step} of run {run_id} to get its task"),
        || async {
            match step_task(client, run_id, step).await {
                Some(id) => Ok(id),
                None => Err(run_view(client, run_id).await.to_string()),
            }
        },
    )
    .await
}

/// How many tasks a run has (its steps', not on_failure's).
async fn run_task_count(client: &Client, run_id: i64) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM sluice.tasks WHERE run_id = $1",
            &[&run_id],
        )
        .await
        .expect("counting the run's tasks")
        .get(0)
}

async fn task_input(client: &Client, task_id: i64) -> Value {
    client
        .query_one("SELECT input FROM sluice.tasks WHERE id = $1", &[&task_id])
        .await
        .unwrap_or_else(|e| panic!("reading task {task_id}: {e}"))
        .get(0)
}

/// When the step became ready (started waiting), as epoch seconds.
async fn waiting_since(client: &Client, run_id: i64, step: &str) -> f64 {
    client
        .query_one(
            "SELECT extract(epoch FROM started_at)::float8 FROM sluice.workflow_step
              WHERE run_id = $1 AND step = $2",
            &[&run_id, &step],
        )
        .await
        .unwrap_or_else(|e| panic!("reading step {step} of run {run_id}: {e}"))
        .get(0)
}

/// When the test worker started executing the task, as epoch seconds.
async fn execution_start(client: &Client, task_id: i64) -> f64 {
    wait_execution(client, task_id, None).await;
    client
        .query_one(
            "SELECT extract(epoch FROM min(started_at))::float8 FROM sluice_test.execution
              WHERE task_id = $1",
            &[&task_id],
        )
        .await
        .expect("reading sluice_test.execution")
        .get(0)
}

/// The input of the succeeded on_failure task of this run (waits for it).
async fn on_failure_input(client: &Client, task: &str, run_id: i64) -> Value {
    wait_until(
        Duration::from_secs(20),
        "on_failure to succeed",
        || async {
            let row = client
                .query_opt(
                    "SELECT input FROM sluice.tasks
                      WHERE task_name = $1 AND status = 'succeeded' AND input->'run_id' = to_jsonb($2::bigint)",
                    &[&task, &run_id],
                )
                .await
                .map_err(|e| e.to_string())?;
            row.map(|r| r.get::<_, Value>(0))
                .ok_or_else(|| "not yet".to_string())
        },
    )
    .await
}

/// The error of a define_workflow call expected to fail: (SQLSTATE, message).
async fn define_error(client: &Client, name: &str, spec: &Value) -> (String, String) {
    let err = client
        .query_one("SELECT sluice.define_workflow($1, $2)", &[&name, spec])
        .await
        .expect_err(&format!("{spec} was accepted"));
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("{spec}: not a database error: {err}"));
    (db.code().code().to_string(), db.message().to_string())
}

// Waiting for events ----------------------------------------------------------------------------

/// Two runs of one workflow wait for the same event key, each for the payload with its own id:
/// the push for id 1 starts run 1's step only, with the payload in its input; a push that rolls
/// back meets nothing; the waiting steps hold no slot of the one-slot worker.
#[tokio::test]
async fn an_event_filtered_on_the_run_input_starts_only_its_own_runs_waiting_step() {
    let mut client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "cond_ship", "").await;
    let _worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 1);
    let paid = unique("cond_paid");
    let wf = unique("cond_filtered");
    define_workflow(
        &client,
        &wf,
        json!({"steps": [{"name": "ship", "task": task,
                          "wait_for": {"event": paid, "filter": "$.id == $input.id"}}]}),
    )
    .await;
    let first = run_workflow(&client, &wf, json!({"id": 1})).await;
    let second = run_workflow(&client, &wf, json!({"id": 2})).await;
    for run_id in [first, second] {
        let run = run_view(&client, run_id).await;
        assert_eq!(run["status"], "running", "{run}");
        assert_eq!(run["steps"]["ship"]["status"], "waiting", "{run}");
        assert_eq!(run_task_count(&client, run_id).await, 0, "{run}");
        assert_eq!(
            condition_rows(&client, run_id, "ship").await,
            vec![cond("wait_for", &paid, false)]
        );
    }

    // Two steps wait on a worker with one slot: a plain task of the same task still runs.
    let plain = enqueue_sql(&client, &task, json!({})).await;
    wait_finished(&client, &[plain], Duration::from_secs(20)).await;
    assert_eq!(status_summary(&client, &[plain]).await, "succeeded=1");

    // Inside the pushing transaction run 1's step starts; the rollback undoes it all.
    let tx = client.transaction().await.expect("BEGIN");
    let rolled_back = push_event(&tx, &paid, &json!({"id": 1}))
        .await
        .expect("pushing in the transaction");
    let inside: String = tx
        .query_one(
            "SELECT status FROM sluice.workflow_step WHERE run_id = $1 AND step = 'ship'",
            &[&first],
        )
        .await
        .expect("reading the step in the transaction")
        .get(0);
    assert_eq!(
        inside, "started",
        "the push meets the condition in its transaction"
    );
    tx.rollback().await.expect("ROLLBACK");
    let seen: i64 = client
        .query_one(
            "SELECT count(*) FROM sluice.events WHERE id = $1",
            &[&rolled_back],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 0, "the rolled-back event is not recorded");
    assert_eq!(step_view(&client, first, "ship").await["status"], "waiting");
    assert_eq!(run_task_count(&client, first).await, 0);
    assert_eq!(
        condition_rows(&client, first, "ship").await,
        vec![cond("wait_for", &paid, false)]
    );

    let payload = json!({"id": 1, "carrier": "ups"});
    let event = push(&client, &paid, payload.clone()).await;
    assert_eq!(woke_run_ids(&client, event).await, vec![first]);
    // The push enqueued the task in its own transaction: it exists once the push returns.
    let first_task = step_task(&client, first, "ship")
        .await
        .expect("run 1's step has its task right after the push");
    assert_eq!(
        task_input(&client, first_task).await,
        json!({"input": {"id": 1}, "parents": {}, "skipped": [], "events": {paid.clone(): payload}})
    );
    assert_eq!(
        step_view(&client, second, "ship").await["status"],
        "waiting"
    );
    assert_eq!(run_task_count(&client, second).await, 0);
    assert_eq!(
        condition_rows(&client, second, "ship").await,
        vec![cond("wait_for", &paid, false)]
    );

    let done = wait_run(&client, first, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        done["steps"]["ship"]["task_id"],
        json!(first_task),
        "{done}"
    );
    assert_eq!(
        step_view(&client, second, "ship").await["status"],
        "waiting"
    );

    // Cancelling the other run ends its wait: its conditions go, a later event meets nothing.
    let cancelled: bool = client
        .query_one("SELECT sluice.cancel_run($1)", &[&second])
        .await
        .unwrap()
        .get(0);
    assert!(cancelled);
    assert_eq!(
        step_view(&client, second, "ship").await["status"],
        "cancelled"
    );
    assert_eq!(condition_rows(&client, second, "ship").await, vec![]);
    let late = push(&client, &paid, json!({"id": 2})).await;
    assert_eq!(woke_run_ids(&client, late).await, Vec::<i64>::new());
    assert_eq!(run_task_count(&client, second).await, 0);
}

/// wait_for {"any": [event, 3 s]}: without the event the step starts after the sleep, not
/// before; with it, at once.
#[tokio::test]
async fn an_or_group_of_an_event_and_a_sleep_starts_the_step_on_whichever_comes_first() {
    const SLEEP_S: f64 = 3.0;
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "cond_remind", "").await;
    let _worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 4);
    let nudge = unique("cond_nudge");
    let wf = unique("cond_or_group");
    define_workflow(
        &client,
        &wf,
        json!({"steps": [{"name": "remind", "task": task,
                          "wait_for": {"any": [{"event": nudge}, "3 seconds"]}}]}),
    )
    .await;

    // The nudged run first, so that its push (no filter) cannot meet the other run.
    let nudged = run_workflow(&client, &wf, json!({"run": "nudged"})).await;
    assert_eq!(
        step_view(&client, nudged, "remind").await["status"],
        "waiting"
    );
    let payload = json!({"by": "ops"});
    let event = push(&client, &nudge, payload.clone()).await;
    assert_eq!(woke_run_ids(&client, event).await, vec![nudged]);
    let slept = run_workflow(&client, &wf, json!({"run": "slept"})).await;
    assert_eq!(
        step_view(&client, slept, "remind").await["status"],
        "waiting"
    );

    let nudged_task = step_task(&client, nudged, "remind")
        .await
        .expect("the event started the step at once");
    assert_eq!(
        task_input(&client, nudged_task).await["events"],
        json!({nudge.clone(): payload})
    );
    // The rest of the wait (the sleep) went with it.
    assert_eq!(
        condition_rows(&client, nudged, "remind").await,
        vec![cond("wait_for", &nudge, true)]
    );
    let nudged_since = waiting_since(&client, nudged, "remind").await;
    let nudged_start = execution_start(&client, nudged_task).await;
    assert!(
        nudged_start - nudged_since < SLEEP_S - 1.0,
        "the nudged step started {:.3} s after it became ready, the sleep is {SLEEP_S} s",
        nudged_start - nudged_since
    );

    let slept_task = wait_step_task(&client, slept, "remind", Duration::from_secs(20)).await;
    let slept_since = waiting_since(&client, slept, "remind").await;
    let slept_start = execution_start(&client, slept_task).await;
    assert!(
        slept_start - slept_since >= SLEEP_S,
        "the step started {:.3} s after it became ready, before its {SLEEP_S} s sleep was over",
        slept_start - slept_since
    );
    assert!(
        slept_start - slept_since < SLEEP_S + 10.0,
        "the step started {:.3} s after it became ready, long after its {SLEEP_S} s sleep",
        slept_start - slept_since
    );
    assert_eq!(task_input(&client, slept_task).await["events"], json!({}));
    assert_eq!(
        condition_rows(&client, slept, "remind").await,
        vec![cond("wait_for", "sleep", true)]
    );

    for run_id in [nudged, slept] {
        let done = wait_run(&client, run_id, Duration::from_secs(30)).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
}

/// wait_for [event A, event B] (an AND): A alone leaves the step waiting; with B it starts,
/// and its input carries both payloads.
#[tokio::test]
async fn an_and_of_two_events_starts_the_step_only_when_both_came() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "cond_pack", "").await;
    let _worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 2);
    let (paid, stocked) = (unique("cond_paid"), unique("cond_stocked"));
    let wf = unique("cond_and");
    define_workflow(
        &client,
        &wf,
        json!({"steps": [{"name": "pack", "task": task,
                          "wait_for": [{"event": paid}, {"event": stocked}]}]}),
    )
    .await;
    let spec: Value = client
        .query_one(
            "SELECT spec FROM sluice.workflow_definition WHERE name = $1",
            &[&wf],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        spec["steps"][0]["wait_for"],
        json!([[{"event": paid}], [{"event": stocked}]]),
        "an array is an AND of one-condition or-groups"
    );
    let run_id = run_workflow(&client, &wf, json!({})).await;

    let paid_event = push(&client, &paid, json!({"amount": 30})).await;
    // Had it started, the push's transaction would have enqueued the task: no need to wait.
    assert_eq!(woke_run_ids(&client, paid_event).await, vec![run_id]);
    assert_eq!(
        step_view(&client, run_id, "pack").await["status"],
        "waiting"
    );
    assert_eq!(run_task_count(&client, run_id).await, 0);
    assert_eq!(
        condition_rows(&client, run_id, "pack").await,
        vec![
            cond("wait_for", &paid, true),
            cond("wait_for", &stocked, false)
        ]
    );

    let stocked_event = push(&client, &stocked, json!({"sku": "A-1"})).await;
    assert_eq!(woke_run_ids(&client, stocked_event).await, vec![run_id]);
    let task_id = step_task(&client, run_id, "pack")
        .await
        .expect("both events came: the step has its task");
    assert_eq!(
        task_input(&client, task_id).await["events"],
        json!({paid.clone(): {"amount": 30}, stocked.clone(): {"sku": "A-1"}})
    );
    let done = wait_run(&client, run_id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
}

// cancel_if ------------------------------------------------------------------------------------

/// cancel_if "1 second" as a deadline for an event that never comes: the waiting step is
/// cancelled (not before the second), the run is cancelled naming it, on_failure runs.
#[tokio::test]
async fn a_cancel_if_deadline_cancels_the_waiting_step_and_the_run_and_runs_on_failure() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "cond_approve", "").await;
    let cleanup = define_unique_task(&client, "cond_cleanup", "").await;
    let _workers = [
        WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 1),
        WorkerProcess::spawn(WORKER, &shared_dsn(), &cleanup, 1),
    ];
    let never = unique("cond_never");
    let wf = unique("cond_deadline");
    define_workflow(
        &client,
        &wf,
        json!({"steps": [{"name": "approve", "task": task,
                          "wait_for": {"event": never}, "cancel_if": "1 second"}],
               "on_failure": cleanup}),
    )
    .await;
    let run_id = run_workflow(&client, &wf, json!({"order": 9})).await;
    assert_eq!(
        step_view(&client, run_id, "approve").await["status"],
        "waiting"
    );
    assert_eq!(
        condition_rows(&client, run_id, "approve").await,
        vec![
            cond("wait_for", &never, false),
            cond("cancel_if", "sleep", false)
        ]
    );

    let done = wait_run(&client, run_id, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    let step = &done["steps"]["approve"];
    assert_eq!(step["status"], "cancelled", "{done}");
    let step_error = step["error"].as_str().unwrap_or_default();
    assert!(
        step_error.starts_with("cancel_if met: sleep until"),
        "{done}"
    );
    assert_eq!(
        done["error"],
        json!(format!("step \"approve\" cancelled: {step_error}")),
        "{done}"
    );
    assert!(
        step.get("task_id").is_none(),
        "the step never had a task: {done}"
    );
    assert_eq!(run_task_count(&client, run_id).await, 0);
    assert_eq!(condition_rows(&client, run_id, "approve").await, vec![]);
    let waited: f64 = client
        .query_one(
            "SELECT extract(epoch FROM finished_at - started_at)::float8 FROM sluice.workflow_step
              WHERE run_id = $1 AND step = 'approve'",
            &[&run_id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        (1.0..11.0).contains(&waited),
        "the step was cancelled {waited:.3} s after it became ready, its deadline is 1 s"
    );

    let handled = on_failure_input(&client, &cleanup, run_id).await;
    assert_eq!(handled["failed_step"], "approve", "{handled}");
    assert_eq!(handled["error"], json!(step_error), "{handled}");
    assert_eq!(handled["input"], json!({"order": 9}), "{handled}");

    // The run is over: the event it waited for meets nothing now.
    let late = push(&client, &never, json!({})).await;
    assert_eq!(woke_run_ids(&client, late).await, Vec::<i64>::new());
}

/// cancel_if an event with a filter, while the step's task runs: an event the filter rejects
/// changes nothing; the matching one cancels the task (its handler is signalled) and the run.
#[tokio::test]
async fn a_cancel_if_event_cancels_the_running_task_and_the_run() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "cond_work", "").await;
    let _worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 1);
    let stop = unique("cond_stop");
    let wf = unique("cond_stop_running");
    define_workflow(
        &client,
        &wf,
        json!({"steps": [{"name": "work", "task": task, "cancel_if": {"event": stop, "filter": "$.id == 7"}}]}),
    )
    .await;
    let run_id = run_workflow(
        &client,
        &wf,
        json!({"id": 7, task.clone(): {"sleep_ms": 30000}}),
    )
    .await;
    let task_id = wait_step_task(&client, run_id, "work", Duration::from_secs(15)).await;
    wait_execution(&client, task_id, None).await;
    assert_eq!(task_state(&client, task_id).await.0, "running");
    // cancel_if keeps watching the started step.
    assert_eq!(
        condition_rows(&client, run_id, "work").await,
        vec![cond("cancel_if", &stop, false)]
    );

    let other = push(&client, &stop, json!({"id": 8})).await;
    assert_eq!(woke_run_ids(&client, other).await, Vec::<i64>::new());
    assert_eq!(task_state(&client, task_id).await.0, "running");
    assert_eq!(
        condition_rows(&client, run_id, "work").await,
        vec![cond("cancel_if", &stop, false)]
    );

    let matching = push(&client, &stop, json!({"id": 7})).await;
    assert_eq!(woke_run_ids(&client, matching).await, vec![run_id]);
    let reason = format!("cancel_if met: event \"{stop}\"");
    let (status, attempt, error) = task_state(&client, task_id).await;
    assert_eq!(
        (status.as_str(), error.as_deref()),
        ("cancelled", Some(reason.as_str())),
        "the push cancelled the task in its transaction"
    );
    // The handler hears of it long before its 30 s sleep is over.
    wait_execution(&client, task_id, Some("cancelled")).await;
    let done = wait_run(&client, run_id, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(
        done["error"],
        json!(format!("step \"work\" cancelled: {reason}")),
        "{done}"
    );
    assert_eq!(done["steps"]["work"]["status"], "cancelled", "{done}");
    assert_eq!(attempt, 1);
    assert_eq!(
        executions(&client, task_id).await.len(),
        1,
        "the cancelled task was not retried"
    );
}

/// cancel_if "1 second" while the step's task is still queued (no worker serves it): the
/// scheduler's timer cancels the task and the run.
#[tokio::test]
async fn a_cancel_if_deadline_cancels_the_steps_queued_task() {
    let client = connect(&shared_dsn()).await;
    let task = define_unique_task(&client, "cond_unserved", "").await;
    let wf = unique("cond_queued_deadline");
    define_workflow(
        &client,
        &wf,
        json!({"steps": [{"name": "late", "task": task, "cancel_if": {"sleep": "1 second"}}]}),
    )
    .await;
    let run_id = run_workflow(&client, &wf, json!({})).await;
    let task_id = step_task(&client, run_id, "late")
        .await
        .expect("a met wait_for enqueues the task at once");
    assert_eq!(task_state(&client, task_id).await.0, "queued");

    let done = wait_run(&client, run_id, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    let (status, _, error) = task_state(&client, task_id).await;
    assert_eq!(status, "cancelled");
    let error = error.unwrap_or_default();
    assert!(error.starts_with("cancel_if met: sleep until"), "{error}");
    assert_eq!(
        done["error"],
        json!(format!("step \"late\" cancelled: {error}")),
        "{done}"
    );
    let waited: f64 = client
        .query_one(
            "SELECT extract(epoch FROM finished_at - enqueued_at)::float8 FROM sluice.tasks
              WHERE id = $1",
            &[&task_id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        (1.0..11.0).contains(&waited),
        "the task was cancelled {waited:.3} s after it was enqueued, its deadline is 1 s"
    );
    assert_eq!(condition_rows(&client, run_id, "late").await, vec![]);
}

/// A run cancelled by cancel_if is replayed: its step waits again with new conditions (the
/// event that cancelled it is past), and the event it waits for then completes the run.
#[tokio::test]
async fn a_replayed_run_cancelled_by_cancel_if_waits_again_and_completes_on_its_event() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "cond_publish", "").await;
    let _worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 1);
    let (approved, rejected) = (unique("cond_approved"), unique("cond_rejected"));
    let wf = unique("cond_replay");
    define_workflow(
        &client,
        &wf,
        json!({"steps": [{"name": "publish", "task": task,
                          "wait_for": {"event": approved, "filter": "$.post == $input.post"},
                          "cancel_if": {"event": rejected, "filter": "$.post == $input.post"}}]}),
    )
    .await;
    let run_id = run_workflow(&client, &wf, json!({"post": 3})).await;
    let rejection = push(&client, &rejected, json!({"post": 3})).await;
    assert_eq!(woke_run_ids(&client, rejection).await, vec![run_id]);
    // The push cancelled the run in its own transaction.
    let cancelled = run_view(&client, run_id).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let reason = format!("cancel_if met: event \"{rejected}\"");
    assert_eq!(
        cancelled["steps"]["publish"]["error"],
        json!(reason),
        "{cancelled}"
    );
    assert_eq!(
        cancelled["error"],
        json!(format!("step \"publish\" cancelled: {reason}")),
        "{cancelled}"
    );
    assert_eq!(condition_rows(&client, run_id, "publish").await, vec![]);

    let replayed: bool = client
        .query_one("SELECT sluice.replay_run($1)", &[&run_id])
        .await
        .unwrap()
        .get(0);
    assert!(replayed);
    let again = run_view(&client, run_id).await;
    assert_eq!(again["status"], "running", "{again}");
    assert_eq!(again["steps"]["publish"]["status"], "waiting", "{again}");
    assert!(again.get("error").is_none_or(Value::is_null), "{again}");
    assert_eq!(
        condition_rows(&client, run_id, "publish").await,
        vec![
            cond("wait_for", &approved, false),
            cond("cancel_if", &rejected, false)
        ]
    );

    let approval = push(&client, &approved, json!({"post": 3, "by": "ed"})).await;
    assert_eq!(woke_run_ids(&client, approval).await, vec![run_id]);
    let task_id = step_task(&client, run_id, "publish")
        .await
        .expect("the approval started the step");
    assert_eq!(
        task_input(&client, task_id).await["events"],
        json!({approved.clone(): {"post": 3, "by": "ed"}})
    );
    let done = wait_run(&client, run_id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["steps"]["publish"]["status"], "succeeded", "{done}");
    assert_eq!(
        condition_rows(&client, run_id, "publish").await,
        vec![],
        "the step's task finished: its cancel_if stopped watching"
    );
}

/// Defines a workflow of two root steps that both wait for `key`; returns its name.
async fn two_steps_waiting_for(client: &Client, key: &str) -> String {
    let task = define_unique_task(client, "cond_twin", "").await;
    let wf = unique("cond_twins");
    define_workflow(
        client,
        &wf,
        json!({"steps": [{"name": "left", "task": task, "wait_for": {"event": key}},
                         {"name": "right", "task": task, "wait_for": {"event": key}}]}),
    )
    .await;
    wf
}

/// One event meets every step of a run that waits for it: both start with its payload.
#[tokio::test]
async fn one_event_starts_every_step_of_a_run_that_waits_for_it() {
    let client = connect(&shared_dsn()).await;
    let key = unique("cond_both");
    let wf = two_steps_waiting_for(&client, &key).await;
    let run_id = run_workflow(&client, &wf, json!({})).await;
    let event = push(&client, &key, json!({"n": 1})).await;
    let woke = woke_run_ids(&client, event).await;
    assert!(
        !woke.is_empty() && woke.iter().all(|r| *r == run_id),
        "{woke:?}"
    );
    for step in ["left", "right"] {
        let task_id = step_task(&client, run_id, step)
            .await
            .unwrap_or_else(|| panic!("step {step} has no task"));
        assert_eq!(
            task_input(&client, task_id).await["events"],
            json!({key.clone(): {"n": 1}}),
            "step {step}"
        );
    }
    // No worker serves the task: end the run.
    client
        .query_one("SELECT sluice.cancel_run($1)", &[&run_id])
        .await
        .unwrap();
}

// Definitions ----------------------------------------------------------------------------------

/// Each bad wait_for or cancel_if fails define_workflow with 22023, a message naming the step
/// and what is wrong, and stores nothing.
#[tokio::test]
async fn invalid_conditions_are_rejected_naming_the_step_and_the_problem() {
    let client = connect(&shared_dsn()).await;
    let task = define_unique_task(&client, "cond_any", "").await;
    let wf = unique("cond_invalid");
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "wait_for",
            json!({"any": []}),
            "wait_for has a malformed or-group",
        ),
        (
            "wait_for",
            json!([{"event": "x"}, {"any": [{"event": "y"}], "all": []}]),
            "wait_for has a malformed or-group",
        ),
        (
            "wait_for",
            json!({"when": "tomorrow"}),
            "wait_for has a condition that is neither a sleep nor an event",
        ),
        (
            "cancel_if",
            json!(42),
            "cancel_if has a malformed condition 42",
        ),
        (
            "wait_for",
            json!({"event": "x", "filter": "$.id == $foo"}),
            "could not find jsonpath variable \"foo\"",
        ),
        (
            "wait_for",
            json!({"event": "x", "filter": "$.id ==="}),
            "wait_for filter is not a valid jsonpath",
        ),
        (
            "wait_for",
            json!({"event": "x", "filter": 7}),
            "wait_for has an event filter that is not a jsonpath string",
        ),
        (
            "wait_for",
            json!({"event": "x", "within": "1 hour"}),
            "wait_for has an event condition with unknown key(s) within",
        ),
        (
            "wait_for",
            json!("-5 seconds"),
            "wait_for sleep must not be negative",
        ),
        (
            "cancel_if",
            json!({"sleep": "soon"}),
            "cancel_if sleep is not a duration",
        ),
        (
            "cancel_if",
            json!([]),
            "cancel_if must name at least one condition",
        ),
        (
            "wait_for",
            json!({"event": ""}),
            "wait_for has an event condition whose key is not a non-empty string",
        ),
        (
            "cancel_if",
            json!({"any": [{"event": null}]}),
            "cancel_if has an event condition whose key is not a non-empty string",
        ),
    ];
    for (what, conditions, message) in cases {
        let mut step = json!({"name": "gate", "task": task});
        step[what] = conditions;
        let spec = json!({"steps": [step]});
        let (code, text) = define_error(&client, &wf, &spec).await;
        assert_eq!(code, "22023", "{spec}: {text}");
        assert!(
            text.contains("step \"gate\""),
            "{spec}: {text:?} does not name the step"
        );
        assert!(
            text.contains(message),
            "{spec}: {text:?} does not say {message:?}"
        );
    }
    let stored: i64 = client
        .query_one(
            "SELECT count(*) FROM sluice.workflow_definition WHERE name = $1",
            &[&wf],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "no rejected definition was stored");
}

// The typed client ------------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Clone)]
struct OrderRun {
    id: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Paid {
    id: i64,
    amount: i64,
}

task_type!(ShipOrder, "cond_typed_ship", StepInput<OrderRun>, Value);
task_type!(NotifyOrder, "cond_typed_notify", StepInput<OrderRun>, Value);

/// A workflow defined with the WorkflowBuilder: its conditions are stored normalized, and the
/// handler of the step that waited reads the event's payload with `StepInput::event`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_conditions_are_stored_normalized_and_the_handler_reads_the_awaited_payload() {
    let client = connect(&shared_dsn()).await;
    for task in [ShipOrder::name(), NotifyOrder::name()] {
        define_task(&client, task, &TaskOptions::default())
            .await
            .expect("defining the step task");
    }
    let paid = unique("cond_typed_paid");
    let (shipped, returned) = (unique("cond_typed_shipped"), unique("cond_typed_returned"));

    // Only defined, for the shape of a composite spec.
    let shape_name = unique("cond_typed_shape");
    let mut shape = WorkflowBuilder::<OrderRun>::new(shape_name.clone());
    let ship = shape.step::<ShipOrder>("ship", &[]);
    shape.step_with::<NotifyOrder>(
        "notify",
        &[&ship],
        StepOptions {
            wait_for: Some(
                Conditions::any([
                    Condition::event(shipped.clone()),
                    Condition::sleep(Duration::from_secs(90)),
                ])
                .and(Condition::sleep(Duration::from_millis(1500))),
            ),
            cancel_if: Some(Conditions::all([
                Condition::event(returned.clone()),
                Condition::event_matching(paid.clone(), "$.amount < 0"),
            ])),
            ..StepOptions::default()
        },
    );
    assert_eq!(shape.define(&client).await.expect("defining the shape"), 1);
    let spec: Value = client
        .query_one(
            "SELECT spec FROM sluice.workflow_definition WHERE name = $1 AND version = 1",
            &[&shape_name],
        )
        .await
        .unwrap()
        .get(0);
    let notify = &spec["steps"][1];
    assert_eq!(
        notify["wait_for"],
        json!([[{"event": shipped}, {"sleep": "00:01:30"}], [{"sleep": "00:00:01.5"}]]),
        "{spec}"
    );
    assert_eq!(
        notify["cancel_if"],
        json!([[{"event": returned}], [{"event": paid, "filter": "$.amount < 0"}]]),
        "{spec}"
    );

    // Run end to end: wait for the payment of this order, with a 30 s deadline.
    let orders_name = unique("cond_typed_orders");
    let mut orders = WorkflowBuilder::<OrderRun>::new(orders_name.clone());
    orders.step_with::<ShipOrder>(
        "ship",
        &[],
        StepOptions {
            wait_for: Some(Condition::event_matching(paid.clone(), "$.id == $input.id").into()),
            cancel_if: Some(Duration::from_secs(30).into()),
            ..StepOptions::default()
        },
    );
    orders.define(&client).await.expect("defining the workflow");
    let spec: Value = client
        .query_one(
            "SELECT spec FROM sluice.workflow_definition WHERE name = $1 AND version = 1",
            &[&orders_name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        spec["steps"][0]["wait_for"],
        json!([[{"event": paid, "filter": "$.id == $input.id"}]]),
        "{spec}"
    );
    assert_eq!(
        spec["steps"][0]["cancel_if"],
        json!([[{"sleep": "00:00:30"}]]),
        "{spec}"
    );

    let paid_key = paid.clone();
    let worker = Worker::builder(shared_dsn())
        .name(unique("cond_typed_worker"))
        .slots(1)
        .heartbeat_interval(Duration::from_millis(500))
        .poll_interval(Duration::from_millis(200))
        .shutdown_timeout(Duration::from_secs(5))
        .task::<ShipOrder, _, _>(move |_ctx, input: StepInput<OrderRun>| {
            let paid_key = paid_key.clone();
            async move {
                let payment: Option<Paid> = input.event(&paid_key)?;
                Ok(json!({"order": input.input.id, "payment": payment}))
            }
        })
        .build()
        .expect("worker configuration");
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run_until(async move {
        let _ = stop_rx.await;
    }));

    let run_id = orders
        .run(&client, &OrderRun { id: 5 })
        .await
        .expect("starting the run");
    assert_eq!(
        step_view(&client, run_id, "ship").await["status"],
        "waiting"
    );
    push(&client, &paid, json!({"id": 6, "amount": 10})).await;
    assert_eq!(
        step_view(&client, run_id, "ship").await["status"],
        "waiting"
    );
    push(&client, &paid, json!({"id": 5, "amount": 30})).await;
    let done = wait_run(&client, run_id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let payment = Paid { id: 5, amount: 30 };
    assert_eq!(
        done["steps"]["ship"]["output"],
        json!({"order": 5, "payment": payment}),
        "{done}"
    );
    assert_eq!(
        condition_rows(&client, run_id, "ship").await,
        vec![],
        "the step is done: its 30 s deadline no longer watches it"
    );

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .expect("the worker shuts down")
        .expect("the worker task did not panic")
        .expect("the worker ended without an error");
}

// Found bugs, fixed ------------------------------------------------------------------------------

/// A step that waits after its parent (a -> b, b waits for an event) must keep the run
/// running until b's wait is over and b's task ran.
#[tokio::test]
async fn a_step_waiting_after_its_parent_keeps_the_run_running_until_its_event() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "cond_chain", "").await;
    let _worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 2);
    let go = unique("cond_go");
    let wf = unique("cond_chain");
    define_workflow(
        &client,
        &wf,
        json!({"steps": [{"name": "a", "task": task},
                         {"name": "b", "task": task, "parents": ["a"],
                          "wait_for": {"event": go}}]}),
    )
    .await;
    let run_id = run_workflow(&client, &wf, json!({})).await;
    wait_until(Duration::from_secs(20), "b to wait", || async {
        let run = run_view(&client, run_id).await;
        if run["steps"]["b"]["status"] == "waiting" {
            Ok(())
        } else {
            Err(run.to_string())
        }
    })
    .await;
    let waiting = run_view(&client, run_id).await;
    assert_eq!(
        waiting["status"], "running",
        "the run finished while its step b waits: {waiting}"
    );
    let event = push(&client, &go, json!({"n": 1})).await;
    assert_eq!(woke_run_ids(&client, event).await, vec![run_id]);
    let done = wait_run(&client, run_id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["steps"]["b"]["status"], "succeeded", "{done}");
    assert!(done["output"].get("b").is_some(), "{done}");
}

/// A step with cancel_if and no wait_for has nothing to wait for: its task must start at once
/// (cancel_if then watches it).
#[tokio::test]
async fn a_step_with_only_cancel_if_starts_at_once_and_is_watched() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "cond_watched", "").await;
    let _worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 1);
    let stop = unique("cond_stop");
    let wf = unique("cond_cancel_only");
    define_workflow(
        &client,
        &wf,
        json!({"steps": [{"name": "work", "task": task, "cancel_if": {"event": stop}}]}),
    )
    .await;
    let run_id = run_workflow(&client, &wf, json!({task.clone(): {"sleep_ms": 30000}})).await;
    let step = step_view(&client, run_id, "work").await;
    if step["status"] == "waiting" {
        // The run would wait forever: end it before failing.
        let _ = client
            .query_one("SELECT sluice.cancel_run($1)", &[&run_id])
            .await;
        panic!("the step waits with nothing to wait for: {step}");
    }
    let task_id = wait_step_task(&client, run_id, "work", Duration::from_secs(10)).await;
    wait_execution(&client, task_id, None).await;
    let event = push(&client, &stop, json!({})).await;
    assert_eq!(woke_run_ids(&client, event).await, vec![run_id]);
    wait_execution(&client, task_id, Some("cancelled")).await;
    let done = wait_run(&client, run_id, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "cancelled", "{done}");
}

/// cancel_if {"event": "stop", "filter": "$.id == $input.id"} watching a running step: a stop
/// for another id must change nothing, the matching one cancels the task and the run.
#[tokio::test]
async fn a_cancel_if_filter_naming_the_input_watches_the_running_step() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "cond_work_input", "").await;
    let _worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 1);
    let stop = unique("cond_stop");
    let wf = unique("cond_stop_input");
    define_workflow(
        &client,
        &wf,
        json!({"steps": [{"name": "work", "task": task, "wait_for": "0 seconds",
                          "cancel_if": {"event": stop, "filter": "$.id == $input.id"}}]}),
    )
    .await;
    let run_id = run_workflow(
        &client,
        &wf,
        json!({"id": 7, task.clone(): {"sleep_ms": 30000}}),
    )
    .await;
    let task_id = wait_step_task(&client, run_id, "work", Duration::from_secs(15)).await;
    wait_execution(&client, task_id, None).await;

    let other = push_event(&client, &stop, &json!({"id": 8})).await;
    let other = match other {
        Ok(id) => id,
        Err(e) => {
            let _ = client
                .query_one("SELECT sluice.cancel_run($1)", &[&run_id])
                .await;
            panic!("a stop for another id cannot even be pushed: {e}");
        }
    };
    assert_eq!(woke_run_ids(&client, other).await, Vec::<i64>::new());
    assert_eq!(task_state(&client, task_id).await.0, "running");
    let matching = push(&client, &stop, json!({"id": 7})).await;
    assert_eq!(woke_run_ids(&client, matching).await, vec![run_id]);
    wait_execution(&client, task_id, Some("cancelled")).await;
    let done = wait_run(&client, run_id, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "cancelled", "{done}");
}

/// sluice.events.woke_run_ids lists the runs an event met, each once.
#[tokio::test]
async fn woke_run_ids_lists_a_run_once_however_many_of_its_steps_an_event_met() {
    let client = connect(&shared_dsn()).await;
    let key = unique("cond_both");
    let wf = two_steps_waiting_for(&client, &key).await;
    let run_id = run_workflow(&client, &wf, json!({})).await;
    let event = push(&client, &key, json!({"n": 1})).await;
    let woke = woke_run_ids(&client, event).await;
    client
        .query_one("SELECT sluice.cancel_run($1)", &[&run_id])
        .await
        .unwrap();
    assert_eq!(woke, vec![run_id]);
}
