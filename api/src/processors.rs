//! The processors `trellis-api` runs in-process while a cutover flag says `monolith` (Stage A,
//! and the rollback of Stage B): the search projector, the dispute processor and the score
//! orchestrator, the same values the worker binaries install, on the same durable consumers,
//! each gated by its flag; and each one's shadow candidate while its flag says `shadow` with
//! the worker as the primary. The API's [`Host`] executes for the `monolith` side.

use trellis_runtime::host::{Host, Processor};

use crate::config::Config;

/// The three processors, with the API's settings for them.
pub fn processors(config: &Config) -> [Box<dyn Processor>; 3] {
    [
        Box::new(search_projector::SearchProjector::new(config.search.clone())),
        Box::new(dispute_processor::DisputeProcessor::new(config.dispute.clone())),
        Box::new(score_orchestrator::ScoreOrchestrator::new(config.score.clone())),
    ]
}

/// Installs every processor on `host`.
pub async fn install(host: &Host, config: &Config) -> anyhow::Result<()> {
    for processor in processors(config) {
        host.install(processor.as_ref()).await?;
    }
    Ok(())
}
