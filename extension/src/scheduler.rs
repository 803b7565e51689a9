//! The scheduler: one background worker per cluster, connected to `sluice.database`.
//!
//! Each tick runs in one transaction: maintenance (at most every 100 ms: dead workers,
//! timeouts, signals), a read of new arrivals into its memory (`crate::queue`), assignment
//! planned in Rust (`crate::assign`) and posted in shared memory (`crate::wake`), where each
//! worker's fetch claims its tasks, then one NOTIFY per worker that got work. It sleeps on its latch until a
//! commit wakes it (see `crate::wake`), the next delayed task or timeout falls due, or
//! `sluice.poll_interval` passes. Tables are the truth: a restarted scheduler rebuilds its
//! memory from them.

use crate::assign::{self, Candidate, DesiredLabel, WorkerCapacity};
use crate::flow::{Limit, RateLimits, RateUse};
use crate::queue::{
    Arrival, ConcurrencyRule, Cursor, Micros, QueueState, RowState, RunningAttempt, Strategy,
    TaskFlow, FROM_START,
};
use crate::{arrivals, claims, gucs, wake};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::PgOid;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

/// How long to wait after a tick that left work it could take soon (rows locked by another
/// transaction, more arrivals to read, tasks just requeued): short, but not a busy loop.
const RETRY_SOON: Duration = Duration::from_millis(5);
/// Lost workers, timeouts and cancel signals are checked at most this often.
const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(100);
/// The runnable queue in memory is compared with the table this often, a slice per tick (see
/// `QueueState::sweep`); running attempts memory lacks are loaded as the sweep meets them, and
/// long-stopped workers are forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Rows compared per slice while a sweep is under way (about 3.5 µs each), and the longest
/// wait between slices: 1,000,000 queued tasks are swept in about 15 s at a few % of a core.
/// A slice holds up the scheduler for ~4 ms; slices of 5,000 (~17 ms) made a pickup that
/// arrived during one wait that long (p99 13-18 ms with 500,000 tasks queued).
const SWEEP_ROWS_PER_TICK: usize = 1_000;
const SWEEP_TICK: Duration = Duration::from_millis(10);
/// A commit that deleted task rows starts a sweep at once, but not sooner than this after the
/// last sweep started (see `Scheduler::tick`).
const DELETION_SWEEP_SPACING: Duration = Duration::from_secs(5);
/// Finished tasks past their retention are deleted once a second, this many per status per
/// call (3-5 ms per 1,000); a full batch is followed by another one after the next tick, at
/// least `PURGE_AGAIN_SPACING` later, so a backlog goes at up to 200,000 per second per status.
/// The scheduler assigns nothing while it purges: batches of 5,000 every maintenance (20-30 ms
/// each, eight a second at 40,000 completions a second) left the workers idle for longer than
/// their claimed work lasted, and the churn scenario's rate dropped by a fifth once its
/// retention began to purge. A batch of 1,000 is shorter than what a worker has in hand.
const PURGE_INTERVAL: Duration = Duration::from_secs(1);
const PURGE_BATCH: i32 = 1_000;
const PURGE_AGAIN_SPACING: Duration = Duration::from_millis(5);
/// Workflow step outcomes applied per tick, at most (about 0.2 ms each: a tick stays short
/// enough that assignments are not held up behind a burst of outcomes).
const ADVANCE_PER_TICK: i32 = 250;
/// Waiting tasks past their schedule deadline cancelled per maintenance, at most.
const EXPIRED_PER_MAINTENANCE: usize = 10_000;
/// At most this many runnable tasks are kept in memory (about 150 bytes each); beyond it,
/// newer arrivals are read as room frees up, so priorities apply among the oldest this many.
const MAX_READY_IN_MEMORY: usize = 1_000_000;
/// Every running attempt is checked in the table at least this often (see `check_running`).
const RUNNING_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Arrivals read per tick, so that a deep backlog does not delay the first assignments, nor
/// anything else: at 20,000 a tick took up to 160 ms (about 5 µs per row) while a backlog of a
/// million was read, and every pickup and every rate-limited start waited for it.
const ARRIVALS_PER_TICK: usize = 5_000;
/// Arrivals read per tick while memory already holds this many rounds of work for every slot
/// of the live workers: reading is then not what keeps the workers busy, and a tick spent
/// reading 5,000 rows (25-90 ms with a million queued) is that long a gap in assignments. At
/// several hundred ticks a second the backlog is still read faster than it drains, so the
/// priorities of tasks behind it are seen a few seconds later at most.
const ARRIVALS_PER_BUSY_TICK: usize = 500;
const ROUNDS_IN_MEMORY: usize = 8;
/// Behind such a backlog, one read every this often (100,000 arrivals a second at most, faster
/// than a drain on this machine): with ticks 200 µs apart a read every tick read the backlog
/// into memory at several hundred thousand rows a second, CPU the workers' backends needed, and
/// a drain with 1,000,000 queued ran at 0.66-0.70 of one with 10,000.
const BACKLOG_READ_SPACING: Duration = Duration::from_millis(5);
/// Ticks start at least this long after the previous one ended (`BUSY_TICK_SPACING` after a
/// tick that assigned work), so that a stream of commits (enqueues, the completions of many
/// workers) is taken in one tick instead of one tick each. A scheduler that has been idle for
/// longer answers a wake-up at once, so pickup latency does not pay it. While busy, the
/// spacing is how long freed slots wait: at 2 ms the default shape (4 workers x 10 slots, each
/// worker's ten no-op tasks done in well under a millisecond) drained 14,400-15,300 tasks/s;
/// at 200 µs 23,200-23,800/s, and 4 x 250 went from 80,000 to 101,000-104,000/s (one session,
/// `SLUICE_BENCH_DRAIN_ONLY`). Commits still coalesce: a tick takes everything committed
/// while the previous one ran.
const TICK_SPACING: Duration = Duration::from_millis(1);
const BUSY_TICK_SPACING: Duration = Duration::from_micros(200);
/// Cron schedules fired and scheduled workflow runs started per timer call, at most (each kind).
const TIMERS_PER_CALL: i32 = 100;
/// History (events, fired cron ticks) deleted per call of the purge, at most.
const HISTORY_PURGE_BATCH: i32 = 5_000;
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
    // The scheduler's commits (requeues of lost attempts, timeouts, expiries) do not wait for
    // the disk. A crash can lose only its last few hundred milliseconds of them, which puts
    // those tasks back where they were (running, until the next check finds them again):
    // nothing is lost and nothing completes twice. Assignments are not written by the
    // scheduler at all; a worker's fetch claims them (see sluice.fetch_tasks).
    //
    // Every query of the scheduler on task_run is meant as an index lookup or a short index
    // range. Right after a burst of enqueues the table statistics still describe a nearly
    // empty table and the planner picks sequential scans that read the whole table every tick.
    BackgroundWorker::transaction(|| {
        Spi::run("SET synchronous_commit = off").expect("setting synchronous_commit failed");
        Spi::run("SET enable_seqscan = off").expect("setting enable_seqscan failed");
        // Its statements are small and run hundreds of times a second; a plan made expensive
        // by the disabled seqscan of a tiny table (definitions, workers) would otherwise be
        // JIT-compiled on every execution, which once took most of the scheduler's CPU.
        Spi::run("SET jit = off").expect("setting jit failed");
        // The arrival reads walk the arrivals index in (run_at, id) order from the cursor.
        // With statistics that say the table holds one row, the planner preferred the
        // schedule-deadline index (same predicate; since dropped) plus a sort: every read
        // scanned and sorted every queued task, 70 ms per tick at 100,000 queued. Without sorts
        // on offer, the ordered index is the only cheap plan.
        Spi::run("SET enable_sort = off").expect("setting enable_sort failed");
        // Its prepared statements (and the plpgsql functions it calls) run with parameters, for
        // which the plan cache makes a custom plan on every execution while it judges the
        // generic one costlier: planning was a quarter of the scheduler's CPU with one worker
        // of ten slots. The settings above leave one sensible plan per statement, so plan once.
        Spi::run("SET plan_cache_mode = force_generic_plan")
            .expect("setting plan_cache_mode failed");
        // In a freshly created database one of its statements was planned as a parallel
        // query (seen in the log when the workers were stopped): starting worker processes,
        // several milliseconds each, for what is meant as a short index lookup.
        Spi::run("SET max_parallel_workers_per_gather = 0")
            .expect("setting max_parallel_workers_per_gather failed");
    });
    // Assignments posted by a previous scheduler are forgotten with its memory: their rows are
    // still queued and are read again.
    wake::clear_assignments();
    wake::publish_scheduler(unsafe { (*pg_sys::MyProc).pgprocno });
    log!("sluice scheduler started for database \"{database}\"");

    let mut scheduler = Scheduler::new();
    let mut sleep = Duration::ZERO;
    let mut warned_version: Option<String> = None;
    let mut last_tick: Option<(Instant, Duration)> = None;
    let mut stats = TickStats::new();
    // When the next tick is due by itself (timers, maintenance, the poll interval).
    let mut due_at = Instant::now();
    while BackgroundWorker::wait_latch(Some(sleep)) {
        if let Some((ended, spacing)) = last_tick {
            // The latch stays set meanwhile; a signal is handled right after.
            std::thread::sleep(spacing.saturating_sub(ended.elapsed()));
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        // Woken early by commits that can change nothing yet: enqueues while no worker has a
        // free slot. Their arrivals are read by the next tick that can assign (a completion,
        // a registration or a definition change wakes one at once) or at the due time. In a
        // producer-only run the scheduler otherwise ticked on every enqueue commit and used a
        // third of a core doing so.
        let early = due_at.saturating_duration_since(Instant::now());
        if !early.is_zero() && scheduler.wake_changes_nothing() {
            sleep = early;
            continue;
        }
        let poll = Duration::from_millis(gucs::POLL_INTERVAL_MS.get().max(10) as u64);
        // Before the tick's snapshot: see crate::wake for why the order matters.
        let arrivals_committed = wake::take_committed_runnable_from();
        if let Some(at) = arrivals_committed {
            scheduler.queue.rewind_to(at);
        }
        // A tick woken by new arrivals assigns them before the periodic upkeep that may be due
        // (see `Scheduler::upkeep_deferred`), once.
        scheduler.upkeep_may_wait = arrivals_committed.is_some() && !scheduler.upkeep_deferred;
        if let Some(at) = wake::take_committed_delayed_from() {
            scheduler.delayed_committed(at);
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
        let started = Instant::now();
        let outcome = BackgroundWorker::transaction(move || {
            let mut this = this;
            Spi::connect_mut(|client| this.tick(client))
        });
        // After the commit: a woken worker's fetch must find the tick's own writes (tasks it
        // requeued and assigned again) committed.
        wake::wake_waiters(&scheduler.waiters_to_wake);
        scheduler.waiters_to_wake.clear();
        if matches!(outcome, Tick::Ran { .. }) && scheduler.housekeeping_due() {
            let this = std::panic::AssertUnwindSafe(&mut scheduler);
            BackgroundWorker::transaction(move || {
                let mut this = this;
                Spi::connect_mut(|client| this.housekeeping(client))
            });
        }
        // A client backend sends its table statistics before it waits for the next command; a
        // background worker only when it asks. Without this the scheduler's purges and updates
        // never reached pg_stat_user_tables (n_tup_del, n_dead_tup, n_live_tup) until it
        // exited, and autovacuum, which starts from those counts, missed the purge's dead rows.
        // Outside a transaction, as it must be; Postgres sends at most one a second unless
        // forced, so asking every tick costs a clock read.
        unsafe { pg_sys::pgstat_report_stat(false) };
        sleep = match outcome {
            Tick::Ran { next_due, assigned } => {
                stats.record(started.elapsed(), assigned, &mut scheduler);
                warned_version = None;
                let spacing = if assigned > 0 {
                    BUSY_TICK_SPACING
                } else {
                    TICK_SPACING
                };
                last_tick = Some((Instant::now(), spacing));
                // Maintenance is due every MAINTENANCE_INTERVAL while work is in flight.
                let maintenance = (scheduler.queue.running_len() > 0)
                    .then(|| MAINTENANCE_INTERVAL.saturating_sub(scheduler.since_maintenance()));
                let deferred = scheduler.upkeep_deferred.then_some(Duration::ZERO);
                let purge_again = scheduler
                    .purge_again
                    .then(|| PURGE_AGAIN_SPACING.saturating_sub(scheduler.last_purge.elapsed()));
                [next_due, maintenance, deferred, purge_again, Some(poll)]
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
        // Enqueues leave the latch alone while arrivals alone change nothing; clearing that
        // reports arrivals committed meanwhile, which then need a tick now.
        if wake::set_arrivals_idle(scheduler.arrivals_change_nothing()) {
            sleep = Duration::ZERO;
        }
        due_at = Instant::now() + sleep;
    }
    wake::publish_scheduler(-1);
    log!("sluice scheduler exiting");
    // Exit code 1, not 0: the postmaster restarts a background worker only after a non-zero
    // exit, and a SIGTERM that is not a server shutdown (pg_terminate_backend, DROP DATABASE
    // ... FORCE) must not stop scheduling for good. During shutdown nothing is restarted.
    unsafe { pg_sys::proc_exit(1) };
}

/// Tick statistics, logged every `STATS_INTERVAL` with `sluice.log_scheduler_stats` on.
struct TickStats {
    since: Instant,
    ticks: u64,
    assigned: u64,
    busy: Duration,
    longest: Duration,
}

const STATS_INTERVAL: Duration = Duration::from_secs(10);

impl TickStats {
    fn new() -> Self {
        TickStats {
            since: Instant::now(),
            ticks: 0,
            assigned: 0,
            busy: Duration::ZERO,
            longest: Duration::ZERO,
        }
    }

    fn record(&mut self, took: Duration, assigned: usize, scheduler: &mut Scheduler) {
        self.ticks += 1;
        self.assigned += assigned as u64;
        self.busy += took;
        self.longest = self.longest.max(took);
        let elapsed = self.since.elapsed();
        if elapsed < STATS_INTERVAL {
            return;
        }
        if gucs::LOG_SCHEDULER_STATS.get() {
            log!(
                "sluice scheduler: {} ticks in {:.1} s ({:.1} s busy, longest {:.1} ms), {} assigned, {} ready, {} running, {} swept out, {} finished tasks deleted",
                self.ticks,
                elapsed.as_secs_f64(),
                self.busy.as_secs_f64(),
                self.longest.as_secs_f64() * 1000.0,
                self.assigned,
                scheduler.queue.ready_len(),
                scheduler.queue.running_len(),
                scheduler.swept_out,
                scheduler.purged,
            );
        }
        scheduler.swept_out = 0;
        scheduler.purged = 0;
        *self = TickStats::new();
    }
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
    /// The live workers with their full slot counts, as last read (see `tick`).
    workers: Option<Vec<WorkerCapacity>>,
    /// Prepared once the extension is installed at the library's version (see `Statements`).
    statements: Option<Statements>,
    /// Running attempts must be (re)loaded from the table: at start.
    load_running: bool,
    /// A second load shortly after start: a fetch that took assignments from the board before
    /// this scheduler cleared it may commit its claims after the first load.
    reload_running_at: Option<Instant>,
    /// Every running attempt must be checked in the table this tick (see `check_running`).
    check_all_running: bool,
    last_running_check: Instant,
    last_maintenance: Option<Instant>,
    /// This tick was woken by committed arrivals, and the last one did not defer its upkeep.
    upkeep_may_wait: bool,
    /// The last tick left the maintenance and the running check that were due to the next
    /// tick, which follows at once: it was woken by arrivals, and they were assigned first.
    /// A maintenance tick takes 1-3 ms (the lost-worker and timeout functions, the workers'
    /// reload, the version check), and a task that arrived during one waited for all of it:
    /// pickups that met one, every 100 ms while work was in flight, were the pickup
    /// scenario's p95-p99 (1-2.5 ms against a median of 0.3). Never twice in a row, so a
    /// stream of arrivals delays maintenance by one tick at most.
    upkeep_deferred: bool,
    last_sweep: Instant,
    /// Where the sweep under way continues (exclusive), if one is.
    sweep_from: Option<Cursor>,
    /// Ready tasks the sweeps found not queued any more (for the statistics).
    swept_out: usize,
    last_purge: Instant,
    /// The last purge deleted a full batch: more are due.
    purge_again: bool,
    last_history_purge: Instant,
    /// The last arrivals read while memory held `ROUNDS_IN_MEMORY` rounds of work.
    last_backlog_read: Instant,
    /// A purge is due (once a second at maintenance, or again after a full batch): the
    /// housekeeping after the tick runs one.
    purge_due: bool,
    /// Where the next purge starts, per status (succeeded, failed, cancelled) of tasks, then
    /// of workflow runs: finish times before were purged (back to the start with each sweep,
    /// for rows skipped as locked).
    purge_after: [Micros; 6],
    /// Finished tasks deleted (for the statistics).
    purged: usize,
    /// When `sluice._fire_timers` is next due (cron ticks, scheduled workflow runs): None if
    /// it must be called this tick (at start, after a committed change, with each sweep);
    /// i64::MAX if nothing is scheduled.
    timers_due: Option<Micros>,
    /// The step-outcome generation (crate::wake) the last application of outcomes saw, and
    /// whether to apply again anyway (the last call took some: more, or some put back).
    outcomes_seen: u64,
    advance_again: bool,
    /// After the last tick's assignments no live worker had a free slot.
    no_free_slot: bool,
    /// The deletion generation (crate::wake) the last sweep started for deletions saw, and
    /// when the last sweep of any kind started.
    deletions_seen: u64,
    last_sweep_started: Option<Instant>,
    /// How long the last finished sweep took, from its start to its last slice.
    last_sweep_took: Option<Duration>,
    /// When the next delayed task (queued, run_at in the future) becomes runnable, as last
    /// read from the table and lowered by commits since (`wake::take_committed_delayed_from`);
    /// `Some(None)`: none; `None`: to be read. Reading it every tick was an executor start-up
    /// in the tick every pickup waits for.
    next_delayed: Option<Option<Micros>>,
    /// Task definitions and rate limits, reloaded with maintenance and after every committed
    /// change (`wake::config_generation`).
    definitions: Definitions,
    config_generation: u64,
    /// Rate-limit windows; rebuilt from the table's recent starts when the scheduler starts.
    limits: RateLimits,
    limits_rebuilt: bool,
    /// Backends waiting for assignments this tick posted (`Posting::waiters`), whose latches
    /// are set once the tick has committed.
    waiters_to_wake: Vec<wake::Waiter>,
}

/// What the scheduler needs from the definitions and rate limits.
#[derive(Default)]
struct Definitions {
    /// Execution timeout per task name (microseconds): estimates a posted task's timeout until
    /// its claim's own is read.
    execution_timeouts: rustc_hash::FxHashMap<String, Micros>,
    rules: rustc_hash::FxHashMap<String, ConcurrencyRule>,
    /// Per task name, per entry of its rate_limits: the limit of a dynamic key.
    dynamic_limits: HashMap<String, Vec<Option<Limit>>>,
    /// Per task name: the worker labels it asks for (if any).
    desired_labels: HashMap<String, Vec<DesiredLabel>>,
    declared: HashMap<String, Limit>,
}

impl Definitions {
    fn longest_window(&self) -> Micros {
        self.declared
            .values()
            .copied()
            .chain(self.dynamic_limits.values().flatten().flatten().copied())
            .map(|l| l.per)
            .max()
            .unwrap_or(0)
    }

    fn flow(
        &self,
        task_name: &str,
        key: Option<String>,
        rates: Option<(Vec<String>, Vec<i32>)>,
    ) -> Option<TaskFlow> {
        if key.is_none() && rates.is_none() {
            return None;
        }
        let dynamic = self.dynamic_limits.get(task_name);
        let rates = rates
            .map(|(keys, units)| {
                keys.into_iter()
                    .zip(units)
                    .enumerate()
                    .map(|(i, (key, units))| RateUse {
                        key,
                        units: units as i64,
                        dynamic_limit: dynamic.and_then(|d| d.get(i).copied().flatten()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(TaskFlow {
            concurrency_key: key,
            rates,
        })
    }
}

/// A posted assignment not claimed after this long, and no longer on the board (taken by a
/// fetch that rolled it back without aborting its transaction), is queued again.
const UNCLAIMED_GRACE_MICROS: Micros = 5_000_000;

/// The statements of a tick, planned once: a busy scheduler ticks hundreds of times a second,
/// and parsing and planning each statement every time cost more than running it.
struct Statements {
    installed_version: OwnedPreparedStatement,
    load_workers: OwnedPreparedStatement,
    load_definitions: OwnedPreparedStatement,
    load_rate_limits: OwnedPreparedStatement,
    read_arrivals: OwnedPreparedStatement,
    /// A slice of the periodic sweep: the queued rows between two places of the arrivals index.
    sweep: OwnedPreparedStatement,
    check_running: OwnedPreparedStatement,
    next_delayed: OwnedPreparedStatement,
    advance_runs: OwnedPreparedStatement,
}

fn oid(oid: pg_sys::Oid) -> PgOid {
    PgOid::from_untagged(oid)
}

impl Statements {
    fn prepare(client: &SpiClient<'_>) -> Statements {
        let prepare = |sql: &str, args: &[PgOid]| {
            client
                .prepare_mut(sql, args)
                .unwrap_or_else(|e| panic!("preparing a scheduler statement failed: {e}: {sql}"))
                .keep()
        };
        Statements {
            installed_version: prepare(
                "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'sluice'",
                &[],
            ),
            load_workers: prepare(
                "SELECT w.id, w.task_names, w.slots,
                        CASE WHEN w.labels <> '{}' THEN
                             (SELECT array_agg(l.key ORDER BY l.key) FROM jsonb_each_text(w.labels) l) END,
                        CASE WHEN w.labels <> '{}' THEN
                             (SELECT array_agg(l.value ORDER BY l.key) FROM jsonb_each_text(w.labels) l) END
                   FROM sluice.worker w
                  WHERE w.stopped_at IS NULL ORDER BY w.id",
                &[],
            ),
            load_definitions: prepare(
                "SELECT d.name, (extract(epoch FROM d.execution_timeout) * 1000000)::bigint,
                        d.max_runs, d.concurrency_strategy,
                        (SELECT array_agg(CASE WHEN e.spec ? 'key_path'
                                               THEN (e.spec->>'limit')::bigint ELSE 0 END
                                          ORDER BY e.n)
                           FROM jsonb_array_elements(d.rate_limits) WITH ORDINALITY AS e(spec, n)),
                        (SELECT array_agg(CASE WHEN e.spec ? 'key_path'
                                               THEN (extract(epoch FROM (e.spec->>'per')::interval)
                                                     * 1000000)::bigint
                                               ELSE 0 END
                                          ORDER BY e.n)
                           FROM jsonb_array_elements(d.rate_limits) WITH ORDINALITY AS e(spec, n)),
                        CASE WHEN d.desired_labels <> '[]' THEN d.desired_labels::text END
                   FROM sluice.task_definition d",
                &[],
            ),
            load_rate_limits: prepare(
                "SELECT l.key, l.max_units::bigint,
                        (extract(epoch FROM l.per) * 1000000)::bigint
                   FROM sluice.rate_limit l",
                &[],
            ),
            read_arrivals: prepare(
                "SELECT id, task_name, priority, run_at, attempt,
                        concurrency_key, rate_limit_keys, rate_limit_units, schedule_deadline
                   FROM sluice.task_run
                  WHERE finished_at IS NULL AND status = 'queued'
                    AND (run_at, id) > ($1, $2) AND run_at <= now()
                  ORDER BY run_at, id
                  LIMIT $3",
                &[
                    oid(pg_sys::TIMESTAMPTZOID),
                    oid(pg_sys::INT8OID),
                    oid(pg_sys::INT8OID),
                ],
            ),
            sweep: prepare(
                "SELECT id, task_name, priority, run_at, attempt,
                        concurrency_key, rate_limit_keys, rate_limit_units, schedule_deadline,
                        status::text, worker_id, timeout_at
                   FROM sluice.task_run
                  WHERE finished_at IS NULL AND (run_at, id) > ($1, $2) AND (run_at, id) <= ($3, $4)
                    AND run_at <= now()
                  ORDER BY run_at, id
                  LIMIT $5",
                &[
                    oid(pg_sys::TIMESTAMPTZOID),
                    oid(pg_sys::INT8OID),
                    oid(pg_sys::TIMESTAMPTZOID),
                    oid(pg_sys::INT8OID),
                    oid(pg_sys::INT8OID),
                ],
            ),
            // `id = ANY(...)` and `status::text` keep this a primary-key lookup per attempt: a
            // join with unnest(), or a plain `status = 'running'` that matches the partial
            // worker index, lets the planner scan every running row and, under a held xmin,
            // their dead versions.
            check_running: prepare(
                "SELECT id, attempt, status::text, worker_id, timeout_at FROM sluice.task_run
                  WHERE id = ANY($1)",
                &[oid(pg_sys::INT8ARRAYOID)],
            ),
            // The row comparison makes this a scan of the arrivals index starting at now (a
            // plain `run_at > now()` was once planned as a walk over every queued task through
            // the deadline index, a millisecond per tick).
            next_delayed: prepare(
                "SELECT run_at FROM sluice.task_run
                  WHERE finished_at IS NULL AND status = 'queued'
                    AND (run_at, id) > (now(), 9223372036854775807)
                  ORDER BY run_at, id LIMIT 1",
                &[],
            ),
            advance_runs: prepare(
                "SELECT sluice._advance_runs($1)",
                &[oid(pg_sys::INT4OID)],
            ),
        }
    }
}

impl Scheduler {
    /// Whether a wake-up can be left for the next due tick: no worker has a free slot, so
    /// new arrivals cannot be assigned, and nothing else that a tick acts on at once has
    /// happened (an ended attempt frees a slot; registrations, definitions, limits and crons
    /// bump the configuration generation; step outcomes their own). A definition with a
    /// cancelling concurrency strategy judges each arrival as it comes, so then every wake
    /// ticks.
    fn wake_changes_nothing(&self) -> bool {
        self.arrivals_change_nothing()
            && !self.advance_again
            && !wake::ended_attempts_pending()
            && wake::config_generation() == self.config_generation
            && wake::outcomes_generation() == self.outcomes_seen
            && wake::deletions_generation() == self.deletions_seen
            && self
                .definitions
                .rules
                .values()
                .all(|rule| rule.strategy == Strategy::GroupRoundRobin)
    }

    /// A commit made tasks queued from `at`, after its start.
    fn delayed_committed(&mut self, at: Micros) {
        if let Some(known) = self.next_delayed {
            self.next_delayed = Some(Some(known.map_or(at, |t| t.min(at))));
        }
    }

    /// When the next delayed task becomes runnable. Read from the table when not known, when
    /// the time known has come (that task is read as an arrival this tick; the one after it is
    /// not known), and in maintenance, for what no commit reported (a direct INSERT, a prepared
    /// transaction, a path that woke the scheduler without its run_at).
    fn next_delayed_at(
        &mut self,
        client: &mut SpiClient<'_>,
        now: Micros,
        maintain: bool,
    ) -> Option<Micros> {
        match self.next_delayed {
            Some(known) if !maintain && known.is_none_or(|at| at > now) => known,
            _ => {
                let statements = self.statements.as_ref().expect("prepared by the tick");
                let read = next_delayed(client, statements);
                self.next_delayed = Some(read);
                read
            }
        }
    }

    /// The part of `wake_changes_nothing` that new arrivals cannot change: published in shared
    /// memory so that an enqueue's commit need not set the latch at all (see crate::wake).
    /// Cancelling strategies stay out of it: what they cancel on arrival is running or
    /// assigned, and while anything is, maintenance ticks every 100 ms anyway.
    fn arrivals_change_nothing(&self) -> bool {
        self.no_free_slot && self.sweep_from.is_none()
    }

    fn new() -> Self {
        Scheduler {
            queue: QueueState::new(),
            statements: None,
            load_running: true,
            reload_running_at: Some(Instant::now() + Duration::from_secs(2)),
            check_all_running: false,
            last_running_check: Instant::now(),
            last_maintenance: None,
            upkeep_may_wait: false,
            upkeep_deferred: false,
            last_sweep: Instant::now(),
            sweep_from: None,
            swept_out: 0,
            last_purge: Instant::now(),
            purge_again: false,
            last_history_purge: Instant::now(),
            last_backlog_read: Instant::now(),
            purge_due: false,
            purge_after: [i64::MIN; 6],
            purged: 0,
            timers_due: None,
            outcomes_seen: 0,
            advance_again: true,
            no_free_slot: false,
            deletions_seen: 0,
            last_sweep_started: None,
            last_sweep_took: None,
            next_delayed: None,
            definitions: Definitions::default(),
            config_generation: u64::MAX,
            workers: None,
            limits: RateLimits::default(),
            limits_rebuilt: false,
            waiters_to_wake: Vec::new(),
        }
    }

    fn since_maintenance(&self) -> Duration {
        self.last_maintenance
            .map_or(Duration::ZERO, |at| at.elapsed())
    }

    fn tick(&mut self, client: &mut SpiClient<'_>) -> Tick {
        let maintenance_due = self
            .last_maintenance
            .is_none_or(|at| at.elapsed() >= MAINTENANCE_INTERVAL);
        let running_check_due = self.last_running_check.elapsed() >= RUNNING_CHECK_INTERVAL;
        // Not the first ticks: they check the installed version and load the workers.
        let defer = (maintenance_due || running_check_due)
            && self.upkeep_may_wait
            && self.statements.is_some()
            && self.workers.is_some();
        self.upkeep_deferred = defer;
        let maintain = maintenance_due && !defer;
        if maintain || self.statements.is_none() {
            // Also the first tick: nothing runs against a schema of another version.
            match installed_version(client, self.statements.as_ref()) {
                None => {
                    self.statements = None;
                    self.workers = None;
                    return Tick::NotInstalled;
                }
                Some(v) if v != LIBRARY_VERSION => {
                    self.statements = None;
                    self.workers = None;
                    return Tick::VersionMismatch(v);
                }
                Some(_) => {}
            }
        }
        let statements = self
            .statements
            .get_or_insert_with(|| Statements::prepare(client));
        let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
        let mut soon = false;

        let purge_workers = self.last_sweep.elapsed() >= SWEEP_INTERVAL;
        if purge_workers {
            self.sweep_from = Some(FROM_START);
            self.purge_after = [i64::MIN; 6];
            self.last_sweep = Instant::now();
            self.last_sweep_started = Some(Instant::now());
        }
        // Task rows deleted behind the scheduler's back (the API cancels instead): compare the
        // queue in memory with the table now, not at the next periodic sweep, so that it stops
        // handing out tasks that are gone. Never restarts a sweep under way, and starts one no
        // sooner than DELETION_SWEEP_SPACING, and four times the last sweep's length, after the
        // last one started (a tick is due then, below): a job that keeps deleting finished
        // tasks must not keep the scheduler sweeping a long queue.
        let deletions = wake::deletions_generation();
        let mut deletion_sweep_due = None;
        if deletions != self.deletions_seen && self.sweep_from.is_none() {
            let spacing = self.last_sweep_took.map_or(DELETION_SWEEP_SPACING, |took| {
                (took * 4).max(DELETION_SWEEP_SPACING)
            });
            let since = self.last_sweep_started.map_or(spacing, |at| at.elapsed());
            if since >= spacing {
                self.deletions_seen = deletions;
                // Nothing waiting in memory, nothing to forget.
                if self.queue.ready_len() > 0 {
                    self.sweep_from = Some(FROM_START);
                    self.last_sweep_started = Some(Instant::now());
                }
            } else {
                let wait = spacing - since;
                deletion_sweep_due = Some(now.saturating_add(wait.as_micros() as Micros));
            }
        }
        if self
            .reload_running_at
            .is_some_and(|at| at <= Instant::now())
        {
            self.reload_running_at = None;
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
        // Every change through the API (define_task, set_rate_limit, a deleted definition,
        // register_worker, deregister_worker, set_worker_labels) bumps the generation at commit;
        // the periodic sweep also catches direct table edits. Read before the tables, so that
        // a change committed in between is read again next tick.
        let generation = wake::config_generation();
        let config_changed = purge_workers || generation != self.config_generation;
        // The live workers are kept from tick to tick: the only other change, workers stopped
        // for a lost session or heartbeat, is made by `_stop_lost_workers` in a maintenance
        // tick, which reloads them. Their query's label subqueries were the largest part of an
        // arrival tick's executor start-up (perf, pickup scenario).
        if maintain || config_changed || self.workers.is_none() {
            self.workers = Some(load_workers(client, statements));
        }
        let workers = self.workers.clone().unwrap_or_default();
        if config_changed {
            self.config_generation = generation;
            self.reload_definitions(client);
            // schedule_cron and scheduled runs signal through the same generation
            self.timers_due = None;
        }
        let statements = self.statements.as_ref().expect("prepared above");
        if !self.limits_rebuilt {
            rebuild_rate_windows(client, &self.definitions, &mut self.limits);
            self.limits_rebuilt = true;
        }
        if maintain {
            let live: HashSet<i64> = workers.iter().map(|w| w.worker_id).collect();
            // Assignments posted to workers that are gone go back to the queue; their claimed
            // attempts are requeued by _maintain.
            let dead = self.queue.dead_workers(&live);
            if !dead.is_empty() {
                for p in wake::withdraw_assignments(&dead) {
                    self.queue.unpost(p.task_id, p.attempt);
                }
            }
            let lost = self.queue.lost(&live);
            let timed_out = self.queue.timed_out(now);
            soon |= !lost.is_empty() || !timed_out.is_empty();
            let signalled = client
                .update(
                    "SELECT w FROM sluice._maintain($1, $2, $3) AS w",
                    None,
                    &[lost.into(), timed_out.into(), purge_workers.into()],
                )
                .expect("sluice._maintain failed");
            for row in signalled {
                if let Ok(Some(id)) = row.get::<i64>(1) {
                    notify.insert(id, "signal");
                }
            }
            let expired = self.queue.expired(now, EXPIRED_PER_MAINTENANCE);
            if !expired.is_empty() {
                expire_queued(client, &mut self.queue, expired, now);
            }
            self.last_maintenance = Some(Instant::now());
            if self.last_purge.elapsed() >= PURGE_INTERVAL {
                self.purge_due = true;
            }
            // Windows of dynamic keys (one per user, say) are dropped once nothing counts.
            self.limits.forget_idle(now);
        }
        // Endings are reported through shared memory (crate::wake); checking every running
        // attempt in the table is the safety net, once a second or when reports overflowed.
        if self.purge_again && !defer && self.last_purge.elapsed() >= PURGE_AGAIN_SPACING {
            self.purge_due = true;
        }
        // A check forced by overflowed reports is not deferred: until it runs, ended attempts
        // keep their slots.
        if self.check_all_running || (running_check_due && !defer) {
            check_running(client, statements, &mut self.queue, now);
            self.check_all_running = false;
            self.last_running_check = Instant::now();
        }
        if self.timers_due.is_none_or(|due| due <= now) {
            // Before the arrivals read: a task a cron tick enqueues waits for the next tick
            // (its row is not committed yet), which the wake-up at commit brings at once.
            self.timers_due = Some(fire_timers(client, now));
        }
        let slots: usize = workers.iter().map(|w| w.free_slots.max(0) as usize).sum();
        let behind_backlog = self.queue.ready_len() >= ROUNDS_IN_MEMORY * slots.max(1);
        let arrivals_limit = if behind_backlog {
            ARRIVALS_PER_BUSY_TICK
        } else {
            ARRIVALS_PER_TICK
        };
        if !behind_backlog || self.last_backlog_read.elapsed() >= BACKLOG_READ_SPACING {
            if behind_backlog {
                self.last_backlog_read = Instant::now();
            }
            soon |= read_arrivals(
                client,
                statements,
                &self.definitions,
                &mut self.queue,
                now,
                arrivals_limit,
            );
        }
        // After the read: the steps this starts are committed with the tick and read by the
        // next one (a task assigned before its row commits could not be claimed).
        // Only when a commit recorded outcomes since (plus maintenance, as a safety net): in a
        // drain profile this call, planned afresh every tick, was about a quarter of the
        // scheduler's CPU, for a table that is empty unless workflows run.
        let outcomes = wake::outcomes_generation();
        if outcomes != self.outcomes_seen || self.advance_again || maintain {
            self.outcomes_seen = outcomes;
            let taken = advance_runs(client, statements);
            self.advance_again = taken > 0;
            soon |= taken >= ADVANCE_PER_TICK;
        }
        let victims = self.queue.concurrency_victims();
        if !victims.is_empty() {
            cancel_for_concurrency(client, &victims);
        }

        let capacity: Vec<WorkerCapacity> = workers
            .into_iter()
            .map(|mut w| {
                w.free_slots -= self.queue.running_on(w.worker_id);
                w
            })
            .collect();
        let demand = assign::demand(&capacity);
        let mut planned = 0;
        let mut rate_blocked_until = None;
        if !demand.is_empty() {
            // Rate limits count an admission at the time of its posting, not at the tick's
            // start: reading arrivals, maintenance or a workflow batch can take tens of
            // milliseconds first, and a window counted from the earlier time let the next
            // window's starts come that much less than its length after these.
            let admitted_at = unsafe { pg_sys::GetCurrentTimestamp() };
            let found = self
                .queue
                .candidates(&demand, &mut self.limits, admitted_at);
            rate_blocked_until = found.blocked_until;
            if !found.over_limit.is_empty() {
                for (id, _) in &found.over_limit {
                    self.queue.forget_ready(*id);
                }
                fail_queued(client, &found.over_limit);
            }
            let candidates = found.candidates;
            let plan = assign::plan(&capacity, &candidates, &self.definitions.desired_labels);
            // A name defined since the last reload is not an orphan: reload before judging.
            if candidates.iter().any(|c| {
                !self
                    .definitions
                    .execution_timeouts
                    .contains_key(&*c.task_name)
            }) {
                self.reload_definitions(client);
            }
            if !plan.is_empty() {
                let posting = post(
                    client,
                    &mut self.queue,
                    &mut self.limits,
                    &candidates,
                    &plan,
                    &self.definitions.execution_timeouts,
                    admitted_at,
                );
                soon |= posting.more;
                planned = posting.posted;
                // A worker waiting in sluice.await_tasks is woken through its latch after
                // the commit: a NOTIFY would be delivered only once that call returned, and
                // costs this transaction an xid and a signal to every listening backend.
                let waiting: HashSet<i64> = posting.waiters.iter().map(|w| w.worker_id).collect();
                self.waiters_to_wake.extend(posting.waiters);
                // A tick that has written nothing (no xid: an arrival tick, as a rule) has
                // nothing its workers must see committed: the rows they claim are the
                // producers'. They are woken now, not after the rest of the tick and its
                // commit (about 30 µs of every pickup).
                if unsafe { pg_sys::GetTopTransactionIdIfAny() } == pg_sys::InvalidTransactionId {
                    wake::wake_waiters(&self.waiters_to_wake);
                    self.waiters_to_wake.clear();
                }
                for worker_id in posting.workers.difference(&waiting).copied() {
                    notify
                        .entry(worker_id)
                        .and_modify(|k| {
                            if *k == "signal" {
                                *k = "assigned signal"
                            }
                        })
                        .or_insert("assigned");
                }
            }
        }

        let free_slots: i64 = capacity
            .iter()
            .map(|w| i64::from(w.free_slots.max(0)))
            .sum();
        self.no_free_slot = free_slots <= planned as i64;

        for (&worker_id, kind) in &notify {
            notify_worker(worker_id, kind);
        }

        let next_due = if soon {
            Some(RETRY_SOON)
        } else {
            let due = [
                self.queue.next_timeout(),
                self.queue.next_deadline(),
                self.timers_due,
                deletion_sweep_due,
                self.next_delayed_at(client, now, maintain),
                rate_blocked_until,
            ]
            .into_iter()
            .flatten()
            .min()
            .map(|at| micros_until(at, now));
            match self.sweep_from {
                Some(_) => Some(due.map_or(SWEEP_TICK, |d| d.min(SWEEP_TICK))),
                None => due,
            }
        };
        Tick::Ran {
            next_due,
            assigned: planned,
        }
    }
}

impl Scheduler {
    /// Whether `housekeeping` has work: a retention purge or a slice of the sweep.
    fn housekeeping_due(&self) -> bool {
        self.purge_due || self.sweep_from.is_some()
    }

    /// The work no assignment waits for, in its own transaction after the tick's: a tick's
    /// notifications go out at its commit, so a purge batch or a sweep slice in the tick
    /// (10-30 ms each at full size) delayed the pickup of whatever arrived meanwhile.
    /// Neither changes what the tick decided: the purge deletes finished tasks, and the sweep
    /// only corrects memory against the table (tasks this tick posted are still queued rows,
    /// which it leaves to their workers, as it does posts of earlier ticks).
    fn housekeeping(&mut self, client: &mut SpiClient<'_>) {
        if self.purge_due {
            self.purge_due = false;
            let (purged, more) = purge_finished(client, &mut self.purge_after);
            // History (its own batches) at most once per maintenance interval, as before
            // task batches came this often.
            if self.last_history_purge.elapsed() >= MAINTENANCE_INTERVAL {
                purge_history(client);
                self.last_history_purge = Instant::now();
            }
            self.purge_again = more;
            self.purged += purged;
            self.last_purge = Instant::now();
        }
        if let Some(from) = self.sweep_from {
            let statements = self.statements.as_ref().expect("prepared by the tick");
            let (next, gone) = sweep(client, statements, &self.definitions, &mut self.queue, from);
            self.sweep_from = next;
            self.swept_out += gone;
            if next.is_none() {
                self.last_sweep_took = self.last_sweep_started.map(|at| at.elapsed());
            }
        }
    }

    fn reload_definitions(&mut self, client: &mut SpiClient<'_>) {
        let statements = self.statements.as_ref().expect("prepared before use");
        self.definitions = load_definitions(client, statements);
        self.queue.set_rules(self.definitions.rules.clone());
        self.limits.set_declared(self.definitions.declared.clone());
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

fn installed_version(
    client: &mut SpiClient<'_>,
    statements: Option<&Statements>,
) -> Option<String> {
    let rows = match statements {
        Some(s) => client.update(&s.installed_version, None, &[]),
        None => client.update(
            "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'sluice'",
            None,
            &[],
        ),
    };
    rows.ok()?.first().get_one::<String>().ok()?
}

/// Live workers with their slots (not yet reduced by their running attempts).
fn load_workers(client: &mut SpiClient<'_>, statements: &Statements) -> Vec<WorkerCapacity> {
    let rows = client
        .update(&statements.load_workers, None, &[])
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
            labels: match (
                row.get::<Vec<String>>(4).ok().flatten(),
                row.get::<Vec<String>>(5).ok().flatten(),
            ) {
                (Some(keys), Some(values)) => keys.into_iter().zip(values).collect(),
                _ => HashMap::new(),
            },
        })
    })
    .collect()
}

fn load_definitions(client: &mut SpiClient<'_>, statements: &Statements) -> Definitions {
    let mut d = Definitions::default();
    let rows = client
        .update(&statements.load_definitions, None, &[])
        .expect("loading task definitions failed");
    for row in rows {
        let (Ok(Some(name)), Ok(Some(timeout))) = (row.get::<String>(1), row.get::<i64>(2)) else {
            continue;
        };
        if let (Ok(Some(max_runs)), Ok(Some(strategy))) = (row.get::<i32>(3), row.get::<String>(4))
        {
            if let Some(strategy) = Strategy::parse(&strategy) {
                d.rules.insert(
                    name.clone(),
                    ConcurrencyRule {
                        max_runs: max_runs.max(1) as u32,
                        strategy,
                    },
                );
            }
        }
        let maxes = row
            .get::<Vec<Option<i64>>>(5)
            .ok()
            .flatten()
            .unwrap_or_default();
        let pers = row
            .get::<Vec<Option<i64>>>(6)
            .ok()
            .flatten()
            .unwrap_or_default();
        if !maxes.is_empty() {
            let limits = maxes
                .into_iter()
                .zip(pers)
                .map(|(max_units, per)| match (max_units, per) {
                    (Some(max_units), Some(per)) if max_units > 0 && per > 0 => {
                        Some(Limit { max_units, per })
                    }
                    _ => None,
                })
                .collect();
            d.dynamic_limits.insert(name.clone(), limits);
        }
        if let Ok(Some(labels)) = row.get::<String>(7) {
            d.desired_labels
                .insert(name.clone(), parse_desired_labels(&labels));
        }
        d.execution_timeouts.insert(name, timeout);
    }
    d.declared = client
        .update(&statements.load_rate_limits, None, &[])
        .expect("loading rate limits failed")
        .filter_map(|row| {
            let key = row.get::<String>(1).ok()??;
            let max_units = row.get::<i64>(2).ok()??;
            let per = row.get::<i64>(3).ok()??;
            Some((key, Limit { max_units, per }))
        })
        .collect();
    d
}

/// The definition's desired_labels (validated by sluice.define_task); values compare as text,
/// as `jsonb_each_text` gives the workers' labels.
fn parse_desired_labels(json: &str) -> Vec<DesiredLabel> {
    let Ok(serde_json::Value::Array(items)) = serde_json::from_str::<serde_json::Value>(json)
    else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let value = match item.get("value")? {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            Some(DesiredLabel {
                label: item.get("label")?.as_str()?.to_string(),
                value,
                required: item
                    .get("required")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false),
                weight: item
                    .get("weight")
                    .and_then(serde_json::Value::as_i64)
                    .unwrap_or(1),
            })
        })
        .collect()
}

/// Counts the rate-limited starts (claims) of the last window, so a restarted scheduler does
/// not admit a whole window's worth again. An attempt that was retried since counts only its
/// latest start, and an unclaimed assignment of the previous scheduler never started.
/// `rate_limited_at` has no index (a claim stays HOT): a start within the window belongs to an
/// unfinished task or to one that finished after it, which the two indexes on `finished_at`
/// find; this reads every unfinished task, as `load_running` does anyway.
fn rebuild_rate_windows(
    client: &mut SpiClient<'_>,
    definitions: &Definitions,
    limits: &mut RateLimits,
) {
    let window = definitions.longest_window();
    if window <= 0 {
        return;
    }
    let rows = client
        .update(
            "SELECT t.task_name, t.rate_limit_keys, t.rate_limit_units, t.rate_limited_at
               FROM sluice.task_run t
              WHERE t.finished_at IS NULL
                AND t.rate_limited_at > now() - make_interval(secs => $1::float8 / 1000000)
             UNION ALL
             SELECT t.task_name, t.rate_limit_keys, t.rate_limit_units, t.rate_limited_at
               FROM sluice.task_run t
              WHERE t.finished_at > now() - make_interval(secs => $1::float8 / 1000000)
                AND t.rate_limited_at > now() - make_interval(secs => $1::float8 / 1000000)",
            None,
            &[(window as f64).into()],
        )
        .expect("reading recent rate-limited starts failed");
    for row in rows {
        let (Ok(Some(name)), Ok(Some(keys)), Ok(Some(units)), Ok(Some(at))) = (
            row.get::<String>(1),
            row.get::<Vec<String>>(2),
            row.get::<Vec<i32>>(3),
            row.get::<TimestampWithTimeZone>(4),
        ) else {
            continue;
        };
        if let Some(flow) = definitions.flow(&name, None, Some((keys, units))) {
            limits.replay(&flow.rates, pg_sys::TimestampTz::from(at));
        }
    }
}

/// The claimed running attempts as the table has them, at start (this reads every unfinished
/// task: there is no index of running ones, see sql/schema.sql; the periodic sweep repairs any
/// later drift slice by slice).
fn load_running(client: &mut SpiClient<'_>, queue: &mut QueueState) {
    queue.forget_claimed();
    let rows = client
        .update(
            "SELECT id, worker_id, attempt, timeout_at, task_name, concurrency_key
               FROM sluice.task_run
              WHERE finished_at IS NULL AND status = 'running'",
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
        let task_name = row.get::<String>(5).ok().flatten().unwrap_or_default();
        let key = row.get::<String>(6).ok().flatten();
        let flow = key.map(|k| TaskFlow {
            concurrency_key: Some(k),
            rates: Vec::new(),
        });
        // A posted task that was claimed meanwhile is running now, whoever claimed it.
        queue.end_running(id);
        queue.load_running(
            id,
            &task_name,
            flow,
            RunningAttempt {
                worker_id,
                attempt,
                timeout_at,
            },
        );
    }
    load_claims(client, queue);
}

/// The attempts claimed in memory (crate::claims), which a scheduler restart does not lose:
/// running too, while their rows are still queued at the attempt before.
fn load_claims(client: &mut SpiClient<'_>, queue: &mut QueueState) {
    let held = claims::all();
    if held.is_empty() {
        return;
    }
    let ids: Vec<i64> = held.iter().map(|c| c.task_id).collect();
    let rows: HashMap<i64, (String, Option<String>, String, i32)> = client
        .update(
            "SELECT id, task_name, concurrency_key, status::text, attempt
               FROM sluice.task_run WHERE id = ANY($1)",
            None,
            &[ids.into()],
        )
        .expect("loading claimed tasks failed")
        .filter_map(|row| {
            Some((
                row.get::<i64>(1).ok()??,
                (
                    row.get::<String>(2).ok()??,
                    row.get::<String>(3).ok()?,
                    row.get::<String>(4).ok()??,
                    row.get::<i32>(5).ok()??,
                ),
            ))
        })
        .collect();
    let mut stale = Vec::new();
    for c in held {
        match rows.get(&c.task_id) {
            Some((name, key, status, attempt))
                if status == "queued" && *attempt == c.attempt - 1 =>
            {
                let flow = key.clone().map(|k| TaskFlow {
                    concurrency_key: Some(k),
                    rates: Vec::new(),
                });
                queue.end_running(c.task_id);
                queue.load_running(
                    c.task_id,
                    name,
                    flow,
                    RunningAttempt {
                        worker_id: c.worker_id,
                        attempt: c.attempt,
                        timeout_at: c.timeout_at,
                    },
                );
            }
            _ => stale.push((c.task_id, c.attempt)),
        }
    }
    claims::forget(&stale);
}

/// Brings every running attempt in line with its row by primary key (see
/// `QueueState::reconcile`), so it costs the same however many tasks finished before; then
/// requeues posted assignments that were taken off the board but never claimed.
fn check_running(
    client: &mut SpiClient<'_>,
    statements: &Statements,
    queue: &mut QueueState,
    now: Micros,
) {
    if queue.running_len() == 0 {
        return;
    }
    let (ids, attempts) = queue.running_attempts();
    // The claims first, then the rows: a claim that leaves meanwhile left at the commit of
    // its attempt's end or settlement, which the rows' later snapshot then sees.
    let held: HashMap<i64, claims::Claim> = claims::of_tasks(&ids)
        .into_iter()
        .map(|c| (c.task_id, c))
        .collect();
    let rows: HashMap<i64, (i32, String, Option<i64>, Option<Micros>)> = client
        .update(&statements.check_running, None, &[ids.clone().into()])
        .expect("checking running tasks failed")
        .filter_map(|row| {
            Some((
                row.get::<i64>(1).ok()??,
                (
                    row.get::<i32>(2).ok()??,
                    row.get::<String>(3).ok()??,
                    row.get::<i64>(4).ok()?,
                    row.get::<TimestampWithTimeZone>(5)
                        .ok()?
                        .map(pg_sys::TimestampTz::from),
                ),
            ))
        })
        .collect();
    let mut stale = Vec::new();
    for (id, attempt) in ids.into_iter().zip(attempts) {
        let state = match rows.get(&id) {
            Some((a, status, Some(worker_id), timeout_at))
                if *a == attempt && status == "running" =>
            {
                RowState::Running {
                    worker_id: *worker_id,
                    timeout_at: timeout_at.unwrap_or(i64::MAX),
                }
            }
            Some((a, status, _, _)) if *a == attempt - 1 && status == "queued" => {
                match held.get(&id) {
                    Some(c) if c.attempt == attempt => RowState::Running {
                        worker_id: c.worker_id,
                        timeout_at: c.timeout_at,
                    },
                    _ => RowState::Unclaimed,
                }
            }
            _ => {
                // A claim a fetch recorded on a row a concurrent cancel had ended.
                if let Some(c) = held.get(&id) {
                    stale.push((c.task_id, c.attempt));
                }
                RowState::Ended
            }
        };
        queue.reconcile(id, state);
    }
    claims::forget(&stale);
    let stale = queue.posted_before(now.saturating_sub(UNCLAIMED_GRACE_MICROS));
    if !stale.is_empty() {
        let on_board = wake::posted_task_ids();
        for (id, attempt) in stale {
            if !on_board.contains(&id) {
                queue.unpost(id, attempt);
            }
        }
    }
}

/// Reads tasks that became runnable after the cursor. Returns whether more are waiting.
fn read_arrivals(
    client: &mut SpiClient<'_>,
    statements: &Statements,
    definitions: &Definitions,
    queue: &mut QueueState,
    now: Micros,
    per_tick: usize,
) -> bool {
    let room = MAX_READY_IN_MEMORY.saturating_sub(queue.ready_len());
    if room == 0 {
        return false;
    }
    let limit = room.min(per_tick);
    let (after_run_at, after_id) = queue.cursor();
    // The index scan of crate::arrivals, or the same read in SQL when it cannot run.
    let (arrivals, last) = match arrivals::read((after_run_at, after_id), now, limit) {
        Some(rows) => scanned_arrivals(rows, definitions),
        None => {
            let rows = client
                .update(
                    &statements.read_arrivals,
                    None,
                    &[
                        timestamptz(after_run_at).into(),
                        after_id.into(),
                        (limit as i64).into(),
                    ],
                )
                .expect("reading arrivals failed");
            queued_rows(rows, definitions)
        }
    };
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

/// Arrivals read by the index scan, and the place of the last one in the arrivals index.
fn scanned_arrivals(
    rows: Vec<arrivals::ArrivalRow>,
    definitions: &Definitions,
) -> (Vec<Arrival>, Option<Cursor>) {
    let last = rows.last().map(|r| (r.run_at, r.task_id));
    let arrivals = rows
        .into_iter()
        .map(|row| {
            let rates = row.rate_limit_keys.zip(row.rate_limit_units);
            let flow = definitions.flow(&row.task_name, row.concurrency_key, rates);
            Arrival {
                task_id: row.task_id,
                task_name: row.task_name,
                priority: row.priority,
                run_at: row.run_at,
                schedule_deadline: row.schedule_deadline.unwrap_or(i64::MAX),
                attempt: row.attempt,
                flow,
            }
        })
        .collect();
    (arrivals, last)
}

/// Queued rows as read by `read_arrivals` and `sweep` (same first columns), and the place of
/// the last one in the arrivals index.
fn queued_rows(
    rows: pgrx::spi::SpiTupleTable<'_>,
    definitions: &Definitions,
) -> (Vec<Arrival>, Option<Cursor>) {
    let (arrivals, _, last) = unfinished_rows(rows, definitions, false);
    (arrivals, last)
}

/// A running attempt as the sweep read it.
struct RunningRow {
    task_id: i64,
    task_name: String,
    concurrency_key: Option<String>,
    attempt: RunningAttempt,
}

/// Unfinished rows: the queued ones as arrivals and, when `with_running` (the sweep's read,
/// whose columns 10 to 12 are status, worker and timeout), the running ones apart; and the
/// place of the last row of either kind in the arrivals index.
fn unfinished_rows(
    rows: pgrx::spi::SpiTupleTable<'_>,
    definitions: &Definitions,
    with_running: bool,
) -> (Vec<Arrival>, Vec<RunningRow>, Option<Cursor>) {
    let mut arrivals = Vec::with_capacity(rows.len());
    let mut running = Vec::new();
    let mut last = None;
    for row in rows {
        let (
            Ok(Some(task_id)),
            Ok(Some(task_name)),
            Ok(Some(priority)),
            Ok(Some(run_at)),
            Ok(Some(attempt)),
        ) = (
            row.get::<i64>(1),
            row.get::<String>(2),
            row.get::<i32>(3),
            row.get::<TimestampWithTimeZone>(4),
            row.get::<i32>(5),
        )
        else {
            continue;
        };
        let run_at = pg_sys::TimestampTz::from(run_at);
        last = Some((run_at, task_id));
        if with_running && row.get::<String>(10).ok().flatten().as_deref() == Some("running") {
            if let Ok(Some(worker_id)) = row.get::<i64>(11) {
                running.push(RunningRow {
                    task_id,
                    task_name,
                    concurrency_key: row.get::<String>(6).ok().flatten(),
                    attempt: RunningAttempt {
                        worker_id,
                        attempt,
                        timeout_at: row
                            .get::<TimestampWithTimeZone>(12)
                            .ok()
                            .flatten()
                            .map_or(i64::MAX, pg_sys::TimestampTz::from),
                    },
                });
            }
            continue;
        }
        let schedule_deadline = row
            .get::<TimestampWithTimeZone>(9)
            .ok()
            .flatten()
            .map_or(i64::MAX, pg_sys::TimestampTz::from);
        let key = row.get::<String>(6).ok().flatten();
        let rates = match (row.get::<Vec<String>>(7), row.get::<Vec<i32>>(8)) {
            (Ok(Some(keys)), Ok(Some(units))) => Some((keys, units)),
            _ => None,
        };
        let flow = definitions.flow(&task_name, key, rates);
        arrivals.push(Arrival {
            task_id,
            task_name,
            priority,
            run_at,
            schedule_deadline,
            attempt,
            flow,
        });
    }
    (arrivals, running, last)
}

/// One slice of the sweep: compares the ready tasks in memory placed after `from` (and not
/// beyond the arrivals cursor) with the rows queued there. Returns where the next slice
/// starts (None: the sweep is done) and how many ready tasks were found gone.
fn sweep(
    client: &mut SpiClient<'_>,
    statements: &Statements,
    definitions: &Definitions,
    queue: &mut QueueState,
    from: Cursor,
) -> (Option<Cursor>, usize) {
    let to = queue.cursor();
    if from >= to {
        return (None, 0);
    }
    let rows = client
        .update(
            &statements.sweep,
            None,
            &[
                timestamptz(from.0).into(),
                from.1.into(),
                timestamptz(to.0).into(),
                to.1.into(),
                (SWEEP_ROWS_PER_TICK as i64).into(),
            ],
        )
        .expect("sweeping the queue failed");
    let read = rows.len();
    let (queued, running, last) = unfinished_rows(rows, definitions, true);
    let slice_end = match last {
        Some(last) if read >= SWEEP_ROWS_PER_TICK => last,
        _ => to,
    };
    let (gone, reached) = queue.sweep(queued, from, slice_end, SWEEP_ROWS_PER_TICK * 4);
    // A running attempt memory does not know (claimed from a board an earlier scheduler
    // posted, or set running by hand) is loaded, so that its timeout and its worker's
    // liveness are watched. Attempts memory has but the table does not are found by
    // check_running.
    for r in running {
        if !queue.is_running(r.task_id) {
            let flow = r.concurrency_key.map(|k| TaskFlow {
                concurrency_key: Some(k),
                rates: Vec::new(),
            });
            queue.load_running(r.task_id, &r.task_name, flow, r.attempt);
        }
    }
    let next = (reached < to).then_some(reached);
    (next, gone)
}

/// Posts a plan to the board in shared memory, where each worker's fetch takes and claims its
/// own (`sluice.fetch_tasks`). Tasks whose definition is gone are failed instead.
fn post(
    client: &mut SpiClient<'_>,
    queue: &mut QueueState,
    limits: &mut RateLimits,
    candidates: &[Candidate],
    plan: &[assign::Assignment],
    execution_timeouts: &rustc_hash::FxHashMap<String, Micros>,
    now: Micros,
) -> Posting {
    let by_id: rustc_hash::FxHashMap<i64, &Candidate> =
        candidates.iter().map(|c| (c.task_id, c)).collect();
    let mut posts = Vec::with_capacity(plan.len());
    let mut orphans = Vec::new();
    let mut rate_skipped = false;
    for a in plan {
        let Some(c) = by_id.get(&a.task_id) else {
            continue;
        };
        let Some(&timeout) = execution_timeouts.get(&*c.task_name) else {
            orphans.push(c.task_id);
            queue.remove_ready(&c.task_name, c.priority, c.task_id);
            continue;
        };
        // Candidates were checked one by one; those of one tick may share a key's last units.
        if limits.try_admit(queue.rate_uses(c.task_id), now).is_err() {
            rate_skipped = true;
            continue;
        }
        if let Some(attempt) = queue.post(c, a.worker_id, now, timeout) {
            posts.push(wake::Posted {
                worker_id: a.worker_id,
                task_id: c.task_id,
                attempt,
                execution_timeout_ms: wake::Posted::timeout_ms(timeout),
            });
        }
    }
    fail_orphans(client, &orphans);
    let (fitted, waiters) = wake::post_assignments(&posts);
    for p in &posts[fitted..] {
        queue.unpost(p.task_id, p.attempt);
    }
    let workers = posts[..fitted].iter().map(|p| p.worker_id).collect();
    Posting {
        workers,
        waiters,
        posted: fitted,
        more: fitted < posts.len() || rate_skipped,
    }
}

/// What `post` did.
struct Posting {
    /// The workers that got work.
    workers: HashSet<i64>,
    /// Their backends waiting in `sluice.await_tasks`, woken after the commit instead of
    /// notified.
    waiters: Vec<wake::Waiter>,
    /// How many tasks were posted.
    posted: usize,
    /// Some of the plan must wait for room on the board, or for a rate limit.
    more: bool,
}

/// Applies recorded workflow step outcomes (`sluice._advance_runs`). Returns how many.
fn advance_runs(client: &mut SpiClient<'_>, statements: &Statements) -> i32 {
    client
        .update(&statements.advance_runs, None, &[ADVANCE_PER_TICK.into()])
        .expect("advancing workflow runs failed")
        .first()
        .get_one::<i32>()
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// Deletes finished tasks and workflow runs past their retention
/// (`sluice.succeeded_task_retention`, `sluice.failed_task_retention`), a batch per status,
/// each status from where the last call ended (`after`: succeeded, failed, cancelled tasks,
/// then runs; moved on here). Returns how many went and whether a batch was full (more due).
fn purge_finished(client: &mut SpiClient<'_>, after: &mut [Micros; 6]) -> (usize, bool) {
    const KINDS: [&str; 6] = [
        "succeeded",
        "failed",
        "cancelled",
        "run:succeeded",
        "run:failed",
        "run:cancelled",
    ];
    let cutoff = |seconds: i32| (seconds >= 0).then(|| format!("{seconds} seconds"));
    let succeeded = cutoff(gucs::SUCCEEDED_RETENTION_S.get());
    let failed = cutoff(gucs::FAILED_RETENTION_S.get());
    if succeeded.is_none() && failed.is_none() {
        return (0, false);
    }
    let (mut total, mut full) = (0, false);
    for (function, offset) in [("_purge_finished", 0), ("_purge_finished_runs", 3)] {
        let from: Vec<TimestampWithTimeZone> = after[offset..offset + 3]
            .iter()
            .map(|&at| timestamptz(at))
            .collect();
        let rows = client
            .update(
                &format!(
                    "SELECT status, deleted, reached FROM sluice.{function}(
                         now() - $1::interval, now() - $2::interval, $3, $4)"
                ),
                None,
                &[
                    succeeded.clone().into(),
                    failed.clone().into(),
                    from.into(),
                    PURGE_BATCH.into(),
                ],
            )
            .expect("deleting finished tasks or runs failed");
        for row in rows {
            let (Ok(Some(status)), Ok(Some(deleted)), Ok(Some(reached))) = (
                row.get::<String>(1),
                row.get::<i32>(2),
                row.get::<TimestampWithTimeZone>(3),
            ) else {
                continue;
            };
            if let Some(i) = KINDS.iter().position(|k| *k == status) {
                after[i] = pg_sys::TimestampTz::from(reached);
            }
            total += deleted.max(0) as usize;
            full |= deleted >= PURGE_BATCH;
        }
    }
    (total, full)
}

/// Fires due cron ticks and starts due scheduled workflow runs; returns when it is next due.
/// A schedule or run that cannot start is passed over inside (its error kept on its row).
fn fire_timers(client: &mut SpiClient<'_>, now: Micros) -> Micros {
    let next = client
        .update(
            "SELECT sluice._fire_timers($1)",
            None,
            &[TIMERS_PER_CALL.into()],
        )
        .expect("sluice._fire_timers failed");
    let next: Option<TimestampWithTimeZone> = next.first().get(1).ok().flatten();
    match next.map(pg_sys::TimestampTz::from) {
        None => i64::MAX,
        // Still due: a schedule a user's transaction holds (skipped), or more than one call's
        // worth. Again shortly, not in a busy loop.
        Some(at) if at <= now => now + 50_000,
        Some(at) => at,
    }
}

/// Deletes events and fired cron ticks past their retention (sluice.event_retention,
/// sluice.succeeded_task_retention), a batch each.
fn purge_history(client: &mut SpiClient<'_>) {
    let cutoff = |seconds: i32| (seconds >= 0).then(|| format!("{seconds} seconds"));
    for (function, keep) in [
        ("_purge_events", cutoff(gucs::EVENT_RETENTION_S.get())),
        (
            "_purge_cron_fires",
            cutoff(gucs::SUCCEEDED_RETENTION_S.get()),
        ),
    ] {
        let Some(keep) = keep else { continue };
        client
            .update(
                &format!("SELECT sluice.{function}(now() - $1::interval, $2)"),
                None,
                &[keep.into(), HISTORY_PURGE_BATCH.into()],
            )
            .expect("deleting old events or cron ticks failed");
    }
}

/// Cancels waiting tasks whose schedule deadline passed (`QueueState::expired`), and brings
/// memory in line with what their rows say: cancelled or otherwise not queued any more, they
/// leave; still queued with a later deadline (rescheduled), they wait until then; still queued
/// and due (locked by someone), they are tried again with the next maintenance.
fn expire_queued(client: &mut SpiClient<'_>, queue: &mut QueueState, ids: Vec<i64>, now: Micros) {
    let rows = client
        .update(
            "SELECT task_id, status, schedule_deadline FROM sluice._expire_queued($1)",
            None,
            &[ids.clone().into()],
        )
        .expect("cancelling tasks past their schedule deadline failed");
    let mut found: HashMap<i64, (String, Micros)> = HashMap::new();
    for row in rows {
        if let (Ok(Some(id)), Ok(Some(status)), Ok(deadline)) = (
            row.get::<i64>(1),
            row.get::<String>(2),
            row.get::<TimestampWithTimeZone>(3),
        ) {
            let deadline = deadline.map_or(i64::MAX, pg_sys::TimestampTz::from);
            found.insert(id, (status, deadline));
        }
    }
    for id in ids {
        match found.get(&id) {
            Some((status, deadline)) if status == "queued" => {
                if *deadline >= now {
                    queue.set_deadline(id, *deadline);
                }
            }
            _ => queue.forget_ready(id),
        }
    }
}

/// Cancels the victims of concurrency strategies (see `QueueState::concurrency_victims`).
fn cancel_for_concurrency(client: &mut SpiClient<'_>, victims: &[(i64, String)]) {
    let (ids, reasons): (Vec<i64>, Vec<String>) = victims.iter().cloned().unzip();
    client
        .update(
            "SELECT sluice._cancel_for_concurrency($1, $2)",
            None,
            &[ids.into(), reasons.into()],
        )
        .expect("cancelling tasks for a concurrency strategy failed");
}

/// Fails queued tasks that can never run, each with its reason.
fn fail_queued(client: &mut SpiClient<'_>, failed: &[(i64, String)]) {
    let (ids, reasons): (Vec<i64>, Vec<String>) = failed.iter().cloned().unzip();
    client
        .update(
            "UPDATE sluice.task_run t
                SET status = 'failed', finished_at = now(),
                    last_error = ($2::text[])[array_position($1::bigint[], t.id)]
              WHERE t.id = ANY((SELECT array_agg(l.id) FROM (
                                  SELECT q.id FROM sluice.task_run q
                                   WHERE q.id = ANY($1) AND q.status::text = 'queued'
                                     FOR UPDATE SKIP LOCKED) l)::bigint[])",
            None,
            &[ids.into(), reasons.into()],
        )
        .expect("failing tasks that can never run failed");
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

/// `NOTIFY sluice_worker_<id>, '<kind>'`, delivered when the tick commits. A direct call of
/// `pg_notify`: as a statement through SPI (a function scan over unnest()), it cost an executor
/// start-up in every tick that assigns, the tick each pickup waits for.
fn notify_worker(worker_id: i64, kind: &str) {
    let channel = format!("sluice_worker_{worker_id}");
    unsafe {
        pgrx::direct_function_call_as_datum(
            pg_sys::pg_notify,
            &[channel.as_str().into_datum(), kind.into_datum()],
        );
    }
}

/// When the next delayed task becomes runnable.
fn next_delayed(client: &mut SpiClient<'_>, statements: &Statements) -> Option<Micros> {
    client
        .update(&statements.next_delayed, None, &[])
        .ok()?
        .first()
        .get_one::<TimestampWithTimeZone>()
        .ok()?
        .map(pg_sys::TimestampTz::from)
}
