//! The scenarios. Each measures Sluice and the baselines with the same workload in the same
//! invocation, checks exactly-once execution, and adds its results to the report.

mod churn;
mod depth;
mod drain;
mod enqueue;
mod flow;
mod idle;
mod pickup;
mod rowcost;
mod workflow;

use std::time::Duration;

use serde_json::{json, Value};
use tokio_postgres::Client;

use crate::cli::Scenario;
use crate::report::Report;
use crate::Result;

/// How long a run may make no progress before it is declared stuck.
pub const STALL: Duration = Duration::from_secs(60);

pub struct Ctx {
    pub dsn: String,
    pub scale: Scale,
}

/// Full size, or the `--quick` development size (~20x smaller).
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub quick: bool,
}

impl Scale {
    pub fn tasks(self, full: usize) -> usize {
        if self.quick {
            (full / 20).max(1)
        } else {
            full
        }
    }

    pub fn idle_window(self) -> Duration {
        Duration::from_secs(if self.quick { 5 } else { 30 })
    }
}

pub async fn run(scenario: Scenario, ctx: &Ctx, report: &mut Report) -> Result<()> {
    match scenario {
        Scenario::Drain => drain::run(ctx, report).await,
        Scenario::Enqueue => enqueue::run(ctx, report).await,
        Scenario::Pickup => pickup::run(ctx, report).await,
        Scenario::Depth => depth::run(ctx, report).await,
        Scenario::Churn => churn::run(ctx, report).await,
        Scenario::Idle => idle::run(ctx, report).await,
        Scenario::Flow => flow::run(ctx, report).await,
        Scenario::Workflow => workflow::run(ctx, report).await,
        Scenario::Rowcost => rowcost::run(ctx, report).await,
    }
}

/// `pg_total_relation_size` and `pg_relation_size` of every table and index in `schema`.
pub async fn relation_sizes(client: &Client, schema: &str) -> Result<Value> {
    let rows = client
        .query(
            "SELECT c.relname::text, c.relkind::text,
                    pg_total_relation_size(c.oid), pg_relation_size(c.oid)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relkind IN ('r', 'i', 'p')
              ORDER BY c.relkind DESC, c.relname",
            &[&schema],
        )
        .await?;
    let mut tables_total: i64 = 0;
    let mut relations = serde_json::Map::new();
    for row in rows {
        let (name, kind, total, main): (String, String, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if kind != "i" {
            // A table's total includes its indexes and TOAST: the schema's total is the sum
            // over tables only.
            tables_total += total;
        }
        relations.insert(
            name,
            json!({ "kind": if kind == "i" { "index" } else { "table" },
                    "total_bytes": total, "relation_bytes": main }),
        );
    }
    Ok(json!({ "total_bytes": tables_total, "relations": relations }))
}

/// A result's value when the run failed before it measured anything.
pub const NOT_MEASURED: f64 = f64::NAN;

/// Rounds of a paired comparison (Sluice, then its baseline, and again): the two sides of a
/// round run within seconds of each other, and the median over the rounds' ratios is what
/// is reported, because a single pair on the 2-core VM moves by ±10-40% (benches/README.md).
pub const PAIRED_ROUNDS: usize = 3;

/// The median of the measured (finite) values; NaN if there is none.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut measured: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
    if measured.is_empty() {
        return NOT_MEASURED;
    }
    measured.sort_by(f64::total_cmp);
    let mid = measured.len() / 2;
    if measured.len() % 2 == 1 {
        measured[mid]
    } else {
        (measured[mid - 1] + measured[mid]) / 2.0
    }
}

/// Prints a run's outcome as it finishes, so a long invocation shows progress.
pub fn progress(what: &str, outcome: &str) {
    println!("  .. {what}: {outcome}");
}

/// "4 workers x 25 slots"; `None` slots means the client's default.
pub fn sluice_shape(workers: usize, slots: Option<i32>) -> String {
    let plural = if workers == 1 { "" } else { "s" };
    match slots {
        Some(s) => format!("{workers} worker{plural} x {s} slots"),
        None => format!("{workers} worker{plural} x default slots"),
    }
}
