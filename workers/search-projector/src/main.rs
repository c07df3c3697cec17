#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    trellis_runtime::worker::main(
        search_projector::CONSUMER,
        search_projector::ABOUT,
        trellis_runtime::worker::serving(search_projector::SearchProjector::new),
    )
    .await
}
