//! `cargo xtask bench console`: the on-call console's pages with 10,000 dead letters and
//! `--users` users (default 1,000,000), against the floor of the dead-letters page: one whole read
//! of the DLQ with the raw async-nats ordered consumer, in the same run.
//!
//! - The users and their contacts: `cargo xtask seed`'s loader (20 contacts each on average), in
//!   database `trellis_bench_console`, seeded again only when it does not hold exactly that; a
//!   year of daily score runs (and some triggered ones, a few failed) in SQL.
//! - An operator, `bench_ops`, registered through the API and granted the `operator` role with
//!   `trellisctl users grant-role`; the benchmark signs in once at `/console/sign-in` and sends
//!   the session cookie with every request.
//! - The dead letters: testkit's `trellis-dlq-bench fill`, with the runtime's headers, over three
//!   consumers and twenty error fingerprints of uneven sizes, on the benchmark's NATS prefix.
//! - Each page with wrk, 4 connections, `--duration` seconds (default 15) after a 3 s warm-up,
//!   each page checked first (200 and what it must show), after the raw read, one at a time and
//!   4 at once (`trellis-dlq-bench read`); then the whole-DLQ page once more with 1 connection.
//!   The machine's load average goes with the figures: other work on it moves them.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::bench::{Api, BenchDb, CpuTime, Load, build_release, machine, release_bin, run_wrk};
use crate::flags;
use crate::services::Stack;
use crate::util;

const DB: &str = "trellis_bench_console";
const AVG_CONTACTS: u64 = 20;
const OPERATOR: &str = "bench_ops";
const PASSWORD: &str = "bench console password";
const DEAD_LETTERS: u64 = 10_000;
const CONNECTIONS: u32 = 4;
const TARGET_P99_MS: f64 = 100.0;
/// How many times the raw read runs, one at a time and then [`CONNECTIONS`] at once.
const READS: u32 = 10;

/// A year of daily score runs over the seeded graph, a few failed, and some triggered by hand.
const SCORE_RUNS_SQL: &str = "
DELETE FROM score.runs;
INSERT INTO score.runs (id, trigger, status, host, algorithm, users, edges, iterations, residual, scores_changed,
    load_ms, compute_ms, write_ms, error, created_at, started_at, finished_at)
SELECT gen_random_uuid(),
       CASE WHEN d % 9 = 0 THEN 'manual' ELSE 'schedule' END,
       CASE WHEN d % 61 = 0 THEN 'failed' ELSE 'succeeded' END,
       'score-orchestrator-' || (d % 2),
       'eigentrust-v1',
       USERS, USERS * 20, 18 + d % 3, 1e-7, USERS / (1 + d % 5),
       7800 + d % 400, 1000 + d % 90, 6900 + d % 700,
       CASE WHEN d % 61 = 0 THEN 'canceling statement due to statement timeout' END,
       t, t + interval '1 second', t + interval '17 seconds'
FROM generate_series(1, 400) AS d,
     LATERAL (SELECT now() - (400 - d) * interval '22 hours' AS t) AS times;
";

pub fn run(flags: &flags::Bench) -> anyhow::Result<()> {
    let users = flags.users.unwrap_or(1_000_000);
    let stack = Stack::ensure()?;
    build_release(&["trellis-api", "trellisctl", "trellis-testkit"])?;
    let db = crate::bench::seeded_graph(&stack, DB, users, AVG_CONTACTS, Some(OPERATOR))?;
    db.exec(&SCORE_RUNS_SQL.replace("USERS", &users.to_string()))?;
    db.exec("VACUUM ANALYZE score.runs")?;

    let prefix = format!("bench{}console", std::process::id());
    let api = Api::start(&db, &stack, &prefix, &[])?;
    let dlq_bench = |args: &[&str]| -> anyhow::Result<Value> {
        let out = util::read(
            Command::new(release_bin("trellis-dlq-bench"))
                .args(args)
                .env("NATS_URL", &stack.nats_url)
                .env("NATS_PREFIX", &prefix),
        )?;
        serde_json::from_str(out.trim()).with_context(|| format!("trellis-dlq-bench {args:?} printed {out}"))
    };
    let outcome = measure(&db, &api, users, flags.duration, &dlq_bench);
    drop(api);
    if let Err(e) = dlq_bench(&["clean"]) {
        eprintln!("xtask: bench: could not delete the benchmark's streams: {e:#}");
    }
    let rows = outcome?;
    println!("\nmachine: {}\n", machine());
    println!("| benchmark | result | target | |\n|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

/// The operator account (registered through the API unless it exists), its role, and a
/// console session: the cookie's value.
fn operator_session(http: &ureq::Agent, db: &BenchDb, api: &Api) -> anyhow::Result<String> {
    let mut created = http.post(&format!("{}/v1/users", api.url)).send_json(json!({
        "handle": OPERATOR,
        "display_name": "Bench Operator",
        "email": format!("{OPERATOR}@example.com"),
        "password": PASSWORD,
    }))?;
    match created.status().as_u16() {
        201 | 409 => {}
        other => bail!("POST /v1/users answered {other}: {}", created.body_mut().read_to_string().unwrap_or_default()),
    }
    util::run(
        Command::new(release_bin("trellisctl"))
            .args(["users", "grant-role", OPERATOR, "operator", "--reason", "cargo xtask bench console"])
            .args(["--actor", "cargo xtask bench console"])
            .env("DATABASE_URL", &db.url),
    )?;
    let signed_in =
        http.post(&format!("{}/console/sign-in", api.url)).send_form([("login", OPERATOR), ("password", PASSWORD)])?;
    if signed_in.status().as_u16() != 303 {
        bail!("POST /console/sign-in answered {} (303 expected)", signed_in.status());
    }
    signed_in
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("trellis_console=")?.split(';').next().map(str::to_owned))
        .filter(|token| !token.is_empty())
        .context("the sign-in set no trellis_console cookie")
}

/// A query parameter's value, percent-encoded.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A page of the benchmark: its row's name, its path, and a text its body must hold.
struct Page {
    name: String,
    path: String,
    shows: String,
}

fn measure(
    db: &BenchDb,
    api: &Api,
    users: u64,
    duration: u64,
    dlq_bench: &dyn Fn(&[&str]) -> anyhow::Result<Value>,
) -> anyhow::Result<Vec<String>> {
    let http = crate::util::local_http_agent(Duration::from_secs(30));
    let cookie = operator_session(&http, db, api)?;
    eprintln!("xtask: bench: signed in as {OPERATOR}; writing {DEAD_LETTERS} dead letters");
    let filled = dlq_bench(&["fill", &DEAD_LETTERS.to_string()])?;
    eprintln!("xtask: bench: {filled}");
    let depth = filled["depth"].as_u64().context("no depth")?;
    if depth != DEAD_LETTERS {
        bail!("the DLQ holds {depth} dead letters, not {DEAD_LETTERS}");
    }
    let fingerprint = filled["fingerprint"].as_str().context("no fingerprint")?;
    let fingerprint_consumer = filled["fingerprint_consumer"].as_str().context("no consumer")?;
    let fingerprint_count = filled["fingerprint_count"].as_u64().context("no count")?;
    let consumer_count = filled["fingerprint_consumer_count"].as_u64().context("no count")?;
    let newest = filled["newest_sequence"].as_u64().context("no sequence")?;
    let groups = filled["groups"].as_u64().unwrap_or(0);
    let count = crate::seed::thousands;
    let pages = [
        Page { name: "GET /console (overview)".into(), path: "/console".into(), shows: "Processors".into() },
        Page {
            name: format!("GET /console/dead-letters (all {}, {groups} groups)", count(DEAD_LETTERS)),
            path: "/console/dead-letters".into(),
            shows: format!("<strong>{DEAD_LETTERS}</strong>"),
        },
        Page {
            name: format!("GET /console/dead-letters?fingerprint=… ({} match)", count(fingerprint_count)),
            path: format!("/console/dead-letters?fingerprint={}", encode(fingerprint)),
            shows: format!("<strong>{fingerprint_count}</strong>"),
        },
        Page {
            name: format!("GET /console/dead-letters?consumer=…&fingerprint=… ({} match)", count(consumer_count)),
            path: format!(
                "/console/dead-letters?consumer={}&fingerprint={}",
                encode(fingerprint_consumer),
                encode(fingerprint)
            ),
            shows: format!("<strong>{consumer_count}</strong>"),
        },
        Page {
            name: "GET /console/dead-letters/{seq}".into(),
            path: format!("/console/dead-letters/{newest}"),
            shows: "Trellis-Error-Kind".into(),
        },
        Page { name: "GET /console/cutover".into(), path: "/console/cutover".into(), shows: "score.executor".into() },
        Page {
            name: "GET /console/score-runs (400 runs, 50 shown)".into(),
            path: "/console/score-runs".into(),
            shows: "succeeded".into(),
        },
    ];
    for page in &pages {
        let mut answer = http
            .get(&format!("{}{}", api.url, page.path))
            .header("Cookie", format!("trellis_console={cookie}"))
            .call()?;
        let status = answer.status().as_u16();
        let body = answer.body_mut().with_config().limit(64 * 1024 * 1024).read_to_string().unwrap_or_default();
        if status != 200 || !body.contains(&page.shows) {
            bail!(
                "GET {} answered {status}{}",
                page.path,
                if status == 200 { format!(" without `{}`", page.shows) } else { String::new() }
            );
        }
    }

    let load_before = load_average();
    // The floor first: the whole DLQ through the raw ordered consumer.
    eprintln!("xtask: bench: the raw read of the DLQ, {READS} times alone and {READS} times {CONNECTIONS} at once");
    let floor = dlq_bench(&["read", &READS.to_string(), &CONNECTIONS.to_string()])?;
    eprintln!("xtask: bench: {floor}");
    let ms = |v: &Value, path: &str| -> anyhow::Result<f64> {
        v.pointer(path).and_then(Value::as_f64).with_context(|| format!("no {path} in {v}"))
    };
    let raw_median = ms(&floor, "/raw/median_ms")?;

    let scripts = util::target_dir().join("bench-scripts");
    std::fs::create_dir_all(&scripts)?;
    let script = scripts.join("console.lua");
    std::fs::write(&script, format!("wrk.method = \"GET\"\nwrk.headers[\"Cookie\"] = \"trellis_console={cookie}\"\n"))?;
    let mut rows = Vec::new();
    let mut dead_letters_p50 = None;
    for page in &pages {
        let url = format!("{}{}", api.url, page.path);
        eprintln!("xtask: bench: {}, {CONNECTIONS} connections, {duration} s", page.name);
        run_wrk(&url, CONNECTIONS, 3, &script)?;
        let before = CpuTime::read(api.pid())?;
        let load = run_wrk(&url, CONNECTIONS, duration, &script)?;
        let cpu = CpuTime::read(api.pid())?.since(&before, load.requests);
        if page.path == "/console/dead-letters" {
            dead_letters_p50 = Some(load.p50_ms);
        }
        rows.push(page_row(&page.name, CONNECTIONS, &load, cpu.api_us / 1000.0, users));
    }
    // The whole-DLQ page one request at a time: against the raw read alone.
    let page = &pages[1];
    eprintln!("xtask: bench: {}, 1 connection, {duration} s", page.name);
    let url = format!("{}{}", api.url, page.path);
    let before = CpuTime::read(api.pid())?;
    let alone = run_wrk(&url, 1, duration, &script)?;
    let cpu = CpuTime::read(api.pid())?.since(&before, alone.requests);
    rows.push(page_row(&page.name, 1, &alone, cpu.api_us / 1000.0, users));
    // The session is still the one signed in: every measured request was a page, not a redirect.
    let still =
        http.get(&format!("{}/console", api.url)).header("Cookie", format!("trellis_console={cookie}")).call()?;
    if still.status().as_u16() != 200 {
        bail!("the console session ended during the run (GET /console answered {})", still.status());
    }

    rows.push(format!(
        "| floor: the whole DLQ ({} dead letters) read once with the raw async-nats ordered consumer | median {:.1} ms, max {:.1} ms ({READS} reads, one at a time; the reader's own CPU {:.0} ms a read); {CONNECTIONS} at once: median {:.1} ms, max {:.1} ms | — | |",
        count(DEAD_LETTERS),
        raw_median,
        ms(&floor, "/raw/max_ms")?,
        ms(&floor, "/raw_cpu_ms_per_read")?,
        ms(&floor, "/raw_concurrent/median_ms")?,
        ms(&floor, "/raw_concurrent/max_ms")?,
    ));
    rows.push(format!(
        "| the same read through `trellis_runtime::dlq::read` (every entry kept) | median {:.1} ms, max {:.1} ms ({READS} reads) | — | |",
        ms(&floor, "/runtime_read/median_ms")?,
        ms(&floor, "/runtime_read/max_ms")?,
    ));
    if let Some(p50) = dead_letters_p50 {
        rows.push(format!(
            "| ratio: dead-letters page p50 to the raw read, same run | {:.2} alone ({:.1} ms against {raw_median:.1} ms); {:.2} at c={CONNECTIONS} ({p50:.1} ms against {:.1} ms for {CONNECTIONS} raw reads at once) | — | |",
            alone.p50_ms / raw_median,
            alone.p50_ms,
            p50 / ms(&floor, "/raw_concurrent/median_ms")?,
            ms(&floor, "/raw_concurrent/median_ms")?,
        ));
    }
    rows.push(format!(
        "| load average (1 min) at the start and at the end of the measurements | {load_before} → {} | — | |",
        load_average()
    ));
    Ok(rows)
}

/// The machine's 1-minute load average: other work on it moves every figure.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

fn page_row(name: &str, connections: u32, load: &Load, api_cpu_ms: f64, users: u64) -> String {
    let verdict = if load.errors == 0 && load.p99_ms <= TARGET_P99_MS { "met" } else { "**missed**" };
    format!(
        "| {name}, {} users, c={connections} | {:.0} req/s, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} requests, {} errors; trellis-api CPU {api_cpu_ms:.1} ms per request) | p99 ≤ {TARGET_P99_MS:.0} ms | {verdict} |",
        crate::seed::thousands(users),
        load.requests_per_sec,
        load.p50_ms,
        load.p99_ms,
        load.max_ms,
        load.requests,
        load.errors,
    )
}
