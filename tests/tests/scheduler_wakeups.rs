//! The scheduler leaves wake-ups for its next due tick while no worker has a free slot (enqueue
//! commits then change nothing it could act on). What must still wake it at once does: a
//! worker registering. A private cluster with a 30 s poll interval, so a wake-up that went
//! missing would show as a 30 s wait, and no other test's workers to give it free slots.
//!
//! Also on this cluster: a claim takes the execution timeout the scheduler posted with the
//! assignment, including one too long for the posted 32-bit milliseconds (looked up instead).

use serde_json::json;
use sluice_tests::*;
use std::time::{Duration, Instant};

const WORKER: &str = env!("CARGO_BIN_EXE_test_worker");

#[tokio::test]
async fn tasks_enqueued_while_no_worker_has_a_slot_start_as_soon_as_one_registers() {
    let cluster = PrivateCluster::start("wakeups", true, &[("sluice.poll_interval", "30000")]);
    let client = connect(&cluster.dsn()).await;
    create_test_tables(&client).await;

    // No worker at all: these commits find the scheduler with no free slot anywhere.
    let task = define_unique_task(&client, "wakeup", "").await;
    let ids = enqueue_copies(&client, &task, json!({}), 5).await;
    // Past the ticks a newly started scheduler schedules for itself (a second load of running
    // attempts 2 s after its start), which would hide a missed wake-up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(status_summary(&client, &ids).await, "queued=5");

    let registered = Instant::now();
    let _worker = WorkerProcess::spawn(WORKER, &cluster.dsn(), &task, 2);
    wait_succeeded(&client, &ids, 5, Duration::from_secs(20)).await;
    let waited = registered.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "the registration woke the scheduler: all ran {waited:?} after the worker started \
         (a missed wake-up waits for the 30 s poll)"
    );

    // Execution timeouts travel with the assignment: a short one as posted, one longer than
    // 2^31 ms (about 24.8 days) looked up by the claim.
    let long =
        define_unique_task(&client, "long_timeout", ", execution_timeout => '30 days'").await;
    let short = define_unique_task(
        &client,
        "short_timeout",
        ", execution_timeout => '2 seconds'",
    )
    .await;
    let _workers = [
        WorkerProcess::spawn(WORKER, &cluster.dsn(), &long, 1),
        WorkerProcess::spawn(WORKER, &cluster.dsn(), &short, 1),
    ];
    let long_id = enqueue_sql(&client, &long, json!({"sleep_ms": 1500})).await;
    let short_id = enqueue_sql(&client, &short, json!({"sleep_ms": 1500})).await;
    for (id, expected) in [(long_id, "30 days"), (short_id, "00:00:02")] {
        let timeout: String = wait_until(
            Duration::from_secs(15),
            "the task to be claimed",
            || async {
                let row = client
                    .query_one(
                        // The attempt's times are in the claim held in memory, or in the
                        // row once written there (extension/src/claims.rs).
                        "SELECT t.status::text, coalesce(c.timeout_at - c.picked_at,
                                                         r.timeout_at - r.picked_at)::text
                           FROM sluice.tasks t JOIN sluice.task_run r ON r.id = t.id
                           LEFT JOIN sluice._claims(ARRAY[t.id]) c ON true
                          WHERE t.id = $1",
                        &[&id],
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                match (
                    row.get::<_, String>(0).as_str(),
                    row.get::<_, Option<String>>(1),
                ) {
                    ("running", Some(timeout)) => Ok(timeout),
                    (status, _) => Err(format!("task {id} is {status}")),
                }
            },
        )
        .await;
        assert_eq!(timeout, expected, "task {id}'s execution timeout");
    }
    wait_succeeded(&client, &[long_id, short_id], 2, Duration::from_secs(15)).await;
}

/// Enqueues leave the scheduler asleep while no worker has a free slot (crate::wake's
/// ARRIVALS_IDLE). A task whose definition cancels on arrival is still judged at once: with
/// the only slot busy, a cancel_in_progress newcomer cancels the running task within seconds,
/// not at the next 30 s poll (the running task keeps the scheduler's 100 ms maintenance
/// ticks going).
#[tokio::test]
async fn a_cancelling_arrival_is_judged_at_once_while_no_slot_is_free() {
    let cluster = PrivateCluster::start("judging", true, &[("sluice.poll_interval", "30000")]);
    let client = connect(&cluster.dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(
        &client,
        "judged",
        ", concurrency_key => '$.k', max_runs => 1, concurrency_strategy => 'cancel_in_progress'",
    )
    .await;
    let _worker = WorkerProcess::spawn(WORKER, &cluster.dsn(), &task, 1);
    let old = enqueue_sql(&client, &task, json!({"k": "x", "sleep_ms": 60000})).await;
    wait_execution(&client, old, None).await;
    // The scheduler has seen its only slot taken by now; give it a moment to go to sleep.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let enqueued = Instant::now();
    let new = enqueue_sql(&client, &task, json!({"k": "x", "sleep_ms": 10})).await;
    wait_execution(&client, old, Some("cancelled")).await;
    let waited = enqueued.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "the newcomer woke the scheduler: the running task was cancelled {waited:?} after it \
         (a missed wake-up waits for the 30 s poll)"
    );
    assert_eq!(task_state(&client, old).await.0, "cancelled");
    wait_succeeded(&client, &[new], 1, Duration::from_secs(15)).await;
}

/// A task enqueued for later starts at its run_at, not at the next poll: its commit reports the
/// run_at to the scheduler, which keeps the next delayed task's time in memory instead of
/// reading it from the table every tick. The poll interval is 30 s, so a time that went
/// missing would show as a start up to 30 s late.
#[tokio::test]
async fn a_task_enqueued_for_later_starts_at_its_run_at() {
    let cluster = PrivateCluster::start("delayed", true, &[("sluice.poll_interval", "30000")]);
    let client = connect(&cluster.dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "later", "").await;
    let _worker = WorkerProcess::spawn(WORKER, &cluster.dsn(), &task, 2);
    // The worker registered, and the scheduler has had its ticks since (its memory of the next
    // delayed task says "none").
    wait_until(
        Duration::from_secs(10),
        "the worker to register",
        || async {
            let live: i64 = client
                .query_one(
                    "SELECT count(*) FROM sluice.worker WHERE stopped_at IS NULL",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if live == 1 {
                Ok(())
            } else {
                Err(format!("{live} live workers"))
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for delay_ms in [1500, 700] {
        // An immediate task first: its ticks (enqueue, completion) come within the 100 ms
        // after which the scheduler would reread the next delayed task anyway (maintenance),
        // so the delayed task's time has to come from its commit.
        let now_id = enqueue_sql(&client, &task, json!({})).await;
        let id: i64 = client
            .query_one(
                "SELECT sluice.enqueue($1, '{}', run_at => now() + $2 * interval '1 millisecond')",
                &[&task, &f64::from(delay_ms)],
            )
            .await
            .unwrap()
            .get(0);
        wait_finished(&client, &[now_id, id], Duration::from_secs(40)).await;
        let late_ms: f64 = client
            .query_one(
                "SELECT extract(epoch FROM picked_at - run_at)::float8 * 1000
                   FROM sluice.task_run WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            (0.0..500.0).contains(&late_ms),
            "a task due in {delay_ms} ms started {late_ms:.0} ms after its run_at"
        );
    }
}
