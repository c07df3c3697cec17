//! The dispute processor's part of the cutover: its shadow candidate (`dispute.executor` =
//! `shadow`) judges every dispute filed during the period with its own rule set and compares
//! its decision with the primary's, without any effect (no decision, suspension, token revocation or event: it
//! writes to `shadow.*` only).
//!
//! **Same input.** A dispute's facts change with time and with other decisions, the primary's
//! own among them (an upheld impersonation suspends its target, and a later look at the facts
//! sees `target_suspended`; R4 upholds other disputes with its own). So the candidate does not
//! judge when it receives a filing: it judges each dispute on the facts the primary judged it
//! on, once the primary has decided it. Every automatic decision records the rules' clock and
//! the MVCC snapshot of the statement that read its batch's facts, and every decision and
//! filing records its transaction; the candidate reads the facts again with the same statement
//! as that snapshot saw the tables (`trellis_store::cutover::disputes::gather_facts_as_of`): a
//! decision, filing or suspension is in them exactly when its transaction was visible to the
//! primary — concurrent batches and decisions committed between the primary's read and its
//! own decisions included. It then replays the primary's batch in the order the primary made
//! its decisions, with the processor's own in-batch overlay (`batch`), so that a decision
//! earlier in the batch changes the later ones exactly as it did for the primary, and a
//! dispute upheld with another (R4) gets its decision from that judgement. Trust scores keep no
//! history: when a score the facts read was written after the snapshot, the input cannot be
//! read again, and the comparison is recorded as missing, with that reason.
//!
//! **Shape.** The candidate's consumer (`dispute-processor-shadow`, one filter subject,
//! `events.disputes.filed.>`) records the filings it receives (`shadow.dispute_inputs`); the
//! comparison ([`DisputeCandidate::compare_ready`], a round of the runtime's comparer) takes
//! those the primary has decided (its first decision in `security.dispute_decisions`), judges
//! them, writes the candidate's decisions
//! (`shadow.dispute_decisions`) and the comparisons of `{status, rule, reasons}` in one
//! transaction, each input once. The reasons are compared too: they are a function of the
//! facts (the counts that decided), so on the same input they are the same. A filing the
//! primary has not decided after `--dispute-shadow-missing-after` is recorded as missing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use trellis_domain::flags::Flag;
use trellis_domain::shadow::Comparison;
use trellis_runtime::consumer::{ConsumerGroup, ConsumerSpec, Delivery, Handler, Outcome, RunnerConfig, RunnerContext};
use trellis_runtime::cutover::{Round as ComparerRound, ShadowCandidate};
use trellis_store::cutover::disputes::{self as store, AsOf, CandidateDecision, PrimaryDecision};
use trellis_store::disputes::FactsClock;
use uuid::Uuid;

use crate::batch::{self, JudgingRules};
use crate::{ProcessorArgs, decode_filed};

/// Every dispute filing: the candidate's one filter subject (the primary's consumers have one
/// per priority).
pub const FILED_SUBJECTS: &str = "events.disputes.filed.>";

/// The candidate's consumer group: `dispute-processor-shadow` on [`FILED_SUBJECTS`].
pub fn candidate_spec() -> ConsumerSpec {
    trellis_runtime::cutover::candidate_spec(ConsumerSpec {
        name: "dispute-processor".into(),
        filter_subject: FILED_SUBJECTS.into(),
    })
}

/// The most inputs one comparer round takes.
pub const ROUND_SIZE: i64 = 256;

/// A batch's decisions are recorded within this span after its first (a microsecond each).
const BATCH_SPAN: time::Duration = time::Duration::seconds(1);

/// The shadow candidate: a pool, its rule set and the comparer's settings.
#[derive(Clone)]
pub struct DisputeCandidate {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    rules: JudgingRules,
    compare_every: Duration,
    missing_after: Duration,
}

/// What one comparer round did.
#[derive(Debug, Default)]
pub struct Round {
    /// Inputs taken (compared, or recorded as missing).
    pub claimed: usize,
    pub comparisons: Vec<Comparison>,
}

impl DisputeCandidate {
    /// A candidate judging with `rules` (production: [`JudgingRules::PRODUCTION`]).
    pub fn new(pool: PgPool, args: &ProcessorArgs, rules: JudgingRules) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                rules,
                compare_every: args.dispute_shadow_compare_every,
                missing_after: args.dispute_shadow_missing_after,
            }),
        }
    }

    /// One round: takes up to [`ROUND_SIZE`] inputs received since `since` that are ready
    /// (decided by the primary, or overdue), compares each, and records the candidate's
    /// decisions, the comparisons and the inputs as compared in one transaction.
    pub async fn compare_ready(&self, since: OffsetDateTime) -> Result<Round, sqlx::Error> {
        let flag = Flag::DisputeExecutor;
        let missing_after = self.inner.missing_after;
        let mut tx = self.inner.pool.begin().await?;
        let inputs = store::claim_ready(&mut tx, since, missing_after, ROUND_SIZE).await?;
        let mut round = Round { claimed: inputs.len(), comparisons: Vec::new() };
        let mut outputs = Vec::new();
        let mut compared = Vec::new();
        let mut batches: HashMap<String, (FactsClock, Vec<(Uuid, PrimaryDecision)>)> = HashMap::new();
        for input in inputs {
            let id = input.dispute_id;
            compared.push(id);
            let why = match input.primary {
                None => format!("the primary made no decision within {}", humantime::format_duration(missing_after)),
                Some(p) if p.by_moderator => "a moderator decided it before the primary judged it".to_owned(),
                Some(p) => match (p.xact.clone(), p.facts.clone()) {
                    (Some(xact), Some(clock)) => {
                        batches.entry(xact).or_insert_with(|| (clock, Vec::new())).1.push((id, p));
                        continue;
                    }
                    _ => "the primary's decision does not record the snapshot of its facts (made by an earlier \
                          release)"
                        .to_owned(),
                },
            };
            round.comparisons.push(Comparison::missing(id.to_string(), why));
        }
        // The primary's batches in the order they decided, so that comparisons are recorded so.
        let mut batches: Vec<_> = batches.into_iter().collect();
        batches.sort_by_key(|(_, (_, members))| members.iter().map(|(_, p)| p.decided_at).min());
        for (xact, (clock, members)) in &batches {
            let (comparisons, decisions) = self.compare_batch(&mut tx, xact, clock, members).await?;
            round.comparisons.extend(comparisons);
            outputs.extend(decisions);
        }
        store::record_outputs(&mut tx, &outputs, &compared).await?;
        trellis_store::cutover::record(&mut *tx, flag, &round.comparisons).await?;
        tx.commit().await?;
        Ok(round)
    }

    /// Compares the `members` (received inputs) of the primary's batch `xact` by replaying it on
    /// its facts.
    async fn compare_batch(
        &self,
        conn: &mut PgConnection,
        xact: &str,
        clock: &FactsClock,
        members: &[(Uuid, PrimaryDecision)],
    ) -> Result<(Vec<Comparison>, Vec<CandidateDecision>), sqlx::Error> {
        let last = members.iter().map(|(_, p)| p.decided_at).max().unwrap_or(clock.at);
        let decisions = store::batch_decisions(conn, xact, clock.at, last + BATCH_SPAN).await?;
        let order: Vec<Uuid> = decisions.iter().map(|d| d.dispute_id).collect();
        let gathered = store::gather_facts_as_of(conn, &order, AsOf { clock, xact }).await?;
        if !gathered.rescored.is_empty() {
            let why = "a trust score its facts read was written after the primary read them (scores keep no \
                       history): its input cannot be read again";
            return Ok((members.iter().map(|(id, _)| Comparison::missing(id.to_string(), why)).collect(), Vec::new()));
        }
        let mut undecided: Vec<Uuid> = gathered
            .facts
            .iter()
            .flat_map(|f| f.against_target.iter())
            .filter(|r| !r.status.is_final())
            .map(|r| r.id)
            .collect();
        undecided.sort_unstable();
        undecided.dedup();
        let first = decisions.first().map_or(clock.at, |d| d.decided_at);
        let taken: HashSet<Uuid> =
            store::taken_elsewhere(conn, &undecided, xact, &clock.snapshot, first).await?.into_iter().collect();
        let in_batch: HashSet<Uuid> = order.iter().copied().collect();
        let facts = gathered.facts.into_iter().map(|f| (f.dispute_id, f)).collect();
        let rules = &self.inner.rules;
        let replayed = batch::replay(&order, facts, |o| in_batch.contains(&o) || !taken.contains(&o), rules);
        let by_id: HashMap<Uuid, _> = replayed.iter().map(|d| (d.id, d)).collect();

        let mut comparisons = Vec::new();
        let mut outputs = Vec::new();
        for (id, p) in members {
            let key = id.to_string();
            let Some(c) = by_id.get(id) else {
                comparisons.push(Comparison::missing(key, "the replay of the primary's batch did not reach it"));
                continue;
            };
            let primary = json!({"status": p.status, "rule": p.rule, "reasons": p.reasons});
            let candidate = json!({"status": c.status.as_str(), "rule": c.rule, "reasons": c.reasons});
            comparisons.push(Comparison::of(key, &primary, &candidate));
            outputs.push(CandidateDecision {
                dispute_id: *id,
                status: c.status.as_str().to_owned(),
                rule: c.rule.to_owned(),
                rules_version: rules.version.to_owned(),
                reasons: c.reasons.clone(),
                primary_decision_id: p.id,
                facts_at: clock.at,
            });
        }
        Ok((comparisons, outputs))
    }
}

impl ShadowCandidate for DisputeCandidate {
    const FLAG: Flag = Flag::DisputeExecutor;
    type Handler = FilingRecorder;
    type Ledger = ();

    /// Records the filings it receives (from new messages only, while the period lasts).
    fn group(&self, ctx: RunnerContext, runner: RunnerConfig) -> ConsumerGroup<FilingRecorder> {
        ConsumerGroup::new(ctx, candidate_spec(), runner, Arc::new(FilingRecorder { pool: self.inner.pool.clone() }))
    }

    fn compare_every(&self) -> Duration {
        self.inner.compare_every
    }

    async fn begin(&self, _since: OffsetDateTime) -> anyhow::Result<()> {
        Ok(())
    }

    /// [`DisputeCandidate::compare_ready`]; a full round asks for the next one at once.
    async fn round(&self, _: &mut (), since: OffsetDateTime) -> anyhow::Result<ComparerRound> {
        let round = self.compare_ready(since).await?;
        Ok(ComparerRound { more: round.claimed >= ROUND_SIZE as usize, comparisons: round.comparisons })
    }
}

/// The candidate's handler: records each filing it receives, nothing else.
pub struct FilingRecorder {
    pool: PgPool,
}

impl Handler for FilingRecorder {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let decoded: Vec<Result<Uuid, String>> = batch.iter().map(decode_filed).collect();
        let ids: Vec<Uuid> = decoded.iter().filter_map(|d| d.as_ref().ok().copied()).collect();
        let result = if ids.is_empty() { Ok(()) } else { store::record_inputs(&self.pool, &ids).await };
        if let Err(e) = &result {
            tracing::warn!(error = %e, messages = batch.len(), "recording the shadow candidate's filings failed; retrying");
        }
        decoded
            .into_iter()
            .map(|d| match (d, &result) {
                (Err(reason), _) => Outcome::Reject(reason),
                (Ok(_), Err(e)) => Outcome::Retry(format!("recording the filings failed: {e}")),
                (Ok(_), Ok(())) => Outcome::Done,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use trellis_domain::disputes::Priority;
    use trellis_domain::events::filed_subject;

    use super::*;

    #[test]
    fn the_candidate_receives_every_priority_on_one_filter_subject() {
        let spec = candidate_spec();
        assert_eq!(spec.name, "dispute-processor-shadow");
        let prefix = spec.filter_subject.strip_suffix('>').expect("a trailing wildcard");
        for p in Priority::ALL {
            let subject = filed_subject(p);
            let rest = subject.strip_prefix(prefix).expect("under the filter");
            assert!(!rest.is_empty() && !rest.contains('.'), "{subject}");
        }
    }
}
