//! flow: the cost of flow control. The drain workload twice over with the same worker shape:
//! plain, and with 1,000 concurrency keys (`max_runs` 5, the key is the input's sequence
//! number modulo 1,000) plus one rate limit high enough never to bind, so every admission
//! pays for both checks. Runs alternate plain, flow, flow, plain so drift on the machine
//! falls on both; the result is the ratio of the summed rates.

use serde_json::json;

use super::{drain, progress, sluice_shape, Ctx};
use crate::db;
use crate::report::{BenchResult, Report};
use crate::Result;

const WORKERS: usize = 8;
const SLOTS: i32 = 50;
const RATE_LIMIT_KEY: &str = "sluice_bench_flow";
const FLOW_DEFINITION: &str = ", concurrency_key => '$ % 1000', max_runs => 5,
     rate_limits => '[{\"key\": \"sluice_bench_flow\"}]'";

pub async fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let n = ctx.scale.tasks(100_000);
    let client = db::connect(&ctx.dsn).await?;
    client
        .execute(
            "SELECT sluice.set_rate_limit($1, 2000000000, '1 second')",
            &[&RATE_LIMIT_KEY],
        )
        .await?;
    let shape = sluice_shape(WORKERS, Some(SLOTS));
    let mut plain = Vec::new();
    let mut flow = Vec::new();
    let mut ok = true;
    for with_flow in [false, true, true, false] {
        let definition = with_flow.then_some(FLOW_DEFINITION);
        let label = if with_flow { "flow control" } else { "plain" };
        let outcome = db::retrying(&ctx.dsn, &format!("flow {label} {shape}"), || {
            drain::sluice_drain(ctx, n, WORKERS, Some(SLOTS), definition)
        })
        .await;
        let (rate, check_ok) = match outcome {
            Ok((rate, _, check)) => (rate, check.ok),
            Err(e) => {
                progress(&format!("{label} {shape}"), &format!("run failed: {e}"));
                (f64::NAN, false)
            }
        };
        ok &= check_ok;
        progress(
            &format!("sluice {label} {shape}"),
            &format!(
                "{rate:.0} tasks/s{}",
                if check_ok { "" } else { "  CHECK FAILED" }
            ),
        );
        if with_flow { &mut flow } else { &mut plain }.push(rate);
    }
    let plain_rate = plain.iter().sum::<f64>() / plain.len() as f64;
    let flow_rate = flow.iter().sum::<f64>() / flow.len() as f64;
    report.add(
        BenchResult::new(
            "flow",
            "sluice",
            format!("{shape}, 1,000 keys x max_runs 5 + rate limit"),
            "flow_vs_plain",
            flow_rate / plain_rate,
            "x",
        )
        .ok(ok)
        .details(json!({
            "tasks": n, "plain_rates": plain, "flow_rates": flow,
            "plain_mean": plain_rate, "flow_mean": flow_rate,
        })),
    )?;
    Ok(())
}
