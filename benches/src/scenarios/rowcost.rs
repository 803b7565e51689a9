//! rowcost: where a drained or enqueued task's server time goes, statement by statement. Not a
//! target of its own: the drain and the single enqueue are CPU-bound on the 2-core machine, and
//! this splits their gap to the baselines into the statements each task passes through.
//!
//! One connection at a time, no workers, no contention: the time of each statement as the
//! client sees it, per task.
//!   claim:    Sluice's `fetch_tasks` of the assignments the scheduler posted, 100 per call
//!             (one worker registered on this connection, slots for every task), against the
//!             batched baseline's `UPDATE ... SKIP LOCKED` claim of 100;
//!   complete: `complete_many` of 100 against the baseline's completion of 100;
//!   enqueue:  one `PreparedEnqueue` call per transaction against one bare INSERT per
//!             transaction into the baseline table.
//! Every statement is its own transaction with `synchronous_commit = off` on both sides: the
//! commit's wait for the disk is not CPU, and the drain and enqueue scenarios pay it alike.
//! Three paired rounds (Sluice, then the baseline); medians per statement.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_client::{EnqueueOptions, PreparedEnqueue};
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use super::{median, progress, Ctx, PAIRED_ROUNDS, STALL};
use crate::baseline::{self, Baseline, TABLE};
use crate::db;
use crate::report::{ratio, BenchResult, Report};
use crate::sluice_side::{self, BenchTask};
use crate::Result;

/// Tasks per round for claim and complete (every one posted to the single worker at once: the
/// scheduler's board holds 65,536).
const TASKS: usize = 20_000;
/// Single enqueues per round.
const ENQUEUES: usize = 5_000;
/// Tasks per claim and per completion, as the batched baseline takes them.
const BATCH: usize = baseline::BATCH_CLAIM;

/// Microseconds per task of each statement, and whether every task went through exactly once.
#[derive(Debug, Clone, Copy)]
struct Costs {
    claim_us: f64,
    complete_us: f64,
    enqueue_us: f64,
    ok: bool,
}

/// The statements measured, each against its baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Statement {
    Claim,
    Complete,
    Enqueue,
}

impl Costs {
    fn of(&self, statement: Statement) -> f64 {
        match statement {
            Statement::Claim => self.claim_us,
            Statement::Complete => self.complete_us,
            Statement::Enqueue => self.enqueue_us,
        }
    }
}

pub async fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let tasks = ctx.scale.tasks(TASKS);
    let enqueues = ctx.scale.tasks(ENQUEUES);
    let mut sluice_rounds = Vec::new();
    let mut batched_rounds = Vec::new();
    for round in 1..=PAIRED_ROUNDS {
        let sluice = db::retrying(&ctx.dsn, "rowcost sluice", || {
            sluice_costs(ctx, tasks, enqueues)
        })
        .await?;
        let batched = db::retrying(&ctx.dsn, "rowcost batched", || {
            baseline_costs(ctx, tasks, enqueues)
        })
        .await?;
        progress(
            &format!("round {round}"),
            &format!(
                "µs per task: claim {:.1} vs {:.1}, complete {:.1} vs {:.1}, enqueue {:.1} vs {:.1}",
                sluice.claim_us,
                batched.claim_us,
                sluice.complete_us,
                batched.complete_us,
                sluice.enqueue_us,
                batched.enqueue_us
            ),
        );
        sluice_rounds.push(sluice);
        batched_rounds.push(batched);
    }
    let rounds: Vec<Value> = sluice_rounds
        .iter()
        .zip(&batched_rounds)
        .map(|(s, b)| {
            json!({ "sluice": { "claim_us": s.claim_us, "complete_us": s.complete_us,
                                "enqueue_us": s.enqueue_us },
                    "baseline": { "claim_us": b.claim_us, "complete_us": b.complete_us,
                                  "enqueue_us": b.enqueue_us } })
        })
        .collect();
    let ok = sluice_rounds.iter().chain(&batched_rounds).all(|c| c.ok);
    for (statement, metric, sluice_shape, baseline_shape) in [
        (
            Statement::Claim,
            "claim_us_per_task",
            "fetch_tasks, 100 per call",
            "batched claim, 100 per statement",
        ),
        (
            Statement::Complete,
            "complete_us_per_task",
            "complete_many, 100 per call",
            "batched completion, 100 per statement",
        ),
        (
            Statement::Enqueue,
            "enqueue_us_per_task",
            "PreparedEnqueue, 1 per commit",
            "INSERT, 1 row per commit",
        ),
    ] {
        let sluice = median(sluice_rounds.iter().map(|c| c.of(statement)));
        let base = median(batched_rounds.iter().map(|c| c.of(statement)));
        // Sluice ÷ baseline: for a cost, lower is better. The enqueue's baseline is the bare
        // INSERT (vs_insert), the others the batched baseline.
        let enqueue = statement == Statement::Enqueue;
        let mut sluice_result =
            BenchResult::new("rowcost", "sluice", sluice_shape, metric, sluice, "us")
                .details(json!({ "tasks": tasks, "enqueues": enqueues, "rounds": rounds }))
                .ok(ok);
        if enqueue {
            sluice_result.vs_insert = ratio(sluice, base);
        } else {
            sluice_result.vs_batched = ratio(sluice, base);
        }
        let baseline = if enqueue { "insert" } else { "batched" };
        let base_result =
            BenchResult::new("rowcost", baseline, baseline_shape, metric, base, "us").ok(ok);
        report.add(sluice_result)?;
        report.add(base_result)?;
    }
    Ok(())
}

async fn sluice_costs(ctx: &Ctx, tasks: usize, enqueues: usize) -> Result<Costs> {
    let client = db::connect(&ctx.dsn).await?;
    client.batch_execute("SET synchronous_commit = off").await?;
    let task = sluice_side::define_fresh_task(&client, "rowcost").await?;
    let outcome = async {
        sluice_side::enqueue_range(&client, 0..tasks as u64).await?;
        let worker_id: i64 = client
            .query_one(
                "SELECT sluice.register_worker('bench_rowcost', ARRAY[$1], $2)",
                &[&task, &(tasks as i32)],
            )
            .await?
            .get(0);
        wait_posted(&client, worker_id, tasks).await?;

        let fetch = client
            .prepare("SELECT task_id, attempt FROM sluice.fetch_tasks($1, $2)")
            .await?;
        let mut claimed: Vec<(i64, i32)> = Vec::with_capacity(tasks);
        let started = Instant::now();
        while claimed.len() < tasks {
            let rows = client.query(&fetch, &[&worker_id, &(BATCH as i32)]).await?;
            if rows.is_empty() {
                return Err(format!("fetch_tasks returned nothing after {}", claimed.len()).into());
            }
            claimed.extend(
                rows.iter()
                    .map(|r| (r.get::<_, i64>(0), r.get::<_, i32>(1))),
            );
        }
        let claim_us = per_task(started.elapsed(), tasks);

        let complete = client
            .prepare_typed(
                "SELECT count(*) FROM sluice.complete_many($1, $2, $3, $4)",
                &[
                    Type::INT8,
                    Type::INT8_ARRAY,
                    Type::INT4_ARRAY,
                    Type::JSONB_ARRAY,
                ],
            )
            .await?;
        let mut completed = 0;
        let started = Instant::now();
        for chunk in claimed.chunks(BATCH) {
            let ids: Vec<i64> = chunk.iter().map(|c| c.0).collect();
            let attempts: Vec<i32> = chunk.iter().map(|c| c.1).collect();
            let outputs = vec![Value::Null; chunk.len()];
            let done: i64 = client
                .query_one(&complete, &[&worker_id, &ids, &attempts, &outputs])
                .await?
                .get(0);
            completed += done as usize;
        }
        let complete_us = per_task(started.elapsed(), tasks);
        client
            .execute("SELECT sluice.deregister_worker($1)", &[&worker_id])
            .await?;
        let counts = sluice_side::status_counts(&client, task).await?;
        let all_succeeded = counts.get("succeeded").copied() == Some(tasks as i64);

        let prepared = PreparedEnqueue::prepare(&client).await?;
        let started = Instant::now();
        for seq in 0..enqueues as u64 {
            prepared
                .enqueue::<BenchTask>(&client, &seq, &EnqueueOptions::default())
                .await?;
        }
        let enqueue_us = per_task(started.elapsed(), enqueues);
        let queued = sluice_side::status_counts(&client, task).await?;
        let all_enqueued = queued.get("queued").copied() == Some(enqueues as i64);

        Ok(Costs {
            claim_us,
            complete_us,
            enqueue_us,
            ok: completed == tasks && all_succeeded && all_enqueued,
        })
    }
    .await;
    sluice_side::cleanup(&ctx.dsn, task).await;
    outcome
}

/// Waits until the scheduler has posted every task to the worker, so that the claims time the
/// statement alone.
async fn wait_posted(client: &Client, worker_id: i64, tasks: usize) -> Result<()> {
    let deadline = Instant::now() + STALL;
    loop {
        let posted: i64 = client
            .query_one(
                "SELECT count(*) FROM sluice.posted_assignments() WHERE worker_id = $1",
                &[&worker_id],
            )
            .await?
            .get(0);
        if posted as usize >= tasks {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("only {posted} of {tasks} tasks posted to the worker").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn baseline_costs(ctx: &Ctx, tasks: usize, enqueues: usize) -> Result<Costs> {
    let client = db::connect(&ctx.dsn).await?;
    client.batch_execute("SET synchronous_commit = off").await?;
    baseline::recreate_table(&client).await?;
    baseline::insert_range(&client, 0..tasks as u64).await?;
    client
        .batch_execute(&format!("VACUUM (ANALYZE) {TABLE}"))
        .await?;

    let claim = client.prepare(&Baseline::Batched.claim_sql()).await?;
    let mut claimed: Vec<i64> = Vec::with_capacity(tasks);
    let started = Instant::now();
    while claimed.len() < tasks {
        let rows = client.query(&claim, &[]).await?;
        if rows.is_empty() {
            return Err(format!("the claim returned nothing after {}", claimed.len()).into());
        }
        claimed.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
    }
    let claim_us = per_task(started.elapsed(), tasks);

    let complete = client.prepare(&Baseline::Batched.complete_sql()).await?;
    let mut completed = 0;
    let started = Instant::now();
    for chunk in claimed.chunks(BATCH) {
        completed += client.execute(&complete, &[&chunk]).await? as usize;
    }
    let complete_us = per_task(started.elapsed(), tasks);
    let (_, done) = baseline::job_counts(&client).await?;

    let insert = client
        .prepare_typed(
            &format!("INSERT INTO {TABLE} (payload) VALUES ($1)"),
            &[Type::JSONB],
        )
        .await?;
    let started = Instant::now();
    for seq in 0..enqueues as u64 {
        client.execute(&insert, &[&Value::from(seq)]).await?;
    }
    let enqueue_us = per_task(started.elapsed(), enqueues);
    let (rows, _) = baseline::job_counts(&client).await?;

    Ok(Costs {
        claim_us,
        complete_us,
        enqueue_us,
        ok: completed == tasks && done == tasks as i64 && rows == (tasks + enqueues) as i64,
    })
}

fn per_task(elapsed: Duration, tasks: usize) -> f64 {
    elapsed.as_secs_f64() * 1e6 / tasks.max(1) as f64
}
