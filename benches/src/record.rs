//! In-memory records of what the handlers did, so that recording adds no database work: how
//! often each input ran (the exactly-once check), when chosen executions happened (rates), and
//! when each input's handler started (pickup latency).

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::Result;

/// A counter that remembers when it reached every `step`-th value up to `last`, and its first.
pub struct Milestones {
    count: AtomicUsize,
    step: usize,
    first: OnceLock<Instant>,
    reached: Vec<OnceLock<Instant>>,
}

impl Milestones {
    /// Instants are kept for the multiples of `step` up to `last` (`last` itself included).
    pub fn new(last: usize, step: usize) -> Milestones {
        let step = step.max(1);
        Milestones {
            count: AtomicUsize::new(0),
            step,
            first: OnceLock::new(),
            reached: (0..last.div_ceil(step)).map(|_| OnceLock::new()).collect(),
        }
    }

    pub fn add(&self, n: usize, now: Instant) {
        if n == 0 {
            return;
        }
        self.first.get_or_init(|| now);
        let before = self.count.fetch_add(n, Ordering::AcqRel);
        // Every multiple of step crossed by this addition (one, except for batch additions).
        let mut k = before / self.step + 1;
        while k * self.step <= before + n {
            if let Some(slot) = self.reached.get(k - 1) {
                let _ = slot.set(now);
            }
            k += 1;
        }
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub fn first(&self) -> Option<Instant> {
        self.first.get().copied()
    }

    /// When the count reached `value` (a multiple of the step), if it has.
    pub fn at(&self, value: usize) -> Option<Instant> {
        if value == 0 || !value.is_multiple_of(self.step) {
            return None;
        }
        self.reached.get(value / self.step - 1)?.get().copied()
    }

    /// Waits until the count reaches `target`; fails when it stops moving for `stall`.
    pub async fn wait_for(&self, target: usize, stall: Duration, what: &str) -> Result<()> {
        let mut last = self.count();
        let mut last_progress = Instant::now();
        loop {
            let now = self.count();
            if now >= target {
                return Ok(());
            }
            if now != last {
                last = now;
                last_progress = Instant::now();
            } else if last_progress.elapsed() > stall {
                return Err(format!("{what}: stuck at {now} of {target} for {stall:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// What the handlers of one run executed, by input sequence number (0..n).
pub struct Recorder {
    runs: Vec<AtomicU32>,
    unknown: AtomicUsize,
    pub executions: Milestones,
    started: Option<Vec<OnceLock<Instant>>>,
}

impl Recorder {
    /// `n` inputs; execution instants kept at every `step`-th execution up to `watch_up_to`;
    /// with `per_input_start`, each input's first handler start instant too.
    pub fn new(n: usize, watch_up_to: usize, step: usize, per_input_start: bool) -> Recorder {
        Recorder {
            runs: (0..n).map(|_| AtomicU32::new(0)).collect(),
            unknown: AtomicUsize::new(0),
            executions: Milestones::new(watch_up_to, step),
            started: per_input_start.then(|| (0..n).map(|_| OnceLock::new()).collect()),
        }
    }

    /// Called by a handler when it starts on input `seq`.
    pub fn record(&self, seq: u64) {
        let now = Instant::now();
        match self.runs.get(seq as usize) {
            Some(runs) => {
                runs.fetch_add(1, Ordering::AcqRel);
                if let Some(started) = &self.started {
                    let _ = started[seq as usize].set(now);
                }
            }
            None => {
                self.unknown.fetch_add(1, Ordering::AcqRel);
            }
        }
        self.executions.add(1, now);
    }

    pub fn started(&self, seq: usize) -> Option<Instant> {
        self.started.as_ref()?.get(seq)?.get().copied()
    }

    /// The in-memory half of the exactly-once check. With `all_expected`, every input must
    /// have run once; otherwise (a run stopped early) none may have run twice.
    pub fn check(&self, all_expected: bool) -> ExecutionCheck {
        let mut check = ExecutionCheck {
            inputs: self.runs.len(),
            ran: 0,
            missing: 0,
            duplicated: 0,
            unknown: self.unknown.load(Ordering::Acquire),
            all_expected,
        };
        for runs in &self.runs {
            match runs.load(Ordering::Acquire) {
                0 => check.missing += 1,
                1 => check.ran += 1,
                k => {
                    check.ran += 1;
                    check.duplicated += (k - 1) as usize;
                }
            }
        }
        check
    }
}

/// How the executions compare with exactly once per input.
#[derive(Debug, Clone)]
pub struct ExecutionCheck {
    pub inputs: usize,
    /// Inputs that ran at least once.
    pub ran: usize,
    pub missing: usize,
    /// Executions beyond the first of an input.
    pub duplicated: usize,
    /// Executions of inputs this run never enqueued.
    pub unknown: usize,
    all_expected: bool,
}

impl ExecutionCheck {
    pub fn ok(&self) -> bool {
        self.duplicated == 0 && self.unknown == 0 && (!self.all_expected || self.missing == 0)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "inputs": self.inputs, "ran": self.ran, "missing": self.missing,
            "duplicated": self.duplicated, "unknown": self.unknown,
            "all_expected": self.all_expected,
        })
    }
}

/// Tasks per second for `count` events between two instants.
pub fn rate(count: usize, from: Instant, to: Instant) -> f64 {
    let seconds = to.saturating_duration_since(from).as_secs_f64();
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        f64::INFINITY
    }
}

/// Percentile (nearest rank) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
