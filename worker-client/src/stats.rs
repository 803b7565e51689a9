//! What a running worker has done, readable from outside it: for an application's metrics and
//! health checks ("no task ended for five minutes"), and for measuring a drain to the moment
//! its last ending committed without asking Postgres.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Counters of one worker, shared with it: clone freely, read at any time (`Worker::stats`).
/// Endings count once Postgres has committed them; an ending Postgres refused (a late or
/// duplicate one, fenced off) is not counted.
#[derive(Debug, Clone, Default)]
pub struct WorkerStats {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    started: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    last_ended_at: Mutex<Option<Instant>>,
}

impl WorkerStats {
    /// Handlers started (attempts this worker began to run).
    pub fn started(&self) -> u64 {
        self.shared.started.load(Ordering::Acquire)
    }

    /// Attempts recorded as succeeded: their completion (batched, or the handler's own
    /// transaction) committed.
    pub fn completed(&self) -> u64 {
        self.shared.completed.load(Ordering::Acquire)
    }

    /// Failures recorded (retryable or not): their `fail_many` committed.
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Acquire)
    }

    /// When the last completion or failure counted here committed (as the worker saw its
    /// answer), if any has.
    pub fn last_ended_at(&self) -> Option<Instant> {
        *self
            .shared
            .last_ended_at
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn add_started(&self) {
        self.shared.started.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn add_completed(&self, n: usize, at: Instant) {
        self.ended(&self.shared.completed, n, at);
    }

    pub(crate) fn add_failed(&self, n: usize, at: Instant) {
        self.ended(&self.shared.failed, n, at);
    }

    fn ended(&self, counter: &AtomicU64, n: usize, at: Instant) {
        if n == 0 {
            return;
        }
        // The instant first, so that a reader who sees the count sees an instant at least as
        // late as the ending it counts.
        *self
            .shared
            .last_ended_at
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(at);
        counter.fetch_add(n as u64, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_endings_and_keeps_the_last_instant() {
        let stats = WorkerStats::default();
        let other_handle = stats.clone();
        assert_eq!(
            (stats.started(), stats.completed(), stats.failed()),
            (0, 0, 0)
        );
        assert_eq!(stats.last_ended_at(), None);
        stats.add_started();
        stats.add_started();
        let first = Instant::now();
        stats.add_completed(2, first);
        stats.add_completed(0, first + std::time::Duration::from_secs(9));
        assert_eq!(other_handle.last_ended_at(), Some(first));
        let later = first + std::time::Duration::from_millis(3);
        other_handle.add_failed(1, later);
        assert_eq!(
            (stats.started(), stats.completed(), stats.failed()),
            (2, 2, 1)
        );
        assert_eq!(stats.last_ended_at(), Some(later));
    }
}
