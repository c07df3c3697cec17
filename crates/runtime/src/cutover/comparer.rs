//! The one comparer loop of every shadow candidate: while a shadow period lasts (the loop runs
//! under the candidate's gate), it makes the processor's comparison rounds, one every
//! [`ShadowCandidate::compare_every`] (and at once again while a round says there is more),
//! and counts what each round recorded in `trellis_shadow_comparisons_total{processor,result}`.
//! A processor supplies its candidate (the consumer group) and its comparison (a round); what
//! it compares, and how it knows both sides had the same input, is its own.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use trellis_domain::flags::Flag;
use trellis_domain::shadow::Comparison;

use crate::consumer::{ConsumerGroup, Handler, RunnerConfig, RunnerContext};
use crate::host::Batching;
use crate::instrument::ComparisonsRecorded;

/// A processor's shadow candidate and its comparison.
pub trait ShadowCandidate: Send + Sync + 'static {
    /// The flag whose shadow periods these are.
    const FLAG: Flag;

    /// The candidate's handler (it writes to shadow tables only).
    type Handler: Handler;

    /// What the comparer keeps from one round to the next within a period.
    type Ledger: Send;

    /// How the candidate's group batches unless the process's flags say otherwise.
    fn batching(&self) -> Batching {
        Batching::default()
    }

    /// The candidate's consumer group (named with [`super::candidate_spec`]).
    fn group(&self, ctx: RunnerContext, runner: RunnerConfig) -> ConsumerGroup<Self::Handler>;

    /// How often the comparer makes a round.
    fn compare_every(&self) -> Duration;

    /// The comparer's state for the period that started at `since` (what must be done once per
    /// period, e.g. deleting an earlier period's candidate output, is done here).
    fn begin(&self, since: OffsetDateTime) -> impl Future<Output = anyhow::Result<Self::Ledger>> + Send;

    /// One round over what the candidate produced since `since`: compares what is ready,
    /// records the comparisons (`trellis_store::cutover::record`, in the transaction that settles
    /// what they compared, so each is recorded once) and returns them.
    fn round(
        &self,
        ledger: &mut Self::Ledger,
        since: OffsetDateTime,
    ) -> impl Future<Output = anyhow::Result<Round>> + Send;
}

/// What one comparison round recorded.
#[derive(Debug, Default)]
pub struct Round {
    pub comparisons: Vec<Comparison>,
    /// The round stopped at its size limit: the next one starts at once.
    pub more: bool,
}

/// Compares until `stop` (the end of the period, or of the process): reads when the period
/// began, starts the candidate's ledger, then makes rounds.
pub async fn run<C: ShadowCandidate>(candidate: Arc<C>, pool: PgPool, stop: CancellationToken) {
    let every = candidate.compare_every();
    let pause = || async {
        tokio::select! {
            _ = tokio::time::sleep(every) => true,
            _ = stop.cancelled() => false,
        }
    };
    let since = loop {
        match trellis_store::cutover::latest_period(&pool, C::FLAG).await {
            Ok(Some(period)) => break period.started_at,
            Ok(None) => {
                tracing::warn!(flag = C::FLAG.as_str(), "no shadow period in the flag's audit: comparing from now on");
                break OffsetDateTime::now_utc();
            }
            Err(e) => tracing::warn!(flag = C::FLAG.as_str(), error = %e, "reading the shadow period failed; retrying"),
        }
        if !pause().await {
            return;
        }
    };
    let mut ledger = loop {
        match candidate.begin(since).await {
            Ok(ledger) => break ledger,
            Err(e) => tracing::warn!(
                flag = C::FLAG.as_str(),
                error = format!("{e:#}"),
                "starting the comparer failed; retrying"
            ),
        }
        if !pause().await {
            return;
        }
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        loop {
            match candidate.round(&mut ledger, since).await {
                Ok(round) => {
                    ComparisonsRecorded { flag: C::FLAG, comparisons: &round.comparisons }.emit();
                    if !round.comparisons.is_empty() {
                        tracing::debug!(
                            flag = C::FLAG.as_str(),
                            comparisons = round.comparisons.len(),
                            "shadow: compared"
                        );
                    }
                    if !round.more || stop.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        flag = C::FLAG.as_str(),
                        error = format!("{e:#}"),
                        "a comparison round failed; the next one retries"
                    );
                    break;
                }
            }
        }
    }
}
