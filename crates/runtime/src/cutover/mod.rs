//! Everything of the Stage B cutover, so that it can be removed in one piece once every
//! processor runs in its worker: the flags as a process sees them (`flags`), the gate that
//! makes a consumer group stand by while this process is not the executor (`gate`), the shadow
//! candidate's consumer group (here) and the one comparer loop (`comparer`).
//!
//! **Shadow candidate.** While a processor's flag says `shadow` and this side is not the
//! primary, a consumer group of its own (`<consumer>-shadow`) pulls a copy of the processor's
//! input from the moment the period began, and the processor's candidate handler writes to
//! shadow tables only. When the period ends, the candidate's consumers are deleted, so that the
//! next period starts afresh. Beside it, the comparer ([`comparer::run`]) makes the
//! processor's comparison rounds ([`ShadowCandidate`]).

pub mod comparer;
pub mod flags;
mod gate;

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use comparer::{Round, ShadowCandidate};

use crate::consumer::{ConsumerGroup, ConsumerSpec, Handler, RunnerConfig, RunnerContext};

/// Runs `candidate` while `gate` is open (this side is the candidate of a shadow period of its
/// flag): its group ([`run_candidate`]) and, beside it, the comparer ([`comparer::run`]), each
/// started when a period begins and stopped when it ends. Returns at `stop`.
pub async fn run_shadow<C: ShadowCandidate>(
    candidate: Arc<C>,
    gate: watch::Receiver<bool>,
    pool: PgPool,
    ctx: RunnerContext,
    runner: RunnerConfig,
    stop: CancellationToken,
) {
    let group = {
        let candidate = candidate.clone();
        move || candidate.group(ctx.clone(), runner.clone())
    };
    let compare =
        flags::while_open(gate.clone(), stop.clone(), move |stop| comparer::run(candidate.clone(), pool.clone(), stop));
    tokio::join!(run_candidate(group, gate, stop.clone()), compare);
}

/// The candidate's consumer: the processor's, named `<name>-shadow`.
pub fn candidate_spec(spec: ConsumerSpec) -> ConsumerSpec {
    ConsumerSpec { name: format!("{}-shadow", spec.name), ..spec }
}

/// Runs the group `make` builds while `gate` is open (a shadow period with this side as the
/// candidate), from new messages only; deletes its consumers when the period ends (not when the
/// process stops: a restarted candidate resumes where it was). Returns at `stop`.
pub async fn run_candidate<H, F>(make: F, gate: watch::Receiver<bool>, stop: CancellationToken)
where
    H: Handler,
    F: Fn() -> ConsumerGroup<H>,
{
    flags::while_open(gate, stop.clone(), |token| {
        let group = make().new_messages_only();
        let remover = make();
        let stop = stop.clone();
        async move {
            let name = group.name().to_owned();
            tracing::info!(consumer = %name, "shadow period: running the candidate");
            if let Err(e) = group.run(token).await {
                tracing::error!(consumer = %name, error = %e, "the shadow candidate cannot run");
            }
            if !stop.is_cancelled() {
                match remover.delete_consumers().await {
                    Ok(()) => tracing::info!(consumer = %name, "shadow period ended: candidate consumers deleted"),
                    Err(e) => tracing::warn!(consumer = %name, error = %e, "deleting the candidate's consumers failed"),
                }
            }
        }
    })
    .await
}
