//! Retries and their backoff, non-retryable failures, execution timeouts and schedule timeouts,
//! observed in sluice.tasks and sluice.task_attempts with a real worker process.

use serde_json::json;
use sluice_tests::*;
use std::time::Duration;

const WORKER: &str = env!("CARGO_BIN_EXE_test_worker");

#[tokio::test]
async fn retries_wait_the_backoff_and_a_fatal_error_fails_at_once() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    // Backoff before retry k: min(2 s, 1.5^k) = 1.5 s, 2 s, 2 s.
    let task = define_unique_task(
        &client,
        "backoff",
        ", retries => 3, backoff_factor => 1.5, backoff_max => '2 seconds'",
    )
    .await;
    let _worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 3);
    let recovers = enqueue_sql(&client, &task, json!({"fail_attempts": 3})).await;
    let exhausts = enqueue_sql(&client, &task, json!({"fail_attempts": 99})).await;
    let fatal = enqueue_sql(&client, &task, json!({"fail_attempts": 3, "fatal": true})).await;
    wait_finished(
        &client,
        &[recovers, exhausts, fatal],
        Duration::from_secs(30),
    )
    .await;

    // Fails three times, succeeds on the last retry.
    let (status, attempt, _) = task_state(&client, recovers).await;
    assert_eq!(
        (status.as_str(), attempt),
        ("succeeded", 4),
        "{}",
        describe_tasks(&client, &[recovers]).await
    );
    let failures: Vec<(i32, String)> = attempts(&client, recovers)
        .await
        .into_iter()
        .map(|(a, o, _)| (a, o))
        .collect();
    assert_eq!(
        failures,
        [
            (1, "failed"),
            (2, "failed"),
            (3, "failed"),
            (4, "succeeded")
        ]
        .map(|(a, o)| (a, o.to_string()))
        .to_vec()
    );
    let gaps = client
        .query(
            "SELECT a.attempt, extract(epoch FROM b.started_at - a.finished_at)::float8
               FROM sluice.task_attempts a
               JOIN sluice.task_attempts b ON b.task_id = a.task_id AND b.attempt = a.attempt + 1
              WHERE a.task_id = $1 ORDER BY a.attempt",
            &[&recovers],
        )
        .await
        .unwrap();
    let gaps: Vec<(i32, f64)> = gaps.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(gaps.len(), 3, "three retries expected, saw gaps {gaps:?}");
    for (k, gap) in &gaps {
        let backoff = 1.5f64.powi(*k).min(2.0);
        assert!(
            *gap >= backoff - 0.01 && *gap <= backoff + 0.8,
            "retry after attempt {k} waited {gap:.3} s; the backoff is {backoff:.3} s (all gaps {gaps:?})"
        );
    }

    // Out of retries: failed after 1 + 3 attempts, every one recorded as failed.
    assert_eq!(
        task_state(&client, exhausts).await,
        (
            "failed".into(),
            4,
            Some("planned failure of attempt 4".into())
        )
    );
    let seen = attempts(&client, exhausts).await;
    let outcomes: Vec<(i32, &str)> = seen.iter().map(|(a, o, _)| (*a, o.as_str())).collect();
    assert_eq!(
        outcomes,
        vec![(1, "failed"), (2, "failed"), (3, "failed"), (4, "failed")],
        "{seen:?}"
    );

    // Non-retryable: failed on attempt 1 although three retries remained.
    assert_eq!(
        task_state(&client, fatal).await,
        (
            "failed".into(),
            1,
            Some("planned failure of attempt 1".into())
        )
    );
    let seen = attempts(&client, fatal).await;
    assert_eq!(
        seen,
        vec![(
            1,
            "failed".into(),
            Some("planned failure of attempt 1".into())
        )]
    );
    assert_eq!(
        executions(&client, fatal).await.len(),
        1,
        "a fatal error must not be retried"
    );
}

#[tokio::test]
async fn an_execution_timeout_cancels_the_handler_and_starts_a_new_attempt() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(
        &client,
        "exec_timeout",
        ", retries => 1, execution_timeout => '1 second', backoff_max => '0'",
    )
    .await;
    let worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 2);
    // Attempt 1 sleeps far past the timeout (unless cancelled); attempt 2 returns at once.
    let id = enqueue_sql(
        &client,
        &task,
        json!({"sleep_ms": 20000, "sleep_on_attempt": 1}),
    )
    .await;
    wait_finished(&client, &[id], Duration::from_secs(15)).await;

    let seen = attempts(&client, id).await;
    assert_eq!(seen.len(), 2, "two attempts expected: {seen:?}");
    assert_eq!(
        (seen[0].0, seen[0].1.as_str()),
        (1, "timed_out"),
        "{seen:?}"
    );
    let error = seen[0].2.clone().unwrap_or_default();
    assert!(
        error.contains("execution timeout"),
        "attempt 1's error should name the timeout: {error}"
    );
    assert_eq!(
        (seen[1].0, seen[1].1.as_str()),
        (2, "succeeded"),
        "{seen:?}"
    );
    let ran_for: f64 = client
        .query_one(
            "SELECT extract(epoch FROM finished_at - started_at)::float8
               FROM sluice.task_attempts WHERE task_id = $1 AND attempt = 1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        (1.0..2.5).contains(&ran_for),
        "attempt 1 should time out about 1 s after it started, ran {ran_for:.3} s"
    );
    // The handler of attempt 1 was told to stop through its cancellation signal, long before
    // its 20 s sleep would have ended.
    wait_execution(&client, id, Some("cancelled")).await;
    let runs = executions(&client, id).await;
    let pid = worker.pid() as i32;
    assert_eq!(
        runs,
        vec![
            (1, pid, Some("cancelled".into())),
            (2, pid, Some("finished".into()))
        ],
        "attempt 1 cancelled, attempt 2 finished"
    );
    let output: serde_json::Value = client
        .query_one("SELECT output FROM sluice.tasks WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(output, json!({"worker_pid": worker.pid(), "attempt": 2}));
}

#[tokio::test]
async fn a_schedule_timeout_cancels_a_task_no_worker_started() {
    let client = connect(&shared_dsn()).await;
    // No worker serves this task name.
    let task = define_unique_task(&client, "unserved", ", schedule_timeout => '1 second'").await;
    let id = enqueue_sql(&client, &task, json!({})).await;
    wait_finished(&client, &[id], Duration::from_secs(10)).await;
    let (status, attempt, reason) = task_state(&client, id).await;
    assert_eq!(
        (status.as_str(), attempt),
        ("cancelled", 0),
        "never started, so no attempt"
    );
    let reason = reason.unwrap_or_default();
    assert!(
        reason.starts_with("schedule timeout") && reason.contains("00:00:01"),
        "last_error should give the reason and the 1 s timeout: {reason}"
    );
    let waited: f64 = client
        .query_one("SELECT extract(epoch FROM finished_at - enqueued_at)::float8 FROM sluice.tasks WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert!(
        (1.0..3.0).contains(&waited),
        "cancelled {waited:.3} s after enqueue, expected about 1 s"
    );
}
