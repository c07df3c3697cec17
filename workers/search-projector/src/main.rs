use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};
use search_projector::shadow::{Comparer, Rules, ShadowArgs, candidate_group};
use search_projector::{DEFAULT_BATCH_SIZE, DEFAULT_BATCH_WINDOW, Projector, consumer_spec, report_checkpoint_age};
use trellis_domain::flags::{Executor, Flag};
use trellis_runtime::consumer::ConsumerGroup;
use trellis_runtime::worker::{self, WorkerArgs};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "search-projector", version, about = "Keeps the search read model fresh from change events")]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,

    /// How often `trellis_search_checkpoint_age_seconds` is refreshed.
    #[arg(long, env = "CHECKPOINT_AGE_EVERY", value_parser = humantime::parse_duration, default_value = "5s")]
    checkpoint_age_every: Duration,

    #[command(flatten)]
    shadow: ShadowArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let matches = Args::command()
        .mut_arg("batch_size", |a| a.default_value(DEFAULT_BATCH_SIZE))
        .mut_arg("batch_window", |a| a.default_value(DEFAULT_BATCH_WINDOW))
        .get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let every = args.checkpoint_age_every;
    let shadow = args.shadow;
    worker::main("search-projector", args.worker, move |w| {
        Box::pin(async move {
            let comparer = Comparer::new(w.pool.clone(), w.ctx.clone(), shadow.config().map_err(anyhow::Error::msg)?);
            let projector = Arc::new(Projector::new(w.pool.clone()));
            let gate = w.flags.gate(Flag::SearchExecutor, Executor::Worker);
            w.spawn_group(
                ConsumerGroup::new(w.ctx.clone(), consumer_spec(), w.args.runner_config(), projector).gated(gate),
            );
            // The candidate, while the monolith is the primary of a shadow period.
            let (ctx, config, pool) = (w.ctx.clone(), w.args.runner_config(), w.pool.clone());
            w.spawn_candidate(
                Flag::SearchExecutor,
                move || candidate_group(ctx.clone(), config.clone(), pool.clone(), Rules::PRODUCTION),
                move |stop| comparer.clone().run(stop),
            );
            tokio::spawn(report_checkpoint_age(w.pool.clone(), every, w.stop_token()));
            Ok(())
        })
    })
    .await
}
