//! The migration guide's stage triggers (§3.1 A→B and §4.1 B→C): what each one measures and
//! the threshold past which the next stage is due. One table, shared by `trellisctl triggers`
//! and checked against the Prometheus rules in `deploy/prometheus/` by a test, so that the
//! alert and the on-call tool cannot disagree.

/// A stage transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Stage A (monolith) → Stage B (extracted workers).
    AToB,
    /// Stage B → Stage C (service split).
    BToC,
}

impl Transition {
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::AToB => "A→B",
            Transition::BToC => "B→C",
        }
    }
}

/// The unit a threshold is stated in, for printing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Seconds,
    Bytes,
    Count,
}

/// One row of a trigger table that metrics can see.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Trigger {
    /// The alert's name in `deploy/prometheus/trellis.rules.yml`.
    pub alert: &'static str,
    /// The recording rule there that holds the current value (the alert is `<record> > threshold`).
    pub record: &'static str,
    pub transition: Transition,
    /// The guide's wording of the metric.
    pub metric: &'static str,
    /// Met when the measured value is strictly greater than this.
    pub threshold: f64,
    pub unit: Unit,
    /// How long the value must stay over the threshold (seconds), when the guide says so.
    pub sustained_for: Option<u64>,
}

impl Trigger {
    pub fn is_met(&self, value: f64) -> bool {
        value > self.threshold
    }
}

/// Score batch duration > 30 minutes.
pub const SCORE_BATCH_DURATION_SECONDS: f64 = 30.0 * 60.0;
/// Search index update lag > 5 minutes.
pub const SEARCH_INDEX_LAG_SECONDS: f64 = 5.0 * 60.0;
/// Dispute queue depth > 100 pending…
pub const DISPUTE_QUEUE_DEPTH: f64 = 100.0;
/// …for > 1 hour.
pub const DISPUTE_QUEUE_SUSTAINED_SECONDS: u64 = 60 * 60;
/// API p95 latency > 500 ms during batch compute.
pub const API_P95_DURING_BATCH_SECONDS: f64 = 0.5;
/// Daily active users > 1,000 (A→B).
pub const DAILY_ACTIVE_USERS_A_TO_B: f64 = 1_000.0;
/// Daily active users > 10,000 (B→C).
pub const DAILY_ACTIVE_USERS_B_TO_C: f64 = 10_000.0;
/// API binary size > 200 MB (B→C). The guide's MB is taken as 10^6 bytes.
pub const BINARY_SIZE_BYTES: f64 = 200.0 * 1_000_000.0;

/// Every trigger of both tables that a metric can show. The B→C rows that no metric sees
/// (deploy frequency, team size, cross-domain coupling bugs) are manual checks in
/// `docs/runbooks/stage-trigger-review.md`.
pub const TRIGGERS: &[Trigger] = &[
    Trigger {
        alert: "StageTriggerScoreBatchDuration",
        record: "trellis:score_batch_duration_seconds",
        transition: Transition::AToB,
        metric: "score batch duration",
        threshold: SCORE_BATCH_DURATION_SECONDS,
        unit: Unit::Seconds,
        sustained_for: None,
    },
    Trigger {
        alert: "StageTriggerSearchIndexLag",
        record: "trellis:search_index_lag_seconds",
        transition: Transition::AToB,
        metric: "search index update lag",
        threshold: SEARCH_INDEX_LAG_SECONDS,
        unit: Unit::Seconds,
        sustained_for: None,
    },
    Trigger {
        alert: "StageTriggerDisputeQueueDepth",
        record: "trellis:dispute_queue_depth_messages",
        transition: Transition::AToB,
        metric: "dispute queue depth (pending, sustained 1 h)",
        threshold: DISPUTE_QUEUE_DEPTH,
        unit: Unit::Count,
        sustained_for: Some(DISPUTE_QUEUE_SUSTAINED_SECONDS),
    },
    Trigger {
        alert: "StageTriggerApiLatencyDuringBatch",
        record: "trellis:api_p95_during_batch_seconds",
        transition: Transition::AToB,
        metric: "API p95 latency during batch compute",
        threshold: API_P95_DURING_BATCH_SECONDS,
        unit: Unit::Seconds,
        sustained_for: None,
    },
    Trigger {
        alert: "StageTriggerDailyActiveUsersAToB",
        record: "trellis:api_daily_active_users",
        transition: Transition::AToB,
        metric: "daily active users",
        threshold: DAILY_ACTIVE_USERS_A_TO_B,
        unit: Unit::Count,
        sustained_for: None,
    },
    Trigger {
        alert: "StageTriggerDailyActiveUsersBToC",
        record: "trellis:api_daily_active_users",
        transition: Transition::BToC,
        metric: "daily active users",
        threshold: DAILY_ACTIVE_USERS_B_TO_C,
        unit: Unit::Count,
        sustained_for: None,
    },
    Trigger {
        alert: "StageTriggerBinarySize",
        record: "trellis:build_binary_size_bytes",
        transition: Transition::BToC,
        metric: "binary size",
        threshold: BINARY_SIZE_BYTES,
        unit: Unit::Bytes,
        sustained_for: None,
    },
];

/// The B→C triggers no metric can show, reviewed by hand.
pub const MANUAL_TRIGGERS: &[(&str, &str)] = &[
    ("monolith deployment frequency", "> 3 per day desired"),
    ("team size", "> 3 engineers"),
    ("cross-domain coupling bugs", "> 5 in 30 days"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trigger_is_met_only_strictly_past_its_threshold() {
        let dau = TRIGGERS.iter().find(|t| t.alert == "StageTriggerDailyActiveUsersAToB").unwrap();
        assert!(!dau.is_met(1_000.0));
        assert!(dau.is_met(1_001.0));
    }

    #[test]
    fn alert_names_are_unique() {
        let mut names: Vec<_> = TRIGGERS.iter().map(|t| t.alert).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TRIGGERS.len());
    }
}
