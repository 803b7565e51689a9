//! A worker never runs more tasks at once than its slots: measured from the handlers' own
//! start/end timestamps, and sampled from sluice.workers while the run is on.

use serde_json::json;
use sluice_tests::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WORKER: &str = env!("CARGO_BIN_EXE_test_worker");
const SLOTS: i32 = 3;
const TASKS: i32 = 60;

#[tokio::test]
async fn a_worker_never_runs_more_tasks_at_once_than_its_slots() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "slots", "").await;
    let workers: Vec<WorkerProcess> = (0..2)
        .map(|_| WorkerProcess::spawn(WORKER, &shared_dsn(), &task, SLOTS))
        .collect();
    let worker_names: Vec<String> = workers.iter().map(WorkerProcess::name).collect();
    let ids = enqueue_copies(&client, &task, json!({"sleep_ms": 100}), TASKS).await;

    // While the run is on, the scheduler's view: tasks running per worker.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let client = connect(&shared_dsn()).await;
        let names = worker_names.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut most = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let row = client
                    .query_one(
                        "SELECT coalesce(max(running), 0), count(*) FILTER (WHERE running > slots)
                           FROM sluice.workers WHERE name = ANY($1) AND stopped_at IS NULL",
                        &[&names],
                    )
                    .await
                    .expect("sampling sluice.workers");
                let (running, over): (i64, i64) = (row.get(0), row.get(1));
                assert_eq!(
                    over, 0,
                    "sluice.workers showed a worker running more than its slots"
                );
                most = most.max(running);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            most
        })
    };
    wait_finished(&client, &ids, Duration::from_secs(30)).await;
    assert_eq!(
        status_summary(&client, &ids).await,
        format!("succeeded={TASKS}")
    );
    stop.store(true, Ordering::Relaxed);
    let most_sampled = sampler.await.expect("the sluice.workers sampler failed");
    assert!(
        (1..=i64::from(SLOTS)).contains(&most_sampled),
        "sluice.workers should have shown between 1 and {SLOTS} running tasks, most seen {most_sampled}"
    );

    // The handlers' view: for each execution, how many executions on the same worker process
    // were running when it started (itself included).
    let rows = client
        .query(
            "SELECT e.worker_pid, max(o.running), count(DISTINCT e.task_id)
               FROM sluice_test.execution e
               CROSS JOIN LATERAL (
                     SELECT count(*) AS running FROM sluice_test.execution x
                      WHERE x.worker_pid = e.worker_pid AND x.task_id = ANY($1)
                        AND x.started_at <= e.started_at
                        AND coalesce(x.finished_at, 'infinity') > e.started_at) o
              WHERE e.task_id = ANY($1)
              GROUP BY e.worker_pid ORDER BY e.worker_pid",
            &[&ids],
        )
        .await
        .unwrap();
    let per_worker: Vec<(i32, i64, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let executed: i64 = per_worker.iter().map(|(_, _, n)| n).sum();
    assert_eq!(
        executed,
        i64::from(TASKS),
        "every task executed once: {per_worker:?}"
    );
    for (pid, max_overlap, _) in &per_worker {
        assert!(
            workers.iter().any(|w| w.pid() as i32 == *pid),
            "execution on an unknown process {pid}: {per_worker:?}"
        );
        assert!(
            *max_overlap <= i64::from(SLOTS),
            "worker {pid} ran {max_overlap} tasks at once with {SLOTS} slots (pid, max overlap, tasks): {per_worker:?}"
        );
    }
    // With the queue full, the limit is reached, not just respected: the slots are used.
    let busiest = per_worker.iter().map(|(_, m, _)| *m).max().unwrap_or(0);
    assert_eq!(
        busiest,
        i64::from(SLOTS),
        "no worker ever used all {SLOTS} slots: {per_worker:?}"
    );
}

/// The scheduler frees a cancelled attempt's slot at once, while a handler that ignores its
/// cancellation signal still holds it in the worker: the scheduler can then post more tasks
/// than the worker's fetch has room for. The one left behind must start as soon as the worker
/// has a slot for it (not at the next poll, here a minute away), and never beside the two
/// handlers already running.
#[tokio::test]
async fn a_task_posted_beyond_a_lingering_cancelled_handler_starts_once_a_slot_frees() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "slots-linger", "").await;
    let _worker =
        WorkerProcess::spawn_polling(WORKER, &shared_dsn(), &task, 2, Duration::from_secs(60));
    let lingering = enqueue_sql(
        &client,
        &task,
        json!({"sleep_ms": 60000, "linger_after_cancel_ms": 6000}),
    )
    .await;
    let short = enqueue_sql(&client, &task, json!({"sleep_ms": 200})).await;
    wait_execution(&client, lingering, None).await;
    assert!(
        sluice_client::cancel(&client, lingering)
            .await
            .expect("cancel"),
        "the running task can be cancelled"
    );
    // Both of the scheduler's slots are free now; the worker still runs the lingering handler.
    wait_finished(&client, &[short], Duration::from_secs(20)).await;
    let ids = enqueue_copies(&client, &task, json!({"sleep_ms": 300}), 2).await;
    wait_finished(&client, &ids, Duration::from_secs(20)).await;
    assert_eq!(status_summary(&client, &ids).await, "succeeded=2");

    let row = client
        .query_one(
            "SELECT (SELECT finished_at FROM sluice_test.execution WHERE task_id = $1),
                    (SELECT min(finished_at) FROM sluice_test.execution WHERE task_id = ANY($2)),
                    (SELECT max(started_at) FROM sluice_test.execution WHERE task_id = ANY($2)),
                    (SELECT count(*) FROM sluice_test.execution WHERE task_id = ANY($2))",
            &[&lingering, &ids],
        )
        .await
        .expect("reading the executions");
    let lingering_ended: Option<std::time::SystemTime> = row.get(0);
    let (first_ended, second_started): (std::time::SystemTime, std::time::SystemTime) =
        (row.get(1), row.get(2));
    let runs: i64 = row.get(3);
    assert_eq!(runs, 2, "each copy ran once");
    assert!(
        second_started >= first_ended,
        "the second copy started before the first ended, beside the lingering handler: \
         three handlers on two slots"
    );
    assert!(
        lingering_ended.is_none_or(|ended| second_started < ended),
        "the second copy waited for the lingering handler to end although the first copy's \
         slot was free"
    );
}

/// Tasks deleted from the table while they wait in the scheduler's memory are not handed to
/// workers: the delete's commit makes the scheduler compare its memory with the table at once.
/// Without that, each deleted task went to a worker whose claim found nothing, holding the
/// slot until the once-a-second check of running attempts, until the periodic sweep (up to a
/// minute later) forgot them: with one slot and 150 deleted tasks ahead of it, a new task
/// waited for that sweep (21 s in the run that showed it).
#[tokio::test]
async fn tasks_deleted_while_waiting_are_not_handed_to_workers() {
    tasks_removed_while_waiting_are_not_handed_to_workers(
        "DELETE FROM sluice.task_run WHERE id = ANY($1)",
    )
    .await;
}

/// The same for tasks cancelled through the API while they wait: the cancel's commit reports
/// them to the scheduler, which drops them from its queue.
#[tokio::test]
async fn tasks_cancelled_while_waiting_are_not_handed_to_workers() {
    tasks_removed_while_waiting_are_not_handed_to_workers(
        "SELECT sluice.cancel(id) FROM unnest($1::bigint[]) AS id",
    )
    .await;
}

async fn tasks_removed_while_waiting_are_not_handed_to_workers(remove_sql: &str) {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "removed", "").await;
    let _worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 1);
    let blocker = enqueue_sql(&client, &task, json!({"sleep_ms": 2000})).await;
    wait_until(Duration::from_secs(10), "the blocker to start", || async {
        match task_state(&client, blocker).await.0.as_str() {
            "running" => Ok(()),
            other => Err(other.to_string()),
        }
    })
    .await;
    let doomed = enqueue_copies(&client, &task, json!({}), 150).await;
    // While the blocker runs the scheduler reads arrivals at least every 100 ms
    // (maintenance): by then the doomed tasks wait in its memory.
    tokio::time::sleep(Duration::from_millis(700)).await;
    client.query(remove_sql, &[&doomed]).await.unwrap();
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM sluice.task_run WHERE id = ANY($1) AND status = 'queued'",
            &[&doomed],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "every doomed task is gone or cancelled");
    let enqueued = std::time::Instant::now();
    let after = enqueue_sql(&client, &task, json!({})).await;
    wait_finished(&client, &[blocker, after], Duration::from_secs(90)).await;
    let waited = enqueued.elapsed();
    assert_eq!(
        status_summary(&client, &[blocker, after]).await,
        "succeeded=2"
    );
    // The blocker ends ~2 s after it started; a deletion sweep may wait up to 5 s after the
    // last sweep started.
    assert!(
        waited < Duration::from_secs(12),
        "the task enqueued after the removal finished {waited:?} later"
    );
}
