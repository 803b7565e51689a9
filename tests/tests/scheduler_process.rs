//! The scheduler process itself: terminated from SQL, Postgres starts it again and work goes on.

use serde_json::json;
use sluice_tests::*;
use std::time::Duration;

const WORKER: &str = env!("CARGO_BIN_EXE_test_worker");

async fn scheduler_pid(client: &tokio_postgres::Client) -> Result<i32, String> {
    client
        .query_opt(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'sluice scheduler'",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?
        .map(|r| r.get::<_, i32>(0))
        .ok_or_else(|| "no scheduler process".to_string())
}

#[tokio::test]
async fn a_terminated_scheduler_is_restarted_and_keeps_scheduling() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let before = wait_until(Duration::from_secs(10), "the scheduler", || {
        scheduler_pid(&client)
    })
    .await;
    client
        .execute("SELECT pg_terminate_backend($1)", &[&before])
        .await
        .expect("terminating the scheduler");
    let after = wait_until(
        Duration::from_secs(15),
        "a new scheduler process",
        || async {
            match scheduler_pid(&client).await {
                Ok(pid) if pid != before => Ok(pid),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_ne!(after, before);

    let task = unique("after_restart");
    client
        .execute("SELECT sluice.define_task($1)", &[&task])
        .await
        .unwrap();
    let _worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 1);
    let ids = enqueue_copies(&client, &task, json!({}), 3).await;
    wait_finished(&client, &ids, Duration::from_secs(20)).await;
    assert_eq!(status_summary(&client, &ids).await, "succeeded=3");
}
