//! `cargo xtask bench <suite>`: benchmarks against release builds on this machine, with a real
//! HTTP load generator (wrk). Results print as Markdown rows for `docs/BENCHMARKS.md`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::flags;
use crate::services::Stack;
use crate::util;

/// The benchmarks' processes declare their streams without byte limits: nats-server reserves
/// each stream's `max_bytes` against its whole store, and every benchmark has a prefix of its own.
pub(crate) const UNLIMITED_STREAMS: [(&str, &str); 4] = [
    ("TRELLIS_EVENTS_STREAM_MAX_BYTES", "unlimited"),
    ("TRELLIS_DLQ_STREAM_MAX_BYTES", "unlimited"),
    ("TRELLIS_REPLAY_STREAM_MAX_BYTES", "unlimited"),
    ("TRELLIS_ADVISORIES_STREAM_MAX_BYTES", "unlimited"),
];

pub fn run(flags: &flags::Bench) -> anyhow::Result<()> {
    match suite(&flags.suite) {
        Some(run) => run(flags),
        None => bail!("unknown bench suite `{}` (known: {})", flags.suite, flags::BENCH_SUITES.join(", ")),
    }
}

/// The suite named `name` (one of [`flags::BENCH_SUITES`]).
fn suite(name: &str) -> Option<fn(&flags::Bench) -> anyhow::Result<()>> {
    Some(match name {
        "api" => api,
        "runtime" => |_| runtime(),
        "search" => search,
        "score" => score,
        "dispute" => crate::bench_dispute::run,
        "cutover" => crate::bench_cutover::run,
        "abuse" => crate::bench_abuse::run,
        "cluster" => crate::bench_cluster::run,
        "console" => crate::bench_console::run,
        _ => return None,
    })
}

/// The machine, for the record.
pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{cores} cores ({cpu})")
}

pub(crate) struct BenchDb {
    pub(crate) url: String,
    pub(crate) psql: PathBuf,
}

impl BenchDb {
    /// Drops and recreates database `name` on the stack's server, and migrates it.
    pub(crate) fn fresh(stack: &Stack, name: &str) -> anyhow::Result<Self> {
        let psql = util::find_program("psql", &[]).context("psql is needed for benchmarks")?;
        let maintenance = replace_database(&stack.database_url, "postgres");
        util::read(
            Command::new(&psql)
                .arg(&maintenance)
                .args(["-qc", &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")]),
        )?;
        util::read(Command::new(&psql).arg(&maintenance).args(["-qc", &format!("CREATE DATABASE {name}")]))?;
        let url = replace_database(&stack.database_url, name);
        util::run(Command::new(release_bin("trellisctl")).args(["migrate", "up"]).env("DATABASE_URL", &url))?;
        Ok(Self { url, psql })
    }

    /// Database `name` on the stack's server as it is, migrated, if it exists.
    pub(crate) fn existing(stack: &Stack, name: &str) -> anyhow::Result<Option<Self>> {
        let psql = util::find_program("psql", &[]).context("psql is needed for benchmarks")?;
        let maintenance = replace_database(&stack.database_url, "postgres");
        let found = util::read(
            Command::new(&psql)
                .arg(&maintenance)
                .args(["-qAtXc", &format!("SELECT 1 FROM pg_database WHERE datname = '{name}'")]),
        )?;
        if found.is_empty() {
            return Ok(None);
        }
        let url = replace_database(&stack.database_url, name);
        util::run(Command::new(release_bin("trellisctl")).args(["migrate", "up"]).env("DATABASE_URL", &url))?;
        Ok(Some(Self { url, psql }))
    }

    pub(crate) fn exec(&self, sql: &str) -> anyhow::Result<String> {
        util::read(Command::new(&self.psql).arg(&self.url).args(["-qAtX", "-v", "ON_ERROR_STOP=1", "-c", sql]))
    }
}

pub(crate) fn replace_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').map(|(b, q)| (b, Some(q))).unwrap_or((url, None));
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[scheme_end..].find('/').map(|i| i + scheme_end).unwrap_or(base.len());
    let mut out = format!("{}/{name}", &base[..host_end]);
    if let Some(q) = query {
        out = format!("{out}?{q}");
    }
    out
}

pub(crate) fn release_bin(name: &str) -> PathBuf {
    util::target_dir().join("release").join(name)
}

pub(crate) fn build_release(packages: &[&str]) -> anyhow::Result<()> {
    let mut cmd = util::cargo();
    cmd.args(["build", "--release"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    util::run(&mut cmd)
}

/// A release `trellis-api` on ports the system picks (read from its address file), killed
/// (SIGTERM, then SIGKILL) on drop.
pub(crate) struct Api {
    child: Child,
    pub(crate) url: String,
    /// The admin listener (`/metrics`), `host:port`.
    pub(crate) admin: String,
}

impl Api {
    pub(crate) fn start(db: &BenchDb, stack: &Stack, prefix: &str, extra_env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let log = util::target_dir().join("bench-api.log");
        let mut cmd = Command::new(release_bin("trellis-api"));
        cmd.env("DATABASE_URL", &db.url)
            .env("NATS_URL", &stack.nats_url)
            .envs(UNLIMITED_STREAMS)
            .env("NATS_PREFIX", prefix)
            .env("API_ADDR", "127.0.0.1:0")
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "warn")
            // The benchmarks are one legitimate client that files disputes for seeded (just
            // created) users at full speed: the dispute limits of docs/SECURITY.md are opened.
            .env("DISPUTE_P0_MIN_ACCOUNT_AGE", "0s")
            .env("DISPUTE_OPEN_LIMIT", "1000000000")
            .env("DISPUTE_OPEN_LIMIT_P0", "1000000000")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let (child, addrs) = start_listening("trellis-api", &mut cmd)?;
        let api_addr = addrs["api"].as_str().context("trellis-api reported no API address")?.to_owned();
        let api = Self { child, url: format!("http://{api_addr}"), admin: admin_addr(&addrs)? };
        util::wait_until("trellis-api", Duration::from_secs(30), || {
            Ok(http_status(&api_addr, "/readyz")? == Some(200))
        })?;
        Ok(api)
    }

    /// The process id of the `trellis-api` child.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// A release worker binary on a benchmark's database and NATS prefix, its admin listener on a
/// port the system picks, its log in `target/bench-<name>.log`; stopped (SIGTERM, then SIGKILL)
/// on drop.
pub(crate) struct Worker {
    child: Child,
    /// The admin listener (`/metrics`), `host:port`.
    pub(crate) admin: String,
}

impl Worker {
    pub(crate) fn start(name: &str, db: &BenchDb, stack: &Stack, prefix: &str) -> anyhow::Result<Self> {
        Self::start_with(name, db, stack, prefix, &[])
    }

    /// As [`Worker::start`], with `extra_env` on top.
    pub(crate) fn start_with(
        name: &str,
        db: &BenchDb,
        stack: &Stack,
        prefix: &str,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let log = util::target_dir().join(format!("bench-{name}.log"));
        eprintln!("xtask: bench: {name} (log: {})", log.display());
        let mut cmd = Command::new(release_bin(name));
        cmd.env("DATABASE_URL", &db.url)
            .env("NATS_URL", &stack.nats_url)
            .envs(UNLIMITED_STREAMS)
            .env("NATS_PREFIX", prefix)
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        cmd.envs(extra_env.iter().copied());
        let (child, addrs) = start_listening(name, &mut cmd)?;
        let worker = Self { child, admin: admin_addr(&addrs)? };
        util::wait_until(name, Duration::from_secs(30), || Ok(http_status(&worker.admin, "/readyz")? == Some(200)))?;
        Ok(worker)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// Starts `cmd` with its admin listener on port 0 and an address file, and waits (up to 30 s)
/// for the addresses it reports (`ADDR_FILE`: a JSON object of listener name to address).
fn start_listening(name: &str, cmd: &mut Command) -> anyhow::Result<(Child, serde_json::Value)> {
    let addr_file = util::target_dir().join(format!("bench-{name}.addr"));
    let _ = std::fs::remove_file(&addr_file);
    cmd.env("ADMIN_ADDR", "127.0.0.1:0").env("ADDR_FILE", &addr_file);
    let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let waited = util::wait_until(&format!("{name}'s address file"), Duration::from_secs(30), || {
        if let Some(status) = child.try_wait()? {
            bail!("{name} exited ({status}) before it reported its addresses");
        }
        Ok(addr_file.exists())
    });
    if let Err(e) = waited {
        stop(&mut child);
        return Err(e);
    }
    let text = std::fs::read_to_string(&addr_file).with_context(|| format!("reading {}", addr_file.display()))?;
    let addrs = serde_json::from_str(&text).with_context(|| format!("{} is not JSON: {text}", addr_file.display()))?;
    Ok((child, addrs))
}

fn admin_addr(addrs: &serde_json::Value) -> anyhow::Result<String> {
    Ok(addrs["admin"].as_str().context("no admin address reported")?.to_owned())
}

/// SIGTERM, up to 10 s for a graceful exit, then SIGKILL.
fn stop(child: &mut Child) {
    let _ = crate::services::terminate(child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The status of a GET, or `None` when nothing answers.
pub(crate) fn http_status(host_port: &str, path: &str) -> anyhow::Result<Option<u16>> {
    Ok(http_get(host_port, path)?.and_then(|text| text.split_whitespace().nth(1)?.parse().ok()))
}

/// The whole response to a GET (status line, headers and body), or `None` when nothing answers.
pub(crate) fn http_get(host_port: &str, path: &str) -> anyhow::Result<Option<String>> {
    use std::io::Read as _;
    let Ok(mut stream) = std::net::TcpStream::connect(host_port) else { return Ok(None) };
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host_port}\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    Ok(Some(text))
}

fn wrk() -> anyhow::Result<PathBuf> {
    util::ensure_debian_packages(&[("wrk", "wrk")])?;
    util::find_program("wrk", &[]).context("wrk still missing after installing it")
}

/// CPU time consumed so far: the whole machine's busy time (every process, `/proc/stat`) and one
/// process's (`/proc/<pid>/stat`), in clock ticks.
pub(crate) struct CpuTime {
    machine: u64,
    process: u64,
}

/// The CPU a phase's requests cost each, in microseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuPerRequest {
    pub(crate) machine_us: f64,
    pub(crate) api_us: f64,
}

/// Linux's `USER_HZ`, the unit of `/proc/stat`'s times (100 on every architecture Rust targets).
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

impl CpuTime {
    pub(crate) fn read(pid: u32) -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let cpu = stat.lines().next().context("/proc/stat is empty")?;
        let ticks: Vec<u64> = cpu.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>()?;
        // user, nice, system, idle, iowait, irq, softirq, steal: busy is all but idle, iowait
        // and steal (time the hypervisor gave to someone else).
        let machine = ticks.iter().take(7).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
        let own = std::fs::read_to_string(format!("/proc/{pid}/stat")).context("reading the process's stat")?;
        // The command name (field 2) may hold spaces; the fields after its closing parenthesis
        // start at field 3, so utime and stime (14 and 15) are the 12th and 13th after it.
        let after = own.rsplit_once(')').context("malformed /proc/<pid>/stat")?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let process = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        Ok(Self { machine, process })
    }

    pub(crate) fn since(&self, before: &Self, requests: u64) -> CpuPerRequest {
        let per_request = |ticks: u64| ticks as f64 / CLOCK_TICKS_PER_SECOND * 1e6 / requests.max(1) as f64;
        CpuPerRequest {
            machine_us: per_request(self.machine - before.machine),
            api_us: per_request(self.process - before.process),
        }
    }
}

impl CpuPerRequest {
    fn row(&self, phase: &str) -> String {
        format!(
            "| CPU per request, {phase} | {:.0} µs of the machine, {:.0} µs of them trellis-api's | — |",
            self.machine_us, self.api_us
        )
    }
}

/// What wrk measured.
pub(crate) struct Load {
    pub(crate) requests_per_sec: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    /// The slowest request.
    pub(crate) max_ms: f64,
    pub(crate) requests: u64,
    pub(crate) errors: u64,
}

pub(crate) fn run_wrk(url: &str, connections: u32, seconds: u64, script: &Path) -> anyhow::Result<Load> {
    let out = util::read(
        Command::new(wrk()?)
            // wrk wants no more threads than connections.
            .args([&format!("-t{}", connections.clamp(1, 2)), &format!("-c{connections}")])
            .args([&format!("-d{seconds}s"), "--latency", "-s"])
            .arg(script)
            .arg(url),
    )?;
    eprintln!("{out}");
    let field = |prefix: &str| -> Option<&str> {
        out.lines().map(str::trim).find(|l| l.starts_with(prefix)).and_then(|l| l.split_whitespace().nth(1))
    };
    let requests_per_sec = field("Requests/sec:").context("wrk printed no Requests/sec")?.parse()?;
    let p50_ms = parse_latency(field("50%").context("no p50")?)?;
    let p99_ms = parse_latency(field("99%").context("no p99")?)?;
    // `Latency  <avg> <stdev> <max> <+/- stdev>`
    let max_ms = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("Latency"))
        .and_then(|l| l.split_whitespace().nth(3))
        .map(parse_latency)
        .transpose()?
        .context("no maximum latency")?;
    let requests = out
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let non_2xx = out
        .lines()
        .find(|l| l.contains("Non-2xx or 3xx responses:"))
        .and_then(|l| l.rsplit(':').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let socket_errors: u64 = out
        .lines()
        .find(|l| l.contains("Socket errors:"))
        .map(|l| l.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    Ok(Load { requests_per_sec, p50_ms, p99_ms, max_ms, requests, errors: non_2xx + socket_errors })
}

fn parse_latency(text: &str) -> anyhow::Result<f64> {
    let (number, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic()).context("latency unit")?);
    let value: f64 = number.parse()?;
    Ok(match unit {
        "us" => value / 1000.0,
        "ms" => value,
        "s" => value * 1000.0,
        "m" => value * 60_000.0,
        other => bail!("unknown latency unit {other}"),
    })
}

pub(crate) const READ_SCRIPT: &str = r#"
wrk.method = "GET"
wrk.headers["Authorization"] = "Bearer trl_bench_1"
"#;

// Each request changes a contact row (a new edge, or a new label on an existing one) of a random
// owner, so every request commits a write plus its outbox row.
const WRITE_SCRIPT: &str = r#"
local counter = 0
math.randomseed(os.time() + math.floor(os.clock() * 1000000))
request = function()
  counter = counter + 1
  local owner = math.random(1, 1000)
  local target = math.random(1, 5000)
  if target == owner then target = target % 5000 + 1 end
  local headers = {}
  headers["Authorization"] = "Bearer trl_bench_" .. owner
  headers["Content-Type"] = "application/json"
  local body = '{"label":"l' .. counter .. '-' .. math.random(1, 1000000000) .. '"}'
  return wrk.format("PUT", "/v1/me/contacts/bench_" .. target, headers, body)
end
"#;

/// 5,000 users with known tokens (`trl_bench_<i>` for `bench_<i>`); bench_1 vouches for 50.
pub(crate) const SEED_SQL: &str = "
INSERT INTO identity.users (id, handle, display_name, email, password_hash)
SELECT gen_random_uuid(), 'bench_' || i, 'Bench User ' || i, 'bench_' || i || '@example.com', 'not-a-login-hash'
FROM generate_series(1, 5000) AS i;
INSERT INTO identity.tokens (token_hash, user_id, expires_at)
SELECT sha256(convert_to('trl_' || handle, 'UTF8')), id, now() + interval '1 day' FROM identity.users;
INSERT INTO contacts.contacts (owner_id, contact_id, label)
SELECT o.id, c.id, 'contact ' || c.handle FROM identity.users o, identity.users c
WHERE o.handle = 'bench_1' AND c.handle IN (SELECT 'bench_' || i FROM generate_series(2, 51) AS i);
ANALYZE;
";

fn api(flags: &flags::Bench) -> anyhow::Result<()> {
    if flags.replica {
        return crate::bench_replica::run(flags);
    }
    let stack = Stack::ensure()?;
    build_release(&["trellis-api", "trellisctl"])?;
    let db = BenchDb::fresh(&stack, "trellis_bench")?;
    db.exec(SEED_SQL)?;
    let prefix = format!("bench{}", std::process::id());
    let scripts = util::target_dir().join("bench-scripts");
    std::fs::create_dir_all(&scripts)?;
    let read_script = scripts.join("read.lua");
    let write_script = scripts.join("write.lua");
    std::fs::write(&read_script, READ_SCRIPT)?;
    std::fs::write(&write_script, WRITE_SCRIPT)?;

    let mut rows = Vec::new();
    // The same phases with trace export off (the default) and on, with every
    // span sampled and exported over OTLP to a sink in this process. The difference is the
    // cost of tracing (docs/BENCHMARKS.md).
    let sink = OtlpSink::start()?;
    let endpoint = format!("http://{}", sink.addr);
    let pool_size = flags.db_pool_size.map(|n| n.to_string());
    let pooled: Vec<(&str, &str)> = pool_size.iter().map(|n| ("DB_POOL_SIZE", n.as_str())).collect();
    let mut exporting = pooled.clone();
    exporting.extend([
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_SERVICE_NAME", "trellis-api-bench"),
        ("OTEL_TRACES_SAMPLER", "always_on"),
    ]);
    // The reads in the order off, on, on, off, then the writes in the same order: the means of
    // the two cases then weigh any drift over the run alike. The reads go first, on the
    // database as seeded (and analysed): the writes add contact rows, and with statistics
    // older than them the planner can pick a plan that visits thousands of rows per read.
    const OFF: &str = "export off";
    const ON: &str = "export on, 100 % sampled";
    const ORDER: [&str; 4] = [OFF, ON, ON, OFF];
    let env_of = |tracing: &str| if tracing == ON { &exporting } else { &pooled };
    let mut passes = 0;
    // This machine's limit for the reads, measured right before them at the same concurrency:
    // pgbench's one primary-key lookup a transaction, on the same server and database.
    let pgbench = Pgbench::new(&db)?;
    let select_tps = pgbench.select_only(32, flags.duration)?;
    rows.push(format!(
        "| anchor: pgbench -S (one primary-key lookup a transaction), c=32, same database | {select_tps:.0} tps | — |"
    ));
    let mut reads: Vec<(&str, f64, CpuPerRequest)> = Vec::new();
    for tracing in ORDER {
        let api = Api::start(&db, &stack, &format!("{prefix}{passes}"), env_of(tracing))?;
        passes += 1;
        eprintln!(
            "xtask: bench: trace {tracing}: GET /v1/me/contacts (50 contacts), 32 connections, {}s",
            flags.duration
        );
        // A short warm-up fills the connection pool and the statement caches.
        run_wrk(&format!("{}/v1/me/contacts", api.url), 32, 3, &read_script)?;
        let before = CpuTime::read(api.pid())?;
        let read = run_wrk(&format!("{}/v1/me/contacts", api.url), 32, flags.duration, &read_script)?;
        let cpu = CpuTime::read(api.pid())?.since(&before, read.requests);
        rows.push(row(
            &format!("GET /v1/me/contacts (50 contacts), c=32, trace {tracing}"),
            &read,
            "≥ 8,000 req/s, p99 ≤ 25 ms",
        ));
        rows.push(cpu.row(&format!("GET /v1/me/contacts, trace {tracing}")));
        reads.push((tracing, read.requests_per_sec, cpu));
    }
    // The writes' anchor: their SQL alone (the contact upsert and its outbox row, one
    // transaction, synchronous commit) from pgbench, at the same concurrency.
    let write_tps = pgbench.write_script(32, flags.duration, &scripts)?;
    rows.push(format!(
        "| anchor: pgbench, the write's SQL (contact upsert + outbox row, synchronous commit), c=32 | {write_tps:.0} tps | — |"
    ));
    let mut writes: Vec<(&str, f64, CpuPerRequest)> = Vec::new();
    for tracing in ORDER {
        let api = Api::start(&db, &stack, &format!("{prefix}{passes}"), env_of(tracing))?;
        passes += 1;
        eprintln!("xtask: bench: trace {tracing}: PUT /v1/me/contacts/{{user}} (write + outbox row), 32 connections");
        let events_before: i64 = db.exec("SELECT count(*) FROM ops.outbox")?.parse()?;
        let before = CpuTime::read(api.pid())?;
        let write = run_wrk(&format!("{}/v1/me/contacts/bench_2", api.url), 32, flags.duration, &write_script)?;
        let cpu = CpuTime::read(api.pid())?.since(&before, write.requests);
        let events_after: i64 = db.exec("SELECT count(*) FROM ops.outbox")?.parse()?;
        eprintln!("xtask: bench: {} outbox events written during the write phase", events_after - events_before);
        rows.push(row(
            &format!("PUT /v1/me/contacts/{{user}} (write + outbox), c=32, trace {tracing}"),
            &write,
            "≥ 2,500 req/s",
        ));
        rows.push(cpu.row(&format!("PUT /v1/me/contacts/{{user}}, trace {tracing}")));
        writes.push((tracing, write.requests_per_sec, cpu));
    }
    let mean_of = |of: &[(&str, f64, CpuPerRequest)], case: &str, value: fn(&(&str, f64, CpuPerRequest)) -> f64| {
        let of_case: Vec<f64> = of.iter().filter(|t| t.0 == case).map(value).collect();
        of_case.iter().sum::<f64>() / of_case.len() as f64
    };
    let mean = |of: &[(&str, f64, CpuPerRequest)], case: &str| mean_of(of, case, |t| t.1);
    let machine_us = |of: &[(&str, f64, CpuPerRequest)], case: &str| mean_of(of, case, |t| t.2.machine_us);
    let api_us = |of: &[(&str, f64, CpuPerRequest)], case: &str| mean_of(of, case, |t| t.2.api_us);
    let (read_off, write_off) = (mean(&reads, OFF), mean(&writes, OFF));
    let (read_on, write_on) = (mean(&reads, ON), mean(&writes, ON));
    rows.push(format!(
        "| ratio to this machine's limit (export off) | reads {:.2} of pgbench -S, writes {:.2} of the pgbench write | — |",
        read_off / select_tps,
        write_off / write_tps
    ));
    let loss = |off: f64, on: f64| 100.0 * (off - on) / off;
    rows.push(format!(
        "| trace export on (100 % sampled) vs off, means of two passes each | reads {read_on:.0} vs {read_off:.0} req/s, {:.1} % slower; writes {write_on:.0} vs {write_off:.0} req/s, {:.1} % slower ({} export requests received) | ≤ 10 % each |",
        loss(read_off, read_on),
        loss(write_off, write_on),
        sink.requests()
    ));
    // Throughput on a shared 2-core machine drifts by more than the difference sought; the CPU
    // a request costs (the whole machine's busy time, PostgreSQL, wrk and the sink included,
    // divided by the requests served) does not, and at saturation throughput is its inverse.
    let cost = |of: &[(&str, f64, CpuPerRequest)]| {
        let (off, on) = (machine_us(of, OFF), machine_us(of, ON));
        format!(
            "{on:.0} vs {off:.0} µs ({:.1} % capacity lost; the API's own {:.0} vs {:.0} µs)",
            100.0 * (1.0 - off / on),
            api_us(of, ON),
            api_us(of, OFF)
        )
    };
    rows.push(format!(
        "| machine CPU per request, trace export on (100 % sampled) vs off, means of two passes each | reads {}; writes {} | ≤ 10 % each |",
        cost(&reads),
        cost(&writes)
    ));

    // Relay drain: a 200,000-event backlog written while no relay runs, then one API replica.
    eprintln!("xtask: bench: relay drain of 200,000 outbox events");
    db.exec("DELETE FROM ops.outbox")?;
    db.exec(
        "INSERT INTO ops.outbox (id, subject, payload)
         SELECT id, 'events.bench.noop', jsonb_build_object('id', id, 'type', 'bench.noop', 'version', 1,
             'occurred_at', now(), 'actor_id', null, 'data', jsonb_build_object('n', n))
         FROM (SELECT gen_random_uuid() AS id, n FROM generate_series(1, 200000) AS n) AS g;
         ANALYZE ops.outbox;",
    )?;
    let drain_prefix = format!("{prefix}drain");
    let started = Instant::now();
    let api = Api::start(&db, &stack, &drain_prefix, &[])?;
    util::wait_until("outbox drain", Duration::from_secs(600), || {
        Ok(db.exec("SELECT count(*) FROM ops.outbox WHERE published_at IS NULL")? == "0")
    })?;
    let wall = started.elapsed();
    drop(api);
    let span: f64 = db
        .exec("SELECT EXTRACT(EPOCH FROM max(published_at) - min(published_at)) FROM ops.outbox")?
        .parse()
        .context("drain span")?;
    // Batches are marked published in one statement each, so the first batch's own duration is
    // not in max - min; add one average batch to be conservative.
    let batches = (200_000.0_f64 / 2000.0).ceil();
    let drain_secs = span * (batches + 1.0) / batches;
    let rate = 200_000.0 / drain_secs;
    rows.push(format!(
        "| relay drain, 200,000-event backlog | {rate:.0} events/s ({drain_secs:.2} s from first to last batch; {:.1} s wall incl. start-up) | ≥ 40,000 events/s |",
        wall.as_secs_f64()
    ));

    println!("\nmachine: {}\n", machine());
    println!("| benchmark | result | target |\n|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

/// A sink for OTLP/HTTP exports: answers every request 200 with an empty protobuf body and
/// counts them. Its thread ends with the process.
struct OtlpSink {
    addr: std::net::SocketAddr,
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl OtlpSink {
    fn start() -> anyhow::Result<Self> {
        use std::io::{BufRead as _, BufReader, Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let counted = counted.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(match stream.try_clone() {
                        Ok(s) => s,
                        Err(_) => return,
                    });
                    let mut writer = stream;
                    loop {
                        let mut length = 0usize;
                        let mut line = String::new();
                        // The request line and the headers, up to the blank line.
                        loop {
                            line.clear();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            let header = line.trim_end();
                            if header.is_empty() {
                                break;
                            }
                            if let Some((name, value)) = header.split_once(':')
                                && name.eq_ignore_ascii_case("content-length")
                            {
                                length = value.trim().parse().unwrap_or(0);
                            }
                        }
                        let mut body = vec![0; length];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let answer =
                            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                        if writer.write_all(answer.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(Self { addr, requests })
    }

    fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// pgbench's sessions write outbox rows as the API's request connections do: without a commit
/// notification (the API wakes its own relay).
const AS_THE_API_WRITES: &str = "-c trellis.outbox_notify=off";

/// pgbench on a benchmark's database: the anchors the API's figures are divided by.
struct Pgbench<'a> {
    bin: PathBuf,
    db: &'a BenchDb,
}

/// The write's SQL: the store's contact upsert and an outbox row, in one transaction (the
/// server's default synchronous commit), on the seeded `bench_<i>` users.
const PGBENCH_WRITE_SCRIPT: &str = "\\set owner random(1, 1000)
\\set target random(1, 5000)
BEGIN;
INSERT INTO contacts.contacts AS c (owner_id, contact_id, label)
SELECT o.id, t.id, 'p' || :owner || '-' || :target || '-' || random()
FROM identity.users o, identity.users t
WHERE o.handle = 'bench_' || :owner AND t.handle = 'bench_' || :target AND o.id <> t.id
ON CONFLICT (owner_id, contact_id) DO UPDATE SET label = EXCLUDED.label,
    updated_at = CASE WHEN c.label IS DISTINCT FROM EXCLUDED.label THEN now() ELSE c.updated_at END;
INSERT INTO ops.outbox (id, subject, payload) VALUES (gen_random_uuid(), 'bench.pgbench', '{}');
COMMIT;
";

impl<'a> Pgbench<'a> {
    fn new(db: &'a BenchDb) -> anyhow::Result<Self> {
        let bin =
            crate::services::postgres_tool("pgbench").context("pgbench is needed (Debian: postgresql-contrib)")?;
        Ok(Self { bin, db })
    }

    /// `pgbench -S` against its own tables (scale 10: 1,000,000 accounts), made first.
    fn select_only(&self, clients: u32, seconds: u64) -> anyhow::Result<f64> {
        eprintln!("xtask: bench: pgbench -S, {clients} clients, {seconds}s");
        util::read(Command::new(&self.bin).args(["-i", "-q", "-s", "10"]).arg(&self.db.url))?;
        let tps = self.run(&["-S", "-M", "prepared"], clients, seconds)?;
        self.db.exec("DROP TABLE pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history")?;
        Ok(tps)
    }

    /// pgbench running [`PGBENCH_WRITE_SCRIPT`]; its outbox rows are deleted afterwards, before
    /// any relay can publish them.
    fn write_script(&self, clients: u32, seconds: u64, dir: &Path) -> anyhow::Result<f64> {
        eprintln!("xtask: bench: pgbench, the write's SQL, {clients} clients, {seconds}s");
        let script = dir.join("pgbench-write.sql");
        std::fs::write(&script, PGBENCH_WRITE_SCRIPT)?;
        let tps = self.run(&["-M", "prepared", "-f", &script.to_string_lossy()], clients, seconds)?;
        self.db.exec("DELETE FROM ops.outbox WHERE subject = 'bench.pgbench'; ANALYZE")?;
        Ok(tps)
    }

    /// pgbench with sixteen clients at `rate` transactions a second for `seconds`, in the
    /// background, writing as the API does (no commit notification).
    fn spawn_at_rate(&self, script: &Path, rate: u32, seconds: u64) -> anyhow::Result<Child> {
        Command::new(&self.bin)
            .env("PGOPTIONS", AS_THE_API_WRITES)
            .args(["-n", "-j", "1", "-c", "16", "-M", "prepared", "-R", &rate.to_string()])
            .args(["-T", &seconds.to_string(), "-f"])
            .arg(script)
            .arg(&self.db.url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting pgbench")
    }

    /// pgbench with `clients` clients for `seconds`, writing as the API does, `args` added.
    fn command(&self, args: &[&str], clients: u32, seconds: u64) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("PGOPTIONS", AS_THE_API_WRITES)
            .args(["-n", "-j", "2", "-c", &clients.to_string(), "-T", &seconds.to_string()])
            .args(args)
            .arg(&self.db.url);
        cmd
    }

    fn run(&self, args: &[&str], clients: u32, seconds: u64) -> anyhow::Result<f64> {
        pgbench_tps(&util::read(&mut self.command(args, clients, seconds))?)
    }

    /// [`Pgbench::run`] with every transaction's latency logged (`-l`, in `dir`): the tps, and
    /// the latencies' p50 and p99 in milliseconds.
    fn run_logged(&self, args: &[&str], clients: u32, seconds: u64, dir: &Path) -> anyhow::Result<(f64, f64, f64)> {
        let log_dir = dir.join("pgbench-log");
        let _ = std::fs::remove_dir_all(&log_dir);
        std::fs::create_dir_all(&log_dir)?;
        let out = util::read(self.command(&[args, &["-l"]].concat(), clients, seconds).current_dir(&log_dir))?;
        // One line a transaction: client, transaction, latency in µs, script, epoch, µs.
        let mut latencies_us = Vec::new();
        for entry in std::fs::read_dir(&log_dir)? {
            let text = std::fs::read_to_string(entry?.path())?;
            latencies_us.extend(text.lines().filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok()));
        }
        std::fs::remove_dir_all(&log_dir)?;
        if latencies_us.is_empty() {
            bail!("pgbench logged no transaction");
        }
        latencies_us.sort_by(f64::total_cmp);
        let at = |q: f64| latencies_us[((latencies_us.len() as f64 * q) as usize).min(latencies_us.len() - 1)] / 1000.0;
        Ok((pgbench_tps(&out)?, at(0.50), at(0.99)))
    }
}

/// CPU time consumed so far by the programs a benchmark runs, by program name (`comm`), in
/// clock ticks.
struct CpuByProgram {
    at: Instant,
    ticks: std::collections::BTreeMap<String, u64>,
}

impl CpuByProgram {
    fn read() -> anyhow::Result<Self> {
        let mut ticks = std::collections::BTreeMap::new();
        for entry in std::fs::read_dir("/proc")? {
            let Ok(entry) = entry else { continue };
            if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            // Processes come and go while this reads.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
            let name = stat[open + 1..close].to_owned();
            let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
            // utime and stime: fields 14 and 15 of stat(5), 11 and 12 after the name.
            let used = fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
                + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            *ticks.entry(name).or_insert(0) += used;
        }
        Ok(Self { at: Instant::now(), ticks })
    }

    /// The programs that used at least 0.01 of a core since `before`, busiest first.
    fn since(&self, before: &Self) -> String {
        let seconds = self.at.duration_since(before.at).as_secs_f64();
        let mut used: Vec<(f64, &str)> = self
            .ticks
            .iter()
            .map(|(name, t)| {
                let t0 = before.ticks.get(name).copied().unwrap_or(0);
                (t.saturating_sub(t0) as f64 / CLOCK_TICKS_PER_SECOND / seconds, name.as_str())
            })
            .filter(|(cores, _)| *cores >= 0.01)
            .collect();
        used.sort_by(|a, b| b.0.total_cmp(&a.0));
        used.iter().map(|(cores, name)| format!("{name} {cores:.2}")).collect::<Vec<_>>().join(", ")
    }
}

/// Samples `pg_stat_activity` every 10 ms from one backend of its own: what the database's
/// other active backends wait on (`CPU` when on none), as shares of all samples.
struct WaitSampler(Child);

impl WaitSampler {
    fn start(db: &BenchDb, seconds: u64) -> anyhow::Result<Self> {
        // A transaction a sample: a 15 s one would hold back the cleanup of the projector's
        // dead rows, which is part of what is measured.
        let sample = format!(
            "DO $$ BEGIN
                 FOR i IN 1..{samples} LOOP
                     INSERT INTO waits SELECT COALESCE(wait_event_type || ':' || wait_event, 'CPU')
                     FROM pg_stat_activity
                     WHERE datname = current_database() AND backend_type = 'client backend'
                       AND state = 'active' AND pid <> pg_backend_pid();
                     COMMIT;
                     PERFORM pg_sleep(0.01);
                 END LOOP;
             END $$",
            samples = seconds * 90
        );
        let child = Command::new(&db.psql)
            .arg(&db.url)
            .args(["-qAtX", "-v", "ON_ERROR_STOP=1", "-c", "CREATE TEMP TABLE waits (what text)", "-c"])
            .arg(sample)
            .args([
                "-c",
                "SELECT string_agg(format('%s %s %%', what, round(100.0 * n / total, 1)), ', ' ORDER BY n DESC)
                 FROM (SELECT what, count(*) AS n, sum(count(*)) OVER () AS total FROM waits GROUP BY what) w",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting psql")?;
        Ok(Self(child))
    }

    fn finish(self) -> anyhow::Result<String> {
        let out = self.0.wait_with_output()?;
        if !out.status.success() {
            bail!("sampling pg_stat_activity failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

/// The `tps = …` of pgbench's report.
fn pgbench_tps(out: &str) -> anyhow::Result<f64> {
    let line =
        out.lines().find(|l| l.starts_with("tps = ")).with_context(|| format!("pgbench printed no tps:\n{out}"))?;
    line["tps = ".len()..].split_whitespace().next().context("tps")?.parse().context("tps")
}

/// One new score of a random seeded user (`u<i>`) with its `scores.updated` event in the
/// outbox, in one transaction: a change of the documents the searches read (the directory row,
/// its place in the score order, its name postings) that touches no other document (a rename
/// also re-projects the contact documents of everyone who has the user as a contact).
fn rescore_sql(users: u64) -> String {
    format!(
        "\\set u random(1, {last})
BEGIN;
WITH e AS (SELECT gen_random_uuid() AS id, now() AS at),
     rescored AS (
         UPDATE score.user_scores s SET score = floor(random() * 1001)::int, computed_at = now()
         FROM identity.users u WHERE u.handle = 'u' || :u AND s.user_id = u.id
         RETURNING s.user_id, s.score, s.run_id)
INSERT INTO ops.outbox (id, subject, payload, created_at)
SELECT e.id, 'events.scores.updated',
       jsonb_build_object('id', e.id, 'type', 'scores.updated', 'version', 1, 'occurred_at', e.at,
                          'actor_id', NULL,
                          'data', jsonb_build_object('run_id', r.run_id, 'scores',
                                                     jsonb_build_array(jsonb_build_object('user_id', r.user_id,
                                                                                          'score', r.score)))),
       e.at
FROM e, rescored r;
COMMIT;
",
        last = users.saturating_sub(1).max(1),
    )
}

fn row(name: &str, load: &Load, target: &str) -> String {
    format!(
        "| {name} | {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms ({} requests, {} errors) | {target} |",
        load.requests_per_sec, load.p50_ms, load.p99_ms, load.requests, load.errors
    )
}

/// The worker runtime: a 200,000-message drain through a no-op handler, and a 50,000-message
/// DLQ replay with `trellisctl` (the program is `crates/runtime/benches/runtime.rs`).
fn runtime() -> anyhow::Result<()> {
    let stack = Stack::ensure()?;
    build_release(&["trellisctl"])?;
    let db = BenchDb::fresh(&stack, "trellis_bench_runtime")?;
    let mut cmd = util::cargo();
    cmd.args(["bench", "-q", "-p", "trellis-runtime", "--bench", "runtime"])
        .env("DATABASE_URL", &db.url)
        .env("NATS_URL", &stack.nats_url)
        .env("TRELLISCTL", release_bin("trellisctl"));
    let rows = util::read(&mut cmd)?;
    println!("\nmachine: {}\n", machine());
    println!("| benchmark | result | target |\n|---|---|---|\n{rows}");
    Ok(())
}

/// Database `name` holding exactly `users` seeded users with `avg_contacts` contacts each on
/// average (`cargo xtask seed`'s loader): reused when it holds exactly that graph (users with the
/// handle `besides` not counted), seeded afresh otherwise.
pub(crate) fn seeded_graph(
    stack: &Stack,
    name: &str,
    users: u64,
    avg_contacts: u64,
    besides: Option<&str>,
) -> anyhow::Result<BenchDb> {
    let contacts = users.saturating_mul(avg_contacts);
    if let Some(db) = BenchDb::existing(stack, name)? {
        let besides = besides.map(|h| format!(" WHERE handle <> '{h}'")).unwrap_or_default();
        let counts = db.exec(&format!(
            "SELECT (SELECT count(*) FROM identity.users{besides}), (SELECT count(*) FROM contacts.contacts)"
        ))?;
        if counts == format!("{users}|{contacts}") {
            eprintln!("xtask: bench: {name} already holds {users} users and {contacts} contacts; not reseeding");
            return Ok(db);
        }
    }
    eprintln!("xtask: bench: seeding {name} with {users} users, {avg_contacts} contacts each on average");
    let db = BenchDb::fresh(stack, name)?;
    let options = crate::seed::Options { users, avg_contacts: avg_contacts as f64, verified_fraction: 0.1, seed: 42 };
    let summary = crate::seed::load(&db.psql, &db.url, &options, crate::seed::Mode::Empty)?;
    eprintln!(
        "xtask: bench: seeded {} users, {} contacts in {:.1} s",
        summary.users,
        summary.contacts,
        summary.wall.as_secs_f64()
    );
    Ok(db)
}

/// The score orchestrator: one full run (`score-orchestrator --run-once`) over a seeded graph of
/// `--users` users (default 1,000,000) with 20 contacts each on average, timed end to end, with
/// the process's peak RSS and the phases from the run's record. The graph lives in database
/// `trellis_bench_score` and is seeded again only when it does not hold exactly that graph.
/// Before the run, `score.user_scores` is emptied, so that the run writes every score (the worst
/// case of the write phase; a run over an unchanged graph writes none).
fn score(flags: &flags::Bench) -> anyhow::Result<()> {
    const DB: &str = "trellis_bench_score";
    const AVG_CONTACTS: u64 = 20;
    let users = flags.users.unwrap_or(1_000_000);
    let stack = Stack::ensure()?;
    build_release(&["trellisctl"])?;

    let db = seeded_graph(&stack, DB, users, AVG_CONTACTS, None)?;

    build_release(&["score-orchestrator"])?;
    db.exec("TRUNCATE score.user_scores")?;
    // A checkpoint now rather than in the middle of the run.
    db.exec("CHECKPOINT")?;
    let log = util::target_dir().join("bench-score.log");
    let summary = util::target_dir().join("bench-score.json");
    eprintln!("xtask: bench: score-orchestrator --run-once (log: {})", log.display());
    let run = measure(
        Command::new(release_bin("score-orchestrator"))
            .arg("--run-once")
            .env("DATABASE_URL", &db.url)
            .env("NATS_URL", &stack.nats_url)
            .envs(UNLIMITED_STREAMS)
            .env("NATS_PREFIX", format!("bench{}score", std::process::id()))
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(&summary)?)
            .stderr(std::fs::File::create(&log)?),
        Duration::from_secs(30 * 60),
    )?;
    eprintln!("{}", std::fs::read_to_string(&summary).unwrap_or_default().trim());
    if !run.status.success() {
        bail!("score-orchestrator --run-once failed ({}); see {}", run.status, log.display());
    }
    let record = db.exec(
        "SELECT status, users, edges, iterations, residual, scores_changed, load_ms, compute_ms, write_ms
         FROM score.runs ORDER BY created_at DESC LIMIT 1",
    )?;
    let fields: Vec<&str> = record.split('|').collect();
    let [status, run_users, edges, iterations, residual, changed, load_ms, compute_ms, write_ms] = fields[..] else {
        bail!("no run record in score.runs (got `{record}`)");
    };
    let ms = |text: &str| -> f64 { text.parse().unwrap_or(f64::NAN) };
    let count = |text: &str| -> String { text.parse().map_or_else(|_| text.to_owned(), crate::seed::thousands) };
    let (wall_target, compute_target, memory_target) =
        if users == 1_000_000 { ("≤ 20 s", "≤ 2 s", "≤ 1 GiB") } else { ("—", "—", "—") };
    let graph = format!("{} users, {} edges", count(run_users), count(edges));
    println!("\nmachine: {}\n", machine());
    println!("| benchmark | result | target |\n|---|---|---|");
    println!(
        "| score run, {graph}, end to end | {:.2} s wall (load {:.2} s, compute {:.2} s, write {:.2} s; {iterations} iterations, residual {:.1e}; {} scores written; status {status}) | {wall_target} |",
        run.wall.as_secs_f64(),
        ms(load_ms) / 1000.0,
        ms(compute_ms) / 1000.0,
        ms(write_ms) / 1000.0,
        ms(residual),
        count(changed),
    );
    println!("| score compute phase, {graph} | {:.0} ms | {compute_target} |", ms(compute_ms));
    println!("| score peak memory (VmHWM), {graph} | {:.0} MiB | {memory_target} |", run.peak_rss_kib as f64 / 1024.0);
    Ok(())
}

/// How a measured process went.
struct Measured {
    status: std::process::ExitStatus,
    wall: Duration,
    /// The largest `VmHWM` seen in `/proc/<pid>/status`, polled every 50 ms.
    peak_rss_kib: u64,
}

/// Runs `cmd` to completion, timing it and sampling its peak resident memory; kills it after
/// `timeout`.
fn measure(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("cannot run `{}`", util::display(cmd)))?;
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_rss_kib = 0;
    loop {
        // Read before checking for exit: once reaped, the process's memory figures are gone.
        if let Ok(status) = std::fs::read_to_string(&status_file) {
            let hwm = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
            peak_rss_kib = peak_rss_kib.max(hwm.unwrap_or(0));
        }
        if let Some(status) = child.try_wait()? {
            return Ok(Measured { status, wall: started.elapsed(), peak_rss_kib });
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{}` still running after {} s; killed it", util::display(cmd), timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Search query latency over 1,000,000 seeded users (the database of `bench score`, seeded if
/// needed): handle-prefix queries and name queries, each with wrk at concurrency 16, answered
/// from the read model.
fn search(flags: &flags::Bench) -> anyhow::Result<()> {
    const DB: &str = "trellis_bench_score";
    const RESCORES_PER_SEC: u32 = 500;
    const SLOW_STATEMENT_MS: u32 = 50;
    let stack = Stack::ensure()?;
    build_release(&["trellis-api", "trellisctl", "search-projector"])?;
    let users = flags.users.unwrap_or(1_000_000);
    let db = match BenchDb::existing(&stack, DB)? {
        Some(db) if db.exec("SELECT count(*) FROM identity.users")? == users.to_string() => db,
        _ => {
            eprintln!("xtask: bench: seeding {DB} with {users} users");
            let db = BenchDb::fresh(&stack, DB)?;
            let options = crate::seed::Options { users, avg_contacts: 20.0, verified_fraction: 0.1, seed: 42 };
            crate::seed::load(&db.psql, &db.url, &options, crate::seed::Mode::Empty)?;
            db
        }
    };
    // Ranking reads scores: without a run, every score is NULL and the order is trivial.
    if db.exec("SELECT count(*) FROM score.user_scores")? == "0" {
        build_release(&["score-orchestrator"])?;
        eprintln!("xtask: bench: no scores yet: score-orchestrator --run-once");
        let status = Command::new(release_bin("score-orchestrator"))
            .arg("--run-once")
            .env("DATABASE_URL", &db.url)
            .env("NATS_URL", &stack.nats_url)
            .envs(UNLIMITED_STREAMS)
            .env("NATS_PREFIX", format!("bench{}search", std::process::id()))
            .stdout(std::process::Stdio::null())
            .status()?;
        if !status.success() {
            bail!("score-orchestrator --run-once failed ({status})");
        }
    }
    // The directory documents and their name postings, as the projection writes them (the
    // contact documents, 20M of them, are not read by this benchmark).
    if db.exec("SELECT count(*) FROM search.name_postings")? == "0" {
        eprintln!("xtask: bench: trellisctl search rebuild --only directory");
        let status = Command::new(release_bin("trellisctl"))
            .args(["--database-url", &db.url, "search", "rebuild", "--only", "directory"])
            .stdout(std::process::Stdio::null())
            .status()?;
        if !status.success() {
            bail!("trellisctl search rebuild failed ({status})");
        }
    }
    db.exec(
        "UPDATE search.checkpoint SET last_event_at = GREATEST(now(), (SELECT max(created_at) FROM ops.outbox)),
             updated_at = now();
         INSERT INTO identity.tokens (token_hash, user_id, expires_at)
         SELECT sha256(convert_to('trl_bench_search', 'UTF8')), id, now() + interval '1 day'
         FROM identity.users WHERE handle = 'u1'
         ON CONFLICT (token_hash) DO UPDATE SET expires_at = EXCLUDED.expires_at, revoked_at = NULL;
         -- Events of the seeding and the score run, not this benchmark's: the relay below
         -- publishes only the new scores.
         UPDATE ops.outbox SET published_at = now() WHERE published_at IS NULL;",
    )?;
    db.exec("VACUUM ANALYZE search.directory")?;
    db.exec("VACUUM ANALYZE search.name_postings")?;
    // Every statement slower than 50 ms, with its plan, goes to the client that ran it as a
    // warning, which the API and the projector log (`target/bench-api.log`,
    // `target/bench-search-projector.log`): the slow tail shows its plans.
    db.exec(&format!(
        "ALTER DATABASE {DB} SET session_preload_libraries = 'auto_explain';
         ALTER DATABASE {DB} SET auto_explain.log_min_duration = '{SLOW_STATEMENT_MS}ms';
         ALTER DATABASE {DB} SET auto_explain.log_level = 'warning';"
    ))?;
    let scripts = util::target_dir().join("bench-scripts");
    std::fs::create_dir_all(&scripts)?;
    let prefix_script = scripts.join("search-prefix.lua");
    let name_script = scripts.join("search-name.lua");
    let rescore_script = scripts.join("search-rescore.sql");
    std::fs::write(&prefix_script, SEARCH_PREFIX_SCRIPT.replace("USERS", &users.to_string()))?;
    let lua_names = SEARCH_NAMES.iter().map(|n| format!("\"{}\"", n.replace(' ', "%20"))).collect::<Vec<_>>();
    std::fs::write(&name_script, SEARCH_NAME_SCRIPT.replace("NAMES", &lua_names.join(", ")))?;
    let (handle_anchor, name_anchor) = search_anchor_scripts(users);
    let handle_anchor_script = scripts.join("search-prefix-anchor.sql");
    let name_anchor_script = scripts.join("search-name-anchor.sql");
    std::fs::write(&handle_anchor_script, handle_anchor)?;
    std::fs::write(&name_anchor_script, name_anchor)?;
    std::fs::write(&rescore_script, rescore_sql(users))?;
    // The read model changes while people search: `RESCORES_PER_SEC` new scores a second, each
    // with its outbox row in one transaction, published by the API's relay and applied by a
    // search projector of its own.
    let prefix = format!("bench{}search", std::process::id());
    let pool_size = flags.db_pool_size.map(|n| n.to_string());
    let mut api_env: Vec<(&str, &str)> = pool_size.iter().map(|n| ("DB_POOL_SIZE", n.as_str())).collect();
    // The new scores stand for the API's own writes, which do not notify (notifying commits take
    // a database-wide lock in turn, across their WAL flush: four notifying writers met a third to
    // three quarters of the rate while the searches had the CPU). The API's writes wake its relay
    // in-process, and `RELAY_MIN_BATCH_INTERVAL` (10 ms) gathers the wakes that come faster;
    // pgbench cannot wake the relay, so the relay looks every 10 ms instead.
    api_env.push(("RELAY_POLL_INTERVAL", "10ms"));
    let api = Api::start(&db, &stack, &prefix, &api_env)?;
    let projector = Worker::start("search-projector", &db, &stack, &prefix)?;
    let phase_start = db.exec("SELECT now()")?;
    eprintln!("xtask: bench: {RESCORES_PER_SEC} new scores a second meanwhile (pgbench --rate)");
    // Each measurement starts from vacuumed tables, the read model's and the writers' (the
    // outbox, whose unpublished index every claim of the relay walks, and the scores): the
    // writes leave dead rows and index entries behind, which slow the searches and the relay
    // down as they pile up (autovacuum, where it runs, waits for a fifth of a table to be dead),
    // and the two measurements compared must meet as many.
    let vacuum = || db.exec("VACUUM search.directory, search.name_postings, ops.outbox, score.user_scores");
    // New scores written a second since a mark: the searches compete with the writer for the
    // CPU, and a phase that starves it meets fewer writes than asked for.
    let written = || -> anyhow::Result<(Instant, f64)> {
        let n = db.exec("SELECT count(*) FROM ops.outbox WHERE subject = 'events.scores.updated'")?.parse()?;
        Ok((Instant::now(), n))
    };
    let rate_since = |(at, n): (Instant, f64)| -> anyhow::Result<f64> {
        let (now, m) = written()?;
        Ok((m - n) / now.duration_since(at).as_secs_f64())
    };
    // Stopped once the searches are measured.
    let mut rescores = Pgbench::new(&db)?.spawn_at_rate(&rescore_script, RESCORES_PER_SEC, 3600)?;
    let all_written = written()?;
    let mut rows = Vec::new();
    let pgbench = Pgbench::new(&db)?;
    for (name, script, anchor) in
        [("handle prefix", &prefix_script, &handle_anchor_script), ("name", &name_script, &name_anchor_script)]
    {
        // This machine's limit for the same searches: the statement alone, from pgbench, at the
        // same concurrency and with the same writer going on.
        vacuum()?;
        eprintln!("xtask: bench: pgbench, search.find_users alone, {name} queries, 16 clients, {}s", flags.duration);
        let before = written()?;
        let (anchor_tps, anchor_p50, anchor_p99) =
            pgbench.run_logged(&["-M", "prepared", "-f", &anchor.to_string_lossy()], 16, flags.duration, &scripts)?;
        let anchor_writes = rate_since(before)?;
        eprintln!("xtask: bench: GET /v1/search/users, {name} queries, 16 connections, {}s", flags.duration);
        run_wrk(&format!("{}/v1/search/users", api.url), 16, 3, script)?;
        vacuum()?;
        let waits = WaitSampler::start(&db, flags.duration)?;
        let cpu = CpuByProgram::read()?;
        let before = written()?;
        let load = run_wrk(&format!("{}/v1/search/users", api.url), 16, flags.duration, script)?;
        let api_writes = rate_since(before)?;
        rows.push(format!(
            "| new scores written a second during the {name} queries' anchor / through the API | {anchor_writes:.0} / {api_writes:.0} | {RESCORES_PER_SEC} |"
        ));
        rows.push(format!(
            "| CPU during the {name} queries, in cores (of 2) | {} | — |",
            CpuByProgram::read()?.since(&cpu)
        ));
        rows.push(format!(
            "| anchor: pgbench, the {name} searches' statement alone (`search.find_users`), c=16, same writer | {anchor_tps:.0} tps, p50 {anchor_p50:.2} ms, p99 {anchor_p99:.2} ms; the API's {:.0} req/s are {:.2} of it | — |",
            load.requests_per_sec,
            load.requests_per_sec / anchor_tps
        ));
        rows.push(format!(
            "| what the busy backends were doing during the {name} queries (`pg_stat_activity` every 10 ms) | {} | — |",
            waits.finish()?
        ));
        rows.push(format!(
            "| GET /v1/search/users, {name} queries, {users} users, c=16, {RESCORES_PER_SEC} new scores/s applied meanwhile | {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms ({} requests, {} errors) | p99 ≤ 20 ms |",
            load.requests_per_sec, load.p50_ms, load.p99_ms, load.max_ms, load.requests, load.errors
        ));
    }
    let queried = all_written.0.elapsed();
    let _ = rescores.kill();
    let _ = rescores.wait();
    let rescored_per_sec = rate_since(all_written)?;
    // Users are picked at random: about one in 2,000 picks a user picked before.
    let applied: f64 =
        db.exec(&format!("SELECT count(*) FROM search.directory WHERE projected_at >= '{phase_start}'"))?.parse()?;
    let metrics = http_get(&api.admin, "/metrics")?.context("the API's /metrics did not answer")?;
    let fallbacks = metrics
        .lines()
        .find(|l| l.starts_with("trellis_search_fallbacks_total{endpoint=\"users\"}"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or("0")
        .to_owned();
    drop(projector);
    drop(api);
    let slow = |log: &str| -> anyhow::Result<usize> {
        let text = std::fs::read_to_string(util::target_dir().join(log)).unwrap_or_default();
        Ok(text.lines().filter(|l| l.contains("duration:") && l.contains("Query Text")).count())
    };
    rows.push(format!(
        "| new scores during the queries (pgbench --rate {RESCORES_PER_SEC}) | {:.0}/s written, {:.0} documents/s re-projected by the projector over {:.0} s; searches answered from the database: {fallbacks} | — |",
        rescored_per_sec,
        applied / queried.as_secs_f64(),
        queried.as_secs_f64()
    ));
    rows.push(format!(
        "| statements over {SLOW_STATEMENT_MS} ms (auto_explain) | API {}, projector {} | — |",
        slow("bench-api.log")?,
        slow("bench-search-projector.log")?
    ));
    db.exec(&format!("ALTER DATABASE {DB} RESET ALL"))?;

    // The projector's ingest, coalescing and freshness (crates' bench program, fresh database).
    let projector_db = BenchDb::fresh(&stack, "trellis_bench_projector")?;
    let mut cmd = util::cargo();
    cmd.args(["bench", "-q", "-p", "search-projector", "--bench", "projector"])
        .env("DATABASE_URL", &projector_db.url)
        .env("NATS_URL", &stack.nats_url);
    eprintln!("xtask: bench: search projector ingest, coalescing and freshness");
    rows.extend(util::read(&mut cmd)?.lines().map(str::to_owned));

    println!("\nmachine: {}\n", machine());
    println!("| benchmark | result | target |\n|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

// Prefixes of random seeded handles (`u<i>`), 3 to 6 characters: from a few hundred thousand
// matches (`u12`) down to one.
const SEARCH_PREFIX_SCRIPT: &str = r#"
math.randomseed(os.time() + math.floor(os.clock() * 1000000))
wrk.headers["Authorization"] = "Bearer trl_bench_search"
request = function()
  local handle = "u" .. math.random(1, USERS)
  local q = string.sub(handle, 1, math.random(3, math.min(6, #handle)))
  return wrk.format("GET", "/v1/search/users?q=" .. q)
end
"#;

// First and last names of the seed's word lists (each in about 1.6 % of names), some with one
// typo, word prefixes down to 2 characters, and two-word names.
const SEARCH_NAME_SCRIPT: &str = r#"
math.randomseed(os.time() + math.floor(os.clock() * 1000000))
wrk.headers["Authorization"] = "Bearer trl_bench_search"
local names = {NAMES}
request = function()
  return wrk.format("GET", "/v1/search/users?q=" .. names[math.random(1, #names)])
end
"#;

/// The name queries: the seed's words, some with a typo, word prefixes, two-word names.
const SEARCH_NAMES: &[&str] = &[
    "maria",
    "nakamura",
    "fischer",
    "priya",
    "okafor",
    "williams",
    "rafael",
    "gonzalez",
    "mohammed",
    "schmidt",
    "astrid",
    "kowalski",
    "marai",
    "fischr",
    "wiliams",
    "schmit",
    "lee",
    "kim",
    "ana",
    "ma",
    "sch",
    "nak",
    "maria garcia",
    "liam smith",
    "priya patl",
];

/// The searches' statement alone, as the API runs it (`search.find_users`), for pgbench: the
/// same handle prefixes as [`SEARCH_PREFIX_SCRIPT`], and the same names.
fn search_anchor_scripts(users: u64) -> (String, String) {
    const CALL: &str = "SELECT * FROM search.find_users(sha256(convert_to('trl_bench_search', 'UTF8')), \
                        interval '1 hour', lower(:q), :q, 21, 2000);";
    let handles = format!(
        "\\set u random(1, {users})\n\\set len random(3, 6)\n{}\n",
        CALL.replace(":q", "left('u' || :u, least(:len, char_length('u' || :u)))")
    );
    let list = SEARCH_NAMES.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ");
    let names =
        format!("\\set i random(1, {})\n{}\n", SEARCH_NAMES.len(), CALL.replace(":q", &format!("(ARRAY[{list}])[:i]")));
    (handles, names)
}

#[cfg(test)]
mod suite_tests {
    #[test]
    fn every_listed_suite_runs_and_no_other() {
        for name in crate::flags::BENCH_SUITES {
            assert!(super::suite(name).is_some(), "{name}");
        }
        assert!(super::suite("nope").is_none());
    }
}
