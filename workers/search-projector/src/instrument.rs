//! What the search projector measures: every metric named once in [`name`] and one struct per
//! emission whose `emit()` logs and counts. Both gauges are read from the database at
//! start-up (`report_checkpoint_age`), so [`register`] has no series to set at zero; it exists
//! so that every processor registers the same way. The conventions are the runtime's
//! (`trellis_runtime::instrument`).
#![allow(clippy::disallowed_macros)]

/// The metric names of the search projector.
pub mod name {
    pub const SEARCH_PROJECTION_LAG_SECONDS: &str = "trellis_search_projection_lag_seconds";
    pub const SEARCH_CHECKPOINT_AGE_SECONDS: &str = "trellis_search_checkpoint_age_seconds";
}

/// Every name in [`name`].
pub const NAMES: &[&str] = &[name::SEARCH_PROJECTION_LAG_SECONDS, name::SEARCH_CHECKPOINT_AGE_SECONDS];

/// Exports the projector's series with a starting value: none (see the module's doc).
pub fn register() {}

/// The newest event applied to the read model is `seconds` old.
pub struct ProjectionLagMeasured {
    pub seconds: f64,
}

impl ProjectionLagMeasured {
    pub fn emit(self) {
        tracing::trace!(seconds = self.seconds, "search projection lag");
        metrics::gauge!(name::SEARCH_PROJECTION_LAG_SECONDS).set(self.seconds);
    }
}

/// The read model's checkpoint was last advanced `seconds` ago.
pub struct CheckpointAgeSampled {
    pub seconds: f64,
}

impl CheckpointAgeSampled {
    pub fn emit(self) {
        tracing::trace!(seconds = self.seconds, "search checkpoint age");
        metrics::gauge!(name::SEARCH_CHECKPOINT_AGE_SECONDS).set(self.seconds);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_name_of_the_search_projector_follows_the_scheme() {
        for name in super::NAMES {
            trellis_runtime::instrument::check_name(name).unwrap();
        }
    }
}
