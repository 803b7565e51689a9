//! drain: a full queue of no-op tasks, then workers start; tasks/s from the first worker start
//! to the last completion. Several worker shapes per system; the best and the default shape
//! are reported.

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;

use super::{progress, Ctx, NOT_MEASURED, STALL};
use crate::baseline::{self, Baseline, BaselineWorkers, Wake};
use crate::db;
use crate::record::{rate, Milestones, Recorder};
use crate::report::{ratio, BenchResult, Report};
use crate::sluice_side::{self, Check, SluiceWorkers};
use crate::Result;

/// Sluice worker shapes: (workers, slots per worker; None = the client's default). 8 x 100 holds
/// as many tasks in flight as the batched baseline's default (8 connections x 100 per claim).
const SLUICE_SHAPES: [(usize, Option<i32>); 6] = [
    (4, None),
    (1, Some(100)),
    (2, Some(50)),
    (4, Some(25)),
    (8, Some(50)),
    (8, Some(100)),
];
const SLUICE_DEFAULT: (usize, Option<i32>) = (4, None);
const BASELINE_CONNECTIONS: [usize; 3] = [4, 8, 16];
const BASELINE_DEFAULT: usize = 8;
/// How long a baseline worker sleeps after finding the queue empty (only at the very end here).
const POLL_SLEEP: std::time::Duration = std::time::Duration::from_millis(10);

struct Run {
    system: &'static str,
    shape: String,
    is_default: bool,
    rate: f64,
    seconds: f64,
    check: Check,
}

pub async fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let n = ctx.scale.tasks(100_000);
    // For profiling one shape over and over (not a result: no baselines, nothing recorded):
    // SLUICE_BENCH_DRAIN_ONLY=<workers>x<slots>, e.g. 8x100.
    // SLUICE_BENCH_DRAIN_ONLY=batched8 / naive8: one baseline run with 8 connections.
    if let Ok(only) = std::env::var("SLUICE_BENCH_DRAIN_ONLY") {
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
    let mut runs = Vec::new();
    for (workers, slots) in SLUICE_SHAPES {
        let shape = super::sluice_shape(workers, slots);
        let outcome = db::retrying(&ctx.dsn, &format!("drain sluice {shape}"), || {
            sluice_drain(ctx, n, workers, slots, None)
        })
        .await;
        runs.push(finish(
            "sluice",
            shape,
            (workers, slots) == SLUICE_DEFAULT,
            outcome,
        ));
    }
    for kind in [Baseline::Naive, Baseline::Batched] {
        for connections in BASELINE_CONNECTIONS {
            let shape = format!("{connections} connections");
            let outcome = db::retrying(
                &ctx.dsn,
                &format!("drain {} {shape}", kind.system()),
                || baseline_drain(ctx, n, kind, connections),
            )
            .await;
            let is_default = connections == BASELINE_DEFAULT;
            runs.push(finish(kind.system(), shape, is_default, outcome));
        }
    }
    emit(report, n, &runs)
}

fn finish(
    system: &'static str,
    shape: String,
    is_default: bool,
    outcome: Result<(f64, f64, Check)>,
) -> Run {
    let (rate, seconds, check) = outcome.unwrap_or_else(|e| {
        (
            NOT_MEASURED,
            NOT_MEASURED,
            Check::failed(format!("run failed: {e}")),
        )
    });
    progress(
        &format!("{system} {shape}"),
        &format!(
            "{rate:.0} tasks/s{}",
            if check.ok { "" } else { "  CHECK FAILED" }
        ),
    );
    Run {
        system,
        shape,
        is_default,
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
        let stopped = workers.stop().await;
        let end = drained?;
        stopped?;
        let check = sluice_side::check(&client, task, &recorder, true).await?;
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
    let executions = recorder.check(true);
    let (jobs, done) = baseline::job_counts(&client).await?;
    let check = Check {
        ok: executions.ok() && jobs == n as i64 && done == n as i64,
        details: json!({ "executions": executions.to_json(), "jobs": jobs, "done": done }),
    };
    Ok((rate(n, start, end), (end - start).as_secs_f64(), check))
}

fn emit(report: &mut Report, n: usize, runs: &[Run]) -> Result<()> {
    fn of<'a>(runs: &'a [Run], system: &'static str) -> impl Iterator<Item = &'a Run> {
        runs.iter().filter(move |r| r.system == system)
    }
    let best = |system: &'static str| {
        of(runs, system)
            .filter(|r| r.rate.is_finite())
            .max_by(|a, b| a.rate.total_cmp(&b.rate))
    };
    let default = |system: &'static str| of(runs, system).find(|r| r.is_default);
    let all_shapes = |system: &'static str| {
        of(runs, system)
            .map(|r| json!({ "shape": r.shape, "rate": r.rate, "seconds": r.seconds, "ok": r.check.ok }))
            .collect::<Vec<_>>()
    };
    let system_ok = |system: &'static str| of(runs, system).all(|r| r.check.ok);
    for system in ["sluice", "naive", "batched"] {
        for (role, run) in [("best", best(system)), ("default", default(system))] {
            let Some(run) = run else { continue };
            let (naive, batched) = match role {
                "best" => (best("naive"), best("batched")),
                _ => (default("naive"), default("batched")),
            };
            let mut result = BenchResult::new(
                "drain",
                system,
                format!("{} ({role})", run.shape),
                "drain_rate",
                run.rate,
                "tasks/s",
            )
            .ok(system_ok(system))
            .details(json!({
                "tasks": n, "seconds": run.seconds, "check": run.check.details,
                "all_shapes": all_shapes(system),
            }));
            if system == "sluice" {
                result.vs_naive = naive.and_then(|b| ratio(run.rate, b.rate));
                result.vs_batched = batched.and_then(|b| ratio(run.rate, b.rate));
            }
            report.add(result)?;
        }
    }
    Ok(())
}
