//! Waking the scheduler without NOTIFY.
//!
//! NOTIFY takes a cluster-wide lock at commit, so an enqueuing transaction must not use it.
//! Instead the scheduler publishes its PGPROC number in shared memory, and a transaction that
//! enqueued or completed work sets the scheduler's latch from a commit callback: after the
//! commit is visible, never on rollback, at most once per transaction.
//!
//! The same callback publishes the commit watermark: the earliest `run_at` among the tasks the
//! transaction made queued. The scheduler reads new arrivals from an index position it
//! remembers (see `crate::queue`), and a transaction that took its `now()` before that position
//! but committed after the read would otherwise be skipped; the watermark sends the next read
//! back far enough. It is published only after the commit is visible, and the scheduler takes
//! it before its snapshot, so a row is always either in the snapshot or behind the watermark.
//!
//! A commit whose only news is arrivals (it queued tasks; nothing ended, no configuration or
//! outcome changed) does not even set the latch while the scheduler has published that
//! arrivals alone change nothing for it (`ARRIVALS_IDLE`: no worker has a free slot). The
//! watermark is still published, first; the scheduler clears the flag and then looks at the
//! watermark before it sleeps, so an arrival either sees the flag cleared and sets the latch,
//! or is seen by that look. Setting the latch cost every enqueue a signal and the scheduler a
//! wake-up, which on two cores took CPU from the producers.
//!
//! Assignments travel through shared memory too (`Assignments`): the scheduler posts
//! (worker, task, attempt) triples and a worker's `sluice.fetch_tasks` takes its own and claims
//! the rows itself (queued -> running). The scheduler writes nothing per task, so one process
//! does not have to make every task's first row update, and the claims are spread over the
//! workers' backends. A take is undone if the taking transaction aborts.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic, PgLwLock, PgSqlErrorCode};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// Attempts that ended (completed, failed, lost, cancelled) in transactions committed since
/// the scheduler last looked, so it frees their slots without querying each running task on
/// every tick. When more end between two ticks than fit, `overflowed` makes the scheduler
/// check all its running attempts in the table instead.
#[derive(Copy, Clone)]
pub struct EndedAttempts {
    len: usize,
    overflowed: bool,
    task_ids: [i64; ENDED_CAPACITY],
    attempts: [i32; ENDED_CAPACITY],
}
const ENDED_CAPACITY: usize = 16_384;
unsafe impl PGRXSharedMemory for EndedAttempts {}
impl Default for EndedAttempts {
    fn default() -> Self {
        EndedAttempts {
            len: 0,
            overflowed: false,
            task_ids: [0; ENDED_CAPACITY],
            attempts: [0; ENDED_CAPACITY],
        }
    }
}
static ENDED: PgLwLock<EndedAttempts> = unsafe { PgLwLock::new(c"sluice_ended_attempts") };
/// Attempts ended by this backend's current transaction, published at commit.
static ENDED_AT_COMMIT: Mutex<Vec<(i64, i32)>> = Mutex::new(Vec::new());

/// Assignments posted by the scheduler and not yet taken by their worker's fetch, oldest first.
/// `attempt` is the attempt number the claim creates: a claim only succeeds on a row that is
/// still queued at `attempt - 1`, so a stale assignment can never claim a later attempt.
#[derive(Copy, Clone)]
pub struct Assignments {
    /// Bumped when a (re)started scheduler clears the board; an aborted take from before is
    /// not put back.
    generation: u64,
    len: usize,
    entries: [Posted; ASSIGNMENTS_CAPACITY],
}
#[derive(Copy, Clone, Default, Debug, PartialEq, Eq)]
pub struct Posted {
    pub worker_id: i64,
    pub task_id: i64,
    pub attempt: i32,
    /// The task's execution timeout in milliseconds, from the definitions the scheduler holds
    /// (the claim takes it from here instead of joining task_definition per row), or -1 for
    /// one too long for an i32 (the claim looks those up). 32 bits keep an entry at 24 bytes:
    /// the board is built on the stack before it is copied into shared memory, and a debug
    /// build's postmaster overflowed its stack with 32-byte entries.
    pub execution_timeout_ms: i32,
}

impl Posted {
    /// The `execution_timeout_ms` for a timeout in microseconds.
    pub fn timeout_ms(timeout_us: i64) -> i32 {
        i32::try_from(timeout_us.div_euclid(1000)).unwrap_or(-1)
    }
}
/// Tasks assigned but not yet fetched, fleet-wide; more wait in the scheduler's memory.
pub const ASSIGNMENTS_CAPACITY: usize = 65_536;
unsafe impl PGRXSharedMemory for Assignments {}
impl Default for Assignments {
    fn default() -> Self {
        Assignments {
            generation: 0,
            len: 0,
            entries: [Posted::default(); ASSIGNMENTS_CAPACITY],
        }
    }
}
static ASSIGNMENTS: PgLwLock<Assignments> = unsafe { PgLwLock::new(c"sluice_assignments") };
/// What this backend's current transaction took, with the board's generation, to put back on
/// abort.
static TAKEN_IN_TRANSACTION: Mutex<(u64, Vec<Posted>)> = Mutex::new((0, Vec::new()));

/// PGPROC number of the running scheduler, or -1.
static SCHEDULER_PROCNO: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"sluice_scheduler_procno") };

/// Earliest `run_at` (Postgres microseconds) made queued by a commit since the scheduler last
/// took it; `i64::MAX` when none.
static COMMITTED_RUNNABLE_FROM: PgAtomic<AtomicI64> =
    unsafe { PgAtomic::new(c"sluice_committed_runnable_from") };

/// Earliest `run_at` (Postgres microseconds) still in the future at its transaction's start
/// that a commit made queued since the scheduler last took it; `i64::MAX` when none. The
/// scheduler keeps the next delayed task's time in memory and reads it from the table only
/// when that time has come or in maintenance.
static COMMITTED_DELAYED_FROM: PgAtomic<AtomicI64> =
    unsafe { PgAtomic::new(c"sluice_committed_delayed_from") };

/// The scheduler would leave a wake-up that only brings arrivals for its next due tick.
static ARRIVALS_IDLE: PgAtomic<AtomicBool> = unsafe { PgAtomic::new(c"sluice_arrivals_idle") };

/// Bumped by every commit that changed a definition or a rate limit: the scheduler reloads
/// them before its next assignment instead of on its next maintenance pass.
static CONFIG_GENERATION: PgAtomic<AtomicU64> =
    unsafe { PgAtomic::new(c"sluice_config_generation") };
/// This backend's current transaction changed the configuration.
static CONFIG_CHANGED_AT_COMMIT: AtomicBool = AtomicBool::new(false);

/// Bumped by every commit that recorded workflow step outcomes (sluice.step_outcome): the
/// scheduler applies outcomes only when it changed, instead of querying for them every tick.
static OUTCOMES_GENERATION: PgAtomic<AtomicU64> =
    unsafe { PgAtomic::new(c"sluice_outcomes_generation") };
/// This backend's current transaction recorded step outcomes.
static OUTCOMES_AT_COMMIT: AtomicBool = AtomicBool::new(false);

/// Bumped by every commit that deleted or truncated task rows in a session other than the
/// scheduler's: the scheduler then compares the queue in its memory with the table at once,
/// instead of at its next periodic sweep, so that it stops handing out tasks that are gone.
static DELETIONS_GENERATION: PgAtomic<AtomicU64> =
    unsafe { PgAtomic::new(c"sluice_deletions_generation") };
/// This backend's current transaction deleted or truncated task rows.
static TASKS_DELETED_AT_COMMIT: AtomicBool = AtomicBool::new(false);

/// Set in `_PG_init` when loaded through shared_preload_libraries (per process).
static PRELOADED: AtomicBool = AtomicBool::new(false);
/// This backend's current transaction asked for a wake-up at commit.
static WAKE_AT_COMMIT: AtomicBool = AtomicBool::new(false);
/// ... for a reason other than arrivals (`_wake_scheduler()` without a time: an attempt ended,
/// a task was cancelled).
static PLAIN_WAKE_AT_COMMIT: AtomicBool = AtomicBool::new(false);
/// Earliest `run_at` made queued by this backend's current transaction, `i64::MAX` when none.
static RUNNABLE_FROM_AT_COMMIT: AtomicI64 = AtomicI64::new(i64::MAX);
/// The same among those after the transaction's start (delayed tasks).
static DELAYED_FROM_AT_COMMIT: AtomicI64 = AtomicI64::new(i64::MAX);
/// This backend already checked that the scheduler serves its database.
static DATABASE_CHECKED: AtomicBool = AtomicBool::new(false);

pub fn init_shared_memory() {
    pg_shmem_init!(SCHEDULER_PROCNO = AtomicI32::new(-1));
    pg_shmem_init!(ARRIVALS_IDLE = AtomicBool::new(false));
    pg_shmem_init!(COMMITTED_RUNNABLE_FROM = AtomicI64::new(i64::MAX));
    pg_shmem_init!(COMMITTED_DELAYED_FROM = AtomicI64::new(i64::MAX));
    pg_shmem_init!(CONFIG_GENERATION = AtomicU64::new(0));
    pg_shmem_init!(OUTCOMES_GENERATION = AtomicU64::new(0));
    pg_shmem_init!(DELETIONS_GENERATION = AtomicU64::new(0));
    pg_shmem_init!(ENDED);
    pg_shmem_init!(ASSIGNMENTS);
    pg_shmem_init!(WAITERS);
    crate::claims::init_shared_memory();
    PRELOADED.store(true, Ordering::Relaxed);
}

pub fn register_commit_callback() {
    unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
}

/// Called by the scheduler once it runs, so committing backends can find its latch.
pub fn publish_scheduler(procno: i32) {
    ARRIVALS_IDLE.get().store(false, Ordering::SeqCst);
    SCHEDULER_PROCNO.get().store(procno, Ordering::SeqCst);
}

/// Publishes whether arrivals alone change nothing for the scheduler (see the module comment).
/// Returns whether arrivals were committed meanwhile and not taken yet: after clearing the
/// flag the caller must then tick without sleeping, since their commits may have seen the flag
/// set and left the latch alone.
pub fn set_arrivals_idle(idle: bool) -> bool {
    ARRIVALS_IDLE.get().store(idle, Ordering::SeqCst);
    !idle && COMMITTED_RUNNABLE_FROM.get().load(Ordering::SeqCst) != i64::MAX
}

/// Wakes the scheduler at commit; `runnable_from`: the earliest `run_at` of tasks this
/// transaction made queued, if any.
pub fn wake_at_commit(runnable_from: Option<pg_sys::TimestampTz>) {
    WAKE_AT_COMMIT.store(true, Ordering::Relaxed);
    match runnable_from {
        Some(at) => {
            RUNNABLE_FROM_AT_COMMIT.fetch_min(at, Ordering::Relaxed);
            if at > unsafe { pg_sys::GetCurrentTransactionStartTimestamp() } {
                DELAYED_FROM_AT_COMMIT.fetch_min(at, Ordering::Relaxed);
            }
        }
        None => PLAIN_WAKE_AT_COMMIT.store(true, Ordering::Relaxed),
    }
}

/// The configuration (definitions, rate limits) changes when this transaction commits.
pub fn config_changed_at_commit() {
    CONFIG_CHANGED_AT_COMMIT.store(true, Ordering::Relaxed);
    WAKE_AT_COMMIT.store(true, Ordering::Relaxed);
}

/// This transaction deleted or truncated task rows (a statement trigger on task_run): unless
/// this is the scheduler itself (its retention purge deletes finished tasks only), the
/// scheduler compares its memory with the table once this commits. Never an error.
pub fn tasks_deleted_at_commit() {
    let scheduler = SCHEDULER_PROCNO.get().load(Ordering::SeqCst);
    let this = unsafe { pg_sys::MyProc.as_ref() }.map(|p| p.pgprocno);
    if !PRELOADED.load(Ordering::Relaxed) || this == Some(scheduler) {
        return;
    }
    TASKS_DELETED_AT_COMMIT.store(true, Ordering::Relaxed);
}

/// How many commits deleted task rows (see `tasks_deleted_at_commit`).
pub fn deletions_generation() -> u64 {
    DELETIONS_GENERATION.get().load(Ordering::SeqCst)
}

/// This transaction recorded workflow step outcomes: the scheduler applies them after commit.
pub fn outcomes_at_commit() {
    OUTCOMES_AT_COMMIT.store(true, Ordering::Relaxed);
    WAKE_AT_COMMIT.store(true, Ordering::Relaxed);
}

/// Commits that recorded step outcomes so far. Read before the statement that takes them: the
/// commit callback runs once the transaction is visible, so a commit this read misses bumps
/// the generation again for the next tick.
pub fn outcomes_generation() -> u64 {
    if !PRELOADED.load(Ordering::Relaxed) {
        return 0;
    }
    OUTCOMES_GENERATION.get().load(Ordering::SeqCst)
}

/// Whether the library was preloaded (shared memory and the scheduler exist).
pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Changes committed so far (compare with the value at the last reload).
pub fn config_generation() -> u64 {
    if !PRELOADED.load(Ordering::Relaxed) {
        return 0;
    }
    CONFIG_GENERATION.get().load(Ordering::SeqCst)
}

/// Records attempts this transaction ended, for the scheduler once it commits.
pub fn attempts_ended(task_ids: &[i64], attempts: &[i32]) {
    let mut pending = ENDED_AT_COMMIT.lock().unwrap_or_else(|e| e.into_inner());
    pending.extend(task_ids.iter().copied().zip(attempts.iter().copied()));
}

/// Takes the attempts ended by committed transactions; `None` if some were not recorded (too
/// many at once) and the caller must check every running attempt itself.
pub fn take_ended_attempts() -> Option<Vec<(i64, i32)>> {
    let mut ended = ENDED.exclusive();
    let out = (!ended.overflowed).then(|| {
        (0..ended.len)
            .map(|i| (ended.task_ids[i], ended.attempts[i]))
            .collect()
    });
    ended.len = 0;
    ended.overflowed = false;
    out
}

/// Whether attempts ended since the scheduler last took them (without taking them).
pub fn ended_attempts_pending() -> bool {
    let ended = ENDED.share();
    ended.len > 0 || ended.overflowed
}

fn publish_ended(pending: &[(i64, i32)]) {
    let mut ended = ENDED.exclusive();
    for &(task_id, attempt) in pending {
        if ended.len == ENDED_CAPACITY {
            ended.overflowed = true;
            return;
        }
        let i = ended.len;
        ended.task_ids[i] = task_id;
        ended.attempts[i] = attempt;
        ended.len += 1;
    }
}

/// Empties the board (a scheduler starting: its memory is rebuilt from the tables, where
/// every posted task is still queued).
pub fn clear_assignments() {
    let mut board = ASSIGNMENTS.exclusive();
    board.generation += 1;
    board.len = 0;
}

/// Posts assignments; returns how many fit (the rest stay with the scheduler for later) and
/// the waiters of the workers that got some, taken off the waiting list: the scheduler sets
/// their latches once its transaction commits, and does not notify those workers.
pub fn post_assignments(posted: &[Posted]) -> (usize, Vec<Waiter>) {
    let mut board = ASSIGNMENTS.exclusive();
    let n = posted.len().min(ASSIGNMENTS_CAPACITY - board.len);
    let start = board.len;
    board.entries[start..start + n].copy_from_slice(&posted[..n]);
    board.len += n;
    // Under the board's lock, so that a waiter registers either before this (and is taken
    // here) or after (and sees these posts): see `register_waiter`.
    let mut waiters = WAITERS.exclusive();
    // Busy workers do not wait: a drain's posts usually find the list empty.
    if n == 0 || waiters.len == 0 {
        return (n, Vec::new());
    }
    let workers: rustc_hash::FxHashSet<i64> = posted[..n].iter().map(|p| p.worker_id).collect();
    let mut woken = Vec::new();
    let mut kept = 0;
    for i in 0..waiters.len {
        let w = waiters.entries[i];
        if workers.contains(&w.worker_id) {
            woken.push(w);
        } else {
            waiters.entries[kept] = w;
            kept += 1;
        }
    }
    waiters.len = kept;
    (n, woken)
}

/// A backend waiting in `sluice.await_tasks` for its worker's next assignments.
#[derive(Copy, Clone, Default, Debug, PartialEq, Eq)]
pub struct Waiter {
    pub worker_id: i64,
    /// The backend's PGPROC number and process id: a number whose process has changed since is
    /// left alone (a backend that exited while waiting).
    pub procno: i32,
    pub pid: i32,
    /// Set by `end_wait`: the wait returns without claiming (a worker shutting down).
    pub ended: bool,
}

/// The waiting list: at most one backend per worker (a worker's session waits on its own
/// connection), so the room is for that many idle workers at once.
#[derive(Copy, Clone)]
pub struct Waiters {
    len: usize,
    entries: [Waiter; MAX_WAITERS],
}
pub const MAX_WAITERS: usize = 4_096;
unsafe impl PGRXSharedMemory for Waiters {}
impl Default for Waiters {
    fn default() -> Self {
        Waiters {
            len: 0,
            entries: [Waiter::default(); MAX_WAITERS],
        }
    }
}
static WAITERS: PgLwLock<Waiters> = unsafe { PgLwLock::new(c"sluice_assignment_waiters") };

/// What `register_waiter` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Registration {
    /// Assignments are posted for the worker already: no need to wait.
    Posted,
    /// This backend's latch is set when the scheduler posts to the worker.
    Registered,
    /// The waiting list is full: the caller must look again on its own.
    Full,
    /// `end_wait` ended this backend's wait.
    Ended,
}

/// Registers this backend as the waiter for the worker's assignments, unless some are posted
/// already. The board's lock is held throughout, as in `post_assignments`, so a post is never
/// missed between the look and the registration.
pub fn register_waiter(worker_id: i64) -> Registration {
    let board = ASSIGNMENTS.share();
    if board.entries[..board.len]
        .iter()
        .any(|p| p.worker_id == worker_id)
    {
        return Registration::Posted;
    }
    let me = unsafe {
        Waiter {
            worker_id,
            procno: (*pg_sys::MyProc).pgprocno,
            pid: pg_sys::MyProcPid,
            ended: false,
        }
    };
    let mut waiters = WAITERS.exclusive();
    let len = waiters.len;
    if let Some(w) = waiters.entries[..len]
        .iter_mut()
        .find(|w| w.worker_id == worker_id || (w.procno == me.procno && w.pid == me.pid))
    {
        if w.ended && w.procno == me.procno && w.pid == me.pid {
            return Registration::Ended;
        }
        *w = me;
        return Registration::Registered;
    }
    if len == MAX_WAITERS {
        return Registration::Full;
    }
    waiters.entries[len] = me;
    waiters.len += 1;
    Registration::Registered
}

/// Takes this backend off the waiting list (a wait that ended on its own).
pub fn unregister_waiter() {
    let (procno, pid) = unsafe { ((*pg_sys::MyProc).pgprocno, pg_sys::MyProcPid) };
    let mut waiters = WAITERS.exclusive();
    let len = waiters.len;
    if let Some(i) = waiters.entries[..len]
        .iter()
        .position(|w| w.procno == procno && w.pid == pid)
    {
        waiters.entries[i] = waiters.entries[len - 1];
        waiters.len -= 1;
    }
}

/// Ends the wait of the worker's backend, if one waits: it returns without claiming. Returns
/// whether one was waiting.
pub fn end_wait(worker_id: i64) -> bool {
    let ended = {
        let mut waiters = WAITERS.exclusive();
        let len = waiters.len;
        match waiters.entries[..len]
            .iter_mut()
            .find(|w| w.worker_id == worker_id)
        {
            Some(w) => {
                w.ended = true;
                *w
            }
            None => return false,
        }
    };
    wake_waiters(&[ended]);
    true
}

/// Sets the latches of waiters taken by `post_assignments` (after the posting transaction
/// committed), skipping any whose process is not the one that registered.
pub fn wake_waiters(waiters: &[Waiter]) {
    unsafe {
        let global = pg_sys::ProcGlobal;
        if global.is_null() {
            return;
        }
        for w in waiters {
            if w.procno < 0 || w.procno as u32 >= (*global).allProcCount {
                continue;
            }
            let proc_ = (*global).allProcs.add(w.procno as usize);
            if (*proc_).pid == w.pid {
                pg_sys::SetLatch(&raw mut (*proc_).procLatch);
            }
        }
    }
}

/// Removes the posted assignments of these workers (lost or stopped) and returns them.
pub fn withdraw_assignments(worker_ids: &HashSet<i64>) -> Vec<Posted> {
    let mut board = ASSIGNMENTS.exclusive();
    let (kept, withdrawn) = partition(
        &mut board,
        |p| !worker_ids.contains(&p.worker_id),
        usize::MAX,
    );
    board.len = kept;
    withdrawn
}

/// The board as it is now (for `sluice.posted_assignments()`).
pub fn posted_assignments() -> Vec<Posted> {
    if !PRELOADED.load(Ordering::Relaxed) {
        return Vec::new();
    }
    let board = ASSIGNMENTS.share();
    board.entries[..board.len].to_vec()
}

/// Task ids on the board now.
pub fn posted_task_ids() -> HashSet<i64> {
    let board = ASSIGNMENTS.share();
    board.entries[..board.len]
        .iter()
        .map(|p| p.task_id)
        .collect()
}

/// Takes up to `max` of this worker's posted assignments, oldest first, for the current
/// transaction: they go back on the board if it aborts.
pub fn take_assignments(worker_id: i64, max: usize) -> Vec<Posted> {
    if max == 0 || !PRELOADED.load(Ordering::Relaxed) {
        return Vec::new();
    }
    let (generation, taken) = {
        let mut board = ASSIGNMENTS.exclusive();
        let (kept, taken) = partition(&mut board, |p| p.worker_id != worker_id, max);
        board.len = kept;
        (board.generation, taken)
    };
    let mut pending = TAKEN_IN_TRANSACTION
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if pending.0 != generation {
        pending.1.clear();
    }
    pending.0 = generation;
    pending.1.extend_from_slice(&taken);
    taken
}

/// Splits the board in place: entries for which `keep` holds stay in order at the front (the
/// returned count), and at most `max_removed` of the others are returned, in order; others
/// beyond that also stay.
fn partition(
    board: &mut Assignments,
    keep: impl Fn(&Posted) -> bool,
    max_removed: usize,
) -> (usize, Vec<Posted>) {
    let mut removed = Vec::new();
    let mut kept = 0;
    for i in 0..board.len {
        let p = board.entries[i];
        if keep(&p) || removed.len() >= max_removed {
            board.entries[kept] = p;
            kept += 1;
        } else {
            removed.push(p);
        }
    }
    (kept, removed)
}

/// An aborted transaction's takes go back to the front of the board, unless a scheduler
/// restart cleared it meanwhile.
fn put_back_taken() {
    let (generation, taken) = std::mem::take(
        &mut *TAKEN_IN_TRANSACTION
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
    );
    if taken.is_empty() || !PRELOADED.load(Ordering::Relaxed) {
        return;
    }
    let mut board = ASSIGNMENTS.exclusive();
    if board.generation != generation {
        return;
    }
    let n = taken.len().min(ASSIGNMENTS_CAPACITY - board.len);
    let len = board.len;
    board.entries.copy_within(0..len, n);
    board.entries[..n].copy_from_slice(&taken[..n]);
    board.len += n;
}

/// Takes the commit watermark (see the module comment). Call before starting the transaction
/// whose snapshot reads the arrivals.
pub fn take_committed_runnable_from() -> Option<pg_sys::TimestampTz> {
    let at = COMMITTED_RUNNABLE_FROM
        .get()
        .swap(i64::MAX, Ordering::SeqCst);
    (at != i64::MAX).then_some(at)
}

/// Takes the earliest delayed `run_at` committed since the last take (see
/// `COMMITTED_DELAYED_FROM`). Call before starting the tick's transaction, like
/// `take_committed_runnable_from`.
pub fn take_committed_delayed_from() -> Option<pg_sys::TimestampTz> {
    let at = COMMITTED_DELAYED_FROM
        .get()
        .swap(i64::MAX, Ordering::SeqCst);
    (at != i64::MAX).then_some(at)
}

/// Errors with SQLSTATE 55000 unless this session can be served by the scheduler: the library
/// is preloaded and this is the database named by `sluice.database`.
pub fn require_scheduler() {
    if !PRELOADED.load(Ordering::Relaxed) {
        pgrx::ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "sluice is not loaded through shared_preload_libraries",
            "Add 'sluice' to shared_preload_libraries in postgresql.conf and restart PostgreSQL: \
             the scheduler is a background worker started with the server."
        );
    }
    if DATABASE_CHECKED.load(Ordering::Relaxed) {
        return;
    }
    let served = crate::gucs::database();
    let current = unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        }
    };
    if current != served {
        pgrx::ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "the sluice scheduler serves database \"{served}\" (sluice.database), not \"{current}\""
            ),
            "Set sluice.database to this database in postgresql.conf and restart PostgreSQL."
        );
    }
    DATABASE_CHECKED.store(true, Ordering::Relaxed);
}

fn set_scheduler_latch() {
    let procno = SCHEDULER_PROCNO.get().load(Ordering::SeqCst);
    unsafe {
        // The scheduler does not wake itself: its loop runs again after each tick anyway.
        if procno < 0 || (!pg_sys::MyProc.is_null() && (*pg_sys::MyProc).pgprocno == procno) {
            return;
        }
        let global = pg_sys::ProcGlobal;
        if global.is_null() || procno as u32 >= (*global).allProcCount {
            return;
        }
        // A stale number (the scheduler restarting) at worst wakes another process spuriously.
        let proc_ = (*global).allProcs.add(procno as usize);
        pg_sys::SetLatch(&raw mut (*proc_).procLatch);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    if matches!(
        event,
        XACT_EVENT_COMMIT
            | XACT_EVENT_PARALLEL_COMMIT
            | XACT_EVENT_ABORT
            | XACT_EVENT_PARALLEL_ABORT
            | XACT_EVENT_PREPARE
    ) {
        crate::definition_cache::transaction_ended();
    }
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            // Clear the request first, whatever happens next: it belongs to this transaction.
            let requested = WAKE_AT_COMMIT.swap(false, Ordering::Relaxed);
            let plain = PLAIN_WAKE_AT_COMMIT.swap(false, Ordering::Relaxed);
            let config_changed = CONFIG_CHANGED_AT_COMMIT.swap(false, Ordering::Relaxed);
            if config_changed && PRELOADED.load(Ordering::Relaxed) {
                CONFIG_GENERATION.get().fetch_add(1, Ordering::SeqCst);
            }
            let outcomes = OUTCOMES_AT_COMMIT.swap(false, Ordering::Relaxed);
            if outcomes && PRELOADED.load(Ordering::Relaxed) {
                OUTCOMES_GENERATION.get().fetch_add(1, Ordering::SeqCst);
            }
            if TASKS_DELETED_AT_COMMIT.swap(false, Ordering::Relaxed) {
                DELETIONS_GENERATION.get().fetch_add(1, Ordering::SeqCst);
                set_scheduler_latch();
            }
            let runnable_from = RUNNABLE_FROM_AT_COMMIT.swap(i64::MAX, Ordering::Relaxed);
            let delayed_from = DELAYED_FROM_AT_COMMIT.swap(i64::MAX, Ordering::Relaxed);
            let ended =
                std::mem::take(&mut *ENDED_AT_COMMIT.lock().unwrap_or_else(|e| e.into_inner()));
            TAKEN_IN_TRANSACTION
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .1
                .clear();
            // Claims of ended attempts go before the scheduler hears of the ends.
            crate::claims::at_commit(&ended);
            if PRELOADED.load(Ordering::Relaxed) && !ended.is_empty() {
                publish_ended(&ended);
            }
            if requested && PRELOADED.load(Ordering::Relaxed) {
                if runnable_from != i64::MAX {
                    COMMITTED_RUNNABLE_FROM
                        .get()
                        .fetch_min(runnable_from, Ordering::SeqCst);
                }
                if delayed_from != i64::MAX {
                    COMMITTED_DELAYED_FROM
                        .get()
                        .fetch_min(delayed_from, Ordering::SeqCst);
                }
                // Read after the watermark is published (see the module comment).
                let arrivals_only = !plain && !config_changed && !outcomes && ended.is_empty();
                if !(arrivals_only && ARRIVALS_IDLE.get().load(Ordering::SeqCst)) {
                    set_scheduler_latch();
                }
            }
        }
        // A prepared transaction commits later in another session; the scheduler's timer and
        // its periodic sweep pick its work up.
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            // A prepared fetch keeps its claims (they commit with it); an aborted one never
            // claimed anything.
            if event == XACT_EVENT_PREPARE {
                crate::claims::at_prepare();
                TAKEN_IN_TRANSACTION
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .1
                    .clear();
            } else {
                put_back_taken();
                crate::claims::at_abort();
            }
            WAKE_AT_COMMIT.store(false, Ordering::Relaxed);
            PLAIN_WAKE_AT_COMMIT.store(false, Ordering::Relaxed);
            CONFIG_CHANGED_AT_COMMIT.store(false, Ordering::Relaxed);
            OUTCOMES_AT_COMMIT.store(false, Ordering::Relaxed);
            TASKS_DELETED_AT_COMMIT.store(false, Ordering::Relaxed);
            RUNNABLE_FROM_AT_COMMIT.store(i64::MAX, Ordering::Relaxed);
            DELAYED_FROM_AT_COMMIT.store(i64::MAX, Ordering::Relaxed);
            ENDED_AT_COMMIT
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
        _ => {}
    }
}
