//! idle: what an idle system costs. With 10 Sluice workers connected and nothing to do, the
//! CPU time of the scheduler process (and of the workers' backends) over 30 s, from
//! /proc/<pid>/stat; the same for 10 idle naive workers that LISTEN with a 1 s poll fallback.
//! Needs the cluster on this machine (it reads the backends' /proc entries).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_postgres::Client;

use super::{progress, Ctx, NOT_MEASURED};
use crate::baseline::{self, Baseline, BaselineWorkers, Wake};
use crate::db::{self, Disturbed};
use crate::record::{Milestones, Recorder};
use crate::report::{ratio, BenchResult, Report};
use crate::sluice_side::{self, SluiceWorkers};
use crate::Result;

const WORKERS: usize = 10;
const LISTEN_FALLBACK: Duration = Duration::from_secs(1);
/// Time for registrations, first polls and the scheduler's reaction to them to pass.
const SETTLE: Duration = Duration::from_secs(2);

/// CPU used over the window, in percent of one core.
struct IdleCpu {
    scheduler: f64,
    backends: f64,
    client_process: f64,
    seconds: f64,
    backend_count: usize,
    /// Live Sluice workers of someone else at the end of the window: they keep the scheduler
    /// busy, and the numbers are then not those of an idle system.
    foreign_workers: i64,
}

pub async fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let window = ctx.scale.idle_window();
    let ticks_per_second = clock_ticks_per_second();
    let sluice = db::retrying(&ctx.dsn, "idle sluice", || {
        sluice_idle(ctx, window, ticks_per_second)
    })
    .await;
    let naive = db::retrying(&ctx.dsn, "idle naive", || {
        naive_idle(ctx, window, ticks_per_second)
    })
    .await;
    let failure = |e: &crate::Error| json!({ "error": format!("run failed: {e}") });
    match &sluice {
        Ok(cpu) => progress(
            "sluice",
            &format!(
                "scheduler {:.3}% of a core, {} worker backends {:.3}%",
                cpu.scheduler, cpu.backend_count, cpu.backends
            ),
        ),
        Err(e) => progress("sluice", &failure(e).to_string()),
    }
    match &naive {
        Ok(cpu) => progress(
            "naive",
            &format!("{} worker backends {:.3}%", cpu.backend_count, cpu.backends),
        ),
        Err(e) => progress("naive", &failure(e).to_string()),
    }
    for cpu in [&sluice, &naive].into_iter().flatten() {
        if cpu.foreign_workers > 0 {
            eprintln!(
                "  !! {} other live Sluice workers on the cluster: not an idle system",
                cpu.foreign_workers
            );
        }
    }
    let details = |cpu: &Result<IdleCpu>| match cpu {
        Ok(cpu) => json!({
            "window_s": cpu.seconds, "workers": WORKERS, "worker_backends": cpu.backend_count,
            "scheduler_pct": cpu.scheduler, "worker_backends_pct": cpu.backends,
            "bench_process_pct": cpu.client_process, "clk_tck": ticks_per_second,
            "foreign_live_workers": cpu.foreign_workers,
        }),
        Err(e) => failure(e),
    };
    let field =
        |cpu: &Result<IdleCpu>, f: fn(&IdleCpu) -> f64| cpu.as_ref().map_or(NOT_MEASURED, f);
    let sluice_server = field(&sluice, |c| c.scheduler + c.backends);
    let naive_server = field(&naive, |c| c.backends);
    let shape = format!("{WORKERS} idle workers");
    report.add(
        BenchResult::new(
            "idle",
            "sluice",
            shape.clone(),
            "scheduler_cpu",
            field(&sluice, |c| c.scheduler),
            "% core",
        )
        .ok(sluice.is_ok())
        .details(details(&sluice)),
    )?;
    let mut total = BenchResult::new(
        "idle",
        "sluice",
        shape.clone(),
        "server_cpu",
        sluice_server,
        "% core",
    )
    .ok(sluice.is_ok())
    .details(details(&sluice));
    total.vs_naive = ratio(sluice_server, naive_server);
    report.add(total)?;
    report.add(
        BenchResult::new(
            "idle",
            "naive",
            format!("{shape}, LISTEN + {}s poll", LISTEN_FALLBACK.as_secs()),
            "server_cpu",
            naive_server,
            "% core",
        )
        .ok(naive.is_ok())
        .details(details(&naive)),
    )?;
    Ok(())
}

async fn sluice_idle(ctx: &Ctx, window: Duration, ticks_per_second: f64) -> Result<IdleCpu> {
    let client = db::connect(&ctx.dsn).await?;
    let task = sluice_side::define_fresh_task(&client, "idle").await?;
    let outcome = async {
        let recorder = Arc::new(Recorder::new(0, 0, 1, false));
        let workers = SluiceWorkers::start(&ctx.dsn, task, WORKERS, None, &recorder)?;
        let measured: Result<_> = async {
            workers
                .wait_registered(&client, Duration::from_secs(30))
                .await?;
            tokio::time::sleep(SETTLE).await;
            let scheduler = scheduler_pid(&client).await?;
            let backends = workers.backend_pids(&client).await?;
            let mut pids = vec![scheduler];
            pids.extend(&backends);
            let (used, seconds, client_process) = measure(&pids, window).await?;
            Ok(IdleCpu {
                scheduler: percent(used[0], seconds, ticks_per_second),
                backends: percent(used[1..].iter().sum(), seconds, ticks_per_second),
                client_process: percent(client_process, seconds, ticks_per_second),
                seconds,
                backend_count: backends.len(),
                foreign_workers: foreign_workers(&client, &workers.names).await?,
            })
        }
        .await;
        let stopped = workers.stop().await;
        let cpu = measured?;
        stopped?;
        Ok(cpu)
    }
    .await;
    sluice_side::cleanup(&ctx.dsn, task).await;
    outcome
}

async fn naive_idle(ctx: &Ctx, window: Duration, ticks_per_second: f64) -> Result<IdleCpu> {
    let client = db::connect(&ctx.dsn).await?;
    baseline::recreate_table(&client).await?;
    let recorder = Arc::new(Recorder::new(0, 0, 1, false));
    let completions = Arc::new(Milestones::new(0, 1));
    let workers = BaselineWorkers::start(
        &ctx.dsn,
        Baseline::Naive,
        WORKERS,
        Wake::Listen {
            fallback: LISTEN_FALLBACK,
        },
        &recorder,
        &completions,
    )
    .await?;
    let measured: Result<_> = async {
        tokio::time::sleep(SETTLE).await;
        let (used, seconds, client_process) = measure(&workers.pids, window).await?;
        Ok(IdleCpu {
            scheduler: NOT_MEASURED,
            backends: percent(used.iter().sum(), seconds, ticks_per_second),
            client_process: percent(client_process, seconds, ticks_per_second),
            seconds,
            backend_count: workers.pids.len(),
            foreign_workers: foreign_workers(&client, &[]).await?,
        })
    }
    .await;
    let stopped = workers.stop().await;
    let cpu = measured?;
    stopped?;
    Ok(cpu)
}

async fn foreign_workers(client: &Client, ours: &[String]) -> Result<i64> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM sluice.workers WHERE stopped_at IS NULL AND name <> ALL($1)",
            &[&ours],
        )
        .await?
        .get(0))
}

async fn scheduler_pid(client: &Client) -> Result<i32> {
    Ok(client
        .query_opt(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'sluice scheduler'",
            &[],
        )
        .await?
        .ok_or("no scheduler in pg_stat_activity (backend_type 'sluice scheduler')")?
        .get(0))
}

/// CPU ticks each pid used over `window`, the window's length, and this process's own ticks.
async fn measure(pids: &[i32], window: Duration) -> Result<(Vec<u64>, f64, u64)> {
    let before: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect::<Result<_>>()?;
    let own_before = cpu_ticks_of("self")?;
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let seconds = start.elapsed().as_secs_f64();
    let mut used = Vec::new();
    for (&pid, before) in pids.iter().zip(before) {
        // A process that went away (a restart) invalidates the window.
        let after = cpu_ticks(pid)
            .map_err(|e| Disturbed(format!("process {pid} went away during the window: {e}")))?;
        used.push(after.saturating_sub(before));
    }
    Ok((
        used,
        seconds,
        cpu_ticks_of("self")?.saturating_sub(own_before),
    ))
}

fn cpu_ticks(pid: i32) -> Result<u64> {
    cpu_ticks_of(&pid.to_string())
}

/// utime + stime (fields 14 and 15 of /proc/<pid>/stat), in clock ticks.
fn cpu_ticks_of(pid: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    // The command name (field 2) is in parentheses and may contain spaces: count from the last
    // ')'. What follows starts at field 3.
    let rest = stat
        .rsplit_once(')')
        .ok_or_else(|| format!("unexpected {path}"))?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        Ok(fields
            .get(n - 3)
            .ok_or_else(|| format!("{path} has no field {n}"))?
            .parse()?)
    };
    Ok(field(14)? + field(15)?)
}

fn percent(ticks: u64, seconds: f64, ticks_per_second: f64) -> f64 {
    ticks as f64 / ticks_per_second / seconds * 100.0
}

/// `getconf CLK_TCK`, or Linux's usual 100.
fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}
