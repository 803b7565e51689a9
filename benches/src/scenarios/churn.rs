//! churn: 2,000,000 tasks through the system, one producer enqueueing batches of 1,000 while
//! workers drain, keeping the backlog near 20,000. Reported: the drain rate over the last 10%
//! of executions against the first 10%, and the sizes of every table and index before and
//! after. Run twice: normally, and with another session holding a transaction (and so the
//! xmin horizon) open for the whole run, which keeps vacuum from removing anything. The
//! batched baseline goes through the same. During the Sluice runs succeeded tasks are kept
//! for `RETENTION_S` (sluice.succeeded_task_retention); the baseline keeps every job.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_postgres::Client;

use super::{progress, relation_sizes, sluice_shape, Ctx, NOT_MEASURED, STALL};
use crate::baseline::{self, Baseline, BaselineWorkers, BulkInsert, Wake};
use crate::db;
use crate::record::{rate, Milestones, Recorder};
use crate::report::{ratio, BenchResult, Report};
use crate::sluice_side::{self, Check, SluiceWorkers, ENQUEUE_BATCH};
use crate::Result;

/// The throughput shape (the same number of server sessions for both systems).
const SLUICE_WORKERS: usize = 8;
const SLUICE_SLOTS: i32 = 50;
const BASELINE_CONNECTIONS: usize = 8;
const POLL_SLEEP: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Sluice,
    Batched,
}

struct Churn {
    first_rate: f64,
    last_rate: f64,
    overall_rate: f64,
    sizes_before: Value,
    /// When half the executions were done.
    sizes_halfway: Value,
    /// At every tenth of the executions: the schema's size and task table's row counts.
    curve: Value,
    sizes_after: Value,
    held: Value,
    check: Check,
}

impl Churn {
    fn failed(error: crate::Error) -> Churn {
        Churn {
            first_rate: NOT_MEASURED,
            last_rate: NOT_MEASURED,
            overall_rate: NOT_MEASURED,
            sizes_before: Value::Null,
            sizes_halfway: Value::Null,
            curve: Value::Null,
            sizes_after: Value::Null,
            held: Value::Null,
            check: Check::failed(format!("run failed: {error}")),
        }
    }

    fn end_vs_start(&self) -> f64 {
        self.last_rate / self.first_rate
    }

    /// How much the schema's tables (with their indexes) grew during the run.
    fn growth_mb(&self) -> f64 {
        (total_bytes(&self.sizes_after) - total_bytes(&self.sizes_before)) / 1_048_576.0
    }

    /// How much of that growth came in the second half of the run: about half for a table
    /// that keeps every task, little for one whose size levels off.
    fn second_half_share(&self) -> f64 {
        let second = total_bytes(&self.sizes_after) - total_bytes(&self.sizes_halfway);
        second / (self.growth_mb() * 1_048_576.0)
    }
}

fn total_bytes(sizes: &Value) -> f64 {
    sizes["total_bytes"].as_f64().unwrap_or(NOT_MEASURED)
}

pub async fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    // For showing where sizes level off (not a result of the suite's shape): a longer run with
    // SLUICE_BENCH_CHURN_TASKS, and only Sluice's run without a held transaction with
    // SLUICE_BENCH_CHURN_ONLY=sluice.
    let total = match std::env::var("SLUICE_BENCH_CHURN_TASKS") {
        Ok(n) => n
            .parse()
            .map_err(|e| format!("SLUICE_BENCH_CHURN_TASKS={n}: {e}"))?,
        Err(_) if ctx.scale.quick => 100_000,
        Err(_) => 2_000_000,
    };
    let only_sluice = std::env::var("SLUICE_BENCH_CHURN_ONLY").is_ok_and(|v| v == "sluice");
    let backlog = ctx.scale.tasks(20_000).max(2 * ENQUEUE_BATCH);
    let holds: &[bool] = if only_sluice {
        &[false]
    } else {
        &[false, true]
    };
    for &hold in holds {
        let variant = if hold { ", xact held open" } else { "" };
        let mut results = Vec::new();
        let systems: &[System] = if only_sluice {
            &[System::Sluice]
        } else {
            &[System::Sluice, System::Batched]
        };
        for &system in systems {
            let what = format!("churn {system:?}{variant}");
            let churn = db::retrying(&ctx.dsn, &what, || churn(ctx, system, total, backlog, hold))
                .await
                .unwrap_or_else(Churn::failed);
            progress(
                &what,
                &format!(
                    "first 10% {:.0}/s, last 10% {:.0}/s, schema {:.1} MB -> {:.1} MB (halfway) -> {:.1} MB",
                    churn.first_rate,
                    churn.last_rate,
                    total_bytes(&churn.sizes_before) / 1_048_576.0,
                    total_bytes(&churn.sizes_halfway) / 1_048_576.0,
                    total_bytes(&churn.sizes_after) / 1_048_576.0
                ),
            );
            for point in churn.curve.as_array().into_iter().flatten() {
                progress(&what, &point.to_string());
            }
            results.push(churn);
        }
        if results.len() < 2 {
            results.push(Churn::failed("not run (SLUICE_BENCH_CHURN_ONLY)".into()));
        }
        let (sluice, batched) = (&results[0], &results[1]);
        let shapes = [
            format!(
                "{}{variant}",
                sluice_shape(SLUICE_WORKERS, Some(SLUICE_SLOTS))
            ),
            format!("{BASELINE_CONNECTIONS} connections{variant}"),
        ];
        for (i, (system, churn)) in [("sluice", sluice), ("batched", batched)]
            .into_iter()
            .enumerate()
        {
            let details = json!({
                "tasks": total, "backlog_target": backlog,
                "first_10pct_rate": churn.first_rate, "last_10pct_rate": churn.last_rate,
                "overall_rate": churn.overall_rate, "held_transaction": churn.held,
                "growth_bytes_per_task": churn.growth_mb() * 1_048_576.0 / total as f64,
                "second_half_growth_share": churn.second_half_share(),
                "sizes_before": churn.sizes_before, "sizes_halfway": churn.sizes_halfway,
                "curve": churn.curve,
                "sizes_after": churn.sizes_after,
                "check": churn.check.details,
            });
            let mut ratio_line = BenchResult::new(
                "churn",
                system,
                shapes[i].clone(),
                "end_vs_start",
                churn.end_vs_start(),
                "x",
            )
            .ok(churn.check.ok)
            .details(details.clone());
            let mut size_line = BenchResult::new(
                "churn",
                system,
                shapes[i].clone(),
                "schema_growth",
                churn.growth_mb(),
                "MB",
            )
            .ok(churn.check.ok)
            .details(details.clone());
            let share_line = BenchResult::new(
                "churn",
                system,
                shapes[i].clone(),
                "second_half_growth_share",
                churn.second_half_share(),
                "x",
            )
            .ok(churn.check.ok)
            .details(details);
            if i == 0 {
                ratio_line.vs_batched = ratio(sluice.end_vs_start(), batched.end_vs_start());
                size_line.vs_batched = ratio(sluice.growth_mb(), batched.growth_mb());
            }
            report.add(ratio_line)?;
            report.add(size_line)?;
            report.add(share_line)?;
        }
    }
    Ok(())
}

/// A session that keeps a transaction with an xid open, so that no row version deleted after
/// it started can be vacuumed away.
struct HeldTransaction {
    client: Client,
    pid: i32,
}

impl HeldTransaction {
    async fn open(dsn: &str) -> Result<HeldTransaction> {
        let client = db::connect(dsn).await?;
        client
            .batch_execute("BEGIN; SELECT txid_current();")
            .await?;
        let pid = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0);
        Ok(HeldTransaction { client, pid })
    }

    /// What pg_stat_activity says about it (seen from another session); fails unless it still
    /// holds an xid and an xmin, idle in transaction.
    async fn observe(&self, observer: &Client) -> Result<Value> {
        let row = observer
            .query_opt(
                "SELECT state, backend_xid::text, backend_xmin::text, xact_start::text
                   FROM pg_stat_activity WHERE pid = $1",
                &[&self.pid],
            )
            .await?
            .ok_or("the session holding the transaction is gone")?;
        let (state, xid, xmin, since): (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        ) = (row.get(0), row.get(1), row.get(2), row.get(3));
        if xid.is_none() && xmin.is_none() {
            return Err(format!("the held transaction holds nothing (state {state:?})").into());
        }
        Ok(json!({ "pid": self.pid, "state": state, "backend_xid": xid,
                   "backend_xmin": xmin, "xact_start": since }))
    }

    async fn release(self) -> Result<()> {
        self.client.batch_execute("ROLLBACK").await?;
        Ok(())
    }
}

async fn churn(
    ctx: &Ctx,
    system: System,
    total: usize,
    backlog: usize,
    hold: bool,
) -> Result<Churn> {
    let client = db::connect(&ctx.dsn).await?;
    let (schema, task) = match system {
        System::Sluice => (
            "sluice",
            Some(sluice_side::define_fresh_task(&client, "churn").await?),
        ),
        System::Batched => {
            baseline::recreate_table(&client).await?;
            ("sluice_bench", None)
        }
    };
    if system == System::Sluice {
        set_retention(&client, Some(RETENTION_S)).await?;
    }
    let outcome = async {
        if system == System::Sluice {
            // Cleanup, before the clock: earlier runs' deleted rows leave free space in the
            // task table that this run would fill without growing it. Compacted, the table
            // grows by what this run leaves behind, as the baseline's fresh table does.
            client.batch_execute("VACUUM FULL sluice.task_run").await?;
        }
        let sizes_before = relation_sizes(&client, schema).await?;
        let held = match hold {
            true => Some(HeldTransaction::open(&ctx.dsn).await?),
            false => None,
        };
        let held_at_start = match &held {
            Some(h) => h.observe(&client).await?,
            None => Value::Null,
        };
        let step = total / 100;
        let recorder = Arc::new(Recorder::new(total, total, step, false));
        let completions = Arc::new(Milestones::new(total, total));
        let start = Instant::now();
        let mut sluice_workers = None;
        let mut baseline_workers = None;
        match task {
            Some(task) => {
                sluice_workers = Some(SluiceWorkers::start(
                    &ctx.dsn,
                    task,
                    SLUICE_WORKERS,
                    Some(SLUICE_SLOTS),
                    &recorder,
                )?)
            }
            None => {
                baseline_workers = Some(
                    BaselineWorkers::start(
                        &ctx.dsn,
                        Baseline::Batched,
                        BASELINE_CONNECTIONS,
                        Wake::Poll(POLL_SLEEP),
                        &recorder,
                        &completions,
                    )
                    .await?,
                )
            }
        }
        // Sizes at every tenth of the executions; the fifth is the halfway point.
        let curve = async {
            let observer = db::connect(&ctx.dsn).await?;
            let mut points = Vec::new();
            let mut halfway = Value::Null;
            for tenth in 1..10 {
                recorder
                    .executions
                    .wait_for(total * tenth / 10, STALL, "churn sizes")
                    .await?;
                let sizes = relation_sizes(&observer, schema).await?;
                let rows = table_rows(&observer, schema).await?;
                points.push(json!({
                    "executed": total * tenth / 10,
                    "seconds": start.elapsed().as_secs_f64(),
                    "schema_mb": total_bytes(&sizes) / 1_048_576.0,
                    "rows": rows,
                }));
                if tenth == 5 {
                    halfway = sizes;
                }
            }
            Ok::<_, crate::Error>((halfway, Value::from(points)))
        };
        let ran = async {
            produce(&client, task.is_some(), total, backlog, &recorder).await?;
            recorder.executions.wait_for(total, STALL, "churn").await?;
            match task {
                Some(task) => sluice_side::wait_all_finished(&client, task, STALL).await,
                None => {
                    completions.wait_for(total, STALL, "churn").await?;
                    Ok(completions.at(total).unwrap_or_else(Instant::now))
                }
            }
        };
        let (ran, curve) = tokio::join!(ran, curve);
        let (sizes_halfway, curve) = curve?;
        let stopped = match (sluice_workers, baseline_workers) {
            (Some(w), _) => w.stop().await,
            (_, Some(w)) => w.stop().await,
            _ => Ok(()),
        };
        let end = ran?;
        stopped?;
        let sizes_after = relation_sizes(&client, schema).await?;
        let held = match held {
            Some(h) => {
                let at_end = h.observe(&client).await?;
                h.release().await?;
                json!({ "at_start": held_at_start, "at_end": at_end })
            }
            None => Value::Null,
        };
        let check = match task {
            Some(task) => {
                sluice_side::check_with_retention(&client, task, &recorder, true, true).await?
            }
            None => {
                let executions = recorder.check(true);
                let (jobs, done) = baseline::job_counts(&client).await?;
                Check {
                    ok: executions.ok() && jobs == total as i64 && done == total as i64,
                    details: json!({ "executions": executions.to_json(), "jobs": jobs, "done": done }),
                }
            }
        };
        let executions = &recorder.executions;
        let at = |pct: usize| {
            executions
                .at(step * pct)
                .ok_or(format!("no instant for {pct}% of executions"))
        };
        Ok(Churn {
            first_rate: rate(step * 10, start, at(10)?),
            last_rate: rate(step * 10, at(90)?, at(100)?),
            overall_rate: rate(total, start, end),
            sizes_before,
            sizes_halfway,
            curve,
            sizes_after,
            held,
            check,
        })
    }
    .await;
    if let Some(task) = task {
        if let Err(e) = set_retention(&client, None).await {
            eprintln!("warning: resetting sluice.succeeded_task_retention failed: {e}");
        }
        sluice_side::cleanup(&ctx.dsn, task).await;
    }
    outcome
}

/// The biggest table's row counts as the statistics have them: live and dead versions (the
/// latter what vacuum has not reclaimed yet) and when autovacuum last ran on it.
async fn table_rows(client: &Client, schema: &str) -> Result<Value> {
    let table = if schema == "sluice" {
        "task_run"
    } else {
        "naive_job"
    };
    let row = client
        .query_opt(
            "SELECT n_live_tup, n_dead_tup, autovacuum_count, last_autovacuum::text
               FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = $2",
            &[&schema, &table],
        )
        .await?;
    Ok(match row {
        Some(r) => json!({
            "table": table, "live": r.get::<_, i64>(0), "dead": r.get::<_, i64>(1),
            "autovacuums": r.get::<_, i64>(2), "last_autovacuum": r.get::<_, Option<String>>(3),
        }),
        None => Value::Null,
    })
}

/// Succeeded tasks are deleted this long after they finish during the Sluice runs, so that
/// the table holds about `rate x RETENTION_S` finished rows plus what vacuum has not yet
/// reclaimed (the default, a day, would keep all 2,000,000).
const RETENTION_S: i32 = 10;

/// Sets (or resets to the default) `sluice.succeeded_task_retention` for the cluster.
async fn set_retention(client: &Client, seconds: Option<i32>) -> Result<()> {
    let sql = match seconds {
        Some(s) => format!("ALTER SYSTEM SET sluice.succeeded_task_retention = {s}"),
        None => "ALTER SYSTEM RESET sluice.succeeded_task_retention".to_string(),
    };
    client.batch_execute(&sql).await?;
    client.batch_execute("SELECT pg_reload_conf()").await?;
    Ok(())
}

/// One producer: enqueues the next batch of 1,000 whenever fewer than `backlog` tasks are
/// waiting (enqueued but not yet started), until `total` are enqueued.
async fn produce(
    client: &Client,
    sluice: bool,
    total: usize,
    backlog: usize,
    recorder: &Recorder,
) -> Result<()> {
    let bulk_insert = match sluice {
        true => None,
        false => Some(BulkInsert::prepare(client).await?),
    };
    let mut enqueued = 0;
    let mut last_progress = Instant::now();
    while enqueued < total {
        if enqueued - recorder.executions.count().min(enqueued) >= backlog {
            if last_progress.elapsed() > STALL {
                return Err(format!("churn: the backlog has not moved for {STALL:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let batch = enqueued as u64..(enqueued + ENQUEUE_BATCH).min(total) as u64;
        let size = (batch.end - batch.start) as usize;
        match &bulk_insert {
            None => sluice_side::enqueue_range(client, batch).await?,
            Some(bulk_insert) => bulk_insert.insert(client, batch).await?,
        }
        enqueued += size;
        last_progress = Instant::now();
    }
    Ok(())
}
