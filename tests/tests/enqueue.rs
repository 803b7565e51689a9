//! Enqueueing from SQL and from Rust: tasks run on a real worker process and their status and
//! output show in sluice.tasks; an enqueue that rolls back never runs; idempotency keys.

use serde_json::json;
use sluice_client::{enqueue, enqueue_json, enqueue_many, EnqueueOptions, TaskDefinition};
use sluice_tests::*;
use std::sync::OnceLock;
use std::time::Duration;

const WORKER: &str = env!("CARGO_BIN_EXE_test_worker");

/// A typed task whose name is chosen at run time (each test has its own task name).
struct Probe;
static PROBE_NAME: OnceLock<String> = OnceLock::new();
impl TaskDefinition for Probe {
    const NAME: &'static str = "probe";
    type Input = serde_json::Value;
    type Output = serde_json::Value;
    fn name() -> &'static str {
        PROBE_NAME
            .get()
            .map(String::as_str)
            .expect("PROBE_NAME set by the test")
    }
}

#[tokio::test]
async fn tasks_enqueued_from_sql_and_from_rust_run_and_show_status_and_output() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "enqueue", "").await;
    PROBE_NAME.set(task.clone()).unwrap();

    // No worker serves the task yet, so everything stays queued where we can look at it.
    let from_sql = enqueue_sql(&client, &task, json!({"via": "sql"})).await;
    let none = EnqueueOptions::default();
    let typed = enqueue::<Probe>(&client, &json!({"via": "rust"}), &none)
        .await
        .expect("typed enqueue");
    let many = enqueue_many::<Probe>(
        &client,
        &[
            json!({"via": "many", "n": 1}),
            json!({"via": "many", "n": 2}),
        ],
    )
    .await
    .expect("typed enqueue_many");
    assert_eq!(
        many.len(),
        2,
        "enqueue_many returns one id per input: {many:?}"
    );
    let untyped = enqueue_json(&client, &task, r#"{"via": "json"}"#, &none)
        .await
        .expect("enqueue_json");
    let ids = [vec![from_sql, typed, untyped], many.clone()].concat();
    let expected_inputs = [
        (from_sql, json!({"via": "sql"})),
        (typed, json!({"via": "rust"})),
        (untyped, json!({"via": "json"})),
        (many[0], json!({"via": "many", "n": 1})),
        (many[1], json!({"via": "many", "n": 2})),
    ];
    for (id, input) in &expected_inputs {
        let r = client
            .query_one(
                "SELECT status::text, attempt, input, output FROM sluice.tasks WHERE id = $1",
                &[id],
            )
            .await
            .unwrap_or_else(|e| panic!("task {id} must be visible in sluice.tasks: {e}"));
        let seen = (
            r.get::<_, String>(0),
            r.get::<_, i32>(1),
            r.get::<_, serde_json::Value>(2),
        );
        assert_eq!(
            seen,
            ("queued".to_string(), 0, input.clone()),
            "task {id} before any worker"
        );
        assert_eq!(
            r.get::<_, Option<serde_json::Value>>(3),
            None,
            "task {id} has no output yet"
        );
    }

    let worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 2);
    wait_finished(&client, &ids, Duration::from_secs(20)).await;
    for (id, input) in &expected_inputs {
        let r = client
            .query_one(
                "SELECT status::text, attempt, input, output, worker_name,
                        started_at >= enqueued_at AND finished_at >= started_at
                   FROM sluice.tasks WHERE id = $1",
                &[id],
            )
            .await
            .unwrap();
        assert_eq!(
            r.get::<_, String>(0),
            "succeeded",
            "task {id}: {}",
            describe_tasks(&client, &[*id]).await
        );
        assert_eq!(
            r.get::<_, i32>(1),
            1,
            "task {id} should have needed one attempt"
        );
        assert_eq!(&r.get::<_, serde_json::Value>(2), input, "task {id} input");
        // The output is what the handler returned: the worker process's pid and the attempt.
        assert_eq!(
            r.get::<_, Option<serde_json::Value>>(3),
            Some(json!({"worker_pid": worker.pid(), "attempt": 1})),
            "task {id} output"
        );
        assert_eq!(
            r.get::<_, Option<String>>(4),
            Some(worker.name()),
            "task {id} worker"
        );
        assert!(
            r.get::<_, bool>(5),
            "task {id}: enqueued <= started <= finished must hold"
        );
        let runs = executions(&client, *id).await;
        assert_eq!(
            runs,
            vec![(1, worker.pid() as i32, Some("finished".to_string()))],
            "task {id} must have run exactly once, on the worker"
        );
    }
    let stats = client
        .query_one("SELECT queued, running, succeeded, failed FROM sluice.queue_stats WHERE task_name = $1", &[&task])
        .await
        .unwrap();
    let counts: Vec<i64> = (0..4).map(|i| stats.get(i)).collect();
    assert_eq!(
        counts,
        vec![0, 0, 5, 0],
        "queue_stats (queued, running, succeeded, failed)"
    );
}

#[tokio::test]
async fn a_rolled_back_enqueue_never_runs() {
    let mut client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "rollback", "").await;
    let worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 2);

    // From SQL, in a transaction that rolls back.
    let tx = client.transaction().await.unwrap();
    let from_sql: i64 = tx
        .query_one("SELECT sluice.enqueue($1, '{}')", &[&task])
        .await
        .unwrap()
        .get(0);
    tx.rollback().await.unwrap();
    // From Rust, with the caller's transaction as the client.
    let tx = client.transaction().await.unwrap();
    let from_rust = enqueue_json(&tx, &task, "{}", &EnqueueOptions::default())
        .await
        .expect("enqueue_json in a transaction");
    tx.rollback().await.unwrap();
    // The same, committed: this one must run (the transaction is really the enqueue's).
    let tx = client.transaction().await.unwrap();
    let committed = enqueue_json(&tx, &task, "{}", &EnqueueOptions::default())
        .await
        .expect("enqueue_json in a transaction");
    tx.commit().await.unwrap();

    // The committed task was enqueued after the rolled-back ones and has run, so the worker had
    // every chance to see them; wait a little longer for any late assignment anyway.
    wait_finished(&client, &[committed], Duration::from_secs(20)).await;
    assert_eq!(status_summary(&client, &[committed]).await, "succeeded=1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in [from_sql, from_rust] {
        let rows = client
            .query_one("SELECT count(*) FROM sluice.tasks WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get::<_, i64>(0);
        assert_eq!(
            rows, 0,
            "the rolled-back task {id} must not exist in sluice.tasks"
        );
        assert_eq!(
            executions(&client, id).await,
            vec![],
            "the worker must never have run task {id}"
        );
    }
    let all: i64 = client
        .query_one(
            "SELECT count(*) FROM sluice.tasks WHERE task_name = $1",
            &[&task],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(all, 1, "only the committed task exists for {task}");
    let ran: i64 = client
        .query_one(
            "SELECT count(*) FROM sluice_test.execution WHERE worker_pid = $1",
            &[&(worker.pid() as i32)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ran, 1, "the worker ran only the committed task");
}

#[tokio::test]
async fn an_idempotency_key_returns_the_unfinished_task_and_a_new_one_after_it_finished() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "idempotent", "").await;
    let key_options = EnqueueOptions {
        idempotency_key: Some("order-1".into()),
        ..Default::default()
    };

    // No worker yet: the first task stays queued while the key is reused.
    let first: i64 = client
        .query_one(
            "SELECT sluice.enqueue($1, '{\"n\": 1}', idempotency_key => 'order-1')",
            &[&task],
        )
        .await
        .unwrap()
        .get(0);
    let again_sql: i64 = client
        .query_one(
            "SELECT sluice.enqueue($1, '{\"n\": 2}', idempotency_key => 'order-1')",
            &[&task],
        )
        .await
        .unwrap()
        .get(0);
    let again_rust = enqueue_json(&client, &task, r#"{"n": 3}"#, &key_options)
        .await
        .unwrap();
    assert_eq!(
        (again_sql, again_rust),
        (first, first),
        "while task {first} is unfinished its key must return it"
    );
    let other_key = enqueue_json(
        &client,
        &task,
        r#"{"n": 4}"#,
        &EnqueueOptions {
            idempotency_key: Some("order-2".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_ne!(other_key, first, "another key is another task");
    let r = client
        .query_one(
            "SELECT count(*), (SELECT input FROM sluice.tasks WHERE id = $2)
               FROM sluice.tasks WHERE task_name = $1 AND idempotency_key = 'order-1'",
            &[&task, &first],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 1, "one task holds key order-1");
    assert_eq!(
        r.get::<_, serde_json::Value>(1),
        json!({"n": 1}),
        "the first input is kept"
    );

    let worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 2);
    wait_finished(&client, &[first, other_key], Duration::from_secs(20)).await;
    let after_finish = enqueue_json(&client, &task, r#"{"n": 5}"#, &key_options)
        .await
        .unwrap();
    assert_ne!(
        after_finish, first,
        "once task {first} finished, its key makes a new task"
    );
    wait_finished(&client, &[after_finish], Duration::from_secs(20)).await;
    assert_eq!(
        status_summary(&client, &[first, other_key, after_finish]).await,
        "succeeded=3"
    );
    for id in [first, other_key, after_finish] {
        assert_eq!(
            executions(&client, id).await,
            vec![(1, worker.pid() as i32, Some("finished".to_string()))],
            "task {id} runs exactly once"
        );
    }
}

#[tokio::test]
async fn concurrent_enqueues_with_one_idempotency_key_make_one_task() {
    let client = connect(&shared_dsn()).await;
    let task = define_unique_task(&client, "idempotent_race", "").await;
    // Eight sessions enqueue with the same key at once, each in a transaction held open a
    // moment so that they overlap.
    let mut sessions = Vec::new();
    for _ in 0..8 {
        sessions.push(connect(&shared_dsn()).await);
    }
    let racers = sessions.into_iter().map(|mut session| {
        let task = task.clone();
        tokio::spawn(async move {
            let tx = session.transaction().await?;
            let id: i64 = tx
                .query_one(
                    "SELECT sluice.enqueue($1, '{}', idempotency_key => 'same')",
                    &[&task],
                )
                .await?
                .get(0);
            tx.execute("SELECT pg_sleep(0.2)", &[]).await?;
            tx.commit().await?;
            Ok::<i64, tokio_postgres::Error>(id)
        })
    });
    let mut ids = Vec::new();
    for racer in racers.collect::<Vec<_>>() {
        ids.push(racer.await.unwrap().expect("a concurrent enqueue failed"));
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        1,
        "every session must get the same task, got {ids:?}"
    );
    let rows: i64 = client
        .query_one(
            "SELECT count(*) FROM sluice.tasks WHERE task_name = $1",
            &[&task],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "one task for one key");
}

/// The priority and schedule timeout a plain enqueue stores, read back from the task.
async fn enqueued_defaults(client: &tokio_postgres::Client, task: &str) -> (i32, String) {
    let id: i64 = client
        .query_one("SELECT sluice.enqueue($1)", &[&task])
        .await
        .expect("enqueue")
        .get(0);
    let row = client
        .query_one(
            "SELECT priority, (schedule_deadline - run_at)::text FROM sluice.task_run
              WHERE id = $1",
            &[&id],
        )
        .await
        .expect("the enqueued task");
    (row.get(0), row.get(1))
}

/// sluice.enqueue keeps each session's view of a definition in memory: every way of changing
/// one reaches every session at commit, a change rolled back leaves nothing behind, and a
/// session that changes it sees its own change at once.
#[tokio::test]
async fn every_definition_change_reaches_every_sessions_enqueue() {
    let dsn = shared_dsn();
    let (a, b) = (connect(&dsn).await, connect(&dsn).await);
    let task = define_unique_task(&a, "defcache", ", priority => 3").await;
    // Many definitions, as an install with a few hundred task names has.
    let fillers = unique("defcache_filler");
    b.execute(
        "INSERT INTO sluice.task_definition (name) SELECT $1 || g FROM generate_series(1, 300) g",
        &[&fillers],
    )
    .await
    .expect("filler definitions");
    assert_eq!(enqueued_defaults(&a, &task).await, (3, "00:05:00".into()));

    // define_task in another session.
    b.execute(
        "SELECT sluice.define_task($1, priority => 4, schedule_timeout => '1 day 00:00:00.000007')",
        &[&task],
    )
    .await
    .expect("define_task");
    assert_eq!(
        enqueued_defaults(&a, &task).await,
        (4, "1 day 00:00:00.000007".into()),
        "define_task in another session"
    );

    // A direct UPDATE of the table in another session.
    b.execute(
        "UPDATE sluice.task_definition SET priority = 6 WHERE name = $1",
        &[&task],
    )
    .await
    .expect("update");
    assert_eq!(enqueued_defaults(&a, &task).await.0, 6, "direct UPDATE");

    // A change this session makes applies to its own enqueues at once, and a rollback undoes it
    // for them too.
    a.batch_execute("BEGIN").await.unwrap();
    a.execute(
        "SELECT sluice.define_task($1, priority => 7, schedule_timeout => '20 minutes')",
        &[&task],
    )
    .await
    .expect("define_task in a transaction");
    assert_eq!(
        enqueued_defaults(&a, &task).await,
        (7, "00:20:00".into()),
        "own uncommitted change"
    );
    a.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        enqueued_defaults(&a, &task).await,
        (6, "1 day 00:00:00.000007".into()),
        "after the rollback"
    );

    // A definition that gains flow control takes the general path: the key is evaluated.
    b.execute(
        "SELECT sluice.define_task($1, priority => 6, concurrency_key => '$.k', max_runs => 1)",
        &[&task],
    )
    .await
    .expect("define_task with a key");
    let id: i64 = a
        .query_one("SELECT sluice.enqueue($1, '{\"k\": \"x\"}')", &[&task])
        .await
        .expect("enqueue with a key")
        .get(0);
    let key: Option<String> = a
        .query_one(
            "SELECT concurrency_key FROM sluice.task_run WHERE id = $1",
            &[&id],
        )
        .await
        .expect("the task")
        .get(0);
    assert_eq!(
        key.as_deref(),
        Some("x"),
        "a definition with flow control evaluates its key"
    );

    // A deleted definition: enqueue fails with 42704 in every session.
    b.execute(
        "DELETE FROM sluice.task_definition WHERE name = $1",
        &[&task],
    )
    .await
    .expect("delete");
    let err = a
        .query_one("SELECT sluice.enqueue($1)", &[&task])
        .await
        .expect_err("enqueue of a deleted definition");
    assert_eq!(
        err.code().map(|c| c.code()),
        Some("42704"),
        "unknown task: {err}"
    );
    b.execute(
        "DELETE FROM sluice.task_definition WHERE name LIKE $1 || '%'",
        &[&fillers],
    )
    .await
    .expect("filler cleanup");
}

/// The scheduler reads at most 5,000 arrivals a tick, resuming after the last task read, by
/// (run_at, id). Tasks enqueued in one transaction share their run_at (the transaction's
/// start), so a backlog of 12,000 of them is read in three ticks that each resume in the
/// middle of equal run_at values: every task must run once, none twice, and none wait for the
/// minute's sweep to be found (the bound is 40 s).
#[tokio::test]
async fn a_backlog_enqueued_in_one_transaction_is_read_across_ticks_exactly_once() {
    const TASKS: i32 = 12_000;
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "one_transaction", "").await;
    let ids = enqueue_copies(&client, &task, json!({}), TASKS).await;
    let run_ats: i64 = client
        .query_one(
            "SELECT count(DISTINCT run_at) FROM sluice.task_run WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(run_ats, 1, "one transaction, one run_at");
    let worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 100);
    wait_succeeded(&client, &ids, TASKS as i64, Duration::from_secs(40)).await;
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT task_id) FROM sluice_test.execution
              WHERE task_id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap();
    let (executions, tasks): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!((executions, tasks), (TASKS as i64, TASKS as i64));
    drop(worker);
}

/// A commit makes the scheduler read again from its transaction's start (a task committed
/// late may sort before tasks already read). The read resumes strictly after that point: when
/// it once let earlier rows through, 6,000 earlier queued tasks that no worker takes filled
/// every read (5,000 a tick) and the scheduler never reached the new task, ticking without
/// end (seen in `make test` after an aborted run left such a backlog).
#[tokio::test]
async fn a_backlog_nobody_serves_does_not_hide_a_new_task() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let unserved = define_unique_task(&client, "unserved_backlog", "").await;
    let backlog = enqueue_copies(&client, &unserved, json!({}), 6_000).await;
    // Time for the scheduler to read the backlog into memory (other tests' workers keep it
    // reading at once; without them, within the poll interval).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let served = define_unique_task(&client, "after_backlog", "").await;
    let worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &served, 4);
    let id = enqueue_sql(&client, &served, json!({})).await;
    wait_succeeded(&client, &[id], 1, Duration::from_secs(10)).await;
    drop(worker);
    client
        .execute(
            "DELETE FROM sluice.task_run WHERE id = ANY($1)",
            &[&backlog],
        )
        .await
        .unwrap();
}
