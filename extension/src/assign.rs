//! Assignment planning: which runnable task goes to which worker.
//!
//! Pure Rust, no Postgres: the scheduler loads workers with free slots and the head of each
//! task name's queue, asks `plan` for the pairs, and applies them in one UPDATE.

use std::collections::HashMap;

/// A live worker and how many more tasks it can take now.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerCapacity {
    pub worker_id: i64,
    pub task_names: Vec<String>,
    pub free_slots: i32,
    /// Label name -> value (numbers as their JSON text).
    pub labels: HashMap<String, String>,
}

/// A worker label a task definition asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredLabel {
    pub label: String,
    pub value: String,
    /// Only workers with this label and value may run the task.
    pub required: bool,
    /// Otherwise: workers with it are preferred, by the sum of the matching weights.
    pub weight: i64,
}

/// Whether a worker may run a task asking for `desired`, and how well it fits (`None`: a
/// required label is missing).
fn fit(worker: &WorkerCapacity, desired: &[DesiredLabel]) -> Option<i64> {
    let mut score = 0;
    for d in desired {
        let matches = worker.labels.get(&d.label) == Some(&d.value);
        if d.required && !matches {
            return None;
        }
        if matches && !d.required {
            score += d.weight;
        }
    }
    Some(score)
}

/// A queued, runnable task.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub task_id: i64,
    /// Shared with the scheduler's queue (`crate::queue`): no copy per candidate.
    pub task_name: std::rc::Rc<str>,
    pub priority: i32,
    /// Round-robin order across concurrency keys: the n-th waiting task of its key has rank
    /// n (0 without a key), and `served` is when its key was last served (0: never, or no key).
    pub rank: u32,
    pub served: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    pub task_id: i64,
    pub worker_id: i64,
}

/// How many tasks of each name could be placed right now: the free slots of all workers that
/// serve it. The scheduler reads at most that many candidates per name.
pub fn demand(workers: &[WorkerCapacity]) -> Vec<(String, i32)> {
    let mut per_name: rustc_hash::FxHashMap<&str, i32> = Default::default();
    for w in workers.iter().filter(|w| w.free_slots > 0) {
        for name in &w.task_names {
            let slot = per_name.entry(name.as_str()).or_insert(0);
            *slot = slot.saturating_add(w.free_slots);
        }
    }
    let mut out: Vec<(String, i32)> = per_name
        .into_iter()
        .map(|(n, c)| (n.to_string(), c))
        .collect();
    out.sort();
    out
}

/// Places candidates on workers: highest priority first, then round robin across concurrency
/// keys (see `Candidate::rank`), then oldest (lowest id), each on a serving worker that has
/// the task's required labels: the one with the most weight of preferred labels, then the
/// most free slots (which spreads load evenly), then the lowest id; except that the previous
/// task's worker keeps a run going while it is nearly as free (see `run` below). Never gives a
/// worker more tasks than its free slots; a task no worker may take now stays out of the plan.
pub fn plan(
    workers: &[WorkerCapacity],
    candidates: &[Candidate],
    desired: &HashMap<String, Vec<DesiredLabel>>,
) -> Vec<Assignment> {
    let mut free: Vec<i32> = workers.iter().map(|w| w.free_slots.max(0)).collect();
    let mut serving: rustc_hash::FxHashMap<&str, Vec<usize>> = Default::default();
    for (i, w) in workers.iter().enumerate() {
        for name in &w.task_names {
            serving.entry(name.as_str()).or_default().push(i);
        }
    }

    let mut order: Vec<&Candidate> = candidates.iter().collect();
    order.sort_by_key(|c| (std::cmp::Reverse(c.priority), c.rank, c.served, c.task_id));

    // Consecutive candidates (by id, for equal priority) go to one worker in runs of about
    // an eighth of the largest free slot count, not one each in turn: tasks enqueued together
    // sit on the same heap pages, and workers that claim and complete interleaved rows contend
    // for every page's lock (half of a 4 x 250 drain's tasks alternated workers row by row).
    // A run is short next to the slots, so load still spreads; with a handful of free slots,
    // or one task at a time, each task still goes to the freest worker.
    let run = workers
        .iter()
        .map(|w| w.free_slots)
        .max()
        .unwrap_or(0)
        .max(8)
        / 8;
    let mut previous: Option<usize> = None;
    let mut out = Vec::new();
    for c in order {
        let Some(indexes) = serving.get(&*c.task_name) else {
            continue;
        };
        let wanted = desired.get(&*c.task_name).map_or(&[][..], Vec::as_slice);
        let best = indexes
            .iter()
            .copied()
            .filter(|&i| free[i] > 0)
            .filter_map(|i| Some((i, fit(&workers[i], wanted)?)))
            .max_by(|&(a, fit_a), &(b, fit_b)| {
                fit_a
                    .cmp(&fit_b)
                    .then(free[a].cmp(&free[b]))
                    .then(workers[b].worker_id.cmp(&workers[a].worker_id))
            });
        // Keep a run going: the previous task's worker takes this one too while it fits as
        // well and has nearly as many free slots (within `run`) as the freest.
        let best = best.map(|(i, best_fit)| match previous {
            Some(p)
                if p != i
                    && free[p] > 0
                    && free[p] + run > free[i]
                    && indexes.contains(&p)
                    && fit(&workers[p], wanted) == Some(best_fit) =>
            {
                p
            }
            _ => i,
        });
        if let Some(i) = best {
            previous = Some(i);
            free[i] -= 1;
            out.push(Assignment {
                task_id: c.task_id,
                worker_id: workers[i].worker_id,
            });
        }
    }
    out
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn worker(id: i64, names: &[&str], free: i32) -> WorkerCapacity {
        WorkerCapacity {
            worker_id: id,
            task_names: names.iter().map(|s| s.to_string()).collect(),
            free_slots: free,
            labels: HashMap::new(),
        }
    }

    fn plan(workers: &[WorkerCapacity], candidates: &[Candidate]) -> Vec<Assignment> {
        super::plan(workers, candidates, &HashMap::new())
    }

    fn labelled(mut w: WorkerCapacity, labels: &[(&str, &str)]) -> WorkerCapacity {
        w.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        w
    }

    fn want(label: &str, value: &str, required: bool, weight: i64) -> DesiredLabel {
        DesiredLabel {
            label: label.into(),
            value: value.into(),
            required,
            weight,
        }
    }

    #[test]
    fn required_labels_filter_workers_and_preferred_ones_rank_them() {
        let w = [
            labelled(worker(1, &["a"], 9), &[("region", "eu")]),
            labelled(worker(2, &["a"], 1), &[("region", "eu"), ("gpu", "a100")]),
            labelled(worker(3, &["a"], 9), &[("region", "us"), ("gpu", "a100")]),
        ];
        let desired = HashMap::from([(
            "a".to_string(),
            vec![want("region", "eu", true, 1), want("gpu", "a100", false, 5)],
        )]);
        let c = [task(1, "a", 1), task(2, "a", 1), task(3, "a", 1)];
        // Worker 3 lacks the required region; worker 2 fits best until its slot is used.
        assert_eq!(
            pairs(&super::plan(&w, &c, &desired)),
            vec![(1, 2), (2, 1), (3, 1)]
        );
        // A required label no worker has: nothing is planned.
        let desired = HashMap::from([("a".to_string(), vec![want("region", "ap", true, 1)])]);
        assert!(super::plan(&w, &c, &desired).is_empty());
    }

    /// A plan as (task id, worker id) pairs, in assignment order.
    fn pairs(plan: &[Assignment]) -> Vec<(i64, i64)> {
        plan.iter().map(|a| (a.task_id, a.worker_id)).collect()
    }

    fn task(id: i64, name: &str, priority: i32) -> Candidate {
        Candidate {
            task_id: id,
            task_name: name.into(),
            priority,
            rank: 0,
            served: 0,
        }
    }

    #[test]
    fn demand_sums_free_slots_per_name() {
        let w = [
            worker(1, &["a", "b"], 2),
            worker(2, &["a"], 3),
            worker(3, &["c"], 0),
        ];
        assert_eq!(demand(&w), vec![("a".to_string(), 5), ("b".to_string(), 2)]);
    }

    #[test]
    fn highest_priority_then_oldest() {
        let w = [worker(1, &["a"], 2)];
        let c = [
            task(1, "a", 1),
            task(2, "a", 3),
            task(3, "a", 3),
            task(4, "a", 2),
        ];
        let got: Vec<i64> = plan(&w, &c).iter().map(|a| a.task_id).collect();
        assert_eq!(got, vec![2, 3]);
    }

    #[test]
    fn never_exceeds_free_slots() {
        let w = [worker(1, &["a"], 2), worker(2, &["a"], 1)];
        let c: Vec<Candidate> = (1..=10).map(|i| task(i, "a", 1)).collect();
        let p = plan(&w, &c);
        assert_eq!(p.len(), 3);
        assert_eq!(p.iter().filter(|a| a.worker_id == 1).count(), 2);
        assert_eq!(p.iter().filter(|a| a.worker_id == 2).count(), 1);
    }

    #[test]
    fn spreads_load_to_the_freest_worker() {
        let w = [worker(1, &["a"], 1), worker(2, &["a"], 3)];
        let c = [task(1, "a", 1), task(2, "a", 1)];
        let p = plan(&w, &c);
        assert_eq!(pairs(&p), vec![(1, 2), (2, 2)]);
    }

    #[test]
    fn consecutive_tasks_go_to_one_worker_in_runs() {
        // 4 workers with 64 free slots each: runs of 64 / 8 = 8 tasks, then the next worker.
        let w: Vec<WorkerCapacity> = (1..=4).map(|id| worker(id, &["a"], 64)).collect();
        let c: Vec<Candidate> = (1..=256).map(|i| task(i, "a", 1)).collect();
        let p = plan(&w, &c);
        assert_eq!(p.len(), 256);
        let switches = p
            .windows(2)
            .filter(|a| a[0].worker_id != a[1].worker_id)
            .count();
        assert!(switches <= 256 / 8, "{switches} switches between workers");
        for id in 1..=4 {
            assert_eq!(p.iter().filter(|a| a.worker_id == id).count(), 64);
        }
        // A few free slots each: every task still goes to the freest worker.
        let w: Vec<WorkerCapacity> = (1..=4).map(|id| worker(id, &["a"], 10)).collect();
        let c: Vec<Candidate> = (1..=4).map(|i| task(i, "a", 1)).collect();
        let mut got: Vec<i64> = plan(&w, &c).iter().map(|a| a.worker_id).collect();
        got.sort();
        assert_eq!(got, vec![1, 2, 3, 4]);
    }

    #[test]
    fn only_workers_serving_the_name() {
        let w = [worker(1, &["a"], 5), worker(2, &["b"], 5)];
        let c = [task(1, "b", 1), task(2, "a", 1), task(3, "z", 9)];
        let p = plan(&w, &c);
        assert_eq!(pairs(&p), vec![(1, 2), (2, 1)]);
    }

    #[test]
    fn priority_across_names_for_a_shared_worker() {
        let w = [worker(1, &["a", "b"], 1)];
        let c = [task(1, "a", 1), task(2, "b", 2)];
        assert_eq!(pairs(&plan(&w, &c)), vec![(2, 1)]);
    }

    #[test]
    fn full_or_negative_workers_get_nothing() {
        let w = [worker(1, &["a"], 0), worker(2, &["a"], -3)];
        assert!(plan(&w, &[task(1, "a", 1)]).is_empty());
    }
}
