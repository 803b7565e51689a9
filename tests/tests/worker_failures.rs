//! Workers that die or misbehave: SIGKILL mid-task, a crash between a handler's write and its
//! commit, a session that just ends, a worker that stops heartbeating, a late completion from
//! a lost attempt; and the graceful shutdown for contrast.

use serde_json::json;
use sluice_tests::*;
use std::time::Duration;

const WORKER: &str = env!("CARGO_BIN_EXE_test_worker");

#[tokio::test]
async fn a_task_on_a_killed_worker_runs_again_on_another_and_completes_once() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "killed", "").await;
    let mut doomed = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 1);
    let id = enqueue_sql(
        &client,
        &task,
        json!({"sleep_ms": 20000, "sleep_on_attempt": 1}),
    )
    .await;
    wait_execution(&client, id, None).await;
    let doomed_pid = doomed.pid() as i32;
    doomed.kill();

    let survivor = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 1);
    wait_finished(&client, &[id], Duration::from_secs(20)).await;
    let r = client
        .query_one(
            "SELECT status::text, attempt, output, lost_attempts, failures, worker_name
               FROM sluice.tasks WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(
        r.get::<_, String>(0),
        "succeeded",
        "{}",
        describe_tasks(&client, &[id]).await
    );
    assert_eq!(
        r.get::<_, i32>(1),
        2,
        "attempt 1 on the killed worker, attempt 2 on the survivor"
    );
    assert_eq!(
        r.get::<_, serde_json::Value>(2),
        json!({"worker_pid": survivor.pid(), "attempt": 2}),
        "the survivor's completion is the task's output"
    );
    assert_eq!(
        (r.get::<_, i32>(3), r.get::<_, i32>(4)),
        (1, 0),
        "one lost attempt, no failure"
    );
    assert_eq!(r.get::<_, Option<String>>(5), Some(survivor.name()));
    let seen = attempts(&client, id).await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        (seen[0].0, seen[0].1.as_str()),
        (1, "lost"),
        "attempt 1: {seen:?}"
    );
    assert!(
        seen[0]
            .2
            .as_deref()
            .is_some_and(|e| e.contains("worker session ended")),
        "attempt 1's error should say the worker's session ended: {seen:?}"
    );
    assert_eq!(
        (seen[1].0, seen[1].1.as_str()),
        (2, "succeeded"),
        "attempt 2: {seen:?}"
    );
    // Exactly one execution finished: the killed one never did.
    assert_eq!(
        executions(&client, id).await,
        vec![
            (1, doomed_pid, None),
            (2, survivor.pid() as i32, Some("finished".into()))
        ],
        "one unfinished execution on the killed worker, one finished on the survivor"
    );
}

#[tokio::test]
async fn a_crash_between_the_handlers_write_and_its_commit_leaves_nothing_and_the_retry_writes_once(
) {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "effect", "").await;
    let mut doomed = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 1);
    // The handler writes sluice_test.effect in ctx.transaction(), then (attempt 1 only) pauses
    // before commit_with.
    let id = enqueue_sql(
        &client,
        &task,
        json!({"effect": true, "pause_before_commit_ms": 20000}),
    )
    .await;
    wait_execution(&client, id, Some("paused_before_commit")).await;
    let doomed_pid = doomed.pid() as i32;
    // Proof the write happened and is uncommitted: a transaction that inserted into
    // sluice_test.effect is open, and its row is invisible.
    let open_writers: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
              WHERE application_name = $1 AND state = 'idle in transaction'
                AND query LIKE 'INSERT INTO sluice_test.effect%'",
            &[&format!("sluice worker {}", doomed.name())],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        open_writers, 1,
        "the worker's transaction with the write should be open"
    );
    assert_eq!(
        effects(&client, id).await,
        Vec::<i32>::new(),
        "the uncommitted write must be invisible"
    );
    doomed.kill();

    // After the crash: neither the write nor the completion is visible.
    assert_eq!(
        effects(&client, id).await,
        Vec::<i32>::new(),
        "the killed worker's write must be gone"
    );
    let (status, _, _) = task_state(&client, id).await;
    assert!(
        status == "running" || status == "queued",
        "the completion must not have committed: {status}"
    );

    let survivor = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 1);
    wait_finished(&client, &[id], Duration::from_secs(20)).await;
    assert_eq!(
        effects(&client, id).await,
        vec![2],
        "exactly one write, by attempt 2"
    );
    let (status, attempt, _) = task_state(&client, id).await;
    assert_eq!(
        (status.as_str(), attempt),
        ("succeeded", 2),
        "{}",
        describe_tasks(&client, &[id]).await
    );
    let output: serde_json::Value = client
        .query_one("SELECT output FROM sluice.tasks WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        output,
        json!({"worker_pid": survivor.pid(), "attempt": 2}),
        "completed by the retry"
    );
    let seen = attempts(&client, id).await;
    let outcomes: Vec<(i32, &str)> = seen.iter().map(|(a, o, _)| (*a, o.as_str())).collect();
    assert_eq!(outcomes, vec![(1, "lost"), (2, "succeeded")], "{seen:?}");
    let runs = executions(&client, id).await;
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!((runs[0].0, runs[0].1), (1, doomed_pid), "{runs:?}");
    assert_eq!(
        (runs[1].0, runs[1].1),
        (2, survivor.pid() as i32),
        "{runs:?}"
    );
}

#[tokio::test]
async fn a_worker_whose_session_ends_gives_its_task_back_and_another_worker_completes_it() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "session_end", "").await;
    let id = enqueue_sql(&client, &task, json!({})).await;

    // A raw-SQL worker takes the task, then closes its connection without a word.
    let raw_session = connect(&shared_dsn()).await;
    let raw_worker: i64 = raw_session
        .query_one(
            "SELECT sluice.register_worker('raw-session-end', ARRAY[$1], 1)",
            &[&task],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(fetch_one(&raw_session, raw_worker).await, (id, 1));
    assert_eq!(task_state(&client, id).await.0, "running");
    drop(raw_session);

    let worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 1);
    wait_finished(&client, &[id], Duration::from_secs(20)).await;
    let (status, attempt, _) = task_state(&client, id).await;
    assert_eq!(
        (status.as_str(), attempt),
        ("succeeded", 2),
        "{}",
        describe_tasks(&client, &[id]).await
    );
    let seen = attempts(&client, id).await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!((seen[0].0, seen[0].1.as_str()), (1, "lost"), "{seen:?}");
    assert!(
        seen[0]
            .2
            .as_deref()
            .is_some_and(|e| e.contains("worker session ended")),
        "attempt 1's error should say the session ended: {seen:?}"
    );
    let stop_reason: Option<String> = client
        .query_one(
            "SELECT stop_reason FROM sluice.workers WHERE id = $1",
            &[&raw_worker],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stop_reason.as_deref(), Some("worker session ended"));
    assert_eq!(
        executions(&client, id).await,
        vec![(2, worker.pid() as i32, Some("finished".into()))],
        "the real worker ran attempt 2 once"
    );
}

#[tokio::test]
async fn a_late_completion_from_a_lost_attempt_never_overwrites_a_newer_one() {
    let client = connect(&shared_dsn()).await;
    let task = define_unique_task(&client, "fencing", "").await;
    let id = enqueue_sql(&client, &task, json!({})).await;

    let first_session = connect(&shared_dsn()).await;
    let first: i64 = first_session
        .query_one(
            "SELECT sluice.register_worker('raw-1', ARRAY[$1], 1)",
            &[&task],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(fetch_one(&first_session, first).await, (id, 1));
    drop(first_session); // the session ends: the scheduler must requeue attempt 1 as lost

    let second_session = connect(&shared_dsn()).await;
    let second: i64 = second_session
        .query_one(
            "SELECT sluice.register_worker('raw-2', ARRAY[$1], 1)",
            &[&task],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(fetch_one(&second_session, second).await, (id, 2));
    let accepted: bool = second_session
        .query_one(
            "SELECT sluice.complete($1, $2, 2, '{\"from\": 2}')",
            &[&second, &id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        accepted,
        "the current attempt's completion must be accepted"
    );

    // Attempt 1's worker (or anyone holding its id) reports late.
    let late_complete: bool = client
        .query_one(
            "SELECT sluice.complete($1, $2, 1, '{\"from\": 1}')",
            &[&first, &id],
        )
        .await
        .unwrap()
        .get(0);
    let late_fail: bool = client
        .query_one(
            "SELECT sluice.fail($1, $2, 1, 'late failure')",
            &[&first, &id],
        )
        .await
        .unwrap()
        .get(0);
    // Even the right worker cannot complete twice.
    let duplicate: bool = second_session
        .query_one(
            "SELECT sluice.complete($1, $2, 2, '{\"from\": \"duplicate\"}')",
            &[&second, &id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        (late_complete, late_fail, duplicate),
        (false, false, false),
        "late completion, late failure and duplicate completion must all be refused"
    );
    let r = client
        .query_one(
            "SELECT status::text, attempt, output, last_error FROM sluice.tasks WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "succeeded");
    assert_eq!(r.get::<_, i32>(1), 2);
    assert_eq!(
        r.get::<_, serde_json::Value>(2),
        json!({"from": 2}),
        "attempt 2's output must stand"
    );
    let outcomes: Vec<(i32, String)> = attempts(&client, id)
        .await
        .into_iter()
        .map(|(a, o, _)| (a, o))
        .collect();
    assert_eq!(outcomes, vec![(1, "lost".into()), (2, "succeeded".into())]);
}

#[tokio::test]
async fn sigterm_lets_the_in_flight_task_finish_then_deregisters() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "sigterm", "").await;
    let mut worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 2);
    let id = enqueue_sql(&client, &task, json!({"sleep_ms": 1500})).await;
    wait_execution(&client, id, None).await;
    let exit = worker.terminate();
    assert!(
        exit.success(),
        "graceful shutdown must exit cleanly, got {exit}; stderr:\n{}",
        worker.stderr()
    );
    // The in-flight task finished on its first attempt before the process exited.
    let r = client
        .query_one(
            "SELECT status::text, attempt, worker_id FROM sluice.tasks WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(
        (r.get::<_, String>(0).as_str(), r.get::<_, i32>(1)),
        ("succeeded", 1)
    );
    let stop_reason: Option<String> = client
        .query_one(
            "SELECT stop_reason FROM sluice.workers WHERE id = $1",
            &[&r.get::<_, i64>(2)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stop_reason.as_deref(), Some("deregistered"));
}

/// Needs sluice.heartbeat_timeout = 1 s, a server setting: a private cluster.
#[tokio::test]
async fn a_worker_that_stops_heartbeating_loses_its_task_and_must_register_again() {
    let cluster = PrivateCluster::start("heartbeat", true, &[("sluice.heartbeat_timeout", "1s")]);
    let client = connect(&cluster.dsn()).await;
    client
        .execute("SELECT sluice.define_task('silent')", &[])
        .await
        .unwrap();
    let id: i64 = client
        .query_one("SELECT sluice.enqueue('silent')", &[])
        .await
        .unwrap()
        .get(0);
    // A raw-SQL worker whose session stays open but which never heartbeats.
    let silent = connect(&cluster.dsn()).await;
    let worker: i64 = silent
        .query_one(
            "SELECT sluice.register_worker('silent', ARRAY['silent'], 1)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(fetch_one(&silent, worker).await, (id, 1));
    let reason: String = wait_until(
        Duration::from_secs(10),
        "the silent worker to be stopped",
        || async {
            let r = client
                .query_one(
                    "SELECT stop_reason FROM sluice.workers WHERE id = $1",
                    &[&worker],
                )
                .await
                .map_err(|e| e.to_string())?;
            r.get::<_, Option<String>>(0)
                .ok_or("still live".to_string())
        },
    )
    .await;
    assert!(reason.starts_with("no heartbeat"), "stop reason: {reason}");
    let r = client
        .query_one(
            "SELECT t.status::text, t.lost_attempts, a.outcome FROM sluice.tasks t
               JOIN sluice.task_attempts a ON a.task_id = t.id AND a.attempt = 1 WHERE t.id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            r.get::<_, String>(0).as_str(),
            r.get::<_, i32>(1),
            r.get::<_, String>(2).as_str()
        ),
        ("queued", 1, "lost"),
        "the task goes back to the queue, attempt 1 counted as lost"
    );
    // Its next heartbeat tells it to register again, and its late completion is refused.
    let err = silent
        .query("SELECT sluice.heartbeat($1)", &[&worker])
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("SL001"), "{err}");
    let late: bool = client
        .query_one("SELECT sluice.complete($1, $2, 1)", &[&worker, &id])
        .await
        .unwrap()
        .get(0);
    assert!(!late, "a stopped worker's completion must be refused");
}

/// A task that keeps losing its worker (say, it crashes the process) is not requeued forever:
/// past sluice.max_lost_attempts it fails. An attempt lost before the worker fetched it never
/// ran and does not count. Needs sluice.max_lost_attempts = 1, a server setting: private cluster.
#[tokio::test]
async fn a_task_lost_more_often_than_max_lost_attempts_fails_and_unfetched_assignments_do_not_count(
) {
    let cluster = PrivateCluster::start("max_lost", true, &[("sluice.max_lost_attempts", "1")]);
    let client = connect(&cluster.dsn()).await;
    client
        .execute("SELECT sluice.define_task('fragile')", &[])
        .await
        .unwrap();
    let id: i64 = client
        .query_one("SELECT sluice.enqueue('fragile')", &[])
        .await
        .unwrap()
        .get(0);

    // Raw-SQL workers that end their session while holding the task; the first never fetches,
    // so its assignment never became an attempt: it is withdrawn and nothing is recorded.
    for (attempt, fetch) in [(0, false), (1, true), (2, true)] {
        let session = connect(&cluster.dsn()).await;
        let worker: i64 = session
            .query_one(
                "SELECT sluice.register_worker($1, ARRAY['fragile'], 1)",
                &[&format!("raw-{attempt}")],
            )
            .await
            .unwrap()
            .get(0);
        let posted = "SELECT count(*) FROM sluice.posted_assignments() WHERE worker_id = $1 AND task_id = $2";
        if fetch {
            assert_eq!(fetch_one(&session, worker).await, (id, attempt));
        } else {
            wait_until(
                Duration::from_secs(15),
                "the assignment to raw-0",
                || async {
                    let n: i64 = client
                        .query_one(posted, &[&worker, &id])
                        .await
                        .unwrap()
                        .get(0);
                    let (status, seen_attempt, _) = task_state(&client, id).await;
                    if n == 1 && (status.as_str(), seen_attempt) == ("queued", 0) {
                        Ok(())
                    } else {
                        Err(format!("posted {n}, {status} attempt {seen_attempt}"))
                    }
                },
            )
            .await;
        }
        drop(session);
        if fetch {
            wait_until(
                Duration::from_secs(15),
                "the attempt to be recorded as lost",
                || async {
                    let seen = attempts(&client, id).await;
                    if seen.iter().any(|(a, o, _)| *a == attempt && o == "lost") {
                        Ok(())
                    } else {
                        Err(format!("{seen:?}"))
                    }
                },
            )
            .await;
        } else {
            wait_until(
                Duration::from_secs(15),
                "the assignment to be withdrawn",
                || async {
                    let n: i64 = client
                        .query_one(posted, &[&worker, &id])
                        .await
                        .unwrap()
                        .get(0);
                    if n == 0 {
                        Ok(())
                    } else {
                        Err("still posted to raw-0".into())
                    }
                },
            )
            .await;
            assert!(
                attempts(&client, id).await.is_empty(),
                "an unfetched assignment is no attempt"
            );
        }
    }
    wait_finished(&client, &[id], Duration::from_secs(15)).await;
    let r = client
        .query_one("SELECT status::text, attempt, lost_attempts, last_error FROM sluice.tasks WHERE id = $1", &[&id])
        .await
        .unwrap();
    let (status, attempt, lost, error): (String, i32, i32, Option<String>) =
        (r.get(0), r.get(1), r.get(2), r.get(3));
    assert_eq!(
        (status.as_str(), attempt, lost),
        ("failed", 2, 2),
        "two attempts lost after one unfetched assignment (last_error {error:?})"
    );
    let error = error.unwrap_or_default();
    assert!(
        error.contains("lost 2 times") && error.contains("sluice.max_lost_attempts = 1"),
        "last_error should say why the task failed: {error}"
    );
}

/// One `complete_many` batch mixing claims held in memory (a plain task) and claims written to
/// their rows (a rate-limited task): each listed attempt is ended once with its own output, an
/// id listed twice is ended by its first listing, a wrong attempt ends nothing, and the same
/// batch sent again ends nothing more.
#[tokio::test]
async fn a_batch_completion_ends_each_listed_attempt_once_held_or_in_its_row() {
    let client = connect(&shared_dsn()).await;
    let held_task = define_unique_task(&client, "batch_held", "").await;
    let row_task = define_unique_task(
        &client,
        "batch_rows",
        r#", rate_limits => '[{"key_path": "$.u", "limit": 100, "per": "1 hour"}]'"#,
    )
    .await;
    let held = enqueue_copies(&client, &held_task, json!({}), 2).await;
    let in_rows = enqueue_copies(&client, &row_task, json!({"u": "x"}), 2).await;

    let session = connect(&shared_dsn()).await;
    let worker: i64 = session
        .query_one(
            "SELECT sluice.register_worker('raw-batch', ARRAY[$1, $2], 4)",
            &[&held_task, &row_task],
        )
        .await
        .unwrap()
        .get(0);
    let mut claimed: Vec<(i64, i32)> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while claimed.len() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "only {claimed:?} claimed after 15 s"
        );
        for r in session
            .query(
                "SELECT task_id, attempt FROM sluice.fetch_tasks($1)",
                &[&worker],
            )
            .await
            .unwrap()
        {
            claimed.push((r.get(0), r.get(1)));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        claimed.iter().all(|&(_, attempt)| attempt == 1),
        "{claimed:?}"
    );
    let split: (i64, i64) = {
        let all: Vec<i64> = held.iter().chain(&in_rows).copied().collect();
        let r = client
            .query_one(
                "SELECT (SELECT count(*) FROM sluice._claims($1) c WHERE c.task_id = ANY($2)),
                        (SELECT count(*) FROM sluice.task_run
                          WHERE id = ANY($3) AND status = 'running')",
                &[&all, &held, &in_rows],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(split, (2, 2), "(held claims, claims in rows)");

    let complete = |ids: Vec<i64>, attempts: Vec<i32>, outputs: Vec<serde_json::Value>| {
        let session = &session;
        async move {
            let mut ended: Vec<i64> = session
                .query(
                    "SELECT c FROM sluice.complete_many($1, $2, $3, $4) AS c",
                    &[&worker, &ids, &attempts, &outputs],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            ended.sort();
            ended
        }
    };
    let (h1, h2, r1, r2) = (held[0], held[1], in_rows[0], in_rows[1]);
    let sorted = |mut v: Vec<i64>| {
        v.sort();
        v
    };
    let batch_ids = vec![h1, r1, h1, r2, h2];
    let batch_attempts = vec![1, 1, 1, 1, 99];
    let outputs: Vec<serde_json::Value> = (1..=5).map(|n| json!({ "n": n })).collect();
    assert_eq!(
        complete(batch_ids.clone(), batch_attempts, outputs.clone()).await,
        sorted(vec![h1, r1, r2]),
        "the first listing of each current attempt is ended; attempt 99 is not current"
    );
    let state = |id: i64| {
        let client = &client;
        async move {
            let r = client
                .query_one(
                    "SELECT status::text, attempt, output FROM sluice.tasks WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            (
                r.get::<_, String>(0),
                r.get::<_, i32>(1),
                r.get::<_, Option<serde_json::Value>>(2),
            )
        }
    };
    assert_eq!(
        state(h1).await,
        ("succeeded".into(), 1, Some(json!({"n": 1})))
    );
    assert_eq!(
        state(r1).await,
        ("succeeded".into(), 1, Some(json!({"n": 2})))
    );
    assert_eq!(
        state(r2).await,
        ("succeeded".into(), 1, Some(json!({"n": 4})))
    );
    assert_eq!(state(h2).await, ("running".into(), 1, None));

    // The same batch again, now with h2's right attempt: only h2 is left to end.
    assert_eq!(
        complete(batch_ids, vec![1, 1, 1, 1, 1], outputs).await,
        vec![h2]
    );
    assert_eq!(
        state(h2).await,
        ("succeeded".into(), 1, Some(json!({"n": 5})))
    );
    assert_eq!(
        state(h1).await.2,
        Some(json!({"n": 1})),
        "h1's output stands"
    );
    session
        .execute("SELECT sluice.deregister_worker($1)", &[&worker])
        .await
        .unwrap();
}
