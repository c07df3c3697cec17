//! `score-orchestrator --run-once`: one run now, its summary printed as JSON, then exit (for
//! benchmarks and on-call).

use trellis_runtime::config::LogFormat;
use trellis_runtime::worker::WorkerArgs;

use crate::{Config, Orchestrator};

pub(crate) async fn run_once(args: WorkerArgs, config: Config) -> anyhow::Result<()> {
    init_logging_to_stderr(args.common.log_format);
    async {
        let mut pool_config = trellis_store::PoolConfig::new("score-orchestrator");
        pool_config.statement_timeout = args.common.batch_timeout;
        let pool = trellis_store::connect_lazy(config.database_url.expose(), &pool_config)?;
        let orchestrator = Orchestrator::new(pool, config)?;
        let runs = orchestrator.request("cli", None).await?;
        anyhow::ensure!(!runs.is_empty(), "another replica holds the run lease; the request is pending for it");
        println!("{}", serde_json::to_string_pretty(&runs)?);
        Ok::<_, anyhow::Error>(())
    }
    .await
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
