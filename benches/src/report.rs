//! Results: one JSON line each in the output file (written as they come, so an interrupted run
//! keeps what it measured), and the table printed at the end.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::Result;

/// One measured number. Ratios are Sluice ÷ baseline for the same metric in the same run
/// (higher is better for rates, lower is better for latencies, CPU and sizes).
#[derive(Debug, Clone)]
pub struct BenchResult {
    pub scenario: &'static str,
    pub system: &'static str,
    pub shape: String,
    pub metric: &'static str,
    pub value: f64,
    pub unit: &'static str,
    pub vs_naive: Option<f64>,
    pub vs_batched: Option<f64>,
    pub vs_insert: Option<f64>,
    pub ok: bool,
    pub details: Value,
}

impl BenchResult {
    pub fn new(
        scenario: &'static str,
        system: &'static str,
        shape: impl Into<String>,
        metric: &'static str,
        value: f64,
        unit: &'static str,
    ) -> BenchResult {
        BenchResult {
            scenario,
            system,
            shape: shape.into(),
            metric,
            value,
            unit,
            vs_naive: None,
            vs_batched: None,
            vs_insert: None,
            ok: true,
            details: json!({}),
        }
    }

    pub fn details(mut self, details: Value) -> BenchResult {
        self.details = details;
        self
    }

    pub fn ok(mut self, ok: bool) -> BenchResult {
        self.ok = ok;
        self
    }
}

/// `a / b`, or None when it would not mean anything.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    let r = a / b;
    (b != 0.0 && r.is_finite()).then_some(r)
}

pub struct Report {
    file: BufWriter<File>,
    git: Value,
    results: Vec<BenchResult>,
}

impl Report {
    pub fn create(path: &Path) -> Result<Report> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file =
            File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(Report {
            file: BufWriter::new(file),
            git: git_commit(),
            results: Vec::new(),
        })
    }

    pub fn add(&mut self, result: BenchResult) -> Result<()> {
        if !result.ok {
            eprintln!(
                "\n!!! CHECK FAILED: {} / {} / {} / {}: {}\n",
                result.scenario, result.system, result.shape, result.metric, result.details
            );
        }
        let line = json!({
            "scenario": result.scenario,
            "system": result.system,
            "shape": result.shape,
            "metric": result.metric,
            "value": finite(result.value),
            "unit": result.unit,
            "vs_naive": result.vs_naive.and_then(finite),
            "vs_batched": result.vs_batched.and_then(finite),
            "vs_insert": result.vs_insert.and_then(finite),
            "ok": result.ok,
            "details": result.details,
            "timestamp": rfc3339_now(),
            "git": self.git["commit"],
            "git_dirty": self.git["dirty"],
        });
        writeln!(self.file, "{line}")?;
        self.file.flush()?;
        println!(
            "  {:<8} {:<34} {:<22} {} {}{}",
            result.system,
            result.shape,
            result.metric,
            format_value(result.value),
            result.unit,
            if result.ok { "" } else { "   CHECK FAILED" }
        );
        self.results.push(result);
        Ok(())
    }

    pub fn all_ok(&self) -> bool {
        self.results.iter().all(|r| r.ok)
    }

    pub fn print_table(&self) {
        let header = [
            "scenario",
            "system",
            "shape",
            "metric",
            "value",
            "unit",
            "vs naive",
            "vs batched",
            "vs insert",
            "ok",
        ];
        let rows: Vec<[String; 10]> = self
            .results
            .iter()
            .map(|r| {
                [
                    r.scenario.to_string(),
                    r.system.to_string(),
                    r.shape.clone(),
                    r.metric.to_string(),
                    format_value(r.value),
                    r.unit.to_string(),
                    format_ratio(r.vs_naive),
                    format_ratio(r.vs_batched),
                    format_ratio(r.vs_insert),
                    if r.ok { "ok" } else { "FAILED" }.to_string(),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let line = |cells: &[String]| {
            let mut out = String::from("|");
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                // Numbers right-aligned, text left-aligned.
                if (4..=8).contains(&i) && i != 5 {
                    out += &format!(" {cell:>w$} |");
                } else {
                    out += &format!(" {cell:<w$} |");
                }
            }
            out
        };
        println!("\n{}", line(&header.map(String::from)));
        println!(
            "|{}",
            widths.map(|w| format!("{}|", "-".repeat(w + 2))).join("")
        );
        for row in &rows {
            println!("{}", line(row));
        }
    }
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

fn format_value(v: f64) -> String {
    if !v.is_finite() {
        "-".to_string()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn format_ratio(r: Option<f64>) -> String {
    match r {
        Some(r) if r.is_finite() => format!("{r:.2}x"),
        _ => String::new(),
    }
}

/// The short commit and whether the working tree had uncommitted changes (others' work in
/// progress is measured too, so say so).
fn git_commit() -> Value {
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let run = |args: &[&str]| {
        Command::new("git")
            .args(["-C", repo])
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = run(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = run(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty());
    json!({ "commit": commit, "dirty": dirty })
}

/// UTC now as RFC 3339 with milliseconds, without a date crate.
fn rfc3339_now() -> String {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since_epoch.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}
