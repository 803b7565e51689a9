//! sluice.cancel() through the client: a running task's handler sees its cancellation signal
//! and the task ends cancelled; a queued one never runs; finished and unknown tasks.

use serde_json::json;
use sluice_client::cancel;
use sluice_tests::*;
use std::time::Duration;

const WORKER: &str = env!("CARGO_BIN_EXE_test_worker");

#[tokio::test]
async fn cancelling_tasks_stops_the_running_handler_and_drops_the_queued_one() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "cancel", ", retries => 3").await;
    let worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 1);
    let running = enqueue_sql(&client, &task, json!({"sleep_ms": 20000})).await;
    wait_execution(&client, running, None).await;
    // The only slot is busy, so this one waits in the queue.
    let queued = enqueue_sql(&client, &task, json!({})).await;
    assert_eq!(task_state(&client, queued).await.0, "queued");

    assert!(
        cancel(&client, queued).await.expect("cancel(queued)"),
        "a queued task can be cancelled"
    );
    assert!(
        cancel(&client, running).await.expect("cancel(running)"),
        "a running task can be cancelled"
    );
    // The handler hears of it through its cancellation signal, long before its 20 s sleep ends.
    wait_execution(&client, running, Some("cancelled")).await;

    for id in [running, queued] {
        let (status, _, reason) = task_state(&client, id).await;
        assert_eq!(status, "cancelled", "task {id}");
        assert_eq!(
            reason.as_deref(),
            Some("cancelled by sluice.cancel()"),
            "task {id}"
        );
        assert!(
            !cancel(&client, id).await.unwrap(),
            "cancelling the cancelled task {id} again returns false"
        );
    }
    assert_eq!(
        executions(&client, running).await,
        vec![(1, worker.pid() as i32, Some("cancelled".into()))],
        "the running task ran once and was cancelled, not retried"
    );
    assert_eq!(
        executions(&client, queued).await,
        vec![],
        "the queued task never ran"
    );
    let outcomes: Vec<(i32, String)> = attempts(&client, running)
        .await
        .into_iter()
        .map(|(a, o, _)| (a, o))
        .collect();
    assert_eq!(outcomes, vec![(1, "cancelled".to_string())]);

    // The slot is free again: new work runs on the same worker.
    let next = enqueue_sql(&client, &task, json!({})).await;
    wait_finished(&client, &[next], Duration::from_secs(20)).await;
    assert_eq!(status_summary(&client, &[next]).await, "succeeded=1");
    assert!(
        !cancel(&client, next).await.unwrap(),
        "a finished task cannot be cancelled"
    );

    let missing = cancel(&client, i64::MAX)
        .await
        .expect_err("cancelling an unknown id must fail");
    assert_eq!(missing.code().map(|c| c.code()), Some("P0002"), "{missing}");
    assert!(
        missing.to_string().contains(&i64::MAX.to_string()),
        "the message should name the id: {missing}"
    );
}
