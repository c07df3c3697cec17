//! `cargo xtask bench api --replica`: the read throughput of `GET /v1/me/contacts` with the
//! lag-tolerant reads on a streaming replica against the primary alone, in one run, on a
//! primary and replica of its own (testkit's `trellis-pg-replica`: the shared server gives no
//! replication access). Both PostgreSQL clusters, the API and wrk share this machine's cores, so
//! each phase also reports how the CPU time split between them (from `/proc`): on one machine a
//! replica moves reads, it adds no cores.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::bench::{self, Api, BenchDb, release_bin};
use crate::flags;
use crate::services::Stack;
use crate::util::{self, LineChild};

pub fn run(flags: &flags::Bench) -> anyhow::Result<()> {
    let stack = Stack::ensure()?;
    bench::build_release(&["trellis-api", "trellisctl", "trellis-testkit"])?;
    let mut pair = PgPair::start(&release_bin("trellis-pg-replica"))?;
    let psql = util::find_program("psql", &[]).context("psql is needed for benchmarks")?;
    let maintenance = format!("postgres://postgres@127.0.0.1:{}/postgres", pair.primary_port);
    util::read(Command::new(&psql).arg(&maintenance).args(["-qc", "CREATE DATABASE trellis_bench"]))?;
    let url = format!("postgres://postgres@127.0.0.1:{}/trellis_bench", pair.primary_port);
    util::run(Command::new(release_bin("trellisctl")).args(["migrate", "up"]).env("DATABASE_URL", &url))?;
    let db = BenchDb { url, psql };
    db.exec(bench::SEED_SQL)?;
    pair.catch_up()?;
    let replica_url = format!("postgres://postgres@127.0.0.1:{}/trellis_bench", pair.replica_port);
    let replica_name = format!("127.0.0.1:{}", pair.replica_port);

    let scripts = util::target_dir().join("bench-scripts");
    std::fs::create_dir_all(&scripts)?;
    let read_script = scripts.join("read.lua");
    std::fs::write(&read_script, bench::READ_SCRIPT)?;
    let prefix = format!("benchreplica{}", std::process::id());
    let pool_size = flags.db_pool_size.map(|n| n.to_string());

    // Primary alone, with the replica, with the replica, primary alone: the means weigh any
    // drift over the run alike.
    const PRIMARY: &str = "primary only";
    const REPLICA: &str = "reads on the replica";
    let mut rows = Vec::new();
    let mut means: Vec<(&str, f64)> = Vec::new();
    for (pass, mode) in [PRIMARY, REPLICA, REPLICA, PRIMARY].into_iter().enumerate() {
        let mut env: Vec<(&str, &str)> = pool_size.iter().map(|n| ("DB_POOL_SIZE", n.as_str())).collect();
        if mode == REPLICA {
            env.push(("DATABASE_READ_URL", replica_url.as_str()));
        }
        let api = Api::start(&db, &stack, &format!("{prefix}{pass}"), &env)?;
        let url = format!("{}/v1/me/contacts", api.url);
        if mode == REPLICA {
            wait_replica_serves(&api, &replica_name, &url)?;
        }
        eprintln!("xtask: bench: {mode}: GET /v1/me/contacts (50 contacts), 32 connections, {}s", flags.duration);
        bench::run_wrk(&url, 32, 3, &read_script)?;
        let reads_before = reads(&api, &replica_name)?;
        let cpu_before = Cpu::sample(&pair, api.pid())?;
        let load = bench::run_wrk(&url, 32, flags.duration, &read_script)?;
        let cpu = Cpu::sample(&pair, api.pid())?.since(&cpu_before);
        let reads_after = reads(&api, &replica_name)?;
        let on_replica = reads_after.1 - reads_before.1;
        let on_primary = reads_after.0 - reads_before.0;
        let split = if mode == REPLICA {
            format!("; reads: {on_replica:.0} on the replica, {on_primary:.0} on the primary")
        } else {
            String::new()
        };
        rows.push(format!(
            "| GET /v1/me/contacts (50 contacts), c=32, {mode} | {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms ({} requests, {} errors){split} | {} |",
            load.requests_per_sec,
            load.p50_ms,
            load.p99_ms,
            load.requests,
            load.errors,
            cpu.describe()
        ));
        means.push((mode, load.requests_per_sec));
    }
    let mean = |mode: &str| {
        let of: Vec<f64> = means.iter().filter(|m| m.0 == mode).map(|m| m.1).collect();
        of.iter().sum::<f64>() / of.len() as f64
    };
    let (primary, replica) = (mean(PRIMARY), mean(REPLICA));
    rows.push(format!(
        "| reads on the replica vs the primary alone, means of two passes each | {replica:.0} vs {primary:.0} req/s ({:+.1} %) | — |",
        100.0 * (replica - primary) / primary
    ));
    println!("\nmachine: {}\n", bench::machine());
    println!(
        "| benchmark | result | CPU time per second of the phase (cores): primary PostgreSQL, replica PostgreSQL, trellis-api, wrk, everything else |\n|---|---|---|"
    );
    for row in rows {
        println!("{row}");
    }
    Ok(())
}

/// Waits until the API serves a read from the replica (its poller has measured the lag).
fn wait_replica_serves(api: &Api, replica: &str, url: &str) -> anyhow::Result<()> {
    let path = url.split_once("/v1/").map(|(_, p)| format!("/v1/{p}")).unwrap_or_default();
    let host = api.url.trim_start_matches("http://").to_owned();
    util::wait_until("reads on the replica", Duration::from_secs(30), || {
        let before = reads(api, replica)?.1;
        authorized_get(&host, &path)?;
        Ok(reads(api, replica)?.1 > before)
    })
}

fn authorized_get(host: &str, path: &str) -> anyhow::Result<()> {
    let mut stream = std::net::TcpStream::connect(host)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer trl_bench_1\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    let _ = std::io::Read::read_to_string(&mut stream, &mut text);
    Ok(())
}

/// `trellis_api_db_reads_total` of the primary and of the replica, as the API counts them.
fn reads(api: &Api, replica: &str) -> anyhow::Result<(f64, f64)> {
    let text = bench::http_get(&api.admin, "/metrics")?.context("the API's /metrics did not answer")?;
    let series = |target: &str| {
        let prefix = format!("trellis_api_db_reads_total{{target=\"{target}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse::<f64>().ok()).unwrap_or(0.0)
    };
    Ok((series("primary"), series(replica)))
}

/// CPU time, in clock ticks: each cluster's (postmaster and backends), the API's, the waited-for
/// children of this process (wrk), and the machine's.
struct Cpu {
    at: Instant,
    primary: u64,
    replica: u64,
    api: u64,
    children: u64,
    machine: u64,
}

impl Cpu {
    fn sample(pair: &PgPair, api: u32) -> anyhow::Result<Self> {
        let processes = processes();
        let cluster = |postmaster: u32| -> u64 {
            processes.iter().filter(|p| p.pid == postmaster || p.ppid == postmaster).map(|p| p.ticks).sum()
        };
        let own = std::fs::read_to_string("/proc/self/stat")?;
        let fields: Vec<&str> =
            own.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
        // After the command name: state is field 3, cutime 16, cstime 17 (1-based).
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        let stat = std::fs::read_to_string("/proc/stat")?;
        let cpu: Vec<u64> =
            stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
        let busy = cpu.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum();
        Ok(Self {
            at: Instant::now(),
            primary: cluster(pair.primary_pid),
            replica: cluster(pair.replica_pid),
            api: processes.iter().find(|p| p.pid == api).map_or(0, |p| p.ticks),
            children: field(16) + field(17),
            machine: busy,
        })
    }

    fn since(&self, before: &Cpu) -> CpuUse {
        let secs = self.at.duration_since(before.at).as_secs_f64();
        let ticks = ticks_per_second();
        let per_sec = |now: u64, then: u64| now.saturating_sub(then) as f64 / ticks / secs;
        let (primary, replica, api, wrk) = (
            per_sec(self.primary, before.primary),
            per_sec(self.replica, before.replica),
            per_sec(self.api, before.api),
            per_sec(self.children, before.children),
        );
        let machine = per_sec(self.machine, before.machine);
        CpuUse { primary, replica, api, wrk, other: (machine - primary - replica - api - wrk).max(0.0) }
    }
}

struct CpuUse {
    primary: f64,
    replica: f64,
    api: f64,
    wrk: f64,
    other: f64,
}

impl CpuUse {
    fn describe(&self) -> String {
        format!("{:.2}, {:.2}, {:.2}, {:.2}, {:.2}", self.primary, self.replica, self.api, self.wrk, self.other)
    }
}

fn ticks_per_second() -> f64 {
    util::read(Command::new("getconf").arg("CLK_TCK")).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(100.0)
}

struct ProcessTicks {
    pid: u32,
    ppid: u32,
    ticks: u64,
}

/// Every process's pid, parent and CPU time (utime + stime) from `/proc/<pid>/stat`.
fn processes() -> Vec<ProcessTicks> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            // After the command name: ppid is field 4, utime 14, stime 15 (1-based).
            let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
            Some(ProcessTicks { pid, ppid: field(4)? as u32, ticks: field(14)? + field(15)? })
        })
        .collect()
}

/// testkit's `trellis-pg-replica` as a child: the ports and postmaster pids from its first line;
/// it stops both clusters when its standard input closes, on drop.
struct PgPair {
    child: LineChild,
    primary_port: u16,
    replica_port: u16,
    primary_pid: u32,
    replica_pid: u32,
}

impl PgPair {
    fn start(bin: &Path) -> anyhow::Result<PgPair> {
        eprintln!("xtask: starting a PostgreSQL primary and a streaming replica ({})", bin.display());
        let (child, first) = LineChild::start(Command::new(bin), Duration::from_secs(30))?;
        let value = |key: &str| -> Option<u32> {
            first.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        };
        let (Some(primary_port), Some(replica_port), Some(primary_pid), Some(replica_pid)) =
            (value("PRIMARY_PORT"), value("REPLICA_PORT"), value("PRIMARY_PID"), value("REPLICA_PID"))
        else {
            drop(child);
            bail!("trellis-pg-replica did not start (see its output above): {first}");
        };
        eprintln!("xtask: primary on 127.0.0.1:{primary_port}, replica on 127.0.0.1:{replica_port}");
        Ok(PgPair {
            child,
            primary_port: primary_port as u16,
            replica_port: replica_port as u16,
            primary_pid,
            replica_pid,
        })
    }

    /// Waits until the replica has replayed everything written so far.
    fn catch_up(&mut self) -> anyhow::Result<()> {
        let answer = self.child.command("catch-up")?;
        if answer != "caught-up" {
            bail!("catch-up: {answer}");
        }
        Ok(())
    }
}

impl Drop for PgPair {
    fn drop(&mut self) {
        // The child itself stops when dropped, after this.
        eprintln!("xtask: stopping the PostgreSQL primary and replica");
    }
}
