//! `cargo xtask test`: what CI runs (`.ci/run`), in order, stopping at the first failure:
//! tidy (`tidy.rs`), format check, clippy, migration lint, deploy checks, test suite, and the
//! scan of the suite's logs for its secrets — against PostgreSQL and NATS made reachable as `cargo xtask services`
//! does (private instances are left running for the next run).
//!
//! The suite logs in to PostgreSQL as a login of its own with a fresh random password
//! (`services::test_runner_url`), and every test process logs under `target/test-logs/`
//! (`TRELLIS_TEST_LOG_DIR`): the last step fails if any log holds that password or a test
//! password (`secrets`).

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::deploy;
use crate::flags;
use crate::lint;
use crate::secrets;
use crate::services::{self, Stack};
use crate::util;

pub fn run(flags: &flags::Test) -> anyhow::Result<()> {
    let started = Instant::now();
    let stack = Stack::ensure()?;
    // Outage tests start NATS servers of their own.
    let nats_server = services::nats_server_bin()?;
    let database_password = secrets::random_password();
    let database_url = services::test_runner_url(&stack.database_url, &database_password)?;
    let log_dir = util::target_dir().join("test-logs");
    if log_dir.exists() {
        std::fs::remove_dir_all(&log_dir).with_context(|| format!("clearing {}", log_dir.display()))?;
    }
    std::fs::create_dir_all(&log_dir)?;
    let env = [
        ("DATABASE_URL", database_url),
        ("NATS_URL", stack.nats_url.clone()),
        ("NATS_SERVER_BIN", nats_server.to_string_lossy().into_owned()),
        ("TRELLIS_TEST_LOG_DIR", log_dir.to_string_lossy().into_owned()),
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

    timed("tidy", &mut || crate::tidy::run())?;
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
    timed("secrets", &mut || {
        let mut known = secrets::test_passwords(&util::project_root())?;
        known.push(secrets::Known {
            name: "the password of the suite's DATABASE_URL",
            value: database_password.clone(),
        });
        // A filtered run (`cargo xtask test -- FILTER`) may start no process: nothing to scan.
        secrets::check(&log_dir, &known, flags.runner_args.is_empty())
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
