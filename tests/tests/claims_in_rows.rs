//! `sluice.claims_in_memory`: claims beyond it are written to the task's row, as before claims
//! were held in shared memory, and 0 writes every claim to its row. Both kinds of claim run,
//! show and complete alike. On a private cluster, so that the setting is nobody else's.

use serde_json::json;
use sluice_tests::*;
use std::time::Duration;

const WORKER: &str = env!("CARGO_BIN_EXE_test_worker");

/// (claims held in memory, rows claimed as running, tasks running in sluice.tasks)
async fn claim_split(client: &tokio_postgres::Client, ids: &[i64]) -> (i64, i64, i64) {
    let r = client
        .query_one(
            "SELECT (SELECT count(*) FROM sluice._claims($1)),
                    (SELECT count(*) FROM sluice.task_run WHERE id = ANY($1) AND status = 'running'),
                    (SELECT count(*) FROM sluice.tasks WHERE id = ANY($1) AND status = 'running')",
            &[&ids],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

async fn wait_all_started(client: &tokio_postgres::Client, ids: &[i64]) {
    let ids = ids.to_vec();
    wait_until(
        Duration::from_secs(20),
        "every handler to start",
        || async {
            let started: i64 = client
            .query_one(
                "SELECT count(DISTINCT task_id) FROM sluice_test.execution WHERE task_id = ANY($1)",
                &[&ids],
            )
            .await
            .map_err(|e| e.to_string())?
            .get(0);
            if started as usize == ids.len() {
                Ok(())
            } else {
                Err(format!("{started} of {} started", ids.len()))
            }
        },
    )
    .await
}

async fn assert_each_ran_once_and_succeeded(client: &tokio_postgres::Client, ids: &[i64]) {
    wait_finished(client, ids, Duration::from_secs(30)).await;
    assert_eq!(
        status_summary(client, ids).await,
        format!("succeeded={}", ids.len())
    );
    for id in ids {
        assert_eq!(executions(client, *id).await.len(), 1, "task {id} ran once");
        assert_eq!(task_state(client, *id).await.1, 1, "task {id}'s attempt");
    }
}

#[tokio::test]
async fn claims_beyond_the_setting_go_to_the_row_and_zero_sends_them_all() {
    let cluster = PrivateCluster::start("claims_rows", true, &[("sluice.claims_in_memory", "2")]);
    let client = connect(&cluster.dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "claims_rows", "").await;
    let _worker = WorkerProcess::spawn(WORKER, &cluster.dsn(), &task, 6);

    // Six running at once, two of them claimed in memory and four in their rows.
    let first = enqueue_copies(&client, &task, json!({"sleep_ms": 2000}), 6).await;
    wait_all_started(&client, &first).await;
    assert_eq!(
        claim_split(&client, &first).await,
        (2, 4, 6),
        "(in memory, in rows, running) with sluice.claims_in_memory = 2: {}",
        describe_tasks(&client, &first).await
    );
    assert_each_ran_once_and_succeeded(&client, &first).await;

    // 0: every claim in its row.
    // Two statements: ALTER SYSTEM refuses to run in the implicit transaction of a batch.
    client
        .batch_execute("ALTER SYSTEM SET sluice.claims_in_memory = 0")
        .await
        .unwrap();
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "the setting to apply", || async {
        let value: String = connect(&cluster.dsn())
            .await
            .query_one("SHOW sluice.claims_in_memory", &[])
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        if value == "0" {
            Ok(())
        } else {
            Err(value)
        }
    })
    .await;
    // The worker's session reloads the file at its next statement, before its next fetch.
    let second = enqueue_copies(&client, &task, json!({"sleep_ms": 2000}), 6).await;
    wait_all_started(&client, &second).await;
    assert_eq!(
        claim_split(&client, &second).await,
        (0, 6, 6),
        "(in memory, in rows, running) with sluice.claims_in_memory = 0: {}",
        describe_tasks(&client, &second).await
    );
    assert_each_ran_once_and_succeeded(&client, &second).await;
}
