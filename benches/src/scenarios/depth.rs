//! depth: does a deep queue slow the drain down? The rate of the first 100,000 executions with
//! 1,000,000 tasks queued, against the rate of draining 10,000 queued; both measured from the
//! first execution to the last one counted, so worker start-up weighs on neither. The same for
//! the batched baseline.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use super::{progress, sluice_shape, Ctx, NOT_MEASURED, STALL};
use crate::baseline::{self, Baseline, BaselineWorkers, Wake};
use crate::db;
use crate::record::{rate, Milestones, Recorder};
use crate::report::{ratio, BenchResult, Report};
use crate::sluice_side::{self, Check, SluiceWorkers};
use crate::Result;

/// The throughput shape (the same number of server sessions for both systems).
const SLUICE_WORKERS: usize = 8;
const SLUICE_SLOTS: i32 = 50;
const BASELINE_CONNECTIONS: usize = 8;
const POLL_SLEEP: std::time::Duration = std::time::Duration::from_millis(10);

/// One drain measurement: `counted` executions out of `queued`.
struct Drain {
    queued: usize,
    counted: usize,
    rate: f64,
    /// How fast the queue was filled (context for the deep case).
    enqueue_rate: f64,
    check: Check,
}

impl Drain {
    fn failed(queued: usize, counted: usize, error: crate::Error) -> Drain {
        Drain {
            queued,
            counted,
            rate: NOT_MEASURED,
            enqueue_rate: NOT_MEASURED,
            check: Check::failed(format!("run failed: {error}")),
        }
    }

    fn to_json(&self) -> Value {
        json!({ "queued": self.queued, "counted": self.counted, "rate": self.rate,
                "enqueue_rate": self.enqueue_rate, "check": self.check.details })
    }
}

#[derive(Debug, Clone, Copy)]
enum System {
    Sluice,
    Batched,
}

pub async fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let shallow = ctx.scale.tasks(10_000);
    let deep = ctx.scale.tasks(1_000_000);
    let counted = ctx.scale.tasks(100_000);
    let mut measured = Vec::new();
    for system in [System::Sluice, System::Batched] {
        let mut pair = Vec::new();
        for (queued, count) in [(shallow, shallow), (deep, counted)] {
            let what = format!("depth {system:?} {queued} queued");
            let drain = db::retrying(&ctx.dsn, &what, || match system {
                System::Sluice => Box::pin(sluice_depth(ctx, queued, count))
                    as std::pin::Pin<Box<dyn std::future::Future<Output = Result<Drain>> + '_>>,
                System::Batched => Box::pin(batched_depth(ctx, queued, count)),
            })
            .await
            .unwrap_or_else(|e| Drain::failed(queued, count, e));
            progress(
                &what,
                &format!(
                    "{:.0} tasks/s over {} executions (filled at {:.0}/s)",
                    drain.rate, drain.counted, drain.enqueue_rate
                ),
            );
            pair.push(drain);
        }
        measured.push(pair);
    }
    let ratios: Vec<f64> = measured.iter().map(|p| p[1].rate / p[0].rate).collect();
    let shapes = [
        sluice_shape(SLUICE_WORKERS, Some(SLUICE_SLOTS)),
        format!("{BASELINE_CONNECTIONS} connections"),
    ];
    for (i, system) in ["sluice", "batched"].into_iter().enumerate() {
        let (shallow, deep) = (&measured[i][0], &measured[i][1]);
        let ok = shallow.check.ok && deep.check.ok;
        let details = json!({ "shallow": shallow.to_json(), "deep": deep.to_json() });
        let mut rate_line = BenchResult::new(
            "depth",
            system,
            shapes[i].clone(),
            "deep_drain_rate",
            deep.rate,
            "tasks/s",
        )
        .ok(ok)
        .details(details.clone());
        let mut ratio_line = BenchResult::new(
            "depth",
            system,
            shapes[i].clone(),
            "deep_vs_shallow",
            ratios[i],
            "x",
        )
        .ok(ok)
        .details(details);
        if i == 0 {
            rate_line.vs_batched = ratio(deep.rate, measured[1][1].rate);
            ratio_line.vs_batched = ratio(ratios[0], ratios[1]);
        }
        report.add(rate_line)?;
        report.add(ratio_line)?;
    }
    Ok(())
}

/// Rate from the first execution to the `count`-th.
fn execution_rate(executions: &Milestones, count: usize) -> Result<f64> {
    let first = executions.first().ok_or("nothing executed")?;
    let last = executions
        .at(count)
        .ok_or("the last counted execution has no instant")?;
    Ok(rate(count.saturating_sub(1), first, last))
}

async fn sluice_depth(ctx: &Ctx, queued: usize, count: usize) -> Result<Drain> {
    let client = db::connect(&ctx.dsn).await?;
    let task = sluice_side::define_fresh_task(&client, "depth").await?;
    let outcome = async {
        let filling = Instant::now();
        sluice_side::enqueue_range(&client, 0..queued as u64).await?;
        let enqueue_rate = rate(queued, filling, Instant::now());
        let recorder = Arc::new(Recorder::new(queued, count, count / 100, false));
        let workers = SluiceWorkers::start(
            &ctx.dsn,
            task,
            SLUICE_WORKERS,
            Some(SLUICE_SLOTS),
            &recorder,
        )?;
        let waited = recorder.executions.wait_for(count, STALL, "depth").await;
        let stopped = workers.stop().await;
        waited?;
        stopped?;
        let check = sluice_side::check(&client, task, &recorder, queued == count).await?;
        Ok(Drain {
            queued,
            counted: count,
            rate: execution_rate(&recorder.executions, count)?,
            enqueue_rate,
            check,
        })
    }
    .await;
    // The rest of a deep queue is deleted, not drained (cleanup only).
    sluice_side::cleanup(&ctx.dsn, task).await;
    outcome
}

async fn batched_depth(ctx: &Ctx, queued: usize, count: usize) -> Result<Drain> {
    let client = db::connect(&ctx.dsn).await?;
    baseline::recreate_table(&client).await?;
    let filling = Instant::now();
    baseline::insert_range(&client, 0..queued as u64).await?;
    let enqueue_rate = rate(queued, filling, Instant::now());
    let recorder = Arc::new(Recorder::new(queued, count, count / 100, false));
    let completions = Arc::new(Milestones::new(queued, queued));
    let workers = BaselineWorkers::start(
        &ctx.dsn,
        Baseline::Batched,
        BASELINE_CONNECTIONS,
        Wake::Poll(POLL_SLEEP),
        &recorder,
        &completions,
    )
    .await?;
    let waited = recorder.executions.wait_for(count, STALL, "depth").await;
    let stopped = workers.stop().await;
    waited?;
    stopped?;
    let executions = recorder.check(queued == count);
    let (jobs, done) = baseline::job_counts(&client).await?;
    let check = Check {
        ok: executions.ok() && jobs == queued as i64 && done == executions.ran as i64,
        details: json!({ "executions": executions.to_json(), "jobs": jobs, "done": done }),
    };
    Ok(Drain {
        queued,
        counted: count,
        rate: execution_rate(&recorder.executions, count)?,
        enqueue_rate,
        check,
    })
}
