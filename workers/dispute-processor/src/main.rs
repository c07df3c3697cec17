#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    trellis_runtime::worker::main(
        "dispute-processor",
        dispute_processor::ABOUT,
        trellis_runtime::worker::serving(dispute_processor::DisputeProcessor::new),
    )
    .await
}
