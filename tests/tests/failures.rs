//! Crashes: worker processes killed mid-task, a crash between a handler's write and its commit,
//! Postgres restarted in immediate mode mid-run. Plus clear errors for bad input and for a
//! library that is not preloaded.

use serde_json::json;
use sluice_client::{define_task, enqueue_json, EnqueueOptions, ErrorKind, TaskOptions, Worker};
use sluice_tests::*;
use std::time::Duration;
use tokio_postgres::Client;

const WORKER: &str = env!("CARGO_BIN_EXE_test_worker");

async fn executions(client: &Client, task_id: i64) -> Vec<(i32, i32)> {
    client
        .query(
            "SELECT attempt, worker_pid FROM sluice_test.execution WHERE task_id = $1 ORDER BY started_at",
            &[&task_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Attempts whose transactional write committed for this task.
async fn effects(client: &Client, task_id: i64) -> Vec<i32> {
    client
        .query("SELECT attempt FROM sluice_test.effect WHERE task_id = $1", &[&task_id])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn wait_started(client: &Client, task_id: i64) {
    wait_for(Duration::from_secs(15), "the handler to start", || async {
        let n = executions(client, task_id).await.len();
        if n > 0 { Ok(()) } else { Err("no execution yet".to_string()) }
    })
    .await
}

#[tokio::test]
async fn a_task_on_a_killed_worker_runs_again_elsewhere_and_completes_once() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = unique("killed");
    client.execute("SELECT sluice.define_task($1)", &[&task]).await.unwrap();
    let mut doomed = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 1);
    let id: i64 = client
        .query_one("SELECT sluice.enqueue($1, '{\"sleep_ms\": 2000, \"sleep_on_attempt\": 1}')", &[&task])
        .await
        .unwrap()
        .get(0);
    wait_started(&client, id).await;
    let doomed_pid = doomed.pid() as i32;
    doomed.kill();

    let survivor = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 1);
    wait_finished(&client, &[id], Duration::from_secs(20)).await;
    let r = client
        .query_one("SELECT status::text, attempt, output, lost_attempts, failures FROM sluice.tasks WHERE id = $1", &[&id])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "succeeded");
    assert_eq!(r.get::<_, i32>(1), 2);
    assert_eq!(r.get::<_, serde_json::Value>(2)["worker_pid"], json!(survivor.pid()));
    assert_eq!((r.get::<_, i32>(3), r.get::<_, i32>(4)), (1, 0), "a lost attempt is not a failure");
    assert_eq!(
        executions(&client, id).await,
        vec![(1, doomed_pid), (2, survivor.pid() as i32)],
        "one execution on the killed worker, one on the survivor"
    );
}

#[tokio::test]
async fn a_crash_between_the_write_and_the_commit_leaves_nothing_and_the_retry_writes_once() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = unique("effect");
    client.execute("SELECT sluice.define_task($1)", &[&task]).await.unwrap();
    let mut doomed = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 1);
    let id: i64 = client
        .query_one(
            "SELECT sluice.enqueue($1, '{\"effect\": true, \"pause_before_commit_ms\": 10000}')",
            &[&task],
        )
        .await
        .unwrap()
        .get(0);
    // Wait until the handler's write is done (its row is locked by the open transaction).
    wait_for(Duration::from_secs(15), "the handler's uncommitted write", || async {
        let writing: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE query LIKE 'INSERT INTO sluice_test.effect%' AND state = 'idle in transaction'
                    AND datname = current_database()",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        if writing > 0 { Ok(()) } else { Err("no open transaction with the write yet".to_string()) }
    })
    .await;
    doomed.kill();

    assert!(effects(&client, id).await.is_empty(), "the uncommitted write must not be visible");
    let status: String = client
        .query_one("SELECT status::text FROM sluice.tasks WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_ne!(status, "succeeded", "the completion must not have committed");

    let _survivor = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 1);
    wait_finished(&client, &[id], Duration::from_secs(20)).await;
    assert_eq!(effects(&client, id).await, vec![2], "exactly one write, by the retry");
    assert_eq!(status_summary(&client, &[id]).await, "succeeded=1");
}

#[tokio::test]
async fn postgres_restarted_in_immediate_mode_mid_run_loses_nothing_and_completes_nothing_twice() {
    let cluster = PrivateCluster::start("restart", 28841, true, "");
    let client = connect(&cluster.dsn()).await;
    create_test_tables(&client).await;
    let task = unique("restart");
    client.execute("SELECT sluice.define_task($1, retries => 3)", &[&task]).await.unwrap();
    let _workers: Vec<WorkerProcess> =
        (0..2).map(|_| WorkerProcess::spawn(WORKER, &cluster.dsn(), &task, 4)).collect();
    // Each completion commits together with one effect row, so effect rows count completions.
    let ids: Vec<i64> = client
        .query(
            "SELECT sluice.enqueue_many($1, array_fill('{\"effect\": true, \"sleep_ms\": 20}'::jsonb, ARRAY[300]))",
            &[&task],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    wait_for(Duration::from_secs(30), "a third of the tasks to finish", || async {
        let done: i64 = client
            .query_one("SELECT count(*) FROM sluice.tasks WHERE id = ANY($1) AND status = 'succeeded'", &[&ids])
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        if done >= 100 { Ok(()) } else { Err(format!("{done} succeeded")) }
    })
    .await;
    drop(client);
    cluster.restart_immediate();

    let client = connect(&cluster.dsn()).await;
    wait_finished(&client, &ids, Duration::from_secs(60)).await;
    assert_eq!(status_summary(&client, &ids).await, "succeeded=300", "log:\n{}", cluster.log());
    let per_task = client
        .query(
            "SELECT t.id, count(e.task_id) FROM unnest($1::bigint[]) t(id)
               LEFT JOIN sluice_test.effect e ON e.task_id = t.id
              GROUP BY t.id HAVING count(e.task_id) <> 1",
            &[&ids],
        )
        .await
        .unwrap();
    let wrong: Vec<(i64, i64)> = per_task.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert!(wrong.is_empty(), "tasks not completed exactly once (id, completions): {wrong:?}");
    // The workers reconnected by themselves: new registrations after the restart served work.
    let re_registered: i64 = client
        .query_one("SELECT count(*) FROM sluice.worker WHERE stopped_at IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(re_registered, 2, "both worker processes must have registered again");
}

#[tokio::test]
async fn bad_input_gets_a_specific_sqlstate_and_names_the_bad_value() {
    let client = connect(&shared_dsn()).await;
    let task = unique("bad_input");
    define_task(&client, &task, &TaskOptions::default()).await.unwrap();
    let opts = EnqueueOptions::default();

    let unknown = enqueue_json(&client, "no_such_task_anywhere", "{}", &opts).await.unwrap_err();
    assert_eq!(unknown.code().map(|c| c.code()), Some("42704"), "{unknown}");
    assert!(unknown.to_string().contains("no_such_task_anywhere"), "{unknown}");

    let negative = define_task(&client, &task, &TaskOptions { retries: Some(-2), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(negative.code().map(|c| c.code()), Some("22023"), "{negative}");
    assert!(negative.to_string().contains("got -2"), "{negative}");

    let malformed = enqueue_json(&client, &task, "{\"a\": tru", &opts).await.unwrap_err();
    assert_eq!(malformed.code().map(|c| c.code()), Some("22P02"), "{malformed}");
    assert!(malformed.to_string().contains("json"), "{malformed}");

    let nul = enqueue_json(&client, &task, r#"{"name": "a\u0000b"}"#, &opts).await.unwrap_err();
    assert_eq!(nul.code().map(|c| c.code()), Some("22P05"), "{nul}");
    assert!(nul.to_string().contains("\\u0000"), "{nul}");

    let zero_slots = client
        .query_one("SELECT sluice.register_worker('w', ARRAY[$1], 0)", &[&task])
        .await
        .unwrap_err();
    let db = zero_slots.as_db_error().expect("a database error");
    assert_eq!(db.code().code(), "22023");
    assert!(db.message().contains("got 0"), "{}", db.message());
    let client_side = Worker::builder(shared_dsn())
        .slots(0)
        .task::<Noop, _, _>(|_, _: serde_json::Value| async { Ok(serde_json::Value::Null) })
        .build();
    assert!(
        matches!(&client_side, Err(e) if e.kind() == ErrorKind::Config && e.to_string().contains('0')),
        "the client must refuse 0 slots before connecting"
    );
    // Nothing was enqueued by the failed calls.
    let queued: i64 = client
        .query_one("SELECT count(*) FROM sluice.task_run WHERE task_name = $1", &[&task])
        .await
        .unwrap()
        .get(0);
    assert_eq!(queued, 0);
}

struct Noop;
impl sluice_client::TaskDefinition for Noop {
    const NAME: &'static str = "noop";
    type Input = serde_json::Value;
    type Output = serde_json::Value;
}

#[tokio::test]
async fn the_api_refuses_clearly_when_the_library_is_not_preloaded_or_the_database_is_not_served() {
    let cluster = PrivateCluster::start("no_preload", 28842, false, "");
    let client = connect(&cluster.dsn()).await;
    let err = client.execute("SELECT sluice.define_task('t')", &[]).await.unwrap_err();
    let db = err.as_db_error().expect("a database error");
    assert_eq!(db.code().code(), "55000");
    assert!(db.message().contains("shared_preload_libraries"), "{}", db.message());
    drop(client);
    drop(cluster);

    // The shared cluster's scheduler serves one database; another database is refused.
    let admin = connect(&shared_dsn()).await;
    let other = unique("sluice_other");
    admin.execute(&format!("CREATE DATABASE {other}"), &[]).await.unwrap();
    let other_dsn = shared_dsn().replace("dbname=sluice", &format!("dbname={other}"));
    let other_client = connect(&other_dsn).await;
    other_client.execute("CREATE EXTENSION sluice", &[]).await.unwrap();
    let result = other_client.execute("SELECT sluice.define_task('t')", &[]).await;
    drop(other_client);
    let _ = admin.execute(&format!("DROP DATABASE {other} WITH (FORCE)"), &[]).await;
    let err = result.unwrap_err();
    let db = err.as_db_error().expect("a database error");
    assert_eq!(db.code().code(), "55000");
    assert!(db.message().contains("serves database \"sluice\""), "{}", db.message());
}
