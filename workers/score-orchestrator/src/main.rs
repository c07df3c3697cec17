#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    trellis_runtime::worker::main(score_orchestrator::CONSUMER, score_orchestrator::ABOUT, score_orchestrator::worker)
        .await
}
