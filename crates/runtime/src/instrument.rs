//! What the runtime measures. Every metric it exports is named once in [`name`]; every place
//! that changes one builds an event struct here and calls its `emit()`, which logs and counts
//! together; [`register`] (called by the host) and [`register_consumer`] (called by each
//! consumer group) export every series at its starting value, so that a scrape and an alert
//! see it from start-up. `metrics::*!` is allowed in these modules only (clippy's
//! `disallowed-macros`, configured in `clippy.toml`).
//!
//! Names follow `trellis_<area>_<what>_<unit>` ([`check_name`] says which units there are);
//! every crate's own `instrument` module lists its names and tests them with it.
#![allow(clippy::disallowed_macros)]

use std::time::Duration;

use time::OffsetDateTime;
use trellis_domain::flags::{Executor, Flag};
use trellis_domain::shadow::{Comparison, ComparisonResult, processor};

/// The metric names of the runtime.
pub mod name {
    pub const WORKER_MESSAGES_TOTAL: &str = "trellis_worker_messages_total";
    pub const WORKER_IN_FLIGHT_MESSAGES: &str = "trellis_worker_in_flight_messages";
    pub const WORKER_HANDLE_DURATION_SECONDS: &str = "trellis_worker_handle_duration_seconds";
    pub const WORKER_LAST_SUCCESS_TIMESTAMP_SECONDS: &str = "trellis_worker_last_success_timestamp_seconds";
    pub const CONSUMER_PENDING_MESSAGES: &str = "trellis_consumer_pending_messages";
    pub const CONSUMER_ACK_PENDING_MESSAGES: &str = "trellis_consumer_ack_pending_messages";
    pub const CONSUMER_STANDBY_STATE: &str = "trellis_consumer_standby_state";
    pub const DLQ_DEPTH_MESSAGES: &str = "trellis_dlq_depth_messages";
    pub const OUTBOX_PUBLISHED_TOTAL: &str = "trellis_outbox_published_total";
    pub const OUTBOX_RELAY_ERRORS_TOTAL: &str = "trellis_outbox_relay_errors_total";
    pub const OUTBOX_PRUNED_TOTAL: &str = "trellis_outbox_pruned_total";
    pub const OUTBOX_RELAY_BATCH_DURATION_SECONDS: &str = "trellis_outbox_relay_batch_duration_seconds";
    pub const OUTBOX_PENDING_ROWS: &str = "trellis_outbox_pending_rows";
    pub const OUTBOX_OLDEST_PENDING_AGE_SECONDS: &str = "trellis_outbox_oldest_pending_age_seconds";
    pub const CUTOVER_FLAG_STATE: &str = "trellis_cutover_flag_state";
    pub const SHADOW_COMPARISONS_TOTAL: &str = "trellis_shadow_comparisons_total";
    pub const BUILD_BINARY_SIZE_BYTES: &str = "trellis_build_binary_size_bytes";
    pub const STREAM_STORED_BYTES: &str = "trellis_stream_stored_bytes";
    pub const STREAM_STORED_MESSAGES: &str = "trellis_stream_stored_messages";
    pub const STREAM_LIMIT_RATIO: &str = "trellis_stream_limit_ratio";
}

/// Every name in [`name`].
pub const NAMES: &[&str] = &[
    name::WORKER_MESSAGES_TOTAL,
    name::WORKER_IN_FLIGHT_MESSAGES,
    name::WORKER_HANDLE_DURATION_SECONDS,
    name::WORKER_LAST_SUCCESS_TIMESTAMP_SECONDS,
    name::CONSUMER_PENDING_MESSAGES,
    name::CONSUMER_ACK_PENDING_MESSAGES,
    name::CONSUMER_STANDBY_STATE,
    name::DLQ_DEPTH_MESSAGES,
    name::OUTBOX_PUBLISHED_TOTAL,
    name::OUTBOX_RELAY_ERRORS_TOTAL,
    name::OUTBOX_PRUNED_TOTAL,
    name::OUTBOX_RELAY_BATCH_DURATION_SECONDS,
    name::OUTBOX_PENDING_ROWS,
    name::OUTBOX_OLDEST_PENDING_AGE_SECONDS,
    name::CUTOVER_FLAG_STATE,
    name::SHADOW_COMPARISONS_TOTAL,
    name::BUILD_BINARY_SIZE_BYTES,
    name::STREAM_STORED_BYTES,
    name::STREAM_STORED_MESSAGES,
    name::STREAM_LIMIT_RATIO,
];

/// The units a name may end in: `total` for counters (of events), a physical unit for times and
/// sizes (`timestamp_seconds` for points in time), the things counted for a gauge of a number
/// of things, `ratio` for a fraction and `state` for a gauge that is 1 for the state a process
/// is in and 0 for the others.
pub const UNITS: &[&str] = &[
    "total",
    "seconds",
    "bytes",
    "ratio",
    "state",
    "messages",
    "rows",
    "keys",
    "users",
    "runs",
    "iterations",
    "connections",
];

/// Checks `name` against `trellis_<area>_<what>_<unit>`: lower-case words, an area and at least
/// one word for what is measured before a unit of [`UNITS`].
pub fn check_name(name: &str) -> Result<(), String> {
    let words: Vec<&str> = name.split('_').collect();
    if words.first() != Some(&"trellis") {
        return Err(format!("{name}: does not start with trellis_"));
    }
    if words.iter().any(|w| w.is_empty() || !w.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())) {
        return Err(format!("{name}: words are lower-case letters and digits, one '_' apart"));
    }
    let Some(unit) = words.last().filter(|u| UNITS.contains(u)) else {
        return Err(format!("{name}: does not end in a unit of {UNITS:?}"));
    };
    // trellis, the area, at least one word of what, the unit.
    if words.len() < 4 {
        return Err(format!("{name}: needs an area and a what before the unit {unit}"));
    }
    Ok(())
}

/// Exports the series every process has (the shadow comparisons) at zero.
pub fn register() {
    for flag in Flag::ALL {
        for result in ComparisonResult::ALL {
            metrics::counter!(name::SHADOW_COMPARISONS_TOTAL, "processor" => processor(flag), "result" => result.as_str())
                .increment(0);
        }
    }
}

/// Exports the outbox relay's counters at zero (the process that runs a relay calls it).
pub fn register_relay() {
    metrics::counter!(name::OUTBOX_PUBLISHED_TOTAL).increment(0);
    metrics::counter!(name::OUTBOX_RELAY_ERRORS_TOTAL).increment(0);
    metrics::counter!(name::OUTBOX_PRUNED_TOTAL).increment(0);
}

/// Exports the fill level of each stream (by its base name, the `stream` label) at zero (the
/// process that polls them calls it).
pub fn register_streams(streams: &[&'static str]) {
    for &stream in streams {
        metrics::gauge!(name::STREAM_STORED_BYTES, "stream" => stream).set(0.0);
        metrics::gauge!(name::STREAM_STORED_MESSAGES, "stream" => stream).set(0.0);
        metrics::gauge!(name::STREAM_LIMIT_RATIO, "stream" => stream).set(0.0);
    }
}

/// A stream's state as last read: what it stores, and its byte limit (0: none).
pub struct StreamSampled {
    pub stream: &'static str,
    pub bytes: u64,
    pub messages: u64,
    pub max_bytes: i64,
}

impl StreamSampled {
    pub fn emit(self) {
        let ratio = if self.max_bytes > 0 { self.bytes as f64 / self.max_bytes as f64 } else { 0.0 };
        tracing::trace!(stream = self.stream, bytes = self.bytes, messages = self.messages, ratio, "stream sampled");
        metrics::gauge!(name::STREAM_STORED_BYTES, "stream" => self.stream).set(self.bytes as f64);
        metrics::gauge!(name::STREAM_LIMIT_RATIO, "stream" => self.stream).set(ratio);
        // Last: a reader that sees the new count sees the new size and ratio too.
        metrics::gauge!(name::STREAM_STORED_MESSAGES, "stream" => self.stream).set(self.messages as f64);
    }
}

/// What became of one message of a consumer group (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageOutcome {
    Ok,
    Retried,
    DeadLettered,
    DecodeError,
}

impl MessageOutcome {
    pub const ALL: [MessageOutcome; 4] = [Self::Ok, Self::Retried, Self::DeadLettered, Self::DecodeError];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Retried => "retried",
            Self::DeadLettered => "dead_lettered",
            Self::DecodeError => "decode_error",
        }
    }
}

/// Exports every series of consumer group `consumer` at zero, before its first message.
pub fn register_consumer(consumer: &str) {
    for outcome in MessageOutcome::ALL {
        metrics::counter!(name::WORKER_MESSAGES_TOTAL, "consumer" => consumer.to_owned(), "outcome" => outcome.as_str())
            .increment(0);
    }
    metrics::gauge!(name::WORKER_IN_FLIGHT_MESSAGES, "consumer" => consumer.to_owned()).set(0.0);
    metrics::gauge!(name::DLQ_DEPTH_MESSAGES, "consumer" => consumer.to_owned()).increment(0.0);
    metrics::gauge!(name::CONSUMER_PENDING_MESSAGES, "consumer" => consumer.to_owned()).increment(0.0);
    metrics::gauge!(name::CONSUMER_ACK_PENDING_MESSAGES, "consumer" => consumer.to_owned()).increment(0.0);
    // Registering is enough: the exporter renders a histogram with no observation yet.
    let _ = metrics::histogram!(name::WORKER_HANDLE_DURATION_SECONDS, "consumer" => consumer.to_owned());
}

/// A message settled: counted by outcome; a success also moves the group's last-success time.
pub struct MessageSettled<'a> {
    pub consumer: &'a str,
    pub stream_sequence: u64,
    pub outcome: MessageOutcome,
}

impl MessageSettled<'_> {
    pub fn emit(self) {
        tracing::debug!(
            consumer = self.consumer,
            seq = self.stream_sequence,
            outcome = self.outcome.as_str(),
            "message settled"
        );
        metrics::counter!(name::WORKER_MESSAGES_TOTAL, "consumer" => self.consumer.to_owned(), "outcome" => self.outcome.as_str())
            .increment(1);
        if self.outcome == MessageOutcome::Ok {
            metrics::gauge!(name::WORKER_LAST_SUCCESS_TIMESTAMP_SECONDS, "consumer" => self.consumer.to_owned())
                .set(OffsetDateTime::now_utc().unix_timestamp() as f64);
        }
    }
}

/// A message failed transiently and comes back after `retry_in`.
pub struct MessageRetried<'a> {
    pub consumer: &'a str,
    pub stream_sequence: u64,
    pub deliveries: i64,
    pub retry_in: Duration,
    pub error: &'a str,
}

impl MessageRetried<'_> {
    pub fn emit(self) {
        tracing::info!(consumer = self.consumer, seq = self.stream_sequence, deliveries = self.deliveries, retry_in = ?self.retry_in, error = self.error, "transient failure; retrying");
        metrics::counter!(name::WORKER_MESSAGES_TOTAL, "consumer" => self.consumer.to_owned(), "outcome" => MessageOutcome::Retried.as_str())
            .increment(1);
    }
}

/// A batch of `messages` was received and is being decoded and handled.
pub struct BatchReceived<'a> {
    pub consumer: &'a str,
    pub messages: usize,
}

impl BatchReceived<'_> {
    pub fn emit(self) {
        tracing::trace!(consumer = self.consumer, messages = self.messages, "batch received");
        metrics::gauge!(name::WORKER_IN_FLIGHT_MESSAGES, "consumer" => self.consumer.to_owned())
            .increment(self.messages as f64);
    }
}

/// A received message could not be decoded: it is dead-lettered and leaves the batch.
pub struct MessageUndecodable<'a> {
    pub consumer: &'a str,
    pub stream_sequence: u64,
    pub error: &'a str,
}

impl MessageUndecodable<'_> {
    pub fn emit(self) {
        tracing::warn!(consumer = self.consumer, seq = self.stream_sequence, error = self.error, "undecodable message");
        metrics::gauge!(name::WORKER_IN_FLIGHT_MESSAGES, "consumer" => self.consumer.to_owned()).decrement(1.0);
        MessageSettled {
            consumer: self.consumer,
            stream_sequence: self.stream_sequence,
            outcome: MessageOutcome::DecodeError,
        }
        .emit();
    }
}

/// The handler returned for a batch of `messages`, after `duration`.
pub struct BatchHandled<'a> {
    pub consumer: &'a str,
    pub messages: usize,
    pub duration: Duration,
}

impl BatchHandled<'_> {
    pub fn emit(self) {
        tracing::debug!(consumer = self.consumer, messages = self.messages, duration = ?self.duration, "batch handled");
        metrics::histogram!(name::WORKER_HANDLE_DURATION_SECONDS, "consumer" => self.consumer.to_owned())
            .record(self.duration.as_secs_f64());
    }
}

/// The batch's messages are settled: they are no longer in flight.
pub struct BatchSettled<'a> {
    pub consumer: &'a str,
    pub messages: usize,
}

impl BatchSettled<'_> {
    pub fn emit(self) {
        tracing::trace!(consumer = self.consumer, messages = self.messages, "batch settled");
        metrics::gauge!(name::WORKER_IN_FLIGHT_MESSAGES, "consumer" => self.consumer.to_owned())
            .decrement(self.messages as f64);
    }
}

/// The server's counts of a consumer group's main consumer, as last read.
pub struct ConsumerSampled<'a> {
    pub consumer: &'a str,
    pub pending: u64,
    pub ack_pending: usize,
}

impl ConsumerSampled<'_> {
    pub fn emit(self) {
        tracing::trace!(
            consumer = self.consumer,
            pending = self.pending,
            ack_pending = self.ack_pending,
            "consumer sampled"
        );
        metrics::gauge!(name::CONSUMER_PENDING_MESSAGES, "consumer" => self.consumer.to_owned())
            .set(self.pending as f64);
        metrics::gauge!(name::CONSUMER_ACK_PENDING_MESSAGES, "consumer" => self.consumer.to_owned())
            .set(self.ack_pending as f64);
    }
}

/// The dead letters of a consumer group, as last counted.
pub struct DlqSampled<'a> {
    pub consumer: &'a str,
    pub depth: u64,
}

impl DlqSampled<'_> {
    pub fn emit(self) {
        tracing::trace!(consumer = self.consumer, depth = self.depth, "dead letters sampled");
        metrics::gauge!(name::DLQ_DEPTH_MESSAGES, "consumer" => self.consumer.to_owned()).set(self.depth as f64);
    }
}

/// A consumer group started or stopped standing by (it is not its processor's executor).
pub struct StandbyChanged<'a> {
    pub consumer: &'a str,
    pub standing_by: bool,
}

impl StandbyChanged<'_> {
    pub fn emit(self) {
        if self.standing_by {
            tracing::info!(consumer = self.consumer, "not the executor: standing by");
        } else {
            tracing::info!(consumer = self.consumer, "no longer standing by");
        }
        metrics::gauge!(name::CONSUMER_STANDBY_STATE, "consumer" => self.consumer.to_owned())
            .set(if self.standing_by { 1.0 } else { 0.0 });
    }
}

/// A relay pass failed; the relay retries after `retry_in`.
pub struct RelayFailed<'a> {
    pub error: &'a dyn std::fmt::Display,
    pub retry_in: Duration,
}

impl RelayFailed<'_> {
    pub fn emit(self) {
        tracing::warn!(error = %self.error, retry_in = ?self.retry_in, "outbox relay failed; retrying");
        metrics::counter!(name::OUTBOX_RELAY_ERRORS_TOTAL).increment(1);
    }
}

/// A relay batch settled: `rows` outbox rows published and marked, in `duration`.
pub struct RelayBatchPublished {
    pub rows: usize,
    pub duration: Duration,
}

impl RelayBatchPublished {
    pub fn emit(self) {
        tracing::debug!(rows = self.rows, duration = ?self.duration, "outbox batch published");
        metrics::counter!(name::OUTBOX_PUBLISHED_TOTAL).increment(self.rows as u64);
        metrics::histogram!(name::OUTBOX_RELAY_BATCH_DURATION_SECONDS).record(self.duration.as_secs_f64());
    }
}

/// The outbox's backlog, as last read: unpublished rows and the age of the oldest (absent when
/// that read failed).
pub struct OutboxSampled {
    pub pending: Option<i64>,
    pub oldest_age_seconds: Option<f64>,
}

impl OutboxSampled {
    pub fn emit(self) {
        tracing::trace!(pending = ?self.pending, oldest_age_seconds = ?self.oldest_age_seconds, "outbox sampled");
        if let Some(n) = self.pending {
            metrics::gauge!(name::OUTBOX_PENDING_ROWS).set(n as f64);
        }
        if let Some(age) = self.oldest_age_seconds {
            metrics::gauge!(name::OUTBOX_OLDEST_PENDING_AGE_SECONDS).set(age);
        }
    }
}

/// Published outbox rows older than the retention were deleted.
pub struct OutboxPruned {
    pub rows: u64,
}

impl OutboxPruned {
    pub fn emit(self) {
        if self.rows > 0 {
            tracing::debug!(rows = self.rows, "outbox pruned");
        }
        metrics::counter!(name::OUTBOX_PRUNED_TOTAL).increment(self.rows);
    }
}

/// The value of a cutover flag that this process acts on; `changed` when it differs from the
/// value acted on before.
pub struct FlagObserved {
    pub flag: Flag,
    pub value: Executor,
    pub changed: bool,
}

impl FlagObserved {
    pub fn emit(self) {
        if self.changed {
            tracing::info!(flag = self.flag.as_str(), value = self.value.as_str(), "cutover flag");
        }
        for value in Executor::ALL {
            metrics::gauge!(name::CUTOVER_FLAG_STATE, "flag" => self.flag.as_str(), "value" => value.as_str())
                .set(if value == self.value { 1.0 } else { 0.0 });
        }
    }
}

/// A comparison round of `flag`'s shadow candidate recorded `comparisons`.
pub struct ComparisonsRecorded<'a> {
    pub flag: Flag,
    pub comparisons: &'a [Comparison],
}

impl ComparisonsRecorded<'_> {
    pub fn emit(self) {
        for c in self.comparisons {
            tracing::debug!(
                processor = processor(self.flag),
                result = c.result.as_str(),
                count = c.count,
                "shadow comparisons"
            );
            metrics::counter!(name::SHADOW_COMPARISONS_TOTAL, "processor" => processor(self.flag), "result" => c.result.as_str())
                .increment(c.count.max(0) as u64);
        }
    }
}

/// The size of this process's executable, read once at start-up (the guide's "binary size"
/// trigger of a split reads it).
pub struct BinarySizeRead {
    pub bytes: u64,
}

impl BinarySizeRead {
    pub fn emit(self) {
        tracing::debug!(bytes = self.bytes, "executable size");
        metrics::gauge!(name::BUILD_BINARY_SIZE_BYTES).set(self.bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_of_the_runtime_follows_the_scheme() {
        for name in NAMES {
            check_name(name).unwrap();
        }
    }

    #[test]
    fn names_without_an_area_a_what_or_a_unit_are_refused() {
        for bad in [
            "outbox_pending_rows",
            "trellis_outbox_pending",
            "trellis_rows",
            "trellis_outbox_rows",
            "trellis_Outbox_pending_rows",
            "trellis__pending_rows",
        ] {
            assert!(check_name(bad).is_err(), "{bad} passed");
        }
        check_name("trellis_outbox_pending_rows").unwrap();
    }
}
