//! enqueue: producer throughput, with no workers running.
//!   single: one `sluice.enqueue` per transaction (autocommit) from 8 producer connections,
//!           each through a `PreparedEnqueue` (prepared once per connection), against a
//!           bare single-row INSERT commit loop into the baseline table (the naive baseline's
//!           enqueue, also prepared) with the same producers.
//!   many:   `sluice.enqueue_many` with 1,000 inputs per call, against a bare multi-row
//!           `INSERT ... SELECT FROM unnest($1::jsonb[])` of 1,000 rows (the batched baseline's
//!           enqueue).

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};
use sluice_client::{enqueue_many, EnqueueOptions, PreparedEnqueue};
use tokio::task::JoinSet;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use super::{median, progress, Ctx, NOT_MEASURED, PAIRED_ROUNDS};
use crate::baseline::{self, BulkInsert, TABLE};
use crate::db;
use crate::record::rate;
use crate::report::{ratio, BenchResult, Report};
use crate::sluice_side::{self, BenchTask, Check, ENQUEUE_BATCH};
use crate::Result;

const SINGLE_PRODUCERS: usize = 8;
const MANY_PRODUCERS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Single,
    Many,
}

impl Mode {
    fn producers(self) -> usize {
        match self {
            Mode::Single => SINGLE_PRODUCERS,
            Mode::Many => MANY_PRODUCERS,
        }
    }
}

pub async fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    // 60,000: at ~12,000/s a round's side lasts ~5 s; with 20,000 (1.6 s) single rounds of
    // one build moved between 0.77 and 0.99 of the INSERT within a minute.
    let single_n = ctx.scale.tasks(60_000);
    let many_n = ctx.scale.tasks(200_000);
    for (mode, n) in [(Mode::Single, single_n), (Mode::Many, many_n)] {
        let what = match mode {
            Mode::Single => "enqueue single",
            Mode::Many => "enqueue_many",
        };
        // Alternating rounds; see PAIRED_ROUNDS.
        let mut rounds = Vec::new();
        let mut sluice_check = None;
        let mut insert_check = None;
        for round in 1..=PAIRED_ROUNDS {
            let sluice = db::retrying(&ctx.dsn, &format!("{what} sluice"), || {
                sluice_enqueue(ctx, mode, n)
            })
            .await;
            let insert = db::retrying(&ctx.dsn, &format!("{what} insert"), || {
                insert_enqueue(ctx, mode, n)
            })
            .await;
            let (sluice_rate, sluice_round) =
                settle(&format!("sluice {what}, round {round}"), sluice);
            let (insert_rate, insert_round) =
                settle(&format!("insert {what}, round {round}"), insert);
            rounds.push((sluice_rate, insert_rate));
            keep_first_failure(&mut sluice_check, sluice_round);
            keep_first_failure(&mut insert_check, insert_round);
        }
        let sluice_check = sluice_check.expect("at least one round");
        let insert_check = insert_check.expect("at least one round");
        let sluice_rate = median(rounds.iter().map(|r| r.0));
        let insert_rate = median(rounds.iter().map(|r| r.1));
        let vs_insert =
            Some(median(rounds.iter().filter_map(|r| ratio(r.0, r.1)))).filter(|r| r.is_finite());
        let round_details: Vec<_> = rounds
            .iter()
            .map(|(s, i)| json!({ "sluice": s, "insert": i, "ratio": ratio(*s, *i) }))
            .collect();
        let producers = mode.producers();
        let (sluice_shape, insert_shape) = match mode {
            Mode::Single => (
                format!("enqueue, 1/commit, {producers} producers"),
                format!("INSERT 1 row/commit, {producers} producers"),
            ),
            Mode::Many => (
                format!("enqueue_many {ENQUEUE_BATCH}/call, {producers} producers"),
                format!("INSERT unnest {ENQUEUE_BATCH}/stmt, {producers} producers"),
            ),
        };
        let mut result = BenchResult::new(
            "enqueue",
            "sluice",
            sluice_shape,
            "enqueue_rate",
            sluice_rate,
            "tasks/s",
        )
        .ok(sluice_check.ok)
        .details(json!({
            "tasks": n,
            "check": sluice_check.details,
            "value": "median of the rounds; vs_insert is the median of the rounds' ratios",
            "rounds": round_details,
        }));
        result.vs_insert = vs_insert;
        // The single INSERT is how the naive baseline enqueues, the unnest INSERT how the
        // batched one does.
        match mode {
            Mode::Single => result.vs_naive = vs_insert,
            Mode::Many => result.vs_batched = vs_insert,
        }
        report.add(result)?;
        report.add(
            BenchResult::new(
                "enqueue",
                "insert",
                insert_shape,
                "enqueue_rate",
                insert_rate,
                "tasks/s",
            )
            .ok(insert_check.ok)
            .details(json!({
                "tasks": n,
                "table": TABLE,
                "check": insert_check.details,
                "value": "median of the rounds",
            })),
        )?;
    }
    Ok(())
}

/// Keeps the first failed check of the rounds, or the last passing one.
fn keep_first_failure(kept: &mut Option<Check>, check: Check) {
    if kept.as_ref().is_none_or(|k| k.ok) {
        *kept = Some(check);
    }
}

fn settle(what: &str, outcome: Result<(f64, Check)>) -> (f64, Check) {
    let (rate, check) =
        outcome.unwrap_or_else(|e| (NOT_MEASURED, Check::failed(format!("run failed: {e}"))));
    progress(what, &format!("{rate:.0} tasks/s"));
    (rate, check)
}

/// Connects the producers before the clock starts, then runs `produce(client, inputs)` on each
/// with its contiguous share of the inputs 0..n; returns tasks/s until the last one finished.
async fn timed_producers<F, Fut>(ctx: &Ctx, producers: usize, n: usize, produce: F) -> Result<f64>
where
    F: Fn(Arc<Client>, Range<u64>) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let mut clients = Vec::new();
    for _ in 0..producers {
        clients.push(Arc::new(db::connect(&ctx.dsn).await?));
    }
    let start = Instant::now();
    let mut set = JoinSet::new();
    for (i, client) in clients.into_iter().enumerate() {
        let share = (i * n / producers) as u64..((i + 1) * n / producers) as u64;
        set.spawn(produce(client, share));
    }
    while let Some(joined) = set.join_next().await {
        joined??;
    }
    Ok(rate(n, start, Instant::now()))
}

async fn sluice_enqueue(ctx: &Ctx, mode: Mode, n: usize) -> Result<(f64, Check)> {
    let client = db::connect(&ctx.dsn).await?;
    let task = sluice_side::define_fresh_task(&client, "enqueue").await?;
    let outcome = async {
        let rate = timed_producers(ctx, mode.producers(), n, move |client, inputs| async move {
            match mode {
                Mode::Single => {
                    // Prepared once per producer connection, as the bare INSERT loop is.
                    let prepared = PreparedEnqueue::prepare(&*client).await?;
                    for seq in inputs {
                        prepared
                            .enqueue::<BenchTask>(&*client, &seq, &EnqueueOptions::default())
                            .await?;
                    }
                }
                Mode::Many => {
                    let inputs: Vec<u64> = inputs.collect();
                    for chunk in inputs.chunks(ENQUEUE_BATCH) {
                        enqueue_many::<BenchTask>(&*client, chunk).await?;
                    }
                }
            }
            Ok(())
        })
        .await?;
        let row = client
            .query_one(
                "SELECT count(*), count(DISTINCT input), count(*) FILTER (WHERE status = 'queued')
                   FROM sluice.tasks WHERE task_name = $1",
                &[&task],
            )
            .await?;
        Ok((rate, count_check(n, row.get(0), row.get(1), row.get(2))))
    }
    .await;
    sluice_side::cleanup(&ctx.dsn, task).await;
    outcome
}

async fn insert_enqueue(ctx: &Ctx, mode: Mode, n: usize) -> Result<(f64, Check)> {
    let client = db::connect(&ctx.dsn).await?;
    baseline::recreate_table(&client).await?;
    let rate = timed_producers(ctx, mode.producers(), n, move |client, inputs| async move {
        match mode {
            Mode::Single => {
                let insert = client
                    .prepare_typed(
                        &format!("INSERT INTO {TABLE} (payload) VALUES ($1)"),
                        &[Type::JSONB],
                    )
                    .await?;
                for seq in inputs {
                    client.execute(&insert, &[&Value::from(seq)]).await?;
                }
            }
            Mode::Many => {
                // INSERT_BATCH rows per statement, as many as enqueue_many takes per call.
                let bulk_insert = BulkInsert::prepare(&client).await?;
                bulk_insert.insert(&client, inputs).await?;
            }
        }
        Ok(())
    })
    .await?;
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT payload), count(*) FILTER (WHERE status = 'queued')
                   FROM {TABLE}"
            ),
            &[],
        )
        .await?;
    Ok((rate, count_check(n, row.get(0), row.get(1), row.get(2))))
}

/// Every input enqueued exactly once, and queued.
fn count_check(n: usize, rows: i64, distinct: i64, queued: i64) -> Check {
    let n = n as i64;
    Check {
        ok: rows == n && distinct == n && queued == n,
        details: json!({ "expected": n, "rows": rows, "distinct_inputs": distinct, "queued": queued }),
    }
}
