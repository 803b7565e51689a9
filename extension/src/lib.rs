//! Sluice: task orchestration inside PostgreSQL.
//!
//! The SQL API and storage are plain SQL (`sql/schema.sql`, `sql/api.sql`). This crate adds
//! what needs Rust: the scheduler background worker, the shared-memory wake-up that lets an
//! enqueuing transaction wake it at commit without NOTIFY, and the assignment planner.

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

mod array_position;
mod arrivals;
pub mod assign;
mod await_tasks;
mod catalog;
pub(crate) mod claims;
mod complete;
pub mod cron_expr;
mod definition_cache;
mod direct_insert;
mod enqueue;
mod fetch;
pub mod flow;
mod gucs;
mod posted_read;
pub mod queue;
mod scheduler;
mod spi_plans;
mod wake;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/api.sql", name = "api", finalize);
// Workflows need only the tables at creation (their functions are plpgsql, resolved when run).
extension_sql_file!(
    "../sql/workflows.sql",
    name = "workflows",
    requires = ["schema"]
);
// Time, events and durable tasks: tables and views over the workflow tables too.
extension_sql_file!("../sql/cron.sql", name = "cron", requires = ["workflows"]);
extension_sql_file!("../sql/events.sql", name = "events", requires = ["cron"]);
extension_sql_file!(
    "../sql/durable.sql",
    name = "durable",
    requires = ["events"]
);
// Workflow step conditions (wait_for, cancel_if): events and sleeps.
extension_sql_file!(
    "../sql/conditions.sql",
    name = "conditions",
    requires = ["durable"]
);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    gucs::define(preloading);
    // Shared memory and the background worker exist only when the library is preloaded; a
    // session that loads it later gets a clear error from every API call instead.
    if preloading {
        wake::init_shared_memory();
        scheduler::register();
    }
    wake::register_commit_callback();
}

/// The first tick of a cron expression strictly after `after`, both wall-clock times (the SQL
/// layer converts them with the schedule's time zone); NULL if there is none. An invalid
/// expression raises SQLSTATE 22023 naming it.
#[pg_extern(name = "_cron_next", immutable, parallel_safe)]
fn cron_next_sql(cron: &str, after: Timestamp) -> Option<Timestamp> {
    let expr = match cron_expr::CronExpr::parse(cron) {
        Ok(expr) => expr,
        Err(why) => {
            pgrx::ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("invalid cron expression \"{cron}\": {why}"),
                "Use 5 fields (minute hour day-of-month month day-of-week, Sunday = 0), 6 with \
             seconds first, or a shorthand such as @daily."
            );
            #[allow(unreachable_code)]
            return None;
        }
    };
    // Timestamps are microseconds since 2000-01-01; infinities have no next tick.
    let micros = pg_sys::Timestamp::from(after);
    if micros == i64::MIN || micros == i64::MAX {
        return None;
    }
    let epoch = chrono::NaiveDate::from_ymd_opt(2000, 1, 1)?.and_hms_opt(0, 0, 0)?;
    let wall = epoch + chrono::Duration::microseconds(micros);
    let next = expr.next_after(wall)?;
    let next_micros = (next - epoch).num_microseconds()?;
    Timestamp::try_from(next_micros).ok()
}

/// Raises SQLSTATE 55000 unless the scheduler can serve this session's database.
#[pg_extern(name = "_require_preloaded")]
fn require_preloaded_sql() {
    wake::require_scheduler();
}

/// Wakes the scheduler when the current transaction commits (never on rollback).
/// `runnable_from`: the earliest `run_at` among tasks this transaction made queued.
#[pg_extern(name = "_wake_scheduler")]
fn wake_scheduler_sql(runnable_from: default!(Option<TimestampWithTimeZone>, "NULL")) {
    wake::require_scheduler();
    wake::wake_at_commit(runnable_from.map(pg_sys::TimestampTz::from));
}

/// Tells the scheduler, once the current transaction commits, that it recorded workflow step
/// outcomes (sluice.step_outcome) to apply.
#[pg_extern(name = "_outcome_recorded")]
fn outcome_recorded_sql() {
    wake::require_scheduler();
    wake::outcomes_at_commit();
}

/// Tells the scheduler, once the current transaction commits, to reload task definitions and
/// rate limits before its next assignment.
#[pg_extern(name = "_config_changed")]
fn config_changed_sql() {
    wake::require_scheduler();
    definition_cache::changed_in_transaction();
    wake::config_changed_at_commit();
}

/// Definitions changed in this transaction (a direct edit of the table): the scheduler and
/// every session's cache of them refresh once it commits. Unlike `_config_changed`, never an
/// error, so that rows can be restored into a server without the scheduler.
#[pg_extern(name = "_definitions_changed")]
fn definitions_changed_sql() {
    definition_cache::changed_in_transaction();
    wake::config_changed_at_commit();
}

/// Task rows were deleted or truncated in this transaction (a statement trigger): the
/// scheduler compares its memory with the table once it commits. Never an error.
#[pg_extern(name = "_tasks_deleted")]
fn tasks_deleted_sql() {
    wake::tasks_deleted_at_commit();
}

/// Tells the scheduler, once the current transaction commits, that these attempts ended.
#[pg_extern(name = "_attempts_ended")]
fn attempts_ended_sql(task_ids: Vec<i64>, attempts: Vec<i32>) {
    wake::attempts_ended(&task_ids, &attempts);
}

/// Tasks the scheduler assigned that their worker has not fetched yet (in `sluice.tasks` they
/// are still `queued`): the worker, the task and the attempt its fetch will create.
#[pg_extern(name = "posted_assignments")]
fn posted_assignments_sql() -> TableIterator<
    'static,
    (
        name!(worker_id, i64),
        name!(task_id, i64),
        name!(attempt, i32),
    ),
> {
    TableIterator::new(
        wake::posted_assignments()
            .into_iter()
            .map(|p| (p.worker_id, p.task_id, p.attempt)),
    )
}

/// Claims held in memory (`crate::claims`): attempts fetched by a worker whose rows still say
/// `queued` at the attempt before; all of them, or those of the given tasks.
#[pg_extern(name = "_claims")]
fn claims_sql(
    task_ids: default!(Option<Vec<i64>>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(task_id, i64),
        name!(attempt, i32),
        name!(worker_id, i64),
        name!(picked_at, TimestampWithTimeZone),
        name!(timeout_at, TimestampWithTimeZone),
    ),
> {
    let claims = match task_ids {
        Some(ids) => claims::of_tasks(&ids),
        None => claims::all(),
    };
    TableIterator::new(claims.into_iter().map(|c| {
        (
            c.task_id,
            c.attempt,
            c.worker_id,
            timestamptz(c.picked_at),
            timestamptz(c.timeout_at),
        )
    }))
}

/// These claims were written into their rows (or found stale) by the current transaction:
/// they leave memory when it commits.
#[pg_extern(name = "_claims_settled", strict)]
fn claims_settled_sql(task_ids: Vec<i64>, attempts: Vec<i32>) {
    claims::settled_in_transaction(task_ids.into_iter().zip(attempts));
}

fn timestamptz(at: i64) -> TimestampWithTimeZone {
    TimestampWithTimeZone::try_from(at).unwrap_or_else(|_| {
        TimestampWithTimeZone::try_from(i64::MAX).expect("infinity is a timestamptz")
    })
}

// #[pg_schema] needs an inline module; the tests live in their own file.
#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    include!("pg_tests.rs");
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'sluice'",
            "sluice.database = 'pgrx_tests'",
        ]
    }
}
