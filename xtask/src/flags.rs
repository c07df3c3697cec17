//! Command-line parsing, by hand: the grammar is small enough not to need a parser crate.

use anyhow::{Context, bail};

pub const HELP: &str = "\
usage: cargo xtask <command> [options]

commands:
  up [--stage a|b] [--nats-cluster]
                     build and run the whole system (PostgreSQL, NATS, trellis-api and the
                     workers), seed demo data on first run; Ctrl-C stops everything.
                     --stage a runs trellis-api alone (every processor in-process);
                     --nats-cluster runs NATS as a three-node JetStream cluster on loopback.
  services [--stop]  make sure PostgreSQL and NATS are reachable (starting private ones under
                     target/dev-stack/ if needed) and print `export` lines for them;
                     --stop stops the private ones.
  tidy               check the repository by machine: no issue numbers or paths outside it,
                     no comment line over 120 characters, the README's and ARCHITECTURE's
                     trellisctl and xtask commands match their CLIs, every table and event type
                     catalogued.
  lint [DIR]         lint the migrations (in migrations/, or DIR) with squawk.
  deploy             validate deploy/ offline: docker-compose config, promtool check and test
                     rules, kubectl kustomize of both overlays, kubernetes-validate, and the
                     KEDA ScaledObjects against the vendored CRD schema (installs what is missing).
  test [--nats VERSION] [-- ARGS]
                     tidy, fmt check, clippy, lint, deploy, then the test suite (ARGS go to the test
                     runner) on a nats-server of its own: the version deploy/ ships (installed with
                     pip under target/nats/), or VERSION of the matrix; without pip, the machine's.
  test --nats-matrix [-- ARGS]
                     the runtime, relay and worker suites on every nats-server version of the matrix
                     (2.9.10 Debian's, the others installed with pip); a table of the results.
  chaos [--short] [-- ARGS]
                     the fault scenarios (crates/trellisctl/tests/chaos) under a steady write load,
                     on a three-node cluster and on one nats-server, each ending with exact
                     invariants; a table: writes sent and acknowledged, writes repeated, events,
                     time to settle, invariants held. Each phase of load runs 4 times longer than
                     in the suite; --short runs the suite's form (ARGS go to the test runner).
  bench SUITE [--duration SECS] [--users N] [--db-pool-size N] [--rate N]
              [--only NAME,...] [--concurrency N] [--slow-connections N] [--replica]
                     run a benchmark suite against release builds; SUITE is one of: api, runtime,
                     score, search, dispute, cutover, abuse, cluster, console.
                     --duration: each load phase (default 20 s; abuse: each attack, default 30 s;
                     cluster: each replica count's P0 filing, the leader kill half-way in R3;
                     console: each page, default 15 s);
                     --users: the seeded graph of score, search and console (default 1,000,000), of
                     cutover's score phase (default 100,000), of abuse (default 10,000);
                     --db-pool-size: the API's request pool in the api suite;
                     --replica: the api suite's reads on a PostgreSQL streaming replica against
                     the primary alone, on a primary and replica of its own, with each phase's
                     split of CPU time (primary, replica, API, wrk, the rest) instead of the
                     rest of the suite;
                     --rate: cutover's steady load, in writes per second (default 500); abuse's
                     legitimate client, in requests per second (default 100);
                     --only: the abuse attacks to run (default all: login, login-many, register,
                     register-taken, current-password, idempotency, search-cursor, slow-clients,
                     disputes, dau); --concurrency: each abuse attacker's connections (default
                     64); --slow-connections: the slow-client attack's connections (default 2,000).
  seed [--users N] [--avg-contacts K] [--verified-fraction F] [--seed S]
       [--database-url URL] [--append | --reset]
                     load N users (default 100,000) and a heavy-tailed contact graph with K
                     contacts per user on average (default 20), a fraction F of them verified
                     (default 0.1), through COPY. Into DATABASE_URL (services discovery) or URL,
                     created if missing. Refuses a database with users unless --append (add
                     more) or --reset (delete every user and all that references them first).
  help               this text.

environment: DATABASE_URL, NATS_URL, NATS_PREFIX, API_ADDR (see each command's output).";

/// Every command, as typed. The parser, `HELP`, the README and the code map of
/// `docs/ARCHITECTURE.md` agree with this list (the tests below and `cargo xtask tidy`).
pub const COMMANDS: [&str; 10] = ["up", "services", "tidy", "lint", "deploy", "test", "chaos", "bench", "seed", "help"];

/// Every suite of `bench`, as typed (`bench::suite` runs each).
pub const BENCH_SUITES: [&str; 9] =
    ["api", "runtime", "score", "search", "dispute", "cutover", "abuse", "cluster", "console"];

pub enum Command {
    Help,
    Up(Up),
    Services(Services),
    Lint(Lint),
    Tidy,
    Deploy,
    Test(Test),
    Chaos(Chaos),
    Bench(Bench),
    Seed(Seed),
}

pub struct Bench {
    pub suite: String,
    /// Seconds each load phase runs.
    pub duration: u64,
    /// Users in the seeded graph (`score`, `search`, `console`).
    pub users: Option<u64>,
    /// The API's request pool (`api`, `search`); the API's own default when absent.
    pub db_pool_size: Option<u32>,
    /// P3 disputes queued before the measurement (`dispute`).
    pub backlog: Option<u64>,
    /// Writes per second of the steady load (`cutover`); requests per second of the
    /// legitimate client (`abuse`).
    pub rate: Option<u64>,
    /// The attacks to run (`abuse`); all when empty.
    pub only: Vec<String>,
    /// Connections of each attacker (`abuse`).
    pub concurrency: Option<u32>,
    /// Connections of the slow-client attack (`abuse`).
    pub slow_connections: Option<u32>,
    /// Reads on a streaming replica against the primary alone (`api`).
    pub replica: bool,
}

pub struct Seed {
    pub users: u64,
    pub avg_contacts: f64,
    pub verified_fraction: f64,
    /// The PRNG seed: the same seed, sizes and mode give the same rows.
    pub seed: u64,
    pub database_url: Option<String>,
    pub append: bool,
    pub reset: bool,
}

pub struct Up {
    pub stage: Stage,
    /// NATS as a three-node JetStream cluster (testkit's `trellis-nats-cluster`).
    pub nats_cluster: bool,
}

/// Which stage of the migration guide `up` runs: A is the monolith alone, B adds the workers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    A,
    B,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::A => "a",
            Stage::B => "b",
        }
    }
}

pub struct Services {
    pub stop: bool,
}

pub struct Lint {
    /// The migrations directory; `migrations/` when not given.
    pub dir: Option<std::path::PathBuf>,
}

pub struct Test {
    /// Passed verbatim to `cargo nextest run` / `cargo test` (what follows `--`).
    pub runner_args: Vec<String>,
    /// The NATS-facing suites on every version of `nats_versions::MATRIX` instead of the
    /// whole pipeline.
    pub nats_matrix: bool,
    /// The nats-server version of the whole suite; `nats_versions::DEFAULT` when absent.
    pub nats: Option<String>,
}

pub struct Chaos {
    /// The suite's form: each phase of load as long as in `cargo xtask test`.
    pub short: bool,
    /// Passed verbatim to `cargo nextest run` (what follows `--`).
    pub runner_args: Vec<String>,
}

pub fn parse(args: impl Iterator<Item = String>) -> anyhow::Result<Command> {
    let mut args = args.peekable();
    let Some(command) = args.next() else {
        return Ok(Command::Help);
    };
    let command = match command.as_str() {
        "help" | "--help" | "-h" => Command::Help,
        "up" => {
            let mut stage = Stage::B;
            let mut nats_cluster = false;
            while let Some(arg) = args.next() {
                if arg == "--nats-cluster" {
                    nats_cluster = true;
                    continue;
                }
                let value = match arg.strip_prefix("--stage=") {
                    Some(value) => value.to_owned(),
                    None if arg == "--stage" => args.next().context("--stage needs a value")?,
                    None => bail!("unknown option for `up`: {arg}"),
                };
                stage = match value.to_ascii_lowercase().as_str() {
                    "a" => Stage::A,
                    "b" => Stage::B,
                    other => bail!("--stage must be `a` or `b`, not `{other}`"),
                };
            }
            Command::Up(Up { stage, nats_cluster })
        }
        "services" => {
            let mut stop = false;
            for arg in args.by_ref() {
                match arg.as_str() {
                    "--stop" => stop = true,
                    _ => bail!("unknown option for `services`: {arg}"),
                }
            }
            Command::Services(Services { stop })
        }
        "lint" => Command::Lint(Lint { dir: args.next().map(Into::into) }),
        "deploy" => Command::Deploy,
        "tidy" => Command::Tidy,
        "test" => {
            let mut test = Test { runner_args: Vec::new(), nats_matrix: false, nats: None };
            while let Some(arg) = args.next() {
                match arg.as_str() {
                    "--" => {
                        test.runner_args.extend(args.by_ref());
                        break;
                    }
                    "--nats-matrix" => test.nats_matrix = true,
                    "--nats" => test.nats = Some(args.next().context("--nats needs a version, e.g. 2.12.8")?),
                    _ if arg.starts_with("--nats=") => test.nats = Some(arg["--nats=".len()..].to_owned()),
                    _ => bail!("unknown option for `test`: {arg} (runner arguments go after `--`)"),
                }
            }
            if test.nats_matrix && test.nats.is_some() {
                bail!("`test --nats-matrix` runs every version: it takes no --nats");
            }
            Command::Test(test)
        }
        "chaos" => {
            let mut chaos = Chaos { short: false, runner_args: Vec::new() };
            while let Some(arg) = args.next() {
                match arg.as_str() {
                    "--" => chaos.runner_args.extend(args.by_ref()),
                    "--short" => chaos.short = true,
                    _ => bail!("unknown option for `chaos`: {arg} (runner arguments go after `--`)"),
                }
            }
            Command::Chaos(chaos)
        }
        "bench" => {
            let suite =
                args.next().with_context(|| format!("bench needs a suite name ({})", BENCH_SUITES.join(", ")))?;
            let mut duration = match suite.as_str() {
                "abuse" => 30,
                "console" => 15,
                _ => 20,
            };
            let mut users = None;
            let mut db_pool_size = None;
            let mut backlog = None;
            let mut rate = None;
            let mut only = Vec::new();
            let mut concurrency = None;
            let mut slow_connections = None;
            let mut replica = false;
            while let Some(arg) = args.next() {
                match arg.as_str() {
                    "--duration" => {
                        duration = args.next().context("--duration needs seconds")?.parse().context("--duration")?
                    }
                    "--users" => {
                        users = Some(args.next().context("--users needs a number")?.parse().context("--users")?)
                    }
                    "--db-pool-size" => {
                        let n = args.next().context("--db-pool-size needs a number")?;
                        db_pool_size = Some(n.parse().context("--db-pool-size")?)
                    }
                    "--backlog" => {
                        backlog = Some(args.next().context("--backlog needs a number")?.parse().context("--backlog")?)
                    }
                    "--rate" => rate = Some(args.next().context("--rate needs a number")?.parse().context("--rate")?),
                    "--only" => {
                        let names = args.next().context("--only needs a comma-separated list of names")?;
                        only.extend(names.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_owned));
                    }
                    "--concurrency" => {
                        let n = args.next().context("--concurrency needs a number")?;
                        concurrency = Some(n.parse().context("--concurrency")?)
                    }
                    "--slow-connections" => {
                        let n = args.next().context("--slow-connections needs a number")?;
                        slow_connections = Some(n.parse().context("--slow-connections")?)
                    }
                    "--replica" => replica = true,
                    other => bail!("unknown option for `bench`: {other}"),
                }
            }
            if replica && suite != "api" {
                bail!("--replica is an option of `bench api`, not of `bench {suite}`");
            }
            Command::Bench(Bench {
                suite,
                duration,
                users,
                db_pool_size,
                backlog,
                rate,
                only,
                concurrency,
                slow_connections,
                replica,
            })
        }
        "seed" => {
            let mut seed = Seed {
                users: 100_000,
                avg_contacts: 20.0,
                verified_fraction: 0.1,
                seed: 42,
                database_url: None,
                append: false,
                reset: false,
            };
            while let Some(arg) = args.next() {
                let (name, inline) = match arg.split_once('=') {
                    Some((name, value)) => (name.to_owned(), Some(value.to_owned())),
                    None => (arg.clone(), None),
                };
                let mut value = || -> anyhow::Result<String> {
                    match inline.clone() {
                        Some(value) => Ok(value),
                        None => args.next().with_context(|| format!("{name} needs a value")),
                    }
                };
                match name.as_str() {
                    "--users" => seed.users = value()?.replace('_', "").parse().context("--users")?,
                    "--avg-contacts" => seed.avg_contacts = value()?.parse().context("--avg-contacts")?,
                    "--verified-fraction" => {
                        seed.verified_fraction = value()?.parse().context("--verified-fraction")?
                    }
                    "--seed" => seed.seed = value()?.parse().context("--seed")?,
                    "--database-url" => seed.database_url = Some(value()?),
                    "--append" => seed.append = true,
                    "--reset" => seed.reset = true,
                    _ => bail!("unknown option for `seed`: {arg}"),
                }
            }
            Command::Seed(seed)
        }
        other => bail!("unknown command `{other}`"),
    };
    if let Some(extra) = args.next() {
        bail!("unexpected argument `{extra}`");
    }
    Ok(command)
}

#[cfg(test)]
mod command_list_tests {
    use super::*;

    #[test]
    fn the_parser_knows_every_listed_command_and_no_other() {
        for command in COMMANDS {
            if let Err(e) = parse(std::iter::once(command.to_owned())) {
                assert!(!e.to_string().contains("unknown command"), "{command}: {e}");
            }
        }
        let e = parse(std::iter::once("frobnicate".to_owned())).err().expect("an unknown command fails");
        assert!(e.to_string().contains("unknown command"));
    }

    #[test]
    fn help_lists_exactly_the_commands() {
        let mut listed: Vec<&str> = HELP
            .lines()
            .skip_while(|l| *l != "commands:")
            .skip(1)
            .take_while(|l| !l.is_empty())
            .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        // A command may have a line per form (`test …`, `test --nats-matrix …`).
        listed.dedup();
        assert_eq!(listed, COMMANDS);
        for suite in BENCH_SUITES {
            assert!(HELP.contains(&format!(" {suite},")) || HELP.contains(&format!(" {suite}.")), "{suite}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Command, parse};

    fn test_flags(args: &[&str]) -> anyhow::Result<super::Test> {
        match parse(args.iter().map(|a| (*a).to_owned()))? {
            Command::Test(test) => Ok(test),
            _ => panic!("not the test command"),
        }
    }

    #[test]
    fn test_takes_the_matrix_a_version_and_runner_arguments() {
        let plain = test_flags(&["test"]).unwrap();
        assert!(!plain.nats_matrix && plain.nats.is_none() && plain.runner_args.is_empty());
        let matrix = test_flags(&["test", "--nats-matrix", "--", "-E", "test(x)"]).unwrap();
        assert!(matrix.nats_matrix);
        assert_eq!(matrix.runner_args, ["-E", "test(x)"]);
        assert_eq!(test_flags(&["test", "--nats", "2.12.8"]).unwrap().nats.as_deref(), Some("2.12.8"));
        assert_eq!(test_flags(&["test", "--nats=2.9.10"]).unwrap().nats.as_deref(), Some("2.9.10"));
    }

    #[test]
    fn up_takes_a_stage_and_the_nats_cluster() {
        let Command::Up(up) = parse(["up", "--nats-cluster", "--stage", "a"].map(str::to_owned).into_iter()).unwrap()
        else {
            panic!("not the up command")
        };
        assert!(up.nats_cluster && up.stage == super::Stage::A);
        let Command::Up(up) = parse(["up"].map(str::to_owned).into_iter()).unwrap() else { panic!("not up") };
        assert!(!up.nats_cluster && up.stage == super::Stage::B);
    }

    #[test]
    fn chaos_takes_the_short_form_and_runner_arguments() {
        let chaos = |args: &[&str]| match parse(args.iter().map(|a| (*a).to_owned())) {
            Ok(Command::Chaos(chaos)) => Ok(chaos),
            Ok(_) => panic!("not the chaos command"),
            Err(e) => Err(e.to_string()),
        };
        let long = chaos(&["chaos"]).unwrap();
        assert!(!long.short && long.runner_args.is_empty());
        let short = chaos(&["chaos", "--short", "--", "-E", "test(/^single::/)"]).unwrap();
        assert!(short.short);
        assert_eq!(short.runner_args, ["-E", "test(/^single::/)"]);
        assert!(chaos(&["chaos", "--long"]).err().unwrap().contains("unknown option for `chaos`: --long"));
    }

    #[test]
    fn bench_api_takes_the_replica_comparison_and_no_other_suite_does() {
        let bench = |args: &[&str]| match parse(args.iter().map(|a| (*a).to_owned())) {
            Ok(Command::Bench(bench)) => Ok(bench),
            Ok(_) => panic!("not the bench command"),
            Err(e) => Err(e.to_string()),
        };
        assert!(bench(&["bench", "api", "--replica", "--duration", "10"]).unwrap().replica);
        assert!(!bench(&["bench", "api"]).unwrap().replica);
        let err = bench(&["bench", "search", "--replica"]).err().unwrap();
        assert!(err.contains("--replica is an option of `bench api`"), "{err}");
    }

    #[test]
    fn bench_console_runs_each_page_fifteen_seconds_unless_told() {
        let bench = |args: &[&str]| match parse(args.iter().map(|a| (*a).to_owned())) {
            Ok(Command::Bench(bench)) => bench,
            _ => panic!("not the bench command"),
        };
        assert_eq!(bench(&["bench", "console"]).duration, 15);
        assert_eq!(bench(&["bench", "console", "--duration", "5"]).duration, 5);
        assert_eq!(bench(&["bench", "api"]).duration, 20);
    }

    #[test]
    fn test_refuses_what_it_does_not_know() {
        let err = |args: &[&str]| test_flags(args).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(&["test", "--bogus"]).contains("unknown option for `test`: --bogus"));
        assert!(err(&["test", "--nats"]).contains("--nats needs a version"));
        assert!(err(&["test", "--nats-matrix", "--nats", "2.12.8"]).contains("takes no --nats"));
    }
}
