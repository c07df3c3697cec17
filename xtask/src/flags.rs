//! Command-line parsing, by hand: the grammar is small enough not to need a parser crate.

use anyhow::{Context, bail};

pub const HELP: &str = "\
usage: cargo xtask <command> [options]

commands:
  up [--stage a|b]   build and run the whole system (PostgreSQL, NATS, trellis-api and the
                     workers), seed demo data on first run; Ctrl-C stops everything.
                     --stage a runs trellis-api alone (every processor in-process).
  services [--stop]  make sure PostgreSQL and NATS are reachable (starting private ones under
                     target/dev-stack/ if needed) and print `export` lines for them;
                     --stop stops the private ones.
  lint [DIR]         lint the migrations (in migrations/, or DIR) with squawk.
  test [-- ARGS]     fmt check, clippy, lint, then the test suite (ARGS go to the test runner).
  bench SUITE [--duration SECS]
                     run a benchmark suite against release builds; SUITE is one of: api, runtime.
  help               this text.

environment: DATABASE_URL, NATS_URL, NATS_PREFIX, API_ADDR (see each command's output).";

pub enum Command {
    Help,
    Up(Up),
    Services(Services),
    Lint(Lint),
    Test(Test),
    Bench(Bench),
}

pub struct Bench {
    pub suite: String,
    /// Seconds each load phase runs.
    pub duration: u64,
}

pub struct Up {
    pub stage: Stage,
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
            while let Some(arg) = args.next() {
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
            Command::Up(Up { stage })
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
        "test" => {
            let mut runner_args = Vec::new();
            if let Some(arg) = args.next() {
                if arg != "--" {
                    bail!("unknown option for `test`: {arg} (runner arguments go after `--`)");
                }
                runner_args.extend(args.by_ref());
            }
            Command::Test(Test { runner_args })
        }
        "bench" => {
            let suite = args.next().context("bench needs a suite name (api, runtime)")?;
            let mut duration = 20;
            while let Some(arg) = args.next() {
                match arg.as_str() {
                    "--duration" => {
                        duration = args.next().context("--duration needs seconds")?.parse().context("--duration")?
                    }
                    other => bail!("unknown option for `bench`: {other}"),
                }
            }
            Command::Bench(Bench { suite, duration })
        }
        other => bail!("unknown command `{other}`"),
    };
    if let Some(extra) = args.next() {
        bail!("unexpected argument `{extra}`");
    }
    Ok(command)
}
