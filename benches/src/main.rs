//! `sluice-bench`: runs the benchmark scenarios against a running cluster, compares Sluice with
//! two hand-written SKIP LOCKED queues on the same cluster in the same invocation, prints a
//! table and writes one JSON line per result. See benches/README.md.

mod baseline;
mod cli;
mod db;
mod record;
mod report;
mod scenarios;
mod sluice_side;

use std::process::ExitCode;

use cli::Options;
use report::Report;

/// One error type for the whole binary: anything printable, carried across tasks.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[tokio::main]
async fn main() -> ExitCode {
    let options = match cli::parse(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => return ExitCode::SUCCESS, // --help
        Err(message) => {
            eprintln!("sluice-bench: {message}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    match run(&options).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("sluice-bench: {}", db::describe(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Runs the selected scenarios; Ok(false) when a check failed or a scenario could not finish.
async fn run(options: &Options) -> Result<bool> {
    db::wait_for_cluster(&options.dsn, db::CLUSTER_WAIT).await?;
    db::print_server_settings(&options.dsn).await?;
    // Lost if the server restarts mid-run; by then the other invocation is most likely
    // waiting for the same cluster too.
    let _bench_lock = db::lock_out_other_benches(&options.dsn).await?;
    let mut report = Report::create(&options.out)?;
    let ctx = scenarios::Ctx {
        dsn: options.dsn.clone(),
        scale: scenarios::Scale {
            quick: options.quick,
        },
    };
    let mut all_finished = true;
    for scenario in &options.scenarios {
        println!("\n=== {} ===", scenario.name());
        if let Err(e) = scenarios::run(*scenario, &ctx, &mut report).await {
            eprintln!(
                "\n!!! scenario {} did not finish: {}\n",
                scenario.name(),
                db::describe(e.as_ref())
            );
            all_finished = false;
        }
    }
    report.print_table();
    let out = options.out.canonicalize().unwrap_or(options.out.clone());
    println!("\nresults: {}", out.display());
    let checks_passed = report.all_ok();
    if !checks_passed {
        eprintln!("\n!!! SOME EXACTLY-ONCE CHECKS FAILED (\"ok\": false above)");
    }
    Ok(checks_passed && all_finished)
}
