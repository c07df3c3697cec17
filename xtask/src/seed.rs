//! `cargo xtask seed`: a large, realistic data set for benchmarks — users and a heavy-tailed
//! contact graph — loaded through `COPY` by one `psql` session.
//!
//! **Users.** User `i` (counting on from the largest existing `u<i>` handle with `--append`)
//! has the handle `u<i>`, the email `u<i>@example.com`, a display name drawn from small word
//! lists (so that name search finds realistic numbers of matches), `verified` with probability
//! `--verified-fraction`, and a UUIDv7-shaped id whose timestamp is a fixed epoch plus `i`
//! milliseconds, so that ids sort like indexes. Everything about user `i` derives from
//! (`--seed`, `i`): the same command produces the same rows.
//!
//! Seeded users never log in: they all share [`PASSWORD_HASH`], a well-formed argon2id hash whose
//! digest is all zeros, which no password produces. A login attempt costs one argon2 verification
//! and fails with 401, like any wrong password; tokens for them, if a benchmark needs some, are
//! inserted directly.
//!
//! **Contacts.** Owners take turns in id order. Owner `o` gets an out-degree drawn from a
//! log-normal distribution with mean `--avg-contacts`, adjusted so that the total is exactly
//! `round(users · avg-contacts)`. Each of its contacts is, with probability [`UNIFORM_PICK`], a
//! user chosen uniformly, and otherwise an entry chosen uniformly from the list of every contact
//! picked so far: a user appears in that list once per incoming edge, so this is preferential
//! attachment on in-degree (Price's model with a uniform share). In-degrees follow a power law
//! with exponent about `1 + 1/(1 − UNIFORM_PICK)`; the graph has cycles (targets come from the
//! whole user set, not just older users) and no self-loops or duplicate pairs. With `--append`,
//! the new users form a graph of their own.
//!
//! **Loading.** One `psql` session, one transaction: nothing is visible until everything is,
//! and an interrupted seed leaves nothing behind. Rows stream from the generator into `psql`'s
//! stdin in text `COPY` format as they are produced; nothing holds all the rows in memory. Rows
//! come in primary-key order, so the primary-key index only ever grows at its right edge. Into
//! an empty database:
//! - the tables are truncated inside the transaction, which lets `COPY ... FREEZE` write rows
//!   already frozen and all-visible (the first reader does not have to set hint bits and write
//!   every page again);
//! - `contacts_contact_id_idx` (a secondary index) is dropped and rebuilt after the load, which
//!   sorts once instead of inserting 20M random keys;
//! - `session_replication_role = replica` turns the foreign-key triggers off for the load (it
//!   needs a superuser; without one the load is correct but about 7× slower). The data are
//!   consistent by construction: every contact names two users loaded by the same transaction.
//!
//! Measured on the 2-core machine, PostgreSQL 15 with its default settings, 20M contacts of 1M
//! users (server-side COPY from a file, so without the generator): COPY FREEZE with the
//! secondary index in place 109 s; with it dropped and rebuilt 45 s + 11 s; through an UNLOGGED
//! staging table and `INSERT ... SELECT` (index rebuilt) 22 s + 36 s + 10 s. With the foreign-key
//! triggers on, 2M contacts take 22 s instead of 3 s. The whole seed of 1M users and 20M
//! contacts takes about 1 min (54–72 s, depending on what else runs on the machine).

use std::io::{BufRead as _, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::flags;
use crate::services::Stack;
use crate::util::{self, redact};

/// The password hash of every seeded user: argon2id with the crate's default parameters, salt
/// `seeded-user-salt`, and an all-zero digest that no password hashes to.
pub const PASSWORD_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c2VlZGVkLXVzZXItc2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// The share of contacts picked uniformly; the rest are picked by preferential attachment.
const UNIFORM_PICK: f64 = 0.3;
/// The spread (σ of the underlying normal) of the log-normal out-degree distribution.
const OUT_DEGREE_SIGMA: f64 = 0.8;
/// No owner gets more contacts than this (nor more than there are other users).
const MAX_OUT_DEGREE: u64 = 5_000;
/// The UUIDv7 timestamp of user 0: 2025-01-01T00:00:00Z, in milliseconds.
const EPOCH_MS: u64 = 1_735_689_600_000;
/// How often progress is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct Options {
    pub users: u64,
    pub avg_contacts: f64,
    pub verified_fraction: f64,
    pub seed: u64,
}

/// What the database holds when the seed starts, and so what the seed may do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// No users: load with `FREEZE` and rebuild the secondary index.
    Empty,
    /// Delete every user (and, through `CASCADE`, everything that references one) first.
    Reset,
    /// Add users after the existing ones.
    Append,
}

pub struct Summary {
    pub users: u64,
    pub contacts: u64,
    pub verified: u64,
    pub wall: Duration,
}

pub fn run(flags: &flags::Seed) -> anyhow::Result<()> {
    if flags.append && flags.reset {
        bail!("--append and --reset exclude each other");
    }
    // A stack this command had to start stays up: the seeded database is meant to be used.
    let mut stack = None;
    let url = match &flags.database_url {
        Some(url) => url.clone(),
        None => {
            let started = Stack::ensure()?;
            let url = started.database_url.clone();
            stack = Some(started);
            url
        }
    };
    let psql = psql()?;
    create_database_if_missing(&psql, &url)?;
    // Seeding needs only the users and contacts tables; an existing schema is left as it is
    // (and the release build that migrating takes is skipped).
    if query(&psql, &url, "SELECT to_regclass('contacts.contacts') IS NULL")? == "t" {
        migrate(&url)?;
    }

    let existing: u64 = query(&psql, &url, "SELECT count(*) FROM identity.users")?.parse()?;
    let mode = match (existing, flags.append, flags.reset) {
        (0, _, _) => Mode::Empty,
        (_, true, _) => Mode::Append,
        (_, _, true) => Mode::Reset,
        (n, false, false) => bail!(
            "{} already holds {} users: pass --append to add users after them, or --reset to delete \
             every user and everything that references one first",
            redact(&url),
            thousands(n)
        ),
    };
    if mode == Mode::Reset {
        let tables = reset_tables(&psql, &url)?;
        eprintln!(
            "seed: WARNING: --reset deletes every row of {} in {} ({} users now). Ctrl-C within 5 s to keep them.",
            tables.join(", "),
            redact(&url),
            thousands(existing)
        );
        std::thread::sleep(Duration::from_secs(5));
    }
    let options = Options {
        users: flags.users,
        avg_contacts: flags.avg_contacts,
        verified_fraction: flags.verified_fraction,
        seed: flags.seed,
    };
    let summary = load(&psql, &url, &options, mode)?;
    let total: u64 = query(&psql, &url, "SELECT count(*) FROM identity.users")?.parse()?;
    eprintln!();
    println!(
        "seeded {}: {} users ({} verified, {:.1}%), {} contacts (avg {:.2} per user) in {:.1} s; the database now holds {} users",
        redact(&url),
        thousands(summary.users),
        thousands(summary.verified),
        100.0 * summary.verified as f64 / summary.users.max(1) as f64,
        thousands(summary.contacts),
        summary.contacts as f64 / summary.users.max(1) as f64,
        summary.wall.as_secs_f64(),
        thousands(total),
    );
    if let Some(stack) = stack {
        stack.keep_running();
    }
    Ok(())
}

pub fn psql() -> anyhow::Result<PathBuf> {
    util::find_program("psql", &[]).context("psql is needed to seed (apt-get install postgresql-client)")
}

/// One value (or rows, `|`-separated) from a query.
fn query(psql: &Path, url: &str, sql: &str) -> anyhow::Result<String> {
    util::read(Command::new(psql).arg(url).args(["-qAtX", "-v", "ON_ERROR_STOP=1", "-c", sql]))
}

/// Creates the URL's database, connected to the server's `postgres` database, unless it exists.
pub fn create_database_if_missing(psql: &Path, url: &str) -> anyhow::Result<()> {
    let name = database_name(url);
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        bail!("seed creates databases with plain names only (letters, digits, _), not `{name}`");
    }
    let maintenance = crate::bench::replace_database(url, "postgres");
    let exists = query(psql, &maintenance, &format!("SELECT 1 FROM pg_database WHERE datname = '{name}'"))?;
    if exists.is_empty() {
        eprintln!("seed: creating database {name}");
        query(psql, &maintenance, &format!("CREATE DATABASE {name}"))?;
    }
    Ok(())
}

fn database_name(url: &str) -> String {
    let base = url.split('?').next().unwrap_or(url);
    let after_scheme = base.split_once("://").map_or(base, |(_, rest)| rest);
    after_scheme.split_once('/').map_or("", |(_, db)| db).to_owned()
}

/// Brings the schema up to date with the release `trellisctl` (built if needed).
pub fn migrate(url: &str) -> anyhow::Result<()> {
    crate::bench::build_release(&["trellisctl"])?;
    util::read(Command::new(crate::bench::release_bin("trellisctl")).args(["migrate", "up"]).env("DATABASE_URL", url))
        .map(drop)
        .context("migrating the database")
}

/// The tables `--reset` empties: the users and every table that references them, recursively
/// (what `TRUNCATE ... CASCADE` reaches), and `score.runs` (runs over a graph that is gone; a
/// successful one would keep the orchestrator from its first-start run).
fn reset_tables(psql: &Path, url: &str) -> anyhow::Result<Vec<String>> {
    let sql = "
        WITH RECURSIVE refs(oid) AS (
            SELECT 'identity.users'::regclass::oid
            UNION
            SELECT c.conrelid FROM pg_constraint c JOIN refs r ON c.confrelid = r.oid WHERE c.contype = 'f'
        )
        SELECT oid::regclass::text FROM refs
        UNION
        SELECT 'score.runs' WHERE to_regclass('score.runs') IS NOT NULL
        ORDER BY 1";
    Ok(query(psql, url, sql)?.lines().map(str::to_owned).collect())
}

/// Generates the users and contacts and loads them in one transaction.
pub fn load(psql: &Path, url: &str, options: &Options, mode: Mode) -> anyhow::Result<Summary> {
    if options.users == 0 || options.users > u64::from(u32::MAX) {
        bail!("--users must be between 1 and {}", u32::MAX);
    }
    if !(0.0..=1.0).contains(&options.verified_fraction) {
        bail!("--verified-fraction must be between 0 and 1");
    }
    if !(options.avg_contacts >= 0.0 && options.avg_contacts.is_finite()) {
        bail!("--avg-contacts must be a non-negative number");
    }
    let started = Instant::now();
    let superuser = query(psql, url, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user")? == "t";
    let first_index: u64 = match mode {
        Mode::Append => query(
            psql,
            url,
            r"SELECT coalesce(max(substr(handle, 2)::bigint) + 1, 0) FROM identity.users WHERE handle ~ '^u[0-9]{1,18}$'",
        )?
        .parse()?,
        Mode::Empty | Mode::Reset => 0,
    };
    let reset_tables = if mode == Mode::Reset { reset_tables(psql, url)? } else { Vec::new() };
    // The secondary index on contact_id, rebuilt after the load when the table starts empty.
    let rebuild_index = if mode == Mode::Append {
        None
    } else {
        let def = query(
            psql,
            url,
            "SELECT indexdef FROM pg_indexes WHERE schemaname = 'contacts' AND indexname = 'contacts_contact_id_idx'",
        )?;
        (!def.is_empty()).then_some(def)
    };
    if !superuser {
        eprintln!("seed: warning: not a superuser, so the foreign-key triggers stay on during the load (much slower)");
    }

    let mut child = Command::new(psql)
        .arg(url)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .env("PGAPPNAME", "xtask-seed")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting psql")?;
    // psql echoes a marker after each step; this thread times the steps.
    let stdout = child.stdout.take().context("psql stdout")?;
    let reporter = std::thread::spawn(move || {
        let mut last = Instant::now();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            match line.strip_prefix("xtask-step ") {
                Some(step) => {
                    eprintln!("seed: {step} ({:.1} s)", last.elapsed().as_secs_f64());
                    last = Instant::now();
                }
                None => eprintln!("psql: {line}"),
            }
        }
    });
    let stdin = child.stdin.take().context("psql stdin")?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stdin);

    let generated = (|| -> anyhow::Result<(u64, u64, u64)> {
        let w = &mut out;
        writeln!(
            w,
            "SET lock_timeout = '10s';\nSET statement_timeout = 0;\nSET client_min_messages = warning;\nSET maintenance_work_mem = '1GB';"
        )?;
        if superuser {
            // Foreign-key checks off for this session: see the module comment.
            writeln!(w, "SET session_replication_role = replica;")?;
        }
        writeln!(w, "BEGIN;")?;
        let freeze = match mode {
            Mode::Empty => {
                // Empty when we looked; make sure under the lock, then truncate, which makes
                // `COPY ... FREEZE` possible.
                writeln!(w, "LOCK TABLE identity.users IN ACCESS EXCLUSIVE MODE;")?;
                writeln!(
                    w,
                    "DO $$ BEGIN IF EXISTS (SELECT FROM identity.users) THEN \
                     RAISE EXCEPTION 'users appeared after seeding started; nothing was seeded'; END IF; END $$;"
                )?;
                writeln!(w, "TRUNCATE identity.users CASCADE;")?;
                " WITH (FREEZE)"
            }
            Mode::Reset => {
                writeln!(w, "TRUNCATE {} CASCADE;", reset_tables.join(", "))?;
                writeln!(w, "\\echo xtask-step deleted the existing users")?;
                " WITH (FREEZE)"
            }
            Mode::Append => "",
        };
        if rebuild_index.is_some() {
            writeln!(w, "DROP INDEX contacts.contacts_contact_id_idx;")?;
        }
        writeln!(
            w,
            "COPY identity.users (id, handle, display_name, email, password_hash, verified) FROM STDIN{freeze};"
        )?;
        let ids = write_users(w, options, first_index)?;
        writeln!(w, "\\.")?;
        writeln!(w, "\\echo xtask-step users loaded")?;
        writeln!(w, "COPY contacts.contacts (owner_id, contact_id) FROM STDIN{freeze};")?;
        let contacts = write_contacts(w, options, &ids.ids)?;
        writeln!(w, "\\.")?;
        writeln!(w, "\\echo xtask-step contacts loaded")?;
        if let Some(def) = &rebuild_index {
            writeln!(w, "{def};")?;
            writeln!(w, "\\echo xtask-step index contacts_contact_id_idx rebuilt")?;
        }
        writeln!(w, "COMMIT;")?;
        writeln!(w, "\\echo xtask-step committed")?;
        writeln!(w, "ANALYZE identity.users, contacts.contacts;")?;
        writeln!(w, "\\echo xtask-step analyzed")?;
        w.flush()?;
        Ok((options.users, contacts, ids.verified))
    })();
    drop(out); // closes psql's stdin
    let status = child.wait().context("waiting for psql")?;
    let _ = reporter.join();
    if !status.success() {
        bail!("psql failed ({status}); the transaction was rolled back, nothing was seeded");
    }
    let (users, contacts, verified) = generated?;
    Ok(Summary { users, contacts, verified, wall: started.elapsed() })
}

/// The users' ids as `COPY` text, by index from the first seeded user.
struct Users {
    ids: Vec<[u8; 36]>,
    verified: u64,
}

#[rustfmt::skip]
const FIRST_NAMES: &[&str] = &[
    "Ada", "Aiko", "Alejandro", "Amara", "Ana", "Andrei", "Anna", "Arjun", "Astrid", "Ben", "Bianca", "Carlos",
    "Chen", "Chloé", "Daniel", "Dmitri", "Elena", "Emma", "Fatima", "Felix", "Grace", "Hana", "Hugo", "Ines",
    "Isaac", "Ivan", "Jamal", "Jana", "José", "Julia", "Kai", "Kenji", "Lars", "Laura", "Leila", "Liam", "Lina",
    "Lucas", "Łukasz", "Maria", "Mateo", "Maya", "Mei", "Mia", "Mohammed", "Nadia", "Noah", "Nora", "Olga", "Omar",
    "Priya", "Rafael", "Ravi", "Rosa", "Sami", "Sara", "Sofia", "Søren", "Tariq", "Tom", "Wei", "Yara", "Yusuf",
    "Zoë",
];

#[rustfmt::skip]
const LAST_NAMES: &[&str] = &[
    "Abe", "Adeyemi", "Almeida", "Andersen", "Becker", "Bianchi", "Chen", "Costa", "Dubois", "Dvořák", "Eriksson",
    "Fernández", "Fischer", "García", "Gonzalez", "Haddad", "Hansen", "Hoffmann", "Ivanova", "Jensen", "Kang",
    "Kaya", "Khan", "Kim", "Kowalski", "Kumar", "Larsen", "Lee", "Li", "Lopez", "Martin", "Müller", "Nakamura",
    "Nguyen", "Novak", "Okafor", "Olsen", "Park", "Patel", "Pereira", "Petrov", "Popescu", "Rossi", "Sato",
    "Schmidt", "Silva", "Singh", "Smith", "Suzuki", "Tanaka", "Tran", "Van Dijk", "Wagner", "Wang", "Weber",
    "Williams", "Wong", "Yamamoto", "Yilmaz", "Zhang", "Zhou", "Ziegler", "Öztürk", "Ødegaard",
];

/// Writes the users' `COPY` rows; returns their ids.
fn write_users(w: &mut impl Write, options: &Options, first_index: u64) -> anyhow::Result<Users> {
    let n = options.users;
    let mut ids = Vec::with_capacity(usize::try_from(n)?);
    let mut verified = 0;
    let mut progress = Progress::new("users", n);
    let mut row = Vec::with_capacity(256);
    for i in 0..n {
        let index = first_index + i;
        let mut rng = Rng::new(options.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED_0001);
        let id = uuid_text(index, &mut rng);
        let first = FIRST_NAMES[rng.below(FIRST_NAMES.len() as u64) as usize];
        let last = LAST_NAMES[rng.below(LAST_NAMES.len() as u64) as usize];
        let is_verified = rng.unit() < options.verified_fraction;
        verified += u64::from(is_verified);
        row.clear();
        row.extend_from_slice(&id);
        // Some people go by their first name alone, some show a middle initial.
        match rng.below(10) {
            0 => write!(row, "\tu{index}\t{first}\t"),
            1 => write!(row, "\tu{index}\t{first} {}. {last}\t", (b'A' + rng.below(26) as u8) as char),
            _ => write!(row, "\tu{index}\t{first} {last}\t"),
        }?;
        writeln!(row, "u{index}@example.com\t{PASSWORD_HASH}\t{}", if is_verified { 't' } else { 'f' })?;
        w.write_all(&row)?;
        ids.push(id);
        progress.tick(i + 1);
    }
    progress.done(n);
    Ok(Users { ids, verified })
}

/// Generates the contact graph and writes its `COPY` rows in (owner, contact) order; returns
/// the number of contacts.
fn write_contacts(w: &mut impl Write, options: &Options, ids: &[[u8; 36]]) -> anyhow::Result<u64> {
    let n = ids.len() as u64;
    let mut rng = Rng::new(options.seed ^ 0xC0DE_CAFE_F00D);
    let degrees = out_degrees(&mut rng, n, options.avg_contacts);
    let total: u64 = degrees.iter().map(|&d| u64::from(d)).sum();
    // Every contact picked so far, so that a uniform pick from it is proportional to in-degree.
    let mut picked: Vec<u32> = Vec::with_capacity(usize::try_from(total)?);
    let mut targets: Vec<u32> = Vec::new();
    let mut progress = Progress::new("contacts", total);
    let mut written = 0;
    let mut row = [0u8; 74];
    row[36] = b'\t';
    row[73] = b'\n';
    for (owner, &degree) in degrees.iter().enumerate() {
        let owner = owner as u32;
        pick_targets(&mut rng, n, owner, degree as usize, &picked, &mut targets);
        row[..36].copy_from_slice(&ids[owner as usize]);
        for &t in &targets {
            row[37..73].copy_from_slice(&ids[t as usize]);
            w.write_all(&row)?;
        }
        picked.extend_from_slice(&targets);
        written += targets.len() as u64;
        progress.tick(written);
    }
    progress.done(written);
    Ok(written)
}

/// `degree` distinct contacts for `owner`, none of them `owner`, sorted.
fn pick_targets(rng: &mut Rng, n: u64, owner: u32, degree: usize, picked: &[u32], out: &mut Vec<u32>) {
    out.clear();
    let mut rounds = 0;
    while out.len() < degree {
        // Preferential picks can keep hitting the same few popular users for an owner with many
        // contacts; after a few rounds, fill up uniformly (which always finishes: degree < n).
        let preferential = rounds < 4 && !picked.is_empty();
        for _ in out.len()..degree {
            let t = if preferential && rng.unit() >= UNIFORM_PICK {
                picked[rng.below(picked.len() as u64) as usize]
            } else {
                rng.below(n) as u32
            };
            if t != owner {
                out.push(t);
            }
        }
        out.sort_unstable();
        out.dedup();
        rounds += 1;
    }
}

/// Out-degrees with mean `avg` (log-normal), summing to exactly `round(n · avg)` (capped at what
/// the users can hold).
fn out_degrees(rng: &mut Rng, n: u64, avg: f64) -> Vec<u32> {
    let max = (n - 1).min(MAX_OUT_DEGREE);
    let target = ((n as f64 * avg).round() as u64).min(n * max);
    let mu = -OUT_DEGREE_SIGMA * OUT_DEGREE_SIGMA / 2.0; // so that the factor's mean is 1
    let mut degrees: Vec<u32> =
        (0..n).map(|_| ((avg * (mu + OUT_DEGREE_SIGMA * rng.normal()).exp()).round() as u64).min(max) as u32).collect();
    let mut sum: u64 = degrees.iter().map(|&d| u64::from(d)).sum();
    while sum != target {
        let d = &mut degrees[rng.below(n) as usize];
        if sum < target && u64::from(*d) < max {
            *d += 1;
            sum += 1;
        } else if sum > target && *d > 0 {
            *d -= 1;
            sum -= 1;
        }
    }
    degrees
}

/// The UUIDv7-shaped id of user `index`, as text: the timestamp is [`EPOCH_MS`] + `index`, the
/// rest random from `rng`.
fn uuid_text(index: u64, rng: &mut Rng) -> [u8; 36] {
    let ms = (EPOCH_MS + index) & 0xFFFF_FFFF_FFFF;
    let random_a = rng.next_u64();
    let random_b = rng.next_u64();
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    bytes[6] = 0x70 | ((random_a >> 8) & 0x0F) as u8;
    bytes[7] = random_a as u8;
    bytes[8..].copy_from_slice(&random_b.to_be_bytes());
    bytes[8] = 0x80 | (bytes[8] & 0x3F);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [b'-'; 36];
    let mut at = 0;
    for (i, byte) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            at += 1;
        }
        text[at] = HEX[usize::from(byte >> 4)];
        text[at + 1] = HEX[usize::from(byte & 0x0F)];
        at += 2;
    }
    text
}

/// SplitMix64: small, fast, and good enough for synthetic data (it passes BigCrush).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        rng.next_u64(); // decorrelates nearby seeds
        rng
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2⁻³² for our `n`).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u = 1.0 - self.unit(); // (0, 1]
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// Rows written so far, with rates, every [`PROGRESS_EVERY`] on stderr. Rows are written to
/// `psql` through a pipe, so written is loaded give or take a buffer.
struct Progress {
    what: &'static str,
    total: u64,
    started: Instant,
    last: Instant,
    last_count: u64,
    calls: u64,
}

impl Progress {
    fn new(what: &'static str, total: u64) -> Self {
        let now = Instant::now();
        Progress { what, total, started: now, last: now, last_count: 0, calls: 0 }
    }

    fn tick(&mut self, count: u64) {
        self.calls += 1;
        if !self.calls.is_multiple_of(256) || self.last.elapsed() < PROGRESS_EVERY {
            return;
        }
        let now = Instant::now();
        let rate = (count - self.last_count) as f64 / (now - self.last).as_secs_f64();
        let eta = (self.total - count) as f64 / rate.max(1.0);
        eprintln!(
            "seed: {} {}/{} ({:.0}%), {}/s, about {:.0} s to go",
            self.what,
            thousands(count),
            thousands(self.total),
            100.0 * count as f64 / self.total.max(1) as f64,
            thousands(rate as u64),
            eta
        );
        self.last = now;
        self.last_count = count;
    }

    fn done(&self, count: u64) {
        let secs = self.started.elapsed().as_secs_f64();
        eprintln!(
            "seed: {} {} streamed in {secs:.1} s ({}/s)",
            thousands(count),
            self.what,
            thousands((count as f64 / secs.max(1e-9)) as u64)
        );
    }
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_uuid_v7_shaped_and_sort_like_indexes() {
        let mut previous = String::new();
        for index in [0, 1, 2, 1_000, 999_999, 1_000_000] {
            let text = uuid_text(index, &mut Rng::new(index));
            let text = std::str::from_utf8(&text).unwrap().to_owned();
            assert_eq!(text.len(), 36);
            assert_eq!(&text[14..15], "7", "{text}");
            assert!("89ab".contains(&text[19..20]), "{text}");
            assert!(text > previous, "{text} after {previous}");
            previous = text;
        }
    }

    #[test]
    fn out_degrees_sum_exactly() {
        let mut rng = Rng::new(7);
        let d = out_degrees(&mut rng, 10_000, 20.0);
        assert_eq!(d.iter().map(|&x| u64::from(x)).sum::<u64>(), 200_000);
        let d = out_degrees(&mut rng, 3, 20.0);
        assert_eq!(d, vec![2, 2, 2]);
        let d = out_degrees(&mut rng, 1, 20.0);
        assert_eq!(d, vec![0]);
    }

    #[test]
    fn targets_are_distinct_sorted_and_never_the_owner() {
        let mut rng = Rng::new(1);
        let picked = vec![5u32; 100];
        let mut out = Vec::new();
        pick_targets(&mut rng, 10, 5, 9, &picked, &mut out);
        assert_eq!(out, vec![0, 1, 2, 3, 4, 6, 7, 8, 9]);
        pick_targets(&mut rng, 1_000, 3, 50, &picked, &mut out);
        assert_eq!(out.len(), 50);
        assert!(out.windows(2).all(|w| w[0] < w[1]) && !out.contains(&3));
    }

    #[test]
    fn thousands_separates() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(20_000_000), "20,000,000");
    }

    #[test]
    fn database_names() {
        assert_eq!(database_name("postgres://u:p@h:5432/trellis_seed?sslmode=disable"), "trellis_seed");
        assert_eq!(database_name("postgres://h"), "");
    }
}
