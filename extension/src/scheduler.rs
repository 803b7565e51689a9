//! The scheduler: one background worker per cluster, connected to `sluice.database`.
//!
//! Each tick runs in one transaction: maintenance (at most every 100 ms: dead workers,
//! timeouts, signals), a check of the running attempts it assigned, a read of new arrivals
//! into its memory (`crate::queue`), assignment planned in Rust (`crate::assign`) and applied
//! in one UPDATE, then one NOTIFY per worker that got work. It sleeps on its latch until a
//! commit wakes it (see `crate::wake`), the next delayed task or timeout falls due, or
//! `sluice.poll_interval` passes. Tables are the truth: a restarted scheduler rebuilds its
//! memory from them.

use crate::assign::{self, Candidate, WorkerCapacity};
use crate::queue::{Arrival, Micros, QueueState, RunningAttempt};
use crate::{gucs, wake};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

/// How long to wait after a tick that left work it could take soon (rows locked by another
/// transaction, more arrivals to read, tasks just requeued): short, but not a busy loop.
const RETRY_SOON: Duration = Duration::from_millis(5);
/// Lost workers, timeouts and cancel signals are checked at most this often.
const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(100);
/// The runnable queue in memory is rebuilt from the table this often (see
/// `QueueState::reread_from_start`).
const REREAD_INTERVAL: Duration = Duration::from_secs(60);
/// At most this many runnable tasks are kept in memory (about 30 bytes each); beyond it,
/// newer arrivals are read as room frees up, so priorities apply among the oldest this many.
const MAX_READY_IN_MEMORY: usize = 1_000_000;
/// Every running attempt is checked in the table at least this often (see `check_running`).
const RUNNING_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Arrivals read per tick, so that a deep backlog does not delay the first assignments.
const ARRIVALS_PER_TICK: usize = 20_000;
/// While busy (the last tick assigned work), ticks start at least this far apart, so that the
/// completions of many workers are taken in one tick instead of one tick each. An idle
/// scheduler still answers the first wake-up at once, so pickup latency does not pay it.
const BUSY_TICK_SPACING: Duration = Duration::from_millis(2);
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
    // The scheduler's commits (assignments, requeues, timeouts) do not wait for the disk. A
    // crash can lose only its last few hundred milliseconds of them, which puts those tasks
    // back where they were (queued, or running until the lost-worker check): nothing is lost
    // and nothing completes twice. A worker acts on an assignment only after its fetch
    // committed, and the WAL is flushed in order, so an assignment a handler ran on is durable
    // whenever that worker's fetch or completion is.
    //
    // Every query of the scheduler is meant as an index lookup or a short index range. Right
    // after a burst of enqueues the table statistics still describe a nearly empty table and
    // the planner picks sequential scans that lock and read the whole table on every tick.
    BackgroundWorker::transaction(|| {
        Spi::run("SET synchronous_commit = off").expect("setting synchronous_commit failed");
        Spi::run("SET enable_seqscan = off").expect("setting enable_seqscan failed");
    });
    wake::publish_scheduler(unsafe { (*pg_sys::MyProc).pgprocno });
    log!("sluice scheduler started for database \"{database}\"");

    let mut scheduler = Scheduler::new();
    let mut sleep = Duration::ZERO;
    let mut warned_version: Option<String> = None;
    let mut last_busy_tick: Option<Instant> = None;
    while BackgroundWorker::wait_latch(Some(sleep)) {
        if let Some(at) = last_busy_tick {
            // The latch stays set meanwhile; a signal is handled right after.
            std::thread::sleep(BUSY_TICK_SPACING.saturating_sub(at.elapsed()));
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let poll = Duration::from_millis(gucs::POLL_INTERVAL_MS.get().max(10) as u64);
        // Before the tick's snapshot: see crate::wake for why the order matters.
        if let Some(at) = wake::take_committed_runnable_from() {
            scheduler.queue.rewind_to(at);
        }
        match wake::take_ended_attempts() {
            Some(ended) => {
                for (task_id, attempt) in ended {
                    scheduler.queue.end_attempt(task_id, attempt);
                }
            }
            None => scheduler.check_all_running = true,
        }
        // An error inside the tick ends the process (and the postmaster restarts it), so the
        // memory it leaves half-updated is never used again.
        let this = std::panic::AssertUnwindSafe(&mut scheduler);
        let outcome = BackgroundWorker::transaction(move || {
            let mut this = this;
            Spi::connect_mut(|client| this.tick(client))
        });
        sleep = match outcome {
            Tick::Ran { next_due, assigned } => {
                warned_version = None;
                last_busy_tick = (assigned > 0).then(Instant::now);
                // Maintenance is due every MAINTENANCE_INTERVAL while work is in flight.
                let maintenance = (scheduler.queue.running_len() > 0)
                    .then(|| MAINTENANCE_INTERVAL.saturating_sub(scheduler.since_maintenance()));
                [next_due, maintenance, Some(poll)]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(poll)
            }
            Tick::NotInstalled => poll,
            Tick::VersionMismatch(installed) => {
                if warned_version.as_deref() != Some(installed.as_str()) {
                    warning!(
                        "sluice scheduler: the library is version {LIBRARY_VERSION} but the \
                         extension in \"{database}\" is {installed}; run ALTER EXTENSION sluice \
                         UPDATE. Scheduling is paused until then."
                    );
                    warned_version = Some(installed);
                }
                poll
            }
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
    /// `next_due`: time until the scheduler has something to do without being woken;
    /// `assigned`: tasks assigned in this tick.
    Ran {
        next_due: Option<Duration>,
        assigned: usize,
    },
    NotInstalled,
    VersionMismatch(String),
}

struct Scheduler {
    queue: QueueState,
    /// Running attempts must be (re)loaded from the table: at start and with each reread.
    load_running: bool,
    /// Every running attempt must be checked in the table this tick (see `check_running`).
    check_all_running: bool,
    last_running_check: Instant,
    last_maintenance: Option<Instant>,
    last_reread: Instant,
    /// Schedule deadlines before this were handled (the moving window of `_maintain`).
    deadlines_after: Micros,
}

impl Scheduler {
    fn new() -> Self {
        Scheduler {
            queue: QueueState::new(),
            load_running: true,
            check_all_running: false,
            last_running_check: Instant::now(),
            last_maintenance: None,
            last_reread: Instant::now(),
            deadlines_after: i64::MIN,
        }
    }

    fn since_maintenance(&self) -> Duration {
        self.last_maintenance
            .map_or(Duration::ZERO, |at| at.elapsed())
    }

    fn tick(&mut self, client: &mut SpiClient<'_>) -> Tick {
        let maintain = self
            .last_maintenance
            .is_none_or(|at| at.elapsed() >= MAINTENANCE_INTERVAL);
        if maintain {
            // Also the first tick: nothing runs against a schema of another version.
            match installed_version(client) {
                None => return Tick::NotInstalled,
                Some(v) if v != LIBRARY_VERSION => return Tick::VersionMismatch(v),
                Some(_) => {}
            }
        }
        let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
        let mut soon = false;

        let purge_workers = self.last_reread.elapsed() >= REREAD_INTERVAL;
        if purge_workers {
            self.queue.reread_from_start();
            self.deadlines_after = i64::MIN;
            self.last_reread = Instant::now();
            self.load_running = true;
        }
        if self.load_running {
            load_running(client, &mut self.queue);
            self.load_running = false;
        }

        // Notifications to send at commit, one per worker: what it should do.
        let mut notify: BTreeMap<i64, &'static str> = BTreeMap::new();
        if maintain {
            let heartbeat_timeout = format!("{} seconds", gucs::HEARTBEAT_TIMEOUT_S.get());
            client
                .update(
                    "SELECT sluice._stop_lost_workers($1::interval)",
                    None,
                    &[heartbeat_timeout.into()],
                )
                .expect("sluice._stop_lost_workers failed");
        }
        let workers = load_workers(client);
        if maintain {
            let live: HashSet<i64> = workers.iter().map(|w| w.worker_id).collect();
            let lost = self.queue.lost(&live);
            let timed_out = self.queue.timed_out(now);
            soon |= !lost.is_empty() || !timed_out.is_empty();
            let deadlines_after = timestamptz(self.deadlines_after);
            let signalled = client
                .update(
                    "SELECT w FROM sluice._maintain($1, $2, $3, $4) AS w",
                    None,
                    &[
                        lost.into(),
                        timed_out.into(),
                        deadlines_after.into(),
                        purge_workers.into(),
                    ],
                )
                .expect("sluice._maintain failed");
            for row in signalled {
                if let Ok(Some(id)) = row.get::<i64>(1) {
                    notify.insert(id, "signal");
                }
            }
            self.deadlines_after = now;
            self.last_maintenance = Some(Instant::now());
        }
        // Endings are reported through shared memory (crate::wake); checking every running
        // attempt in the table is the safety net, once a second or when reports overflowed.
        if self.check_all_running || self.last_running_check.elapsed() >= RUNNING_CHECK_INTERVAL {
            check_running(client, &mut self.queue);
            self.check_all_running = false;
            self.last_running_check = Instant::now();
        }
        soon |= read_arrivals(client, &mut self.queue, now);

        let capacity: Vec<WorkerCapacity> = workers
            .into_iter()
            .map(|mut w| {
                w.free_slots -= self.queue.running_on(w.worker_id);
                w
            })
            .collect();
        let demand = assign::demand(&capacity);
        let mut planned = 0;
        if !demand.is_empty() {
            let candidates = self.queue.candidates(&demand);
            let plan = assign::plan(&capacity, &candidates);
            if !plan.is_empty() {
                planned = plan.len();
                soon |= apply(client, &mut self.queue, &candidates, &plan);
                for a in &plan {
                    notify
                        .entry(a.worker_id)
                        .and_modify(|k| {
                            if *k == "signal" {
                                *k = "assigned signal"
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

        let next_due = if soon {
            Some(RETRY_SOON)
        } else {
            [self.queue.next_timeout(), next_delayed(client)]
                .into_iter()
                .flatten()
                .min()
                .map(|at| micros_until(at, now))
        };
        Tick::Ran {
            next_due,
            assigned: planned,
        }
    }
}

fn timestamptz(at: Micros) -> TimestampWithTimeZone {
    TimestampWithTimeZone::try_from(at).unwrap_or_else(|_| {
        TimestampWithTimeZone::try_from(i64::MIN).expect("-infinity is a timestamptz")
    })
}

/// Time from `now` (the tick's transaction start) until `at`, measured on the wall clock.
fn micros_until(at: Micros, now: Micros) -> Duration {
    let elapsed = unsafe { pg_sys::GetCurrentTimestamp() } - now;
    Duration::from_micros(at.saturating_sub(now).saturating_sub(elapsed).max(0) as u64)
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

/// Live workers with their slots (not yet reduced by their running attempts).
fn load_workers(client: &mut SpiClient<'_>) -> Vec<WorkerCapacity> {
    let rows = client
        .update(
            "SELECT w.id, w.task_names, w.slots FROM sluice.worker w
              WHERE w.stopped_at IS NULL ORDER BY w.id",
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

/// The running attempts as the table has them (at start, and with each reread to repair any
/// drift between memory and the table).
fn load_running(client: &mut SpiClient<'_>, queue: &mut QueueState) {
    queue.forget_running();
    let rows = client
        .update(
            "SELECT id, worker_id, attempt, timeout_at FROM sluice.task_run
              WHERE status = 'running'",
            None,
            &[],
        )
        .expect("loading running tasks failed");
    for row in rows {
        let (Ok(Some(id)), Ok(Some(worker_id)), Ok(Some(attempt))) =
            (row.get::<i64>(1), row.get::<i64>(2), row.get::<i32>(3))
        else {
            continue;
        };
        let timeout_at = row
            .get::<TimestampWithTimeZone>(4)
            .ok()
            .flatten()
            .map_or(i64::MAX, pg_sys::TimestampTz::from);
        queue.start_running(
            id,
            RunningAttempt {
                worker_id,
                attempt,
                timeout_at,
            },
        );
    }
}

/// Forgets running attempts that ended (completed, failed, cancelled, requeued): one primary
/// key lookup per running attempt, so it costs the same however many tasks finished before.
fn check_running(client: &mut SpiClient<'_>, queue: &mut QueueState) {
    if queue.running_len() == 0 {
        return;
    }
    let (ids, attempts) = queue.running_attempts();
    // `id = ANY(...)` and `status::text` keep this a primary-key lookup per attempt: a join
    // with unnest(), or a plain `status = 'running'` that matches the partial worker index,
    // lets the planner scan every running row and, under a held xmin, their dead versions.
    let still_running: HashSet<(i64, i32)> = client
        .update(
            "SELECT id, attempt FROM sluice.task_run WHERE id = ANY($1) AND status::text = 'running'",
            None,
            &[ids.clone().into()],
        )
        .expect("checking running tasks failed")
        .filter_map(|row| Some((row.get::<i64>(1).ok()??, row.get::<i32>(2).ok()??)))
        .collect();
    for (id, attempt) in ids.into_iter().zip(attempts) {
        if !still_running.contains(&(id, attempt)) {
            queue.end_running(id);
        }
    }
}

/// Reads tasks that became runnable after the cursor. Returns whether more are waiting.
fn read_arrivals(client: &mut SpiClient<'_>, queue: &mut QueueState, now: Micros) -> bool {
    let room = MAX_READY_IN_MEMORY.saturating_sub(queue.ready_len());
    if room == 0 {
        return false;
    }
    let limit = room.min(ARRIVALS_PER_TICK);
    let (after_run_at, after_id) = queue.cursor();
    let rows = client
        .update(
            "SELECT id, task_name, priority, run_at FROM sluice.task_run
              WHERE status = 'queued' AND (run_at, id) > ($1, $2) AND run_at <= now()
              ORDER BY run_at, id
              LIMIT $3",
            None,
            &[
                timestamptz(after_run_at).into(),
                after_id.into(),
                (limit as i64).into(),
            ],
        )
        .expect("reading arrivals failed");
    let mut arrivals = Vec::with_capacity(rows.len());
    let mut last = None;
    for row in rows {
        let (Ok(Some(task_id)), Ok(Some(task_name)), Ok(Some(priority)), Ok(Some(run_at))) = (
            row.get::<i64>(1),
            row.get::<String>(2),
            row.get::<i32>(3),
            row.get::<TimestampWithTimeZone>(4),
        ) else {
            continue;
        };
        last = Some((pg_sys::TimestampTz::from(run_at), task_id));
        arrivals.push(Arrival {
            task_id,
            task_name,
            priority,
        });
    }
    let full = arrivals.len() >= limit;
    // Everything runnable at `now` and visible was read, unless the limit cut the read short;
    // rows committed later behind this point come back through the commit watermark.
    let next = match (full, last) {
        (true, Some(last)) => last,
        _ => (now, i64::MAX),
    };
    queue.add_arrivals(arrivals, next);
    full
}

/// Applies a plan in one UPDATE that skips rows another transaction holds (a cancel in
/// progress, say) instead of waiting for them, and updates memory. Returns whether planned
/// tasks were skipped but may be assignable soon.
fn apply(
    client: &mut SpiClient<'_>,
    queue: &mut QueueState,
    candidates: &[Candidate],
    plan: &[assign::Assignment],
) -> bool {
    let task_ids: Vec<i64> = plan.iter().map(|a| a.task_id).collect();
    let worker_ids: Vec<i64> = plan.iter().map(|a| a.worker_id).collect();
    // One value per tick: a worker's fetch resumes after the last tick it saw.
    let seq = client
        .update("SELECT nextval('sluice.assign_seq')", None, &[])
        .expect("taking an assign_seq failed")
        .first()
        .get_one::<i64>()
        .ok()
        .flatten()
        .unwrap_or(0);
    let rows = client
        .update(
            "UPDATE sluice.task_run t
                SET status = 'running', attempt = t.attempt + 1, worker_id = a.worker_id,
                    assigned_at = now(), picked_at = NULL,
                    timeout_at = now() + d.execution_timeout,
                    assign_seq = $3
               FROM unnest($1::bigint[], $2::bigint[]) AS a(task_id, worker_id),
                    sluice.task_definition d
              -- locked first (an InitPlan), skipping rows another transaction holds; then
              -- one primary-key lookup per id
              WHERE t.id = ANY((SELECT array_agg(l.id) FROM (
                                  SELECT q.id FROM sluice.task_run q
                                   WHERE q.id = ANY($1) AND q.status::text = 'queued'
                                     FOR UPDATE SKIP LOCKED) l)::bigint[])
                AND a.task_id = t.id AND d.name = t.task_name
          RETURNING t.id, t.worker_id, t.attempt, t.timeout_at",
            None,
            &[task_ids.clone().into(), worker_ids.into(), seq.into()],
        )
        .expect("applying assignments failed");
    let mut assigned: HashSet<i64> = HashSet::new();
    for row in rows {
        let (Ok(Some(id)), Ok(Some(worker_id)), Ok(Some(attempt)), Ok(Some(timeout_at))) = (
            row.get::<i64>(1),
            row.get::<i64>(2),
            row.get::<i32>(3),
            row.get::<TimestampWithTimeZone>(4),
        ) else {
            continue;
        };
        assigned.insert(id);
        queue.start_running(
            id,
            RunningAttempt {
                worker_id,
                attempt,
                timeout_at: timeout_at.into(),
            },
        );
    }

    // The rest (rare): no longer queued (cancelled, expired: forget it), held by another
    // transaction (keep it, retry soon), or its definition is gone (fail it).
    let skipped: Vec<i64> = task_ids
        .iter()
        .copied()
        .filter(|id| !assigned.contains(id))
        .collect();
    let mut keep: HashSet<i64> = HashSet::new();
    if !skipped.is_empty() {
        let mut orphans = Vec::new();
        let rows = client
            .update(
                "SELECT t.id, d.name IS NULL FROM sluice.task_run t
                   LEFT JOIN sluice.task_definition d ON d.name = t.task_name
                  WHERE t.id = ANY($1) AND t.status::text = 'queued'",
                None,
                &[skipped.into()],
            )
            .expect("checking skipped tasks failed");
        for row in rows {
            let (Ok(Some(id)), Ok(Some(orphan))) = (row.get::<i64>(1), row.get::<bool>(2)) else {
                continue;
            };
            if orphan {
                orphans.push(id);
            } else {
                keep.insert(id);
            }
        }
        fail_orphans(client, &orphans);
    }
    let planned: HashSet<i64> = task_ids.into_iter().collect();
    for c in candidates {
        if planned.contains(&c.task_id) && !keep.contains(&c.task_id) {
            queue.remove_ready(&c.task_name, c.priority, c.task_id);
        }
    }
    !keep.is_empty()
}

fn fail_orphans(client: &mut SpiClient<'_>, orphans: &[i64]) {
    if orphans.is_empty() {
        return;
    }
    client
        .update(
            "UPDATE sluice.task_run t
                SET status = 'failed', finished_at = now(),
                    last_error = format('task definition \"%s\" no longer exists', t.task_name)
              WHERE t.id = ANY((SELECT array_agg(l.id) FROM (
                                  SELECT q.id FROM sluice.task_run q
                                   WHERE q.id = ANY($1) AND q.status::text = 'queued'
                                     FOR UPDATE SKIP LOCKED) l)::bigint[])",
            None,
            &[orphans.to_vec().into()],
        )
        .expect("failing orphaned tasks failed");
}

/// When the next delayed task becomes runnable (index scan starting at now).
fn next_delayed(client: &mut SpiClient<'_>) -> Option<Micros> {
    client
        .update(
            "SELECT min(run_at) FROM sluice.task_run WHERE status = 'queued' AND run_at > now()",
            None,
            &[],
        )
        .ok()?
        .first()
        .get_one::<TimestampWithTimeZone>()
        .ok()?
        .map(pg_sys::TimestampTz::from)
}
