use clap::Parser;
use trellis_api::Config;

// The request path allocates many small objects (rows, JSON); glibc malloc showed up at ~6% of
// the API's CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    trellis_runtime::trace::set_consumer_parent(config.common.trace_consumer_parent);
    trellis_runtime::telemetry::init_logging(config.common.log_format);
    let shutdown = trellis_runtime::shutdown::on_signal();
    let result = async {
        let running = trellis_api::start(config, shutdown).await?;
        tracing::info!(api = %running.api_addr, admin = %running.admin_addr, "trellis-api listening");
        running.wait().await
    };
    trellis_runtime::host::exit_code("trellis-api", result.await)
}
