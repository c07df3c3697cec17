//! `cargo xtask bench dispute`: the dispute processor draining a backlog of P3 disputes
//! (`--backlog`, default 100,000) while P0 disputes are filed through the API at 20/s.
//!
//! - The backlog is seeded in SQL (disputes and their `disputes.filed` outbox rows, as the API
//!   writes them), over `--users` users (default 10,000) with trust scores, so every rule fires;
//!   the API's relay publishes it to JetStream before the processor starts.
//! - Drain rate: P3 decisions over the span from the first to the last P3 decision
//!   (`decided_at`, the statement clock of the deciding transaction).
//! - P0 latency: from the API's 201 (this process's clock) to the P0's `decided_at` (the
//!   database's clock, same machine), for the P0s answered while the backlog was draining.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::bench::{Api, BenchDb, Worker, build_release, machine};
use crate::flags;
use crate::services::Stack;
use crate::util;

const DB: &str = "trellis_bench_dispute";
pub(crate) const P0_RATE_PER_SECOND: u64 = 20;
pub(crate) const P0_REPORTERS: u64 = 20;

pub fn run(flags: &flags::Bench) -> anyhow::Result<()> {
    let backlog = flags.backlog.unwrap_or(100_000);
    let users = flags.users.unwrap_or(10_000).max(P0_REPORTERS + 2);
    let stack = Stack::ensure()?;
    build_release(&["trellis-api", "trellisctl", "dispute-processor"])?;

    eprintln!("xtask: bench: seeding {DB}: {users} users with scores, {backlog} P3 disputes queued in the outbox");
    let db = BenchDb::fresh(&stack, DB)?;
    let options = crate::seed::Options { users, avg_contacts: 0.0, verified_fraction: 0.1, seed: 42 };
    crate::seed::load(&db.psql, &db.url, &options, crate::seed::Mode::Empty)?;
    db.exec(&seed_sql(backlog, users))?;

    let prefix = format!("bench{}dispute", std::process::id());
    let api = Api::start(&db, &stack, &prefix, &[])?;
    let started = Instant::now();
    util::wait_until("the relay to publish the backlog", Duration::from_secs(15 * 60), || {
        Ok(db.exec("SELECT count(*) FROM ops.outbox WHERE published_at IS NULL")? == "0")
    })?;
    eprintln!("xtask: bench: backlog published to JetStream in {:.1} s", started.elapsed().as_secs_f64());
    db.exec("ANALYZE")?;

    let processor = Worker::start("dispute-processor", &db, &stack, &prefix)?;
    let stop = Arc::new(AtomicBool::new(false));
    let filer = {
        let (url, stop) = (api.url.clone(), stop.clone());
        std::thread::spawn(move || file_p0s(&url, users, &stop))
    };
    let drained = util::wait_until("the backlog to drain", Duration::from_secs(30 * 60), || {
        Ok(db.exec("SELECT count(*) FROM security.disputes WHERE priority = 3 AND status = 'pending'")? == "0")
    });
    stop.store(true, Ordering::Release);
    let filed = filer.join().map_err(|_| anyhow::anyhow!("the P0 filer panicked"))??;
    drained?;
    let ids: Vec<String> = filed.iter().map(|(id, _)| format!("'{id}'")).collect();
    if ids.is_empty() {
        bail!("no P0 dispute was filed");
    }
    let in_list = ids.join(",");
    util::wait_until("every P0 to be decided", Duration::from_secs(60), || {
        Ok(db
            .exec(&format!("SELECT count(*) FROM security.disputes WHERE id IN ({in_list}) AND decided_at IS NULL"))?
            == "0")
    })?;
    drop(processor);
    drop(api);

    let span = db.exec(
        "SELECT count(*), extract(epoch FROM max(decided_at) - min(decided_at)), extract(epoch FROM max(decided_at))
         FROM security.disputes WHERE priority = 3",
    )?;
    let [count, seconds, drain_end] = span.split('|').collect::<Vec<_>>()[..] else { bail!("no drain span: {span}") };
    let (count, seconds, drain_end): (f64, f64, f64) = (count.parse()?, seconds.parse()?, drain_end.parse()?);
    let rate = count / seconds.max(f64::EPSILON);
    let decided = db.exec(&format!(
        "SELECT id, extract(epoch FROM decided_at) FROM security.disputes WHERE id IN ({in_list}) ORDER BY id"
    ))?;
    let mut latencies: Vec<f64> = decided
        .lines()
        .filter_map(|line| {
            let (id, at) = line.split_once('|')?;
            let (_, answered) = filed.iter().find(|(f, _)| f == id)?;
            (*answered < drain_end).then(|| at.parse::<f64>().ok().map(|at| (at - answered) * 1000.0)).flatten()
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let rules = db.exec(
        "SELECT string_agg(rule || ' ' || n, ', ' ORDER BY rule) FROM
           (SELECT rule, count(*) AS n FROM security.dispute_decisions GROUP BY rule) r",
    )?;
    let pct = |q: f64| latencies.get(((latencies.len() as f64 * q).ceil() as usize).saturating_sub(1)).copied();
    println!("\nmachine: {}\n", machine());
    println!("| benchmark | result | target |\n|---|---|---|");
    println!(
        "| dispute backlog drain, {} P3 queued ({users} users; decisions by rule: {rules}) | {rate:.0} decisions/s ({count} in {seconds:.1} s) | ≥ 3,000/s |",
        crate::seed::thousands(backlog),
    );
    match (pct(0.5), pct(0.99), latencies.last()) {
        (Some(p50), Some(p99), Some(max)) => println!(
            "| P0 filed at {P0_RATE_PER_SECOND}/s through the API during the drain, 201 → committed decision (n = {}) | p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms | p99 ≤ 100 ms |",
            latencies.len()
        ),
        _ => println!("| P0 during the drain | no P0 was answered before the backlog drained | p99 ≤ 100 ms |"),
    }
    Ok(())
}

/// Scores for everyone, the P3 backlog and its outbox rows, and bearer tokens for the P0
/// reporters.
fn seed_sql(backlog: u64, users: u64) -> String {
    format!(
        "{}
         CREATE TEMP TABLE numbered AS SELECT row_number() OVER (ORDER BY id) - 1 AS i, id FROM identity.users;
         CREATE UNIQUE INDEX ON numbered (i);
         INSERT INTO security.disputes (id, reporter_id, target_id, kind, priority, description, created_at, updated_at)
         SELECT gen_random_uuid(), r.id, t.id, 'incorrect_info', 3, 'bench backlog',
                now() - interval '10 minutes' + n * interval '1 microsecond', now()
         FROM generate_series(1::bigint, {backlog}) AS n
         JOIN numbered r ON r.i = (n * 7919) % {users}
         JOIN numbered t ON t.i = (n * 104729 + 1 + n / {users}) % {users}
         WHERE r.id <> t.id;
         WITH d AS MATERIALIZED (SELECT gen_random_uuid() AS event_id, * FROM security.disputes)
         INSERT INTO ops.outbox (id, subject, payload, created_at)
         SELECT d.event_id, 'events.disputes.filed.p3',
                jsonb_build_object('id', d.event_id, 'type', 'disputes.filed', 'version', 1,
                    'occurred_at', to_char(d.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                    'actor_id', d.reporter_id,
                    'data', jsonb_build_object('dispute_id', d.id, 'reporter_id', d.reporter_id,
                        'target_id', d.target_id, 'kind', 'incorrect_info', 'priority', 'P3')),
                d.created_at
         FROM d ORDER BY d.created_at;",
        scores_and_reporters_sql()
    )
}

/// Scores for everyone (so that every rule can fire), and bearer tokens for the P0 reporters
/// (`trl_bench_dispute_<k>` for user `u<k>`), on users seeded by `seed::load`.
pub(crate) fn scores_and_reporters_sql() -> String {
    format!(
        "INSERT INTO score.user_scores (user_id, trust, score, run_id, computed_at)
         SELECT id, 0.5, abs(hashtext(id::text)) % 1001, gen_random_uuid(), now() FROM identity.users;
         INSERT INTO identity.tokens (token_hash, user_id, expires_at)
         SELECT sha256(convert_to('trl_bench_dispute_' || k, 'UTF8')), u.id, now() + interval '1 day'
         FROM generate_series(1, {P0_REPORTERS}) AS k JOIN identity.users u ON u.handle = 'u' || k;"
    )
}

/// Files impersonation disputes at 20/s until `stop`; returns each id with the Unix time of
/// its 201.
pub(crate) fn file_p0s(url: &str, users: u64, stop: &AtomicBool) -> anyhow::Result<Vec<(String, f64)>> {
    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let every = Duration::from_millis(1000 / P0_RATE_PER_SECOND);
    let mut next = Instant::now();
    let mut filed = Vec::new();
    let mut k: u64 = 0;
    while !stop.load(Ordering::Acquire) {
        k += 1;
        let reporter = k % P0_REPORTERS + 1;
        // Targets outside the reporters, spread so that few repeats make duplicates.
        let target = P0_REPORTERS + 1 + (k * 7) % (users - P0_REPORTERS);
        let mut resp = http
            .post(&format!("{url}/v1/disputes"))
            .header("Authorization", format!("Bearer trl_bench_dispute_{reporter}"))
            .send_json(json!({"target_id": format!("u{target}"), "kind": "impersonation", "description": "bench"}))
            .context("POST /v1/disputes")?;
        let answered = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
        let status = resp.status().as_u16();
        let body: Value =
            serde_json::from_str(&resp.body_mut().read_to_string().unwrap_or_default()).unwrap_or_default();
        if status != 201 {
            bail!("POST /v1/disputes answered {status}: {body}");
        }
        filed.push((body["id"].as_str().context("a dispute id")?.to_owned(), answered));
        next += every;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    Ok(filed)
}
