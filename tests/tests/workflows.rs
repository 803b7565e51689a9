//! Workflows end to end: the real scheduler advances runs, real worker processes run the steps
//! (one test worker per step task; the run input's entry for a task name drives that step).

use serde_json::{json, Value};
use sluice_tests::*;
use std::time::Duration;
use tokio_postgres::Client;

const WORKER: &str = env!("CARGO_BIN_EXE_test_worker");

/// Defines one task per name (unique names) and starts a worker for each; returns the names.
async fn step_tasks(client: &Client, prefixes: &[&str]) -> (Vec<String>, Vec<WorkerProcess>) {
    let mut names = Vec::new();
    let mut workers = Vec::new();
    for prefix in prefixes {
        let task = define_unique_task(client, prefix, "").await;
        workers.push(WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 4));
        names.push(task);
    }
    (names, workers)
}

/// Waits until every step of the run has a final status (after the run itself finished, the
/// cancellations of its other steps are applied by the scheduler).
async fn wait_steps_final(client: &Client, run_id: i64) -> Value {
    wait_until(
        Duration::from_secs(15),
        "every step to be final",
        || async {
            let row: Value = client
                .query_one(
                    "SELECT to_jsonb(r) FROM sluice.runs r WHERE r.id = $1",
                    &[&run_id],
                )
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            let open = row["steps"]
                .as_object()
                .map(|steps| {
                    steps.values().any(|s| {
                        ["pending", "started", "queued", "running"]
                            .contains(&s["status"].as_str().unwrap_or(""))
                    })
                })
                .unwrap_or(true);
            if open {
                Err(row.to_string())
            } else {
                Ok(row)
            }
        },
    )
    .await
}

/// (started_at, finished_at) of a task's first execution, as epoch seconds.
async fn execution_span(client: &Client, task_id: i64) -> (f64, f64) {
    let row = client
        .query_one(
            "SELECT extract(epoch FROM started_at)::float8, extract(epoch FROM finished_at)::float8
               FROM sluice_test.execution WHERE task_id = $1 ORDER BY started_at LIMIT 1",
            &[&task_id],
        )
        .await
        .unwrap_or_else(|e| panic!("no execution of task {task_id}: {e}"));
    (row.get(0), row.get(1))
}

fn step_task_id(run: &Value, step: &str) -> i64 {
    run["steps"][step]["task_id"]
        .as_i64()
        .unwrap_or_else(|| panic!("step {step} has no task: {run}"))
}

fn pipeline_spec(t: &[String], on_failure: Option<&str>) -> Value {
    let mut spec = json!({"steps": [
        {"name": "validate", "task": t[0]},
        {"name": "thumbnails", "task": t[1], "parents": ["validate"]},
        {"name": "caption", "task": t[2], "parents": ["validate"]},
        {"name": "persist", "task": t[3], "parents": ["thumbnails", "caption"]},
        {"name": "notify", "task": t[4], "parents": ["persist"]}
    ]});
    if let Some(task) = on_failure {
        spec["on_failure"] = json!(task);
    }
    spec
}

#[tokio::test]
async fn the_media_pipeline_runs_its_middle_steps_in_parallel_and_fans_in() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let (t, _workers) = step_tasks(
        &client,
        &[
            "wf_validate",
            "wf_thumbs",
            "wf_caption",
            "wf_persist",
            "wf_notify",
        ],
    )
    .await;
    let wf = unique("media");
    assert_eq!(
        define_workflow(&client, &wf, pipeline_spec(&t, None)).await,
        1
    );
    let input =
        json!({"media_id": 7, t[1].clone(): {"sleep_ms": 600}, t[2].clone(): {"sleep_ms": 600}});
    let run_id = run_workflow(&client, &wf, input.clone()).await;
    let run = wait_run(&client, run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["input"], input);

    let (thumbs_start, thumbs_end) =
        execution_span(&client, step_task_id(&run, "thumbnails")).await;
    let (caption_start, caption_end) = execution_span(&client, step_task_id(&run, "caption")).await;
    let (persist_start, _) = execution_span(&client, step_task_id(&run, "persist")).await;
    let overlap = thumbs_end.min(caption_end) - thumbs_start.max(caption_start);
    assert!(
        overlap > 0.3,
        "the middle steps overlapped {overlap:.3} s only: {run}"
    );
    assert!(
        persist_start >= thumbs_end.max(caption_end),
        "persist started before both middle steps finished: {run}"
    );
    assert_eq!(
        run["steps"]["persist"]["output"]["parents"],
        json!(["caption", "thumbnails"]),
        "persist sees both outputs: {run}"
    );
    // The run's output: its leaf steps' outputs.
    let leaves: Vec<&String> = run["output"].as_object().unwrap().keys().collect();
    assert_eq!(leaves, vec!["notify"], "{run}");
    assert_eq!(run["output"]["notify"], run["steps"]["notify"]["output"]);
}

#[tokio::test]
async fn a_failing_step_fails_the_run_cancels_its_descendants_and_runs_on_failure() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let (t, _workers) = step_tasks(
        &client,
        &[
            "wf_validate",
            "wf_thumbs",
            "wf_caption",
            "wf_persist",
            "wf_notify",
            "wf_cleanup",
        ],
    )
    .await;
    let wf = unique("media_fail");
    define_workflow(&client, &wf, pipeline_spec(&t, Some(&t[5]))).await;
    let input =
        json!({t[2].clone(): {"fail_attempts": 9, "fatal": true}, t[1].clone(): {"sleep_ms": 100}});
    let run_id = run_workflow(&client, &wf, input).await;
    let run = wait_run(&client, run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "failed", "{run}");
    let error = run["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("caption") && error.contains("planned failure"),
        "{run}"
    );
    let run = wait_steps_final(&client, run_id).await;
    for step in ["persist", "notify"] {
        assert_eq!(run["steps"][step]["status"], "cancelled", "{step}: {run}");
    }
    assert_eq!(run["steps"]["caption"]["status"], "failed", "{run}");
    // on_failure ran with the error.
    let handled: Value = wait_until(Duration::from_secs(15), "on_failure to succeed", || async {
        let rows = client
            .query(
                "SELECT input FROM sluice.tasks WHERE task_name = $1 AND status = 'succeeded'",
                &[&t[5]],
            )
            .await
            .map_err(|e| e.to_string())?;
        rows.first()
            .map(|r| r.get::<_, Value>(0))
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    assert_eq!(handled["run_id"], json!(run_id));
    assert_eq!(handled["failed_step"], "caption");
    assert!(handled["error"]
        .as_str()
        .unwrap_or_default()
        .contains("planned failure"));
}

#[tokio::test]
async fn skip_if_skips_a_step_its_children_see_it_and_wait_for_delays_one() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let (t, _workers) = step_tasks(&client, &["wf_a", "wf_b", "wf_c"]).await;
    let wf = unique("conditions");
    define_workflow(
        &client,
        &wf,
        json!({"steps": [
            {"name": "a", "task": t[0]},
            // a's output has attempt 1: b is skipped
            {"name": "b", "task": t[1], "parents": ["a"], "skip_if": "$.parents.a.attempt == 1"},
            {"name": "c", "task": t[2], "parents": ["b"], "wait_for": "2 seconds"}
        ]}),
    )
    .await;
    let run_id = run_workflow(&client, &wf, json!({})).await;
    let run = wait_run(&client, run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"]["b"]["status"], "skipped", "{run}");
    assert_eq!(
        run["steps"]["c"]["output"]["skipped"],
        json!(["b"]),
        "{run}"
    );
    let (_, a_end) = execution_span(&client, step_task_id(&run, "a")).await;
    let (c_start, _) = execution_span(&client, step_task_id(&run, "c")).await;
    assert!(
        c_start - a_end >= 1.9,
        "c started {:.3} s after a, wait_for is 2 s",
        c_start - a_end
    );
}

#[tokio::test]
async fn cancel_run_signals_running_steps_and_cancels_the_rest() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let (t, _workers) = step_tasks(&client, &["wf_slow", "wf_after"]).await;
    let wf = unique("cancel");
    define_workflow(
        &client,
        &wf,
        json!({"steps": [{"name": "slow", "task": t[0]},
                         {"name": "after", "task": t[1], "parents": ["slow"]}]}),
    )
    .await;
    let run_id = run_workflow(&client, &wf, json!({t[0].clone(): {"sleep_ms": 20000}})).await;
    let slow_task: i64 = wait_until(
        Duration::from_secs(15),
        "the slow step to start",
        || async {
            let row = client
                .query_opt(
                    "SELECT w.task_id FROM sluice.workflow_step w
                   JOIN sluice_test.execution e ON e.task_id = w.task_id
                  WHERE w.run_id = $1 AND w.step = 'slow'",
                    &[&run_id],
                )
                .await
                .map_err(|e| e.to_string())?;
            row.map(|r| r.get::<_, i64>(0))
                .ok_or_else(|| "not started".to_string())
        },
    )
    .await;
    let cancelled: bool = client
        .query_one("SELECT sluice.cancel_run($1)", &[&run_id])
        .await
        .unwrap()
        .get(0);
    assert!(cancelled);
    let again: bool = client
        .query_one("SELECT sluice.cancel_run($1)", &[&run_id])
        .await
        .unwrap()
        .get(0);
    assert!(!again, "a finished run cannot be cancelled twice");
    wait_execution(&client, slow_task, Some("cancelled")).await;
    let run = wait_steps_final(&client, run_id).await;
    assert_eq!(run["status"], "cancelled", "{run}");
    assert_eq!(run["steps"]["after"]["status"], "cancelled", "{run}");
    assert_eq!(run["steps"]["slow"]["status"], "cancelled", "{run}");
}

#[tokio::test]
async fn invalid_definitions_are_rejected_with_the_reason() {
    let client = connect(&shared_dsn()).await;
    let task = define_unique_task(&client, "wf_any", "").await;
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"steps": [{"name": "a", "task": task, "parents": ["b"]},
                          {"name": "b", "task": task, "parents": ["a"]}]}),
            "22023",
            "cycle",
        ),
        (
            json!({"steps": [{"name": "a", "task": task, "parents": ["nope"]}]}),
            "22023",
            "unknown parent \"nope\"",
        ),
        (
            json!({"steps": [{"name": "a", "task": task}, {"name": "a", "task": task}]}),
            "22023",
            "duplicate step name \"a\"",
        ),
        (
            json!({"steps": [{"name": "a"}]}),
            "22023",
            "step \"a\" has no task",
        ),
        (
            json!({"steps": [{"name": "a", "task": "no_such_task_xyz"}]}),
            "42704",
            "unknown task \"no_such_task_xyz\"",
        ),
        (
            json!({"steps": [{"name": "a", "task": task, "skip_if": "$.a ==="}]}),
            "22023",
            "skip_if is not a valid jsonpath",
        ),
        (
            json!({"steps": [{"name": "a", "task": task, "wait_for": "soon"}]}),
            "22023",
            "wait_for sleep is not a duration",
        ),
        (json!({"steps": []}), "22023", "non-empty array"),
        (
            json!({"steps": [{"name": "a", "task": task}], "on_failure": "nope_xyz"}),
            "42704",
            "on_failure must name a defined task",
        ),
        (
            json!({"steps": [{"name": "a", "task": task}],
                "concurrency": {"key": "$.u", "max_runs": 0}}),
            "22023",
            "concurrency.max_runs must be a positive whole number",
        ),
        (
            json!({"steps": [{"name": "a", "task": task}],
                "concurrency": {"key": "$.u", "max_runs": 2, "strategy": "fifo"}}),
            "22023",
            "unknown concurrency strategy",
        ),
    ];
    for (spec, sqlstate, message) in cases {
        let err = client
            .query_one("SELECT sluice.define_workflow('wf_invalid', $1)", &[&spec])
            .await
            .expect_err(&format!("{spec} was accepted"));
        let db = err.as_db_error().unwrap_or_else(|| panic!("{err}"));
        assert_eq!(db.code().code(), sqlstate, "{spec}: {}", db.message());
        assert!(
            db.message().contains(message),
            "{spec}: {:?} does not say {message:?}",
            db.message()
        );
    }
}

#[tokio::test]
async fn versions_rollback_and_unknown_workflows() {
    let client = connect(&shared_dsn()).await;
    let task = define_unique_task(&client, "wf_v", "").await;
    let wf = unique("versions");
    let one = json!({"steps": [{"name": "a", "task": task}]});
    let two = json!({"steps": [{"name": "a", "task": task}, {"name": "b", "task": task}]});
    assert_eq!(define_workflow(&client, &wf, one.clone()).await, 1);
    assert_eq!(
        define_workflow(&client, &wf, one.clone()).await,
        1,
        "same spec, same version"
    );
    let first = run_workflow(&client, &wf, json!({})).await;
    assert_eq!(define_workflow(&client, &wf, two).await, 2);
    let second = run_workflow(&client, &wf, json!({})).await;
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM sluice.workflow_run WHERE id = ANY($1) ORDER BY id",
            &[&vec![first, second]],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, vec![1, 2]);

    // A run started in a transaction that rolls back never appears.
    client.batch_execute("BEGIN").await.unwrap();
    let rolled_back = run_workflow(&client, &wf, json!({})).await;
    client.batch_execute("ROLLBACK").await.unwrap();
    let seen: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM sluice.workflow_run WHERE id = $1)
                  + (SELECT count(*) FROM sluice.task_run WHERE run_id = $1)",
            &[&rolled_back],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 0);

    let err = client
        .query_one(
            "SELECT sluice.run_workflow('no_such_workflow_xyz', '{}')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "42704");
}

#[tokio::test]
async fn replay_reruns_a_failed_run_from_the_failed_step_keeping_earlier_outputs() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let (t, _workers) = step_tasks(&client, &["wf_first", "wf_flaky", "wf_last"]).await;
    let wf = unique("replay");
    define_workflow(
        &client,
        &wf,
        json!({"steps": [{"name": "first", "task": t[0]},
                         {"name": "flaky", "task": t[1], "parents": ["first"]},
                         {"name": "last", "task": t[2], "parents": ["flaky"]}]}),
    )
    .await;
    let flag = unique("flag");
    let run_id = run_workflow(
        &client,
        &wf,
        json!({t[1].clone(): {"fail_unless_flag": flag}}),
    )
    .await;
    let failed = wait_run(&client, run_id, Duration::from_secs(30)).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let failed = wait_steps_final(&client, run_id).await;
    assert_eq!(failed["steps"]["last"]["status"], "cancelled", "{failed}");
    let first_task = step_task_id(&failed, "first");

    client
        .execute("INSERT INTO sluice_test.flag VALUES ($1)", &[&flag])
        .await
        .unwrap();
    let replayed: bool = client
        .query_one("SELECT sluice.replay_run($1)", &[&run_id])
        .await
        .unwrap()
        .get(0);
    assert!(replayed);
    let run = wait_run(&client, run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    // The step that succeeded before kept its task and output and did not run again.
    assert_eq!(step_task_id(&run, "first"), first_task);
    assert_eq!(
        run["steps"]["first"]["output"],
        failed["steps"]["first"]["output"]
    );
    assert_eq!(executions(&client, first_task).await.len(), 1);
    assert_ne!(step_task_id(&run, "flaky"), step_task_id(&failed, "flaky"));
    let again: bool = client
        .query_one("SELECT sluice.replay_run($1)", &[&run_id])
        .await
        .unwrap()
        .get(0);
    assert!(!again, "a succeeded run is not replayed");
}

#[tokio::test]
async fn runs_start_in_bulk_and_cancel_in_bulk_by_workflow() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let (t, _workers) = step_tasks(&client, &["wf_bulk"]).await;
    let (slow_wf, other_wf) = (unique("bulk_slow"), unique("bulk_other"));
    for wf in [&slow_wf, &other_wf] {
        define_workflow(
            &client,
            wf,
            json!({"steps": [{"name": "only", "task": t[0]}]}),
        )
        .await;
    }
    let slow = json!({t[0].clone(): {"sleep_ms": 20000}});
    let ids: Vec<i64> = client
        .query(
            "SELECT sluice.run_workflow_many($1, ARRAY[$2, $2, $2]::jsonb[])",
            &[&slow_wf, &slow],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), 3);
    let other = run_workflow(&client, &other_wf, slow.clone()).await;
    let mut cancelled: Vec<i64> = client
        .query("SELECT sluice.cancel_runs(workflow => $1)", &[&slow_wf])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    cancelled.sort_unstable();
    assert_eq!(cancelled, ids);
    for id in &ids {
        let run = wait_run(&client, *id, Duration::from_secs(15)).await;
        assert_eq!(run["status"], "cancelled", "{run}");
    }
    let status: String = client
        .query_one(
            "SELECT status::text FROM sluice.runs WHERE id = $1",
            &[&other],
        )
        .await
        .unwrap()
        .get(0);
    assert!(["queued", "running"].contains(&status.as_str()), "{status}");
    client
        .query_one("SELECT sluice.cancel_run($1)", &[&other])
        .await
        .unwrap();
    let err = client
        .query_one(
            "SELECT sluice.run_workflow_many($1, ARRAY['{}', NULL]::jsonb[])",
            &[&slow_wf],
        )
        .await
        .unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "22004");
    assert!(err.as_db_error().unwrap().message().contains("inputs[2]"));
}

/// Workflow-level concurrency: at most max_runs runs per key at once, keys independent; with
/// cancel_newest a run for a full key is cancelled with the reason.
#[tokio::test]
async fn workflow_concurrency_limits_runs_per_key() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let (t, _workers) = step_tasks(&client, &["wf_limited"]).await;
    let wf = unique("per_user");
    define_workflow(
        &client,
        &wf,
        json!({"steps": [{"name": "only", "task": t[0]}],
               "concurrency": {"key": "$.user", "max_runs": 2}}),
    )
    .await;
    let work = json!({"sleep_ms": 400});
    let mut runs = Vec::new();
    for user in ["a", "a", "a", "a", "a", "a", "b", "b"] {
        runs.push((
            user,
            run_workflow(&client, &wf, json!({"user": user, t[0].clone(): work})).await,
        ));
    }
    for (_, id) in &runs {
        let state = wait_run(&client, *id, Duration::from_secs(30)).await;
        assert_eq!(state["status"], "succeeded", "{state}");
    }
    // Overlap per key from the handlers' own log.
    let mut spans: Vec<(&str, f64, f64)> = Vec::new();
    for (user, id) in &runs {
        let state = wait_run(&client, *id, Duration::from_secs(1)).await;
        let (start, end) = execution_span(&client, step_task_id(&state, "only")).await;
        spans.push((user, start, end));
    }
    for user in ["a", "b"] {
        let mine: Vec<&(&str, f64, f64)> = spans.iter().filter(|s| s.0 == user).collect();
        let most = mine
            .iter()
            .map(|(_, start, _)| {
                mine.iter()
                    .filter(|(_, s, e)| s <= start && start < e)
                    .count()
            })
            .max()
            .unwrap();
        assert!(most <= 2, "user {user}: {most} runs at once: {spans:?}");
        if user == "a" {
            assert_eq!(most, 2, "a's runs never used both places: {spans:?}");
        }
    }
    let most_a = spans.iter().filter(|s| s.0 == "a").count();
    assert_eq!(most_a, 6);
    // b did not wait behind a's queue: both of b's runs started before a's last two.
    let mut a_starts: Vec<f64> = spans.iter().filter(|s| s.0 == "a").map(|s| s.1).collect();
    a_starts.sort_by(f64::total_cmp);
    for (_, start, _) in spans.iter().filter(|s| s.0 == "b") {
        assert!(*start < a_starts[4], "b waited behind a: {spans:?}");
    }

    let newest_wf = unique("newest");
    define_workflow(
        &client,
        &newest_wf,
        json!({"steps": [{"name": "only", "task": t[0]}],
               "concurrency": {"key": "$.user", "max_runs": 1, "strategy": "cancel_newest"}}),
    )
    .await;
    let first = run_workflow(
        &client,
        &newest_wf,
        json!({"user": "c", t[0].clone(): {"sleep_ms": 2000}}),
    )
    .await;
    // The first must hold the place before the second asks for it.
    wait_until(
        Duration::from_secs(10),
        "the first run to be admitted",
        || async {
            let s: String = client
                .query_one(
                    "SELECT status::text FROM sluice.workflow_run WHERE id = $1",
                    &[&first],
                )
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            if s == "running" {
                Ok(())
            } else {
                Err(s)
            }
        },
    )
    .await;
    let second = run_workflow(&client, &newest_wf, json!({"user": "c"})).await;
    let state = wait_run(&client, second, Duration::from_secs(10)).await;
    assert_eq!(state["status"], "cancelled", "{state}");
    assert!(
        state["error"]
            .as_str()
            .unwrap_or_default()
            .contains("cancel_newest"),
        "{state}"
    );
    let state = wait_run(&client, first, Duration::from_secs(20)).await;
    assert_eq!(state["status"], "succeeded", "{state}");
}

/// A parent spawns 1,000 children in batches and is killed mid-spawn; its next attempt spawns
/// again and gets the same children (no duplicates), waits for all, and succeeds.
#[tokio::test]
async fn spawned_children_are_idempotent_across_a_killed_parent() {
    const CHILDREN: i64 = 1000;
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let parent_task = define_unique_task(&client, "wf_parent", "").await;
    let child_task = define_unique_task(&client, "wf_child", "").await;
    let _children_worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &child_task, 50);
    let mut parent_worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &parent_task, 1);
    let parent = enqueue_sql(
        &client,
        &parent_task,
        json!({"spawn": {"task": child_task, "count": CHILDREN, "batch": 50, "pause_ms": 30}}),
    )
    .await;
    wait_until(
        Duration::from_secs(30),
        "some children to be spawned",
        || async {
            let n: i64 = client
                .query_one("SELECT count(*) FROM sluice.children($1)", &[&parent])
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            if n >= 300 {
                Ok(())
            } else {
                Err(format!("{n} spawned"))
            }
        },
    )
    .await;
    parent_worker.kill();
    let _parent_worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &parent_task, 1);
    wait_finished(&client, &[parent], Duration::from_secs(120)).await;
    let (status, attempt, error) = task_state(&client, parent).await;
    assert_eq!(status, "succeeded", "{error:?}");
    assert!(
        attempt >= 2,
        "the parent was not killed mid-spawn (attempt {attempt})"
    );
    let output: Value = client
        .query_one("SELECT output FROM sluice.tasks WHERE id = $1", &[&parent])
        .await
        .unwrap()
        .get(0);
    assert_eq!(output["children"], json!(CHILDREN), "{output}");
    assert_eq!(output["children_succeeded"], json!(CHILDREN), "{output}");
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT child_key),
                    count(*) FILTER (WHERE status = 'succeeded')
               FROM sluice.children($1)",
            &[&parent],
        )
        .await
        .unwrap();
    let (n, keys, ok): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((n, keys, ok), (CHILDREN, CHILDREN, CHILDREN));
    let twice: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT e.task_id FROM sluice_test.execution e
                                     JOIN sluice.children($1) c ON c.task_id = e.task_id
                                    GROUP BY e.task_id HAVING count(*) > 1) d",
            &[&parent],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(twice, 0, "children executed more than once");
}

#[tokio::test]
async fn only_a_running_task_spawns_children() {
    let client = connect(&shared_dsn()).await;
    let task = define_unique_task(&client, "wf_unserved_parent", "").await;
    let queued = enqueue_sql(&client, &task, json!({})).await;
    for (parent, code, message) in [
        (queued, "55000", "is queued, not running"),
        (-1, "P0002", "no task with id -1"),
    ] {
        let err = client
            .query(
                "SELECT * FROM sluice.spawn($1, $2, ARRAY['{}']::jsonb[])",
                &[&parent, &task],
            )
            .await
            .unwrap_err();
        let db = err.as_db_error().unwrap();
        assert_eq!(db.code().code(), code, "{}", db.message());
        assert!(db.message().contains(message), "{}", db.message());
    }
}

/// A running task spawns child workflow runs and waits for them.
#[tokio::test]
async fn a_task_spawns_child_workflow_runs_and_waits_for_them() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let (t, _workers) = step_tasks(&client, &["wf_spawner", "wf_child_step"]).await;
    let wf = unique("child_runs");
    define_workflow(
        &client,
        &wf,
        json!({"steps": [{"name": "one", "task": t[1]},
                         {"name": "two", "task": t[1], "parents": ["one"]}]}),
    )
    .await;
    let parent = enqueue_sql(
        &client,
        &t[0],
        json!({"spawn_runs": {"workflow": wf, "inputs": [{"k": 1}, {"k": 2}, {"k": 3}]}}),
    )
    .await;
    wait_finished(&client, &[parent], Duration::from_secs(30)).await;
    let output: Value = client
        .query_one("SELECT output FROM sluice.tasks WHERE id = $1", &[&parent])
        .await
        .unwrap()
        .get(0);
    assert_eq!(output["children"], json!(3), "{output}");
    assert_eq!(output["children_succeeded"], json!(3), "{output}");
    let runs: Vec<(String, Value)> = client
        .query(
            "SELECT child_key, input FROM sluice.runs WHERE parent_id = $1 ORDER BY child_key",
            &[&parent],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        runs,
        vec![
            ("0".to_string(), json!({"k": 1})),
            ("1".to_string(), json!({"k": 2})),
            ("2".to_string(), json!({"k": 3}))
        ]
    );
}

/// A run that cannot advance (its next step's task definition was deleted meanwhile) fails
/// with the reason; the other runs in the same batch of outcomes advance normally.
#[tokio::test]
async fn a_run_that_cannot_advance_fails_with_the_reason_and_others_go_on() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let (t, _workers) = step_tasks(&client, &["wf_before", "wf_doomed", "wf_fine"]).await;
    let (doomed_wf, fine_wf) = (unique("doomed"), unique("fine"));
    define_workflow(
        &client,
        &doomed_wf,
        json!({"steps": [{"name": "a", "task": t[0]}, {"name": "b", "task": t[1], "parents": ["a"]}]}),
    )
    .await;
    define_workflow(
        &client,
        &fine_wf,
        json!({"steps": [{"name": "a", "task": t[0]}, {"name": "b", "task": t[2], "parents": ["a"]}]}),
    )
    .await;
    let slow = json!({t[0].clone(): {"sleep_ms": 800}});
    let doomed = run_workflow(&client, &doomed_wf, slow.clone()).await;
    let fine = run_workflow(&client, &fine_wf, slow).await;
    client
        .execute(
            "DELETE FROM sluice.task_definition WHERE name = $1",
            &[&t[1]],
        )
        .await
        .unwrap();
    let state = wait_run(&client, doomed, Duration::from_secs(30)).await;
    assert_eq!(state["status"], "failed", "{state}");
    let error = state["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("after step \"a\"") && error.contains(&t[1]),
        "{state}"
    );
    let state = wait_run(&client, fine, Duration::from_secs(30)).await;
    assert_eq!(state["status"], "succeeded", "{state}");
}

/// on_success gets every output; cancel_in_progress cancels the running run of a full key for
/// a new one (its handler is signalled); replay_runs brings the cancelled run back.
#[tokio::test]
async fn on_success_cancel_in_progress_and_bulk_replay() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let (t, _workers) = step_tasks(&client, &["wf_work", "wf_done"]).await;
    let wf = unique("newest_wins");
    define_workflow(
        &client,
        &wf,
        json!({"steps": [{"name": "work", "task": t[0]}],
               "on_success": t[1],
               "concurrency": {"key": "$.user", "max_runs": 1, "strategy": "cancel_in_progress"}}),
    )
    .await;
    let first = run_workflow(
        &client,
        &wf,
        json!({"user": "u", t[0].clone(): {"sleep_ms": 3000}}),
    )
    .await;
    let first_task: i64 = wait_until(
        Duration::from_secs(15),
        "the first run's step to start",
        || async {
            client
                .query_opt(
                    "SELECT w.task_id FROM sluice.workflow_step w
                   JOIN sluice_test.execution e ON e.task_id = w.task_id
                  WHERE w.run_id = $1",
                    &[&first],
                )
                .await
                .map_err(|e| e.to_string())?
                .map(|r| r.get::<_, i64>(0))
                .ok_or_else(|| "not started".to_string())
        },
    )
    .await;
    let second = run_workflow(&client, &wf, json!({"user": "u"})).await;
    let state = wait_run(&client, first, Duration::from_secs(15)).await;
    assert_eq!(state["status"], "cancelled", "{state}");
    assert!(
        state["error"]
            .as_str()
            .unwrap_or_default()
            .contains("cancel_in_progress"),
        "{state}"
    );
    wait_execution(&client, first_task, Some("cancelled")).await;
    let state = wait_run(&client, second, Duration::from_secs(15)).await;
    assert_eq!(state["status"], "succeeded", "{state}");

    // on_success ran for the second run with its step's output.
    let inputs: Vec<Value> =
        wait_until(Duration::from_secs(15), "on_success to succeed", || async {
            let rows = client
                .query(
                    "SELECT input FROM sluice.tasks WHERE task_name = $1 AND status = 'succeeded'",
                    &[&t[1]],
                )
                .await
                .map_err(|e| e.to_string())?;
            if rows.is_empty() {
                Err("not yet".to_string())
            } else {
                Ok(rows.iter().map(|r| r.get(0)).collect())
            }
        })
        .await;
    assert_eq!(inputs.len(), 1, "{inputs:?}");
    assert_eq!(inputs[0]["input"]["user"], "u");
    assert_eq!(
        inputs[0]["outputs"]["work"],
        state["steps"]["work"]["output"]
    );

    let replayed: Vec<i64> = client
        .query(
            "SELECT sluice.replay_runs(workflow => $1, statuses => '{cancelled}')",
            &[&wf],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(replayed, vec![first]);
    let state = wait_run(&client, first, Duration::from_secs(30)).await;
    assert_eq!(state["status"], "succeeded", "{state}");
    let err = client
        .query("SELECT sluice.replay_runs(statuses => '{running}')", &[])
        .await
        .unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "22023");
}
