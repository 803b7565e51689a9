// SQL-visible behaviour inside one (rolled-back) transaction: validation, SQLSTATEs,
// idempotency, the fencing of completions. The scheduler never sees this data (the
// transaction never commits); its behaviour is tested end to end in the `tests` crate.

use pgrx::prelude::*;

fn setup() {
    Spi::run(
        "CREATE OR REPLACE FUNCTION sluice_test_sqlstate(stmt text) RETURNS text
         LANGUAGE plpgsql AS $f$
         BEGIN
             EXECUTE stmt;
             RETURN 'ok';
         EXCEPTION WHEN OTHERS THEN
             RETURN SQLSTATE || ': ' || SQLERRM;
         END $f$",
    )
    .unwrap();
}

fn outcome(stmt: &str) -> String {
    setup();
    Spi::get_one_with_args::<String>("SELECT sluice_test_sqlstate($1)", &[stmt.into()])
        .unwrap()
        .unwrap()
}

#[pg_test]
fn define_task_validates_every_parameter() {
    assert_eq!(outcome("SELECT sluice.define_task('t_ok', retries => 3)"), "ok");
    let neg = outcome("SELECT sluice.define_task('t', retries => -1)");
    assert!(neg.starts_with("22023: retries must be >= 0, got -1"), "{neg}");
    let empty = outcome("SELECT sluice.define_task('')");
    assert!(empty.starts_with("22023: task name must be a non-empty string"), "{empty}");
    let factor = outcome("SELECT sluice.define_task('t', backoff_factor => 0)");
    assert!(factor.starts_with("22023: backoff_factor must be a positive finite number, got 0"), "{factor}");
    let exec = outcome("SELECT sluice.define_task('t', execution_timeout => '0 s')");
    assert!(exec.starts_with("22023: execution_timeout must be positive"), "{exec}");
    let sched = outcome("SELECT sluice.define_task('t', schedule_timeout => '-1 s')");
    assert!(sched.starts_with("22023: schedule_timeout must be positive"), "{sched}");
}

#[pg_test]
fn define_task_updates_in_place() {
    Spi::run("SELECT sluice.define_task('t_upd', retries => 1)").unwrap();
    Spi::run("SELECT sluice.define_task('t_upd', retries => 4, priority => 3)").unwrap();
    let (retries, priority) = Spi::get_two::<i32, i32>(
        "SELECT retries, priority FROM sluice.task_definition WHERE name = 't_upd'",
    )
    .unwrap();
    assert_eq!((retries, priority), (Some(4), Some(3)));
}

#[pg_test]
fn enqueue_rejects_bad_input_with_specific_codes() {
    let unknown = outcome("SELECT sluice.enqueue('no_such_task')");
    assert!(unknown.starts_with("42704: unknown task \"no_such_task\""), "{unknown}");
    Spi::run("SELECT sluice.define_task('t_in')").unwrap();
    let null_input = outcome("SELECT sluice.enqueue('t_in', NULL)");
    assert!(null_input.starts_with("22004: input must not be NULL"), "{null_input}");
    let nul = outcome(r#"SELECT sluice.enqueue('t_in', '{"a": "\u0000"}')"#);
    assert!(nul.starts_with("22P05"), "{nul}");
    let many_null = outcome("SELECT sluice.enqueue_many('t_in', ARRAY['{}'::jsonb, NULL])");
    assert!(many_null.starts_with("22004: inputs[2] is NULL"), "{many_null}");
}

#[pg_test]
fn enqueue_returns_existing_task_for_an_unfinished_idempotency_key() {
    Spi::run("SELECT sluice.define_task('t_idem')").unwrap();
    let a = Spi::get_one::<i64>("SELECT sluice.enqueue('t_idem', idempotency_key => 'k1')").unwrap();
    let b = Spi::get_one::<i64>("SELECT sluice.enqueue('t_idem', idempotency_key => 'k1')").unwrap();
    let c = Spi::get_one::<i64>("SELECT sluice.enqueue('t_idem', idempotency_key => 'k2')").unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    // Once the task finished, the key is free again.
    Spi::run(&format!("SELECT sluice.cancel({})", a.unwrap())).unwrap();
    let d = Spi::get_one::<i64>("SELECT sluice.enqueue('t_idem', idempotency_key => 'k1')").unwrap();
    assert_ne!(a, d);
}

#[pg_test]
fn enqueue_many_returns_ids_in_input_order() {
    Spi::run("SELECT sluice.define_task('t_many', priority => 2)").unwrap();
    let n = Spi::get_one::<i64>(
        "SELECT count(*) FROM sluice.enqueue_many('t_many',
            ARRAY(SELECT jsonb_build_object('i', g) FROM generate_series(1, 500) g))",
    )
    .unwrap();
    assert_eq!(n, Some(500));
    let ordered = Spi::get_one::<bool>(
        "SELECT bool_and((input->>'i')::int = rn) FROM (
             SELECT input, row_number() OVER (ORDER BY id) rn FROM sluice.task_run
              WHERE task_name = 't_many') s",
    )
    .unwrap();
    assert_eq!(ordered, Some(true));
}

#[pg_test]
fn worker_registration_is_validated() {
    Spi::run("SELECT sluice.define_task('t_w')").unwrap();
    let zero = outcome("SELECT sluice.register_worker('w', ARRAY['t_w'], 0)");
    assert!(zero.starts_with("22023: slots must be a positive number, got 0"), "{zero}");
    let unknown = outcome("SELECT sluice.register_worker('w', ARRAY['t_w', 'nope'], 2)");
    assert!(unknown.starts_with("42704: unknown task \"nope\""), "{unknown}");
    let stale = outcome("SELECT sluice.heartbeat(-5)");
    assert!(stale.starts_with("SL001: worker -5 is not registered"), "{stale}");
}

#[pg_test]
fn completion_is_fenced_by_attempt_and_worker() {
    Spi::run("SELECT sluice.define_task('t_fence', retries => 2)").unwrap();
    let w = Spi::get_one::<i64>("SELECT sluice.register_worker('w', ARRAY['t_fence'], 1)").unwrap().unwrap();
    let t = Spi::get_one::<i64>("SELECT sluice.enqueue('t_fence')").unwrap().unwrap();
    // Assign attempt 1 by hand, as the scheduler would.
    Spi::run(&format!(
        "UPDATE sluice.task_run SET status = 'running', attempt = 1, worker_id = {w},
                assigned_at = now(), timeout_at = now() + interval '1 minute' WHERE id = {t}"
    ))
    .unwrap();
    let wrong_attempt = Spi::get_one::<bool>(&format!("SELECT sluice.complete({w}, {t}, 2, '1')")).unwrap();
    let wrong_worker = Spi::get_one::<bool>(&format!("SELECT sluice.complete({w} + 1, {t}, 1, '1')")).unwrap();
    assert_eq!((wrong_attempt, wrong_worker), (Some(false), Some(false)));
    // A retryable failure requeues with backoff; completing the failed attempt is then refused.
    assert_eq!(Spi::get_one::<bool>(&format!("SELECT sluice.fail({w}, {t}, 1, 'boom')")).unwrap(), Some(true));
    let (status, delay_ok) = Spi::get_two::<String, bool>(&format!(
        "SELECT status::text, run_at - now() = interval '2 seconds' FROM sluice.task_run WHERE id = {t}"
    ))
    .unwrap();
    assert_eq!((status.as_deref(), delay_ok), (Some("queued"), Some(true)));
    assert_eq!(Spi::get_one::<bool>(&format!("SELECT sluice.complete({w}, {t}, 1, '1')")).unwrap(), Some(false));
}

#[pg_test]
fn retry_delay_is_capped_without_overflow() {
    let cases = [
        ("SELECT sluice.retry_delay(2, '1 hour', 1)", "00:00:02"),
        ("SELECT sluice.retry_delay(2, '1 hour', 3)", "00:00:08"),
        ("SELECT sluice.retry_delay(2, '1 hour', 100000)", "01:00:00"),
        ("SELECT sluice.retry_delay(1e300, '10 seconds', 50)", "00:00:10"),
        ("SELECT sluice.retry_delay(2, '0', 5)", "00:00:00"),
    ];
    for (sql, want) in cases {
        assert_eq!(Spi::get_one::<String>(&format!("{sql}::text")).unwrap().as_deref(), Some(want), "{sql}");
    }
}

#[pg_test]
fn only_fetched_attempts_count_as_lost() {
    Spi::run("SELECT sluice.define_task('t_lost')").unwrap();
    let t = Spi::get_one::<i64>("SELECT sluice.enqueue('t_lost')").unwrap().unwrap();
    let assign = |picked: &str| {
        let w = Spi::get_one::<i64>("SELECT sluice.register_worker('w', ARRAY['t_lost'], 1)").unwrap().unwrap();
        Spi::run(&format!(
            "UPDATE sluice.task_run SET status = 'running', attempt = attempt + 1, worker_id = {w},
                    assigned_at = now(), picked_at = {picked}, timeout_at = now() + interval '1 minute'
              WHERE id = {t}"
        ))
        .unwrap();
        Spi::run(&format!("SELECT sluice.deregister_worker({w})")).unwrap();
        // what the scheduler does for the running attempts of a stopped worker it knows of
        Spi::run(&format!("SELECT sluice._maintain(ARRAY[{t}]::bigint[], '{{}}', false)")).unwrap();
    };
    let lost = || {
        Spi::get_two::<String, i32>(&format!("SELECT status::text, lost_attempts FROM sluice.task_run WHERE id = {t}"))
            .unwrap()
    };
    assign("NULL"); // assigned, never fetched: requeued without counting
    assert_eq!(lost(), (Some("queued".into()), Some(0)));
    assign("now()"); // fetched, then its worker went away: a lost attempt
    assert_eq!(lost(), (Some("queued".into()), Some(1)));
    let outcomes = Spi::get_one::<String>(&format!(
        "SELECT string_agg(attempt || ':' || outcome, ',' ORDER BY attempt) FROM sluice.task_attempts
          WHERE task_id = {t}"
    ))
    .unwrap();
    assert_eq!(outcomes.as_deref(), Some("1:lost,2:lost"));
}

/// Every tick from `start` (a wall-clock time in `zone`) for `n` ticks, as UTC instants, the
/// way the scheduler walks them (sluice._cron_next_at from the previous tick).
fn ticks(cron: &str, zone: &str, start: &str, n: i32) -> Vec<String> {
    Spi::get_one_with_args::<Vec<String>>(
        "WITH RECURSIVE walk(i, tick, at) AS (
             SELECT 1, n.tick, n.at FROM sluice._cron_next_at($1, $2, $3::timestamp, '-infinity') n
             UNION ALL
             SELECT w.i + 1, n.tick, n.at FROM walk w,
                    LATERAL sluice._cron_next_at($1, $2, w.tick, w.at) n
              WHERE w.i < $4)
         SELECT array_agg(to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') ORDER BY i) FROM walk",
        &[cron.into(), zone.into(), start.into(), n.into()],
    )
    .unwrap()
    .unwrap()
}

#[pg_test]
fn zoned_cron_ticks_are_neither_repeated_nor_dropped_across_dst() {
    // New York: clocks jump 02:00 -> 03:00 on 2026-03-08, fall back 02:00 -> 01:00 on 2026-11-01.
    // A daily tick inside the skipped hour fires when the clock jumps (03:30 EDT = 07:30 UTC)...
    assert_eq!(
        ticks("30 2 * * *", "America/New_York", "2026-03-07 00:00", 3),
        ["2026-03-07 07:30", "2026-03-08 07:30", "2026-03-09 06:30"]
    );
    // ...and one inside the repeated hour fires once.
    assert_eq!(
        ticks("30 1 * * *", "America/New_York", "2026-10-31 00:00", 3),
        ["2026-10-31 05:30", "2026-11-01 06:30", "2026-11-02 06:30"]
    );
    // Half-hourly across the fall-back: every wall-clock time once, in order, none twice (an
    // ambiguous wall-clock time is the later instant, as Postgres reads it).
    assert_eq!(
        ticks("*/30 * * * *", "America/New_York", "2026-11-01 00:45", 4),
        ["2026-11-01 06:00", "2026-11-01 06:30", "2026-11-01 07:00", "2026-11-01 07:30"]
    );
    // UTC is the default zone and has no such gaps.
    assert_eq!(
        ticks("0 3 * * 1", "UTC", "2026-11-23 00:00", 2),
        ["2026-11-23 03:00", "2026-11-30 03:00"]
    );
}

#[pg_test]
fn schedule_cron_rejects_bad_expressions_zones_targets_and_policies() {
    Spi::run("SELECT sluice.define_task('cron_target')").unwrap();
    let bad = outcome("SELECT sluice.schedule_cron('c', '* * *', 'cron_target')");
    assert!(bad.starts_with("22023: invalid cron expression \"* * *\""), "{bad}");
    let range = outcome("SELECT sluice.schedule_cron('c', '61 * * * *', 'cron_target')");
    assert!(range.starts_with("22023: invalid cron expression \"61 * * * *\""), "{range}");
    let dow = outcome("SELECT sluice.schedule_cron('c', '0 0 * * 9', 'cron_target')");
    assert!(dow.contains("day of week 9 is out of range"), "{dow}");
    let zone = outcome("SELECT sluice.schedule_cron('c', '@daily', 'cron_target', time_zone => 'Mars/Olympus')");
    assert!(zone.starts_with("22023: time zone \"Mars/Olympus\" not recognized"), "{zone}");
    let target = outcome("SELECT sluice.schedule_cron('c', '@daily', 'no_such_thing')");
    assert!(target.starts_with("42704: unknown task or workflow \"no_such_thing\""), "{target}");
    let missed = outcome("SELECT sluice.schedule_cron('c', '@daily', 'cron_target', missed => 'sometimes')");
    assert!(missed.starts_with("22023: missed must be 'skip' or 'run_once'"), "{missed}");
    assert_eq!(outcome("SELECT sluice.schedule_cron('c', '@daily', 'task:cron_target')"), "ok");
    // Rescheduling with the same expression keeps the next tick; nothing fired meanwhile.
    let same = Spi::get_one::<bool>(
        "SELECT sluice.schedule_cron('c', '@daily', 'cron_target') = next_fire_at FROM sluice.crons WHERE name = 'c'",
    )
    .unwrap();
    assert_eq!(same, Some(true));
}

#[pg_test]
fn events_validate_keys_payloads_and_filters() {
    Spi::run("SELECT sluice.define_task('event_target')").unwrap();
    let key = outcome("SELECT sluice.push_event('', '{}')");
    assert!(key.starts_with("22023: event key must be a non-empty string"), "{key}");
    let payload = outcome("SELECT sluice.push_event('k', NULL)");
    assert!(payload.starts_with("22004: payload must not be NULL"), "{payload}");
    let filter = outcome("SELECT sluice.subscribe('k', 'event_target', '$$ nope')");
    assert!(filter.starts_with("22023: invalid jsonpath filter '$$ nope'"), "{filter}");
    // Filters: a predicate must hold; another path must find something.
    let matches = Spi::get_one::<Vec<bool>>(
        "SELECT ARRAY[sluice._payload_matches('{\"size\": 20}', '$.size > 10'),
                      sluice._payload_matches('{\"size\": 2}', '$.size > 10'),
                      sluice._payload_matches('{\"size\": \"x\"}', '$.size > 10'),
                      sluice._payload_matches('{\"kind\": \"video\"}', '$ ? (@.kind == \"video\")'),
                      sluice._payload_matches('{\"kind\": \"image\"}', '$ ? (@.kind == \"video\")')]",
    )
    .unwrap()
    .unwrap();
    assert_eq!(matches, [true, false, false, true, false]);
    // A wildcard subscription starts one task per matching push, with the payload as input.
    Spi::run("SELECT sluice.subscribe('media:*', 'event_target')").unwrap();
    Spi::run("SELECT sluice.push_event('media:uploaded', '{\"n\": 1}')").unwrap();
    Spi::run("SELECT sluice.push_event('mediaXuploaded', '{\"n\": 2}')").unwrap();
    let inputs = Spi::get_one::<Vec<String>>(
        "SELECT array_agg(input::text ORDER BY id) FROM sluice.tasks WHERE task_name = 'event_target'",
    )
    .unwrap()
    .unwrap();
    assert_eq!(inputs, ["{\"n\": 1}"]);
}

/// task_run's check constraint (`status < 'succeeded'` by the enum's order): finished_at is set
/// exactly for the final statuses, for every status there is.
#[pg_test]
fn finished_at_is_set_exactly_for_final_statuses() {
    Spi::run("SELECT sluice.define_task('t_check')").unwrap();
    let id = Spi::get_one::<i64>("SELECT sluice.enqueue('t_check')").unwrap().unwrap();
    let statuses = Spi::get_one::<Vec<String>>(
        "SELECT array_agg(s::text ORDER BY s) FROM unnest(enum_range(NULL::sluice.task_status)) s",
    )
    .unwrap()
    .unwrap();
    assert_eq!(statuses, ["queued", "running", "succeeded", "failed", "cancelled"]);
    for status in &statuses {
        let finished = status != "queued" && status != "running";
        let with = outcome(&format!(
            "UPDATE sluice.task_run SET status = '{status}', finished_at = now() WHERE id = {id}"
        ));
        let without = outcome(&format!(
            "UPDATE sluice.task_run SET status = '{status}', finished_at = NULL WHERE id = {id}"
        ));
        let (allowed, refused) = if finished { (with, without) } else { (without, with) };
        assert_eq!(allowed, "ok", "{status}");
        assert!(refused.starts_with("23514:"), "{status}: {refused}");
    }
}

/// `sluice._array_position` answers as `array_position()` does: for one array over many rows
/// (the sort kept between calls), for an array that changes from row to row (the kept sort
/// must not be reused), with duplicates, NULL elements, a lower bound other than 1 and an
/// empty array.
#[pg_test]
fn array_position_matches_the_builtin() {
    let same_array = "WITH a AS MATERIALIZED (
                          SELECT array_agg((g * 7919) % 263 - 40)::bigint[] AS a
                            FROM generate_series(1, 300) g)
                      SELECT count(*) FILTER (WHERE sluice._array_position(a.a, x)
                                                    IS DISTINCT FROM array_position(a.a, x)),
                             count(*) FILTER (WHERE array_position(a.a, x) IS NOT NULL)
                        FROM a, generate_series(-50, 250) x";
    let (mismatches, found) = Spi::get_two::<i64, i64>(same_array).unwrap();
    assert_eq!(mismatches, Some(0));
    assert!(found.unwrap() > 100, "the probe found too few ids to mean anything: {found:?}");
    let changing_array = "SELECT count(*) FILTER (WHERE sluice._array_position(a, x)
                                                        IS DISTINCT FROM array_position(a, x)),
                                 count(*) FILTER (WHERE array_position(a, x) IS NOT NULL)
                            FROM (SELECT ARRAY(SELECT (g * 31 + k * 17) % 23 FROM
                                               generate_series(0, g % 29) k)::bigint[] AS a,
                                         (g % 25)::bigint AS x
                                    FROM generate_series(1, 2000) g) s";
    let (mismatches, found) = Spi::get_two::<i64, i64>(changing_array).unwrap();
    assert_eq!(mismatches, Some(0));
    assert!(found.unwrap() > 500, "the probe found too few ids to mean anything: {found:?}");
    for (array, id, expected) in [
        ("'[0:3]={5,6,5,7}'", 5, Some(0)),
        ("'{1,NULL,3,3}'", 3, Some(3)),
        ("'{1,NULL,3}'", 2, None),
        ("'{}'", 1, None),
    ] {
        let got = Spi::get_one::<i32>(&format!("SELECT sluice._array_position({array}::bigint[], {id})"))
            .unwrap();
        assert_eq!(got, expected, "{array}, {id}");
    }
    let multi = outcome("SELECT sluice._array_position('{{1,2},{3,4}}', 3)");
    assert!(multi.starts_with("0A000: searching for elements in multidimensional arrays"), "{multi}");
}

#[pg_test]
fn a_plain_enqueue_writes_the_row_the_insert_would() {
    Spi::run("SELECT sluice.define_task('t_direct', priority => 3, schedule_timeout => '1 day')")
        .unwrap();
    assert!(crate::direct_insert::eligible(), "task_run as created takes the direct path");
    // A day from noon before the end of summer time in Berlin is 25 hours: the deadline is
    // `run_at + interval` in the session's zone, as the SQL INSERT computes it.
    Spi::run("SET LOCAL TimeZone = 'Europe/Berlin'").unwrap();
    let input = r#"{"k": [1, "x", {"n": null}], "long": "#.to_string()
        + &format!("\"{}\"}}", "y".repeat(5000));
    let direct = Spi::get_one_with_args::<i64>(
        "SELECT sluice.enqueue('t_direct', $1::jsonb, run_at => '2026-10-24 12:00+02')",
        &[input.as_str().into()],
    )
    .unwrap()
    .unwrap();
    let through_sql = Spi::get_one_with_args::<i64>(
        "INSERT INTO sluice.task_run (task_name, priority, input, run_at, schedule_deadline)
         VALUES ('t_direct', 3, $1::jsonb, '2026-10-24 12:00+02',
                 '2026-10-24 12:00+02'::timestamptz + interval '1 day')
         RETURNING id",
        &[input.as_str().into()],
    )
    .unwrap()
    .unwrap();
    let same = Spi::get_one_with_args::<bool>(
        "SELECT (to_jsonb(a) - 'id') = (to_jsonb(b) - 'id')
           FROM sluice.task_run a, sluice.task_run b WHERE a.id = $1 AND b.id = $2",
        &[direct.into(), through_sql.into()],
    )
    .unwrap();
    assert_eq!(same, Some(true), "rows {direct} and {through_sql} differ");
    let deadline = Spi::get_one_with_args::<String>(
        "SELECT schedule_deadline::text FROM sluice.task_run WHERE id = $1",
        &[direct.into()],
    )
    .unwrap();
    assert_eq!(deadline.as_deref(), Some("2026-10-25 12:00:00+01"));
    // Found through the primary key and the index of unfinished tasks, not only on the heap.
    Spi::run("SET LOCAL enable_seqscan = off").unwrap();
    Spi::run("SET LOCAL enable_bitmapscan = off").unwrap();
    let by_key = Spi::get_one_with_args::<i64>(
        "SELECT count(*) FROM sluice.task_run WHERE id = $1",
        &[direct.into()],
    )
    .unwrap();
    assert_eq!(by_key, Some(1));
    let unfinished = Spi::get_one::<i64>(
        "SELECT count(*) FROM sluice.task_run
          WHERE finished_at IS NULL AND run_at = '2026-10-24 12:00+02'",
    )
    .unwrap();
    assert_eq!(unfinished, Some(2));
}

#[pg_test]
fn a_plain_enqueue_obeys_what_users_add_to_task_run() {
    Spi::run("SELECT sluice.define_task('t_guarded')").unwrap();
    assert!(crate::direct_insert::eligible());

    // An insert trigger runs: the enqueue goes through the executor while it exists.
    Spi::run(
        "CREATE TEMP TABLE seen (id bigint);
         CREATE FUNCTION pg_temp.note() RETURNS trigger LANGUAGE plpgsql AS
             $f$ BEGIN INSERT INTO seen VALUES (NEW.id); RETURN NULL; END $f$;
         CREATE TRIGGER note AFTER INSERT ON sluice.task_run
             FOR EACH ROW EXECUTE FUNCTION pg_temp.note()",
    )
    .unwrap();
    let id = Spi::get_one::<i64>("SELECT sluice.enqueue('t_guarded')").unwrap();
    let seen = Spi::get_one::<i64>("SELECT id FROM seen").unwrap();
    assert_eq!(seen, id);
    assert!(!crate::direct_insert::eligible());
    Spi::run("DROP TRIGGER note ON sluice.task_run").unwrap();
    assert!(crate::direct_insert::eligible());

    // A check constraint is enforced.
    Spi::run("ALTER TABLE sluice.task_run ADD CONSTRAINT small_priority CHECK (priority < 10)")
        .unwrap();
    let refused = outcome("SELECT sluice.enqueue('t_guarded', priority => 11)");
    assert!(refused.starts_with("23514:"), "{refused}");
    assert_eq!(outcome("SELECT sluice.enqueue('t_guarded', priority => 9)"), "ok");
    Spi::run("ALTER TABLE sluice.task_run DROP CONSTRAINT small_priority").unwrap();

    // A role without INSERT on task_run gets the executor's error; with it, the direct path.
    Spi::run(
        "CREATE ROLE sluice_test_producer;
         GRANT USAGE ON SCHEMA sluice TO sluice_test_producer;
         GRANT SELECT ON ALL TABLES IN SCHEMA sluice TO sluice_test_producer",
    )
    .unwrap();
    setup();
    let as_producer = |stmt: &str| {
        Spi::run("SET LOCAL ROLE sluice_test_producer").unwrap();
        let result =
            Spi::get_one_with_args::<String>("SELECT sluice_test_sqlstate($1)", &[stmt.into()]);
        Spi::run("RESET ROLE").unwrap();
        result.unwrap().unwrap()
    };
    let refused = as_producer("SELECT sluice.enqueue('t_guarded')");
    assert!(
        refused.starts_with("42501: permission denied for table task_run"),
        "{refused}"
    );
    Spi::run("GRANT INSERT ON sluice.task_run TO sluice_test_producer").unwrap();
    assert_eq!(as_producer("SELECT sluice.enqueue('t_guarded')"), "ok");
    assert!(crate::direct_insert::eligible());

    // Row-level security is enforced (for a role that does not bypass it).
    Spi::run(
        "ALTER TABLE sluice.task_run ENABLE ROW LEVEL SECURITY;
         CREATE POLICY small ON sluice.task_run USING (true) WITH CHECK (priority < 10)",
    )
    .unwrap();
    let refused = as_producer("SELECT sluice.enqueue('t_guarded', priority => 11)");
    assert!(
        refused.starts_with("42501: new row violates row-level security policy"),
        "{refused}"
    );
    assert_eq!(as_producer("SELECT sluice.enqueue('t_guarded', priority => 9)"), "ok");
    Spi::run("ALTER TABLE sluice.task_run DISABLE ROW LEVEL SECURITY").unwrap();
    assert!(crate::direct_insert::eligible());

    // A read-only transaction refuses the INSERT (last: nothing else can write after this).
    Spi::run("SET LOCAL transaction_read_only = on").unwrap();
    let refused =
        Spi::get_one::<String>("SELECT sluice_test_sqlstate('SELECT sluice.enqueue(''t_guarded'')')")
            .unwrap()
            .unwrap();
    assert!(
        refused.starts_with("25006: cannot execute INSERT in a read-only transaction"),
        "{refused}"
    );
}

#[pg_test]
fn the_arrivals_index_scan_returns_what_the_sql_read_returns() {
    // 6,000 queued tasks over 30 run_at values (ties, as one transaction's enqueue_many makes)
    // on many index pages, some running or finished, some not yet runnable.
    Spi::run("SELECT sluice.define_task('t_scan')").unwrap();
    Spi::run(
        "INSERT INTO sluice.task_run (task_name, priority, input, run_at, schedule_deadline)
         SELECT 't_scan', 1, '{}', now() - interval '1 hour' + (g % 30) * interval '1 minute',
                now() + interval '1 day'
           FROM generate_series(1, 6000) g;
         INSERT INTO sluice.task_run (task_name, priority, input, run_at, schedule_deadline)
         SELECT 't_scan', 1, '{}', now() + interval '1 minute', now() + interval '1 day'
           FROM generate_series(1, 50);
         UPDATE sluice.task_run SET status = 'running', attempt = 1
          WHERE task_name = 't_scan' AND id % 7 = 0;
         UPDATE sluice.task_run SET status = 'succeeded', finished_at = now()
          WHERE task_name = 't_scan' AND id % 11 = 0 AND status = 'queued'",
    )
    .unwrap();
    let now = Spi::get_one::<pgrx::datum::TimestampWithTimeZone>("SELECT now()")
        .unwrap()
        .map(pg_sys::TimestampTz::from)
        .unwrap();
    // Cursors: before everything, inside a run of equal run_at values (at its start, middle
    // and end), between runs, after everything.
    let cursors = Spi::connect(|client| {
        client
            .select(
                "SELECT run_at, id FROM sluice.task_run WHERE task_name = 't_scan'
                  ORDER BY run_at, id OFFSET 1234 LIMIT 1",
                None,
                &[],
            )
            .unwrap()
            .first()
            .get_two::<pgrx::datum::TimestampWithTimeZone, i64>()
            .unwrap()
    });
    let (middle_at, middle_id) = (pg_sys::TimestampTz::from(cursors.0.unwrap()), cursors.1.unwrap());
    let minute = 60_000_000;
    let cases = [
        (i64::MIN, i64::MIN, 100),
        (i64::MIN, i64::MIN, 10_000),
        (middle_at, middle_id, 500),
        (middle_at, i64::MIN, 500),
        (middle_at, i64::MAX, 500),
        (middle_at + minute, i64::MIN, 10_000),
        (middle_at + minute / 2, 0, 300),
        (now, i64::MAX, 100),
    ];
    for (after_at, after_id, limit) in cases {
        let scanned: Vec<i64> = crate::arrivals::read((after_at, after_id), now, limit)
            .expect("the index scan runs on the extension's own schema")
            .iter()
            .map(|r| r.task_id)
            .collect();
        let by_sql = sql_arrivals(after_at, after_id, limit);
        assert_eq!(scanned, by_sql, "cursor ({after_at}, {after_id}), limit {limit}");
        assert_eq!(scanned.is_empty(), after_at >= now, "cursor ({after_at}, {after_id})");
    }
}

/// The scheduler's arrivals statement (see `Statements::prepare`), for comparison.
fn sql_arrivals(after_at: pg_sys::TimestampTz, after_id: i64, limit: usize) -> Vec<i64> {
    // Timestamps as microseconds since 2000-01-01; far before any task for -infinity.
    let after_at = after_at.max(-200_000_000_000_000_000);
    Spi::get_one_with_args::<Vec<i64>>(
        "SELECT coalesce(array_agg(id ORDER BY run_at, id), '{}') FROM (
             SELECT id, run_at FROM sluice.task_run
              WHERE finished_at IS NULL AND status = 'queued'
                AND (run_at, id) > ('2000-01-01 00:00:00+00'::timestamptz
                                    + $1 * interval '1 microsecond', $2)
                AND run_at <= now()
              ORDER BY run_at, id LIMIT $3) s",
        &[after_at.into(), after_id.into(), (limit as i64).into()],
    )
    .unwrap()
    .unwrap()
}

/// The waiting list of `sluice.await_tasks` against the board: a post to a waiting worker takes
/// its waiter (whose latch the scheduler then sets), a post to another worker does not, and a
/// worker with posts registers no waiter but is told to go ahead. Shared memory, not the
/// transaction: the test cleans the board up itself.
#[pg_test]
fn a_post_takes_its_workers_waiter_and_a_waiter_sees_earlier_posts() {
    use crate::wake::{self, Posted, Registration};
    let (w, other) = (9_000_000_001_i64, 9_000_000_002_i64);
    let post = |worker_id: i64, task_id: i64| Posted {
        worker_id,
        task_id,
        attempt: 1,
        execution_timeout_ms: 1_000,
    };
    assert_eq!(wake::register_waiter(w), Registration::Registered);
    let (posted, woken) = wake::post_assignments(&[post(other, -1)]);
    assert_eq!((posted, woken.len()), (1, 0), "a post to another worker wakes nobody");
    let (posted, woken) = wake::post_assignments(&[post(w, -2), post(w, -3)]);
    assert_eq!(posted, 2);
    assert_eq!(woken.len(), 1, "one waiter, taken once");
    assert_eq!(woken[0].worker_id, w);
    assert_eq!(woken[0].pid, unsafe { pg_sys::MyProcPid });
    // Taken off the list: a second post finds nobody, and registering again finds the posts.
    assert!(wake::post_assignments(&[post(w, -4)]).1.is_empty());
    assert_eq!(wake::register_waiter(w), Registration::Posted);
    let withdrawn = wake::withdraw_assignments(&[w, other].into_iter().collect());
    assert_eq!(withdrawn.len(), 4);
    // With the board empty again the worker waits, and unregistering takes it off.
    assert_eq!(wake::register_waiter(w), Registration::Registered);
    wake::unregister_waiter();
    assert!(wake::post_assignments(&[post(w, -5)]).1.is_empty());
    assert_eq!(wake::withdraw_assignments(&[w].into_iter().collect()).len(), 1);
}
