//! `cargo xtask bench cutover`: how long a change of a cutover flag takes to reach every
//! process. A release `trellis-api` and a release `search-projector` run on a fresh database;
//! `search.executor` is flipped 50 times with `trellisctl flags set`, and each flip is timed
//! from the moment `trellisctl` returns (the change is committed) until both processes export
//! the new value (`trellis_flag_state`), scraped every 5 ms.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};

use crate::bench::{Api, BenchDb, Worker, build_release, free_port, http_get, machine, release_bin};
use crate::services::Stack;

const FLIPS: usize = 50;

pub fn run() -> anyhow::Result<()> {
    let stack = Stack::ensure()?;
    build_release(&["trellis-api", "search-projector", "trellisctl"])?;
    let db = BenchDb::fresh(&stack, "trellis_bench_cutover")?;
    let prefix = format!("bench{}cutover", std::process::id());
    let api_admin = format!("127.0.0.1:{}", free_port()?);
    let _api = Api::start(&db, &stack, &prefix, &[("ADMIN_ADDR", api_admin.as_str())])?;
    let worker_admin = format!("127.0.0.1:{}", free_port()?);
    let _worker = Worker::start("search-projector", &db, &stack, &prefix, &worker_admin)?;

    let mut samples = Vec::with_capacity(FLIPS);
    for i in 0..FLIPS {
        let value = if i % 2 == 0 { "monolith" } else { "worker" };
        let status = Command::new(release_bin("trellisctl"))
            .args(["--database-url", &db.url, "flags", "set", "search.executor", value])
            // Flips, not promotions: past the promotion gate.
            .args(["--reason", "cargo xtask bench cutover", "--actor", "xtask", "--force"])
            .stdout(Stdio::null())
            .status()
            .context("running trellisctl flags set")?;
        ensure!(status.success(), "trellisctl flags set failed ({status})");
        let committed = Instant::now();
        let series = format!("trellis_flag_state{{flag=\"search.executor\",value=\"{value}\"}} 1");
        for admin in [&api_admin, &worker_admin] {
            while !http_get(admin, "/metrics")?.unwrap_or_default().lines().any(|line| line.trim_end() == series) {
                ensure!(committed.elapsed() < Duration::from_secs(10), "{value} did not reach {admin} within 10 s");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        samples.push(committed.elapsed());
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0;
    println!("\nmachine: {}\n", machine());
    println!("| benchmark | result | target |\n|---|---|---|");
    println!(
        "| cutover flag propagation to trellis-api and search-projector, {FLIPS} flips | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms | p99 ≤ 2 s |",
        at(0.5),
        at(0.99),
        at(1.0)
    );
    Ok(())
}
