//! `cargo xtask bench cutover`: what a change of a cutover flag costs.
//!
//! 1. **Propagation.** A release `trellis-api` and a release `search-projector` on a fresh
//!    database; `search.executor` is flipped 50 times with `trellisctl flags set`, and each flip
//!    is timed from the moment `trellisctl` returns (the change is committed) until both
//!    processes export the new value (`trellis_cutover_flag_state`), scraped every 5 ms.
//! 2. **Throughput around a flip**, for the search projector and the dispute processor. A fresh
//!    database per processor with 10,000 users (bearer tokens for 1,000 of them), the flag at
//!    `monolith`, a release `trellis-api` (executing) and the release worker (standing by). A
//!    steady load of `--rate` writes per second (default 500) goes through the API: contact
//!    upserts for the projector (every event reaches it), disputes at all four priorities for the
//!    dispute processor. After 5 s of it, each process's processed-message counter
//!    (`trellis_worker_messages_total{consumer,outcome="ok"}`) is scraped every second for 10 s,
//!    and the flag is set to `worker` after the fifth scrape. "Before" and "after" are the mean
//!    rates of the 5 s on either side of the flip; the dip is the sum over the 5 s after the flip
//!    of what fell short of the rate before (messages processed late). None may be lost: once the
//!    load stops, the two processes together must have processed every event the consumers
//!    were sent, or the benchmark fails.
//! 3. **Score runs around a flip.** A run is a batch: a request is one message and its cost is a
//!    run, so messages per second say nothing. What a flip costs is the wait for a run: on a
//!    `--users` graph (default 100,000 users, 20 contacts each), a run is requested through the
//!    API every 0.5 s for 10 s while `score.executor` moves from `monolith` to `worker` in the
//!    middle; each request's wait runs from the request to the end of the first run that started
//!    after it (the run that serves it), and each run is attributed to the process that made it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::json;

use crate::bench::{Api, BenchDb, Worker, build_release, http_get, machine, release_bin};
use crate::flags;
use crate::services::Stack;
use crate::util;

const FLIPS: usize = 50;
/// Scrapes on each side of a flip, one a second.
const SIDE: u64 = 5;
/// Users that hold bearer tokens (`trl_bench_cutover_<k>` for `u<k>`).
const WRITERS: u64 = 1000;
const LOAD_THREADS: u64 = 4;

pub fn run(flags: &flags::Bench) -> anyhow::Result<()> {
    let rate = flags.rate.unwrap_or(500);
    ensure!(rate > 0, "--rate must be at least 1");
    let stack = Stack::ensure()?;
    build_release(&["trellis-api", "search-projector", "dispute-processor", "score-orchestrator", "trellisctl"])?;
    let propagation = propagation(&stack)?;
    let search = throughput(&stack, Processor::Search, rate)?;
    let dispute = throughput(&stack, Processor::Dispute, rate)?;
    let score = score(&stack, flags.users.unwrap_or(100_000))?;

    println!("\nmachine: {}\n", machine());
    println!("| benchmark | result | target |\n|---|---|---|");
    println!("{propagation}");
    for t in [&search, &dispute] {
        println!("{}", t.summary(rate));
    }
    println!("{}", score.summary);
    for t in [&search, &dispute] {
        println!("\n{}, {rate} writes/s, flag set to `worker` at 0 s:\n", t.processor.name());
        println!("{}", t.table());
    }
    println!("\nscore runs requested every 0.5 s, `score.executor` set to `worker` at 0 s:\n");
    println!("{}", score.table);
    Ok(())
}

/// Sets a cutover flag with `trellisctl flags set`.
fn set_flag(db: &BenchDb, flag: &str, value: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new(release_bin("trellisctl"))
        .args(["--database-url", &db.url, "flags", "set", flag, value])
        // Flips, not promotions: past the promotion gate.
        .args(["--reason", "cargo xtask bench cutover", "--actor", "xtask", "--force"])
        .stdout(std::process::Stdio::null())
        .status()
        .context("running trellisctl flags set")?;
    ensure!(status.success(), "trellisctl flags set {flag} {value} failed ({status})");
    Ok(())
}

fn propagation(stack: &Stack) -> anyhow::Result<String> {
    let db = BenchDb::fresh(stack, "trellis_bench_cutover")?;
    let prefix = format!("bench{}cutover", std::process::id());
    let api = Api::start(&db, stack, &prefix, &[])?;
    let worker = Worker::start("search-projector", &db, stack, &prefix)?;
    let (api_admin, worker_admin) = (&api.admin, &worker.admin);

    let mut samples = Vec::with_capacity(FLIPS);
    for i in 0..FLIPS {
        let value = if i % 2 == 0 { "monolith" } else { "worker" };
        set_flag(&db, "search.executor", value)?;
        let committed = Instant::now();
        let series = format!("trellis_cutover_flag_state{{flag=\"search.executor\",value=\"{value}\"}} 1");
        for admin in [api_admin, worker_admin] {
            while !http_get(admin, "/metrics")?.unwrap_or_default().lines().any(|line| line.trim_end() == series) {
                ensure!(committed.elapsed() < Duration::from_secs(10), "{value} did not reach {admin} within 10 s");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        samples.push(committed.elapsed());
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0;
    Ok(format!(
        "| cutover flag propagation to trellis-api and search-projector, {FLIPS} flips | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms | p99 ≤ 2 s |",
        at(0.5),
        at(0.99),
        at(1.0)
    ))
}

#[derive(Clone, Copy)]
enum Processor {
    Search,
    Dispute,
}

impl Processor {
    fn name(self) -> &'static str {
        match self {
            Processor::Search => "search projector",
            Processor::Dispute => "dispute processor",
        }
    }

    fn binary(self) -> &'static str {
        match self {
            Processor::Search => "search-projector",
            Processor::Dispute => "dispute-processor",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Processor::Search => "search.executor",
            Processor::Dispute => "dispute.executor",
        }
    }

    /// How its consumers' `consumer` label starts (the dispute processor has one consumer per
    /// priority, `dispute-processor-p0` …; the projector's label is matched whole).
    fn consumers(self) -> &'static str {
        match self {
            Processor::Search => "consumer=\"search-projector\"",
            Processor::Dispute => "consumer=\"dispute-processor-p",
        }
    }

    /// The events its consumers receive, counted in the outbox.
    fn events_sql(self) -> &'static str {
        match self {
            Processor::Search => "SELECT count(*) FROM ops.outbox",
            Processor::Dispute => "SELECT count(*) FROM ops.outbox WHERE subject LIKE 'events.disputes.filed.%'",
        }
    }

    /// The `k`-th write of the load: one request, one event for this processor.
    fn write(self, http: &ureq::Agent, url: &str, k: u64, users: u64) -> anyhow::Result<()> {
        // Seeded handles are `u0`…; the others are written to by handle, from `u1001` on (a
        // handle has at least 3 characters, and no writer writes about themself).
        let writer = k % WRITERS + 1;
        let other = WRITERS + 1 + (k * 7919) % (users - WRITERS - 1);
        let token = format!("Bearer trl_bench_cutover_{writer}");
        let (what, resp) = match self {
            Processor::Search => (
                "PUT /v1/me/contacts",
                http.put(&format!("{url}/v1/me/contacts/u{other}"))
                    .header("Authorization", &token)
                    .send_json(json!({"label": format!("l{k}")})),
            ),
            Processor::Dispute => {
                let kind = ["impersonation", "harassment", "spam", "incorrect_info"][(k % 4) as usize];
                let body = json!({"target_id": format!("u{other}"), "kind": kind, "description": "bench"});
                (
                    "POST /v1/disputes",
                    http.post(&format!("{url}/v1/disputes")).header("Authorization", &token).send_json(body),
                )
            }
        };
        let mut resp = resp.with_context(|| what.to_owned())?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            bail!("{what} answered {status}: {}", resp.body_mut().read_to_string().unwrap_or_default());
        }
        Ok(())
    }
}

/// `--rate` writes per second through the API, spread over a few threads, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Load {
    fn start(url: &str, rate: u64, users: u64, processor: Processor) -> Self {
        let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let threads = (0..LOAD_THREADS)
            .map(|t| {
                let (url, stop, sent) = (url.to_owned(), stop.clone(), sent.clone());
                std::thread::spawn(move || {
                    let http: ureq::Agent = ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .proxy(None)
                        .timeout_global(Some(Duration::from_secs(10)))
                        .build()
                        .into();
                    let every = Duration::from_secs_f64(LOAD_THREADS as f64 / rate as f64);
                    let mut next = Instant::now();
                    let mut k = t;
                    while !stop.load(Ordering::Acquire) {
                        processor.write(&http, &url, k, users)?;
                        sent.fetch_add(1, Ordering::Relaxed);
                        k += LOAD_THREADS;
                        next += every;
                        if let Some(wait) = next.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        Self { stop, sent, threads }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops the load; an error of any request is the benchmark's.
    fn finish(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            t.join().map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        }
        Ok(())
    }
}

/// Messages a process's consumers (whose label starts with `consumers`) processed
/// successfully, from its `/metrics`.
fn processed(admin: &str, consumers: &str) -> anyhow::Result<f64> {
    let text = http_get(admin, "/metrics")?.with_context(|| format!("{admin}/metrics does not answer"))?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("trellis_worker_messages_total{") && l.contains(consumers))
        .filter(|l| l.contains("outcome=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
        .sum())
}

/// One scrape: writes sent so far, messages processed so far by the API and by the worker.
#[derive(Clone, Copy)]
struct Scrape {
    sent: u64,
    api: f64,
    worker: f64,
}

struct Throughput {
    processor: Processor,
    /// `2 × SIDE + 1` scrapes, one a second; the flag changed right after the middle one.
    scrapes: Vec<Scrape>,
    /// Events the consumers were sent (the outbox's), and messages the two processes processed
    /// in all (more if some were redelivered).
    events: u64,
    processed: f64,
}

impl Throughput {
    /// Per second: (seconds from the flip at the end of the second, writes, api, worker).
    fn rates(&self) -> Vec<(i64, f64, f64, f64)> {
        self.scrapes
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let t = i as i64 + 1 - SIDE as i64;
                (t, (w[1].sent - w[0].sent) as f64, w[1].api - w[0].api, w[1].worker - w[0].worker)
            })
            .collect()
    }

    fn summary(&self, rate: u64) -> String {
        let rates = self.rates();
        let total = |r: &(i64, f64, f64, f64)| r.2 + r.3;
        let (before, after) = rates.split_at(SIDE as usize);
        let mean = |side: &[(i64, f64, f64, f64)]| side.iter().map(total).sum::<f64>() / side.len() as f64;
        let base = mean(before);
        let dip: f64 = after.iter().map(|r| (base - total(r)).max(0.0)).sum();
        format!(
            "| {} throughput around a flip monolith → worker, {rate} writes/s through the API | before {base:.0} msgs/s, after {:.0} msgs/s, dip {dip:.0} messages processed late; all {} events processed ({:.0} messages) | — |",
            self.processor.name(),
            mean(after),
            self.events,
            self.processed,
        )
    }

    fn table(&self) -> String {
        let mut out = String::from(
            "| second | writes/s | trellis-api msgs/s | worker msgs/s | total msgs/s |\n|---|---|---|---|---|",
        );
        for (t, writes, api, worker) in self.rates() {
            out.push_str(&format!(
                "\n| {} → {t} | {writes:.0} | {api:.0} | {worker:.0} | {:.0} |",
                t - 1,
                api + worker
            ));
        }
        out
    }
}

/// Users `u0`… (no contacts), with scores, and tokens for the writers `u1`…`u1000`.
fn seed_writers(db: &BenchDb, users: u64) -> anyhow::Result<()> {
    let options = crate::seed::Options { users, avg_contacts: 0.0, verified_fraction: 0.1, seed: 42 };
    crate::seed::load(&db.psql, &db.url, &options, crate::seed::Mode::Empty)?;
    db.exec(&format!(
        "INSERT INTO identity.tokens (token_hash, user_id, expires_at)
         SELECT sha256(convert_to('trl_bench_cutover_' || k, 'UTF8')), u.id, now() + interval '1 day'
         FROM generate_series(1, {WRITERS}) AS k JOIN identity.users u ON u.handle = 'u' || k;
         INSERT INTO score.user_scores (user_id, trust, score, run_id, computed_at)
         SELECT id, 0.5, abs(hashtext(id::text)) % 1001, gen_random_uuid(), now() FROM identity.users;
         ANALYZE;"
    ))?;
    Ok(())
}

fn throughput(stack: &Stack, processor: Processor, rate: u64) -> anyhow::Result<Throughput> {
    let users = WRITERS * 10;
    let db = BenchDb::fresh(stack, &format!("trellis_bench_cutover_{}", processor.binary().replace('-', "_")))?;
    seed_writers(&db, users)?;
    set_flag(&db, processor.flag(), "monolith")?;
    let prefix = format!("bench{}{}", std::process::id(), processor.binary().replace('-', ""));
    let api = Api::start(&db, stack, &prefix, &[])?;
    let worker = Worker::start(processor.binary(), &db, stack, &prefix)?;
    let (api_admin, worker_admin) = (api.admin.clone(), worker.admin.clone());

    eprintln!("xtask: bench: {} at {rate} writes/s; flag to worker after {} s", processor.name(), 2 * SIDE);
    let load = Load::start(&api.url, rate, users, processor);
    let first = Instant::now() + Duration::from_secs(SIDE);
    let mut scrapes = Vec::new();
    for i in 0..=2 * SIDE {
        if let Some(wait) = (first + Duration::from_secs(i)).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let (api, worker) =
            (processed(&api_admin, processor.consumers())?, processed(&worker_admin, processor.consumers())?);
        scrapes.push(Scrape { sent: load.sent(), api, worker });
        if i == SIDE {
            set_flag(&db, processor.flag(), "worker")?;
        }
    }
    load.finish()?;

    util::wait_until("the relay to publish every event", Duration::from_secs(120), || {
        Ok(db.exec("SELECT count(*) FROM ops.outbox WHERE published_at IS NULL")? == "0")
    })?;
    let events: u64 = db.exec(processor.events_sql())?.parse()?;
    let total = || -> anyhow::Result<f64> {
        Ok(processed(&api_admin, processor.consumers())? + processed(&worker_admin, processor.consumers())?)
    };
    util::wait_until(&format!("the {} to process every event", processor.name()), Duration::from_secs(300), || {
        Ok(total()? >= events as f64)
    })?;
    Ok(Throughput { processor, scrapes, events, processed: total()? })
}

struct Score {
    summary: String,
    table: String,
}

fn score(stack: &Stack, users: u64) -> anyhow::Result<Score> {
    const API_HOST: &str = "trellis-api";
    let db = BenchDb::fresh(stack, "trellis_bench_cutover_score")?;
    eprintln!("xtask: bench: seeding {users} users with 20 contacts each for the score phase");
    let options = crate::seed::Options { users, avg_contacts: 20.0, verified_fraction: 0.1, seed: 42 };
    crate::seed::load(&db.psql, &db.url, &options, crate::seed::Mode::Empty)?;
    db.exec(
        "UPDATE identity.users SET role = 'admin' WHERE handle = 'u1';
         INSERT INTO identity.tokens (token_hash, user_id, expires_at)
         SELECT sha256(convert_to('trl_bench_cutover_admin', 'UTF8')), id, now() + interval '1 day'
         FROM identity.users WHERE handle = 'u1';
         ANALYZE;",
    )?;
    set_flag(&db, "score.executor", "monolith")?;
    let prefix = format!("bench{}score", std::process::id());
    let api = Api::start(&db, stack, &prefix, &[("HOSTNAME", API_HOST)])?;
    let _worker = Worker::start("score-orchestrator", &db, stack, &prefix)?;
    // The start-up run (no run ever succeeded), made by the API.
    util::wait_until("the start-up score run", Duration::from_secs(30 * 60), || {
        Ok(db.exec("SELECT count(*) FROM score.runs WHERE status = 'succeeded'")? != "0")
    })?;

    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let first = Instant::now();
    let mut flipped_at = None;
    for i in 0..4 * SIDE {
        if let Some(wait) = (first + Duration::from_millis(500 * i)).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if i == 2 * SIDE {
            set_flag(&db, "score.executor", "worker")?;
            flipped_at = Some(db.exec("SELECT extract(epoch FROM max(changed_at)) FROM ops.feature_flag_audit")?);
        }
        let status = http
            .post(&format!("{}/v1/admin/score-runs", api.url))
            .header("Authorization", "Bearer trl_bench_cutover_admin")
            .send_json(json!({}))
            .context("POST /v1/admin/score-runs")?
            .status()
            .as_u16();
        ensure!(status == 202, "POST /v1/admin/score-runs answered {status}");
    }
    let flipped_at: f64 = flipped_at.context("the flag was set")?.parse()?;
    let requests = "FROM ops.outbox o CROSS JOIN LATERAL (SELECT (o.payload->>'occurred_at')::timestamptz AS at) m
         LEFT JOIN LATERAL (SELECT r.finished_at, r.host FROM score.runs r
                            WHERE r.status = 'succeeded' AND r.started_at > m.at ORDER BY r.started_at LIMIT 1) s ON true
         WHERE o.payload->>'type' = 'scores.run_requested'";
    util::wait_until("every run request to be served", Duration::from_secs(30 * 60), || {
        Ok(db.exec(&format!("SELECT count(*) {requests} AND s.finished_at IS NULL"))? == "0")
    })?;
    let rows = db.exec(&format!(
        "SELECT extract(epoch FROM m.at), extract(epoch FROM s.finished_at - m.at), s.host {requests} ORDER BY m.at"
    ))?;
    let mut table = String::from("| request at | waited for its run | served by a run of |\n|---|---|---|");
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for line in rows.lines() {
        let [at, wait, host] = line.split('|').collect::<Vec<_>>()[..] else { bail!("unexpected row `{line}`") };
        let (at, wait): (f64, f64) = (at.parse::<f64>()? - flipped_at, wait.parse()?);
        let side = if host == API_HOST { "trellis-api" } else { "score-orchestrator" };
        table.push_str(&format!("\n| {at:+.1} s | {wait:.2} s | {side} |"));
        if at < 0.0 { before.push(wait) } else { after.push(wait) }
    }
    let runs = db.exec(&format!(
        "SELECT count(*) FILTER (WHERE host = '{API_HOST}'), count(*) FILTER (WHERE host <> '{API_HOST}')
         FROM score.runs WHERE trigger = 'manual'"
    ))?;
    let (api_runs, worker_runs) = runs.split_once('|').context("run counts")?;
    let stats = |w: &[f64]| {
        let max = w.iter().copied().fold(0.0, f64::max);
        format!("mean {:.2} s, max {max:.2} s ({} requests)", w.iter().sum::<f64>() / w.len().max(1) as f64, w.len())
    };
    let summary = format!(
        "| score run requests around a flip monolith → worker, one every 0.5 s, {} users | wait for the serving run: before {}, after {}; runs made by trellis-api {api_runs}, by the worker {worker_runs} | — |",
        crate::seed::thousands(users),
        stats(&before),
        stats(&after),
    );
    Ok(Score { summary, table })
}
