//! What the dispute processor measures: every metric named once in [`name`], one struct per
//! emission whose `emit()` logs and counts, and [`register`] exporting every series with
//! bounded labels at zero. The conventions are the runtime's (`trellis_runtime::instrument`).
//! trellis-api emits [`DisputeDecided`] too, for a moderator's decisions.
#![allow(clippy::disallowed_macros)]

use trellis_domain::adjudication::MODERATOR_RULE;
use trellis_domain::disputes::{DisputeStatus, Priority};

use crate::label;

/// The metric names of the dispute processor.
pub mod name {
    pub const DISPUTE_DECISIONS_TOTAL: &str = "trellis_dispute_decisions_total";
    pub const DISPUTE_DECISION_LATENCY_SECONDS: &str = "trellis_dispute_decision_latency_seconds";
    pub const DISPUTE_QUEUE_DEPTH_MESSAGES: &str = "trellis_dispute_queue_depth_messages";
    pub const DISPUTE_OLDEST_WAITING_SECONDS: &str = "trellis_dispute_oldest_waiting_seconds";
    pub const DISPUTE_AUTO_ADJUDICATION_RATIO: &str = "trellis_dispute_auto_adjudication_ratio";
}

/// Every name in [`name`].
pub const NAMES: &[&str] = &[
    name::DISPUTE_DECISIONS_TOTAL,
    name::DISPUTE_DECISION_LATENCY_SECONDS,
    name::DISPUTE_QUEUE_DEPTH_MESSAGES,
    name::DISPUTE_OLDEST_WAITING_SECONDS,
    name::DISPUTE_AUTO_ADJUDICATION_RATIO,
];

/// Every (outcome, rule) pair of `trellis_dispute_decisions_total`.
pub const DECISION_SERIES: [(&str, &str); 8] = [
    ("dismissed", "R1"),
    ("dismissed", "R2"),
    ("dismissed", "R3"),
    ("needs_review", "R3"),
    ("upheld", "R4"),
    ("needs_review", "R5"),
    ("upheld", MODERATOR_RULE),
    ("dismissed", MODERATOR_RULE),
];

/// Sets every series with bounded labels to zero (alerts never see an absent series). Only
/// the outcome/rule pairs the rules can produce exist.
pub fn register() {
    for p in Priority::ALL {
        metrics::gauge!(name::DISPUTE_QUEUE_DEPTH_MESSAGES, "priority" => label(p)).set(0.0);
        metrics::gauge!(name::DISPUTE_OLDEST_WAITING_SECONDS, "priority" => label(p)).set(0.0);
        let _ = metrics::histogram!(name::DISPUTE_DECISION_LATENCY_SECONDS, "priority" => label(p));
    }
    for (outcome, rule) in DECISION_SERIES {
        metrics::counter!(name::DISPUTE_DECISIONS_TOTAL, "outcome" => outcome, "rule" => rule).absolute(0);
    }
    metrics::gauge!(name::DISPUTE_AUTO_ADJUDICATION_RATIO).set(0.0);
}

/// A dispute was decided, by a rule (the processor) or by a moderator (trellis-api).
pub struct DisputeDecided<'a> {
    pub dispute: uuid::Uuid,
    pub status: DisputeStatus,
    /// The rule's id, or [`MODERATOR_RULE`].
    pub rule: &'a str,
}

impl DisputeDecided<'_> {
    pub fn emit(self) {
        tracing::debug!(dispute = %self.dispute, decision = self.status.as_str(), rule = self.rule, "dispute decided");
        metrics::counter!(name::DISPUTE_DECISIONS_TOTAL, "outcome" => self.status.as_str(), "rule" => self.rule.to_owned())
            .increment(1);
    }
}

/// A decided dispute of `priority` had waited `seconds` since its filing.
pub struct DecisionLatency {
    pub priority: Priority,
    pub seconds: f64,
}

impl DecisionLatency {
    pub fn emit(self) {
        tracing::trace!(priority = label(self.priority), seconds = self.seconds, "decision latency");
        metrics::histogram!(name::DISPUTE_DECISION_LATENCY_SECONDS, "priority" => label(self.priority))
            .record(self.seconds);
    }
}

/// A priority's queue as last read: messages pending or unacknowledged on its consumer.
pub struct QueueSampled {
    pub priority: Priority,
    pub depth: u64,
}

impl QueueSampled {
    pub fn emit(self) {
        tracing::trace!(priority = label(self.priority), depth = self.depth, "dispute queue sampled");
        metrics::gauge!(name::DISPUTE_QUEUE_DEPTH_MESSAGES, "priority" => label(self.priority)).set(self.depth as f64);
    }
}

/// The age of a priority's oldest pending dispute, as last read (0 when none waits).
pub struct OldestWaitingSampled {
    pub priority: Priority,
    pub seconds: f64,
}

impl OldestWaitingSampled {
    pub fn emit(self) {
        tracing::trace!(priority = label(self.priority), seconds = self.seconds, "oldest pending dispute");
        metrics::gauge!(name::DISPUTE_OLDEST_WAITING_SECONDS, "priority" => label(self.priority)).set(self.seconds);
    }
}

/// The share of recent decisions made by rules, as last read.
pub struct AutoAdjudicationSampled {
    pub ratio: f64,
}

impl AutoAdjudicationSampled {
    pub fn emit(self) {
        tracing::trace!(ratio = self.ratio, "auto-adjudication ratio");
        metrics::gauge!(name::DISPUTE_AUTO_ADJUDICATION_RATIO).set(self.ratio);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_name_of_the_dispute_processor_follows_the_scheme() {
        for name in super::NAMES {
            trellis_runtime::instrument::check_name(name).unwrap();
        }
    }
}
