//! `cargo xtask bench abuse`: what one abusive client costs a release `trellis-api`, and what
//! it costs a legitimate client of the same replica.
//!
//! Each attack gets a fresh `trellis-api` process (its production defaults but for what
//! [`Api::start`] sets: it opens the dispute limits, so the `disputes` attack is a flood of
//! accepted filings, a harder case than the limiter's refusals) on one database seeded once: `--users` users (default
//! 10,000) with 20 contacts each on average and scores, the search directory rebuilt. Then:
//!
//! 1. **Idle.** The legitimate client, user `u1` with 50 contacts, reads `GET /v1/me/contacts`
//!    from 127.0.0.2: `--rate` requests per second (default 100) over 4 connections, each
//!    replaced after 10 requests, for `--duration` seconds after a 2 s warm-up. Each request's
//!    latency runs from when it was due, so a stalled server shows as latency; a request not
//!    answered 2xx within 5 s of when it was due is not served.
//! 2. **Attack.** The attack at full speed, from addresses other than the legitimate client's
//!    (127.0.0.3, or a new address of 127.1.0.0/16 every 20 requests: many clients, few
//!    requests each), with `--concurrency` connections (default 64), for `--duration` seconds,
//!    while the same client does the same as in 1.
//! 3. **Figures.** The API's resident memory (`VmRSS` of `/proc/<pid>/status`) right before
//!    the attack, its peak (sampled every 50 ms) and 3 s after it; the rows added to
//!    `ops.idempotency_keys` (all, and those whose principal names no account: neither a user
//!    id nor the hash of a token the API issued); the legitimate client's p99 and share of
//!    requests served, idle and during the attack; the CPU time of the API and of this
//!    generator.
//!
//! Targets: RSS growth (peak − before) ≤ 64 MiB, no idempotency row from anonymous attackers,
//! legitimate p99 ≤ 3× its idle figure, ≥ 99 % of legitimate requests served.
//!
//! The generator ([`crate::loadgen`]) runs from an optimised build of xtask: `cargo xtask` is a
//! dev build, whose tokio and hyper spend about 2.5 times the CPU per request (74 µs against
//! 28 µs in a 5 s `dau` flood), CPU that a 2-core machine takes from the API under test.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use hyper::{Method, Request};

use crate::bench::{Api, BenchDb, build_release, machine, release_bin};
use crate::flags;
use crate::loadgen::{self, MakeRequest, Samples, SlowReport, Sources, Steady, Tally};
use crate::seed::thousands;
use crate::services::Stack;
use crate::util;

const DB: &str = "trellis_bench_abuse";
/// The legitimate client's bearer token (user `u1`).
const LEGIT_TOKEN: &str = "trl_bench_abuse_legit";
/// The authenticated attacker's bearer token (user `u2`).
const ATTACKER_TOKEN: &str = "trl_bench_abuse_attacker";
const LEGIT_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const ATTACKER_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// Requests per address of the attacks from many addresses.
const REQUESTS_PER_ADDRESS: u64 = 20;
const LEGIT_CONNECTIONS: u32 = 4;
const LEGIT_REQUESTS_PER_CONNECTION: u64 = 10;
const LEGIT_TIMEOUT: Duration = Duration::from_secs(5);
const WARM_UP: Duration = Duration::from_secs(2);
/// Between the end of an attack and the "after" figures: the API finishes what it started.
const SETTLE: Duration = Duration::from_secs(3);
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// The nice value of the attacker thread of the load generator (the legitimate client runs at 0).
const ATTACKER_NICE: i32 = 10;
/// A slow client sends one byte of its headers this often.
const SLOW_BYTE_EVERY: Duration = Duration::from_secs(1);
/// The bytes of a "long" idempotency key (the most the API accepts today) and query string.
const LONG_KEY: usize = 255;
const LONG_QUERY: usize = 4096;
/// `/proc/<pid>/stat` counts CPU time in clock ticks of 1/100 s (`USER_HZ`, fixed by Linux's
/// ABI on every architecture it runs this on).
const TICKS_PER_SECOND: f64 = 100.0;

const RSS_TARGET_MIB: f64 = 64.0;
const P99_TARGET_RATIO: f64 = 3.0;
const SERVED_TARGET_PERCENT: f64 = 99.0;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Attack {
    LoginOneAddress,
    LoginManyAddresses,
    Registration,
    RegistrationTaken,
    PasswordGuessing,
    IdempotencyRows,
    SearchCursor,
    SlowClients,
    DisputeFlood,
    ActivityPoisoning,
}

impl Attack {
    const ALL: [Attack; 10] = [
        Attack::LoginOneAddress,
        Attack::LoginManyAddresses,
        Attack::Registration,
        Attack::RegistrationTaken,
        Attack::PasswordGuessing,
        Attack::IdempotencyRows,
        Attack::SearchCursor,
        Attack::SlowClients,
        Attack::DisputeFlood,
        Attack::ActivityPoisoning,
    ];

    /// Its name for `--only`.
    fn name(self) -> &'static str {
        match self {
            Attack::LoginOneAddress => "login",
            Attack::LoginManyAddresses => "login-many",
            Attack::Registration => "register",
            Attack::RegistrationTaken => "register-taken",
            Attack::PasswordGuessing => "current-password",
            Attack::IdempotencyRows => "idempotency",
            Attack::SearchCursor => "search-cursor",
            Attack::SlowClients => "slow-clients",
            Attack::DisputeFlood => "disputes",
            Attack::ActivityPoisoning => "dau",
        }
    }

    /// What it does, for the table.
    fn title(self) -> &'static str {
        match self {
            Attack::LoginOneAddress => "login flood: distinct 250-character logins, `POST /v1/sessions`, one address",
            Attack::LoginManyAddresses => {
                "login flood: distinct 250-character logins, `POST /v1/sessions`, many addresses"
            }
            Attack::Registration => "registration flood: valid new accounts, `POST /v1/users`",
            Attack::RegistrationTaken => "registration flood: taken handles and e-mails, `POST /v1/users`",
            Attack::PasswordGuessing => "current-password guessing: `PATCH /v1/me`, one account",
            Attack::IdempotencyRows => {
                "idempotency rows: keyed mutations with random or no bearer tokens, long keys and queries"
            }
            Attack::SearchCursor => "forged search cursors: `GET /v1/search/users`, huge offset, one account",
            Attack::SlowClients => "slow clients: headers one byte a second, never finished",
            Attack::DisputeFlood => "dispute flood: `POST /v1/disputes`, all priorities, one reporter",
            Attack::ActivityPoisoning => "daily-active-users poisoning: `GET /v1/me` with random bearer tokens",
        }
    }

    /// Anonymous attacks come from many addresses (the cheapest way past per-address limits);
    /// an authenticated attacker is one account, and so one address is as good as many.
    fn sources(self) -> Sources {
        match self {
            Attack::LoginOneAddress | Attack::PasswordGuessing | Attack::SearchCursor | Attack::DisputeFlood => {
                Sources::one(ATTACKER_ADDRESS)
            }
            Attack::LoginManyAddresses
            | Attack::Registration
            | Attack::RegistrationTaken
            | Attack::IdempotencyRows
            | Attack::SlowClients
            | Attack::ActivityPoisoning => Sources::rotating(REQUESTS_PER_ADDRESS),
        }
    }

    /// The `k`-th request of the attack (the slow clients write theirs by hand).
    fn request(self, k: u64, users: u64, nonce: u64) -> Request<String> {
        let random = |salt: u64| random_text(nonce ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt, 43);
        match self {
            Attack::LoginOneAddress | Attack::LoginManyAddresses => {
                let login = format!("{}{k:020}", "x".repeat(230));
                let body = serde_json::json!({"login": login, "password": "not the password"});
                request(Method::POST, "/v1/sessions", None, None, Some(body))
            }
            Attack::Registration => {
                let body = serde_json::json!({
                    "handle": format!("abuse_{k}"),
                    "display_name": format!("Abuse {k}"),
                    "email": format!("abuse_{k}@example.net"),
                    "password": format!("a long enough password {k}"),
                });
                request(Method::POST, "/v1/users", None, None, Some(body))
            }
            Attack::RegistrationTaken => {
                let taken = seeded_handle(k, users);
                let body = serde_json::json!({
                    "handle": format!("u{taken}"),
                    "display_name": format!("Abuse {k}"),
                    "email": format!("u{taken}@example.com"),
                    "password": format!("a long enough password {k}"),
                });
                request(Method::POST, "/v1/users", None, None, Some(body))
            }
            Attack::PasswordGuessing => {
                let body =
                    serde_json::json!({"password": "a brand new password", "current_password": format!("guess {k}")});
                request(Method::PATCH, "/v1/me", Some(ATTACKER_TOKEN), None, Some(body))
            }
            Attack::IdempotencyRows => idempotency_request(k, users, &random(1), &random(2)),
            Attack::SearchCursor => {
                const QUERIES: [&str; 14] =
                    ["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8", "u9", "maria", "kim", "lee", "ana", "sch"];
                let q = QUERIES[(k % QUERIES.len() as u64) as usize];
                let cursor = base64_url(format!("{}", 1_u64 << 60).as_bytes());
                let path = format!("/v1/search/users?q={q}&limit=50&cursor={cursor}");
                request(Method::GET, &path, Some(ATTACKER_TOKEN), None, None)
            }
            Attack::DisputeFlood => {
                const KINDS: [&str; 4] = ["impersonation", "harassment", "spam", "incorrect_info"];
                let body = serde_json::json!({
                    "target_id": format!("u{}", seeded_handle(k.wrapping_mul(7919), users)),
                    "kind": KINDS[(k % 4) as usize],
                    "description": format!("abuse benchmark {k}"),
                });
                request(Method::POST, "/v1/disputes", Some(ATTACKER_TOKEN), None, Some(body))
            }
            Attack::ActivityPoisoning => {
                let token = format!("trl_{}", random(3));
                request(Method::GET, "/v1/me", Some(&token), None, None)
            }
            Attack::SlowClients => unreachable!("the slow clients do not send whole requests"),
        }
    }
}

/// Keyed mutations that no account makes: half with a random bearer token, half with none;
/// half with a 255-character key; a third with a 4 KiB query string; over four routes (one
/// of them `POST /v1/users`, which takes no bearer token, with a body it refuses cheaply).
fn idempotency_request(k: u64, users: u64, random_token: &str, random_key: &str) -> Request<String> {
    let bearer = k.is_multiple_of(2).then(|| format!("trl_{random_token}"));
    let key = if k % 4 < 2 {
        let head = format!("{k}-{random_key}-");
        format!("{head}{}", "k".repeat(LONG_KEY - head.len()))
    } else {
        format!("{k}-{random_key}")
    };
    let query = if k.is_multiple_of(3) { format!("?pad={}", "q".repeat(LONG_QUERY - 5)) } else { String::new() };
    let (method, path, body) = match (k / 2) % 4 {
        0 => (
            Method::PUT,
            format!("/v1/me/contacts/u{}", seeded_handle(k, users)),
            serde_json::json!({"label": format!("l{k}")}),
        ),
        1 => (Method::POST, "/v1/me/circles".to_owned(), serde_json::json!({"name": format!("c{k}")})),
        2 => (
            Method::POST,
            "/v1/disputes".to_owned(),
            serde_json::json!({
                "target_id": format!("u{}", seeded_handle(k, users)),
                "kind": "spam",
                "description": format!("d{k}"),
            }),
        ),
        _ => (Method::POST, "/v1/users".to_owned(), serde_json::json!({"handle": "x"})),
    };
    request(method, &format!("{path}{query}"), bearer.as_deref(), Some(&key), Some(body))
}

fn request(
    method: Method,
    path: &str,
    bearer: Option<&str>,
    idempotency_key: Option<&str>,
    body: Option<serde_json::Value>,
) -> Request<String> {
    let mut builder = Request::builder().method(method).uri(path).header("host", "127.0.0.1");
    if let Some(token) = bearer {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    if let Some(key) = idempotency_key {
        builder = builder.header("idempotency-key", key);
    }
    let body = match body {
        Some(json) => {
            builder = builder.header("content-type", "application/json");
            json.to_string()
        }
        None => String::new(),
    };
    builder.body(body).expect("a well-formed request")
}

/// `len` characters of base64url from a splitmix64 stream seeded with `seed`.
fn random_text(seed: u64, len: usize) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (0..len).map(|_| ALPHABET[(next() % 64) as usize] as char).collect()
}

/// The number of a seeded user with a valid handle: `u<n>` is one from `u100` (three characters)
/// on. Users below 100 (the legitimate client `u1` and the attacker `u2` among them) have
/// handles too short to parse, and are only reached by token.
fn seeded_handle(k: u64, users: u64) -> u64 {
    100 + k % (users - 100)
}

/// Unpadded base64url, as the API's cursors are.
fn base64_url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

struct Settings {
    duration: Duration,
    concurrency: u32,
    slow_connections: u32,
    legit: Steady,
    users: u64,
}

pub fn run(flags: &flags::Bench) -> anyhow::Result<()> {
    // Bad flags fail before the optimised build.
    let attacks = selected(&flags.only)?;
    let settings = Settings {
        duration: Duration::from_secs(flags.duration),
        concurrency: flags.concurrency.unwrap_or(64),
        slow_connections: flags.slow_connections.unwrap_or(2000),
        legit: Steady {
            source: LEGIT_ADDRESS,
            connections: LEGIT_CONNECTIONS,
            rate: flags.rate.unwrap_or(100) as f64,
            requests_per_connection: LEGIT_REQUESTS_PER_CONNECTION,
            timeout: LEGIT_TIMEOUT,
        },
        users: flags.users.unwrap_or(10_000),
    };
    ensure!(settings.duration >= Duration::from_secs(1), "--duration must be at least 1 s");
    ensure!(settings.concurrency > 0, "--concurrency must be at least 1");
    ensure!(settings.legit.rate >= 1.0, "--rate must be at least 1");
    ensure!(settings.users >= 1000, "--users must be at least 1,000");
    if attacks.contains(&Attack::SlowClients) {
        check_open_files(u64::from(settings.slow_connections + settings.concurrency) + 500)?;
    }
    if cfg!(debug_assertions) {
        eprintln!("xtask: bench abuse: building xtask optimised for the load generator");
        build_release(&["xtask"])?;
        return util::run(std::process::Command::new(release_bin("xtask")).args(std::env::args_os().skip(1)));
    }

    let stack = Stack::ensure()?;
    build_release(&["trellis-api", "trellisctl"])?;
    let db = seed(&stack, settings.users)?;
    let nonce = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
    // One set of streams for the run: each attack's API relays into the same ones.
    let prefix = format!("bench{}abuse", std::process::id());
    let mut results = Vec::new();
    for (i, attack) in attacks.iter().enumerate() {
        eprintln!("xtask: bench abuse: {} ({}/{})", attack.name(), i + 1, attacks.len());
        let result = measure(&db, &stack, &prefix, *attack, &settings, nonce)?;
        eprintln!("{}", result.summary_row());
        results.push(result);
    }

    println!("\nmachine: {}\n", machine());
    println!(
        "legitimate client: `GET /v1/me/contacts` (50 contacts) from {LEGIT_ADDRESS}, {} req/s over {LEGIT_CONNECTIONS} \
         connections (each replaced after {LEGIT_REQUESTS_PER_CONNECTION} requests), latency from when each request \
         was due, not served unless 2xx within {} s; attackers: {} connections (slow clients: {}) from {ATTACKER_ADDRESS} \
         or from 127.1.0.0/16 (a new address every {REQUESTS_PER_ADDRESS} requests), {} s each; {} users seeded.\n",
        settings.legit.rate,
        LEGIT_TIMEOUT.as_secs(),
        settings.concurrency,
        thousands(u64::from(settings.slow_connections)),
        settings.duration.as_secs(),
        thousands(settings.users),
    );
    println!(
        "| attack | API RSS growth | idempotency rows from anonymous attackers | legitimate p99, idle → attack | legitimate requests served, idle → attack | |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| target | ≤ {RSS_TARGET_MIB:.0} MiB | 0 | ≤ {P99_TARGET_RATIO:.0}× idle | ≥ {SERVED_TARGET_PERCENT:.0} % | |"
    );
    for r in &results {
        println!("{}", r.summary_row());
    }
    println!(
        "\n| attack | attack load | CPU (one core = 100 %) | API RSS before → peak → after | idempotency rows, all |"
    );
    println!("|---|---|---|---|---|");
    for r in &results {
        println!("{}", r.detail_row());
    }
    let met = results.iter().filter(|r| r.misses().is_empty()).count();
    let missed: Vec<String> = results
        .iter()
        .filter(|r| !r.misses().is_empty())
        .map(|r| format!("{} ({})", r.attack.name(), r.misses().join(", ")))
        .collect();
    println!(
        "\nverdict: {met} of {} attacks meet every target{}",
        results.len(),
        if missed.is_empty() { String::new() } else { format!("; not met: {}", missed.join("; ")) }
    );
    Ok(())
}

fn selected(only: &[String]) -> anyhow::Result<Vec<Attack>> {
    if only.is_empty() {
        return Ok(Attack::ALL.to_vec());
    }
    let names: Vec<&str> = Attack::ALL.iter().map(|a| a.name()).collect();
    only.iter()
        .map(|name| {
            Attack::ALL
                .into_iter()
                .find(|a| a.name() == name)
                .with_context(|| format!("unknown attack `{name}` (known: {})", names.join(", ")))
        })
        .collect()
}

/// Fails unless this process (and so the API it starts) may open `needed` files.
fn check_open_files(needed: u64) -> anyhow::Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse::<u64>().ok());
    if let Some(soft) = soft
        && soft < needed
    {
        bail!(
            "the slow-client attack needs {needed} open files and the limit is {soft}: raise it (`ulimit -n {needed}`) \
             or lower --slow-connections"
        );
    }
    Ok(())
}

/// The database: users `u0`… with a contact graph and scores, the search directory built,
/// `u1` (the legitimate client) with exactly 50 contacts, and `u2` (the authenticated attacker)
/// 90 days old, so that no account-age rule stops it for being new.
fn seed(stack: &Stack, users: u64) -> anyhow::Result<BenchDb> {
    eprintln!("xtask: bench abuse: seeding {DB} with {} users, 20 contacts each on average", thousands(users));
    let db = BenchDb::fresh(stack, DB)?;
    let options = crate::seed::Options { users, avg_contacts: 20.0, verified_fraction: 0.1, seed: 42 };
    crate::seed::load(&db.psql, &db.url, &options, crate::seed::Mode::Empty)?;
    db.exec(&format!(
        "INSERT INTO score.user_scores (user_id, trust, score, run_id, computed_at)
         SELECT id, 0.5, abs(hashtext(id::text)) % 1001, gen_random_uuid(), now() FROM identity.users;
         DELETE FROM contacts.contacts WHERE owner_id = (SELECT id FROM identity.users WHERE handle = 'u1');
         INSERT INTO contacts.contacts (owner_id, contact_id, label)
         SELECT o.id, c.id, 'contact ' || c.handle FROM identity.users o, identity.users c
         WHERE o.handle = 'u1' AND c.handle IN (SELECT 'u' || i FROM generate_series(3, 52) AS i);
         UPDATE identity.users SET created_at = now() - interval '90 days' WHERE handle = 'u2';
         INSERT INTO identity.tokens (token_hash, user_id, expires_at)
         SELECT sha256(convert_to(t.token, 'UTF8')), u.id, now() + interval '7 days'
         FROM (VALUES ('u1', '{LEGIT_TOKEN}'), ('u2', '{ATTACKER_TOKEN}')) AS t (handle, token)
         JOIN identity.users u ON u.handle = t.handle;
         ANALYZE;"
    ))?;
    util::run(
        std::process::Command::new(release_bin("trellisctl"))
            .args(["--database-url", &db.url, "search", "rebuild", "--only", "directory"])
            .stdout(std::process::Stdio::null()),
    )?;
    Ok(db)
}

/// Rows of `ops.idempotency_keys`: all, and those whose principal names no account (a user
/// id, or the hash of a token it issued, whichever the API keys them by).
fn idempotency_rows(db: &BenchDb) -> anyhow::Result<(u64, u64)> {
    let counts = db.exec(
        "SELECT count(*), count(*) FILTER (WHERE NOT EXISTS (
                    SELECT 1 FROM identity.users u
                    WHERE u.id::text = substring(k.principal::text
                        FROM '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}'))
                AND NOT EXISTS (
                    SELECT 1 FROM identity.tokens t
                    WHERE t.token_hash = decode(substring(k.principal::text FROM '[0-9a-f]{64}'), 'hex')))
         FROM ops.idempotency_keys k",
    )?;
    let (all, anonymous) = counts.split_once('|').with_context(|| format!("unexpected counts `{counts}`"))?;
    Ok((all.parse()?, anonymous.parse()?))
}

/// `VmRSS` of a process in KiB; `None` once it has exited.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()
}

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields 14 and 15 follow its `)`.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// What the attack itself did.
enum Load {
    Requests(Tally),
    Slow(SlowReport),
}

struct Measured {
    attack: Attack,
    sources: String,
    load: Load,
    seconds: f64,
    idle: Samples,
    during: Samples,
    /// `VmRSS` before, peak during and after the attack, KiB; `None` after: the API exited.
    rss: (u64, u64, Option<u64>),
    /// Rows added to `ops.idempotency_keys`: all, and from anonymous attackers.
    rows: (u64, u64),
    api_cpu_percent: f64,
    generator_cpu_percent: f64,
}

fn measure(
    db: &BenchDb,
    stack: &Stack,
    prefix: &str,
    attack: Attack,
    settings: &Settings,
    nonce: u64,
) -> anyhow::Result<Measured> {
    // As a running search projector keeps it: the directory answers searches.
    db.exec(
        "UPDATE search.checkpoint SET last_event_at = GREATEST(now(), (SELECT max(created_at) FROM ops.outbox)),
             updated_at = now()",
    )?;
    let api = Api::start(db, stack, prefix, &[])?;
    let target: SocketAddr =
        api.url.trim_start_matches("http://").parse().with_context(|| format!("the API's address in {}", api.url))?;
    let pid = api.pid();
    let legit = settings.legit;
    let legit_request: MakeRequest =
        Arc::new(|_| request(Method::GET, "/v1/me/contacts", Some(LEGIT_TOKEN), None, None));

    let steady = |duration: Duration| {
        let make = legit_request.clone();
        std::thread::spawn(move || -> anyhow::Result<Samples> {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            Ok(runtime.block_on(async move {
                loadgen::steady(target, legit, tokio::time::Instant::now(), duration, make).await
            }))
        })
    };
    join(steady(WARM_UP))?;
    let idle = join(steady(settings.duration))?;
    ensure!(idle.served > 0, "the legitimate client got no answer from an idle API; see target/bench-api.log");

    let rows_before = idempotency_rows(db)?;
    let rss_before = rss_kib(pid).context("trellis-api exited before the attack")?;
    let (api_cpu_before, generator_cpu_before) = (cpu_ticks(pid), cpu_ticks(std::process::id()));
    let started = Instant::now();
    let sources = attack.sources();
    let attacker = {
        let sources = sources.clone();
        let (duration, concurrency, slow_connections, users) =
            (settings.duration, settings.concurrency, settings.slow_connections, settings.users);
        std::thread::spawn(move || -> anyhow::Result<Load> {
            // The attacker's machine is not the API's: on this one, the attack's own load
            // generation yields the CPU to the API, the database and the legitimate client.
            rustix::process::setpriority_process(Some(rustix::thread::gettid()), ATTACKER_NICE)
                .context("lowering the attacker thread's priority")?;
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            Ok(runtime.block_on(async move {
                let until = tokio::time::Instant::now() + duration;
                match attack {
                    Attack::SlowClients => Load::Slow(
                        loadgen::slow_clients(target, sources, slow_connections, SLOW_BYTE_EVERY, until).await,
                    ),
                    _ => {
                        let make: MakeRequest = Arc::new(move |k| attack.request(k, users, nonce));
                        Load::Requests(loadgen::flood(target, sources, concurrency, until, make).await)
                    }
                }
            }))
        })
    };
    let client = steady(settings.duration);
    let mut rss_peak = rss_before;
    // The attack's own span: the legitimate client may still wait for answers after it.
    let mut attack_end = None;
    while !(attacker.is_finished() && client.is_finished()) {
        rss_peak = rss_peak.max(rss_kib(pid).unwrap_or(0));
        if attack_end.is_none() && attacker.is_finished() {
            attack_end = Some((started.elapsed(), cpu_ticks(pid), cpu_ticks(std::process::id())));
        }
        std::thread::sleep(RSS_SAMPLE_EVERY);
    }
    let (elapsed, api_cpu_after, generator_cpu_after) =
        attack_end.unwrap_or_else(|| (started.elapsed(), cpu_ticks(pid), cpu_ticks(std::process::id())));
    let seconds = elapsed.as_secs_f64();
    let cpu_percent = |before: Option<u64>, after: Option<u64>| match (before, after) {
        (Some(b), Some(a)) => 100.0 * a.saturating_sub(b) as f64 / TICKS_PER_SECOND / seconds,
        _ => f64::NAN,
    };
    let api_cpu_percent = cpu_percent(api_cpu_before, api_cpu_after);
    let generator_cpu_percent = cpu_percent(generator_cpu_before, generator_cpu_after);
    let load = join(attacker)?;
    let during = join(client)?;
    std::thread::sleep(SETTLE);
    let rss_after = rss_kib(pid);
    let rows_after = idempotency_rows(db)?;
    drop(api);
    Ok(Measured {
        attack,
        sources: sources.describe(),
        load,
        seconds,
        idle,
        during,
        rss: (rss_before, rss_peak, rss_after),
        rows: (rows_after.0.saturating_sub(rows_before.0), rows_after.1.saturating_sub(rows_before.1)),
        api_cpu_percent,
        generator_cpu_percent,
    })
}

fn join<T>(thread: std::thread::JoinHandle<anyhow::Result<T>>) -> anyhow::Result<T> {
    thread.join().map_err(|_| anyhow::anyhow!("a load generator thread panicked"))?
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

impl Measured {
    fn rss_growth_mib(&self) -> f64 {
        mib(self.rss.1.saturating_sub(self.rss.0))
    }

    fn p99_ratio(&self) -> f64 {
        self.during.quantile_ms(0.99) / self.idle.quantile_ms(0.99)
    }

    // Each target is met only by a number that meets it: NaN (no sample) does not.
    fn rss_met(&self) -> bool {
        self.rss.2.is_some() && self.rss_growth_mib() <= RSS_TARGET_MIB
    }

    fn rows_met(&self) -> bool {
        self.rows.1 == 0
    }

    fn p99_met(&self) -> bool {
        self.p99_ratio() <= P99_TARGET_RATIO
    }

    fn served_met(&self) -> bool {
        self.during.served_percent() >= SERVED_TARGET_PERCENT
    }

    /// The targets this attack missed.
    fn misses(&self) -> Vec<&'static str> {
        [
            (self.rss_met(), if self.rss.2.is_some() { "RSS" } else { "RSS: the API exited" }),
            (self.rows_met(), "idempotency rows"),
            (self.p99_met(), "p99"),
            (self.served_met(), "served"),
        ]
        .into_iter()
        .filter(|(met, _)| !met)
        .map(|(_, name)| name)
        .collect()
    }

    fn summary_row(&self) -> String {
        let bold = |text: String, met: bool| if met { text } else { format!("**{text}**") };
        let rss = bold(format!("+{:.0} MiB", self.rss_growth_mib()), self.rss_met());
        let rows = bold(thousands(self.rows.1), self.rows_met());
        let p99 = format!(
            "{:.1} → {} ms",
            self.idle.quantile_ms(0.99),
            bold(format!("{:.1} ({:.1}×)", self.during.quantile_ms(0.99), self.p99_ratio()), self.p99_met())
        );
        let served = format!(
            "{:.1} % → {}",
            self.idle.served_percent(),
            bold(
                format!(
                    "{:.1} % ({} of {})",
                    self.during.served_percent(),
                    thousands(self.during.served),
                    thousands(self.during.due())
                ),
                self.served_met()
            )
        );
        let misses = self.misses();
        let verdict = if misses.is_empty() { "met".to_owned() } else { format!("**not met** ({})", misses.join(", ")) };
        format!(
            "| {} (`{}`) | {rss} | {rows} | {p99} | {served} | {verdict} |",
            self.attack.title(),
            self.attack.name()
        )
    }

    fn detail_row(&self) -> String {
        let load = match &self.load {
            Load::Requests(tally) => format!(
                "answered {} ({:.0}/s), {}: {}{}{}",
                thousands(tally.answered()),
                tally.answered() as f64 / self.seconds,
                self.sources,
                tally.describe_statuses(),
                if tally.failed > 0 { format!("; {} failed", thousands(tally.failed)) } else { String::new() },
                if tally.unanswered_at_end > 0 {
                    format!("; {} unanswered at the end", thousands(tally.unanswered_at_end))
                } else {
                    String::new()
                },
            ),
            Load::Slow(slow) => format!(
                "{} connections opened {}: {} still open at the end, {} closed by the server{}",
                thousands(slow.opened),
                self.sources,
                thousands(slow.open_at_end),
                thousands(slow.closed_by_server),
                if slow.failed > 0 {
                    format!(", {} connection attempts failed", thousands(slow.failed))
                } else {
                    String::new()
                },
            ),
        };
        let legit_errors = [&self.idle, &self.during]
            .iter()
            .any(|s| s.tally.failed > 0 || s.tally.statuses.keys().any(|status| !(200..300).contains(status)));
        let legit = if legit_errors {
            format!(
                "; legitimate client idle: {}, {} failed; during: {}, {} failed",
                self.idle.tally.describe_statuses(),
                self.idle.tally.failed,
                self.during.tally.describe_statuses(),
                self.during.tally.failed
            )
        } else {
            String::new()
        };
        let after = match self.rss.2 {
            Some(kib) => format!("{:.0} MiB", mib(kib)),
            None => "exited".to_owned(),
        };
        format!(
            "| `{}` | {load}{legit} | API {:.0} %, generator {:.0} % | {:.0} → {:.0} → {after} | +{} |",
            self.attack.name(),
            self.api_cpu_percent,
            self.generator_cpu_percent,
            mib(self.rss.0),
            mib(self.rss.1),
            thousands(self.rows.0),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_url_matches_the_cursor_encoding() {
        assert_eq!(base64_url(b"20"), "MjA");
        assert_eq!(base64_url(b"1152921504606846976"), "MTE1MjkyMTUwNDYwNjg0Njk3Ng");
        assert_eq!(base64_url(b"abc"), "YWJj");
    }

    #[test]
    fn long_idempotency_keys_are_as_long_as_the_api_accepts() {
        let long = idempotency_request(0, 1000, "t", "r");
        assert_eq!(long.headers()["idempotency-key"].len(), LONG_KEY);
        assert!(long.uri().query().is_some_and(|q| q.len() == LONG_QUERY - 1));
        let short = idempotency_request(3, 1000, "t", "r");
        assert!(short.headers()["idempotency-key"].len() < 20);
        assert!(short.headers().get("authorization").is_none());
    }
}
