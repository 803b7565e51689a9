//! pickup: latency from an enqueue's commit to its handler starting, with idle workers that
//! are listening. Tasks are enqueued one per transaction at a steady 100/s; the commit instant
//! (when the enqueue statement returned) and the handler's start instant are both taken in
//! this process and joined afterwards (a handler may start before the producer has stored its
//! commit instant).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_client::{enqueue, EnqueueOptions};
use tokio_postgres::types::Type;

use super::{progress, Ctx};
use crate::baseline::{self, Baseline, BaselineWorkers, Wake};
use crate::db;
use crate::record::{percentile, Milestones, Recorder};
use crate::report::{ratio, BenchResult, Report};
use crate::sluice_side::{self, BenchTask, Check, SluiceWorkers};
use crate::Result;

const SLUICE_WORKERS: usize = 2;
const BASELINE_CONNECTIONS: usize = 4;
const INTERVAL: Duration = Duration::from_millis(10);
/// The baselines' poll fallback when no notification comes.
const LISTEN_FALLBACK: Duration = Duration::from_secs(1);
/// How long the last task may take to be picked up.
const TAIL_WAIT: Duration = Duration::from_secs(30);

struct Latencies {
    /// Milliseconds, sorted.
    sorted_ms: Vec<f64>,
    check: Check,
}

impl Latencies {
    fn p(&self, p: f64) -> f64 {
        percentile(&self.sorted_ms, p)
    }

    fn summary(&self) -> Value {
        json!({
            "samples": self.sorted_ms.len(), "p50_ms": self.p(50.0), "p95_ms": self.p(95.0),
            "p99_ms": self.p(99.0), "max_ms": self.sorted_ms.last(), "min_ms": self.sorted_ms.first(),
        })
    }
}

pub async fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let n = ctx.scale.tasks(1_000);
    let sluice = db::retrying(&ctx.dsn, "pickup sluice", || sluice_pickup(ctx, n)).await;
    let naive = db::retrying(&ctx.dsn, "pickup naive", || {
        baseline_pickup(ctx, n, Baseline::Naive)
    })
    .await;
    let batched = db::retrying(&ctx.dsn, "pickup batched", || {
        baseline_pickup(ctx, n, Baseline::Batched)
    })
    .await;
    let settle = |what: &str, outcome: Result<Latencies>| {
        let latencies = outcome.unwrap_or_else(|e| Latencies {
            sorted_ms: Vec::new(),
            check: Check::failed(format!("run failed: {e}")),
        });
        progress(
            what,
            &format!(
                "p50 {:.2} ms, p99 {:.2} ms",
                latencies.p(50.0),
                latencies.p(99.0)
            ),
        );
        latencies
    };
    let sluice = settle("sluice", sluice);
    let naive = settle("naive (LISTEN)", naive);
    let batched = settle("batched (LISTEN)", batched);

    let percentiles = [
        ("pickup_p50", 50.0),
        ("pickup_p95", 95.0),
        ("pickup_p99", 99.0),
        ("pickup_max", 100.0),
    ];
    let systems = [
        (
            "sluice",
            format!("{SLUICE_WORKERS} workers x default slots"),
            &sluice,
        ),
        (
            "naive",
            format!("{BASELINE_CONNECTIONS} connections, LISTEN"),
            &naive,
        ),
        (
            "batched",
            format!("{BASELINE_CONNECTIONS} connections, LISTEN"),
            &batched,
        ),
    ];
    for (system, shape, latencies) in systems {
        for (metric, p) in percentiles {
            let value = latencies.p(p);
            let mut result = BenchResult::new("pickup", system, shape.clone(), metric, value, "ms")
                .ok(latencies.check.ok)
                .details(json!({
                    "tasks": n, "rate_per_s": 1.0 / INTERVAL.as_secs_f64(),
                    "latency": latencies.summary(), "check": latencies.check.details,
                }));
            if system == "sluice" {
                result.vs_naive = ratio(value, naive.p(p));
                result.vs_batched = ratio(value, batched.p(p));
            }
            report.add(result)?;
        }
    }
    Ok(())
}

async fn sluice_pickup(ctx: &Ctx, n: usize) -> Result<Latencies> {
    let client = db::connect(&ctx.dsn).await?;
    let task = sluice_side::define_fresh_task(&client, "pickup").await?;
    let outcome = async {
        let recorder = Arc::new(Recorder::new(n, n, 1, true));
        let workers = SluiceWorkers::start(&ctx.dsn, task, SLUICE_WORKERS, None, &recorder)?;
        let measured: Result<_> = async {
            workers
                .wait_registered(&client, Duration::from_secs(30))
                .await?;
            settle_down().await;
            let producer = db::connect(&ctx.dsn).await?;
            let committed = produce(n, |seq| {
                let producer = &producer;
                async move {
                    enqueue::<BenchTask>(producer, &seq, &EnqueueOptions::default()).await?;
                    Ok(())
                }
            })
            .await?;
            recorder.executions.wait_for(n, TAIL_WAIT, "pickup").await?;
            Ok(committed)
        }
        .await;
        let stopped = workers.stop().await;
        let committed = measured?;
        stopped?;
        let check = sluice_side::check(&client, task, &recorder, true).await?;
        Ok(latencies(&recorder, &committed, check))
    }
    .await;
    sluice_side::cleanup(&ctx.dsn, task).await;
    outcome
}

async fn baseline_pickup(ctx: &Ctx, n: usize, kind: Baseline) -> Result<Latencies> {
    let client = db::connect(&ctx.dsn).await?;
    baseline::recreate_table(&client).await?;
    let recorder = Arc::new(Recorder::new(n, n, 1, true));
    let completions = Arc::new(Milestones::new(n, 1));
    let workers = BaselineWorkers::start(
        &ctx.dsn,
        kind,
        BASELINE_CONNECTIONS,
        Wake::Listen {
            fallback: LISTEN_FALLBACK,
        },
        &recorder,
        &completions,
    )
    .await?;
    let measured: Result<_> = async {
        settle_down().await;
        let insert = client
            .prepare_typed(&baseline::insert_one_notify_sql(), &[Type::JSONB])
            .await?;
        let committed = produce(n, |seq| {
            let (client, insert) = (&client, &insert);
            async move {
                client.query(insert, &[&Value::from(seq)]).await?;
                Ok(())
            }
        })
        .await?;
        completions.wait_for(n, TAIL_WAIT, "pickup").await?;
        Ok(committed)
    }
    .await;
    let stopped = workers.stop().await;
    let committed = measured?;
    stopped?;
    let executions = recorder.check(true);
    let (jobs, done) = baseline::job_counts(&client).await?;
    let check = Check {
        ok: executions.ok() && jobs == n as i64 && done == n as i64,
        details: json!({ "executions": executions.to_json(), "jobs": jobs, "done": done }),
    };
    Ok(latencies(&recorder, &committed, check))
}

/// Lets connection setup, registration and first polls finish: the workers must be idle.
async fn settle_down() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// Enqueues inputs 0..n, one per transaction, one every `INTERVAL` (on a fixed schedule, so a
/// slow commit does not shift the later ones); returns each one's commit instant.
async fn produce<F, Fut>(n: usize, mut enqueue_one: F) -> Result<Vec<Instant>>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let start = tokio::time::Instant::now();
    let mut committed = Vec::with_capacity(n);
    for seq in 0..n {
        tokio::time::sleep_until(start + INTERVAL * seq as u32).await;
        enqueue_one(seq as u64).await?;
        committed.push(Instant::now());
    }
    Ok(committed)
}

/// Handler start minus commit, per input; negative if a handler started before the producer
/// saw its commit return.
fn latencies(recorder: &Recorder, committed: &[Instant], check: Check) -> Latencies {
    let mut sorted_ms: Vec<f64> = committed
        .iter()
        .enumerate()
        .filter_map(|(seq, &commit)| {
            let started = recorder.started(seq)?;
            Some(match started.checked_duration_since(commit) {
                Some(d) => d.as_secs_f64() * 1000.0,
                None => -(commit - started).as_secs_f64() * 1000.0,
            })
        })
        .collect();
    dump_series(committed.first().copied(), &sorted_ms);
    sorted_ms.sort_by(f64::total_cmp);
    Latencies { sorted_ms, check }
}

/// For finding where a tail comes from: with `SLUICE_BENCH_PICKUP_DUMP=<path>` set, each
/// system's latencies are appended to that file in enqueue order (one line per system, after
/// the Unix time of the first commit; one enqueue every `INTERVAL`), so slow pickups can be
/// matched against a server log. Not part of any result.
fn dump_series(first_commit: Option<Instant>, in_order_ms: &[f64]) {
    let Ok(path) = std::env::var("SLUICE_BENCH_PICKUP_DUMP") else {
        return;
    };
    // The wall-clock time of the first commit, to match against a server log.
    let first = first_commit.map_or(std::time::SystemTime::now(), |at| {
        std::time::SystemTime::now() - at.elapsed()
    });
    let first_s = first
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let line: Vec<String> = std::iter::once(format!("{first_s:.3}"))
        .chain(in_order_ms.iter().map(|ms| format!("{ms:.3}")))
        .collect();
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| {
            use std::io::Write;
            writeln!(file, "{}", line.join(" "))
        });
    if let Err(e) = appended {
        eprintln!("SLUICE_BENCH_PICKUP_DUMP: cannot write {path}: {e}");
    }
}
