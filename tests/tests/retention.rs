//! Retention: the scheduler deletes finished tasks (with their attempts) once
//! `sluice.succeeded_task_retention` / `sluice.failed_task_retention` have passed since they
//! finished, never earlier, and never a queued or running one. A private cluster, since the
//! settings are cluster-wide and would delete other tests' tasks.

use serde_json::json;
use sluice_tests::*;
use std::time::Duration;

const WORKER: &str = env!("CARGO_BIN_EXE_test_worker");

#[tokio::test]
async fn finished_tasks_are_deleted_after_their_retention_and_no_sooner() {
    let cluster = PrivateCluster::start(
        "retention",
        true,
        &[
            ("sluice.succeeded_task_retention", "1"),
            ("sluice.failed_task_retention", "4"),
        ],
    );
    let client = connect(&cluster.dsn()).await;
    create_test_tables(&client).await;
    // Every deletion from task_run, as the deleting transaction saw the row.
    client
        .batch_execute(
            "CREATE TABLE sluice_test.deleted (id bigint, status text, finished_at timestamptz,
                                               deleted_at timestamptz);
             CREATE FUNCTION sluice_test.log_delete() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO sluice_test.deleted
                 VALUES (OLD.id, OLD.status, OLD.finished_at, clock_timestamp());
                 RETURN OLD;
             END $$;
             CREATE TRIGGER log_delete AFTER DELETE ON sluice.task_run
                 FOR EACH ROW EXECUTE FUNCTION sluice_test.log_delete();
             CREATE TABLE sluice_test.deleted_run (id bigint, status text,
                                                   finished_at timestamptz, deleted_at timestamptz);
             CREATE FUNCTION sluice_test.log_run_delete() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO sluice_test.deleted_run
                 VALUES (OLD.id, OLD.status, OLD.finished_at, clock_timestamp());
                 RETURN OLD;
             END $$;
             CREATE TRIGGER log_run_delete AFTER DELETE ON sluice.workflow_run
                 FOR EACH ROW EXECUTE FUNCTION sluice_test.log_run_delete();",
        )
        .await
        .unwrap();
    let task = define_unique_task(&client, "retention", ", retries => 1").await;
    let _worker = WorkerProcess::spawn(WORKER, &cluster.dsn(), &task, 8);
    let succeeding = enqueue_copies(&client, &task, json!({"sleep_ms": 10}), 40).await;
    // Fail once, then fail for good: each leaves an attempt row.
    let failing = enqueue_copies(&client, &task, json!({"fail_attempts": 2}), 5).await;
    let delayed: i64 = client
        .query_one(
            "SELECT sluice.enqueue($1, '{}', run_at => now() + interval '1 hour')",
            &[&task],
        )
        .await
        .unwrap()
        .get(0);
    let all: Vec<i64> = [succeeding.clone(), failing.clone()].concat();
    let workflow = unique("retention_wf");
    client
        .execute(
            "SELECT sluice.define_workflow($1, jsonb_build_object('steps',
                 jsonb_build_array(jsonb_build_object('name', 'only', 'task', $2::text))))",
            &[&workflow, &task],
        )
        .await
        .unwrap();
    let run_id: i64 = client
        .query_one("SELECT sluice.run_workflow($1, '{}')", &[&workflow])
        .await
        .unwrap()
        .get(0);
    wait_finished(&client, &all, Duration::from_secs(30)).await;

    let remaining = |ids: Vec<i64>| {
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT count(*) FROM sluice.task_run WHERE id = ANY($1)",
                    &[&ids],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    wait_until(
        Duration::from_secs(20),
        "succeeded tasks to be deleted",
        || async {
            match remaining(succeeding.clone()).await {
                0 => Ok(()),
                n => Err(format!("{n} of {} left", succeeding.len())),
            }
        },
    )
    .await;
    wait_until(
        Duration::from_secs(20),
        "failed tasks to be deleted",
        || async {
            match remaining(failing.clone()).await {
                0 => Ok(()),
                n => Err(format!("{n} of {} left", failing.len())),
            }
        },
    )
    .await;

    // Every deletion was of a finished task, after its status's retention.
    let early: Vec<String> = client
        .query(
            "SELECT format('%s %s finished %s deleted %s', id, status, finished_at, deleted_at)
               FROM sluice_test.deleted
              WHERE finished_at IS NULL OR status NOT IN ('succeeded', 'failed', 'cancelled')
                 OR deleted_at < finished_at + CASE status WHEN 'succeeded' THEN interval '1 s'
                                                           ELSE interval '4 s' END",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        early.is_empty(),
        "deleted too early or unfinished: {early:?}"
    );
    let deleted: i64 = client
        .query_one(
            "SELECT count(DISTINCT id) FROM sluice_test.deleted WHERE id = ANY($1)",
            &[&all],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(deleted, all.len() as i64);
    // Their attempts went with them; the delayed task is still queued.
    let attempts: i64 = client
        .query_one(
            "SELECT count(*) FROM sluice.task_attempt WHERE task_id = ANY($1)",
            &[&failing],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 0, "attempt rows of deleted tasks are left behind");
    let (status, _, _) = task_state(&client, delayed).await;
    assert_eq!(status, "queued");
    // The workflow run (it succeeded) goes too, with its steps, and not before its retention.
    wait_until(
        Duration::from_secs(20),
        "the finished run to be deleted",
        || async {
            let left: i64 = client
                .query_one(
                    "SELECT (SELECT count(*) FROM sluice.workflow_run WHERE id = $1)
                      + (SELECT count(*) FROM sluice.workflow_step WHERE run_id = $1)",
                    &[&run_id],
                )
                .await
                .unwrap()
                .get(0);
            if left == 0 {
                Ok(())
            } else {
                Err(format!("{left} rows left"))
            }
        },
    )
    .await;
    let run_deleted: Vec<(String, bool)> = client
        .query(
            "SELECT status, deleted_at >= finished_at + interval '1 s'
               FROM sluice_test.deleted_run WHERE id = $1",
            &[&run_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(run_deleted, vec![("succeeded".to_string(), true)]);
    assert!(
        !cluster.log().contains("deleting finished"),
        "{}",
        cluster.log_tail(30)
    );
}

/// A backlog of finished tasks past their retention, several purge batches long, is deleted in
/// one go, batch after batch, not a batch per purge interval (a second): the scheduler purges
/// in short batches so that it is never long away from assigning, and continues while a batch
/// comes back full.
#[tokio::test]
async fn a_backlog_of_finished_tasks_is_purged_batch_after_batch_without_waiting_a_second_each() {
    // Kept for an hour while the backlog builds up; then the retention drops to a second and
    // all of it is due at once.
    let cluster = PrivateCluster::start(
        "retention_backlog",
        true,
        &[("sluice.succeeded_task_retention", "3600")],
    );
    let client = connect(&cluster.dsn()).await;
    create_test_tables(&client).await;
    client
        .batch_execute(
            "CREATE TABLE sluice_test.deleted (id bigint, finished_at timestamptz,
                                               deleted_at timestamptz);
             CREATE FUNCTION sluice_test.log_delete() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO sluice_test.deleted VALUES (OLD.id, OLD.finished_at, clock_timestamp());
                 RETURN OLD;
             END $$;
             CREATE TRIGGER log_delete AFTER DELETE ON sluice.task_run
                 FOR EACH ROW EXECUTE FUNCTION sluice_test.log_delete();",
        )
        .await
        .unwrap();
    let task = define_unique_task(&client, "retention_backlog", "").await;
    // Six purge batches (1,000 each).
    let ids = enqueue_copies(&client, &task, json!({}), 6_000).await;
    let _worker = WorkerProcess::spawn(WORKER, &cluster.dsn(), &task, 100);
    wait_finished(&client, &ids, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let due_since: std::time::SystemTime =
        client.query_one("SELECT now()", &[]).await.unwrap().get(0);
    client
        .batch_execute("ALTER SYSTEM SET sluice.succeeded_task_retention = 1")
        .await
        .unwrap();
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        "the backlog to be deleted",
        || async {
            let left: i64 = client
                .query_one(
                    "SELECT count(*) FROM sluice.task_run WHERE id = ANY($1)",
                    &[&ids],
                )
                .await
                .unwrap()
                .get(0);
            match left {
                0 => Ok(()),
                n => Err(format!("{n} of {} left", ids.len())),
            }
        },
    )
    .await;
    let (deleted, early, took_s): (i64, i64, f64) = {
        let r = client
            .query_one(
                "SELECT count(DISTINCT id),
                        count(*) FILTER (WHERE deleted_at < finished_at + interval '1 s'),
                        extract(epoch FROM max(deleted_at) - $2::timestamptz)::float8
                   FROM sluice_test.deleted WHERE id = ANY($1)",
                &[&ids, &due_since],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!(deleted, ids.len() as i64);
    assert_eq!(early, 0, "tasks deleted before their retention");
    // The first purge after the reload comes within a second; one batch a second after it
    // would take five more.
    assert!(
        took_s < 3.5,
        "the backlog took {took_s:.2} s to be deleted once it was due"
    );
    // The scheduler is the only one deleting here: its deletions reach the statistics that
    // autovacuum and monitoring read, not only at its exit.
    wait_until(
        Duration::from_secs(10),
        "the purge's deletions in pg_stat_user_tables",
        || async {
            let deleted: i64 = client
                .query_one(
                    "SELECT n_tup_del FROM pg_stat_user_tables
                      WHERE relid = 'sluice.task_run'::regclass",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if deleted >= ids.len() as i64 {
                Ok(())
            } else {
                Err(format!("n_tup_del is {deleted}"))
            }
        },
    )
    .await;
}

/// The history around tasks follows retention too: pushed events after
/// `sluice.event_retention` (never sooner), fired cron ticks with the succeeded tasks, and a
/// durable task's record with its task.
#[tokio::test]
async fn events_cron_ticks_and_durable_records_are_deleted_after_their_retention() {
    let cluster = PrivateCluster::start(
        "history_retention",
        true,
        &[
            ("sluice.event_retention", "3"),
            ("sluice.succeeded_task_retention", "2"),
        ],
    );
    let client = connect(&cluster.dsn()).await;
    create_durable_test_tables(&client).await;
    client
        .batch_execute(
            "CREATE TABLE sluice_test.deleted_event (id bigint, pushed_at timestamptz,
                                                     deleted_at timestamptz);
             CREATE FUNCTION sluice_test.log_event_delete() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO sluice_test.deleted_event VALUES (OLD.id, OLD.pushed_at, clock_timestamp());
                 RETURN OLD;
             END $$;
             CREATE TRIGGER log_event_delete AFTER DELETE ON sluice.event
                 FOR EACH ROW EXECUTE FUNCTION sluice_test.log_event_delete();",
        )
        .await
        .unwrap();
    let task = define_unique_task(&client, "history", "").await;
    let _worker = WorkerProcess::spawn(WORKER, &cluster.dsn(), &task, 4);

    let events: Vec<i64> = client
        .query(
            "SELECT sluice.push_event('history:' || n, '{}') FROM generate_series(1, 5) n",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let durable = enqueue_sql(&client, &task, json!({"durable_memo": {"steps": 2}})).await;
    let schedule = unique("history_cron");
    client
        .execute(
            "SELECT sluice.schedule_cron($1, '* * * * * *', $2)",
            &[&schedule, &task],
        )
        .await
        .unwrap();
    let count = |sql: &'static str, id: i64| {
        let client = &client;
        async move {
            client
                .query_one(sql, &[&id])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    wait_succeeded(&client, &[durable], 1, Duration::from_secs(30)).await;
    assert_eq!(
        count(
            "SELECT count(*) FROM sluice.durable_steps WHERE task_id = $1",
            durable
        )
        .await,
        2,
        "the durable task's record is kept while the task is"
    );
    wait_until(Duration::from_secs(30), "3 cron ticks", || async {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM sluice.cron_fire WHERE schedule = $1",
                &[&schedule],
            )
            .await
            .unwrap()
            .get(0);
        if n >= 3 {
            Ok(())
        } else {
            Err(format!("{n} fired"))
        }
    })
    .await;
    client
        .execute("SELECT sluice.unschedule_cron($1)", &[&schedule])
        .await
        .unwrap();

    wait_until(
        Duration::from_secs(30),
        "the events to be deleted",
        || async {
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM sluice.events WHERE id = ANY($1)",
                    &[&events],
                )
                .await
                .unwrap()
                .get(0);
            if n == 0 {
                Ok(())
            } else {
                Err(format!("{n} left"))
            }
        },
    )
    .await;
    let early: Vec<String> = client
        .query(
            "SELECT format('%s pushed %s deleted %s', id, pushed_at, deleted_at)
               FROM sluice_test.deleted_event WHERE deleted_at < pushed_at + interval '3 s'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        early.is_empty(),
        "events deleted before their retention: {early:?}"
    );
    wait_until(
        Duration::from_secs(30),
        "the durable record to go with its task",
        || async {
            let task_left: i64 = client
                .query_one(
                    "SELECT count(*) FROM sluice.task_run WHERE id = $1",
                    &[&durable],
                )
                .await
                .unwrap()
                .get(0);
            let steps_left: i64 = client
                .query_one(
                    "SELECT count(*) FROM sluice.durable_step WHERE task_id = $1",
                    &[&durable],
                )
                .await
                .unwrap()
                .get(0);
            if task_left == 0 && steps_left == 0 {
                Ok(())
            } else {
                Err(format!("task {task_left}, steps {steps_left}"))
            }
        },
    )
    .await;
    wait_until(
        Duration::from_secs(30),
        "the fired ticks to be deleted",
        || async {
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM sluice.cron_fire WHERE schedule = $1",
                    &[&schedule],
                )
                .await
                .unwrap()
                .get(0);
            if n == 0 {
                Ok(())
            } else {
                Err(format!("{n} left"))
            }
        },
    )
    .await;
}
