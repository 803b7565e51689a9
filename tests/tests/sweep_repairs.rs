//! The scheduler's periodic sweep (every 60 s) repairs what its memory missed. task_run has no
//! index of running tasks by worker, so a running attempt the scheduler did not assign itself
//! (set by hand here; in life, a claim from a board an earlier scheduler posted) is found only
//! by the sweep, which loads it; its worker being gone, the attempt is then requeued as lost.

use serde_json::json;
use sluice_tests::*;
use std::time::Duration;

#[tokio::test]
async fn the_sweep_finds_a_running_attempt_memory_lacks_and_requeues_it_when_its_worker_is_gone() {
    let cluster = PrivateCluster::start("sweep_running", true, &[]);
    let client = connect(&cluster.dsn()).await;
    create_test_tables(&client).await;
    // No worker serves this task: it stays queued (in the scheduler's memory) until set running.
    let task = define_unique_task(&client, "swept", "").await;
    let id = enqueue_sql(&client, &task, json!({})).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    client
        .execute(
            "UPDATE sluice.task_run SET status = 'running', attempt = 1, worker_id = -1,
                    assigned_at = now(), picked_at = now(), timeout_at = now() + interval '1 hour'
              WHERE id = $1 AND status = 'queued'",
            &[&id],
        )
        .await
        .unwrap();
    let (status, lost): (String, i32) = wait_until(
        Duration::from_secs(100),
        "the sweep to requeue the attempt of worker -1",
        || async {
            let row = client
                .query_one(
                    "SELECT status::text, lost_attempts FROM sluice.task_run WHERE id = $1",
                    &[&id],
                )
                .await
                .map_err(|e| e.to_string())?;
            match (row.get::<_, String>(0), row.get::<_, i32>(1)) {
                (s, n) if s == "running" => Err(format!("task {id} still running ({n} lost)")),
                done => Ok(done),
            }
        },
    )
    .await;
    assert_eq!(
        (status.as_str(), lost),
        ("queued", 1),
        "requeued as one lost attempt"
    );
    let error: String = client
        .query_one(
            "SELECT error FROM sluice.task_attempts WHERE task_id = $1 AND attempt = 1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        error.contains("worker -1"),
        "the attempt names its worker: {error}"
    );
}
