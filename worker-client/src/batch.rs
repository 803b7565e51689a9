//! Buffering attempt endings so that many of them reach Postgres in one `complete_many` /
//! `fail_many` call instead of one round trip (and one commit) each.

use std::time::{Duration, Instant};

use serde_json::Value;

/// One attempt of one task, as the registration that ran it knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct AttemptKey {
    pub(crate) worker_id: i64,
    pub(crate) task_id: i64,
    pub(crate) attempt: i32,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Ending {
    Completed(Value),
    Failed { error: String, retryable: bool },
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PendingEnding {
    pub(crate) key: AttemptKey,
    pub(crate) ending: Ending,
}

/// The arrays of one `complete_many` and one `fail_many` call for one worker id.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct WorkerBatch {
    pub(crate) worker_id: i64,
    pub(crate) completed_ids: Vec<i64>,
    pub(crate) completed_attempts: Vec<i32>,
    pub(crate) outputs: Vec<Value>,
    pub(crate) failed_ids: Vec<i64>,
    pub(crate) failed_attempts: Vec<i32>,
    pub(crate) errors: Vec<String>,
    pub(crate) retryable: Vec<bool>,
}

/// Collects endings until `max` are pending or the oldest has waited `max_delay`.
#[derive(Debug)]
pub(crate) struct CompletionBatcher {
    max: usize,
    max_delay: Duration,
    pending: Vec<PendingEnding>,
    oldest: Option<Instant>,
}

impl CompletionBatcher {
    pub(crate) fn new(max: usize, max_delay: Duration) -> Self {
        CompletionBatcher {
            max: max.max(1),
            max_delay,
            pending: Vec::new(),
            oldest: None,
        }
    }

    pub(crate) fn push(&mut self, key: AttemptKey, ending: Ending, now: Instant) {
        if self.pending.is_empty() {
            self.oldest = Some(now);
        }
        self.pending.push(PendingEnding { key, ending });
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// When the pending endings must be flushed at the latest.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.oldest.map(|oldest| oldest + self.max_delay)
    }

    pub(crate) fn is_due(&self, now: Instant) -> bool {
        self.pending.len() >= self.max || self.deadline().is_some_and(|deadline| now >= deadline)
    }

    pub(crate) fn take(&mut self) -> Vec<PendingEnding> {
        self.oldest = None;
        std::mem::take(&mut self.pending)
    }

    /// Puts back endings whose flush failed, keeping them ahead of newer ones.
    pub(crate) fn restore(&mut self, mut endings: Vec<PendingEnding>, now: Instant) {
        if endings.is_empty() {
            return;
        }
        endings.append(&mut self.pending);
        self.pending = endings;
        self.oldest = Some(self.oldest.map_or(now, |oldest| oldest.min(now)));
    }
}

/// Splits endings into one batch per worker id (normally there is one; after a reconnect the
/// old registration's endings are still worth sending), in first-seen order.
pub(crate) fn group_by_worker(endings: &[PendingEnding]) -> Vec<WorkerBatch> {
    let mut batches: Vec<WorkerBatch> = Vec::new();
    for PendingEnding { key, ending } in endings {
        let index = match batches.iter().position(|b| b.worker_id == key.worker_id) {
            Some(index) => index,
            None => {
                batches.push(WorkerBatch {
                    worker_id: key.worker_id,
                    ..WorkerBatch::default()
                });
                batches.len() - 1
            }
        };
        let batch = &mut batches[index];
        match ending {
            Ending::Completed(output) => {
                batch.completed_ids.push(key.task_id);
                batch.completed_attempts.push(key.attempt);
                batch.outputs.push(output.clone());
            }
            Ending::Failed { error, retryable } => {
                batch.failed_ids.push(key.task_id);
                batch.failed_attempts.push(key.attempt);
                batch.errors.push(text_for_postgres(error));
                batch.retryable.push(*retryable);
            }
        }
    }
    batches
}

/// Postgres text cannot hold NUL characters; one in an error message must not make the whole
/// batch fail.
pub(crate) fn text_for_postgres(text: &str) -> String {
    if text.contains('\0') {
        text.replace('\0', "\\0")
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(worker_id: i64, task_id: i64, attempt: i32) -> AttemptKey {
        AttemptKey {
            worker_id,
            task_id,
            attempt,
        }
    }

    #[test]
    fn due_when_full() {
        let now = Instant::now();
        let mut batcher = CompletionBatcher::new(3, Duration::from_secs(60));
        assert!(!batcher.is_due(now));
        assert_eq!(batcher.deadline(), None);
        for task in 0..2 {
            batcher.push(key(1, task, 1), Ending::Completed(json!(task)), now);
        }
        assert!(!batcher.is_due(now));
        batcher.push(key(1, 2, 1), Ending::Completed(json!(2)), now);
        assert!(batcher.is_due(now));
        assert_eq!(batcher.take().len(), 3);
        assert!(batcher.is_empty());
        assert!(!batcher.is_due(now));
    }

    #[test]
    fn due_after_max_delay_of_the_oldest() {
        let start = Instant::now();
        let delay = Duration::from_millis(5);
        let mut batcher = CompletionBatcher::new(500, delay);
        batcher.push(key(1, 1, 1), Ending::Completed(Value::Null), start);
        batcher.push(
            key(1, 2, 1),
            Ending::Completed(Value::Null),
            start + Duration::from_millis(4),
        );
        assert_eq!(batcher.deadline(), Some(start + delay));
        assert!(!batcher.is_due(start + Duration::from_millis(4)));
        assert!(batcher.is_due(start + delay));
        batcher.take();
        assert_eq!(batcher.deadline(), None);
    }

    #[test]
    fn restore_keeps_order_and_the_earliest_deadline() {
        let start = Instant::now();
        let mut batcher = CompletionBatcher::new(500, Duration::from_millis(5));
        batcher.push(key(1, 1, 1), Ending::Completed(Value::Null), start);
        let failed_flush = batcher.take();
        let later = start + Duration::from_millis(50);
        batcher.push(key(1, 2, 1), Ending::Completed(Value::Null), later);
        batcher.restore(failed_flush, later);
        let ids: Vec<i64> = batcher.take().iter().map(|p| p.key.task_id).collect();
        assert_eq!(ids, [1, 2]);
    }

    #[test]
    fn zero_max_still_flushes_each_ending() {
        let now = Instant::now();
        let mut batcher = CompletionBatcher::new(0, Duration::from_secs(1));
        batcher.push(key(1, 1, 1), Ending::Completed(Value::Null), now);
        assert!(batcher.is_due(now));
    }

    #[test]
    fn groups_by_worker_and_splits_completions_from_failures() {
        let endings = vec![
            PendingEnding {
                key: key(7, 10, 1),
                ending: Ending::Completed(json!({"ok": true})),
            },
            PendingEnding {
                key: key(7, 11, 2),
                ending: Ending::Failed {
                    error: "boom\0".into(),
                    retryable: false,
                },
            },
            PendingEnding {
                key: key(3, 12, 1),
                ending: Ending::Failed {
                    error: "later".into(),
                    retryable: true,
                },
            },
            PendingEnding {
                key: key(7, 13, 1),
                ending: Ending::Completed(Value::Null),
            },
        ];
        let batches = group_by_worker(&endings);
        assert_eq!(batches.len(), 2);
        let first = &batches[0];
        assert_eq!(first.worker_id, 7);
        assert_eq!(first.completed_ids, [10, 13]);
        assert_eq!(first.completed_attempts, [1, 1]);
        assert_eq!(first.outputs, [json!({"ok": true}), Value::Null]);
        assert_eq!(first.failed_ids, [11]);
        assert_eq!(first.failed_attempts, [2]);
        assert_eq!(first.errors, ["boom\\0"]);
        assert_eq!(first.retryable, [false]);
        let second = &batches[1];
        assert_eq!(second.worker_id, 3);
        assert!(second.completed_ids.is_empty());
        assert_eq!(second.failed_ids, [12]);
        assert_eq!(second.retryable, [true]);
    }
}
