//! `cargo xtask test`: what CI runs (`.ci/run`), in order, stopping at the first failure:
//! format check, clippy, migration lint, deploy checks, test suite — against PostgreSQL and NATS made
//! reachable as `cargo xtask services` does (private instances are left running for the next
//! run).

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::deploy;
use crate::flags;
use crate::lint;
use crate::services::{self, Stack};
use crate::util;

pub fn run(flags: &flags::Test) -> anyhow::Result<()> {
    let started = Instant::now();
    let stack = Stack::ensure()?;
    // Outage tests start NATS servers of their own.
    let nats_server = services::nats_server_bin()?;
    let env = [
        ("DATABASE_URL", stack.database_url.clone()),
        ("NATS_URL", stack.nats_url.clone()),
        ("NATS_SERVER_BIN", nats_server.to_string_lossy().into_owned()),
    ];
    stack.keep_running();
    for (name, value) in &env {
        eprintln!("test: {name}={}", util::redact(value));
    }

    let mut timings = Vec::new();
    let mut timed = |name: &'static str, step: &mut dyn FnMut() -> anyhow::Result<()>| {
        eprintln!("\n==> {name}");
        let start = Instant::now();
        let result = step();
        let took = start.elapsed();
        timings.push((name, took));
        match &result {
            Ok(()) => eprintln!("==> {name}: ok in {}", seconds(took)),
            Err(_) => eprintln!("==> {name}: FAILED after {}", seconds(took)),
        }
        result.with_context(|| format!("step `{name}` failed"))
    };
    let cargo = |args: &[&str]| {
        let mut cmd = util::cargo();
        cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
        cmd
    };

    timed("fmt", &mut || util::run(&mut cargo(&["fmt", "--all", "--", "--check"])))?;
    timed("clippy", &mut || {
        util::run(&mut cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))
    })?;
    timed("lint", &mut || lint::run(&flags::Lint { dir: None }))?;
    // Also installs Debian's prometheus, whose server the trellisctl deploy tests run.
    timed("deploy", &mut || deploy::run())?;
    // Tests start other packages' binaries as real processes (trellis-probe-worker,
    // trellisctl, score-orchestrator); cargo builds a package's binaries only for that
    // package's own tests, so build them all first.
    timed("bins", &mut || util::run(&mut cargo(&["build", "--workspace", "--bins"])))?;
    timed("tests", &mut || {
        let mut cmd = if has_nextest() {
            // An empty workspace is not an error of the runner's (CI reports "ran no test").
            cargo(&["nextest", "run", "--workspace", "--no-tests=warn"])
        } else {
            eprintln!("test: cargo-nextest not installed; using cargo test");
            cargo(&["test", "--workspace"])
        };
        cmd.args(&flags.runner_args);
        util::run(&mut cmd)
    })?;

    eprintln!();
    for (name, took) in &timings {
        eprintln!("  {name:<8} {}", seconds(*took));
    }
    eprintln!("  {:<8} {}", "total", seconds(started.elapsed()));
    Ok(())
}

fn has_nextest() -> bool {
    util::capture(util::cargo().args(["nextest", "--version"])).is_ok_and(|o| o.status.success())
}

fn seconds(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}
