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
//!   periodic sweep), which give the free slots per worker, the next timeout and the lost tasks. An
//!   assignment is *posted* (in shared memory, `crate::wake`) until the worker's fetch claims
//!   the row; endings are reported through shared memory, and a once-a-second check by
//!   primary key repairs what reports missed.
//!
//! Pure Rust, no Postgres: `crate::scheduler` does the reading and writing.

use crate::assign::Candidate;
use crate::flow::{Blocked, RateLimits, RateUse};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use rustc_hash::{FxHashMap, FxHashSet};
use std::rc::Rc;

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
    /// Runnable from; with the id, the task's place in the arrivals index.
    pub run_at: Micros,
    /// Cancelled if still waiting then (the schedule timeout).
    pub schedule_deadline: Micros,
    /// The row's attempt count; the next claim makes attempt `attempt + 1`.
    pub attempt: i32,
    pub flow: Option<TaskFlow>,
}

/// Where a ready task sits in time: its place in the arrivals index (with its id) and when its
/// schedule timeout cancels it.
#[derive(Debug, Clone, Copy)]
struct Place {
    run_at: Micros,
    schedule_deadline: Micros,
}

/// A runnable task: the queue it waits in (name, priority), its place in the arrivals index
/// (what `QueueState::sweep` compares with the table) and its attempt count.
#[derive(Debug, Clone)]
struct ReadyTask {
    task_name: Rc<str>,
    priority: i32,
    run_at: Micros,
    schedule_deadline: Micros,
    attempt: i32,
}

/// A task's flow-control facts, evaluated once at enqueue; only tasks that have any carry one.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TaskFlow {
    pub concurrency_key: Option<String>,
    pub rates: Vec<RateUse>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    GroupRoundRobin,
    CancelInProgress,
    CancelNewest,
}

impl Strategy {
    pub fn parse(s: &str) -> Option<Strategy> {
        match s {
            "group_round_robin" => Some(Strategy::GroupRoundRobin),
            "cancel_in_progress" => Some(Strategy::CancelInProgress),
            "cancel_newest" => Some(Strategy::CancelNewest),
            _ => None,
        }
    }
}

/// A task name's concurrency rule: at most `max_runs` running per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcurrencyRule {
    pub max_runs: u32,
    pub strategy: Strategy,
}

/// The runnable tasks of one concurrency key, and when the key was last served (round robin).
#[derive(Debug, Default)]
struct KeyQueue {
    ready: BTreeSet<(Reverse<i32>, i64)>,
    served: u64,
}

/// The waiting tasks of one task name with a concurrency rule, per key.
#[derive(Debug, Default)]
struct KeyedName {
    keys: FxHashMap<String, KeyQueue>,
    /// The keys with waiting tasks, least recently served first: the round-robin order.
    by_served: BTreeSet<(u64, String)>,
    /// Waiting tasks per priority: with a single level, the best candidates come from the
    /// first keys in `by_served`, and a tick need not look at every key.
    priorities: BTreeMap<i32, usize>,
}

impl KeyedName {
    fn insert(&mut self, key: String, priority: i32, task_id: i64) -> bool {
        let queue = self.keys.entry(key.clone()).or_default();
        let was_empty = queue.ready.is_empty();
        if !queue.ready.insert((Reverse(priority), task_id)) {
            return false;
        }
        if was_empty {
            self.by_served.insert((queue.served, key));
        }
        *self.priorities.entry(priority).or_default() += 1;
        true
    }

    fn remove(&mut self, key: &str, priority: i32, task_id: i64) -> bool {
        let Some(queue) = self.keys.get_mut(key) else {
            return false;
        };
        if !queue.ready.remove(&(Reverse(priority), task_id)) {
            return false;
        }
        if queue.ready.is_empty() {
            self.by_served.remove(&(queue.served, key.to_string()));
        }
        if let Some(n) = self.priorities.get_mut(&priority) {
            *n -= 1;
            if *n == 0 {
                self.priorities.remove(&priority);
            }
        }
        true
    }

    fn set_served(&mut self, key: &str, served: u64) {
        if let Some(queue) = self.keys.get_mut(key) {
            if !queue.ready.is_empty() {
                self.by_served.remove(&(queue.served, key.to_string()));
                self.by_served.insert((served, key.to_string()));
            }
            queue.served = served;
        }
    }

    /// Forgets a key with nothing waiting (the caller knows nothing runs either); its
    /// round-robin turn restarts if it comes back, which only favours it once.
    fn forget_if_idle(&mut self, key: &str) {
        if self.keys.get(key).is_some_and(|q| q.ready.is_empty()) {
            self.keys.remove(key);
        }
    }

    fn tasks(self) -> impl Iterator<Item = (Reverse<i32>, i64)> {
        self.keys.into_values().flat_map(|q| q.ready)
    }
}

/// Tasks a candidate walk passes over without a rate-limit verdict before it gives up on a
/// queue for this tick: bounds the work of a tick whose queue head is rate limited.
const BLOCKED_WALK_LIMIT: usize = 1_000;

/// What `QueueState::candidates` found.
#[derive(Debug, Default)]
pub struct CandidateSet {
    /// In admission order: highest priority, then round-robin rank across concurrency keys,
    /// then the key served longest ago, then oldest.
    pub candidates: Vec<Candidate>,
    /// The earliest moment a rate-limited task that was passed over could fit.
    pub blocked_until: Option<Micros>,
    /// Tasks that ask for more units than a key's whole limit: they can never run.
    pub over_limit: Vec<(i64, String)>,
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
    task_name: Rc<str>,
    priority: i32,
    run_at: Micros,
    schedule_deadline: Micros,
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
    /// Per task name: highest priority first, then oldest (lowest id). Tasks of a name with a
    /// concurrency rule wait in `keyed` instead.
    ready: FxHashMap<String, BTreeSet<(Reverse<i32>, i64)>>,
    /// Per task name with a concurrency rule, per key.
    keyed: FxHashMap<String, KeyedName>,
    rules: FxHashMap<String, ConcurrencyRule>,
    /// Flow facts (and task name) of ready and running tasks that have any.
    flow: FxHashMap<i64, (String, TaskFlow)>,
    /// Running (or posted) task ids per (task name, concurrency key).
    key_running: FxHashMap<String, FxHashMap<String, BTreeSet<i64>>>,
    /// Counts admissions of keyed tasks; a key's `served` is the count at its last admission.
    served_seq: u64,
    ready_len: usize,
    /// Every ready task, and the same in the arrivals index's order and by schedule deadline
    /// (the schedule timeouts come from memory: no index of queued tasks by deadline).
    ready_tasks: FxHashMap<i64, ReadyTask>,
    by_position: BTreeSet<Cursor>,
    by_deadline: BTreeSet<(Micros, i64)>,
    /// One copy of each task name for `ready_tasks`.
    names: FxHashSet<Rc<str>>,
    cursor: Cursor,
    running: FxHashMap<i64, RunningAttempt>,
    running_per_worker: FxHashMap<i64, i32>,
    /// Running attempts (by task id) whose assignment is posted but not seen claimed.
    posted: FxHashMap<i64, Posted>,
}

impl Default for QueueState {
    fn default() -> Self {
        Self::new()
    }
}

impl QueueState {
    pub fn new() -> Self {
        QueueState {
            ready: FxHashMap::default(),
            keyed: FxHashMap::default(),
            rules: FxHashMap::default(),
            flow: FxHashMap::default(),
            key_running: FxHashMap::default(),
            served_seq: 0,
            ready_len: 0,
            ready_tasks: FxHashMap::default(),
            by_position: BTreeSet::new(),
            by_deadline: BTreeSet::new(),
            names: FxHashSet::default(),
            cursor: FROM_START,
            running: FxHashMap::default(),
            running_per_worker: FxHashMap::default(),
            posted: FxHashMap::default(),
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

    /// Records tasks read after the cursor and moves the cursor to `next`.
    pub fn add_arrivals(&mut self, arrivals: impl IntoIterator<Item = Arrival>, next: Cursor) {
        for a in arrivals {
            self.note_queued(a);
        }
        self.cursor = self.cursor.max(next);
    }

    /// A row read as queued. A task already known is not counted twice (rewinds and sweeps
    /// reread rows), and one posted to a worker, or claimed by it in memory (its row is
    /// queued at the attempt before until the attempt ends, see crate::claims), stays
    /// running. A task read as queued that is otherwise remembered as running at another
    /// attempt was requeued by someone else (its worker deregistered): that attempt is over.
    fn note_queued(&mut self, a: Arrival) {
        if self.ready_tasks.contains_key(&a.task_id) {
            return;
        }
        let posted_or_claimed = self
            .running
            .get(&a.task_id)
            .is_some_and(|r| r.attempt == a.attempt + 1);
        if posted_or_claimed {
            return;
        }
        self.end_running(a.task_id);
        if let Some(flow) = a.flow {
            self.flow.insert(a.task_id, (a.task_name.clone(), flow));
        }
        let place = Place {
            run_at: a.run_at,
            schedule_deadline: a.schedule_deadline,
        };
        self.insert_ready(a.task_name, a.priority, a.task_id, a.attempt, place);
    }

    /// Brings the ready tasks placed in `(from, to]` of the arrivals index in line with
    /// `rows`, a read of every task queued there (the periodic sweep, a slice per tick): tasks
    /// no longer queued (deleted, cancelled, expired, claimed outside this scheduler) leave, and
    /// queued ones that memory missed (committed where no watermark could see them, such as a
    /// prepared transaction) join. At most `max_gone` leave per call, so that a mass delete
    /// does not make one long tick. Returns how many left and how far the slice was compared
    /// (`to`, or the place of the last one that left).
    pub fn sweep(
        &mut self,
        rows: Vec<Arrival>,
        from: Cursor,
        to: Cursor,
        max_gone: usize,
    ) -> (usize, Cursor) {
        use std::ops::Bound::{Excluded, Included};
        let mut gone = Vec::new();
        let mut reached = to;
        if from < to {
            let seen: HashSet<i64> = rows.iter().map(|a| a.task_id).collect();
            for &(run_at, id) in self.by_position.range((Excluded(from), Included(to))) {
                if seen.contains(&id) {
                    continue;
                }
                gone.push(id);
                if gone.len() >= max_gone {
                    reached = (run_at, id);
                    break;
                }
            }
        }
        for id in &gone {
            self.forget_ready(*id);
        }
        for a in rows {
            self.note_queued(a);
        }
        (gone.len(), reached)
    }

    /// Sets the concurrency rules per task name. The ready tasks of a name whose rule appeared
    /// or went move between the plain and the keyed queues, in memory (a reread from the table
    /// would walk every index entry not yet vacuumed); running counts per key are kept.
    pub fn set_rules(&mut self, rules: FxHashMap<String, ConcurrencyRule>) {
        if rules == self.rules {
            return;
        }
        let moved: Vec<String> = rules
            .keys()
            .chain(self.rules.keys())
            .filter(|name| rules.contains_key(*name) != self.rules.contains_key(*name))
            .cloned()
            .collect();
        self.rules = rules;
        for name in moved {
            let mut tasks: Vec<(Reverse<i32>, i64)> = Vec::new();
            if let Some(queue) = self.ready.remove(&name) {
                tasks.extend(queue);
            }
            if let Some(keys) = self.keyed.remove(&name) {
                tasks.extend(keys.tasks());
            }
            for (Reverse(priority), id) in tasks {
                let Some(task) = self.ready_tasks.remove(&id) else {
                    continue;
                };
                self.by_position.remove(&(task.run_at, id));
                self.by_deadline.remove(&(task.schedule_deadline, id));
                self.ready_len -= 1;
                let place = Place {
                    run_at: task.run_at,
                    schedule_deadline: task.schedule_deadline,
                };
                self.insert_ready(name.clone(), priority, id, task.attempt, place);
            }
        }
    }

    /// The concurrency key a task waits under: only with a rule for its name and a key
    /// evaluated at enqueue (tasks enqueued before the rule existed are not limited by it).
    fn key_of(&self, task_name: &str, task_id: i64) -> Option<&str> {
        if !self.rules.contains_key(task_name) {
            return None;
        }
        self.flow
            .get(&task_id)
            .and_then(|(_, f)| f.concurrency_key.as_deref())
    }

    fn insert_ready(
        &mut self,
        task_name: String,
        priority: i32,
        task_id: i64,
        attempt: i32,
        place: Place,
    ) {
        if self.ready_tasks.contains_key(&task_id) {
            return;
        }
        let interned = match self.names.get(task_name.as_str()) {
            Some(name) => name.clone(),
            None => {
                let name: Rc<str> = Rc::from(task_name.as_str());
                self.names.insert(name.clone());
                name
            }
        };
        let inserted = match self.key_of(&task_name, task_id).map(str::to_string) {
            Some(key) => self
                .keyed
                .entry(task_name)
                .or_default()
                .insert(key, priority, task_id),
            None => self
                .ready
                .entry(task_name)
                .or_default()
                .insert((Reverse(priority), task_id)),
        };
        if inserted {
            self.ready_len += 1;
            self.ready_tasks.insert(
                task_id,
                ReadyTask {
                    task_name: interned,
                    priority,
                    run_at: place.run_at,
                    schedule_deadline: place.schedule_deadline,
                    attempt,
                },
            );
            self.by_position.insert((place.run_at, task_id));
            self.by_deadline.insert((place.schedule_deadline, task_id));
        }
    }

    /// Running (or posted) tasks of one concurrency key.
    pub fn running_for_key(&self, task_name: &str, key: &str) -> usize {
        self.key_running
            .get(task_name)
            .and_then(|keys| keys.get(key))
            .map_or(0, BTreeSet::len)
    }

    /// Tasks to cancel so each key of a name with a cancel strategy keeps `max_runs` tasks:
    /// `cancel_newest` cancels the newest waiting ones (a new task for a full key), and
    /// `cancel_in_progress` the oldest, running ones included. They leave the queue here; the
    /// caller cancels their rows.
    pub fn concurrency_victims(&mut self) -> Vec<(i64, String)> {
        let mut victims: Vec<(i64, String)> = Vec::new();
        for (name, keyed) in &self.keyed {
            let Some(rule) = self.rules.get(name) else {
                continue;
            };
            if rule.strategy == Strategy::GroupRoundRobin {
                continue;
            }
            for (key, queue) in &keyed.keys {
                let running = self.key_running.get(name).and_then(|k| k.get(key));
                let total = queue.ready.len() + running.map_or(0, BTreeSet::len);
                let excess = total.saturating_sub(rule.max_runs as usize);
                if excess == 0 {
                    continue;
                }
                let mut ready: Vec<i64> = queue.ready.iter().map(|(_, id)| *id).collect();
                ready.sort_unstable();
                let chosen: Vec<i64> = match rule.strategy {
                    Strategy::CancelNewest => ready.iter().rev().take(excess).copied().collect(),
                    _ => {
                        let mut all: Vec<i64> = ready;
                        all.extend(running.into_iter().flatten().copied());
                        all.sort_unstable();
                        all.into_iter().take(excess).collect()
                    }
                };
                let reason = match rule.strategy {
                    Strategy::CancelNewest => format!(
                        "cancelled by concurrency strategy cancel_newest: key {key:?} of task \"{name}\" already has max_runs = {} tasks",
                        rule.max_runs
                    ),
                    _ => format!(
                        "cancelled by concurrency strategy cancel_in_progress: newer tasks for key {key:?} of task \"{name}\" took its max_runs = {} places",
                        rule.max_runs
                    ),
                };
                victims.extend(chosen.into_iter().map(|id| (id, reason.clone())));
            }
        }
        for (id, _) in &victims {
            self.forget_ready(*id);
        }
        victims.sort_unstable();
        victims
    }

    /// Removes a ready task whatever its queue (cancelled, or not queued any more).
    pub fn forget_ready(&mut self, task_id: i64) {
        if let Some(task) = self.ready_tasks.get(&task_id) {
            let (name, priority) = (task.task_name.clone(), task.priority);
            self.remove_ready(&name, priority, task_id);
        }
    }

    /// Ready tasks whose schedule deadline is before `now`, oldest deadline first, at most
    /// `max`. They stay ready until the caller has cancelled their rows (`forget_ready`): one
    /// that could not be cancelled now (its row locked by a claim) is tried again or assigned.
    pub fn expired(&self, now: Micros, max: usize) -> Vec<i64> {
        self.by_deadline
            .iter()
            .take_while(|(deadline, _)| *deadline < now)
            .take(max)
            .map(|&(_, id)| id)
            .collect()
    }

    /// A ready task's schedule deadline as its row now has it.
    pub fn set_deadline(&mut self, task_id: i64, schedule_deadline: Micros) {
        if let Some(task) = self.ready_tasks.get_mut(&task_id) {
            self.by_deadline.remove(&(task.schedule_deadline, task_id));
            task.schedule_deadline = schedule_deadline;
            self.by_deadline.insert((schedule_deadline, task_id));
        }
    }

    /// The earliest schedule deadline among the ready tasks.
    pub fn next_deadline(&self) -> Option<Micros> {
        self.by_deadline.first().map(|&(deadline, _)| deadline)
    }

    /// A ready task's attempt count.
    pub fn ready_attempt(&self, task_id: i64) -> Option<i32> {
        self.ready_tasks.get(&task_id).map(|t| t.attempt)
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
        let ready = self.ready_tasks.get(&c.task_id)?;
        let (attempt, run_at, schedule_deadline) =
            (ready.attempt + 1, ready.run_at, ready.schedule_deadline);
        if let Some(key) = self.key_of(&c.task_name, c.task_id).map(str::to_string) {
            self.served_seq += 1;
            if let Some(keyed) = self.keyed.get_mut(&*c.task_name) {
                keyed.set_served(&key, self.served_seq);
            }
        }
        self.start_running(
            c.task_id,
            RunningAttempt {
                worker_id,
                attempt,
                timeout_at: now.saturating_add(timeout),
            },
        );
        self.remove_ready(&c.task_name, c.priority, c.task_id);
        self.posted.insert(
            c.task_id,
            Posted {
                task_name: c.task_name.clone(),
                priority: c.priority,
                run_at,
                schedule_deadline,
                posted_at: now,
            },
        );
        Some(attempt)
    }

    /// An assignment that will not be claimed (withdrawn from a lost worker, or left behind by
    /// a fetch that rolled back part of its work) goes back to the ready queue.
    pub fn unpost(&mut self, task_id: i64, attempt: i32) {
        if self
            .running
            .get(&task_id)
            .is_none_or(|r| r.attempt != attempt)
        {
            return;
        }
        if let Some(p) = self.posted.remove(&task_id) {
            let flow = self.flow.get(&task_id).cloned();
            self.end_running(task_id);
            if let Some(flow) = flow {
                self.flow.insert(task_id, flow);
            }
            let place = Place {
                run_at: p.run_at,
                schedule_deadline: p.schedule_deadline,
            };
            self.insert_ready(
                p.task_name.to_string(),
                p.priority,
                task_id,
                attempt - 1,
                place,
            );
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

    /// The tasks to offer the wanted names' workers: at most `n` per name, highest priority
    /// first, then oldest; for a name with a concurrency rule, at most the free runs of each
    /// key, taken round robin across keys. Rate-limited tasks are passed over (they keep their
    /// place); a walk gives up after `BLOCKED_WALK_LIMIT` of them.
    pub fn candidates(
        &self,
        demand: &[(String, i32)],
        limits: &mut RateLimits,
        now: Micros,
    ) -> CandidateSet {
        let mut set = CandidateSet::default();
        for (name, n) in demand {
            let n = (*n).max(0) as usize;
            // The queue's own copy of the name (every ready task's name is interned): a
            // candidate shares it instead of allocating one.
            let shared: Rc<str> = match self.names.get(name.as_str()) {
                Some(shared) => shared.clone(),
                None => Rc::from(name.as_str()),
            };
            if let Some(queue) = self.ready.get(name) {
                self.walk(&mut set, limits, now, &shared, queue, n);
            }
            let (Some(keys), Some(rule)) = (self.keyed.get(name), self.rules.get(name)) else {
                continue;
            };
            self.merge_keys(&mut set, limits, now, &shared, keys, rule, n);
        }
        set.candidates
            .sort_by_key(|c| (Reverse(c.priority), c.rank, c.served, c.task_id));
        set
    }

    /// Takes the best `n` tasks across the keys of one name, in the order `plan` uses
    /// (priority, then rank within the key, then the key served longest ago, then oldest),
    /// merging the keys' queues through a heap: a tick looks at each key's head, and beyond it
    /// only at the tasks it takes, however many keys and tasks wait.
    #[allow(clippy::too_many_arguments)]
    fn merge_keys(
        &self,
        set: &mut CandidateSet,
        limits: &mut RateLimits,
        now: Micros,
        name: &Rc<str>,
        keyed: &KeyedName,
        rule: &ConcurrencyRule,
        n: usize,
    ) {
        use std::collections::BinaryHeap;
        struct KeyCursor<'q> {
            tasks: std::collections::btree_set::Iter<'q, (Reverse<i32>, i64)>,
            served: u64,
            free: usize,
            taken: usize,
            passed: usize,
        }
        /// (order, cursor index), smallest order first.
        type Head = Reverse<((Reverse<i32>, u32, u64, i64), usize)>;
        // Pushes a key's next admissible task, if it may take one more.
        let advance = |c: &mut KeyCursor,
                       i: usize,
                       heap: &mut BinaryHeap<Head>,
                       set: &mut CandidateSet,
                       limits: &mut RateLimits| {
            if c.taken >= c.free {
                return;
            }
            while c.passed < BLOCKED_WALK_LIMIT {
                let Some(&(priority, id)) = c.tasks.next() else {
                    return;
                };
                if self.admissible(set, limits, now, id) {
                    heap.push(Reverse(((priority, c.taken as u32, c.served, id), i)));
                    return;
                }
                c.passed += 1;
            }
        };
        let mut cursors: Vec<KeyCursor> = Vec::new();
        let mut heap: BinaryHeap<Head> = BinaryHeap::new();
        // With one priority level, every key's first task (rank 0) comes before any second
        // one, in `by_served` order: the first `n` keys that offer a task are enough.
        let single_level = keyed.priorities.len() <= 1;
        for (_, key) in &keyed.by_served {
            if single_level && heap.len() >= n {
                break;
            }
            let Some(queue) = keyed.keys.get(key) else {
                continue;
            };
            let free = (rule.max_runs as usize).saturating_sub(self.running_for_key(name, key));
            if free == 0 || queue.ready.is_empty() {
                continue;
            }
            cursors.push(KeyCursor {
                tasks: queue.ready.iter(),
                served: queue.served,
                free,
                taken: 0,
                passed: 0,
            });
            let i = cursors.len() - 1;
            advance(&mut cursors[i], i, &mut heap, set, limits);
        }
        let mut taken = 0;
        while taken < n {
            let Some(Reverse(((Reverse(priority), rank, served, id), i))) = heap.pop() else {
                break;
            };
            set.candidates.push(Candidate {
                task_id: id,
                task_name: name.clone(),
                priority,
                rank,
                served,
            });
            taken += 1;
            cursors[i].taken += 1;
            advance(&mut cursors[i], i, &mut heap, set, limits);
        }
    }

    /// Whether a task's rate limits let it run now; records when a blocked one could, and
    /// tasks that never can.
    fn admissible(
        &self,
        set: &mut CandidateSet,
        limits: &mut RateLimits,
        now: Micros,
        id: i64,
    ) -> bool {
        let Some((_, flow)) = self.flow.get(&id).filter(|(_, f)| !f.rates.is_empty()) else {
            return true;
        };
        match limits.check(&flow.rates, now) {
            Ok(()) => true,
            Err(Blocked::Until(at)) => {
                set.blocked_until = Some(set.blocked_until.map_or(at, |t| t.min(at)));
                false
            }
            Err(Blocked::OverLimit) => {
                let wanted: Vec<String> = flow
                    .rates
                    .iter()
                    .map(|u| format!("{} unit(s) of \"{}\"", u.units, u.key))
                    .collect();
                set.over_limit.push((
                    id,
                    format!(
                        "the task needs {} but that is more than the rate limit allows in one window",
                        wanted.join(", ")
                    ),
                ));
                false
            }
        }
    }

    /// Takes up to `n` admissible tasks from a plain (unkeyed) queue into `set`, oldest
    /// first; they are not ranked (keys take turns, names do not).
    fn walk(
        &self,
        set: &mut CandidateSet,
        limits: &mut RateLimits,
        now: Micros,
        name: &Rc<str>,
        queue: &BTreeSet<(Reverse<i32>, i64)>,
        n: usize,
    ) {
        let mut taken = 0;
        let mut passed = 0;
        for (Reverse(priority), id) in queue {
            if taken >= n || passed >= BLOCKED_WALK_LIMIT {
                break;
            }
            if !self.admissible(set, limits, now, *id) {
                passed += 1;
                continue;
            }
            set.candidates.push(Candidate {
                task_id: *id,
                task_name: name.clone(),
                priority: *priority,
                rank: 0,
                served: 0,
            });
            taken += 1;
        }
    }

    /// The rate-limit uses of a task (empty if none).
    pub fn rate_uses(&self, task_id: i64) -> &[RateUse] {
        self.flow
            .get(&task_id)
            .map_or(&[], |(_, f)| f.rates.as_slice())
    }

    /// Removes a task from the runnable queue (assigned, or no longer queued).
    pub fn remove_ready(&mut self, task_name: &str, priority: i32, task_id: i64) {
        let removed = match self.key_of(task_name, task_id).map(str::to_string) {
            Some(key) => {
                let idle = self.running_for_key(task_name, &key) == 0;
                let mut removed = false;
                if let Some(keyed) = self.keyed.get_mut(task_name) {
                    removed = keyed.remove(&key, priority, task_id);
                    if idle {
                        keyed.forget_if_idle(&key);
                    }
                    if keyed.keys.is_empty() {
                        self.keyed.remove(task_name);
                    }
                }
                removed
            }
            None => {
                let mut removed = false;
                if let Some(queue) = self.ready.get_mut(task_name) {
                    removed = queue.remove(&(Reverse(priority), task_id));
                    if queue.is_empty() {
                        self.ready.remove(task_name);
                    }
                }
                removed
            }
        };
        if removed {
            self.ready_len -= 1;
            if let Some(task) = self.ready_tasks.remove(&task_id) {
                self.by_position.remove(&(task.run_at, task_id));
                self.by_deadline.remove(&(task.schedule_deadline, task_id));
            }
            if !self.running.contains_key(&task_id) {
                self.flow.remove(&task_id);
            }
        }
    }

    pub fn start_running(&mut self, task_id: i64, attempt: RunningAttempt) {
        if let Some(old) = self.running.insert(task_id, attempt) {
            self.dec_worker(old.worker_id);
        }
        if let Some((
            name,
            TaskFlow {
                concurrency_key: Some(key),
                ..
            },
        )) = self.flow.get(&task_id)
        {
            self.key_running
                .entry(name.clone())
                .or_default()
                .entry(key.clone())
                .or_default()
                .insert(task_id);
        }
        *self
            .running_per_worker
            .entry(attempt.worker_id)
            .or_insert(0) += 1;
    }

    /// Attempt `attempt` of the task ended; a report about an older attempt is ignored. For a
    /// task waiting here, a report about the attempt its claim would have made means it was
    /// cancelled while queued (sluice._cancel): it leaves the queue now, instead of being
    /// handed to a worker whose claim finds nothing.
    pub fn end_attempt(&mut self, task_id: i64, attempt: i32) {
        if self
            .running
            .get(&task_id)
            .is_some_and(|a| a.attempt == attempt)
        {
            self.end_running(task_id);
        } else if self
            .ready_tasks
            .get(&task_id)
            .is_some_and(|t| t.attempt + 1 == attempt)
        {
            self.forget_ready(task_id);
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
        self.key_running.clear();
        let ready = &self.ready_tasks;
        let posted_ids: HashSet<i64> = posted.iter().map(|(id, _)| *id).collect();
        self.flow
            .retain(|id, _| ready.contains_key(id) || posted_ids.contains(id));
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
        if let Some((name, flow)) = self.flow.get(&task_id) {
            if let Some(key) = &flow.concurrency_key {
                let mut now_idle = false;
                if let Some(keys) = self.key_running.get_mut(name) {
                    if let Some(ids) = keys.get_mut(key) {
                        ids.remove(&task_id);
                        if ids.is_empty() {
                            keys.remove(key);
                            now_idle = true;
                        }
                    }
                    if keys.is_empty() {
                        self.key_running.remove(name);
                    }
                }
                // Nothing waiting or running: forget the key.
                if now_idle {
                    if let Some(keyed) = self.keyed.get_mut(name) {
                        keyed.forget_if_idle(key);
                        if keyed.keys.is_empty() {
                            self.keyed.remove(name);
                        }
                    }
                }
            }
            if !self.ready_tasks.contains_key(&task_id) {
                self.flow.remove(&task_id);
            }
        }
    }

    /// A running attempt loaded from the table, with its flow facts (for the key counts).
    pub fn load_running(
        &mut self,
        task_id: i64,
        task_name: &str,
        flow: Option<TaskFlow>,
        attempt: RunningAttempt,
    ) {
        if let Some(flow) = flow {
            self.flow.insert(task_id, (task_name.to_string(), flow));
        }
        self.start_running(task_id, attempt);
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

    /// Whether the task has a running (or posted, not yet claimed) attempt in memory.
    pub fn is_running(&self, task_id: i64) -> bool {
        self.running.contains_key(&task_id)
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
            run_at: id,
            schedule_deadline: i64::MAX,
            attempt: 0,
            flow: None,
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
            .candidates(
                &[("a".into(), 2), ("b".into(), 5), ("c".into(), 1)],
                &mut RateLimits::default(),
                0,
            )
            .candidates
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
        // Read as queued at the attempt before (claimed in memory, see crate::claims): still
        // running.
        q.add_arrivals([arrival(1, "a", 1)], (3, 1));
        assert_eq!((q.ready_len(), q.running_on(7)), (1, 1));
        // Read as queued at its own attempt (its worker deregistered and gave it back):
        // running no more.
        q.add_arrivals(
            [Arrival {
                attempt: 1,
                ..arrival(1, "a", 1)
            }],
            (3, 1),
        );
        assert_eq!(q.ready_len(), 2);
        assert_eq!(
            q.candidates(&[("a".into(), 10)], &mut RateLimits::default(), 0)
                .candidates
                .len(),
            2
        );
        assert_eq!((q.running_on(7), q.running_len()), (0, 0));
    }

    #[test]
    fn a_task_cancelled_while_waiting_leaves_the_queue() {
        let mut q = QueueState::new();
        q.add_arrivals([arrival(1, "a", 1), arrival(2, "a", 1)], (2, 2));
        // A report about the attempt before (a retried task's failed one) changes nothing.
        q.end_attempt(1, 0);
        assert_eq!(q.ready_len(), 2);
        // sluice._cancel of a queued task reports the attempt its claim would have made.
        q.end_attempt(1, 1);
        assert_eq!(q.ready_len(), 1);
        let left = q.candidates(&[("a".into(), 10)], &mut RateLimits::default(), 0);
        assert_eq!(
            left.candidates
                .iter()
                .map(|c| c.task_id)
                .collect::<Vec<_>>(),
            vec![2]
        );
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
        for c in q
            .candidates(&[("a".into(), 3)], &mut RateLimits::default(), 0)
            .candidates
        {
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
    fn a_sweep_drops_ready_tasks_no_longer_queued_and_adds_missed_ones() {
        let mut q = QueueState::new();
        q.add_arrivals((1..=6).map(|id| arrival(id, "a", 1)), (6, 6));
        // Task 3 was deleted, 5 cancelled; 4 is posted (not claimed, so still queued in the
        // table); 7 committed behind the cursor without a watermark.
        let posted = q
            .candidates(&[("a".into(), 4)], &mut RateLimits::default(), 0)
            .candidates
            .into_iter()
            .find(|c| c.task_id == 4)
            .unwrap();
        q.post(&posted, 9, 0, 1_000).unwrap();
        let rows = |ids: &[i64]| {
            ids.iter()
                .map(|&id| arrival(id, "a", 1))
                .collect::<Vec<_>>()
        };
        // First slice: (start, (4, 4)] read as 1, 2, 4: task 3 leaves.
        assert_eq!(
            q.sweep(rows(&[1, 2, 4]), FROM_START, (4, 4), 10),
            (1, (4, 4))
        );
        assert_eq!(q.ready_len(), 4);
        assert_eq!(q.running_on(9), 1, "the posted task stays posted");
        // Second slice up to the cursor: 5 leaves, the missed 7 (placed at 4.5) joins.
        let mut missed = arrival(7, "a", 1);
        missed.run_at = 4;
        assert_eq!(
            q.sweep([rows(&[6]), vec![missed]].concat(), (4, 4), (6, 6), 10),
            (1, (6, 6))
        );
        let mut left: Vec<i64> = q
            .candidates(&[("a".into(), 10)], &mut RateLimits::default(), 0)
            .candidates
            .iter()
            .map(|c| c.task_id)
            .collect();
        left.sort_unstable();
        assert_eq!(left, vec![1, 2, 6, 7]);
        assert_eq!(q.ready_len(), 4);
        // A slice behind its own start (the cursor rewound) checks nothing.
        assert_eq!(q.sweep(vec![], (6, 6), (5, 5), 10), (0, (5, 5)));
        assert_eq!(q.ready_len(), 4);
        // Everything deleted: at most `max_gone` leave per call, the rest on the next.
        // (1, 2 and 7, placed at (4, 7), then 6.)
        assert_eq!(q.sweep(vec![], FROM_START, (7, 7), 3), (3, (4, 7)));
        assert_eq!(q.sweep(vec![], (4, 7), (7, 7), 3), (1, (7, 7)));
        assert_eq!(q.ready_len(), 0);
    }

    #[test]
    fn schedule_deadlines_come_from_the_waiting_tasks_only() {
        let mut q = QueueState::new();
        let due = |id: i64, deadline: Micros| Arrival {
            schedule_deadline: deadline,
            ..arrival(id, "a", 1)
        };
        q.add_arrivals([due(1, 50), due(2, 30), due(3, 90)], (3, 3));
        assert_eq!(q.next_deadline(), Some(30));
        assert_eq!(q.expired(60, 10), vec![2, 1]);
        assert_eq!(q.expired(60, 1), vec![2]);
        // Posted to a worker, task 1 is no longer waiting; withdrawn, it waits again.
        let first = q
            .candidates(&[("a".into(), 1)], &mut RateLimits::default(), 0)
            .candidates
            .remove(0);
        assert_eq!(first.task_id, 1);
        let attempt = q.post(&first, 9, 0, 1_000).unwrap();
        assert_eq!(q.expired(60, 10), vec![2]);
        q.unpost(1, attempt);
        assert_eq!(q.expired(60, 10), vec![2, 1]);
        // Cancelled (the caller forgets it): gone from the deadlines too.
        q.forget_ready(2);
        assert_eq!((q.expired(60, 10), q.next_deadline()), (vec![1], Some(50)));
    }

    #[test]
    fn forgetting_a_keyed_ready_task_frees_its_key() {
        let mut q = QueueState::new();
        q.set_rules(rule(1, Strategy::GroupRoundRobin));
        q.add_arrivals([keyed(1, "a", "k"), keyed(2, "a", "k")], (2, 2));
        q.forget_ready(1);
        assert_eq!(q.ready_len(), 1);
        let mut limits = RateLimits::default();
        assert_eq!(admit(&mut q, &mut limits, 5, 0), vec![2]);
    }

    fn keyed(id: i64, name: &str, key: &str) -> Arrival {
        Arrival {
            flow: Some(TaskFlow {
                concurrency_key: Some(key.into()),
                rates: vec![],
            }),
            ..arrival(id, name, 1)
        }
    }

    fn victim_ids(q: &mut QueueState) -> Vec<i64> {
        q.concurrency_victims()
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    fn rule(max_runs: u32, strategy: Strategy) -> FxHashMap<String, ConcurrencyRule> {
        FxHashMap::from_iter([("a".to_string(), ConcurrencyRule { max_runs, strategy })])
    }

    /// Admits up to `slots` tasks of name "a" on worker 7 as the scheduler would; returns ids.
    fn admit(q: &mut QueueState, limits: &mut RateLimits, slots: i32, now: Micros) -> Vec<i64> {
        let set = q.candidates(&[("a".into(), slots)], limits, now);
        let mut out = Vec::new();
        for c in set.candidates.into_iter().take(slots as usize) {
            if limits.try_admit(q.rate_uses(c.task_id), now).is_ok() {
                q.post(&c, 7, now, 1_000_000).unwrap();
                out.push(c.task_id);
            }
        }
        out
    }

    #[test]
    fn at_most_max_runs_per_key_and_a_freed_run_admits_the_next() {
        let mut q = QueueState::new();
        q.set_rules(rule(2, Strategy::GroupRoundRobin));
        q.add_arrivals((1..=5).map(|i| keyed(i, "a", "k")), (1, 5));
        let mut limits = RateLimits::default();
        assert_eq!(admit(&mut q, &mut limits, 10, 0), vec![1, 2]);
        assert!(admit(&mut q, &mut limits, 10, 0).is_empty());
        assert_eq!(q.running_for_key("a", "k"), 2);
        q.end_attempt(1, 1);
        assert_eq!(admit(&mut q, &mut limits, 10, 0), vec![3]);
        // A changed max_runs keeps the running counts and the queue.
        q.set_rules(rule(3, Strategy::GroupRoundRobin));
        assert_eq!((q.running_for_key("a", "k"), q.ready_len()), (2, 2));
        assert_eq!(admit(&mut q, &mut limits, 10, 0), vec![4]);
        // Without a rule the tasks are plain again, and back under one when it returns.
        q.set_rules(FxHashMap::default());
        assert_eq!(q.ready_len(), 1);
        q.set_rules(rule(3, Strategy::GroupRoundRobin));
        assert!(
            admit(&mut q, &mut limits, 10, 0).is_empty(),
            "k is full (3 running)"
        );
        q.set_rules(FxHashMap::default());
        assert_eq!(admit(&mut q, &mut limits, 10, 0), vec![5]);
    }

    #[test]
    fn keys_take_turns_a_late_key_is_served_within_a_round() {
        let mut q = QueueState::new();
        q.set_rules(rule(5, Strategy::GroupRoundRobin));
        q.add_arrivals((1..=1000).map(|i| keyed(i, "a", "A")), (1, 1000));
        let mut limits = RateLimits::default();
        // One slot at a time: A runs, then B's ten tasks arrive.
        let first = admit(&mut q, &mut limits, 1, 0);
        assert_eq!(first, vec![1]);
        q.end_attempt(1, 1);
        q.add_arrivals((1001..=1010).map(|i| keyed(i, "a", "B")), (2, 1010));
        let mut order = Vec::new();
        for _ in 0..20 {
            let got = admit(&mut q, &mut limits, 1, 0);
            q.end_attempt(got[0], 1);
            order.extend(got);
        }
        let b: Vec<i64> = order.iter().copied().filter(|&id| id > 1000).collect();
        assert_eq!(
            b,
            (1001..=1010).collect::<Vec<_>>(),
            "admissions: {order:?}"
        );
        assert_eq!(order[0], 1001, "the key never served goes first");
    }

    #[test]
    fn cancel_strategies_pick_the_newest_waiting_or_the_oldest_overall() {
        let mut q = QueueState::new();
        q.set_rules(rule(2, Strategy::CancelNewest));
        q.add_arrivals((1..=2).map(|i| keyed(i, "a", "k")), (1, 2));
        let mut limits = RateLimits::default();
        assert_eq!(admit(&mut q, &mut limits, 10, 0), vec![1, 2]);
        q.add_arrivals([keyed(3, "a", "k"), keyed(4, "a", "other")], (2, 4));
        assert_eq!(victim_ids(&mut q), vec![3]);
        assert_eq!(q.ready_len(), 1);

        let mut q = QueueState::new();
        q.set_rules(rule(2, Strategy::CancelInProgress));
        q.add_arrivals((1..=2).map(|i| keyed(i, "a", "k")), (1, 2));
        assert_eq!(admit(&mut q, &mut limits, 10, 0), vec![1, 2]);
        q.add_arrivals([keyed(3, "a", "k")], (2, 3));
        assert_eq!(victim_ids(&mut q), vec![1], "the oldest running one");
        q.add_arrivals([keyed(4, "a", "k"), keyed(5, "a", "k")], (3, 5));
        assert_eq!(victim_ids(&mut q), vec![1, 2, 3]);
    }

    #[test]
    fn a_rate_limited_task_is_passed_over_and_its_refill_is_reported() {
        use crate::flow::Limit;
        let mut q = QueueState::new();
        let limited = |id: i64| Arrival {
            flow: Some(TaskFlow {
                concurrency_key: None,
                rates: vec![RateUse {
                    key: "r".into(),
                    units: 1,
                    dynamic_limit: None,
                }],
            }),
            ..arrival(id, "a", 1)
        };
        q.add_arrivals([limited(1), limited(2), arrival(3, "a", 1)], (1, 3));
        let mut limits = RateLimits::default();
        limits.set_declared(HashMap::from([(
            "r".to_string(),
            Limit {
                max_units: 1,
                per: 1_000_000,
            },
        )]));
        assert_eq!(admit(&mut q, &mut limits, 10, 0), vec![1, 3]);
        let set = q.candidates(&[("a".into(), 10)], &mut limits, 10);
        assert!(set.candidates.is_empty());
        let until = set.blocked_until.unwrap();
        assert!((1_000_000..1_002_000).contains(&until), "{until}");
        assert_eq!(admit(&mut q, &mut limits, 10, until), vec![2]);
    }
}
