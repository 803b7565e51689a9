//! A poison row: tasks whose definition was deleted while they were queued or running. They end
//! failed with a clear last_error, and the same scheduler process keeps running other work.

use serde_json::json;
use sluice_tests::*;
use std::time::Duration;

const WORKER: &str = env!("CARGO_BIN_EXE_test_worker");

#[tokio::test]
async fn tasks_whose_definition_was_deleted_fail_and_the_scheduler_carries_on() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let scheduler = scheduler_pid(&client)
        .await
        .expect("the scheduler must be running");
    let doomed = define_unique_task(&client, "doomed", ", retries => 3, backoff_max => '0'").await;
    // One slot: while the first task runs, the others wait in the queue.
    let _doomed_worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &doomed, 1);
    // Runs 1.5 s, then fails (retryably: with its definition it would be retried).
    let running = enqueue_sql(
        &client,
        &doomed,
        json!({"sleep_ms": 1500, "fail_attempts": 1}),
    )
    .await;
    wait_execution(&client, running, None).await;
    let queued = enqueue_copies(&client, &doomed, json!({}), 3).await;
    client
        .execute(
            "DELETE FROM sluice.task_definition WHERE name = $1",
            &[&doomed],
        )
        .await
        .unwrap();

    let all = [vec![running], queued.clone()].concat();
    wait_finished(&client, &all, Duration::from_secs(20)).await;
    // The running attempt's failure cannot be retried without a definition: failed at once.
    assert_eq!(
        task_state(&client, running).await,
        (
            "failed".into(),
            1,
            Some(format!(
                "planned failure of attempt 1; task definition \"{doomed}\" no longer exists"
            ))
        ),
        "the running task: {}",
        describe_tasks(&client, &[running]).await
    );
    let expected_error = format!("task definition \"{doomed}\" no longer exists");
    for id in &queued {
        assert_eq!(
            task_state(&client, *id).await,
            ("failed".into(), 0, Some(expected_error.clone())),
            "queued task {id} must fail without running"
        );
        assert_eq!(
            executions(&client, *id).await,
            vec![],
            "queued task {id} must never run"
        );
    }

    // Other work still flows, through the same scheduler process.
    let healthy = define_unique_task(&client, "healthy", "").await;
    let healthy_worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &healthy, 2);
    let after = enqueue_copies(&client, &healthy, json!({}), 5).await;
    wait_finished(&client, &after, Duration::from_secs(20)).await;
    assert_eq!(status_summary(&client, &after).await, "succeeded=5");
    let outputs: i64 = client
        .query_one(
            "SELECT count(*) FROM sluice.tasks WHERE id = ANY($1) AND (output->>'worker_pid')::int = $2",
            &[&after, &(healthy_worker.pid() as i32)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        outputs, 5,
        "the healthy worker completed every healthy task"
    );
    assert_eq!(
        scheduler_pid(&client).await,
        Some(scheduler),
        "the scheduler must still be the same process (it did not crash and restart)"
    );
}

/// The schema's promise (no foreign key to task_definition "on purpose: ... the scheduler fails
/// those tasks with a clear error instead of blocking") must hold when no worker serves the
/// deleted task: no worker can register for an unknown task any more, so nothing else would
/// ever take these tasks.
#[tokio::test]
async fn queued_tasks_whose_definition_was_deleted_fail_even_with_no_worker_serving_them() {
    let client = connect(&shared_dsn()).await;
    let doomed = define_unique_task(&client, "unserved_doomed", "").await;
    let queued = enqueue_copies(&client, &doomed, json!({}), 2).await;
    client
        .execute(
            "DELETE FROM sluice.task_definition WHERE name = $1",
            &[&doomed],
        )
        .await
        .unwrap();
    // The scheduler ticks at least every second (sluice.poll_interval); the default schedule
    // timeout (5 minutes) must not be what ends them.
    wait_finished(&client, &queued, Duration::from_secs(10)).await;
    let expected_error = format!("task definition \"{doomed}\" no longer exists");
    for id in &queued {
        assert_eq!(
            task_state(&client, *id).await,
            ("failed".into(), 0, Some(expected_error.clone())),
            "task {id}"
        );
    }
}
