//! Tests against a real Sluice cluster. They run only when SLUICE_TEST_DSN is set, e.g.
//! `SLUICE_TEST_DSN='host=127.0.0.1 port=28815 user=postgres dbname=sluice'`.
//!
//! Task names carry this process' id (see `unique_name`), so concurrent runs and leftovers of
//! earlier runs never hand each other tasks.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sluice_client::tokio_postgres::{self, Client, NoTls};
use sluice_client::{
    cancel, define_task, enqueue, enqueue_json, enqueue_many, set_rate_limit, set_worker_labels,
    Concurrency, ConcurrencyStrategy, DesiredLabel, EnqueueOptions, ErrorKind, PreparedEnqueue,
    RateLimitUse, TaskContext, TaskDefinition, TaskError, TaskOptions, Units, Worker,
};
use tokio::sync::{mpsc, oneshot};

fn dsn() -> Option<String> {
    let dsn = std::env::var("SLUICE_TEST_DSN")
        .ok()
        .filter(|d| !d.is_empty());
    if dsn.is_none() {
        println!("skipping: SLUICE_TEST_DSN is not set");
    }
    dsn
}

fn unique_name(cell: &'static OnceLock<String>, base: &str) -> &'static str {
    cell.get_or_init(|| format!("client_live_{base}_{}", std::process::id()))
}

/// Declares a task type whose name is unique to this test process.
macro_rules! live_task {
    ($type:ident, $base:literal, $input:ty, $output:ty) => {
        struct $type;
        impl TaskDefinition for $type {
            const NAME: &'static str = $base;
            type Input = $input;
            type Output = $output;
            fn name() -> &'static str {
                static NAME: OnceLock<String> = OnceLock::new();
                unique_name(&NAME, $base)
            }
        }
    };
}

async fn connect(dsn: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls)
        .await
        .expect("connecting to SLUICE_TEST_DSN");
    tokio::spawn(connection);
    client
}

struct TaskRow {
    status: String,
    attempt: i32,
    output: Option<Value>,
    last_error: Option<String>,
}

async fn task_row(client: &Client, id: i64) -> TaskRow {
    let row = client
        .query_one(
            "SELECT status::text, attempt, output, last_error FROM sluice.tasks WHERE id = $1",
            &[&id],
        )
        .await
        .expect("reading sluice.tasks");
    TaskRow {
        status: row.get(0),
        attempt: row.get(1),
        output: row.get(2),
        last_error: row.get(3),
    }
}

/// Waits until the task is no longer queued or running.
async fn task_exists(client: &Client, id: i64) -> bool {
    !client
        .query("SELECT 1 FROM sluice.tasks WHERE id = $1", &[&id])
        .await
        .expect("reading sluice.tasks")
        .is_empty()
}

async fn wait_finished(client: &Client, id: i64) -> TaskRow {
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let row = task_row(client, id).await;
        if row.status != "queued" && row.status != "running" {
            return row;
        }
        assert!(
            Instant::now() < give_up,
            "task {id} still {} after 30 s",
            row.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A worker running in the background until the returned sender fires (or is dropped).
fn start_worker(
    builder: sluice_client::WorkerBuilder,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), sluice_client::Error>>,
) {
    let worker = builder
        .poll_interval(Duration::from_millis(200))
        .heartbeat_interval(Duration::from_millis(500))
        .shutdown_timeout(Duration::from_secs(5))
        .build()
        .expect("valid worker configuration");
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run_until(async move {
        let _ = stop_rx.await;
    }));
    (stop_tx, handle)
}

async fn stop_worker(
    stop: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), sluice_client::Error>>,
) {
    let _ = stop.send(());
    let result = tokio::time::timeout(Duration::from_secs(15), handle)
        .await
        .expect("worker stops within 15 s")
        .expect("worker task did not panic");
    result.expect("worker shut down cleanly");
}

#[derive(Serialize, Deserialize)]
struct AddInput {
    a: i64,
    b: i64,
}
#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Sum {
    sum: i64,
}
live_task!(Add, "add", AddInput, Sum);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_runs_typed_tasks_and_deregisters() {
    let Some(dsn) = dsn() else { return };
    let client = connect(&dsn).await;
    define_task(&client, Add::name(), &TaskOptions::default())
        .await
        .expect("define_task");

    let worker_name = format!("live-add-{}", std::process::id());
    let (stop, handle) = start_worker(
        Worker::builder(dsn.clone())
            .name(worker_name.clone())
            .slots(2)
            .task::<Add, _, _>(|ctx: TaskContext, input: AddInput| async move {
                assert_eq!(ctx.task_name(), Add::name());
                Ok(Sum {
                    sum: input.a + input.b,
                })
            }),
    );

    let single = enqueue::<Add>(
        &client,
        &AddInput { a: 2, b: 40 },
        &EnqueueOptions::default(),
    )
    .await
    .expect("enqueue");
    let inputs: Vec<AddInput> = (0..20).map(|i| AddInput { a: i, b: i }).collect();
    let many = enqueue_many::<Add>(&client, &inputs)
        .await
        .expect("enqueue_many");
    assert_eq!(many.len(), 20);

    let row = wait_finished(&client, single).await;
    assert_eq!(row.status, "succeeded", "last_error: {:?}", row.last_error);
    assert_eq!(row.attempt, 1);
    assert_eq!(row.output, Some(json!({"sum": 42})));
    for (i, id) in many.iter().enumerate() {
        let row = wait_finished(&client, *id).await;
        assert_eq!(row.status, "succeeded");
        assert_eq!(row.output, Some(json!({"sum": 2 * i as i64})));
    }

    stop_worker(stop, handle).await;
    let stopped = client
        .query(
            "SELECT stop_reason FROM sluice.workers WHERE name = $1",
            &[&worker_name],
        )
        .await
        .expect("reading sluice.workers");
    assert_eq!(stopped.len(), 1);
    assert_eq!(
        stopped[0].get::<_, Option<String>>(0).as_deref(),
        Some("deregistered")
    );
}

live_task!(Flaky, "flaky", Value, String);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_and_errors_fail_attempts() {
    let Some(dsn) = dsn() else { return };
    let client = connect(&dsn).await;
    let options = TaskOptions {
        retries: Some(2),
        backoff_factor: Some(1.0),
        backoff_max: Some(Duration::ZERO),
        ..TaskOptions::default()
    };
    define_task(&client, Flaky::name(), &options)
        .await
        .expect("define_task");

    let (stop, handle) = start_worker(Worker::builder(dsn.clone()).slots(4).task::<Flaky, _, _>(
        |ctx: TaskContext, input: Value| async move {
            match input["mode"].as_str() {
                Some("panic_once") if ctx.attempt() == 1 => panic!("boom in attempt 1"),
                Some("fatal") => Err(TaskError::fatal("no point retrying")),
                Some("always_retryable") => Err(TaskError::retryable("still failing")),
                _ => Ok(format!("done in attempt {}", ctx.attempt())),
            }
        },
    ));

    let enqueue_mode = |mode: &'static str| {
        let client = &client;
        async move {
            enqueue::<Flaky>(client, &json!({ "mode": mode }), &EnqueueOptions::default())
                .await
                .expect("enqueue")
        }
    };
    let panicked = enqueue_mode("panic_once").await;
    let fatal = enqueue_mode("fatal").await;
    let exhausted = enqueue_mode("always_retryable").await;

    let row = wait_finished(&client, panicked).await;
    assert_eq!(row.status, "succeeded", "last_error: {:?}", row.last_error);
    assert_eq!(row.attempt, 2);
    assert_eq!(row.output, Some(json!("done in attempt 2")));
    let first_error: Option<String> = client
        .query_one(
            "SELECT error FROM sluice.task_attempts WHERE task_id = $1 AND attempt = 1",
            &[&panicked],
        )
        .await
        .expect("reading sluice.task_attempts")
        .get(0);
    let first_error = first_error.unwrap_or_default();
    assert!(first_error.contains("boom in attempt 1"), "{first_error}");

    let row = wait_finished(&client, fatal).await;
    assert_eq!(row.status, "failed");
    assert_eq!(row.attempt, 1, "a fatal error is not retried");
    assert_eq!(row.last_error.as_deref(), Some("no point retrying"));

    let row = wait_finished(&client, exhausted).await;
    assert_eq!(row.status, "failed");
    assert_eq!(row.attempt, 3, "one attempt plus two retries");
    assert_eq!(row.last_error.as_deref(), Some("still failing"));

    stop_worker(stop, handle).await;
}

#[derive(Serialize, Deserialize)]
struct ChargeInput {
    cents: i64,
    /// Wait for the test to cancel the task before committing.
    wait_for_cancel: bool,
}
live_task!(Charge, "charge", ChargeInput, i64);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_commits_with_completion_or_not_at_all() {
    let Some(dsn) = dsn() else { return };
    let client = connect(&dsn).await;
    define_task(&client, Charge::name(), &TaskOptions::default())
        .await
        .expect("define_task");
    client
        .batch_execute(
            // Keyed by task name too: task ids start over when the extension is recreated.
            "CREATE TABLE IF NOT EXISTS public.sluice_client_live_charge (
                 task_name text NOT NULL, task_id bigint NOT NULL, cents bigint NOT NULL,
                 PRIMARY KEY (task_name, task_id))",
        )
        .await
        .expect("creating the charges table");

    // (task id, outcome of commit_with) from the handler; and the go-ahead after cancelling.
    let (report_tx, mut report_rx) = mpsc::unbounded_channel::<(i64, Option<ErrorKind>)>();
    let (inserted_tx, mut inserted_rx) = mpsc::unbounded_channel::<i64>();
    let (cancelled_tx, cancelled_rx) = tokio::sync::watch::channel(false);

    let (stop, handle) = start_worker(Worker::builder(dsn.clone()).slots(2).task::<Charge, _, _>(
        move |ctx: TaskContext, input: ChargeInput| {
            let report_tx = report_tx.clone();
            let inserted_tx = inserted_tx.clone();
            let mut cancelled_rx = cancelled_rx.clone();
            async move {
                let tx = ctx.transaction().await?;
                tx.client()
                    .execute(
                        "INSERT INTO public.sluice_client_live_charge (task_name, task_id, cents)
                         VALUES ($1, $2, $3)",
                        &[&Charge::name(), &ctx.task_id(), &input.cents],
                    )
                    .await?;
                if input.wait_for_cancel {
                    let _ = inserted_tx.send(ctx.task_id());
                    let _ = cancelled_rx.wait_for(|c| *c).await;
                }
                let committed = tx.commit_with(&input.cents).await;
                let _ = report_tx.send((ctx.task_id(), committed.as_ref().err().map(|e| e.kind())));
                committed?;
                Ok(input.cents)
            }
        },
    ));

    let charged = enqueue::<Charge>(
        &client,
        &ChargeInput {
            cents: 1250,
            wait_for_cancel: false,
        },
        &EnqueueOptions::default(),
    )
    .await
    .expect("enqueue");
    let row = wait_finished(&client, charged).await;
    assert_eq!(row.status, "succeeded", "last_error: {:?}", row.last_error);
    assert_eq!(row.output, Some(json!(1250)));
    let report = tokio::time::timeout(Duration::from_secs(10), report_rx.recv())
        .await
        .expect("handler reports");
    assert_eq!(report, Some((charged, None)));
    let cents: i64 = client
        .query_one(
            "SELECT cents FROM public.sluice_client_live_charge WHERE task_name = $2 AND task_id = $1",
            &[&charged, &Charge::name()],
        )
        .await
        .expect("the charge row was committed")
        .get(0);
    assert_eq!(cents, 1250);

    // Fencing: the attempt is cancelled while the handler holds its transaction open.
    let fenced = enqueue::<Charge>(
        &client,
        &ChargeInput {
            cents: 99,
            wait_for_cancel: true,
        },
        &EnqueueOptions::default(),
    )
    .await
    .expect("enqueue");
    let inserted = tokio::time::timeout(Duration::from_secs(10), inserted_rx.recv())
        .await
        .expect("handler inserted its row");
    assert_eq!(inserted, Some(fenced));
    assert!(cancel(&client, fenced).await.expect("cancel"));
    cancelled_tx.send_replace(true);
    let report = tokio::time::timeout(Duration::from_secs(10), report_rx.recv())
        .await
        .expect("handler reports");
    assert_eq!(report, Some((fenced, Some(ErrorKind::Fenced))));
    let rows = client
        .query(
            "SELECT 1 FROM public.sluice_client_live_charge WHERE task_name = $2 AND task_id = $1",
            &[&fenced, &Charge::name()],
        )
        .await
        .expect("reading charges");
    assert!(rows.is_empty(), "the fenced transaction was rolled back");
    assert_eq!(task_row(&client, fenced).await.status, "cancelled");

    stop_worker(stop, handle).await;
}

live_task!(Sleepy, "sleepy", Value, String);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_fires_the_handler_signal() {
    let Some(dsn) = dsn() else { return };
    let client = connect(&dsn).await;
    define_task(&client, Sleepy::name(), &TaskOptions::default())
        .await
        .expect("define_task");
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<i64>();
    let (observed_tx, mut observed_rx) = mpsc::unbounded_channel::<i64>();
    let (stop, handle) = start_worker(Worker::builder(dsn.clone()).slots(1).task::<Sleepy, _, _>(
        move |ctx: TaskContext, _: Value| {
            let started_tx = started_tx.clone();
            let observed_tx = observed_tx.clone();
            async move {
                let _ = started_tx.send(ctx.task_id());
                tokio::select! {
                    _ = ctx.cancelled() => {
                        assert!(ctx.is_cancelled());
                        let _ = observed_tx.send(ctx.task_id());
                        Err(TaskError::retryable("stopped"))
                    }
                    _ = tokio::time::sleep(Duration::from_secs(30)) => Ok("slept".to_owned()),
                }
            }
        },
    ));

    let id = enqueue::<Sleepy>(&client, &json!({}), &EnqueueOptions::default())
        .await
        .expect("enqueue");
    let started = tokio::time::timeout(Duration::from_secs(10), started_rx.recv())
        .await
        .expect("handler started");
    assert_eq!(started, Some(id));
    assert!(cancel(&client, id).await.expect("cancel"));
    let observed = tokio::time::timeout(Duration::from_secs(10), observed_rx.recv())
        .await
        .expect("handler saw the cancellation");
    assert_eq!(observed, Some(id));
    assert_eq!(task_row(&client, id).await.status, "cancelled");
    assert!(!cancel(&client, id).await.expect("cancel again"));

    stop_worker(stop, handle).await;
}

live_task!(Undefined, "never_defined", Value, Value);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_an_undefined_task_fails_with_42704() {
    let Some(dsn) = dsn() else { return };
    let worker = Worker::builder(dsn)
        .task::<Undefined, _, _>(|_: TaskContext, input: Value| async move { Ok(input) })
        .build()
        .expect("valid configuration");
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        worker.run_until(std::future::pending()),
    )
    .await
    .expect("run_until gives up on a registration Postgres rejects");
    let error = result.expect_err("the task was never defined");
    assert_eq!(error.kind(), ErrorKind::Db);
    assert_eq!(error.code().map(|c| c.code()), Some("42704"));
    assert!(error.to_string().contains("SQLSTATE 42704"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_errors_carry_sqlstates() {
    let Some(dsn) = dsn() else { return };
    let mut client = connect(&dsn).await;
    define_task(&client, Add::name(), &TaskOptions::default())
        .await
        .expect("define_task");

    let malformed = enqueue_json(
        &client,
        Add::name(),
        "{not json",
        &EnqueueOptions::default(),
    )
    .await
    .expect_err("malformed JSON");
    assert_eq!(malformed.code().map(|c| c.code()), Some("22P02"));

    let unknown = enqueue_json(
        &client,
        "no_such_task_anywhere",
        "{}",
        &EnqueueOptions::default(),
    )
    .await
    .expect_err("unknown task");
    assert_eq!(unknown.code().map(|c| c.code()), Some("42704"));

    let missing = cancel(&client, i64::MAX).await.expect_err("no such task");
    assert_eq!(missing.code().map(|c| c.code()), Some("P0002"));

    let bad_retries = TaskOptions {
        retries: Some(-1),
        ..TaskOptions::default()
    };
    let invalid = define_task(&client, Add::name(), &bad_retries)
        .await
        .expect_err("negative retries");
    assert_eq!(invalid.code().map(|c| c.code()), Some("22023"));

    // An enqueue in the caller's transaction disappears with its rollback, and an idempotency
    // key returns the unfinished run that holds it.
    let key = format!("live-key-{}", std::process::id());
    let options = EnqueueOptions {
        run_at: Some(std::time::SystemTime::now() + Duration::from_secs(3600)),
        idempotency_key: Some(key),
        ..EnqueueOptions::default()
    };
    let transaction = client.transaction().await.expect("begin");
    let rolled_back = enqueue::<Add>(&transaction, &AddInput { a: 1, b: 1 }, &options)
        .await
        .expect("enqueue in a transaction");
    transaction.rollback().await.expect("rollback");
    assert!(!task_exists(&client, rolled_back).await);

    let first = enqueue::<Add>(&client, &AddInput { a: 1, b: 1 }, &options)
        .await
        .expect("enqueue");
    let second = enqueue_json(&client, Add::name(), r#"{"a": 5, "b": 5}"#, &options)
        .await
        .expect("enqueue with the same key");
    assert_eq!(first, second);
    assert!(cancel(&client, first).await.expect("cancel"));
}

live_task!(PreparedAdd, "prepared_add", AddInput, Sum);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_enqueue_follows_its_connection_and_transactions() {
    let Some(dsn) = dsn() else { return };
    let mut client = connect(&dsn).await;
    define_task(&client, PreparedAdd::name(), &TaskOptions::default())
        .await
        .expect("define_task");
    let prepared = PreparedEnqueue::prepare(&client).await.expect("prepare");
    let later = EnqueueOptions {
        run_at: Some(std::time::SystemTime::now() + Duration::from_secs(3600)),
        priority: Some(7),
        ..EnqueueOptions::default()
    };

    // Many calls through one statement: each is its own task, with the options applied.
    let mut ids = Vec::new();
    for a in 0..20 {
        ids.push(
            prepared
                .enqueue::<PreparedAdd>(&client, &AddInput { a, b: 1 }, &later)
                .await
                .expect("prepared enqueue"),
        );
    }
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT input), min(priority), max(priority),
                    bool_and(run_at > now() + interval '50 minutes'), bool_and(status = 'queued')
               FROM sluice.tasks WHERE id = ANY($1) AND task_name = $2",
            &[&ids, &PreparedAdd::name()],
        )
        .await
        .expect("reading sluice.tasks");
    assert_eq!(row.get::<_, i64>(0), 20);
    assert_eq!(row.get::<_, i64>(1), 20);
    assert_eq!((row.get::<_, i32>(2), row.get::<_, i32>(3)), (7, 7));
    assert!(row.get::<_, bool>(4));
    assert!(row.get::<_, bool>(5));

    // Through a transaction of the same connection: the enqueue goes with its rollback.
    let transaction = client.transaction().await.expect("begin");
    let rolled_back = prepared
        .enqueue::<PreparedAdd>(&transaction, &AddInput { a: 100, b: 1 }, &later)
        .await
        .expect("prepared enqueue in a transaction");
    transaction.rollback().await.expect("rollback");
    assert!(!task_exists(&client, rolled_back).await);

    // Bad input gets the enqueue's own SQLSTATE: an unknown task name is 42704.
    live_task!(Undefined, "prepared_undefined", AddInput, Sum);
    let unknown = prepared
        .enqueue::<Undefined>(&client, &AddInput { a: 1, b: 1 }, &later)
        .await
        .expect_err("an undefined task");
    assert_eq!(unknown.code().map(|c| c.code()), Some("42704"));

    // On another connection the statement does not exist there: 26000, nothing enqueued.
    let other = connect(&dsn).await;
    let elsewhere = prepared
        .enqueue::<PreparedAdd>(&other, &AddInput { a: 200, b: 1 }, &later)
        .await
        .expect_err("a statement prepared on another connection");
    assert_eq!(elsewhere.code().map(|c| c.code()), Some("26000"));
    let count: i64 = client
        .query_one(
            "SELECT count(*) FROM sluice.tasks WHERE task_name = $1",
            &[&PreparedAdd::name()],
        )
        .await
        .expect("counting")
        .get(0);
    assert_eq!(count, 20);
    for id in ids {
        assert!(cancel(&client, id).await.expect("cancel"));
    }
}

live_task!(Throttled, "throttled", Value, Value);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_control_options_are_stored_and_validated() {
    let Some(dsn) = dsn() else { return };
    let client = connect(&dsn).await;
    let declared = format!("client_live_rl_{}", std::process::id());
    set_rate_limit(&client, &declared, 100, Duration::from_secs(60))
        .await
        .expect("set_rate_limit");
    let row = client
        .query_one(
            "SELECT max_units, per = interval '1 minute' FROM sluice.rate_limit WHERE key = $1",
            &[&declared],
        )
        .await
        .expect("reading sluice.rate_limit");
    assert_eq!(row.get::<_, i32>(0), 100);
    assert!(row.get::<_, bool>(1));

    let options = TaskOptions {
        concurrency: Some(
            Concurrency::new("$.user_id", 2).with_strategy(ConcurrencyStrategy::CancelNewest),
        ),
        rate_limits: vec![
            RateLimitUse::declared(&declared, Units::Path("$.cost".into())),
            RateLimitUse::dynamic("$.tenant", Units::Fixed(2), 5, Duration::from_secs(30)),
        ],
        desired_labels: vec![
            DesiredLabel::required("region", "eu"),
            DesiredLabel::preferred("gpu", 1, 10),
        ],
        ..TaskOptions::default()
    };
    define_task(&client, Throttled::name(), &options)
        .await
        .expect("define_task with flow control");
    let row = client
        .query_one(
            "SELECT concurrency_key::text, max_runs, concurrency_strategy, rate_limits, \
                    desired_labels \
               FROM sluice.task_definition WHERE name = $1",
            &[&Throttled::name()],
        )
        .await
        .expect("reading sluice.task_definition");
    assert_eq!(row.get::<_, String>(0), r#"$."user_id""#);
    assert_eq!(row.get::<_, i32>(1), 2);
    assert_eq!(row.get::<_, String>(2), "cancel_newest");
    assert_eq!(
        row.get::<_, Value>(3),
        json!([
            {"key": declared, "units_path": "$.cost"},
            {"key_path": "$.tenant", "units": 2, "limit": 5, "per": "30.000000 seconds"},
        ])
    );
    assert_eq!(
        row.get::<_, Value>(4),
        json!([
            {"label": "region", "value": "eu", "required": true, "weight": 1},
            {"label": "gpu", "value": 1, "required": false, "weight": 10},
        ])
    );

    // An enqueue evaluates the keys against the input; the run is left queued for an hour and
    // cancelled, since no worker serves this task.
    let id = enqueue::<Throttled>(
        &client,
        &json!({"user_id": 7, "tenant": "acme", "cost": 3}),
        &EnqueueOptions {
            run_at: Some(std::time::SystemTime::now() + Duration::from_secs(3600)),
            ..EnqueueOptions::default()
        },
    )
    .await
    .expect("enqueue with flow control");
    let row = client
        .query_one(
            "SELECT concurrency_key, rate_limit_units FROM sluice.task_run WHERE id = $1",
            &[&id],
        )
        .await
        .expect("reading sluice.task_run");
    assert_eq!(row.get::<_, String>(0), "7");
    assert_eq!(row.get::<_, Vec<i32>>(1), vec![3, 2]);
    assert!(cancel(&client, id).await.expect("cancel"));

    // Defaults again: redefining without flow control clears it.
    define_task(&client, Throttled::name(), &TaskOptions::default())
        .await
        .expect("define_task without flow control");
    let row = client
        .query_one(
            "SELECT concurrency_key IS NULL, rate_limits, desired_labels \
               FROM sluice.task_definition WHERE name = $1",
            &[&Throttled::name()],
        )
        .await
        .expect("reading sluice.task_definition");
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, Value>(1), json!([]));
    assert_eq!(row.get::<_, Value>(2), json!([]));

    // Bad options: the client error carries Postgres' SQLSTATE.
    let zero_runs = TaskOptions {
        concurrency: Some(Concurrency::new("$.user_id", 0)),
        ..TaskOptions::default()
    };
    let error = define_task(&client, Throttled::name(), &zero_runs)
        .await
        .expect_err("max_runs 0");
    assert_eq!(error.kind(), ErrorKind::Db);
    assert_eq!(error.code().map(|c| c.code()), Some("22023"));
    assert!(error.to_string().contains("max_runs"), "{error}");

    let undeclared = TaskOptions {
        rate_limits: vec![RateLimitUse::declared(
            format!("{declared}_never_declared"),
            Units::default(),
        )],
        ..TaskOptions::default()
    };
    let error = define_task(&client, Throttled::name(), &undeclared)
        .await
        .expect_err("undeclared rate limit");
    assert_eq!(error.code().map(|c| c.code()), Some("42704"));

    let bad_window = TaskOptions {
        rate_limits: vec![RateLimitUse::dynamic(
            "$.tenant",
            Units::default(),
            5,
            Duration::ZERO,
        )],
        ..TaskOptions::default()
    };
    let error = define_task(&client, Throttled::name(), &bad_window)
        .await
        .expect_err("zero rate-limit window");
    assert_eq!(error.code().map(|c| c.code()), Some("22023"));

    let bad_weight = TaskOptions {
        desired_labels: vec![DesiredLabel::preferred("gpu", 1, 0)],
        ..TaskOptions::default()
    };
    let error = define_task(&client, Throttled::name(), &bad_weight)
        .await
        .expect_err("zero label weight");
    assert_eq!(error.code().map(|c| c.code()), Some("22023"));

    let error = set_rate_limit(&client, &declared, 0, Duration::from_secs(1))
        .await
        .expect_err("max_units 0");
    assert_eq!(error.code().map(|c| c.code()), Some("22023"));
    assert!(error.to_string().contains(&declared), "{error}");
}

live_task!(Labelled, "labelled", Value, Value);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_worker_labels_replaces_a_live_workers_labels() {
    let Some(dsn) = dsn() else { return };
    let client = connect(&dsn).await;
    define_task(&client, Labelled::name(), &TaskOptions::default())
        .await
        .expect("define_task");
    // A worker registered by this session: alive as long as the session is.
    let worker_id: i64 = client
        .query_one(
            "SELECT sluice.register_worker($1, ARRAY[$2], 1)",
            &[
                &format!("client_live_labels_{}", std::process::id()),
                &Labelled::name(),
            ],
        )
        .await
        .expect("register_worker")
        .get(0);

    let mut labels = serde_json::Map::new();
    labels.insert("region".into(), json!("eu"));
    labels.insert("gpu".into(), json!(2));
    let result = set_worker_labels(&client, worker_id, labels).await;
    let stored = client
        .query_one(
            "SELECT labels FROM sluice.worker WHERE id = $1",
            &[&worker_id],
        )
        .await
        .expect("reading sluice.worker")
        .get::<_, Value>(0);

    let mut bad = serde_json::Map::new();
    bad.insert("region".into(), json!(["not", "a", "scalar"]));
    let rejected = set_worker_labels(&client, worker_id, bad).await;

    client
        .execute("SELECT sluice.deregister_worker($1)", &[&worker_id])
        .await
        .expect("deregister_worker");
    result.expect("set_worker_labels");
    assert_eq!(stored, json!({"region": "eu", "gpu": 2}));
    let error = rejected.expect_err("a non-scalar label");
    assert_eq!(error.code().map(|c| c.code()), Some("22023"));

    let stopped = set_worker_labels(&client, worker_id, serde_json::Map::new())
        .await
        .expect_err("a deregistered worker");
    assert_eq!(stopped.kind(), ErrorKind::Db);
    assert_eq!(stopped.code().map(|c| c.code()), Some("SL001"));
    assert!(
        stopped.to_string().contains(&format!("worker {worker_id}")),
        "{stopped}"
    );
}

live_task!(Echo, "echo", Value, Value);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_reconnects_and_registers_again_after_its_session_is_killed() {
    let Some(dsn) = dsn() else { return };
    let client = connect(&dsn).await;
    define_task(&client, Echo::name(), &TaskOptions::default())
        .await
        .expect("define_task");
    let worker_name = format!("live-reconnect-{}", std::process::id());
    let (stop, handle) = start_worker(
        Worker::builder(dsn.clone())
            .name(worker_name.clone())
            .task::<Echo, _, _>(|_: TaskContext, input: Value| async move { Ok(input) }),
    );

    let first = enqueue::<Echo>(&client, &json!({"n": 1}), &EnqueueOptions::default())
        .await
        .expect("enqueue");
    assert_eq!(wait_finished(&client, first).await.status, "succeeded");

    let killed: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE application_name = $1) k",
            &[&format!("sluice worker {worker_name}")],
        )
        .await
        .expect("terminating the worker's session")
        .get(0);
    assert!(killed >= 1, "the worker's session was found");

    let second = enqueue::<Echo>(&client, &json!({"n": 2}), &EnqueueOptions::default())
        .await
        .expect("enqueue");
    let row = wait_finished(&client, second).await;
    assert_eq!(row.status, "succeeded", "last_error: {:?}", row.last_error);
    assert_eq!(row.output, Some(json!({"n": 2})));
    let registrations: i64 = client
        .query_one(
            "SELECT count(*) FROM sluice.workers WHERE name = $1",
            &[&worker_name],
        )
        .await
        .expect("reading sluice.workers")
        .get(0);
    assert_eq!(registrations, 2);

    stop_worker(stop, handle).await;
}

live_task!(Slow, "slow", u64, u64);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_handlers_than_slots() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let Some(dsn) = dsn() else { return };
    let client = connect(&dsn).await;
    define_task(&client, Slow::name(), &TaskOptions::default())
        .await
        .expect("define_task");
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (running_in, most_in) = (Arc::clone(&running), Arc::clone(&most));
    let (stop, handle) = start_worker(Worker::builder(dsn.clone()).slots(2).task::<Slow, _, _>(
        move |_: TaskContext, millis: u64| {
            let (running, most) = (Arc::clone(&running_in), Arc::clone(&most_in));
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(millis)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(millis)
            }
        },
    ));
    let ids = enqueue_many::<Slow>(&client, &[100; 8])
        .await
        .expect("enqueue_many");
    for id in ids {
        assert_eq!(wait_finished(&client, id).await.status, "succeeded");
    }
    assert_eq!(
        most.load(Ordering::SeqCst),
        2,
        "both slots used, never more"
    );
    stop_worker(stop, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_handlers_then_cancels_the_rest() {
    let Some(dsn) = dsn() else { return };
    let client = connect(&dsn).await;
    live_task!(Lingering, "lingering", u64, u64);
    define_task(&client, Lingering::name(), &TaskOptions::default())
        .await
        .expect("define_task");
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<i64>();
    let worker = Worker::builder(dsn.clone())
        .slots(2)
        .poll_interval(Duration::from_millis(100))
        .shutdown_timeout(Duration::from_millis(800))
        .task::<Lingering, _, _>(move |ctx: TaskContext, millis: u64| {
            let started_tx = started_tx.clone();
            async move {
                let _ = started_tx.send(ctx.task_id());
                // Ignores cancellation on purpose: the runtime must stop it anyway.
                tokio::time::sleep(Duration::from_millis(millis)).await;
                Ok(millis)
            }
        })
        .build()
        .expect("valid configuration");
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run_until(async move {
        let _ = stop_rx.await;
    }));

    let quick = enqueue::<Lingering>(&client, &300, &EnqueueOptions::default())
        .await
        .expect("enqueue");
    let stuck = enqueue::<Lingering>(&client, &60_000, &EnqueueOptions::default())
        .await
        .expect("enqueue");
    let mut started = Vec::new();
    for _ in 0..2 {
        let id = tokio::time::timeout(Duration::from_secs(10), started_rx.recv())
            .await
            .expect("both handlers start");
        started.extend(id);
    }
    started.sort_unstable();
    assert_eq!(started, [quick, stuck]);

    let shutdown_began = Instant::now();
    let _ = stop_tx.send(());
    let result = tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("shutdown is bounded")
        .expect("no panic");
    result.expect("clean shutdown");
    let took = shutdown_began.elapsed();
    assert!(
        took >= Duration::from_millis(800),
        "waited for the timeout: {took:?}"
    );

    let row = task_row(&client, quick).await;
    assert_eq!(
        row.status, "succeeded",
        "finished within the shutdown timeout"
    );
    assert_eq!(row.output, Some(json!(300)));
    // The scheduler requeues a deregistered worker's running tasks on its next maintenance
    // pass (every 100 ms).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut row = task_row(&client, stuck).await;
    while row.status == "running" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        row = task_row(&client, stuck).await;
    }
    assert_eq!(
        row.status, "queued",
        "requeued soon after the worker deregistered"
    );
    let lost: i32 = client
        .query_one(
            "SELECT lost_attempts FROM sluice.tasks WHERE id = $1",
            &[&stuck],
        )
        .await
        .expect("reading sluice.tasks")
        .get(0);
    assert_eq!(lost, 1);
    assert!(cancel(&client, stuck).await.expect("cleaning up"));
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Upload {
    media_id: i64,
}
live_task!(
    WfValidate,
    "wf_validate",
    sluice_client::StepInput<Upload>,
    i64
);
live_task!(WfDouble, "wf_double", sluice_client::StepInput<Upload>, i64);
live_task!(WfTriple, "wf_triple", sluice_client::StepInput<Upload>, i64);
live_task!(WfSum, "wf_sum", sluice_client::StepInput<Upload>, i64);

/// A diamond through the typed builder: handlers read their parents' outputs by handle, and
/// the run's state gives the leaf's output typed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_workflow_passes_outputs_along_its_steps() {
    use sluice_client::{run_state, StepInput, WorkflowBuilder};
    let Some(dsn) = dsn() else { return };
    let client = connect(&dsn).await;
    for name in [
        WfValidate::name(),
        WfDouble::name(),
        WfTriple::name(),
        WfSum::name(),
    ] {
        define_task(&client, name, &TaskOptions::default())
            .await
            .expect("define_task");
    }
    let mut wf = WorkflowBuilder::<Upload>::new(format!("live_diamond_{}", std::process::id()));
    let validate = wf.step::<WfValidate>("validate", &[]);
    let double = wf.step::<WfDouble>("double", &[&validate]);
    let triple = wf.step::<WfTriple>("triple", &[&validate]);
    let sum = wf.step::<WfSum>("sum", &[&double, &triple]);
    assert_eq!(wf.define(&client).await.expect("define_workflow"), 1);

    let (v, d, t) = (validate.clone(), double.clone(), triple.clone());
    let (stop, handle) = start_worker(
        Worker::builder(dsn.clone())
            .slots(4)
            .task::<WfValidate, _, _>(|_ctx: TaskContext, s: StepInput<Upload>| async move {
                Ok(s.input.media_id)
            })
            .task::<WfDouble, _, _>(move |_ctx: TaskContext, s: StepInput<Upload>| {
                let v = v.clone();
                async move {
                    let x = s.parent(&v).map_err(|e| TaskError::fatal(e.to_string()))?;
                    Ok(2 * x.unwrap_or_default())
                }
            })
            .task::<WfTriple, _, _>(move |_ctx: TaskContext, s: StepInput<Upload>| {
                let v = validate.clone();
                async move {
                    let x = s.parent(&v).map_err(|e| TaskError::fatal(e.to_string()))?;
                    Ok(3 * x.unwrap_or_default())
                }
            })
            .task::<WfSum, _, _>(move |_ctx: TaskContext, s: StepInput<Upload>| {
                let (d, t) = (d.clone(), t.clone());
                async move {
                    let a = s.parent(&d).map_err(|e| TaskError::fatal(e.to_string()))?;
                    let b = s.parent(&t).map_err(|e| TaskError::fatal(e.to_string()))?;
                    Ok(a.unwrap_or_default() + b.unwrap_or_default())
                }
            }),
    );
    let run_id = wf
        .run(&client, &Upload { media_id: 7 })
        .await
        .expect("run_workflow");
    let deadline = Instant::now() + Duration::from_secs(30);
    let state = loop {
        let state = run_state(&client, run_id).await.expect("run_state");
        if !["queued", "running"].contains(&state.status.as_str()) || Instant::now() > deadline {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop_worker(stop, handle).await;
    assert_eq!(state.status, "succeeded", "{state:?}");
    assert_eq!(state.output_of(&sum).expect("typed output"), Some(35));
    assert_eq!(state.output, Some(json!({"sum": 35})));
}
