//! Command-line options, parsed by hand (there are only four).

use std::path::PathBuf;

pub const USAGE: &str = "usage: sluice-bench [--scenario NAME]... [--quick] [--dsn DSN] [--out PATH]

  --scenario NAME  drain | enqueue | pickup | depth | churn | idle | flow | workflow | rowcost
                   (repeatable; default: all)
  --quick          task counts ~20x smaller and 5 s idle: for development, not for results
  --dsn DSN        default: $SLUICE_TEST_DSN or host=127.0.0.1 port=28815 user=postgres dbname=sluice
  --out PATH       JSON lines, overwritten per invocation; default: target/bench/results.jsonl";

const DEFAULT_DSN: &str = "host=127.0.0.1 port=28815 user=postgres dbname=sluice";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Drain,
    Enqueue,
    Pickup,
    Depth,
    Churn,
    Idle,
    Flow,
    Workflow,
    Rowcost,
}

impl Scenario {
    pub const ALL: [Scenario; 9] = [
        Scenario::Drain,
        Scenario::Enqueue,
        Scenario::Pickup,
        Scenario::Depth,
        Scenario::Churn,
        Scenario::Idle,
        Scenario::Flow,
        Scenario::Workflow,
        Scenario::Rowcost,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Drain => "drain",
            Scenario::Enqueue => "enqueue",
            Scenario::Pickup => "pickup",
            Scenario::Depth => "depth",
            Scenario::Churn => "churn",
            Scenario::Idle => "idle",
            Scenario::Flow => "flow",
            Scenario::Workflow => "workflow",
            Scenario::Rowcost => "rowcost",
        }
    }

    fn parse(name: &str) -> Option<Scenario> {
        if name == "latency" {
            return Some(Scenario::Pickup);
        }
        Scenario::ALL.into_iter().find(|s| s.name() == name)
    }
}

#[derive(Debug)]
pub struct Options {
    pub scenarios: Vec<Scenario>,
    pub quick: bool,
    pub dsn: String,
    pub out: PathBuf,
}

/// Ok(None) means help was printed.
pub fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut options = Options {
        scenarios: Vec::new(),
        quick: false,
        dsn: std::env::var("SLUICE_TEST_DSN").unwrap_or_else(|_| DEFAULT_DSN.to_string()),
        out: default_out(),
    };
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().ok_or(format!("{flag} needs a value"));
        match arg.as_str() {
            "--scenario" => {
                let name = value("--scenario")?;
                let scenario =
                    Scenario::parse(&name).ok_or(format!("unknown scenario \"{name}\""))?;
                if !options.scenarios.contains(&scenario) {
                    options.scenarios.push(scenario);
                }
            }
            "--quick" => options.quick = true,
            "--dsn" => options.dsn = value("--dsn")?,
            "--out" => options.out = PathBuf::from(value("--out")?),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => return Err(format!("unknown argument \"{other}\"")),
        }
    }
    if options.scenarios.is_empty() {
        options.scenarios = Scenario::ALL.to_vec();
    }
    Ok(Some(options))
}

/// The workspace's target/bench, wherever the binary is started from.
fn default_out() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("bench")
        .join("results.jsonl")
}
