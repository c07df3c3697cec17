//! A worker binary: its flags ([`WorkerArgs`] and its processor's), logging, signals, a
//! [`Host`] executing for the `worker` side with the processor installed, and the exit code.
//! A worker's `main` is one call of [`main`].

use std::time::Duration;

use clap::{CommandFactory, FromArgMatches};
use futures::future::BoxFuture;
use trellis_domain::flags::Executor;

use crate::config::CommonArgs;
use crate::consumer::RunnerConfig;
use crate::health::Severity;
use crate::host::{Host, HostConfig, Processor};

/// Flags every worker takes, on top of [`CommonArgs`].
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Messages per pull request (and per handler batch). Default: the processor's (256, the
    /// search projector 1000).
    #[arg(long, env = "BATCH_SIZE")]
    pub batch_size: Option<usize>,

    /// How long a batch waits for more messages after its first one (across pull requests)
    /// before it is handled; it is handled at once when full. Zero: what has arrived. Default:
    /// the processor's (0s, the search projector 50ms).
    #[arg(long, env = "BATCH_WINDOW", value_parser = humantime::parse_duration)]
    pub batch_window: Option<Duration>,

    /// Messages a per-message handler works on at once.
    #[arg(long, env = "CONCURRENCY", default_value_t = 16)]
    pub concurrency: usize,

    /// Deliveries before a failing message is dead-lettered.
    #[arg(long, env = "MAX_DELIVER", default_value_t = 5)]
    pub max_deliver: i64,

    /// How long JetStream waits for an ack before redelivering.
    #[arg(long, env = "ACK_WAIT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub ack_wait: Duration,

    /// Unacknowledged messages the whole group may hold.
    #[arg(long, env = "MAX_ACK_PENDING", default_value_t = 4096)]
    pub max_ack_pending: i64,

    /// Smallest retry delay (doubling, with jitter, up to --retry-max).
    #[arg(long, env = "RETRY_MIN", value_parser = humantime::parse_duration, default_value = "200ms")]
    pub retry_min: Duration,

    /// Largest retry delay.
    #[arg(long, env = "RETRY_MAX", value_parser = humantime::parse_duration, default_value = "30s")]
    pub retry_max: Duration,

    /// How often the cutover flags are read when no change notification arrives.
    #[arg(long, env = "FLAG_POLL", value_parser = humantime::parse_duration, default_value = "1s")]
    pub flag_poll: Duration,

    /// Connections in the worker's database pool.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: u32,
}

impl WorkerArgs {
    /// The host of a worker process named `name`.
    pub fn host_config(&self, name: &'static str) -> HostConfig {
        HostConfig {
            name,
            pool_name: name,
            common: self.common.clone(),
            executor: Executor::Worker,
            pool_size: self.db_pool_size,
            flag_poll: self.flag_poll,
            nats: Severity::Critical,
            runner: self.runner_config(),
            batch_size: self.batch_size,
            batch_window: self.batch_window,
        }
    }

    /// How groups pull and retry (batching aside: see [`Host::runner`]).
    fn runner_config(&self) -> RunnerConfig {
        RunnerConfig {
            max_deliver: self.max_deliver,
            ack_wait: self.ack_wait,
            max_ack_pending: self.max_ack_pending,
            retry_min: self.retry_min,
            retry_max: self.retry_max,
            ..RunnerConfig::default()
        }
    }
}

/// A worker binary's command line: the worker's flags and its processor's.
#[derive(Debug, clap::Parser)]
struct Cli<A: clap::Args> {
    #[command(flatten)]
    worker: WorkerArgs,

    #[command(flatten)]
    processor: A,
}

/// What a worker binary does instead of serving, when its flags ask for a one-off command (e.g.
/// one score run, printed, then exit).
pub type OneOff = BoxFuture<'static, anyhow::Result<()>>;

/// The `make` of [`main`] for a processor built from its flags alone, with no one-off command.
pub fn serving<A, P>(new: fn(A) -> P) -> impl FnOnce(A, &WorkerArgs) -> anyhow::Result<(P, Option<OneOff>)> {
    move |args, _| Ok((new(args), None))
}

/// The `main` of a worker binary: parses its flags (the processor's are `A`), builds the
/// processor with `make`, then either runs the one-off command it returns or serves: logging,
/// signals, a [`Host`] for the `worker` side, the processor installed on it, until SIGTERM.
pub async fn main<A, P>(
    name: &'static str,
    about: &'static str,
    make: impl FnOnce(A, &WorkerArgs) -> anyhow::Result<(P, Option<OneOff>)>,
) -> std::process::ExitCode
where
    A: clap::Args,
    P: Processor,
{
    // Every crate of the workspace has the workspace's version.
    let command = Cli::<A>::command().name(name).about(about).version(env!("CARGO_PKG_VERSION"));
    let cli = Cli::<A>::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    let result = match make(cli.processor, &cli.worker) {
        Ok((_, Some(one_off))) => one_off.await,
        Ok((processor, None)) => serve(name, cli.worker, processor).await,
        Err(e) => Err(e),
    };
    crate::host::exit_code(name, result)
}

async fn serve(name: &'static str, args: WorkerArgs, processor: impl Processor) -> anyhow::Result<()> {
    crate::trace::set_consumer_parent(args.common.trace_consumer_parent);
    crate::telemetry::init_logging(args.common.log_format);
    let shutdown = crate::shutdown::on_signal();
    let host = Host::start(args.host_config(name), shutdown).await?;
    tracing::info!(worker = name, admin = %host.admin_addr(), "started");
    // `/readyz` says "installing the processors" until `run`: whoever reads the address may
    // wait for it at once.
    crate::admin::write_addr_file(args.common.addr_file.as_deref(), &[("admin", host.admin_addr())])?;
    if let Err(e) = host.install(&processor).await {
        host.shutdown_token().cancel();
        let _ = host.run().await;
        return Err(e);
    }
    host.run().await
}
