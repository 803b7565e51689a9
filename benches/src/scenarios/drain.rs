//! drain: a full queue of no-op tasks, then workers start; tasks/s from the first worker start
//! to the last completion. Several worker shapes per system; the best and the default shape
//! are reported.

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;

use super::{median, progress, Ctx, NOT_MEASURED, PAIRED_ROUNDS, STALL};
use crate::baseline::{self, Baseline, BaselineWorkers, Wake};
use crate::db;
use crate::record::{rate, Milestones, Recorder};
use crate::report::{ratio, BenchResult, Report};
use crate::sluice_side::{self, Check, SluiceWorkers};
use crate::Result;

/// Sluice worker shapes: (workers, slots per worker; None = the client's default). 8 x 100 holds
/// as many tasks in flight as the batched baseline's default (8 connections x 100 per claim).
/// Fewer workers with more slots each do better on two cores: fewer backends compete for
/// them, and each fetch and completion carries more tasks.
const SLUICE_SHAPES: [(usize, Option<i32>); 6] = [
    (4, None),
    (1, Some(100)),
    (4, Some(25)),
    (8, Some(100)),
    (4, Some(250)),
    (2, Some(500)),
];
const SLUICE_DEFAULT: (usize, Option<i32>) = (4, None);
const BASELINE_CONNECTIONS: [usize; 3] = [4, 8, 16];
const BASELINE_DEFAULT: usize = 8;
/// How long a baseline worker sleeps after finding the queue empty (only at the very end here).
const POLL_SLEEP: std::time::Duration = std::time::Duration::from_millis(10);

struct Run {
    shape: Shape,
    /// A failed run of the best shapes' later rounds, kept only to fail the system's result.
    extra_round: bool,
    rate: f64,
    seconds: f64,
    check: Check,
}

impl Run {
    fn failed_round(self) -> Run {
        Run {
            extra_round: true,
            ..self
        }
    }
}

pub async fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let mut n = ctx.scale.tasks(100_000);
    // For profiling one shape over and over (not a result: no baselines, nothing recorded):
    // SLUICE_BENCH_DRAIN_ONLY=<workers>x<slots>, e.g. 8x100.
    // SLUICE_BENCH_DRAIN_ONLY=batched8 / naive8: one baseline run with 8 connections.
    // SLUICE_BENCH_DRAIN_TASKS=<n> with it: drain n tasks instead (a longer window to profile).
    if let Ok(only) = std::env::var("SLUICE_BENCH_DRAIN_ONLY") {
        if let Ok(tasks) = std::env::var("SLUICE_BENCH_DRAIN_TASKS") {
            n = tasks
                .parse()
                .map_err(|_| format!("SLUICE_BENCH_DRAIN_TASKS={tasks}: expected a count"))?;
        }
        for kind in [Baseline::Naive, Baseline::Batched] {
            if let Some(connections) = only.strip_prefix(kind.system()) {
                let connections = connections.parse().map_err(|_| {
                    format!(
                        "SLUICE_BENCH_DRAIN_ONLY={only}: expected {}<n>",
                        kind.system()
                    )
                })?;
                let (rate, seconds, check) = baseline_drain(ctx, n, kind, connections).await?;
                println!(
                    "  drain only {only}: {rate:.0} tasks/s in {seconds:.2} s, check ok: {}",
                    check.ok
                );
                return Ok(());
            }
        }
        let (workers, slots) = only
            .split_once('x')
            .and_then(|(w, s)| Some((w.parse().ok()?, s.parse().ok()?)))
            .ok_or(format!(
                "SLUICE_BENCH_DRAIN_ONLY={only}: expected <workers>x<slots>"
            ))?;
        let (rate, seconds, check) = sluice_drain(ctx, n, workers, Some(slots), None).await?;
        println!(
            "  drain only {only}: {rate:.0} tasks/s in {seconds:.2} s, check ok: {}",
            check.ok
        );
        return Ok(());
    }
    let mut shapes: Vec<Shape> = SLUICE_SHAPES
        .iter()
        .map(|&(workers, slots)| Shape::Sluice(workers, slots))
        .collect();
    for kind in [Baseline::Naive, Baseline::Batched] {
        shapes.extend(
            BASELINE_CONNECTIONS
                .iter()
                .map(|&c| Shape::Baseline(kind, c)),
        );
    }
    let mut runs = Vec::new();
    for shape in shapes {
        runs.push(run_shape(ctx, n, shape, "").await);
    }
    // The best shapes again, alternating systems (see PAIRED_ROUNDS); the sweep is round 1.
    // Sluice and the batched baseline run back to back, the slow naive one last.
    let best_shapes: Vec<Shape> = ["sluice", "batched", "naive"]
        .into_iter()
        .filter_map(|system| best_of(&runs, system).map(|r| r.shape))
        .collect();
    let mut rounds = vec![best_shapes
        .iter()
        .map(|shape| {
            let run = runs
                .iter()
                .find(|r| r.shape == *shape)
                .expect("a swept shape");
            (shape.system(), run.rate)
        })
        .collect::<Vec<_>>()];
    for round in 2..=PAIRED_ROUNDS {
        let mut rates = Vec::new();
        for &shape in &best_shapes {
            let run = run_shape(ctx, n, shape, &format!(", round {round}")).await;
            rates.push((shape.system(), run.rate));
            if !run.check.ok {
                // A failed exactly-once check fails the system's result, whatever the round.
                runs.push(run.failed_round());
            }
        }
        rounds.push(rates);
    }
    emit(report, n, &runs, &rounds)
}

/// A worker shape of one system.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    /// workers, slots per worker (None: the client's default)
    Sluice(usize, Option<i32>),
    /// the baseline, its connections
    Baseline(Baseline, usize),
}

impl Shape {
    fn system(self) -> &'static str {
        match self {
            Shape::Sluice(..) => "sluice",
            Shape::Baseline(kind, _) => kind.system(),
        }
    }

    fn label(self) -> String {
        match self {
            Shape::Sluice(workers, slots) => super::sluice_shape(workers, slots),
            Shape::Baseline(_, connections) => format!("{connections} connections"),
        }
    }

    fn is_default(self) -> bool {
        match self {
            Shape::Sluice(workers, slots) => (workers, slots) == SLUICE_DEFAULT,
            Shape::Baseline(_, connections) => connections == BASELINE_DEFAULT,
        }
    }
}

async fn run_shape(ctx: &Ctx, n: usize, shape: Shape, round: &str) -> Run {
    let what = format!("drain {} {}{round}", shape.system(), shape.label());
    let outcome = db::retrying(&ctx.dsn, &what, || async move {
        match shape {
            Shape::Sluice(workers, slots) => sluice_drain(ctx, n, workers, slots, None).await,
            Shape::Baseline(kind, connections) => baseline_drain(ctx, n, kind, connections).await,
        }
    })
    .await;
    finish(shape, round, outcome)
}

fn best_of<'a>(runs: &'a [Run], system: &'static str) -> Option<&'a Run> {
    runs.iter()
        .filter(|r| r.shape.system() == system && !r.extra_round && r.rate.is_finite())
        .max_by(|a, b| a.rate.total_cmp(&b.rate))
}

fn finish(shape: Shape, round: &str, outcome: Result<(f64, f64, Check)>) -> Run {
    let (rate, seconds, check) = outcome.unwrap_or_else(|e| {
        (
            NOT_MEASURED,
            NOT_MEASURED,
            Check::failed(format!("run failed: {e}")),
        )
    });
    progress(
        &format!("{} {}{round}", shape.system(), shape.label()),
        &format!(
            "{rate:.0} tasks/s{}",
            if check.ok { "" } else { "  CHECK FAILED" }
        ),
    );
    Run {
        shape,
        extra_round: false,
        rate,
        seconds,
        check,
    }
}

/// Enqueues `n` tasks, starts the workers, and times until every task succeeded in the
/// database. `definition_sql`: more `sluice.define_task` arguments for the task (SQL text
/// starting with a comma), such as flow control. Returns (tasks/s, seconds, check).
pub(super) async fn sluice_drain(
    ctx: &Ctx,
    n: usize,
    workers: usize,
    slots: Option<i32>,
    definition_sql: Option<&str>,
) -> Result<(f64, f64, Check)> {
    let client = db::connect(&ctx.dsn).await?;
    let task = sluice_side::define_fresh_task(&client, "drain").await?;
    let outcome = async {
        if let Some(extra) = definition_sql {
            client
                .execute(
                    &format!("SELECT sluice.define_task($1, schedule_timeout => '1 hour' {extra})"),
                    &[&task],
                )
                .await?;
        }
        sluice_side::enqueue_range(&client, 0..n as u64).await?;
        let recorder = Arc::new(Recorder::new(n, n, n / 100, false));
        let start = Instant::now();
        let workers = SluiceWorkers::start(&ctx.dsn, task, workers, slots, &recorder)?;
        let drained = async {
            recorder.executions.wait_for(n, STALL, "drain").await?;
            // The last completions are batched by the workers: done when the database says so.
            sluice_side::wait_all_finished(&client, task, STALL).await
        }
        .await;
        let end = drained.map(|db_end| workers.all_completed_at(n).unwrap_or(db_end));
        let stopped = workers.stop().await;
        let end = end?;
        stopped?;
        let check = sluice_side::check(&client, task, &recorder, true).await?;
        print_timeline(&recorder, n, start, end);
        Ok((rate(n, start, end), (end - start).as_secs_f64(), check))
    }
    .await;
    sluice_side::cleanup(&ctx.dsn, task).await;
    outcome
}

/// The same for a baseline: times until the last completion committed.
async fn baseline_drain(
    ctx: &Ctx,
    n: usize,
    kind: Baseline,
    connections: usize,
) -> Result<(f64, f64, Check)> {
    let client = db::connect(&ctx.dsn).await?;
    baseline::recreate_table(&client).await?;
    baseline::insert_range(&client, 0..n as u64).await?;
    let recorder = Arc::new(Recorder::new(n, n, n / 100, false));
    let completions = Arc::new(Milestones::new(n, n / 100));
    let start = Instant::now();
    let workers = BaselineWorkers::start(
        &ctx.dsn,
        kind,
        connections,
        Wake::Poll(POLL_SLEEP),
        &recorder,
        &completions,
    )
    .await?;
    let drained = completions.wait_for(n, STALL, "drain").await;
    let stopped = workers.stop().await;
    drained?;
    stopped?;
    let end = completions
        .at(n)
        .ok_or("the last completion has no instant")?;
    print_timeline(&recorder, n, start, end);
    let executions = recorder.check(true);
    let (jobs, done) = baseline::job_counts(&client).await?;
    let check = Check {
        ok: executions.ok() && jobs == n as i64 && done == n as i64,
        details: json!({ "executions": executions.to_json(), "jobs": jobs, "done": done }),
    };
    Ok((rate(n, start, end), (end - start).as_secs_f64(), check))
}

/// With SLUICE_BENCH_DRAIN_TIMELINE set: when the first task, 1%, 10%, ... and the last
/// started, and the end, in ms from the start (where a drain loses time: its start, its middle
/// or its end).
fn print_timeline(recorder: &Recorder, n: usize, start: Instant, end: Instant) {
    if std::env::var_os("SLUICE_BENCH_DRAIN_TIMELINE").is_none() {
        return;
    }
    let ms = |at: Option<Instant>| at.map_or(f64::NAN, |at| (at - start).as_secs_f64() * 1000.0);
    let started = &recorder.executions;
    let marks: Vec<String> = [1, 10, 50, 90, 99, 100]
        .iter()
        .map(|&pct| format!("{pct}% {:.1}", ms(started.at(n * pct / 100))))
        .collect();
    eprintln!(
        "  timeline (ms since start): first {:.1}, {}, end {:.1}",
        ms(started.first()),
        marks.join(", "),
        ms(Some(end))
    );
}

fn emit(report: &mut Report, n: usize, runs: &[Run], rounds: &[Vec<(&str, f64)>]) -> Result<()> {
    fn of<'a>(runs: &'a [Run], system: &'static str) -> impl Iterator<Item = &'a Run> {
        runs.iter().filter(move |r| r.shape.system() == system)
    }
    let swept = |system: &'static str| of(runs, system).filter(|r| !r.extra_round);
    let default = |system: &'static str| swept(system).find(|r| r.shape.is_default());
    let all_shapes = |system: &'static str| {
        swept(system)
            .map(|r| json!({ "shape": r.shape.label(), "rate": r.rate, "seconds": r.seconds, "ok": r.check.ok }))
            .collect::<Vec<_>>()
    };
    let system_ok = |system: &'static str| of(runs, system).all(|r| r.check.ok);
    let round_rate = |round: &Vec<(&str, f64)>, system: &str| {
        round
            .iter()
            .find(|(s, _)| *s == system)
            .map_or(NOT_MEASURED, |(_, rate)| *rate)
    };
    // Best shapes: the median over the rounds, and the median of the rounds' ratios.
    let best_rate = |system: &str| median(rounds.iter().map(|r| round_rate(r, system)));
    let best_ratio = |baseline: &str| {
        let ratios = rounds
            .iter()
            .filter_map(|r| ratio(round_rate(r, "sluice"), round_rate(r, baseline)));
        Some(median(ratios)).filter(|r| r.is_finite())
    };
    for system in ["sluice", "naive", "batched"] {
        for role in ["best", "default"] {
            let run = match role {
                "best" => best_of(runs, system),
                _ => default(system),
            };
            let Some(run) = run else { continue };
            let (value, mut details) = match role {
                "best" => (
                    best_rate(system),
                    json!({
                        "value": "median over the rounds of the best shape (round 1: the sweep); \
                                  vs_* are the medians of the rounds' ratios",
                        "rounds": rounds.iter().map(|r| round_rate(r, system)).collect::<Vec<_>>(),
                    }),
                ),
                _ => (run.rate, json!({})),
            };
            details["tasks"] = json!(n);
            details["seconds"] = json!(run.seconds);
            details["check"] = run.check.details.clone();
            details["all_shapes"] = json!(all_shapes(system));
            let mut result = BenchResult::new(
                "drain",
                system,
                format!("{} ({role})", run.shape.label()),
                "drain_rate",
                value,
                "tasks/s",
            )
            .ok(system_ok(system))
            .details(details);
            if system == "sluice" {
                match role {
                    "best" => {
                        result.vs_naive = best_ratio("naive");
                        result.vs_batched = best_ratio("batched");
                    }
                    _ => {
                        result.vs_naive = default("naive").and_then(|b| ratio(run.rate, b.rate));
                        result.vs_batched =
                            default("batched").and_then(|b| ratio(run.rate, b.rate));
                    }
                }
            }
            report.add(result)?;
        }
    }
    Ok(())
}
