//! The scheduler: one background worker per cluster, connected to `sluice.database`.
//!
//! Each tick runs in one transaction: maintenance in SQL (`sluice._maintain`: dead workers,
//! timeouts, signals), then assignment planned in Rust (`crate::assign`) and applied in one
//! UPDATE, then one NOTIFY per worker that got work. It sleeps on its latch until a commit
//! wakes it (see `crate::wake`), the next delayed task or timeout falls due, or
//! `sluice.poll_interval` passes. All state is in tables, so a restart resumes where it was.

use crate::assign::{self, Candidate, WorkerCapacity};
use crate::{gucs, wake};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long to wait after a tick found work already due but could not take it (rows locked by
/// another transaction): short, but not a busy loop.
const RETRY_SOON: Duration = Duration::from_millis(50);
/// Lost workers, timeouts and cancel signals are checked at most this often.
const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(100);
const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

pub fn register() {
    BackgroundWorkerBuilder::new("sluice scheduler")
        .set_type("sluice scheduler")
        .set_function("sluice_scheduler_main")
        .set_library("sluice")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn sluice_scheduler_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = gucs::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    wake::publish_scheduler(unsafe { (*pg_sys::MyProc).pgprocno });
    log!("sluice scheduler started for database \"{database}\"");

    let mut sleep = Duration::ZERO;
    let mut last_maintenance: Option<Instant> = None;
    let mut warned_version: Option<String> = None;
    while BackgroundWorker::wait_latch(Some(sleep)) {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let poll = Duration::from_millis(gucs::POLL_INTERVAL_MS.get().max(10) as u64);
        let maintain = last_maintenance.is_none_or(|at| at.elapsed() >= MAINTENANCE_INTERVAL);
        let outcome =
            BackgroundWorker::transaction(|| Spi::connect_mut(|client| tick(client, maintain)));
        let next_due = match outcome {
            Tick::Ran {
                next_due,
                maintained,
            } => {
                warned_version = None;
                if maintained {
                    last_maintenance = Some(Instant::now());
                    next_due
                } else {
                    // A skipped maintenance (e.g. a cancel's signal) must not wait a full poll.
                    Some(next_due.map_or(MAINTENANCE_INTERVAL, |d| d.min(MAINTENANCE_INTERVAL)))
                }
            }
            Tick::NotInstalled => None,
            Tick::VersionMismatch(installed) => {
                if warned_version.as_deref() != Some(installed.as_str()) {
                    warning!(
                        "sluice scheduler: the library is version {LIBRARY_VERSION} but the \
                         extension in \"{database}\" is {installed}; run ALTER EXTENSION sluice \
                         UPDATE. Scheduling is paused until then."
                    );
                    warned_version = Some(installed);
                }
                None
            }
        };
        sleep = match next_due {
            Some(due) if due.is_zero() => RETRY_SOON,
            Some(due) => due.min(poll),
            None => poll,
        };
    }
    wake::publish_scheduler(-1);
    log!("sluice scheduler exiting");
    // Exit code 1, not 0: the postmaster restarts a background worker only after a non-zero
    // exit, and a SIGTERM that is not a server shutdown (pg_terminate_backend, DROP DATABASE
    // ... FORCE) must not stop scheduling for good. During shutdown nothing is restarted.
    unsafe { pg_sys::proc_exit(1) };
}

enum Tick {
    /// `next_due`: time until the next known deadline (a delayed task becoming runnable, an
    /// execution or schedule timeout), zero if one is already overdue.
    Ran {
        next_due: Option<Duration>,
        maintained: bool,
    },
    NotInstalled,
    VersionMismatch(String),
}

/// One pass over the queue: maintenance when `maintain` (it is throttled because a burst of
/// completions wakes the scheduler many times in a row, and only assignment needs to rerun),
/// then assignment.
fn tick(client: &mut SpiClient<'_>, maintain: bool) -> Tick {
    match installed_version(client) {
        None => return Tick::NotInstalled,
        Some(v) if v != LIBRARY_VERSION => return Tick::VersionMismatch(v),
        Some(_) => {}
    }

    // Notifications to send at commit, one per worker: what it should do.
    let mut notify: BTreeMap<i64, &'static str> = BTreeMap::new();

    if maintain {
        let heartbeat_timeout = format!("{} seconds", gucs::HEARTBEAT_TIMEOUT_S.get());
        let signalled = client
            .update(
                "SELECT w FROM sluice._maintain($1::interval) AS w",
                None,
                &[heartbeat_timeout.into()],
            )
            .expect("sluice._maintain failed");
        for row in signalled {
            if let Ok(Some(id)) = row.get::<i64>(1) {
                notify.insert(id, "signal");
            }
        }
    }

    let workers = load_workers(client);
    let demand = assign::demand(&workers);
    if !demand.is_empty() {
        let (candidates, orphans) = load_candidates(client, &demand);
        fail_orphans(client, &orphans);
        let plan = assign::plan(&workers, &candidates);
        if !plan.is_empty() {
            let task_ids: Vec<i64> = plan.iter().map(|a| a.task_id).collect();
            let worker_ids: Vec<i64> = plan.iter().map(|a| a.worker_id).collect();
            client
                .update(
                    "UPDATE sluice.task_run t
                        SET status = 'running', attempt = t.attempt + 1, worker_id = a.worker_id,
                            assigned_at = now(), picked_at = NULL,
                            timeout_at = now() + d.execution_timeout
                       FROM unnest($1::bigint[], $2::bigint[]) AS a(task_id, worker_id),
                            sluice.task_definition d
                      WHERE t.id = a.task_id AND d.name = t.task_name AND t.status = 'queued'",
                    None,
                    &[task_ids.into(), worker_ids.into()],
                )
                .expect("applying assignments failed");
            for a in &plan {
                notify
                    .entry(a.worker_id)
                    .and_modify(|k| {
                        *k = if *k == "signal" {
                            "assigned signal"
                        } else {
                            *k
                        }
                    })
                    .or_insert("assigned");
            }
        }
    }

    if !notify.is_empty() {
        let ids: Vec<i64> = notify.keys().copied().collect();
        let kinds: Vec<String> = notify.values().map(|k| k.to_string()).collect();
        client
            .update(
                "SELECT pg_notify('sluice_worker_' || w.id, w.kind)
                   FROM unnest($1::bigint[], $2::text[]) AS w(id, kind)",
                None,
                &[ids.into(), kinds.into()],
            )
            .expect("notifying workers failed");
    }

    Tick::Ran {
        next_due: next_deadline(client),
        maintained: maintain,
    }
}

fn installed_version(client: &mut SpiClient<'_>) -> Option<String> {
    client
        .update(
            "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'sluice'",
            None,
            &[],
        )
        .ok()?
        .first()
        .get_one::<String>()
        .ok()?
}

fn load_workers(client: &mut SpiClient<'_>) -> Vec<WorkerCapacity> {
    let rows = client
        .update(
            "SELECT w.id, w.task_names,
                    w.slots - (SELECT count(*) FROM sluice.task_run t
                                WHERE t.worker_id = w.id AND t.status = 'running')::int
               FROM sluice.worker w
              WHERE w.stopped_at IS NULL
              ORDER BY w.id",
            None,
            &[],
        )
        .expect("loading workers failed");
    rows.filter_map(|row| {
        Some(WorkerCapacity {
            worker_id: row.get::<i64>(1).ok()??,
            task_names: row
                .get::<Vec<Option<String>>>(2)
                .ok()??
                .into_iter()
                .flatten()
                .collect(),
            free_slots: row.get::<i32>(3).ok()??,
        })
    })
    .collect()
}

/// The head of each wanted task name's queue, locked so that a concurrent cancel cannot race
/// the assignment (locked rows are skipped, not waited for). Tasks whose definition was
/// deleted come back separately as orphans.
fn load_candidates(
    client: &mut SpiClient<'_>,
    demand: &[(String, i32)],
) -> (Vec<Candidate>, Vec<i64>) {
    let names: Vec<String> = demand.iter().map(|(n, _)| n.clone()).collect();
    let limits: Vec<i32> = demand.iter().map(|(_, c)| *c).collect();
    let rows = client
        .update(
            "SELECT c.id, c.task_name, c.priority, d.name IS NULL AS orphan
               FROM unnest($1::text[], $2::int[]) AS want(name, n)
              CROSS JOIN LATERAL (
                    SELECT t.id, t.task_name, t.priority
                      FROM sluice.task_run t
                     WHERE t.status = 'queued' AND t.task_name = want.name AND t.run_at <= now()
                     ORDER BY t.priority DESC, t.id
                     LIMIT want.n
                       FOR UPDATE SKIP LOCKED) c
               LEFT JOIN sluice.task_definition d ON d.name = c.task_name",
            None,
            &[names.into(), limits.into()],
        )
        .expect("loading candidates failed");
    let mut candidates = Vec::new();
    let mut orphans = Vec::new();
    for row in rows {
        let (Ok(Some(task_id)), Ok(Some(task_name)), Ok(Some(priority)), Ok(Some(orphan))) = (
            row.get::<i64>(1),
            row.get::<String>(2),
            row.get::<i32>(3),
            row.get::<bool>(4),
        ) else {
            continue;
        };
        if orphan {
            orphans.push(task_id);
        } else {
            candidates.push(Candidate {
                task_id,
                task_name,
                priority,
            });
        }
    }
    (candidates, orphans)
}

fn fail_orphans(client: &mut SpiClient<'_>, orphans: &[i64]) {
    if orphans.is_empty() {
        return;
    }
    client
        .update(
            "UPDATE sluice.task_run
                SET status = 'failed', finished_at = now(),
                    last_error = format('task definition \"%s\" no longer exists', task_name)
              WHERE id = ANY($1) AND status = 'queued'",
            None,
            &[orphans.to_vec().into()],
        )
        .expect("failing orphaned tasks failed");
}

fn next_deadline(client: &mut SpiClient<'_>) -> Option<Duration> {
    let seconds = client
        .update(
            "SELECT extract(epoch FROM least(
                    (SELECT min(run_at) FROM sluice.task_run
                      WHERE status = 'queued' AND run_at > now()),
                    (SELECT min(timeout_at) FROM sluice.task_run WHERE status = 'running'),
                    (SELECT min(schedule_deadline) FROM sluice.task_run WHERE status = 'queued')
                ) - clock_timestamp())::float8",
            None,
            &[],
        )
        .ok()?
        .first()
        .get_one::<f64>()
        .ok()??;
    Some(Duration::from_secs_f64(seconds.max(0.0)))
}
