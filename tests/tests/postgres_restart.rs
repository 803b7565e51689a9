//! Postgres crash-restarted (immediate mode) in the middle of a run, on a private cluster: every
//! task still succeeds exactly once, and the worker processes reconnect by themselves. Once with
//! claims held in memory (the default) and once with every claim in its row
//! (`sluice.claims_in_memory = 0`), where the attempts in flight are recorded as lost.

use serde_json::json;
use sluice_tests::*;
use std::time::Duration;

const WORKER: &str = env!("CARGO_BIN_EXE_test_worker");
const TASKS: i32 = 300;

#[tokio::test]
async fn postgres_restarted_in_immediate_mode_mid_run_loses_nothing_and_completes_nothing_twice() {
    crash_mid_run("restart", &[], false).await;
}

#[tokio::test]
async fn with_claims_in_rows_the_attempts_in_flight_at_a_crash_are_recorded_as_lost() {
    crash_mid_run("restart_rows", &[("sluice.claims_in_memory", "0")], true).await;
}

/// `lost_recorded`: the attempts in flight at the crash must show as `lost` in
/// sluice.task_attempts (claims in rows); with claims in memory the crash takes them and the
/// tasks run again under the same attempt numbers.
async fn crash_mid_run(name: &str, settings: &[(&str, &str)], lost_recorded: bool) {
    let cluster = PrivateCluster::start(name, true, settings);
    let client = connect(&cluster.dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(&client, "restart", "").await;
    let mut workers: Vec<WorkerProcess> = (0..2)
        .map(|_| WorkerProcess::spawn(WORKER, &cluster.dsn(), &task, 4))
        .collect();
    // Each completion commits together with one effect row (ctx.transaction + commit_with), so
    // effect rows count completions that really committed.
    let ids = enqueue_copies(
        &client,
        &task,
        json!({"effect": true, "sleep_ms": 40}),
        TASKS,
    )
    .await;
    wait_succeeded(&client, &ids, i64::from(TASKS / 3), Duration::from_secs(30)).await;
    drop(client);
    cluster.restart_immediate();

    let client = connect(&cluster.dsn()).await;
    let restarted_at: std::time::SystemTime = client
        .query_one("SELECT pg_postmaster_start_time()", &[])
        .await
        .unwrap()
        .get(0);
    wait_finished(&client, &ids, Duration::from_secs(90)).await;
    let unsucceeded: Vec<i64> = client
        .query(
            "SELECT id FROM sluice.tasks WHERE id = ANY($1) AND status <> 'succeeded'",
            &[&ids],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        status_summary(&client, &ids).await,
        format!("succeeded={TASKS}"),
        "every task must succeed; not succeeded:\n  {}\npostgres log tail:\n{}",
        describe_tasks(&client, &unsucceeded).await,
        cluster.log_tail(30)
    );

    // Exactly one committed completion per task.
    let wrong: Vec<(i64, i64)> = client
        .query(
            "SELECT t.id, count(e.task_id) FROM unnest($1::bigint[]) t(id)
               LEFT JOIN sluice_test.effect e ON e.task_id = t.id
              GROUP BY t.id HAVING count(e.task_id) <> 1 ORDER BY t.id",
            &[&ids],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        wrong.is_empty(),
        "tasks without exactly one committed completion (id, count): {wrong:?}"
    );
    // The committed write belongs to the attempt that completed the task.
    let mismatched: i64 = client
        .query_one(
            "SELECT count(*) FROM sluice.tasks t JOIN sluice_test.effect e ON e.task_id = t.id
              WHERE t.id = ANY($1) AND (e.attempt <> t.attempt OR (t.output->>'attempt')::int <> t.attempt)",
            &[&ids],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        mismatched, 0,
        "effect attempt, output attempt and final attempt must agree"
    );

    // The crash really happened mid-run: attempts were in flight and work was left to do.
    let r = client
        .query_one(
            "SELECT count(*) FILTER (WHERE finished_at > pg_postmaster_start_time()),
                    (SELECT count(*) FROM sluice.task_attempts a WHERE a.task_id = ANY($1) AND a.outcome = 'lost')
               FROM sluice.tasks WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap();
    let (after_restart, lost): (i64, i64) = (r.get(0), r.get(1));
    assert!(
        after_restart >= 50,
        "only {after_restart} tasks finished after the restart: it was not mid-run"
    );
    // Re-executions of attempts in flight at the crash are allowed, and prove there were some.
    // An attempt claimed in memory (extension/src/claims.rs) leaves no 'lost' record: the crash
    // took the claim, and its task ran again from the row, still queued.
    let reexecuted: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT task_id FROM sluice_test.execution WHERE task_id = ANY($1)
                                    GROUP BY task_id HAVING count(*) > 1) s",
            &[&ids],
        )
        .await
        .unwrap()
        .get(0);
    eprintln!("restart test: {after_restart} tasks finished after the restart, {lost} lost attempts, {reexecuted} tasks executed more than once");
    assert!(
        reexecuted >= 1,
        "no attempt was in flight at the crash (no task ran twice, {lost} lost attempts recorded)"
    );
    if lost_recorded {
        assert!(
            lost >= 1,
            "claims in rows: the attempts in flight at the crash must be recorded as lost"
        );
    }

    // The same two processes reconnected by themselves: each registered again after the
    // restart and completed tasks under that registration.
    for worker in &mut workers {
        assert!(
            worker.is_running(),
            "worker {} died; stderr:\n{}",
            worker.name(),
            worker.stderr()
        );
        let r = client
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE w.registered_at > $2),
                        (SELECT count(*) FROM sluice.tasks t
                           JOIN sluice.workers x ON x.id = t.worker_id
                          WHERE x.name = $1 AND x.registered_at > $2 AND t.status = 'succeeded'
                            AND t.id = ANY($3))
                   FROM sluice.workers w WHERE w.name = $1 AND w.stopped_at IS NULL",
                &[&worker.name(), &restarted_at, &ids],
            )
            .await
            .unwrap();
        let live = (r.get::<_, i64>(0), r.get::<_, i64>(1));
        let completed_after: i64 = r.get(2);
        assert_eq!(
            live,
            (1, 1),
            "worker {} should have one live registration (live, made after the restart); stderr:\n{}",
            worker.name(),
            worker.stderr()
        );
        assert!(
            completed_after > 0,
            "worker {} completed nothing after the restart; stderr:\n{}",
            worker.name(),
            worker.stderr()
        );
    }
}
