//! Running a processor's shadow candidate: while its cutover flag says `shadow` and this side
//! is not the primary, a consumer group of its own (`<consumer>-shadow`) pulls a copy of the
//! processor's input from the moment the period began, and the processor's candidate handler
//! writes to shadow tables only. When the period ends, the candidate's consumers are deleted,
//! so that the next period starts afresh. Comparisons are recorded with [`record`], which
//! exports `trellis_shadow_comparisons_total{processor,result}`.

use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use trellis_domain::flags::Flag;
use trellis_domain::shadow::{Comparison, ComparisonResult, processor};

use crate::consumer::{ConsumerGroup, ConsumerSpec, Handler};

/// Exports every series of `trellis_shadow_comparisons_total` at zero.
pub fn init_metrics() {
    for flag in Flag::ALL {
        for result in ComparisonResult::ALL {
            metrics::counter!("trellis_shadow_comparisons_total", "processor" => processor(flag), "result" => result.as_str())
                .increment(0);
        }
    }
}

/// Records comparisons of `flag`'s processor and counts them in the metric.
pub async fn record(pool: &PgPool, flag: Flag, comparisons: &[Comparison]) -> Result<(), sqlx::Error> {
    trellis_store::shadow::record(pool, flag, comparisons).await?;
    count(flag, comparisons);
    Ok(())
}

/// Counts comparisons in the metric: for a caller that recorded them itself, in a transaction
/// with what it compared (`trellis_store::shadow::record`), once that transaction committed.
pub fn count(flag: Flag, comparisons: &[Comparison]) {
    for c in comparisons {
        metrics::counter!("trellis_shadow_comparisons_total", "processor" => processor(flag), "result" => c.result.as_str())
            .increment(c.count.max(0) as u64);
    }
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
    crate::flags::while_open(gate, stop.clone(), |token| {
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
