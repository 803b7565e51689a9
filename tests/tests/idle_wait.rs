//! An idle worker waits in Postgres (`CALL sluice.await_tasks`) for its next assignments and
//! gets them claimed in the answer: the scheduler sets the waiting backend's latch once the tick
//! that assigned to the worker has committed, instead of notifying the worker's channel, and
//! the wait holds no snapshot.

use serde_json::json;
use sluice_tests::*;
use std::time::{Duration, Instant};
use tokio_postgres::{AsyncMessage, NoTls};

const WORKER: &str = env!("CARGO_BIN_EXE_test_worker");

/// Runs `sql`, expects it to fail; returns (SQLSTATE, message).
async fn sql_error(client: &tokio_postgres::Client, sql: &str) -> (String, String) {
    match client.batch_execute(sql).await {
        Ok(()) => panic!("{sql} should have failed"),
        Err(e) => {
            let db = e
                .as_db_error()
                .unwrap_or_else(|| panic!("{sql}: not a database error: {e}"));
            (db.code().code().to_string(), db.message().to_string())
        }
    }
}

async fn register_raw(client: &tokio_postgres::Client, name: &str, task: &str) -> i64 {
    client
        .query_one(
            "SELECT sluice.register_worker($1, ARRAY[$2], 1)",
            &[&name, &task],
        )
        .await
        .unwrap()
        .get(0)
}

async fn backend_pid(session: &tokio_postgres::Client) -> i32 {
    session
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Waits until backend `pid` is in its `CALL sluice.await_tasks` (by pid: the tests of this
/// file run at once, each with its own waiting session); returns whether it holds a snapshot.
async fn wait_for_waiting(client: &tokio_postgres::Client, pid: i32) -> bool {
    wait_until(
        Duration::from_secs(10),
        "the CALL to be waiting",
        || async {
            let row = client
                .query_opt(
                    "SELECT backend_xmin IS NOT NULL FROM pg_stat_activity
                      WHERE pid = $1 AND state = 'active'
                        AND query LIKE 'CALL sluice.await_tasks%'",
                    &[&pid],
                )
                .await
                .map_err(|e| e.to_string())?;
            row.map(|r| r.get(0))
                .ok_or_else(|| "not waiting yet".to_string())
        },
    )
    .await
}

#[tokio::test]
async fn a_waiting_call_returns_when_its_worker_is_assigned_work_and_holds_no_snapshot() {
    let client = connect(&shared_dsn()).await;
    let task = define_unique_task(&client, "idle_wait", "").await;
    let session = connect(&shared_dsn()).await;
    let worker_id = register_raw(&session, "raw-waiter", &task).await;
    let pid = backend_pid(&session).await;

    // A 20 s wait that only the scheduler's latch can cut short.
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let row = session
            .query_one(
                "CALL sluice.await_tasks($1, 5, 20000, NULL, NULL, NULL, NULL, NULL)",
                &[&worker_id],
            )
            .await
            .expect("the wait itself succeeds");
        let waited = started.elapsed();
        let ids: Vec<i64> = row.get("task_ids");
        let attempts: Vec<i32> = row.get("attempts");
        let names: Vec<String> = row.get("task_names");
        let inputs: Vec<serde_json::Value> = row.get("inputs");
        // The session is handed back: dropping it here would end the worker's session, and
        // the scheduler's next maintenance would stop the worker as lost before the checks.
        (waited, ids, attempts, names, inputs, session)
    });
    // While it waits: the CALL is active and holds no snapshot (no xmin for vacuum to respect).
    let xmin_held = wait_for_waiting(&client, pid).await;
    assert!(
        !xmin_held,
        "the waiting CALL holds a snapshot (backend_xmin set)"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    let id = enqueue_sql(&client, &task, json!({"n": 7})).await;
    let (waited, ids, attempts, names, inputs, _session) = waiting.await.unwrap();
    assert_eq!(ids, vec![id], "the wait claims the task");
    assert_eq!(attempts, vec![1]);
    assert_eq!(names, vec![task.clone()]);
    assert_eq!(inputs, vec![json!({"n": 7})]);
    assert!(
        waited < Duration::from_secs(10),
        "the scheduler woke the waiting backend: it waited {waited:?} of its 20 s"
    );
    assert_eq!(task_state(&client, id).await.0, "running");
    // The claim's times are the claim's, not the start of the wait (now() is a transaction's
    // start: the claim runs in one started after the wait).
    let claimed_after_enqueue: bool = client
        .query_one(
            "SELECT started_at >= enqueued_at FROM sluice.tasks WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        claimed_after_enqueue,
        "task {id} was claimed before it was enqueued"
    );
}

#[tokio::test]
async fn a_cancelled_wait_leaves_no_waiter_behind_so_its_worker_is_notified_again() {
    let client = connect(&shared_dsn()).await;
    let task = define_unique_task(&client, "idle_wait_cancel", "").await;

    // The worker's session listens like the client does.
    let (session, mut connection) = tokio_postgres::connect(&shared_dsn(), NoTls).await.unwrap();
    let (tx, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let Ok(AsyncMessage::Notification(n)) = message {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    let worker_id = register_raw(&session, "raw-cancelled-waiter", &task).await;
    session
        .batch_execute(&format!("LISTEN sluice_worker_{worker_id}"))
        .await
        .unwrap();

    let cancel = session.cancel_token();
    let pid = backend_pid(&session).await;
    let waiting = tokio::spawn(async move {
        let outcome = session
            .execute(
                "CALL sluice.await_tasks($1, 1, 20000, NULL, NULL, NULL, NULL, NULL)",
                &[&worker_id],
            )
            .await;
        (session, outcome)
    });
    wait_for_waiting(&client, pid).await;
    cancel.cancel_query(NoTls).await.unwrap();
    let (session, outcome) = waiting.await.unwrap();
    let error = outcome.expect_err("the cancelled wait fails");
    assert_eq!(
        error.code().map(|c| c.code()),
        Some("57014"),
        "cancelled: {error}"
    );

    // Had the cancelled wait stayed on the waiting list, the scheduler would wake its latch
    // instead of notifying: the notification is what shows it was taken off.
    let id = enqueue_sql(&client, &task, json!({})).await;
    let payload = tokio::time::timeout(Duration::from_secs(15), notifications.recv())
        .await
        .expect("a notification within 15 s")
        .expect("the connection is open");
    assert!(payload.contains("assigned"), "notified: {payload}");
    assert_eq!(fetch_one(&session, worker_id).await, (id, 1));
}

#[tokio::test]
async fn await_tasks_refuses_bad_calls_with_specific_sqlstates() {
    let client = connect(&shared_dsn()).await;
    let (code, message) = sql_error(
        &client,
        "BEGIN; CALL sluice.await_tasks(1, 1, 10, NULL, NULL, NULL, NULL, NULL); COMMIT",
    )
    .await;
    assert_eq!(code, "2D000", "{message}");
    assert!(message.contains("transaction block"), "{message}");
    client.batch_execute("ROLLBACK").await.unwrap();

    let (code, message) = sql_error(
        &client,
        "CALL sluice.await_tasks(1, 1, -5, NULL, NULL, NULL, NULL, NULL)",
    )
    .await;
    assert_eq!(code, "22023", "{message}");
    assert!(message.contains("-5"), "names the bad value: {message}");

    let (code, message) = sql_error(
        &client,
        "CALL sluice.await_tasks(NULL, 1, 10, NULL, NULL, NULL, NULL, NULL)",
    )
    .await;
    assert_eq!(code, "22004", "{message}");

    // A wait with nothing posted ends at its timeout, capped below statement_timeout.
    client
        .batch_execute("SET statement_timeout = 300")
        .await
        .unwrap();
    let started = Instant::now();
    client
        .batch_execute("CALL sluice.await_tasks(-1, 1, 60000, NULL, NULL, NULL, NULL, NULL)")
        .await
        .expect("a wait capped below statement_timeout is not cancelled");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(5),
        "waited {waited:?}"
    );
}

#[tokio::test]
async fn an_idle_client_worker_waits_in_postgres_and_picks_up_work() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "idle_client", "").await;
    let worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 2);
    let name = worker.name();
    // The idle worker's connection sits in the wait, not idle on LISTEN.
    wait_until(
        Duration::from_secs(20),
        "the idle worker to wait in sluice.await_tasks",
        || async {
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity a
                      WHERE a.query LIKE 'CALL sluice.await_tasks%'
                        AND a.application_name = $1",
                    &[&format!("sluice worker {name}")],
                )
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            if n > 0 {
                Ok(())
            } else {
                Err("not waiting".to_string())
            }
        },
    )
    .await;
    let ids = enqueue_copies(&client, &task, json!({}), 20).await;
    wait_succeeded(&client, &ids, 20, Duration::from_secs(30)).await;
    for id in ids {
        assert_eq!(executions(&client, id).await.len(), 1, "task {id} ran once");
    }
    // Stopped while idle, it ends its wait (sluice.end_wait) and stops at once.
    let mut worker = worker;
    let stopping = Instant::now();
    let status = worker.terminate();
    assert!(status.success(), "the worker stops cleanly: {status:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "stopping took {:?}",
        stopping.elapsed()
    );
}

#[tokio::test]
async fn end_wait_ends_a_wait_without_an_error_and_without_claiming() {
    let client = connect(&shared_dsn()).await;
    let task = define_unique_task(&client, "idle_wait_end", "").await;
    let session = connect(&shared_dsn()).await;
    let worker_id = register_raw(&session, "raw-ended-waiter", &task).await;
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let row = session
            .query_one(
                "CALL sluice.await_tasks($1, 5, 20000, NULL, NULL, NULL, NULL, NULL)",
                &[&worker_id],
            )
            .await;
        (
            started.elapsed(),
            row.map(|r| r.get::<_, Vec<i64>>("task_ids")),
        )
    });
    let ended: bool = wait_until(Duration::from_secs(10), "a wait to end", || async {
        let ended: bool = client
            .query_one("SELECT sluice.end_wait($1)", &[&worker_id])
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        if ended {
            Ok(true)
        } else {
            Err("not waiting yet".to_string())
        }
    })
    .await;
    assert!(ended);
    let (waited, ids) = waiting.await.unwrap();
    assert_eq!(ids.expect("an ended wait is no error"), Vec::<i64>::new());
    assert!(
        waited < Duration::from_secs(10),
        "waited {waited:?} of 20 s"
    );
    let again: bool = client
        .query_one("SELECT sluice.end_wait($1)", &[&worker_id])
        .await
        .unwrap()
        .get(0);
    assert!(!again, "nothing waits any more");
}

#[tokio::test]
async fn a_wait_whose_client_went_away_ends_within_seconds() {
    let client = connect(&shared_dsn()).await;
    let (session, connection) = tokio_postgres::connect(&shared_dsn(), NoTls).await.unwrap();
    let driver = tokio::spawn(connection);
    let pid = backend_pid(&session).await;
    let waiting = tokio::spawn(async move {
        let _ = session
            .query_one(
                "CALL sluice.await_tasks(-7, 1, 600000, NULL, NULL, NULL, NULL, NULL)",
                &[],
            )
            .await;
    });
    wait_for_waiting(&client, pid).await;
    // The client goes away: its socket closes with the connection's driver.
    driver.abort();
    waiting.abort();
    let gone_after = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "the backend of the vanished client to end (its wait was 10 minutes)",
        || async {
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                    &[&pid],
                )
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            if n == 0 {
                Ok(())
            } else {
                Err(format!("backend {pid} still there"))
            }
        },
    )
    .await;
    assert!(gone_after.elapsed() < Duration::from_secs(10));
}

/// A claim reads the posted rows by hand (crate `posted_read`), not through SQL: an input large
/// enough to be stored out of line (TOAST) must still arrive whole, through the wait's arrays and
/// through `sluice.fetch_tasks`'s rows, with the claim's timeout from the definition.
#[tokio::test]
async fn a_large_input_stored_out_of_line_arrives_whole_through_await_and_fetch() {
    let client = connect(&shared_dsn()).await;
    let task = define_unique_task(
        &client,
        "idle_wait_large",
        ", execution_timeout => '7 seconds'",
    )
    .await;
    // 300 kB of digits that compress to about 220 kB: stored out of line.
    let digits: String = (0..60_000u64)
        .map(|i| format!("{:05}", (i * 2_654_435_761) % 100_000))
        .collect();
    let input = json!({ "digits": digits });

    // Through the wait.
    let session = connect(&shared_dsn()).await;
    let worker_id = register_raw(&session, "raw-large-waiter", &task).await;
    let pid = backend_pid(&session).await;
    let waiting = tokio::spawn(async move {
        let row = session
            .query_one(
                "CALL sluice.await_tasks($1, 5, 20000, NULL, NULL, NULL, NULL, NULL)",
                &[&worker_id],
            )
            .await
            .expect("the wait succeeds");
        let ids: Vec<i64> = row.get("task_ids");
        let inputs: Vec<serde_json::Value> = row.get("inputs");
        let timeouts: Vec<std::time::SystemTime> = row.get("timeouts_at");
        (ids, inputs, timeouts, session)
    });
    wait_for_waiting(&client, pid).await;
    let id = enqueue_sql(&client, &task, input.clone()).await;
    let stored_out_of_line: bool = client
        .query_one(
            "SELECT pg_column_size(input) > current_setting('block_size')::int FROM sluice.task_run WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        stored_out_of_line,
        "the input must be larger than a page, so stored out of line"
    );
    let (ids, inputs, timeouts, _session) = waiting.await.unwrap();
    assert_eq!(ids, vec![id]);
    assert!(inputs[0] == input, "the waited-for input arrived changed");
    let (started, timeout_at): (std::time::SystemTime, std::time::SystemTime) = {
        let r = client
            .query_one(
                "SELECT started_at, started_at + interval '7 seconds' FROM sluice.tasks WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(started < timeouts[0]);
    assert_eq!(
        timeouts[0], timeout_at,
        "the claim's timeout is its start plus 7 s"
    );

    // Through a fetch.
    let fetcher = connect(&shared_dsn()).await;
    let fetcher_id = register_raw(&fetcher, "raw-large-fetcher", &task).await;
    let id = enqueue_sql(&client, &task, input.clone()).await;
    let fetched: serde_json::Value = wait_until(
        Duration::from_secs(15),
        "the large task fetched",
        || async {
            let rows = fetcher
                .query(
                    "SELECT task_id, input FROM sluice.fetch_tasks($1)",
                    &[&fetcher_id],
                )
                .await
                .map_err(|e| e.to_string())?;
            match rows.first() {
                Some(r) if r.get::<_, i64>(0) == id => Ok(r.get(1)),
                Some(r) => Err(format!("fetched task {} instead", r.get::<_, i64>(0))),
                None => Err("nothing assigned yet".into()),
            }
        },
    )
    .await;
    assert!(fetched == input, "the fetched input arrived changed");
    assert_eq!(task_state(&client, id).await.0, "running");
}
