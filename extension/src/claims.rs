//! Claims held in shared memory instead of in the task's row.
//!
//! A worker's fetch (`sluice.fetch_tasks`) used to claim each task by updating its row
//! (queued -> running, the attempt counted, the worker and the times set), and the completion
//! updated the row again. The claim was a third of the worker backends' time in a drain and
//! half of its row writes. Now the fetch records the claim here, in a table in shared memory,
//! and writes nothing: the row stays `queued` at the previous attempt until the attempt ends.
//! The completion writes the final row in one update (see `sluice.complete_many`).
//!
//! Anything else that must see the attempt in the row (a failure, a heartbeat, a cancel, a
//! durable step, a spawn, the scheduler's timeouts and lost workers) first *settles* the
//! claims of the tasks it is about (`sluice._settle_claims`): it writes them into the rows as
//! the claim update did, and from then on they are ordinary running rows. The claim leaves
//! this table when the transaction that settled or ended it commits. The views overlay the
//! claims (`sluice._claims()`), so `sluice.tasks` shows such a task as running.
//!
//! Fencing still works through the row. Every end of an attempt other than success settles
//! the claim first and so writes attempt `a`; a late completion of attempt `a` expects the row
//! at `a - 1` and finds it past that. A completion is accepted for an unsettled row only if
//! the claim of that attempt by that worker is here.
//!
//! The table survives a scheduler restart (the new scheduler loads the claims as running
//! attempts) but not a server restart, which ends every worker session anyway: the tasks are
//! still queued in their rows and run again. An attempt lost that way is not counted in
//! `lost_attempts`, which a claim written to the row was.
//!
//! Beyond `sluice.claims_in_memory` claims (at most half the table, so that probe runs stay
//! short), a fetch claims the rest through the row as before, and with 0 it always does; tasks
//! with rate limits always do (the scheduler rebuilds their windows from the rows after a
//! restart).

use std::sync::Mutex;

use pgrx::prelude::*;
use std::cell::UnsafeCell;
use std::ffi::CStr;

use pgrx::shmem::PgSharedMemoryInitialization;
use pgrx::{pg_shmem_init, pg_sys};

/// One claim: attempt `attempt` of task `task_id`, fetched by worker `worker_id` at
/// `picked_at`, to be timed out at `timeout_at` (Postgres timestamps, microseconds).
#[derive(Copy, Clone, Default, Debug, PartialEq, Eq)]
pub struct Claim {
    pub task_id: i64,
    pub worker_id: i64,
    pub picked_at: i64,
    pub timeout_at: i64,
    pub attempt: i32,
}

/// Slots in the table (a power of two): 40 bytes each, 1.3 MB of shared memory. More running
/// tasks than `MAX_CLAIMS` are claimed in their rows.
pub const CLAIM_SLOTS: usize = 1 << SLOT_BITS;
const SLOT_BITS: u32 = 15;
/// Claims beyond this are made through the row: linear probing stays short at half load.
pub const MAX_CLAIMS: usize = CLAIM_SLOTS / 2;

/// An open-addressing hash table of claims by task id (linear probing, deletion by backward
/// shift, so no tombstones). Task ids are identity values, never 0: 0 marks a free slot.
#[derive(Copy, Clone)]
pub struct ClaimTable {
    len: usize,
    slots: [Claim; CLAIM_SLOTS],
}

/// Why a claim was not recorded.
#[derive(Debug, PartialEq, Eq)]
pub enum NotRecorded {
    /// The table is at `MAX_CLAIMS`: claim through the row instead.
    Full,
    /// The task already has a claim (another attempt, or a second post of this one).
    Taken,
}

impl ClaimTable {
    fn home(task_id: i64) -> usize {
        // Fibonacci hashing: consecutive ids spread over the table.
        ((task_id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SLOT_BITS)) as usize
    }

    fn find(&self, task_id: i64) -> Option<usize> {
        let mut i = Self::home(task_id);
        loop {
            let slot = &self.slots[i];
            if slot.task_id == 0 {
                return None;
            }
            if slot.task_id == task_id {
                return Some(i);
            }
            i = (i + 1) & (CLAIM_SLOTS - 1);
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn get(&self, task_id: i64) -> Option<Claim> {
        self.find(task_id).map(|i| self.slots[i])
    }

    /// Records a claim unless the task has one, or the table holds `limit` claims (at most
    /// `MAX_CLAIMS`, whatever the limit).
    pub fn insert(&mut self, claim: Claim, limit: usize) -> Result<(), NotRecorded> {
        if claim.task_id == 0 {
            return Err(NotRecorded::Taken);
        }
        if self.find(claim.task_id).is_some() {
            return Err(NotRecorded::Taken);
        }
        if self.len >= limit.min(MAX_CLAIMS) {
            return Err(NotRecorded::Full);
        }
        let mut i = Self::home(claim.task_id);
        while self.slots[i].task_id != 0 {
            i = (i + 1) & (CLAIM_SLOTS - 1);
        }
        self.slots[i] = claim;
        self.len += 1;
        Ok(())
    }

    /// Removes the claim of this attempt of the task (not another attempt's).
    pub fn remove(&mut self, task_id: i64, attempt: i32) -> bool {
        let Some(mut hole) = self.find(task_id) else {
            return false;
        };
        if self.slots[hole].attempt != attempt {
            return false;
        }
        self.slots[hole] = Claim::default();
        self.len -= 1;
        // Backward shift: move later entries of the run into the hole when their home is not
        // between the hole and them, so every entry stays reachable from its home.
        let mut i = (hole + 1) & (CLAIM_SLOTS - 1);
        while self.slots[i].task_id != 0 {
            let home = Self::home(self.slots[i].task_id);
            let distance_from_home = i.wrapping_sub(home) & (CLAIM_SLOTS - 1);
            let distance_from_hole = i.wrapping_sub(hole) & (CLAIM_SLOTS - 1);
            if distance_from_home >= distance_from_hole {
                self.slots[hole] = self.slots[i];
                self.slots[i] = Claim::default();
                hole = i;
            }
            i = (i + 1) & (CLAIM_SLOTS - 1);
        }
        true
    }

    pub fn all(&self) -> Vec<Claim> {
        self.slots
            .iter()
            .filter(|c| c.task_id != 0)
            .copied()
            .collect()
    }
}

static CLAIMS: ZeroedLwLock<ClaimTable> = ZeroedLwLock::new(c"sluice_claims");

/// Claims recorded by this backend's current transaction (removed if it aborts), and claims
/// it settled or ended (removed when it commits).
static RECORDED_IN_TRANSACTION: Mutex<Vec<(i64, i32)>> = Mutex::new(Vec::new());
static SETTLED_IN_TRANSACTION: Mutex<Vec<(i64, i32)>> = Mutex::new(Vec::new());

pub fn init_shared_memory() {
    pg_shmem_init!(CLAIMS = ());
}

fn preloaded() -> bool {
    crate::wake::preloaded()
}

/// Records claims for the current transaction; returns, per claim, whether it was recorded.
pub fn record(claims: &[Claim]) -> Vec<Result<(), NotRecorded>> {
    if !preloaded() {
        return claims.iter().map(|_| Err(NotRecorded::Full)).collect();
    }
    let limit = crate::gucs::CLAIMS_IN_MEMORY.get().max(0) as usize;
    if limit == 0 {
        // every claim in its row: the table is not even locked
        return claims.iter().map(|_| Err(NotRecorded::Full)).collect();
    }
    let results: Vec<_> = {
        let mut table = CLAIMS.exclusive();
        claims.iter().map(|c| table.insert(*c, limit)).collect()
    };
    let mut recorded = lock(&RECORDED_IN_TRANSACTION);
    for (c, r) in claims.iter().zip(&results) {
        if r.is_ok() {
            recorded.push((c.task_id, c.attempt));
        }
    }
    results
}

/// The claims of these tasks, where they have one.
pub fn of_tasks(task_ids: &[i64]) -> Vec<Claim> {
    if !preloaded() {
        return Vec::new();
    }
    let table = CLAIMS.share();
    task_ids.iter().filter_map(|id| table.get(*id)).collect()
}

/// Of these attempts (task ids and attempts by position), those this worker holds a claim of
/// in memory: their positions and claims.
pub fn held_of(task_ids: &[i64], attempts: &[i32], worker_id: i64) -> Vec<(usize, Claim)> {
    if !preloaded() {
        return Vec::new();
    }
    let table = CLAIMS.share();
    if table.len() == 0 {
        return Vec::new();
    }
    task_ids
        .iter()
        .zip(attempts)
        .enumerate()
        .filter_map(|(i, (&task_id, &attempt))| {
            table
                .get(task_id)
                .filter(|c| c.attempt == attempt && c.worker_id == worker_id)
                .map(|c| (i, c))
        })
        .collect()
}

/// Every claim held now.
pub fn all() -> Vec<Claim> {
    if !preloaded() {
        return Vec::new();
    }
    CLAIMS.share().all()
}

/// These attempts were written into their rows, or ended, by the current transaction: their
/// claims go when it commits.
pub fn settled_in_transaction(attempts: impl IntoIterator<Item = (i64, i32)>) {
    lock(&SETTLED_IN_TRANSACTION).extend(attempts);
}

/// Removes claims now (the scheduler, for attempts its check found ended: a fetch can record a
/// claim on a row that a concurrent cancel had already ended).
pub fn forget(attempts: &[(i64, i32)]) {
    if !preloaded() || attempts.is_empty() {
        return;
    }
    let mut table = CLAIMS.exclusive();
    for &(task_id, attempt) in attempts {
        table.remove(task_id, attempt);
    }
}

/// At commit: the settled and ended claims go; the recorded ones stay. Call before the ended
/// attempts are published to the scheduler, so that it never finds a claim of one.
pub fn at_commit(ended: &[(i64, i32)]) {
    lock(&RECORDED_IN_TRANSACTION).clear();
    let settled = std::mem::take(&mut *lock(&SETTLED_IN_TRANSACTION));
    if !preloaded() || (settled.is_empty() && ended.is_empty()) {
        return;
    }
    let mut table = CLAIMS.exclusive();
    if table.len() == 0 {
        return;
    }
    for &(task_id, attempt) in settled.iter().chain(ended) {
        table.remove(task_id, attempt);
    }
}

/// At abort: the claims this transaction recorded go (its fetch returned nothing); the ones it
/// settled stay as they were.
pub fn at_abort() {
    lock(&SETTLED_IN_TRANSACTION).clear();
    let recorded = std::mem::take(&mut *lock(&RECORDED_IN_TRANSACTION));
    if !preloaded() || recorded.is_empty() {
        return;
    }
    let mut table = CLAIMS.exclusive();
    for (task_id, attempt) in recorded {
        table.remove(task_id, attempt);
    }
}

/// At prepare: a prepared fetch keeps its claims (they commit with it).
pub fn at_prepare() {
    lock(&RECORDED_IN_TRANSACTION).clear();
    lock(&SETTLED_IN_TRANSACTION).clear();
}

/// A value in shared memory behind a Postgres LWLock, like `pgrx::PgLwLock`, but set up by
/// zeroing the memory in place. `PgLwLock` builds its value on the postmaster's stack and
/// copies it in, and a debug build's postmaster crashed at start with a table of 8,192 slots.
/// Only for types whose all-zero bytes are a valid value (the empty `ClaimTable`).
struct ZeroedLwLock<T> {
    name: &'static CStr,
    shared: UnsafeCell<*mut ZeroedShared<T>>,
}

#[repr(C)]
struct ZeroedShared<T> {
    lock: *mut pg_sys::LWLock,
    data: UnsafeCell<T>,
}

// Set once per process in the shared-memory startup hook, before any other use.
unsafe impl<T> Sync for ZeroedLwLock<T> {}

impl<T> ZeroedLwLock<T> {
    const fn new(name: &'static CStr) -> Self {
        ZeroedLwLock {
            name,
            shared: UnsafeCell::new(std::ptr::null_mut()),
        }
    }

    fn acquire(&self, mode: pg_sys::LWLockMode::Type) -> &ZeroedShared<T> {
        unsafe {
            let shared = (*self.shared.get())
                .as_ref()
                .expect("sluice: shared memory for claims was not set up");
            pg_sys::LWLockAcquire(shared.lock, mode);
            shared
        }
    }

    fn share(&self) -> LockedRef<'_, T> {
        let shared = self.acquire(pg_sys::LWLockMode::LW_SHARED);
        LockedRef { shared }
    }

    fn exclusive(&self) -> LockedMut<'_, T> {
        let shared = self.acquire(pg_sys::LWLockMode::LW_EXCLUSIVE);
        LockedMut { shared }
    }
}

impl<T> PgSharedMemoryInitialization for ZeroedLwLock<T> {
    type Value = ();

    unsafe fn on_shmem_request(&'static self) {
        unsafe {
            pg_sys::RequestAddinShmemSpace(size_of::<ZeroedShared<T>>());
            pg_sys::RequestNamedLWLockTranche(self.name.as_ptr(), 1);
        }
    }

    unsafe fn on_shmem_startup(&'static self, _: ()) {
        unsafe {
            // AddinShmemInitLock, a C macro: the 22nd of the main LWLocks
            let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
            pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let mut found = false;
            let shared = pg_sys::ShmemInitStruct(
                self.name.as_ptr(),
                size_of::<ZeroedShared<T>>(),
                &mut found,
            )
            .cast::<ZeroedShared<T>>();
            if !found {
                std::ptr::write_bytes(shared, 0, 1);
                (*shared).lock = &raw mut (*pg_sys::GetNamedLWLockTranche(self.name.as_ptr())).lock;
            }
            *self.shared.get() = shared;
            pg_sys::LWLockRelease(init_lock);
        }
    }
}

/// Shared access; the lock is released when dropped. Nothing that can raise a Postgres error
/// runs while it is held, so a plain release is always right.
struct LockedRef<'a, T> {
    shared: &'a ZeroedShared<T>,
}

impl<T> std::ops::Deref for LockedRef<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        unsafe { &*self.shared.data.get() }
    }
}

impl<T> Drop for LockedRef<'_, T> {
    fn drop(&mut self) {
        unsafe { pg_sys::LWLockRelease(self.shared.lock) }
    }
}

/// Exclusive access; the lock is released when dropped.
struct LockedMut<'a, T> {
    shared: &'a ZeroedShared<T>,
}

impl<T> std::ops::Deref for LockedMut<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        unsafe { &*self.shared.data.get() }
    }
}

impl<T> std::ops::DerefMut for LockedMut<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        unsafe { &mut *self.shared.data.get() }
    }
}

impl<T> Drop for LockedMut<'_, T> {
    fn drop(&mut self) {
        unsafe { pg_sys::LWLockRelease(self.shared.lock) }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table built on the heap (all zeroes is an empty table): the test thread's stack is
    /// smaller than the postmaster's.
    fn empty() -> Box<ClaimTable> {
        unsafe { Box::<ClaimTable>::new_zeroed().assume_init() }
    }

    fn claim(task_id: i64, attempt: i32) -> Claim {
        Claim {
            task_id,
            worker_id: 7,
            picked_at: 1,
            timeout_at: 2,
            attempt,
        }
    }

    #[test]
    fn a_claim_is_found_until_its_own_attempt_is_removed() {
        let mut t = empty();
        t.insert(claim(5, 1), MAX_CLAIMS).unwrap();
        assert_eq!(t.insert(claim(5, 2), MAX_CLAIMS), Err(NotRecorded::Taken));
        assert!(!t.remove(5, 2), "another attempt's removal leaves it");
        assert_eq!(t.get(5).map(|c| c.attempt), Some(1));
        assert!(t.remove(5, 1));
        assert_eq!(t.get(5), None);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn a_lower_limit_sends_claims_to_the_row_sooner() {
        let mut t = empty();
        assert_eq!(t.insert(claim(1, 1), 0), Err(NotRecorded::Full));
        t.insert(claim(1, 1), 2).unwrap();
        t.insert(claim(2, 1), 2).unwrap();
        assert_eq!(t.insert(claim(3, 1), 2), Err(NotRecorded::Full));
        assert_eq!(
            t.insert(claim(3, 1), usize::MAX),
            Ok(()),
            "capped at MAX_CLAIMS, not below"
        );
    }

    #[test]
    fn removals_keep_every_other_claim_reachable() {
        // Many ids, so that probe runs form and wrap; remove every third and check the rest.
        let mut t = empty();
        let ids: Vec<i64> = (1..=MAX_CLAIMS as i64).map(|i| i * 7919).collect();
        for &id in &ids {
            t.insert(claim(id, 1), MAX_CLAIMS).unwrap();
        }
        assert_eq!(t.insert(claim(1, 1), MAX_CLAIMS), Err(NotRecorded::Full));
        for &id in ids.iter().step_by(3) {
            assert!(t.remove(id, 1));
        }
        for (i, &id) in ids.iter().enumerate() {
            assert_eq!(t.get(id).is_some(), i % 3 != 0, "id {id}");
        }
        assert_eq!(t.len(), ids.len() - ids.len().div_ceil(3));
        assert_eq!(t.all().len(), t.len());
        t.insert(claim(1, 1), MAX_CLAIMS).unwrap();
    }

    #[test]
    fn a_colliding_run_survives_removal_of_its_head() {
        // Ids with the same home slot: they form one run; removing the first must move the
        // others back so that they are still found from their home.
        let mut t = empty();
        let home = ClaimTable::home(1);
        let same: Vec<i64> = (1..2_000_000i64)
            .filter(|id| ClaimTable::home(*id) == home)
            .take(4)
            .collect();
        assert_eq!(same.len(), 4);
        for &id in &same {
            t.insert(claim(id, 3), MAX_CLAIMS).unwrap();
        }
        assert!(t.remove(same[0], 3));
        for &id in &same[1..] {
            assert_eq!(t.get(id).map(|c| c.task_id), Some(id));
        }
    }
}
