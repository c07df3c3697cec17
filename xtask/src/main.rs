//! Project automation, run as `cargo xtask <command>` (alias in `.cargo/config.toml`).
//!
//! One binary, one module per command. Adding a command is a variant in `flags.rs`, a match
//! arm below and a module. The commands only use what a fresh machine has (cargo, and the
//! PostgreSQL / NATS / squawk binaries, which they install when they can).

mod bench;
mod bench_abuse;
mod bench_cluster;
mod bench_console;
mod bench_cutover;
mod bench_dispute;
mod bench_replica;
mod chaos;
mod cluster;
mod deploy;
mod flags;
mod lint;
mod loadgen;
mod nats_versions;
mod secrets;
mod seed;
mod services;
mod test;
mod tidy;
mod up;
mod util;

use std::process::ExitCode;

fn main() -> ExitCode {
    let command = match flags::parse(std::env::args().skip(1)) {
        Ok(command) => command,
        Err(err) => {
            eprintln!("error: {err}\n\n{}", flags::HELP);
            return ExitCode::from(2);
        }
    };
    if let Err(err) = std::env::set_current_dir(util::project_root()) {
        eprintln!("error: cannot enter the project root: {err}");
        return ExitCode::FAILURE;
    }
    let result = match command {
        flags::Command::Help => {
            println!("{}", flags::HELP);
            Ok(())
        }
        flags::Command::Up(up) => up::run(&up),
        flags::Command::Services(services) => services::run(&services),
        flags::Command::Lint(lint) => lint::run(&lint),
        flags::Command::Tidy => tidy::run(),
        flags::Command::Deploy => deploy::run(),
        flags::Command::Test(test) => test::run(&test),
        flags::Command::Chaos(chaos) => chaos::run(&chaos),
        flags::Command::Bench(bench) => bench::run(&bench),
        flags::Command::Seed(seed) => seed::run(&seed),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
