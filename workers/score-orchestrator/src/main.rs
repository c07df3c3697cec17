use std::sync::Arc;

use clap::Parser;
use score_orchestrator::shadow::Candidate;
use score_orchestrator::{Config, Orchestrator, Rules, ScoreArgs, consumer_spec};
use trellis_domain::flags::{Executor, Flag};
use trellis_runtime::config::LogFormat;
use trellis_runtime::consumer::{ConsumerGroup, EachMessage};
use trellis_runtime::flags;
use trellis_runtime::worker::{self, WorkerArgs};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "score-orchestrator", version, about = "Batch trust-score runs over the contact graph")]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,

    #[command(flatten)]
    score: ScoreArgs,

    /// Make one run now, print its summary as JSON and exit (for benchmarks and on-call).
    #[arg(long)]
    run_once: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let config = args.score.config(&args.worker.common.database_url, worker::hostname());
    if args.run_once {
        return run_once(&args.worker, config).await;
    }
    worker::main("score-orchestrator", args.worker, move |w| {
        Box::pin(async move {
            let gate = w.flags.gate(Flag::ScoreExecutor, Executor::Worker);
            let orchestrator = Orchestrator::new(w.pool.clone(), config)?.executing_while(gate.clone());
            score_orchestrator::initialise_metrics(&w.pool).await;
            // One run request at a time per replica; the lease serialises replicas.
            let handler = Arc::new(EachMessage { handler: orchestrator.clone(), concurrency: 1 });
            w.spawn_group(
                ConsumerGroup::new(w.ctx.clone(), consumer_spec(), w.args.runner_config(), handler).gated(gate.clone()),
            );
            // While score.executor says shadow with the monolith as primary, this worker is the
            // candidate: its own copy of the requests, the production rules, shadow tables only.
            let candidate = Candidate::new(&orchestrator, Rules::PRODUCTION);
            let (ctx, runner) = (w.ctx.clone(), w.args.runner_config());
            let make = {
                let candidate = candidate.clone();
                move || candidate.group(ctx.clone(), runner.clone())
            };
            w.spawn_candidate(Flag::ScoreExecutor, make, move |stop| candidate.clone().compare(stop));
            tokio::spawn(flags::while_open(gate, w.stop_token(), move |stop| orchestrator.clone().schedule(stop)));
            Ok(())
        })
    })
    .await
}

async fn run_once(args: &WorkerArgs, config: Config) -> std::process::ExitCode {
    init_logging_to_stderr(args.common.log_format);
    let result = async {
        let mut pool_config = trellis_store::PoolConfig::new("score-orchestrator");
        pool_config.statement_timeout = args.common.batch_timeout;
        let pool = trellis_store::connect_lazy(config.database_url.expose(), &pool_config)?;
        let orchestrator = Orchestrator::new(pool, config)?;
        let runs = orchestrator.request("cli", None).await?;
        anyhow::ensure!(!runs.is_empty(), "another replica holds the run lease; the request is pending for it");
        println!("{}", serde_json::to_string_pretty(&runs)?);
        Ok::<_, anyhow::Error>(())
    }
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("score-orchestrator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `--run-once` prints its result on stdout, so its log goes to stderr (the runtime's logger
/// writes to stdout, as a long-running process's should).
fn init_logging_to_stderr(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(true).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}
