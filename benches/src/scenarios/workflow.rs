//! workflow: the cost of DAG workflows (issue 5). 10,000 runs of a 4-step diamond
//! (a -> b, c -> d) queued, then 8 workers x 50 slots start; step transitions per second
//! (40,000 steps from the first worker start until every run has succeeded) against the plain
//! drain of 40,000 tasks with the same shape, run before and after (mean of the two).
//! Exactly once: every (run, step) executed once, every run and every step succeeded.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_client::{define_task, StepInput, TaskDefinition, TaskError, TaskOptions, Worker};
use tokio::sync::watch;

use super::{drain, progress, sluice_shape, Ctx, STALL};
use crate::db;
use crate::record::rate;
use crate::report::{BenchResult, Report};
use crate::Result;

const WORKERS: usize = 8;
const SLOTS: i32 = 50;
const STEPS_PER_RUN: usize = 4;
/// Runs started per `run_workflow` statement (one transaction each) while queueing.
const START_BATCH: usize = 1_000;

/// The step task; its name is chosen per run (see `sluice_side::BenchTask`).
static STEP_TASK: RwLock<&str> = RwLock::new("sluice_bench_unset");
struct BenchStep;
impl TaskDefinition for BenchStep {
    const NAME: &'static str = "sluice_bench_unset";
    type Input = StepInput<Value>;
    type Output = ();
    fn name() -> &'static str {
        *STEP_TASK.read().unwrap_or_else(|e| e.into_inner())
    }
}

pub async fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let runs = ctx.scale.tasks(10_000);
    let steps = runs * STEPS_PER_RUN;
    let shape = sluice_shape(WORKERS, Some(SLOTS));
    let mut plain = Vec::new();
    let mut ok = true;
    let mut measured = None;
    for which in ["plain", "workflow", "plain"] {
        let what = format!("workflow scenario: {which} {shape}");
        if which == "plain" {
            match db::retrying(&ctx.dsn, &what, || {
                drain::sluice_drain(ctx, steps, WORKERS, Some(SLOTS), None)
            })
            .await
            {
                Ok((r, _, check)) => {
                    ok &= check.ok;
                    progress(
                        &format!("sluice plain drain {shape}"),
                        &format!("{r:.0} tasks/s"),
                    );
                    plain.push(r);
                }
                Err(e) => {
                    ok = false;
                    progress(&what, &format!("run failed: {e}"));
                }
            }
        } else {
            match db::retrying(&ctx.dsn, &what, || diamonds(ctx, runs)).await {
                Ok(m) => {
                    ok &= m.ok;
                    progress(
                        &format!("sluice diamonds {shape}"),
                        &format!("{:.0} step transitions/s", m.rate),
                    );
                    measured = Some(m);
                }
                Err(e) => {
                    ok = false;
                    progress(&what, &format!("run failed: {e}"));
                }
            }
        }
    }
    let plain_rate = plain.iter().sum::<f64>() / plain.len().max(1) as f64;
    let (rate, details) = match &measured {
        Some(m) => (m.rate, m.details.clone()),
        None => (f64::NAN, Value::Null),
    };
    report.add(
        BenchResult::new(
            "workflow",
            "sluice",
            format!("{shape}, {runs} runs of a 4-step diamond"),
            "steps_vs_plain",
            rate / plain_rate,
            "x",
        )
        .ok(ok && measured.is_some())
        .details(json!({
            "runs": runs, "step_rate": rate, "plain_rates": plain, "plain_mean": plain_rate,
            "check": details,
        })),
    )?;
    Ok(())
}

struct Diamonds {
    rate: f64,
    ok: bool,
    details: Value,
}

async fn diamonds(ctx: &Ctx, runs: usize) -> Result<Diamonds> {
    let client = db::connect(&ctx.dsn).await?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() % 100_000_000)
        .unwrap_or(0);
    let task: &'static str =
        Box::leak(format!("bench_step_{}_{stamp}", std::process::id()).into_boxed_str());
    let workflow = format!("bench_diamond_{}_{stamp}", std::process::id());
    define_task(
        &client,
        task,
        &TaskOptions {
            schedule_timeout: Some(Duration::from_secs(3600)),
            ..TaskOptions::default()
        },
    )
    .await?;
    *STEP_TASK.write().unwrap_or_else(|e| e.into_inner()) = task;
    let spec = json!({"steps": [
        {"name": "a", "task": task},
        {"name": "b", "task": task, "parents": ["a"]},
        {"name": "c", "task": task, "parents": ["a"]},
        {"name": "d", "task": task, "parents": ["b", "c"]}]});
    client
        .execute("SELECT sluice.define_workflow($1, $2)", &[&workflow, &spec])
        .await?;
    let outcome = async {
        for start in (0..runs).step_by(START_BATCH) {
            let end = (start + START_BATCH).min(runs) as i64;
            client
                .execute(
                    "SELECT sluice.run_workflow($1, jsonb_build_object('seq', g))
                       FROM generate_series($2::bigint, $3::bigint - 1) g",
                    &[&workflow, &(start as i64), &end],
                )
                .await?;
        }
        // Every execution, by task id: a duplicate is a step run twice.
        let seen: Arc<Mutex<(HashSet<i64>, usize)>> = Arc::default();
        let (stop, stopped) = watch::channel(false);
        let started = Instant::now();
        let mut handles = Vec::new();
        for i in 0..WORKERS {
            let seen = Arc::clone(&seen);
            let worker = Worker::builder(ctx.dsn.as_str())
                .name(format!("bench_diamond_{i}"))
                .slots(SLOTS)
                .task::<BenchStep, _, _>(move |ctx, _input: StepInput<Value>| {
                    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                    if !seen.0.insert(ctx.task_id()) {
                        seen.1 += 1;
                    }
                    std::future::ready(Ok::<(), TaskError>(()))
                })
                .build()?;
            let mut stopped = stopped.clone();
            handles.push(tokio::spawn(worker.run_until(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })));
        }
        let finished = wait_runs_finished(&client, &workflow, runs).await;
        let _ = stop.send(true);
        for handle in handles {
            handle.await??;
        }
        let end = finished?;
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE r.status = 'succeeded'),
                        (SELECT count(*) FROM sluice.workflow_step w
                          WHERE w.run_id = ANY(array_agg(r.id)) AND w.status = 'succeeded')
                   FROM sluice.workflow_run r WHERE r.workflow = $1",
                &[&workflow],
            )
            .await?;
        let (runs_ok, steps_ok): (i64, i64) = (row.get(0), row.get(1));
        let (executed, duplicates) = {
            let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            (seen.0.len(), seen.1)
        };
        let steps = runs * STEPS_PER_RUN;
        let ok = runs_ok == runs as i64
            && steps_ok == steps as i64
            && executed == steps
            && duplicates == 0;
        Ok(Diamonds {
            rate: rate(steps, started, end),
            ok,
            details: json!({"runs_succeeded": runs_ok, "steps_succeeded": steps_ok,
                            "steps_executed": executed, "duplicate_executions": duplicates}),
        })
    }
    .await;
    // Cleanup: the runs, their steps and tasks, the definitions.
    let _ = client
        .batch_execute(&format!(
            "DELETE FROM sluice.task_run WHERE task_name = '{task}';
             DELETE FROM sluice.workflow_run WHERE workflow = '{workflow}';
             DELETE FROM sluice.workflow_definition WHERE name = '{workflow}';
             DELETE FROM sluice.task_definition WHERE name = '{task}';"
        ))
        .await;
    outcome
}

/// Waits until `runs` runs of the workflow have finished; returns when the last one did.
async fn wait_runs_finished(
    client: &tokio_postgres::Client,
    workflow: &str,
    runs: usize,
) -> Result<Instant> {
    let mut last = (0, Instant::now());
    loop {
        let done: i64 = client
            .query_one(
                "SELECT count(*) FROM sluice.workflow_run
                  WHERE workflow = $1 AND status <> 'running'",
                &[&workflow],
            )
            .await?
            .get(0);
        if done as usize >= runs {
            return Ok(Instant::now());
        }
        if done != last.0 {
            last = (done, Instant::now());
        } else if last.1.elapsed() > STALL {
            return Err(format!("workflow runs stalled at {done} of {runs} finished").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
