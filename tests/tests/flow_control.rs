//! Flow control through the real scheduler and real worker processes: concurrency keys
//! (`max_runs` per key, round robin across keys, the two cancel strategies) and rate limits
//! (never more starts in a window than the limit, and close to the limit over a longer run).
//! Overlaps and start times come from the handlers' own log (sluice_test.execution).

use serde_json::json;
use sluice_tests::*;
use std::time::Duration;
use tokio_postgres::Client;

const WORKER: &str = env!("CARGO_BIN_EXE_test_worker");

/// Per concurrency key: the most executions that overlapped one execution's start, counting
/// executions started after `after` (SQL, e.g. '-infinity' or pg_postmaster_start_time()).
async fn max_overlap_per_key(client: &Client, ids: &[i64], after: &str) -> Vec<(String, i64)> {
    client
        .query(
            &format!(
                "WITH e AS (
                     SELECT x.task_id, x.started_at,
                            coalesce(x.finished_at, 'infinity') AS finished_at,
                            t.concurrency_key AS key
                       FROM sluice_test.execution x JOIN sluice.task_run t ON t.id = x.task_id
                      WHERE x.task_id = ANY($1) AND x.started_at > {after})
                 SELECT e.key, max(o.n)
                   FROM e CROSS JOIN LATERAL (
                         SELECT count(*) AS n FROM e y
                          WHERE y.key = e.key AND y.started_at <= e.started_at
                            AND y.finished_at > e.started_at) o
                  GROUP BY e.key ORDER BY e.key"
            ),
            &[&ids],
        )
        .await
        .expect("overlap per key")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Claims (epoch seconds, sorted) never exceed `limit` in any window of `window` seconds.
fn assert_window_bound(starts: &[f64], limit: i64, window: f64) {
    for (i, t) in starts.iter().enumerate() {
        let in_window = starts[i..].iter().take_while(|&&u| u < t + window).count() as i64;
        assert!(
            in_window <= limit,
            "{in_window} claims within {window} s from claim {i}, limit {limit}"
        );
    }
}

async fn executed_once(client: &Client, ids: &[i64]) {
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT task_id) FROM sluice_test.execution
              WHERE task_id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap();
    let (runs, tasks): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(
        (runs, tasks),
        (ids.len() as i64, ids.len() as i64),
        "every task executed exactly once"
    );
}

#[tokio::test]
async fn no_key_ever_runs_more_than_max_runs_under_load() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(
        &client,
        "conc_load",
        ", concurrency_key => '$.user', max_runs => 2",
    )
    .await;
    let _workers: Vec<WorkerProcess> = (0..3)
        .map(|_| WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 10))
        .collect();
    // 1,200 tasks over 10 keys (and some without a key: the shared default key): fewer keys
    // than slots, so the limit binds.
    let inputs: Vec<serde_json::Value> = (0..1200)
        .map(|i| {
            if i % 100 == 99 {
                json!({"sleep_ms": 5})
            } else {
                json!({"user": format!("u{}", i % 10), "sleep_ms": 5})
            }
        })
        .collect();
    let ids = enqueue_inputs(&client, &task, &inputs).await;
    // Sampled from the view while the run is on: never over max_runs.
    let mut most_running = 0i64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let row = client
            .query_one(
                "SELECT coalesce(max(running), 0), coalesce(sum(running + waiting), 0)::bigint
                   FROM sluice.concurrency WHERE task_name = $1",
                &[&task],
            )
            .await
            .unwrap();
        let (running, open): (i64, i64) = (row.get(0), row.get(1));
        assert!(
            running <= 2,
            "sluice.concurrency showed {running} running for one key"
        );
        most_running = most_running.max(running);
        if open == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_finished(&client, &ids, Duration::from_secs(30)).await;
    assert_eq!(status_summary(&client, &ids).await, "succeeded=1200");
    executed_once(&client, &ids).await;
    let overlaps = max_overlap_per_key(&client, &ids, "'-infinity'").await;
    assert_eq!(
        overlaps.len(),
        11,
        "10 keys and the default one: {overlaps:?}"
    );
    for (key, overlap) in &overlaps {
        assert!(
            *overlap <= 2,
            "key {key:?} ran {overlap} at once: {overlaps:?}"
        );
    }
    assert!(
        overlaps.iter().any(|(_, n)| *n == 2),
        "the limit is reached, not just respected: {overlaps:?}"
    );
    assert!(most_running >= 1);
}

#[tokio::test]
async fn a_key_that_arrives_late_is_served_within_a_round() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(
        &client,
        "conc_fair",
        ", concurrency_key => '$.user', max_runs => 5",
    )
    .await;
    // Two slots: key A alone could hold both for its whole backlog.
    let _worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 2);
    let a_ids = enqueue_copies(&client, &task, json!({"user": "A", "sleep_ms": 10}), 1000).await;
    wait_execution(&client, a_ids[0], None).await;
    let b_ids = enqueue_copies(&client, &task, json!({"user": "B", "sleep_ms": 10}), 10).await;
    wait_finished(&client, &b_ids, Duration::from_secs(60)).await;
    // The starts after B's enqueue committed, in order.
    let order: Vec<String> = client
        .query(
            "SELECT t.concurrency_key FROM sluice_test.execution x
               JOIN sluice.task_run t ON t.id = x.task_id
              WHERE x.task_id = ANY($1)
                AND x.started_at > (SELECT max(enqueued_at) FROM sluice.task_run WHERE id = ANY($2))
              ORDER BY x.started_at LIMIT 22",
            &[&[a_ids.clone(), b_ids.clone()].concat(), &b_ids],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The first 20 admissions after B arrived, seen as handler starts: the worker's two slots
    // may hold A tasks admitted just before B arrived that start just after, so 22 starts.
    let b_starts = order.iter().filter(|k| *k == "B").count();
    assert_eq!(
        b_starts, 10,
        "all 10 of B's tasks start within the first 20 admissions after they arrive: {order:?}"
    );
    client
        .execute(
            "SELECT sluice.cancel(id) FROM unnest($1::bigint[]) AS id",
            &[&a_ids],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn cancel_newest_cancels_the_newcomer_and_cancel_in_progress_stops_the_oldest() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let newest = define_unique_task(
        &client,
        "conc_newest",
        ", concurrency_key => '$.k', max_runs => 1, concurrency_strategy => 'cancel_newest'",
    )
    .await;
    let in_progress = define_unique_task(
        &client,
        "conc_inprog",
        ", concurrency_key => '$.k', max_runs => 1, concurrency_strategy => 'cancel_in_progress'",
    )
    .await;
    let _w1 = WorkerProcess::spawn(WORKER, &shared_dsn(), &newest, 5);
    let _w2 = WorkerProcess::spawn(WORKER, &shared_dsn(), &in_progress, 5);

    // cancel_newest: the running task keeps its place, the new one for its key is cancelled.
    let first = enqueue_sql(&client, &newest, json!({"k": "x", "sleep_ms": 1500})).await;
    wait_execution(&client, first, None).await;
    let second = enqueue_sql(&client, &newest, json!({"k": "x"})).await;
    let other_key = enqueue_sql(&client, &newest, json!({"k": "y"})).await;
    wait_finished(&client, &[second, other_key], Duration::from_secs(10)).await;
    let (status, _, reason) = task_state(&client, second).await;
    assert_eq!(status, "cancelled");
    assert!(
        reason.as_deref().unwrap_or("").contains("cancel_newest"),
        "the reason names the strategy: {reason:?}"
    );
    assert_eq!(executions(&client, second).await, vec![]);
    assert_eq!(task_state(&client, other_key).await.0, "succeeded");
    wait_finished(&client, &[first], Duration::from_secs(10)).await;
    assert_eq!(task_state(&client, first).await.0, "succeeded");

    // cancel_in_progress: the newest task wins; the running one hears its cancellation signal.
    let old = enqueue_sql(&client, &in_progress, json!({"k": "x", "sleep_ms": 20000})).await;
    wait_execution(&client, old, None).await;
    let new = enqueue_sql(&client, &in_progress, json!({"k": "x", "sleep_ms": 10})).await;
    wait_execution(&client, old, Some("cancelled")).await;
    wait_finished(&client, &[old, new], Duration::from_secs(10)).await;
    let (status, _, reason) = task_state(&client, old).await;
    assert_eq!(status, "cancelled");
    assert!(
        reason
            .as_deref()
            .unwrap_or("")
            .contains("cancel_in_progress"),
        "the reason names the strategy: {reason:?}"
    );
    assert_eq!(task_state(&client, new).await.0, "succeeded");
}

#[tokio::test]
async fn a_rate_limit_is_never_exceeded_and_is_used_in_full() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let key = unique("rl");
    const LIMIT: i64 = 20;
    client
        .execute(
            "SELECT sluice.set_rate_limit($1, $2::int, '1 second')",
            &[&key, &(LIMIT as i32)],
        )
        .await
        .unwrap();
    let task = define_unique_task(
        &client,
        "rate",
        &format!(", rate_limits => '[{{\"key\": \"{key}\"}}]'"),
    )
    .await;
    let _workers: Vec<WorkerProcess> = (0..3)
        .map(|_| WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 10))
        .collect();
    let ids = enqueue_copies(&client, &task, json!({}), 170).await;
    wait_finished(&client, &ids, Duration::from_secs(60)).await;
    assert_eq!(status_summary(&client, &ids).await, "succeeded=170");
    executed_once(&client, &ids).await;

    // Starts as the claims recorded them (sluice.tasks.started_at). A claim follows the
    // scheduler's admission by a few milliseconds, and not always by the same amount, so the
    // windows checked are 50 ms shorter than the limit's second.
    let starts: Vec<f64> = client
        .query(
            "SELECT extract(epoch FROM started_at)::float8 FROM sluice.tasks
              WHERE id = ANY($1) ORDER BY started_at",
            &[&ids],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_window_bound(&starts, LIMIT, 0.95);
    // Used in full: the first LIMIT start at once, then LIMIT more each second. In the 7 s
    // from the first start, 7 x LIMIT could start; allow 5% less.
    let first = starts[0];
    let within = starts.iter().filter(|&&t| t < first + 7.0).count() as f64;
    let possible = (7 * LIMIT) as f64;
    assert!(
        within >= 0.95 * possible,
        "only {within} starts in the first 7 s, the limit allows {possible}"
    );
}

#[tokio::test]
async fn a_changed_limit_applies_to_the_next_assignment_and_the_view_shows_usage() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let key = unique("rl_change");
    client
        .execute("SELECT sluice.set_rate_limit($1, 2, '1 hour')", &[&key])
        .await
        .unwrap();
    let task = define_unique_task(
        &client,
        "rate_change",
        &format!(", rate_limits => '[{{\"key\": \"{key}\", \"units\": 1}}]'"),
    )
    .await;
    let _worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 10);
    let ids = enqueue_copies(&client, &task, json!({}), 5).await;
    wait_finished(&client, &ids[..2], Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        status_summary(&client, &ids).await,
        "queued=3 succeeded=2",
        "two per hour: the rest waits (it does not fail)"
    );
    let row = client
        .query_one(
            "SELECT units_left, refills_at > now() + interval '59 minutes' FROM sluice.rate_limits
              WHERE key = $1",
            &[&key],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i32>(0), row.get::<_, bool>(1)), (0, true));
    // Raising the limit lets the waiting tasks through without any other nudge.
    client
        .execute("SELECT sluice.set_rate_limit($1, 5, '1 hour')", &[&key])
        .await
        .unwrap();
    wait_finished(&client, &ids, Duration::from_secs(10)).await;
    assert_eq!(status_summary(&client, &ids).await, "succeeded=5");
}

#[tokio::test]
async fn dynamic_keys_limit_each_value_separately() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let task = define_unique_task(
        &client,
        "rate_dyn",
        r#", rate_limits => '[{"key_path": "$.user", "units_path": "$.cost", "limit": 3, "per": "1 hour"}]'"#,
    )
    .await;
    let _worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 10);
    // Keys are fleet-wide: values unique to this run.
    let (a, b) = (unique("user_a"), unique("user_b"));
    let mut ids = Vec::new();
    for input in [
        json!({"user": a, "cost": 2}),
        json!({"user": a, "cost": 2}),
        json!({"user": b, "cost": 3}),
        json!({"user": a, "cost": 1}),
    ] {
        ids.push(enqueue_sql(&client, &task, input).await);
    }
    wait_finished(&client, &[ids[0], ids[2], ids[3]], Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // a: 2 + 1 fit in 3, the second 2 does not; b: 3 fits.
    assert_eq!(task_state(&client, ids[1]).await.0, "queued");
    for i in [0, 2, 3] {
        assert_eq!(task_state(&client, ids[i]).await.0, "succeeded", "task {i}");
    }
    let left: Vec<(String, i32)> = client
        .query(
            "SELECT key, units_left FROM sluice.rate_limits WHERE key IN ($1, $2) AND kind = 'dynamic'
              ORDER BY key",
            &[&a, &b],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(left, vec![(a.clone(), 0), (b.clone(), 0)]);
    client
        .execute("SELECT sluice.cancel($1)", &[&ids[1]])
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_flow_control_definitions_get_clear_errors() {
    let client = connect(&shared_dsn()).await;
    let cases: [(&str, &str, &str); 9] = [
        (
            ", concurrency_key => '$.[', max_runs => 2",
            "22023",
            "not a valid jsonpath",
        ),
        (
            ", concurrency_key => '$.a', max_runs => 0",
            "22023",
            "got 0",
        ),
        (
            ", concurrency_key => '$.a', max_runs => 1, concurrency_strategy => 'lifo'",
            "22023",
            "'lifo'",
        ),
        (", max_runs => 3", "22023", "need a concurrency_key"),
        (
            r#", rate_limits => '[{"key": "no_such_limit_anywhere"}]'"#,
            "42704",
            "no_such_limit_anywhere",
        ),
        (
            r#", rate_limits => '[{"key_path": "$.u", "limit": 0, "per": "1 minute"}]'"#,
            "22023",
            "limit must be a positive",
        ),
        (
            r#", rate_limits => '[{"key_path": "$.u", "limit": 5, "per": "-1 minute"}]'"#,
            "22023",
            "per must be a positive interval",
        ),
        (
            r#", rate_limits => '[{"key_path": "$.u", "limit": 5, "per": "1 minute", "unit": 2}]'"#,
            "22023",
            "unknown fields",
        ),
        (
            r#", rate_limits => '{"key": "x"}'"#,
            "22023",
            "must be a JSON array",
        ),
    ];
    for (options, code, text) in cases {
        let err = client
            .execute(
                &format!("SELECT sluice.define_task($1 {options})"),
                &[&unique("bad_flow")],
            )
            .await
            .expect_err(options);
        let db = err.as_db_error().expect("a database error");
        assert_eq!(db.code().code(), code, "{options}: {}", db.message());
        assert!(db.message().contains(text), "{options}: {}", db.message());
    }
    for (args, text) in [
        ("'k', 0, '1 second'", "max_units must be positive"),
        ("'k', 5, '0 seconds'", "per must be a positive interval"),
        ("'', 5, '1 second'", "non-empty"),
    ] {
        let err = client
            .execute(&format!("SELECT sluice.set_rate_limit({args})"), &[])
            .await
            .expect_err(args);
        let db = err.as_db_error().expect("a database error");
        assert_eq!(db.code().code(), "22023", "{args}");
        assert!(db.message().contains(text), "{args}: {}", db.message());
    }
    // Units that can never fit are refused at enqueue, naming the value.
    let task = define_unique_task(
        &client,
        "bad_units",
        r#", rate_limits => '[{"key_path": "$.u", "units_path": "$.n", "limit": 5, "per": "1 minute"}]'"#,
    )
    .await;
    for (input, text) in [
        (json!({"u": "a", "n": 6}), "more than its limit of 5"),
        (json!({"u": "a", "n": "x"}), "got \"x\""),
        (json!({"u": "a", "n": 0}), "got 0"),
    ] {
        let err = client
            .query_one("SELECT sluice.enqueue($1, $2)", &[&task, &input])
            .await
            .expect_err("bad units");
        let db = err.as_db_error().expect("a database error");
        assert_eq!(db.code().code(), "22023", "{input}");
        assert!(db.message().contains(text), "{input}: {}", db.message());
    }
}

/// Postgres crash-restarted (immediate mode) mid-run with a concurrency rule and a rate limit
/// both binding: afterwards no key runs more than max_runs, the limit holds across the
/// restart (the new scheduler counts the last window's claims), no queue is stuck, and every
/// task finishes.
#[tokio::test]
async fn limits_hold_across_an_immediate_restart_and_nothing_gets_stuck() {
    const TASKS: i32 = 150;
    const LIMIT: i64 = 25;
    let cluster = PrivateCluster::start("flow_restart", true, &[]);
    let client = connect(&cluster.dsn()).await;
    create_test_tables(&client).await;
    client
        .execute(
            "SELECT sluice.set_rate_limit('restart_rl', 25, '1 second')",
            &[],
        )
        .await
        .unwrap();
    let task = define_unique_task(
        &client,
        "flow_restart",
        r#", concurrency_key => '$.k', max_runs => 2, rate_limits => '[{"key": "restart_rl"}]'"#,
    )
    .await;
    let workers: Vec<WorkerProcess> = (0..2)
        .map(|_| WorkerProcess::spawn(WORKER, &cluster.dsn(), &task, 8))
        .collect();
    let inputs: Vec<serde_json::Value> = (0..TASKS)
        .map(|i| json!({"k": format!("k{}", i % 5), "sleep_ms": 30}))
        .collect();
    let ids = enqueue_inputs(&client, &task, &inputs).await;
    wait_succeeded(&client, &ids, i64::from(TASKS / 3), Duration::from_secs(30)).await;
    drop(client);
    cluster.restart_immediate();
    let client = connect(&cluster.dsn()).await;
    wait_finished(&client, &ids, Duration::from_secs(60)).await;
    assert_eq!(
        status_summary(&client, &ids).await,
        format!("succeeded={TASKS}"),
        "postgres log tail:\n{}",
        cluster.log_tail(30)
    );

    // Concurrency after the restart, from the handlers' log (a handler of an attempt lost in
    // the crash may still have been running at the restart, so only later starts count).
    let over: Vec<(String, i64)> = max_overlap_per_key(&client, &ids, "pg_postmaster_start_time()")
        .await
        .into_iter()
        .filter(|(_, n)| *n > 2)
        .collect();
    assert!(
        over.is_empty(),
        "keys over max_runs after the restart: {over:?}"
    );

    // The rate limit across the restart, over every durable claim (final attempts and the
    // attempts lost in the crash), with windows 50 ms short of the second as in the
    // plain rate-limit test.
    let starts: Vec<f64> = client
        .query(
            "SELECT extract(epoch FROM s)::float8 FROM (
                 SELECT started_at AS s FROM sluice.tasks WHERE id = ANY($1)
                 UNION ALL
                 SELECT started_at FROM sluice.task_attempts
                  WHERE task_id = ANY($1) AND outcome <> 'succeeded' AND started_at IS NOT NULL) x
              ORDER BY s",
            &[&ids],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_window_bound(&starts, LIMIT, 0.95);
    drop(workers);
}

/// A worker's free slot goes to the highest-priority task it can run, across the task names
/// it serves (then the oldest): one slot, a queue of low-priority tasks of one name, then
/// high-priority ones of another name and one enqueued with a priority above its definition's.
#[tokio::test]
async fn a_free_slot_goes_to_the_highest_priority_task_across_names() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let low = define_unique_task(&client, "prio_low", ", priority => 1").await;
    let high = define_unique_task(&client, "prio_high", ", priority => 5").await;
    // One worker serving both names through one slot: the raw protocol, so the test decides
    // when each task finishes.
    let worker = connect(&shared_dsn()).await;
    let worker_id: i64 = worker
        .query_one(
            "SELECT sluice.register_worker('prio', ARRAY[$1, $2], 1)",
            &[&low, &high],
        )
        .await
        .unwrap()
        .get(0);
    let first = enqueue_sql(&client, &low, json!({})).await;
    let (got, attempt) = fetch_one(&worker, worker_id).await;
    assert_eq!(got, first);
    let lows = enqueue_copies(&client, &low, json!({}), 3).await;
    let highs = enqueue_copies(&client, &high, json!({}), 2).await;
    let urgent: i64 = client
        .query_one("SELECT sluice.enqueue($1, '{}', priority => 9)", &[&low])
        .await
        .unwrap()
        .get(0);
    let mut order = Vec::new();
    let (mut current, mut current_attempt) = (got, attempt);
    for _ in 0..6 {
        worker
            .execute(
                "SELECT sluice.complete($1, $2, $3)",
                &[&worker_id, &current, &current_attempt],
            )
            .await
            .unwrap();
        let next = fetch_one(&worker, worker_id).await;
        order.push(next.0);
        (current, current_attempt) = next;
    }
    let expected: Vec<i64> = [vec![urgent], highs.clone(), lows.clone()].concat();
    assert_eq!(
        order, expected,
        "priority 9, then the two of priority 5, then the oldest of 1"
    );
    worker
        .execute("SELECT sluice.deregister_worker($1)", &[&worker_id])
        .await
        .unwrap();
}

/// Worker labels: a required label keeps the task with the workers that have it (waiting
/// while none has, then taken by a worker that gets it later); preferred labels pick the best
/// of the workers that may run it.
#[tokio::test]
async fn required_labels_pick_the_workers_and_one_that_appears_later_gets_the_task() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let zone = unique("zone");
    let task = define_unique_task(
        &client,
        "labels",
        &format!(
            r#", desired_labels => '[{{"label": "zone", "value": "{zone}", "required": true}},
                                    {{"label": "gpu", "value": 1, "weight": 10}}]'"#
        ),
    )
    .await;
    let plain = WorkerProcess::spawn_labelled(WORKER, &shared_dsn(), &task, 5, &json!({"gpu": 1}));
    // No live worker has the zone: the task waits.
    let waiting = enqueue_sql(&client, &task, json!({})).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(task_state(&client, waiting).await.0, "queued");
    // The plain worker gets the zone label: it takes the task.
    let plain_id: i64 = client
        .query_one(
            "SELECT id FROM sluice.workers WHERE name = $1 AND stopped_at IS NULL",
            &[&plain.name()],
        )
        .await
        .unwrap()
        .get(0);
    client
        .execute(
            "SELECT sluice.set_worker_labels($1, jsonb_build_object('zone', $2::text))",
            &[&plain_id, &zone],
        )
        .await
        .unwrap();
    wait_finished(&client, &[waiting], Duration::from_secs(10)).await;
    assert_eq!(task_state(&client, waiting).await.0, "succeeded");

    // Two workers in the zone, one with the preferred label: it gets every task while it has
    // free slots (4 tasks, 5 slots each).
    let gpu = WorkerProcess::spawn_labelled(
        WORKER,
        &shared_dsn(),
        &task,
        5,
        &json!({"zone": zone, "gpu": 1}),
    );
    let other =
        WorkerProcess::spawn_labelled(WORKER, &shared_dsn(), &task, 5, &json!({"zone": zone}));
    wait_until(
        Duration::from_secs(10),
        "both workers registered",
        || async {
            let n: i64 = client
            .query_one(
                "SELECT count(*) FROM sluice.workers WHERE name = ANY($1) AND stopped_at IS NULL",
                &[&vec![gpu.name(), other.name()]],
            )
            .await
            .map_err(|e| e.to_string())?
            .get(0);
            if n == 2 {
                Ok(())
            } else {
                Err(format!("{n} registered"))
            }
        },
    )
    .await;
    client
        .execute("SELECT sluice.set_worker_labels($1, '{}')", &[&plain_id])
        .await
        .unwrap();
    let ids = enqueue_copies(&client, &task, json!({"sleep_ms": 200}), 4).await;
    wait_finished(&client, &ids, Duration::from_secs(10)).await;
    let pids: Vec<i32> = client
        .query(
            "SELECT DISTINCT worker_pid FROM sluice_test.execution WHERE task_id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        pids,
        vec![gpu.pid() as i32],
        "the preferred worker ran them all"
    );

    // Bad labels are refused with 22023, naming the value.
    for (sql, text) in [
        ("SELECT sluice.set_worker_labels($1, '[1]')", "[1]"),
        (
            "SELECT sluice.set_worker_labels($1, '{\"a\": [1]}')",
            "{\"a\": [1]}",
        ),
    ] {
        let err = client.execute(sql, &[&plain_id]).await.expect_err(sql);
        let db = err.as_db_error().unwrap();
        assert_eq!(db.code().code(), "22023", "{sql}");
        assert!(db.message().contains(text), "{sql}: {}", db.message());
    }
    let err = client
        .execute(
            "SELECT sluice.define_task($1, desired_labels => '[{\"label\": \"zone\"}]')",
            &[&unique("bad_labels")],
        )
        .await
        .expect_err("a desired label without a value");
    assert_eq!(err.as_db_error().unwrap().code().code(), "22023");
}

/// A task waiting for units it can never get (its limit was lowered below them) is failed
/// with the reason instead of waiting for its schedule timeout.
#[tokio::test]
async fn a_task_that_needs_more_than_a_lowered_limit_fails_with_the_reason() {
    let client = connect(&shared_dsn()).await;
    create_test_tables(&client).await;
    let key = unique("rl_lowered");
    client
        .execute("SELECT sluice.set_rate_limit($1, 3, '1 hour')", &[&key])
        .await
        .unwrap();
    let task = define_unique_task(
        &client,
        "rate_lowered",
        &format!(", rate_limits => '[{{\"key\": \"{key}\", \"units\": 3}}]'"),
    )
    .await;
    let _worker = WorkerProcess::spawn(WORKER, &shared_dsn(), &task, 5);
    let first = enqueue_sql(&client, &task, json!({})).await;
    wait_finished(&client, &[first], Duration::from_secs(10)).await;
    let second = enqueue_sql(&client, &task, json!({})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        task_state(&client, second).await.0,
        "queued",
        "the window is used up"
    );
    client
        .execute("SELECT sluice.set_rate_limit($1, 2, '1 hour')", &[&key])
        .await
        .unwrap();
    wait_finished(&client, &[second], Duration::from_secs(10)).await;
    let (status, _, reason) = task_state(&client, second).await;
    assert_eq!(status, "failed");
    let reason = reason.unwrap_or_default();
    assert!(
        reason.contains(&key) && reason.contains("more than the rate limit allows"),
        "{reason}"
    );
    assert_eq!(executions(&client, second).await, vec![]);
}
