//! The scheduler's memory of the queue: runnable tasks per task name, and the running attempts
//! it assigned.
//!
//! Why memory: every transition rewrites a task row, and while a long transaction holds the
//! xmin horizon vacuum cannot remove the old versions, so an index scan that starts at the head
//! of the queue walks over every task finished since then, on every tick: the queue slows down
//! quadratically. Here the database is read only from remembered positions:
//! - arrivals are read in `(run_at, id)` order after a cursor (the commit watermark from
//!   `crate::wake` moves it back for transactions that committed late);
//! - running attempts are the ones this scheduler assigned (loaded at start and with each
//!   reread), which give the free slots per worker, the next timeout and the lost tasks. An
//!   assignment is *posted* (in shared memory, `crate::wake`) until the worker's fetch claims
//!   the row; endings are reported through shared memory, and a once-a-second check by
//!   primary key repairs what reports missed.
//!
//! Pure Rust, no Postgres: `crate::scheduler` does the reading and writing.

use crate::assign::Candidate;
use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet};

/// A Postgres `timestamptz`: microseconds since 2000-01-01 UTC.
pub type Micros = i64;

/// Exclusive lower bound of the next arrival read, in the index's `(run_at, id)` order.
pub type Cursor = (Micros, i64);

/// Reads everything (a `run_at` of -infinity).
pub const FROM_START: Cursor = (i64::MIN, i64::MIN);

/// A queued task whose `run_at` has passed.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrival {
    pub task_id: i64,
    pub task_name: String,
    pub priority: i32,
    /// The row's attempt count; the next claim makes attempt `attempt + 1`.
    pub attempt: i32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunningAttempt {
    pub worker_id: i64,
    pub attempt: i32,
    pub timeout_at: Micros,
}

/// An assignment posted to a worker and not seen claimed yet: enough to queue it again.
#[derive(Debug, Clone, PartialEq)]
struct Posted {
    task_name: String,
    priority: i32,
    posted_at: Micros,
}

/// What the table says about a running attempt (see `QueueState::reconcile`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RowState {
    /// Running at the remembered attempt, on this worker, with this timeout.
    Running { worker_id: i64, timeout_at: Micros },
    /// Still queued at the attempt before: the posted assignment is not claimed yet.
    Unclaimed,
    /// Anything else (finished, requeued, gone): the attempt is over.
    Ended,
}

#[derive(Debug)]
pub struct QueueState {
    /// Per task name: highest priority first, then oldest (lowest id).
    ready: HashMap<String, BTreeSet<(Reverse<i32>, i64)>>,
    ready_len: usize,
    /// Attempt count of each ready task.
    ready_attempt: HashMap<i64, i32>,
    cursor: Cursor,
    running: HashMap<i64, RunningAttempt>,
    running_per_worker: HashMap<i64, i32>,
    /// Running attempts (by task id) whose assignment is posted but not seen claimed.
    posted: HashMap<i64, Posted>,
}

impl Default for QueueState {
    fn default() -> Self {
        Self::new()
    }
}

impl QueueState {
    pub fn new() -> Self {
        QueueState {
            ready: HashMap::new(),
            ready_len: 0,
            ready_attempt: HashMap::new(),
            cursor: FROM_START,
            running: HashMap::new(),
            running_per_worker: HashMap::new(),
            posted: HashMap::new(),
        }
    }

    /// Where the next arrival read starts (exclusive).
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// A transaction committed tasks runnable from `run_at`, possibly behind the cursor.
    pub fn rewind_to(&mut self, run_at: Micros) {
        self.cursor = self.cursor.min((run_at, i64::MIN));
    }

    /// Forgets the runnable queue and rereads it from the start (the periodic safety pass:
    /// drops entries of tasks cancelled or expired meanwhile, and catches anything a
    /// watermark could not, such as a prepared transaction committed by another session).
    pub fn reread_from_start(&mut self) {
        self.ready.clear();
        self.ready_attempt.clear();
        self.ready_len = 0;
        self.cursor = FROM_START;
    }

    /// Records tasks read after the cursor and moves the cursor to `next`. A task already
    /// known is not counted twice (rewinds reread some rows), and one posted to a worker but
    /// not claimed yet stays posted. A task read as queued that is otherwise remembered as
    /// running was requeued by someone else (its worker deregistered): that attempt is over.
    pub fn add_arrivals(&mut self, arrivals: impl IntoIterator<Item = Arrival>, next: Cursor) {
        for a in arrivals {
            let posted_unclaimed = self.posted.contains_key(&a.task_id)
                && self
                    .running
                    .get(&a.task_id)
                    .is_some_and(|r| r.attempt == a.attempt + 1);
            if posted_unclaimed {
                continue;
            }
            self.end_running(a.task_id);
            self.insert_ready(a.task_name, a.priority, a.task_id, a.attempt);
        }
        self.cursor = self.cursor.max(next);
    }

    fn insert_ready(&mut self, task_name: String, priority: i32, task_id: i64, attempt: i32) {
        let queue = self.ready.entry(task_name).or_default();
        if queue.insert((Reverse(priority), task_id)) {
            self.ready_len += 1;
        }
        self.ready_attempt.insert(task_id, attempt);
    }

    /// A ready task's attempt count.
    pub fn ready_attempt(&self, task_id: i64) -> Option<i32> {
        self.ready_attempt.get(&task_id).copied()
    }

    /// Moves a ready task to a worker: posted, counted on the worker's slots, with a timeout
    /// estimated from `now` until the claim's own is known. Returns the attempt the claim
    /// will create.
    pub fn post(
        &mut self,
        c: &Candidate,
        worker_id: i64,
        now: Micros,
        timeout: Micros,
    ) -> Option<i32> {
        let attempt = self.ready_attempt(c.task_id)? + 1;
        self.remove_ready(&c.task_name, c.priority, c.task_id);
        self.start_running(
            c.task_id,
            RunningAttempt {
                worker_id,
                attempt,
                timeout_at: now.saturating_add(timeout),
            },
        );
        self.posted.insert(
            c.task_id,
            Posted {
                task_name: c.task_name.clone(),
                priority: c.priority,
                posted_at: now,
            },
        );
        Some(attempt)
    }

    /// An assignment that will not be claimed (withdrawn from a lost worker, or left behind by
    /// a fetch that rolled back part of its work) goes back to the ready queue.
    pub fn unpost(&mut self, task_id: i64, attempt: i32) {
        if !self
            .running
            .get(&task_id)
            .is_some_and(|r| r.attempt == attempt)
        {
            return;
        }
        if let Some(p) = self.posted.remove(&task_id) {
            self.end_running(task_id);
            self.insert_ready(p.task_name, p.priority, task_id, attempt - 1);
        }
    }

    /// Posted assignments older than `before` that are still unclaimed per the last check.
    pub fn posted_before(&self, before: Micros) -> Vec<(i64, i32)> {
        self.posted
            .iter()
            .filter(|(_, p)| p.posted_at < before)
            .filter_map(|(id, _)| Some((*id, self.running.get(id)?.attempt)))
            .collect()
    }

    /// Brings a running attempt in line with its row (the periodic check).
    pub fn reconcile(&mut self, task_id: i64, row: RowState) {
        let Some(current) = self.running.get(&task_id).copied() else {
            return;
        };
        match row {
            RowState::Running {
                worker_id,
                timeout_at,
            } => {
                self.posted.remove(&task_id);
                self.start_running(
                    task_id,
                    RunningAttempt {
                        worker_id,
                        attempt: current.attempt,
                        timeout_at,
                    },
                );
            }
            RowState::Unclaimed if self.posted.contains_key(&task_id) => {}
            RowState::Unclaimed | RowState::Ended => self.end_running(task_id),
        }
    }

    pub fn ready_len(&self) -> usize {
        self.ready_len
    }

    /// The head of each wanted name's queue: at most `n` per name.
    pub fn candidates(&self, demand: &[(String, i32)]) -> Vec<Candidate> {
        let mut out = Vec::new();
        for (name, n) in demand {
            let Some(queue) = self.ready.get(name) else {
                continue;
            };
            out.extend(
                queue
                    .iter()
                    .take((*n).max(0) as usize)
                    .map(|(Reverse(priority), id)| Candidate {
                        task_id: *id,
                        task_name: name.clone(),
                        priority: *priority,
                    }),
            );
        }
        out
    }

    /// Removes a task from the runnable queue (assigned, or no longer queued).
    pub fn remove_ready(&mut self, task_name: &str, priority: i32, task_id: i64) {
        if let Some(queue) = self.ready.get_mut(task_name) {
            if queue.remove(&(Reverse(priority), task_id)) {
                self.ready_len -= 1;
                self.ready_attempt.remove(&task_id);
            }
            if queue.is_empty() {
                self.ready.remove(task_name);
            }
        }
    }

    pub fn start_running(&mut self, task_id: i64, attempt: RunningAttempt) {
        if let Some(old) = self.running.insert(task_id, attempt) {
            self.dec_worker(old.worker_id);
        }
        *self
            .running_per_worker
            .entry(attempt.worker_id)
            .or_insert(0) += 1;
    }

    /// Attempt `attempt` of the task ended; a report about an older attempt is ignored.
    pub fn end_attempt(&mut self, task_id: i64, attempt: i32) {
        if self
            .running
            .get(&task_id)
            .is_some_and(|a| a.attempt == attempt)
        {
            self.end_running(task_id);
        }
    }

    /// Forgets every claimed running attempt (before loading them again from the table);
    /// posted ones are kept, their rows are still queued.
    pub fn forget_claimed(&mut self) {
        let posted: Vec<(i64, RunningAttempt)> = self
            .running
            .iter()
            .filter(|(id, _)| self.posted.contains_key(id))
            .map(|(id, a)| (*id, *a))
            .collect();
        self.running.clear();
        self.running_per_worker.clear();
        for (id, a) in posted {
            self.start_running(id, a);
        }
    }

    /// The attempt ended (completed, failed, timed out, lost, cancelled).
    pub fn end_running(&mut self, task_id: i64) {
        self.posted.remove(&task_id);
        if let Some(old) = self.running.remove(&task_id) {
            self.dec_worker(old.worker_id);
        }
    }

    fn dec_worker(&mut self, worker_id: i64) {
        if let Some(n) = self.running_per_worker.get_mut(&worker_id) {
            *n -= 1;
            if *n <= 0 {
                self.running_per_worker.remove(&worker_id);
            }
        }
    }

    /// The running attempts, as `(task ids, attempts)` for the per-tick check.
    pub fn running_attempts(&self) -> (Vec<i64>, Vec<i32>) {
        self.running.iter().map(|(id, a)| (*id, a.attempt)).unzip()
    }

    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    pub fn running_on(&self, worker_id: i64) -> i32 {
        self.running_per_worker
            .get(&worker_id)
            .copied()
            .unwrap_or(0)
    }

    /// Running tasks whose worker is not live any more.
    pub fn lost(&self, live_workers: &HashSet<i64>) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .running
            .iter()
            .filter(|(_, a)| !live_workers.contains(&a.worker_id))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Workers holding running attempts that are not live any more.
    pub fn dead_workers(&self, live_workers: &HashSet<i64>) -> HashSet<i64> {
        self.running_per_worker
            .keys()
            .filter(|w| !live_workers.contains(w))
            .copied()
            .collect()
    }

    /// Running tasks whose execution timeout has passed at `now`.
    pub fn timed_out(&self, now: Micros) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .running
            .iter()
            .filter(|(_, a)| a.timeout_at <= now)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    pub fn next_timeout(&self) -> Option<Micros> {
        self.running.values().map(|a| a.timeout_at).min()
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn arrival(id: i64, name: &str, priority: i32) -> Arrival {
        Arrival {
            task_id: id,
            task_name: name.into(),
            priority,
            attempt: 0,
        }
    }

    fn running(worker_id: i64, timeout_at: Micros) -> RunningAttempt {
        RunningAttempt {
            worker_id,
            attempt: 1,
            timeout_at,
        }
    }

    #[test]
    fn candidates_are_highest_priority_then_oldest_per_name() {
        let mut q = QueueState::new();
        q.add_arrivals(
            [
                arrival(3, "a", 1),
                arrival(1, "a", 1),
                arrival(2, "a", 5),
                arrival(4, "b", 1),
            ],
            (10, 4),
        );
        let got: Vec<i64> = q
            .candidates(&[("a".into(), 2), ("b".into(), 5), ("c".into(), 1)])
            .iter()
            .map(|c| c.task_id)
            .collect();
        assert_eq!(got, vec![2, 1, 4]);
        assert_eq!(q.ready_len(), 4);
    }

    #[test]
    fn rereads_do_not_duplicate_and_the_cursor_only_rewinds_on_request() {
        let mut q = QueueState::new();
        q.add_arrivals([arrival(1, "a", 1)], (100, 1));
        q.add_arrivals([arrival(1, "a", 1), arrival(2, "a", 1)], (50, 2));
        assert_eq!(q.ready_len(), 2);
        assert_eq!(q.cursor(), (100, 1), "a read never moves the cursor back");
        q.rewind_to(40);
        assert_eq!(q.cursor(), (40, i64::MIN));
        q.rewind_to(70);
        assert_eq!(q.cursor(), (40, i64::MIN), "the earliest watermark wins");
    }

    #[test]
    fn assigned_tasks_leave_the_queue_and_a_requeued_one_comes_back() {
        let mut q = QueueState::new();
        q.add_arrivals([arrival(1, "a", 1), arrival(2, "a", 1)], (1, 2));
        q.remove_ready("a", 1, 1);
        q.start_running(1, running(7, 1_000));
        assert_eq!(q.ready_len(), 1);
        assert_eq!(q.running_on(7), 1);
        // Read as queued again (its worker deregistered and gave it back): running no more.
        q.add_arrivals([arrival(1, "a", 1)], (3, 1));
        assert_eq!(q.ready_len(), 2);
        assert_eq!(q.candidates(&[("a".into(), 10)]).len(), 2);
        assert_eq!((q.running_on(7), q.running_len()), (0, 0));
    }

    #[test]
    fn lost_and_timed_out_come_from_the_running_attempts() {
        let mut q = QueueState::new();
        q.start_running(1, running(7, 100));
        q.start_running(2, running(8, 300));
        q.start_running(3, running(8, 200));
        assert_eq!(q.lost(&HashSet::from([8])), vec![1]);
        assert_eq!(q.timed_out(200), vec![1, 3]);
        assert_eq!(q.next_timeout(), Some(100));
        // A new attempt of the same task replaces the old one on its worker.
        q.start_running(1, running(8, 400));
        assert_eq!((q.running_on(7), q.running_on(8)), (0, 3));
    }

    #[test]
    fn an_ending_report_for_an_older_attempt_is_ignored() {
        let mut q = QueueState::new();
        q.start_running(
            1,
            RunningAttempt {
                worker_id: 7,
                attempt: 2,
                timeout_at: 100,
            },
        );
        q.end_attempt(1, 1);
        assert_eq!(q.running_on(7), 1);
        q.end_attempt(1, 2);
        assert_eq!(q.running_on(7), 0);
    }

    #[test]
    fn a_posted_task_is_claimed_released_or_ended_by_what_its_row_says() {
        let mut q = QueueState::new();
        q.add_arrivals(
            [arrival(1, "a", 1), arrival(2, "a", 1), arrival(3, "a", 1)],
            (1, 3),
        );
        for c in q.candidates(&[("a".into(), 3)]) {
            assert_eq!(q.post(&c, 7, 1_000, 50), Some(1));
        }
        assert_eq!((q.ready_len(), q.running_on(7)), (0, 3));
        assert_eq!(q.next_timeout(), Some(1_050), "estimated from the post");
        // Reread while unclaimed: stays posted, not queued twice.
        q.add_arrivals([arrival(1, "a", 1)], (2, 1));
        assert_eq!((q.ready_len(), q.running_on(7)), (0, 3));
        // Claimed by another worker (a double post after a restart): counted there.
        q.reconcile(
            1,
            RowState::Running {
                worker_id: 8,
                timeout_at: 2_000,
            },
        );
        assert_eq!((q.running_on(7), q.running_on(8)), (2, 1));
        // Still unclaimed: kept. Withdrawn: ready again with its attempt count.
        q.reconcile(2, RowState::Unclaimed);
        let mut old = q.posted_before(1_001);
        old.sort_unstable();
        assert_eq!(old, vec![(2, 1), (3, 1)]);
        assert!(q.posted_before(1_000).is_empty());
        q.unpost(2, 1);
        assert_eq!((q.ready_len(), q.ready_attempt(2)), (1, Some(0)));
        // Claimed and finished before the check saw it claimed: over.
        q.reconcile(3, RowState::Ended);
        assert_eq!((q.running_on(7), q.running_len()), (0, 1));
        // A claimed attempt whose row reads as unclaimed is not ours any more.
        q.reconcile(1, RowState::Unclaimed);
        assert_eq!(q.running_len(), 0);
    }

    #[test]
    fn reread_from_start_forgets_the_queue_but_not_running_attempts() {
        let mut q = QueueState::new();
        q.add_arrivals([arrival(1, "a", 1)], (5, 1));
        q.start_running(2, running(7, 100));
        q.reread_from_start();
        assert_eq!((q.ready_len(), q.cursor()), (0, FROM_START));
        assert_eq!(q.running_on(7), 1);
    }
}
