//! Scheduler behaviour on the shared cluster, with real worker processes: running tasks,
//! transactional enqueue, retries and backoff, timeouts, slots, poison rows, fencing.

use serde_json::json;
use sluice_client::{enqueue, EnqueueOptions, TaskDefinition};
use sluice_tests::*;
use std::time::Duration;
use tokio_postgres::Client;

const WORKER: &str = env!("CARGO_BIN_EXE_test_worker");

async fn setup(task_options: &str) -> (Client, String) {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = unique("sched");
    client
        .execute(&format!("SELECT sluice.define_task($1 {task_options})"), &[&task])
        .await
        .expect("define_task");
    (client, task)
}

async fn enqueue_sql(client: &Client, task: &str, input: serde_json::Value) -> i64 {
    client
        .query_one("SELECT sluice.enqueue($1, $2)", &[&task, &input])
        .await
        .expect("sluice.enqueue")
        .get(0)
}

#[tokio::test]
async fn tasks_enqueued_from_sql_and_rust_run_and_show_their_output() {
    let (client, task) = setup("").await;
    let worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 2);

    // From Rust, typed: the task type names the same task at runtime.
    struct Probe;
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    impl TaskDefinition for Probe {
        const NAME: &'static str = "probe";
        type Input = serde_json::Value;
        type Output = serde_json::Value;
        fn name() -> &'static str {
            NAME.get().map(String::as_str).unwrap_or(Self::NAME)
        }
    }
    NAME.set(task.clone()).unwrap();
    let from_rust = enqueue::<Probe>(&client, &json!({"sleep_ms": 10}), &EnqueueOptions::default())
        .await
        .expect("typed enqueue");
    let from_sql = enqueue_sql(&client, &task, json!({})).await;

    wait_finished(&client, &[from_rust, from_sql], Duration::from_secs(20)).await;
    for id in [from_rust, from_sql] {
        let row = client
            .query_one(
                "SELECT status::text, attempt, output, worker_name, started_at IS NOT NULL
                       AND finished_at >= started_at
                   FROM sluice.tasks WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "succeeded", "task {id}");
        assert_eq!(row.get::<_, i32>(1), 1, "task {id} attempts");
        let output: serde_json::Value = row.get(2);
        assert_eq!(output["worker_pid"], json!(worker.pid()), "task {id} output {output}");
        assert!(row.get::<_, Option<String>>(3).is_some_and(|n| n.starts_with("test_worker-")));
        assert!(row.get::<_, bool>(4), "task {id} timestamps");
    }
}

#[tokio::test]
async fn a_rolled_back_enqueue_never_runs_and_idempotency_keys_return_the_existing_task() {
    let (mut client, task) = setup("").await;
    let _worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 2);

    let tx = client.transaction().await.unwrap();
    let rolled_back: i64 = tx
        .query_one("SELECT sluice.enqueue($1, '{}')", &[&task])
        .await
        .unwrap()
        .get(0);
    tx.rollback().await.unwrap();

    let first: i64 = client
        .query_one("SELECT sluice.enqueue($1, '{\"sleep_ms\": 300}', idempotency_key => 'order-1')", &[&task])
        .await
        .unwrap()
        .get(0);
    let again: i64 = client
        .query_one("SELECT sluice.enqueue($1, '{}', idempotency_key => 'order-1')", &[&task])
        .await
        .unwrap()
        .get(0);
    assert_eq!(first, again, "an unfinished task's key must return that task");
    wait_finished(&client, &[first], Duration::from_secs(20)).await;
    let after_finish: i64 = client
        .query_one("SELECT sluice.enqueue($1, '{}', idempotency_key => 'order-1')", &[&task])
        .await
        .unwrap()
        .get(0);
    assert_ne!(after_finish, first, "a finished task's key is free again");
    wait_finished(&client, &[after_finish], Duration::from_secs(20)).await;

    let seen: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM sluice.task_run WHERE id = $1)
                  + (SELECT count(*) FROM sluice_test.execution WHERE task_id = $1)",
            &[&rolled_back],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 0, "the rolled-back task {rolled_back} must neither exist nor run");
}

#[tokio::test]
async fn retries_wait_the_backoff_and_a_fatal_error_fails_at_once() {
    let (client, task) =
        setup(", retries => 3, backoff_factor => 1.5, backoff_max => '2 seconds'").await;
    let _worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 2);
    let retried = enqueue_sql(&client, &task, json!({"fail_attempts": 3})).await;
    let fatal = enqueue_sql(&client, &task, json!({"fail_attempts": 3, "fatal": true})).await;
    wait_finished(&client, &[retried, fatal], Duration::from_secs(30)).await;

    let (status, attempt): (String, i32) = {
        let r = client
            .query_one("SELECT status::text, attempt FROM sluice.tasks WHERE id = $1", &[&retried])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((status.as_str(), attempt), ("succeeded", 4));
    // Gap between attempt k's failure and attempt k+1's start: min(2 s, 1.5^k).
    let gaps = client
        .query(
            "SELECT a.attempt, extract(epoch FROM b.started_at - a.finished_at)::float8
               FROM sluice.task_attempts a
               JOIN sluice.task_attempts b ON b.task_id = a.task_id AND b.attempt = a.attempt + 1
              WHERE a.task_id = $1 ORDER BY a.attempt",
            &[&retried],
        )
        .await
        .unwrap();
    assert_eq!(gaps.len(), 3, "three retries expected");
    for row in gaps {
        let k: i32 = row.get(0);
        let gap: f64 = row.get(1);
        let want = 1.5f64.powi(k).min(2.0);
        assert!(
            gap >= want - 0.01 && gap <= want + 0.75,
            "retry after attempt {k}: waited {gap:.3}s, backoff is {want:.3}s"
        );
    }

    let r = client
        .query_one("SELECT status::text, attempt, last_error FROM sluice.tasks WHERE id = $1", &[&fatal])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "failed");
    assert_eq!(r.get::<_, i32>(1), 1, "a fatal error must not be retried");
    assert_eq!(r.get::<_, String>(2), "planned failure of attempt 1");
}

#[tokio::test]
async fn an_execution_timeout_starts_a_new_attempt_and_a_schedule_timeout_cancels() {
    let (client, task) = setup(", retries => 1, execution_timeout => '1 second'").await;
    let _worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 2);
    let slow_first = enqueue_sql(&client, &task, json!({"sleep_ms": 5000, "sleep_on_attempt": 1})).await;

    let unserved = unique("unserved");
    client
        .execute("SELECT sluice.define_task($1, schedule_timeout => '1 second')", &[&unserved])
        .await
        .unwrap();
    let never_started = enqueue_sql(&client, &unserved, json!({})).await;

    wait_finished(&client, &[slow_first, never_started], Duration::from_secs(20)).await;
    let attempts = client
        .query(
            "SELECT attempt, outcome, coalesce(error, '') FROM sluice.task_attempts
              WHERE task_id = $1 ORDER BY attempt",
            &[&slow_first],
        )
        .await
        .unwrap();
    let seen: Vec<(i32, String, String)> =
        attempts.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(seen.len(), 2, "attempts: {seen:?}");
    assert_eq!((seen[0].0, seen[0].1.as_str()), (1, "timed_out"), "{seen:?}");
    assert!(seen[0].2.contains("execution timeout"), "{seen:?}");
    assert_eq!((seen[1].0, seen[1].1.as_str()), (2, "succeeded"), "{seen:?}");
    // The first attempt's handler was told to stop (through its cancellation signal).
    let cancelled: i64 = client
        .query_one(
            "SELECT count(*) FROM sluice_test.execution WHERE task_id = $1 AND attempt = 1
                AND outcome = 'cancelled'",
            &[&slow_first],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(cancelled, 1, "the timed-out handler must see its cancellation signal");

    let r = client
        .query_one("SELECT status::text, attempt, last_error FROM sluice.tasks WHERE id = $1", &[&never_started])
        .await
        .unwrap();
    assert_eq!((r.get::<_, String>(0).as_str(), r.get::<_, i32>(1)), ("cancelled", 0));
    let reason: String = r.get(2);
    assert!(reason.starts_with("schedule timeout"), "reason: {reason}");
}

#[tokio::test]
async fn a_worker_never_runs_more_tasks_at_once_than_its_slots() {
    let (client, task) = setup("").await;
    let worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 3);
    let ids: Vec<i64> = client
        .query(
            "SELECT sluice.enqueue_many($1, array_fill('{\"sleep_ms\": 120}'::jsonb, ARRAY[30]))",
            &[&task],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    wait_finished(&client, &ids, Duration::from_secs(30)).await;
    let overlap: i64 = client
        .query_one(
            "SELECT max(running) FROM (
                 SELECT count(*) AS running
                   FROM sluice_test.execution e
                   JOIN sluice_test.execution o
                     ON o.worker_pid = e.worker_pid AND o.task_id = ANY($1)
                    AND o.started_at <= e.started_at AND o.finished_at > e.started_at
                  WHERE e.task_id = ANY($1) AND e.worker_pid = $2
                  GROUP BY e.task_id, e.attempt) s",
            &[&ids, &(worker.pid() as i32)],
        )
        .await
        .unwrap()
        .get(0);
    assert!(overlap <= 3, "{overlap} tasks ran at once on a worker with 3 slots");
    assert!(overlap >= 2, "tasks should run concurrently (max overlap {overlap})");
    assert_eq!(status_summary(&client, &ids).await, "succeeded=30");
}

#[tokio::test]
async fn a_task_whose_definition_was_deleted_fails_and_the_scheduler_carries_on() {
    let (client, doomed) = setup("").await;
    let scheduler_pid: i32 = client
        .query_one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'sluice scheduler'", &[])
        .await
        .expect("the scheduler must be running")
        .get(0);
    let _doomed_worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &doomed, 1);
    let running = enqueue_sql(&client, &doomed, json!({"sleep_ms": 1500})).await;
    wait_for(Duration::from_secs(10), "the first task to start", || async {
        let n: i64 = client
            .query_one("SELECT count(*) FROM sluice_test.execution WHERE task_id = $1", &[&running])
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        if n > 0 { Ok(()) } else { Err("not started".into()) }
    })
    .await;
    let queued = enqueue_sql(&client, &doomed, json!({})).await;
    client
        .execute("DELETE FROM sluice.task_definition WHERE name = $1", &[&doomed])
        .await
        .unwrap();
    wait_finished(&client, &[running, queued], Duration::from_secs(20)).await;
    let r = client
        .query_one("SELECT status::text, last_error FROM sluice.tasks WHERE id = $1", &[&queued])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "failed");
    assert_eq!(
        r.get::<_, String>(1),
        format!("task definition \"{doomed}\" no longer exists")
    );

    // Other work still flows, through the same scheduler process.
    let (_, healthy) = setup("").await;
    let _healthy_worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &healthy, 1);
    let after = enqueue_sql(&client, &healthy, json!({})).await;
    wait_finished(&client, &[after], Duration::from_secs(20)).await;
    assert_eq!(status_summary(&client, &[after]).await, "succeeded=1");
    let still: i32 = client
        .query_one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'sluice scheduler'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(still, scheduler_pid, "the scheduler must not have restarted");
}

/// A raw-SQL worker whose session ends loses its attempt; the attempt's late completion is
/// refused after a newer attempt completed.
#[tokio::test]
async fn a_late_completion_from_a_lost_attempt_never_overwrites_a_newer_one() {
    let (client, task) = setup("").await;
    let id = enqueue_sql(&client, &task, json!({})).await;

    let first_session = connect(&shared_dsn()).await;
    let first: i64 = first_session
        .query_one("SELECT sluice.register_worker('raw-1', ARRAY[$1], 1)", &[&task])
        .await
        .unwrap()
        .get(0);
    assert_eq!(fetch_one(&first_session, first).await, (id, 1));
    drop(first_session); // the session ends: the scheduler must requeue attempt 1 as lost

    let second_session = connect(&shared_dsn()).await;
    let second: i64 = second_session
        .query_one("SELECT sluice.register_worker('raw-2', ARRAY[$1], 1)", &[&task])
        .await
        .unwrap()
        .get(0);
    assert_eq!(fetch_one(&second_session, second).await, (id, 2));
    let accepted: bool = second_session
        .query_one("SELECT sluice.complete($1, $2, 2, '{\"from\": 2}')", &[&second, &id])
        .await
        .unwrap()
        .get(0);
    assert!(accepted, "the current attempt must complete");

    let late_complete: bool = client
        .query_one("SELECT sluice.complete($1, $2, 1, '{\"from\": 1}')", &[&first, &id])
        .await
        .unwrap()
        .get(0);
    let late_fail: bool = client
        .query_one("SELECT sluice.fail($1, $2, 1, 'late')", &[&first, &id])
        .await
        .unwrap()
        .get(0);
    assert!(!late_complete && !late_fail, "a lost attempt's completion must be refused");
    let r = client
        .query_one(
            "SELECT status::text, output, (SELECT outcome FROM sluice.task_attempts
                                             WHERE task_id = $1 AND attempt = 1)
               FROM sluice.tasks WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "succeeded");
    assert_eq!(r.get::<_, serde_json::Value>(1), json!({"from": 2}));
    assert_eq!(r.get::<_, String>(2), "lost");
}

/// Fetches through the raw protocol until the scheduler has assigned something.
async fn fetch_one(worker_session: &Client, worker: i64) -> (i64, i32) {
    wait_for(Duration::from_secs(10), "an assignment", || async {
        let rows = worker_session
            .query("SELECT task_id, attempt FROM sluice.fetch_tasks($1)", &[&worker])
            .await
            .map_err(|e| e.to_string())?;
        match rows.first() {
            Some(r) => Ok((r.get::<_, i64>(0), r.get::<_, i32>(1))),
            None => Err("nothing assigned yet".into()),
        }
    })
    .await
}
