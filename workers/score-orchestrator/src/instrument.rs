//! What the score orchestrator measures: every metric named once in [`name`], one struct per
//! emission whose `emit()` logs and counts, and [`register`] exporting the series with bounded
//! labels at zero. The conventions are the runtime's (`trellis_runtime::instrument`).
#![allow(clippy::disallowed_macros)]

use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

/// The metric names of the score orchestrator.
pub mod name {
    pub const SCORE_RUNS_TOTAL: &str = "trellis_score_runs_total";
    pub const SCORE_IN_PROGRESS_RUNS: &str = "trellis_score_in_progress_runs";
    pub const SCORE_RUN_DURATION_SECONDS: &str = "trellis_score_run_duration_seconds";
    pub const SCORE_LAST_SUCCESS_TIMESTAMP_SECONDS: &str = "trellis_score_last_success_timestamp_seconds";
    pub const SCORE_LAST_RUN_USERS: &str = "trellis_score_last_run_users";
    pub const SCORE_LAST_RUN_ITERATIONS: &str = "trellis_score_last_run_iterations";
}

/// Every name in [`name`].
pub const NAMES: &[&str] = &[
    name::SCORE_RUNS_TOTAL,
    name::SCORE_IN_PROGRESS_RUNS,
    name::SCORE_RUN_DURATION_SECONDS,
    name::SCORE_LAST_SUCCESS_TIMESTAMP_SECONDS,
    name::SCORE_LAST_RUN_USERS,
    name::SCORE_LAST_RUN_ITERATIONS,
];

/// How a score run ended (`trellis_score_runs_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    Succeeded,
    Failed,
    /// Left by a replica that died: marked failed by the next run.
    Abandoned,
}

impl RunOutcome {
    pub const ALL: [RunOutcome; 3] = [Self::Succeeded, Self::Failed, Self::Abandoned];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Abandoned => "abandoned",
        }
    }
}

/// A phase of a run (`trellis_score_run_duration_seconds{phase}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Load,
    Compute,
    Write,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Self::Load, Self::Compute, Self::Write];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Load => "load",
            Self::Compute => "compute",
            Self::Write => "write",
        }
    }
}

/// Counters, the in-progress gauge and the phase histograms at zero.
pub fn register() {
    for outcome in RunOutcome::ALL {
        metrics::counter!(name::SCORE_RUNS_TOTAL, "outcome" => outcome.as_str()).increment(0);
    }
    metrics::gauge!(name::SCORE_IN_PROGRESS_RUNS).set(0.0);
    for phase in Phase::ALL {
        let _ = metrics::histogram!(name::SCORE_RUN_DURATION_SECONDS, "phase" => phase.as_str());
    }
}

/// A run started on this replica ("API latency during batch compute", a stage trigger, needs
/// to know when one runs).
pub struct RunStarted<'a> {
    pub run_id: Uuid,
    pub trigger: &'a str,
}

impl RunStarted<'_> {
    pub fn emit(self) {
        tracing::info!(run_id = %self.run_id, trigger = self.trigger, "score run started");
        metrics::gauge!(name::SCORE_IN_PROGRESS_RUNS).increment(1.0);
    }
}

/// A phase of a run took `duration`.
pub struct PhaseDone {
    pub phase: Phase,
    pub duration: Duration,
}

impl PhaseDone {
    pub fn emit(self) {
        tracing::debug!(phase = self.phase.as_str(), duration = ?self.duration, "score run phase done");
        metrics::histogram!(name::SCORE_RUN_DURATION_SECONDS, "phase" => self.phase.as_str())
            .record(self.duration.as_secs_f64());
    }
}

/// A run succeeded.
pub struct RunSucceeded {
    pub run_id: Uuid,
    pub users: usize,
    pub edges: usize,
    pub iterations: u32,
    pub scores_changed: usize,
    pub elapsed: Duration,
}

impl RunSucceeded {
    pub fn emit(self) {
        tracing::info!(run_id = %self.run_id, users = self.users, edges = self.edges, iterations = self.iterations,
            changed = self.scores_changed, elapsed = ?self.elapsed, "score run succeeded");
        metrics::gauge!(name::SCORE_IN_PROGRESS_RUNS).decrement(1.0);
        metrics::counter!(name::SCORE_RUNS_TOTAL, "outcome" => RunOutcome::Succeeded.as_str()).increment(1);
        LastSuccessRead { at: OffsetDateTime::now_utc() }.emit();
        metrics::gauge!(name::SCORE_LAST_RUN_USERS).set(self.users as f64);
        metrics::gauge!(name::SCORE_LAST_RUN_ITERATIONS).set(self.iterations as f64);
    }
}

/// A run failed (it is marked failed in `score.runs` separately).
pub struct RunFailed<'a> {
    pub run_id: Uuid,
    pub error: &'a dyn std::fmt::Display,
}

impl RunFailed<'_> {
    pub fn emit(self) {
        tracing::error!(run_id = %self.run_id, error = %self.error, "score run failed");
        metrics::gauge!(name::SCORE_IN_PROGRESS_RUNS).decrement(1.0);
        metrics::counter!(name::SCORE_RUNS_TOTAL, "outcome" => RunOutcome::Failed.as_str()).increment(1);
    }
}

/// Runs left by a dead replica were marked failed.
pub struct RunsAbandoned {
    pub runs: u64,
}

impl RunsAbandoned {
    pub fn emit(self) {
        tracing::warn!(abandoned = self.runs, "marked runs abandoned by a dead replica as failed");
        metrics::counter!(name::SCORE_RUNS_TOTAL, "outcome" => RunOutcome::Abandoned.as_str()).increment(self.runs);
    }
}

/// The last successful run finished `at` (read from the database at start-up, or just now).
pub struct LastSuccessRead {
    pub at: OffsetDateTime,
}

impl LastSuccessRead {
    pub fn emit(self) {
        tracing::debug!(at = %self.at, "last successful score run");
        metrics::gauge!(name::SCORE_LAST_SUCCESS_TIMESTAMP_SECONDS).set(self.at.unix_timestamp() as f64);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_name_of_the_score_orchestrator_follows_the_scheme() {
        for name in super::NAMES {
            trellis_runtime::instrument::check_name(name).unwrap();
        }
    }
}
