//! The processors `trellis-api` runs in-process while a cutover flag says `monolith` (Stage A,
//! and the rollback of Stage B): the search projector, the dispute processor and the score
//! orchestrator, the same library values the worker binaries run, pulling from
//! the same durable consumers, each gated by its flag; and each processor's shadow candidate
//! while its flag says `shadow` with the worker as the primary. Nothing here knows a consumer's
//! details beyond its processor's `consumer_spec`.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use trellis_domain::flags::{Executor, Flag};
use trellis_runtime::consumer::{ConsumerGroup, EachMessage, RunnerConfig, RunnerContext};
use trellis_runtime::flags::{self, Flags};

/// The in-process processors' settings.
pub struct Settings {
    pub score: score_orchestrator::Config,
    pub dispute: dispute_processor::ProcessorArgs,
    pub search_shadow: search_projector::shadow::ComparerConfig,
}

/// Starts every in-process processor in `tasks`, each idle until its flag says `monolith`
/// (each candidate: until it says `shadow` with the worker as the primary); they stop with
/// `stop`.
pub fn spawn(
    tasks: &mut JoinSet<()>,
    ctx: RunnerContext,
    pool: PgPool,
    flags: &Flags,
    settings: Settings,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let Settings { score, dispute, search_shadow } = settings;
    let search = flags.gate(Flag::SearchExecutor, Executor::Monolith);
    let projector = Arc::new(search_projector::Projector::new(pool.clone()));
    let orchestrator = score_orchestrator::Orchestrator::new(pool.clone(), score)?
        .executing_while(flags.gate(Flag::ScoreExecutor, Executor::Monolith));
    let config = RunnerConfig {
        batch_size: search_projector::DEFAULT_BATCH_SIZE.parse()?,
        batch_window: humantime::parse_duration(search_projector::DEFAULT_BATCH_WINDOW)?,
        ..RunnerConfig::default()
    };
    let group =
        ConsumerGroup::new(ctx.clone(), search_projector::consumer_spec(), config.clone(), projector).gated(search);
    tasks.spawn(report_failure("search projector", group.run(stop.clone())));
    let comparer = search_projector::shadow::Comparer::new(pool.clone(), ctx.clone(), search_shadow);
    let (candidate_ctx, candidate_pool) = (ctx.clone(), pool.clone());
    spawn_candidate(
        tasks,
        flags,
        Flag::SearchExecutor,
        move || {
            let rule = search_projector::shadow::Rules::PRODUCTION;
            search_projector::shadow::candidate_group(
                candidate_ctx.clone(),
                config.clone(),
                candidate_pool.clone(),
                rule,
            )
        },
        move |stop| comparer.clone().run(stop),
        stop.clone(),
    );
    tasks.spawn(search_projector::report_checkpoint_age(pool.clone(), Duration::from_secs(5), stop.clone()));

    let dispute_gate = flags.gate(Flag::DisputeExecutor, Executor::Monolith);
    let candidate = dispute_processor::Candidate::new(pool.clone(), &dispute, dispute_processor::Rules::PRODUCTION);
    let groups = dispute_processor::Processor::new(pool.clone(), dispute)
        .groups(ctx.clone(), RunnerConfig::default())
        .gated(dispute_gate);
    tasks.spawn(report_failure("dispute processor", groups.run(stop.clone())));
    let (candidate_ctx, comparer) = (ctx.clone(), candidate.clone());
    spawn_candidate(
        tasks,
        flags,
        Flag::DisputeExecutor,
        move || candidate.group(candidate_ctx.clone(), RunnerConfig::default()),
        move |stop| comparer.clone().compare(stop),
        stop.clone(),
    );

    let score_gate = flags.gate(Flag::ScoreExecutor, Executor::Monolith);
    let handler = Arc::new(EachMessage { handler: orchestrator.clone(), concurrency: 1 });
    let group = ConsumerGroup::new(ctx.clone(), score_orchestrator::consumer_spec(), RunnerConfig::default(), handler)
        .gated(score_gate.clone());
    tasks.spawn(report_failure("score orchestrator", group.run(stop.clone())));
    // While score.executor says shadow with the worker as primary, the monolith is the
    // candidate: its own copy of the requests, the production rules, shadow tables only.
    let candidate = score_orchestrator::shadow::Candidate::new(&orchestrator, score_orchestrator::Rules::PRODUCTION);
    let make = {
        let (candidate, ctx) = (candidate.clone(), ctx.clone());
        move || candidate.group(ctx.clone(), RunnerConfig::default())
    };
    let compare = move |stop| candidate.clone().compare(stop);
    spawn_candidate(tasks, flags, Flag::ScoreExecutor, make, compare, stop.clone());
    tasks.spawn(flags::while_open(score_gate, stop, move |stop| orchestrator.clone().schedule(stop)));
    Ok(())
}

/// Runs `flag`'s shadow candidate in-process while the monolith is the candidate (the worker
/// is the primary): the group `make` builds, from new messages only, and `comparer` beside it
/// (see [`trellis_runtime::shadow::run_candidate`]).
fn spawn_candidate<H, F, C, Fut>(
    tasks: &mut JoinSet<()>,
    flags: &Flags,
    flag: Flag,
    make: F,
    comparer: C,
    stop: CancellationToken,
) where
    H: trellis_runtime::consumer::Handler,
    F: Fn() -> ConsumerGroup<H> + Send + Sync + 'static,
    C: Fn(CancellationToken) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let gate = flags.candidate_gate(flag, Executor::Monolith);
    tasks.spawn(trellis_runtime::shadow::run_candidate(make, gate.clone(), stop.clone()));
    tasks.spawn(flags::while_open(gate, stop, comparer));
}

async fn report_failure(
    name: &'static str,
    run: impl std::future::Future<Output = Result<(), trellis_runtime::consumer::ConsumerError>>,
) {
    if let Err(e) = run.await {
        tracing::error!(processor = name, error = %e, "in-process processor cannot run");
    }
}
