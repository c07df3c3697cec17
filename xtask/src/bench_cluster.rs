//! `cargo xtask bench cluster`: Trellis on a three-node JetStream cluster on loopback (testkit's
//! `trellis-nats-cluster`, on the nats-server version `deploy/` ships), with streams of one
//! replica against three, in the same run and on the same cluster:
//!
//! - Relay throughput: 50,000 events written to the outbox while no relay runs, then one
//!   `trellis-api` drains them; the rate is taken from the rows' own `published_at` times.
//! - End-to-end latency: P0 disputes filed through the API at 20/s for `--duration` seconds,
//!   from the API's 201 (the commit of the dispute and its outbox row; this process's clock) to
//!   the dispute processor's committed decision (`decided_at`, the database's clock, same
//!   machine): the relay's publish, JetStream's replication and the worker's handling together.
//! - Publish stall at a leader kill (three replicas): while P0s are filed, the node leading the
//!   events stream is killed with SIGKILL. The stall is the time from the kill to the first
//!   publish acknowledged after it, taken as the earliest `published_at` of the outbox rows
//!   committed after the kill. Every P0 filed meanwhile must still be decided.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::bench::{Api, BenchDb, Worker, build_release, machine, release_bin};
use crate::bench_dispute::{P0_RATE_PER_SECOND, P0_REPORTERS, file_p0s, scores_and_reporters_sql};
use crate::cluster::NatsCluster;
use crate::flags;
use crate::nats_versions;
use crate::services::Stack;
use crate::util;

const DB: &str = "trellis_bench_cluster";
const USERS: u64 = 2_000;
const BACKLOG: u64 = 50_000;
/// The relay's batch, to add one batch's own duration to the drain's first-to-last span.
const RELAY_BATCH: f64 = 2000.0;

pub fn run(flags: &flags::Bench) -> anyhow::Result<()> {
    let mut stack = Stack::ensure_postgres()?;
    build_release(&["trellis-api", "trellisctl", "dispute-processor", "trellis-testkit"])?;
    let version = nats_versions::lookup(nats_versions::DEFAULT)?;
    let server = nats_versions::ensure(version)?;
    let mut cluster =
        NatsCluster::start(&release_bin("trellis-nats-cluster"), &[("NATS_SERVER_BIN", server.as_path())])?;
    stack.nats_url = cluster.nats_url.clone();

    eprintln!("xtask: bench: seeding {DB}: {USERS} users with scores, {P0_REPORTERS} P0 reporters");
    let db = BenchDb::fresh(&stack, DB)?;
    let options = crate::seed::Options { users: USERS, avg_contacts: 0.0, verified_fraction: 0.1, seed: 42 };
    crate::seed::load(&db.psql, &db.url, &options, crate::seed::Mode::Empty)?;
    db.exec(&scores_and_reporters_sql())?;

    let mut rows = Vec::new();
    for replicas in [1, 3] {
        let prefix = format!("bench{}r{replicas}", std::process::id());
        let replicas_env = replicas.to_string();
        let env = [("TRELLIS_STREAM_REPLICAS", replicas_env.as_str())];

        eprintln!("xtask: bench: R{replicas}: relay drain of {BACKLOG} outbox events");
        let (rate, drain_secs) = relay_drain(&db, &stack, &prefix, &env)?;
        rows.push(format!(
            "| relay drain, {BACKLOG}-event backlog, R{replicas} | {rate:.0} events/s ({drain_secs:.2} s from first to last batch) | — |"
        ));

        eprintln!("xtask: bench: R{replicas}: P0 disputes at {P0_RATE_PER_SECOND}/s for {} s", flags.duration);
        let api = Api::start(&db, &stack, &prefix, &env)?;
        let processor = Worker::start_with("dispute-processor", &db, &stack, &prefix, &env)?;
        let stop = Arc::new(AtomicBool::new(false));
        let filer = {
            let (url, stop) = (api.url.clone(), stop.clone());
            std::thread::spawn(move || file_p0s(&url, USERS, &stop))
        };
        let half = Duration::from_secs(flags.duration) / 2;
        std::thread::sleep(half);
        let killed = if replicas == 3 {
            let kill_at = db_now(&db)?;
            let node = cluster.kill_leader(&format!("{prefix}_EVENTS"))?;
            eprintln!("xtask: bench: killed {node}, the events stream's leader");
            Some((node, kill_at))
        } else {
            None
        };
        std::thread::sleep(half);
        stop.store(true, Ordering::Release);
        let filed = filer.join().map_err(|_| anyhow::anyhow!("the P0 filer panicked"))??;
        let latencies = decided_latencies(&db, &filed)?;
        match killed {
            None => rows.push(latency_row(&format!("R{replicas}"), &all(&latencies))),
            Some((node, kill_at)) => {
                // The first half against R1's whole run; the second half with the kill apart.
                let before: Vec<f64> = latencies.iter().filter(|l| l.answered < kill_at).map(|l| l.ms).collect();
                let after: Vec<f64> = latencies.iter().filter(|l| l.answered >= kill_at).map(|l| l.ms).collect();
                rows.push(latency_row(&format!("R{replicas}"), &before));
                rows.push(latency_row(
                    &format!("R{replicas}, filed after a kill -9 of the events stream's leader"),
                    &after,
                ));
                let stall: f64 = db
                    .exec(&format!(
                        "SELECT extract(epoch FROM min(published_at)) - {kill_at} FROM ops.outbox
                         WHERE created_at > to_timestamp({kill_at})"
                    ))?
                    .parse()
                    .context("no outbox row committed after the kill was published")?;
                rows.push(format!(
                    "| publish stall at a kill -9 of the events stream's leader ({node}), R{replicas} | {:.0} ms from the kill to the first publish acknowledged after it | — |",
                    stall * 1000.0
                ));
                cluster.restart(&node)?;
            }
        }
        drop(processor);
        drop(api);
    }

    println!("\nmachine: {}; nats-server {} ×3 on loopback\n", machine(), version.version);
    println!("| benchmark | result | target |\n|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

/// `BACKLOG` events inserted into the outbox, then drained by one `trellis-api`; the rate from
/// the rows' `published_at` span and the span itself.
fn relay_drain(db: &BenchDb, stack: &Stack, prefix: &str, env: &[(&str, &str)]) -> anyhow::Result<(f64, f64)> {
    db.exec("DELETE FROM ops.outbox")?;
    db.exec(&format!(
        "INSERT INTO ops.outbox (id, subject, payload)
         SELECT id, 'events.bench.noop', jsonb_build_object('id', id, 'type', 'bench.noop', 'version', 1,
             'occurred_at', now(), 'actor_id', null, 'data', jsonb_build_object('n', n))
         FROM (SELECT gen_random_uuid() AS id, n FROM generate_series(1, {BACKLOG}) AS n) AS g;
         ANALYZE ops.outbox;"
    ))?;
    let api = Api::start(db, stack, prefix, env)?;
    util::wait_until("outbox drain", Duration::from_secs(600), || {
        Ok(db.exec("SELECT count(*) FROM ops.outbox WHERE published_at IS NULL")? == "0")
    })?;
    drop(api);
    let span: f64 = db
        .exec("SELECT EXTRACT(EPOCH FROM max(published_at) - min(published_at)) FROM ops.outbox")?
        .parse()
        .context("drain span")?;
    let batches = (BACKLOG as f64 / RELAY_BATCH).ceil();
    let drain_secs = span * (batches + 1.0) / batches;
    db.exec("DELETE FROM ops.outbox")?;
    Ok((BACKLOG as f64 / drain_secs, drain_secs))
}

/// The database's clock now, as Unix seconds.
fn db_now(db: &BenchDb) -> anyhow::Result<f64> {
    db.exec("SELECT extract(epoch FROM clock_timestamp())")?.parse().context("the database's clock")
}

/// One decided P0: when its 201 came (Unix seconds) and how long after it the decision was
/// committed.
struct Latency {
    answered: f64,
    ms: f64,
}

/// Waits until every filed dispute is decided; returns each one's latency from its 201 to its
/// decision.
fn decided_latencies(db: &BenchDb, filed: &[(String, f64)]) -> anyhow::Result<Vec<Latency>> {
    if filed.is_empty() {
        bail!("no P0 dispute was filed");
    }
    let in_list = filed.iter().map(|(id, _)| format!("'{id}'")).collect::<Vec<_>>().join(",");
    util::wait_until("every P0 to be decided", Duration::from_secs(120), || {
        Ok(db
            .exec(&format!("SELECT count(*) FROM security.disputes WHERE id IN ({in_list}) AND decided_at IS NULL"))?
            == "0")
    })?;
    let decided =
        db.exec(&format!("SELECT id, extract(epoch FROM decided_at) FROM security.disputes WHERE id IN ({in_list})"))?;
    let latencies: Vec<Latency> = decided
        .lines()
        .filter_map(|line| {
            let (id, at) = line.split_once('|')?;
            let (_, answered) = filed.iter().find(|(f, _)| f == id)?;
            at.parse::<f64>().ok().map(|at| Latency { answered: *answered, ms: (at - answered) * 1000.0 })
        })
        .collect();
    if latencies.len() != filed.len() {
        bail!("{} P0s filed, {} found decided", filed.len(), latencies.len());
    }
    Ok(latencies)
}

fn all(latencies: &[Latency]) -> Vec<f64> {
    latencies.iter().map(|l| l.ms).collect()
}

fn latency_row(what: &str, latencies: &[f64]) -> String {
    let mut sorted = latencies.to_vec();
    sorted.sort_by(f64::total_cmp);
    let pct =
        |q: f64| sorted.get(((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1)).copied().unwrap_or(f64::NAN);
    format!(
        "| end to end, P0 filed at {P0_RATE_PER_SECOND}/s, 201 → committed decision, {what} (n = {}) | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms | — |",
        sorted.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0),
    )
}
