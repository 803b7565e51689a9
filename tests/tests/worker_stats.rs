//! `Worker::stats`: what an in-process worker has done, counted as Postgres records it.

use serde_json::json;
use sluice_client::{TaskDefinition, TaskError, Worker};
use sluice_tests::*;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

struct Counted;
static COUNTED_NAME: OnceLock<String> = OnceLock::new();
impl TaskDefinition for Counted {
    const NAME: &'static str = "counted";
    type Input = serde_json::Value;
    type Output = serde_json::Value;
    fn name() -> &'static str {
        COUNTED_NAME
            .get()
            .map(String::as_str)
            .expect("COUNTED_NAME set by the test")
    }
}

#[tokio::test]
async fn stats_count_started_completed_and_failed_attempts_as_postgres_records_them() {
    let client = connect(&shared_dsn()).await;
    let task = define_unique_task(&client, "stats", ", retries => 0").await;
    COUNTED_NAME.set(task.clone()).unwrap();
    let worker = Worker::builder(shared_dsn())
        .name(unique("stats"))
        .slots(4)
        .poll_interval(Duration::from_millis(200))
        .task::<Counted, _, _>(|_, input: serde_json::Value| async move {
            if input["ok"] == json!(true) {
                Ok(json!({ "echo": input }))
            } else {
                Err(TaskError::fatal("asked to fail"))
            }
        })
        .build()
        .unwrap();
    let stats = worker.stats();
    assert_eq!(
        (
            stats.started(),
            stats.completed(),
            stats.failed(),
            stats.last_ended_at()
        ),
        (0, 0, 0, None)
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run_until(async move {
        let _ = stop_rx.await;
    }));

    let before = Instant::now();
    let mut ids = enqueue_copies(&client, &task, json!({"ok": true}), 5).await;
    ids.extend(enqueue_copies(&client, &task, json!({"ok": false}), 2).await);
    wait_finished(&client, &ids, Duration::from_secs(30)).await;
    assert_eq!(status_summary(&client, &ids).await, "failed=2 succeeded=5");
    // The counts follow the commits the database already shows.
    wait_until(
        Duration::from_secs(5),
        "the stats to count 7 endings",
        || async {
            if stats.completed() + stats.failed() == 7 {
                Ok(())
            } else {
                Err(format!("{} + {}", stats.completed(), stats.failed()))
            }
        },
    )
    .await;
    assert_eq!(
        (stats.started(), stats.completed(), stats.failed()),
        (7, 5, 2)
    );
    let last = stats.last_ended_at().expect("an ending was counted");
    assert!(before < last && last <= Instant::now());

    let _ = stop_tx.send(());
    handle.await.unwrap().unwrap();
    assert_eq!(
        (stats.started(), stats.completed(), stats.failed()),
        (7, 5, 2),
        "nothing more counted at shutdown"
    );
}
