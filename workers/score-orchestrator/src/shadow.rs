//! The score orchestrator's shadow candidate (docs/design/contracts.md §4) and its comparer.
//!
//! **The candidate** reads its own copy of `events.scores.run_requested` (consumer
//! `score-orchestrator-shadow`) while `score.executor` says `shadow` and its side is not the
//! primary. For each request it loads the graph, computes with the rules it was given and
//! writes `shadow.score_runs` and `shadow.scores` only: no outbox event, nothing in `score.*`,
//! and neither the primary's lease (its advisory lock) nor its pending-run flag.
//!
//! **Same input.** A score depends on the whole graph, which moves under writes, so two runs
//! made for the same request need not have read the same graph. Every run (primary and
//! candidate) records the digest of what it loaded ([`trellis_domain::score::InputDigest`]);
//! a candidate run is compared with the latest succeeded primary run of the same digest, and
//! only on the users for which that run's output is provably still stored (see
//! [`shadow_scores::compare`]). A candidate run with no such primary run within
//! `--score-shadow-wait` is recorded as missing. To make equal inputs likely, the candidate
//! starts its run only once the primary has started one for the request (or the wait is over),
//! so both snapshots are taken moments apart.
//!
//! **The comparer** runs beside the candidate and settles each candidate run once: one
//! `matched` comparison standing for every matched user, one `mismatched` comparison per
//! differing user (the first [`MISMATCH_ROWS`] by id, the rest folded into one), and `missing`
//! for users without a provable primary value.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::{Connection, PgConnection};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use trellis_domain::flags::Flag;
use trellis_domain::shadow::{Comparison, ComparisonResult, FieldDiff};
use trellis_runtime::consumer::{ConsumerGroup, ConsumerSpec, Delivery, EachMessage, MessageHandler, Outcome};
use trellis_runtime::consumer::{RunnerConfig, RunnerContext};
use trellis_store::scores::{self as store, digest_text};
use trellis_store::shadow_scores::{self, CandidateRun, Compared, Settled};
use uuid::Uuid;

use crate::{BuilderSink, Computed, Orchestrator, Rules, RunError};

/// The largest relative difference of two trust values that still match.
///
/// The evidence: the trust computation is bit-for-bit deterministic whatever the thread count
/// and the node order (its cross-node sums are fixed-point; `trellis_domain::score` tests it
/// with 1, 2 and 3 threads and under relabelling), and both sides store trust as the shortest
/// exact text of the f64, so an identical candidate differs by exactly 0 (measured: the
/// integration tests assert a `max_trust_difference` of 0). The tolerance is therefore only
/// room for a candidate that computes the same rule with another floating-point order: such
/// reorderings move a trust value by some 1e-14 relative (a few ulps per sum, damped by the
/// iteration), while the smallest change of rule a run can show, one more or one fewer
/// iteration, moves it by about `EPSILON / N` absolute, 1e-10 relative at a million users.
/// 1e-12 sits between the two.
pub const TRUST_TOLERANCE: f64 = 1e-12;

/// Mismatched users recorded one by one per candidate run; the rest are folded into one
/// comparison with their count.
pub const MISMATCH_ROWS: usize = 100;

/// How often the comparer looks for candidate runs to settle.
pub const COMPARE_EVERY: Duration = Duration::from_secs(1);

/// How often a candidate waiting for the primary's run to start looks for it.
const PRIMARY_POLL: Duration = Duration::from_millis(50);

/// The candidate's consumer: the orchestrator's, named `score-orchestrator-shadow`.
pub fn consumer_spec() -> ConsumerSpec {
    trellis_runtime::shadow::candidate_spec(crate::consumer_spec())
}

/// What one candidate run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CandidateSummary {
    pub run_id: Uuid,
    pub users: usize,
    pub edges: usize,
    pub input_digest: String,
    pub load_ms: u64,
    pub compute_ms: u64,
    pub write_ms: u64,
}

/// The shadow candidate: the orchestrator's load and compute with the candidate's `rules`,
/// writing to the shadow tables only.
#[derive(Clone)]
pub struct Candidate {
    orchestrator: Orchestrator,
    rules: Rules,
}

impl Candidate {
    /// A candidate sharing `orchestrator`'s pool, settings and compute threads (a side runs
    /// either the primary or the candidate, never both at once).
    pub fn new(orchestrator: &Orchestrator, rules: Rules) -> Self {
        Self { orchestrator: orchestrator.clone(), rules }
    }

    /// The candidate's consumer group over its copy of the requests, one at a time.
    pub fn group(&self, ctx: RunnerContext, config: RunnerConfig) -> ConsumerGroup<EachMessage<Candidate>> {
        let handler = Arc::new(EachMessage { handler: self.clone(), concurrency: 1 });
        ConsumerGroup::new(ctx, consumer_spec(), config, handler)
    }

    /// Serves a request made at `asked_at`: nothing when a candidate run whose snapshot began
    /// since has succeeded (it read everything the request could want), otherwise one run,
    /// started once the primary's run for the request has (see [`Self::await_primary_run`]).
    pub async fn request_made_at(
        &self,
        asked_at: OffsetDateTime,
        request_id: Option<Uuid>,
    ) -> Result<Option<CandidateSummary>, RunError> {
        if shadow_scores::succeeded_since(&self.orchestrator.pool, asked_at).await? {
            tracing::info!(%asked_at, "a shadow candidate run that started after this request succeeded; it is served");
            return Ok(None);
        }
        self.await_primary_run(asked_at).await?;
        self.run(request_id).await.map(Some)
    }

    /// Waits (up to `--score-shadow-wait`) until a primary run has started since `asked_at`, so
    /// that the candidate's snapshot is taken within moments of the primary's: the graph moves
    /// under writes, and only runs that read the same graph can be compared. Without this, a
    /// request that reaches a busy primary (it coalesces into the follow-up run after the one
    /// in progress) would be read by the candidate at once and by the primary much later.
    async fn await_primary_run(&self, asked_at: OffsetDateTime) -> Result<(), RunError> {
        let deadline = Instant::now() + self.orchestrator.config.shadow_wait;
        let mut pace = tokio::time::interval(PRIMARY_POLL);
        loop {
            pace.tick().await;
            if store::first_run_since(&self.orchestrator.pool, asked_at).await?.is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::warn!(%asked_at, "no primary score run started for this request within the wait; the shadow \
                    candidate runs anyway (it is compared if a primary run reads the same input)");
                return Ok(());
            }
        }
    }

    /// One candidate run: load (on a connection of its own, with no lease), compute with the
    /// candidate's rules, write the run and its scores to the shadow tables in one transaction.
    pub async fn run(&self, request_id: Option<Uuid>) -> Result<CandidateSummary, RunError> {
        let run_id = Uuid::now_v7();
        let asked = OffsetDateTime::now_utc();
        let result = self.phases(run_id, request_id).await;
        match &result {
            Ok(summary) => tracing::info!(%run_id, users = summary.users, edges = summary.edges,
                input_digest = %summary.input_digest, algorithm = self.rules.algorithm, "shadow candidate run succeeded"),
            Err(e) => {
                tracing::error!(%run_id, error = %e, "shadow candidate run failed");
                let (config, error) = (&self.orchestrator.config, e.to_string());
                let failed = shadow_scores::record_failure(
                    &self.orchestrator.pool,
                    run_id,
                    request_id,
                    self.rules.algorithm,
                    &config.host,
                    asked,
                    &error,
                );
                if let Err(mark) = failed.await {
                    tracing::error!(%run_id, error = %mark, "could not record the failed shadow candidate run");
                }
            }
        }
        result
    }

    async fn phases(&self, run_id: Uuid, request_id: Option<Uuid>) -> Result<CandidateSummary, RunError> {
        let config = &self.orchestrator.config;
        let mut conn = PgConnection::connect(config.database_url.expose()).await?;
        let outcome = async {
            let t = Instant::now();
            let mut sink = BuilderSink(None);
            let loaded = store::load_input(&mut conn, config.run_timeout, &mut sink).await?;
            let load_ms = t.elapsed().as_millis() as u64;
            let t = Instant::now();
            let (Computed { trust, scores, edges }, loaded) =
                self.orchestrator.compute(self.rules, sink, loaded).await?;
            let compute_ms = t.elapsed().as_millis() as u64;
            let t = Instant::now();
            let run = CandidateRun {
                id: run_id,
                request_id,
                algorithm: self.rules.algorithm,
                host: &config.host,
                input_digest: loaded.input_digest,
                started_at: loaded.snapshot_at,
                users: &loaded.users,
                trust: &trust.trust,
                scores: &scores,
                edges: edges as i64,
            };
            shadow_scores::write_run(&mut conn, &run, config.run_timeout).await?;
            Ok(CandidateSummary {
                run_id,
                users: loaded.users.len(),
                edges,
                input_digest: digest_text(loaded.input_digest.as_i64()),
                load_ms,
                compute_ms,
                write_ms: t.elapsed().as_millis() as u64,
            })
        }
        .await;
        let _ = conn.close().await;
        outcome
    }

    /// The comparer: settles the candidate runs every [`COMPARE_EVERY`] until `stop`.
    pub async fn compare(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(COMPARE_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            if let Err(e) = self.compare_pending().await {
                tracing::warn!(error = %e, "comparing shadow score runs failed; retrying");
            }
        }
    }

    /// Settles every candidate run that can be settled now; returns how many were.
    pub async fn compare_pending(&self) -> Result<usize, sqlx::Error> {
        let pool = &self.orchestrator.pool;
        let period = trellis_store::shadow::latest_period(pool, Flag::ScoreExecutor).await?;
        let Some(period) = period.filter(|p| p.ended_at.is_none()) else {
            return Ok(0);
        };
        let mut settled = 0;
        for run in shadow_scores::uncompared(pool).await? {
            if self.settle(run.id, period.started_at).await? {
                settled += 1;
            }
        }
        Ok(settled)
    }

    /// Settles candidate run `id` if it can be: compared, missing, or not counted (it belongs to
    /// an earlier shadow period). Under the run's row lock, so each run is settled once.
    async fn settle(&self, id: Uuid, period_start: OffsetDateTime) -> Result<bool, sqlx::Error> {
        let pool = &self.orchestrator.pool;
        let mut claim = pool.begin().await?;
        let Some((run, waited)) = shadow_scores::claim(&mut claim, id).await? else {
            return Ok(false);
        };
        let key = run_key(id);
        let settled = if run.started_at < period_start {
            // Evidence from another period may be of other code: the gate counts this period only.
            tracing::info!(run_id = %id, "shadow candidate run of an ended shadow period: not compared");
            Settled::PeriodEnded
        } else if let Some(recorded) = shadow_scores::recorded_key(pool, &key).await? {
            // Recorded by a comparer that stopped before it settled the run: settle, once.
            match primary_of_key(&recorded) {
                Some(primary_run_id) => Settled::Compared { primary_run_id, max_trust_difference: None },
                None => Settled::Missing,
            }
        } else {
            let (Some(digest), Some(users)) = (run.input_digest, run.users) else {
                let why = "the candidate run recorded no input digest";
                trellis_runtime::shadow::record(pool, Flag::ScoreExecutor, &[Comparison::missing(key, why)]).await?;
                shadow_scores::settle(&mut claim, id, Settled::Missing).await?;
                claim.commit().await?;
                return Ok(true);
            };
            match shadow_scores::compare(pool, id, digest, users, TRUST_TOLERANCE, MISMATCH_ROWS as i64).await? {
                Some(compared) => {
                    let comparisons = comparisons(id, &compared);
                    trellis_runtime::shadow::record(pool, Flag::ScoreExecutor, &comparisons).await?;
                    tracing::info!(run_id = %id, primary_run_id = %compared.primary.id, matched = compared.matched,
                        mismatched = compared.mismatched, absent = compared.absent, superseded = compared.superseded,
                        max_trust_difference = ?compared.max_trust_difference, "shadow candidate run compared");
                    Settled::Compared {
                        primary_run_id: compared.primary.id,
                        max_trust_difference: compared.max_trust_difference,
                    }
                }
                None if waited >= self.orchestrator.config.shadow_wait.as_secs_f64() => {
                    let why = format!(
                        "no primary run on the same input (input digest {}, {users} users) within {}",
                        digest_text(digest),
                        humantime::format_duration(self.orchestrator.config.shadow_wait)
                    );
                    tracing::info!(run_id = %id, "{why}");
                    trellis_runtime::shadow::record(pool, Flag::ScoreExecutor, &[Comparison::missing(key, why)])
                        .await?;
                    Settled::Missing
                }
                // The primary run of this input may still be on its way.
                None => return Ok(false),
            }
        };
        shadow_scores::settle(&mut claim, id, settled).await?;
        claim.commit().await?;
        Ok(true)
    }
}

/// What every comparison key of candidate run `id` starts with.
fn run_key(id: Uuid) -> String {
    format!("candidate run {id}")
}

/// The key of candidate run `candidate` against primary run `primary`.
fn pair_key(candidate: Uuid, primary: Uuid) -> String {
    format!("{} / primary run {primary}", run_key(candidate))
}

/// The primary run named in a comparison key, if one is.
fn primary_of_key(key: &str) -> Option<Uuid> {
    let (_, rest) = key.split_once(" / primary run ")?;
    rest.get(..36)?.parse().ok()
}

/// The comparisons of candidate run `candidate` with the primary run `compared` names.
pub fn comparisons(candidate: Uuid, compared: &Compared) -> Vec<Comparison> {
    let pair = pair_key(candidate, compared.primary.id);
    let mut out = Vec::new();
    if compared.matched > 0 {
        out.push(Comparison {
            key: pair.clone(),
            result: ComparisonResult::Matched,
            count: compared.matched,
            diffs: Vec::new(),
        });
    }
    for m in &compared.first_mismatches {
        let mut diffs = Vec::new();
        if m.primary_score != m.candidate_score {
            diffs.push(FieldDiff {
                field: "score".into(),
                primary: json!(m.primary_score),
                candidate: json!(m.candidate_score),
            });
        }
        if !trust_matches(m.primary_trust, m.candidate_trust) {
            diffs.push(FieldDiff {
                field: "trust".into(),
                primary: json!(m.primary_trust),
                candidate: json!(m.candidate_trust),
            });
        }
        out.push(Comparison {
            key: format!("{pair} / user {}", m.user_id),
            result: ComparisonResult::Mismatched,
            count: 1,
            diffs,
        });
    }
    let rest = compared.mismatched - compared.first_mismatches.len() as i64;
    if rest > 0 {
        out.push(Comparison {
            key: format!("{pair} / {rest} more mismatched users"),
            result: ComparisonResult::Mismatched,
            count: rest,
            diffs: vec![FieldDiff {
                field: "users".into(),
                primary: serde_json::Value::Null,
                candidate: json!(format!(
                    "{rest} users beyond the first {} by id differ too",
                    compared.first_mismatches.len()
                )),
            }],
        });
    }
    let primary = compared.primary.id;
    for (count, what, why) in [
        (
            compared.absent,
            "users without a stored score",
            format!("primary run {primary}'s score of these users is no longer stored (suspended or removed since)"),
        ),
        (
            compared.superseded,
            "users rescored by a later primary run",
            format!("a later primary run rewrote these users' scores: primary run {primary}'s values cannot be proven"),
        ),
    ] {
        if count > 0 {
            out.push(Comparison { count, ..Comparison::missing(format!("{pair} / {what}"), why) });
        }
    }
    out
}

/// Whether two trust values match within [`TRUST_TOLERANCE`] (as the comparison's SQL decides).
pub fn trust_matches(primary: f64, candidate: f64) -> bool {
    (primary - candidate).abs() <= TRUST_TOLERANCE * primary.abs().max(candidate.abs())
}

impl MessageHandler for Candidate {
    async fn handle_one(&self, delivery: &Delivery) -> Outcome {
        if let Err(rejected) = crate::check_request(delivery) {
            return rejected;
        }
        match self.request_made_at(delivery.envelope.occurred_at, Some(delivery.envelope.id.as_uuid())).await {
            Ok(_) => Outcome::Done,
            Err(RunError::Invalid(e)) => Outcome::Reject(e),
            Err(e @ RunError::Database(_)) => Outcome::Retry(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use trellis_store::shadow_scores::{Mismatch, PrimaryRun};

    use super::*;

    fn compared(matched: i64, mismatched: i64, listed: usize, absent: i64, superseded: i64) -> Compared {
        let mismatch = |i: u128| Mismatch {
            user_id: Uuid::from_u128(i),
            primary_trust: 0.25,
            primary_score: 500,
            candidate_trust: if i == 1 { 0.5 } else { 0.25 * (1.0 + 1e-13) },
            candidate_score: 400,
        };
        Compared {
            primary: PrimaryRun { id: Uuid::from_u128(7), finished_at: OffsetDateTime::UNIX_EPOCH },
            matched,
            mismatched,
            first_mismatches: (1..=listed as u128).map(mismatch).collect(),
            absent,
            superseded,
            max_trust_difference: Some(0.0),
        }
    }

    #[test]
    fn matched_users_are_one_comparison_and_mismatched_users_one_each_up_to_the_limit() {
        let candidate = Uuid::from_u128(9);
        let out = comparisons(candidate, &compared(40, 150, MISMATCH_ROWS, 2, 3));
        let pair = format!("candidate run {candidate} / primary run {}", Uuid::from_u128(7));
        assert_eq!((out[0].key.as_str(), out[0].result, out[0].count), (pair.as_str(), ComparisonResult::Matched, 40));
        assert!(out[0].diffs.is_empty());
        let users: Vec<_> = out.iter().filter(|c| c.key.contains(" / user ")).collect();
        assert_eq!(users.len(), MISMATCH_ROWS);
        assert!(users.iter().all(|c| c.result == ComparisonResult::Mismatched && c.count == 1));
        // Field by field: the first user differs in both fields, the others in score only (their
        // trust is 1e-13 apart, within the tolerance).
        let fields = |c: &Comparison| c.diffs.iter().map(|d| d.field.clone()).collect::<Vec<_>>();
        assert_eq!(fields(users[0]), ["score", "trust"]);
        assert_eq!(users[0].diffs[0], FieldDiff { field: "score".into(), primary: json!(500), candidate: json!(400) });
        assert_eq!(fields(users[1]), ["score"]);
        let folded = &out[1 + MISMATCH_ROWS];
        assert_eq!((folded.result, folded.count), (ComparisonResult::Mismatched, 50));
        assert!(folded.key.ends_with("/ 50 more mismatched users"), "{}", folded.key);
        let missing: Vec<_> = out.iter().filter(|c| c.result == ComparisonResult::Missing).map(|c| c.count).collect();
        assert_eq!(missing, [2, 3]);
        assert_eq!(out.iter().map(|c| c.count).sum::<i64>(), 40 + 150 + 2 + 3, "every user is counted once");
        assert!(out.iter().all(|c| c.key.starts_with(&run_key(candidate))), "every key starts with the run's");
        assert_eq!(primary_of_key(&out[3].key), Some(Uuid::from_u128(7)));
        assert_eq!(primary_of_key(&run_key(candidate)), None);
    }

    #[test]
    fn an_all_matched_run_is_one_comparison_and_an_empty_one_none() {
        let out = comparisons(Uuid::from_u128(1), &compared(1_000_000, 0, 0, 0, 0));
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].result, out[0].count), (ComparisonResult::Matched, 1_000_000));
        assert!(comparisons(Uuid::from_u128(1), &compared(0, 0, 0, 0, 0)).is_empty());
    }

    #[test]
    fn trust_matches_within_a_relative_tolerance_only() {
        assert!(trust_matches(0.0, 0.0));
        assert!(trust_matches(1e-6, 1e-6 * (1.0 + 1e-13)));
        assert!(!trust_matches(1e-6, 1e-6 * (1.0 + 1e-11)));
        assert!(!trust_matches(0.0, 1e-300));
    }
}
