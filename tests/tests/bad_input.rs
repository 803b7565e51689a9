//! Bad input gets a specific SQLSTATE and a message naming the bad value, through raw SQL and
//! through the client's Error::code(); the API refuses clearly when sluice is not preloaded or
//! the database is not the one the scheduler serves.

use sluice_client::{
    define_task, enqueue, enqueue_json, EnqueueOptions, ErrorKind, TaskDefinition, TaskOptions,
    Worker,
};
use sluice_tests::*;
use std::sync::OnceLock;
use tokio_postgres::Client;

/// Runs `sql` with `params`, expects it to fail, and returns (SQLSTATE, message + detail).
async fn sql_error(
    client: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> (String, String) {
    match client.query(sql, params).await {
        Ok(rows) => panic!("{sql} should have failed, returned {} rows", rows.len()),
        Err(e) => {
            let db = e
                .as_db_error()
                .unwrap_or_else(|| panic!("{sql}: not a database error: {e}"));
            (
                db.code().code().to_string(),
                format!("{} | {}", db.message(), db.detail().unwrap_or("")),
            )
        }
    }
}

struct Typed;
static TYPED_NAME: OnceLock<String> = OnceLock::new();
impl TaskDefinition for Typed {
    const NAME: &'static str = "typed";
    type Input = serde_json::Value;
    type Output = serde_json::Value;
    fn name() -> &'static str {
        TYPED_NAME
            .get()
            .map(String::as_str)
            .expect("TYPED_NAME set by the test")
    }
}

#[tokio::test]
async fn bad_input_gets_a_specific_sqlstate_and_names_the_bad_value() {
    let client = connect(&shared_dsn()).await;
    let task = define_unique_task(&client, "bad_input", "").await;
    TYPED_NAME.set(task.clone()).unwrap();
    let unknown = unique("no_such_task");
    let none = EnqueueOptions::default();

    // Unknown task: 42704.
    let (code, text) = sql_error(&client, "SELECT sluice.enqueue($1, '{}')", &[&unknown]).await;
    assert_eq!(code, "42704", "{text}");
    assert!(
        text.contains(&format!("\"{unknown}\"")),
        "the message should name the task: {text}"
    );
    let text = client_error(
        "enqueue_json(unknown task)",
        enqueue_json(&client, &unknown, "{}", &none).await,
        "42704",
    );
    assert!(text.contains(&unknown), "{text}");

    // Negative retries: 22023.
    let (code, text) = sql_error(
        &client,
        "SELECT sluice.define_task($1, retries => -2)",
        &[&task],
    )
    .await;
    assert_eq!(code, "22023", "{text}");
    assert!(
        text.contains("retries") && text.contains("got -2"),
        "the message should name the value: {text}"
    );
    let bad_retries = TaskOptions {
        retries: Some(-2),
        ..Default::default()
    };
    let text = client_error(
        "define_task(retries -2)",
        define_task(&client, &task, &bad_retries).await,
        "22023",
    );
    assert!(text.contains("got -2"), "{text}");

    // Malformed JSON text: Postgres' 22P02 from the cast, naming the bad token.
    let malformed = r#"{"a": tru"#;
    let (code, text) = sql_error(
        &client,
        "SELECT sluice.enqueue($1, $2::text::jsonb)",
        &[&task, &malformed],
    )
    .await;
    assert_eq!(code, "22P02", "{text}");
    assert!(
        text.contains("json") && text.contains("tru"),
        "the message should show the bad token: {text}"
    );
    let text = client_error(
        "enqueue_json(malformed)",
        enqueue_json(&client, &task, malformed, &none).await,
        "22P02",
    );
    assert!(text.contains("tru"), "{text}");

    // A \u0000 escape: jsonb cannot hold it, 22P05.
    let nul = r#"{"name": "a\u0000b"}"#;
    let (code, text) = sql_error(
        &client,
        "SELECT sluice.enqueue($1, $2::text::jsonb)",
        &[&task, &nul],
    )
    .await;
    assert_eq!(code, "22P05", "{text}");
    assert!(
        text.contains("\\u0000"),
        "the message should name the escape: {text}"
    );
    let text = client_error(
        "enqueue_json(\\u0000)",
        enqueue_json(&client, &task, nul, &none).await,
        "22P05",
    );
    assert!(text.contains("\\u0000"), "{text}");
    // The same from a typed input holding a NUL character.
    let text = client_error(
        "enqueue::<Typed>(NUL)",
        enqueue::<Typed>(&client, &serde_json::json!({"name": "a\u{0}b"}), &none).await,
        "22P05",
    );
    assert!(text.contains("\\u0000"), "{text}");

    // Non-positive slot counts: 22023 from the server...
    for slots in [0, -1] {
        let (code, text) = sql_error(
            &client,
            "SELECT sluice.register_worker('bad-slots', ARRAY[$1], $2)",
            &[&task, &slots],
        )
        .await;
        assert_eq!(code, "22023", "slots {slots}: {text}");
        assert!(
            text.contains(&format!("got {slots}")),
            "the message should name the value: {text}"
        );
    }
    // ...and the client refuses them before connecting (so there is no SQLSTATE).
    for slots in [0, -1] {
        let built = Worker::builder(shared_dsn())
            .slots(slots)
            .task::<Typed, _, _>(|_, input: serde_json::Value| async move { Ok(input) })
            .build();
        match built {
            Ok(_) => panic!("a worker with {slots} slots must be refused"),
            Err(e) => {
                assert_eq!(
                    (e.kind(), e.code()),
                    (ErrorKind::Config, None),
                    "slots {slots}: {e}"
                );
                assert!(
                    e.to_string().contains(&format!("got {slots}")),
                    "slots {slots}: {e}"
                );
            }
        }
    }

    // None of the failed calls left anything behind.
    let rows: i64 = client
        .query_one(
            "SELECT count(*) FROM sluice.tasks WHERE task_name = ANY($1)",
            &[&vec![task.clone(), unknown]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "failed enqueues must not leave tasks");
    let workers: i64 = client
        .query_one(
            "SELECT count(*) FROM sluice.workers WHERE $1 = ANY(task_names)",
            &[&task],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(workers, 0, "a refused registration must not leave a worker");
    let retries: i32 = client
        .query_one(
            "SELECT retries FROM sluice.task_definition WHERE name = $1",
            &[&task],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        retries, 0,
        "a refused define_task must not change the definition"
    );
}

/// Needs a server without shared_preload_libraries: a private cluster.
#[tokio::test]
async fn the_api_refuses_with_55000_when_the_library_is_not_preloaded() {
    let cluster = PrivateCluster::start("no_preload", false, &[]);
    let client = connect(&cluster.dsn()).await;
    // CREATE EXTENSION worked (PrivateCluster::start ran it); the API refuses.
    let (code, text) = sql_error(&client, "SELECT sluice.define_task('t')", &[]).await;
    assert_eq!(code, "55000", "{text}");
    assert!(
        text.contains("shared_preload_libraries"),
        "the message should say what is missing: {text}"
    );

    // A definition inserted behind the API's back does not make enqueue work either.
    client
        .execute(
            "INSERT INTO sluice.task_definition (name) VALUES ('t')",
            &[],
        )
        .await
        .unwrap();
    let (code, text) = sql_error(&client, "SELECT sluice.enqueue('t', '{}')", &[]).await;
    assert_eq!(code, "55000", "{text}");
    assert!(text.contains("shared_preload_libraries"), "{text}");
    let text = client_error(
        "enqueue_json without preload",
        enqueue_json(&client, "t", "{}", &EnqueueOptions::default()).await,
        "55000",
    );
    assert!(text.contains("shared_preload_libraries"), "{text}");
    let (code, text) = sql_error(
        &client,
        "SELECT sluice.register_worker('w', ARRAY['t'], 1)",
        &[],
    )
    .await;
    assert_eq!(code, "55000", "{text}");
    let left: i64 = client
        .query_one("SELECT count(*) FROM sluice.tasks", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        left, 0,
        "the refused enqueues must not leave a task that nothing would run"
    );
}

#[tokio::test]
async fn the_api_refuses_with_55000_in_a_database_the_scheduler_does_not_serve() {
    // The shared cluster's scheduler serves one database (sluice.database); another database
    // with the extension is refused.
    let admin = connect(&shared_dsn()).await;
    let other = unique("sluice_other");
    admin
        .execute(&format!("CREATE DATABASE {other}"), &[])
        .await
        .unwrap();
    let served: String = admin
        .query_one("SELECT current_setting('sluice.database')", &[])
        .await
        .unwrap()
        .get(0);
    let other_dsn = format!("{} dbname={other}", shared_dsn());
    let other_client = connect(&other_dsn).await;
    other_client
        .execute("CREATE EXTENSION sluice", &[])
        .await
        .unwrap();
    let result = sql_error(&other_client, "SELECT sluice.define_task('t')", &[]).await;
    drop(other_client);
    let _ = admin
        .execute(&format!("DROP DATABASE {other} WITH (FORCE)"), &[])
        .await;
    let (code, text) = result;
    assert_eq!(code, "55000", "{text}");
    assert!(
        text.contains(&format!("serves database \"{served}\"")) && text.contains(&other),
        "the message should name both databases: {text}"
    );
}
