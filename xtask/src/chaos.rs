//! `cargo xtask chaos`: the fault scenarios (`crates/trellisctl/tests/chaos`) as the project's
//! regression suite for faults, and their table.
//!
//! Each scenario runs the whole system under the harness's steady write load, with one fault
//! (on a three-node cluster: a stream or consumer leader killed, the quorum lost, a rolling
//! restart; on one nats-server: each worker or `trellis-api` killed mid-batch, the server killed
//! and restarted, every database backend ended again and again, the cutover flags flipped), and
//! ends with exact invariants. Every scenario appends a line to the report file
//! (`TRELLIS_CHAOS_REPORT`), pass or fail; [`print_table`] prints them.
//!
//! `cargo xtask chaos` runs each phase of load [`LONG_SCALE`] times longer than the suite does
//! (`TRELLIS_CHAOS_SCALE`); `--short` runs the suite's form. `cargo xtask test` (CI) runs the
//! short form as part of the whole suite and prints the same table after it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};

use crate::flags;
use crate::nats_versions;
use crate::services::{self, Stack};
use crate::util;

/// How many times longer each phase of load runs in `cargo xtask chaos` than in the suite.
pub const LONG_SCALE: usize = 4;

/// The nextest filterset of the scenarios.
pub const FILTER: &str = "package(trellisctl) & binary(chaos)";

pub fn run(flags: &flags::Chaos) -> anyhow::Result<()> {
    let started = Instant::now();
    // The scenarios start nats-servers of their own: the version deploy/ ships, or the machine's.
    let nats_server = match nats_versions::lookup(nats_versions::DEFAULT).and_then(nats_versions::ensure) {
        Ok(bin) => bin,
        Err(err) => {
            eprintln!(
                "xtask: WARNING: cannot install nats-server {} (the version deploy/ ships): {err:#}\n\
                 xtask: the scenarios run on the machine's nats-server",
                nats_versions::DEFAULT
            );
            services::nats_server_bin()?
        }
    };
    let stack = Stack::ensure()?;
    let (database_url, nats_url) = (stack.database_url.clone(), stack.nats_url.clone());
    stack.keep_running();
    let dir = util::target_dir().join("chaos");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir.join("logs"))?;
    let report = dir.join("report.jsonl");
    let scale = if flags.short { 1 } else { LONG_SCALE };
    eprintln!("chaos: nats-server {}, load scale {scale}, report {}", nats_server.display(), report.display());

    eprintln!("\n==> bins");
    // The scenarios start the workspace's binaries as processes.
    util::run(util::cargo().args(["build", "--workspace", "--bins"]))?;
    eprintln!("\n==> scenarios");
    let mut cmd = util::cargo();
    cmd.args(["nextest", "run", "--workspace", "--no-tests=fail", "--no-fail-fast", "-E", FILTER])
        .args(&flags.runner_args)
        .env("DATABASE_URL", &database_url)
        .env("NATS_URL", &nats_url)
        .env("NATS_SERVER_BIN", &nats_server)
        .env("TRELLIS_TEST_LOG_DIR", dir.join("logs"))
        .env("TRELLIS_CHAOS_SCALE", scale.to_string())
        .env("TRELLIS_CHAOS_REPORT", &report);
    let ran = util::run(&mut cmd);
    let held = print_table(&report)?;
    println!("load scale {scale}; total {:.1}s", started.elapsed().as_secs_f64());
    ran.context("the fault scenarios failed")?;
    if !held {
        bail!("a scenario's invariants did not hold");
    }
    Ok(())
}

/// One scenario's line of the report, as the harness writes it.
struct Line {
    scenario: String,
    nats: String,
    sent: Option<u64>,
    acknowledged: Option<u64>,
    retries: Option<u64>,
    events: Option<u64>,
    settle_ms: Option<u64>,
    held: bool,
}

impl Line {
    fn parse(text: &str) -> anyhow::Result<Line> {
        let v: serde_json::Value = serde_json::from_str(text)?;
        let text_of = |k: &str| v[k].as_str().map(str::to_owned).with_context(|| format!("no {k}"));
        Ok(Line {
            scenario: text_of("scenario")?,
            nats: text_of("nats")?,
            sent: v["sent"].as_u64(),
            acknowledged: v["acknowledged"].as_u64(),
            retries: v["retries"].as_u64(),
            events: v["events"].as_u64(),
            settle_ms: v["settle_ms"].as_u64(),
            held: v["held"].as_bool().context("no held")?,
        })
    }
}

/// Prints the report's lines as a table, in scenario order; whether every scenario's
/// invariants held. No report file (no scenario ran, as in a filtered run) prints nothing.
pub fn print_table(report: &Path) -> anyhow::Result<bool> {
    let Ok(text) = std::fs::read_to_string(report) else { return Ok(true) };
    let mut lines = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Line::parse(l).with_context(|| format!("a line of {}: {l}", report.display())))
        .collect::<anyhow::Result<Vec<Line>>>()?;
    lines.sort_by(|a, b| a.scenario.cmp(&b.scenario));
    let number = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
    let width = lines.iter().map(|l| l.scenario.len()).max().unwrap_or(8).max(8);
    println!(
        "\n{:<width$}  {:<7}  {:>6}  {:>6}  {:>8}  {:>6}  {:>7}  invariants",
        "scenario", "nats", "sent", "acked", "repeated", "events", "settle"
    );
    for l in &lines {
        let settle = l.settle_ms.map_or_else(|| "-".to_owned(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
        let held = if l.held { "held" } else { "FAILED" };
        println!(
            "{:<width$}  {:<7}  {:>6}  {:>6}  {:>8}  {:>6}  {:>7}  {held}",
            l.scenario,
            l.nats,
            number(l.sent),
            number(l.acknowledged),
            number(l.retries),
            number(l.events),
            settle
        );
    }
    Ok(lines.iter().all(|l| l.held))
}

/// Where `cargo xtask test` has the scenarios of the suite write their lines.
pub fn suite_report(log_dir: &Path) -> PathBuf {
    log_dir.join("chaos.jsonl")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_says_whether_every_scenario_held() {
        let dir = std::env::temp_dir().join(format!("xtask-chaos-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let report = dir.join("report.jsonl");
        assert!(print_table(&report).unwrap(), "no report: nothing failed");
        let held = r#"{"scenario":"single::a","nats":"1 node","sent":10,"acknowledged":10,"retries":1,"events":12,"settle_ms":40,"held":true}"#;
        std::fs::write(&report, format!("{held}\n")).unwrap();
        assert!(print_table(&report).unwrap());
        let failed = r#"{"scenario":"cluster::b","nats":"3 nodes","sent":null,"acknowledged":null,"retries":null,"events":null,"settle_ms":null,"held":false}"#;
        std::fs::write(&report, format!("{held}\n{failed}\n")).unwrap();
        assert!(!print_table(&report).unwrap());
        std::fs::write(&report, "not json\n").unwrap();
        assert!(print_table(&report).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
