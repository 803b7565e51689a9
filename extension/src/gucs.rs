//! Configuration (`sluice.*` settings).

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// The database the scheduler serves (one scheduler per cluster).
pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
/// Longest sleep between scheduler ticks when nothing wakes it, in milliseconds.
pub static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
/// A worker silent for longer than this (seconds) is stopped and its tasks requeued.
pub static HEARTBEAT_TIMEOUT_S: GucSetting<i32> = GucSetting::<i32>::new(30);
/// A task lost with its worker more often than this fails instead of being requeued.
pub static MAX_LOST_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(5);
/// Finished tasks are deleted this long (seconds) after they finish; -1 keeps them.
pub static SUCCEEDED_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(86_400);
pub static FAILED_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(7 * 86_400);
pub static EVENT_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(7 * 86_400);
/// At most this many claims are held in shared memory at once (`crate::claims`); beyond that, and
/// with 0 always, a fetch claims in the task's row.
pub static CLAIMS_IN_MEMORY: GucSetting<i32> =
    GucSetting::<i32>::new(crate::claims::MAX_CLAIMS as i32);
/// Log the scheduler's tick statistics every 10 seconds (for diagnosing slow assignment).
pub static LOG_SCHEDULER_STATS: GucSetting<bool> = GucSetting::<bool>::new(false);

/// `preloading`: loaded through shared_preload_libraries. Postgres refuses (FATAL) to define a
/// server-start setting in a library loaded later, so `sluice.database` only exists then; without
/// preloading there is no scheduler for it to configure anyway.
pub fn define(preloading: bool) {
    if preloading {
        GucRegistry::define_string_guc(
            c"sluice.database",
            c"Database the Sluice scheduler serves.",
            c"One scheduler runs per cluster; tasks enqueued in other databases are refused.",
            &DATABASE,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
    GucRegistry::define_int_guc(
        c"sluice.poll_interval",
        c"Longest time the scheduler sleeps between ticks, in milliseconds.",
        c"Commits that enqueue or complete work wake it sooner through shared memory.",
        &POLL_INTERVAL_MS,
        10,
        60_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"sluice.heartbeat_timeout",
        c"Seconds without a heartbeat after which a worker is considered dead.",
        c"Its running tasks go back to the queue as lost attempts.",
        &HEARTBEAT_TIMEOUT_S,
        1,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"sluice.claims_in_memory",
        c"Most attempts claimed in shared memory at once; 0 claims every attempt in its row.",
        c"A claim in memory writes nothing until the attempt ends (one row update per task); a \
          server crash loses it, and its task runs again under the same attempt number without \
          being counted as lost. Claims beyond this are written to the row as they are made.",
        &CLAIMS_IN_MEMORY,
        0,
        crate::claims::MAX_CLAIMS as i32,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"sluice.max_lost_attempts",
        c"How many times a task may be lost with its worker before it fails.",
        c"Lost attempts do not consume retries; this bounds tasks that kill their worker.",
        &MAX_LOST_ATTEMPTS,
        0,
        1_000_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"sluice.succeeded_task_retention",
        c"How long succeeded tasks are kept after they finish; -1 keeps them forever.",
        c"The scheduler deletes older ones (with their attempts) in batches, oldest first.",
        &SUCCEEDED_RETENTION_S,
        -1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"sluice.failed_task_retention",
        c"How long failed and cancelled tasks are kept after they finish; -1 keeps them forever.",
        c"The scheduler deletes older ones (with their attempts) in batches, oldest first.",
        &FAILED_RETENTION_S,
        -1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"sluice.event_retention",
        c"How long pushed events are kept (sluice.events); -1 keeps them forever.",
        c"The scheduler deletes older ones in batches, oldest first.",
        &EVENT_RETENTION_S,
        -1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"sluice.log_scheduler_stats",
        c"Log the scheduler's tick statistics every 10 seconds.",
        c"Ticks, their longest and total duration, tasks assigned, and the sizes of its queue.",
        &LOG_SCHEDULER_STATS,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

pub fn database() -> String {
    DATABASE
        .get()
        .and_then(|c| c.into_string().ok())
        .unwrap_or_else(|| "postgres".to_string())
}
