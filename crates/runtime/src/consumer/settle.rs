//! Settling a handled message: ack, nak with exponential backoff, or dead-letter and term.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use backon::BackoffBuilder;
use time::OffsetDateTime;

use super::{ConsumerGroup, Delivery, Feed, Handler, Outcome, RunnerConfig};
use crate::dlq::ErrorKind;
use crate::instrument::{MessageOutcome, MessageRetried, MessageSettled};

impl RunnerConfig {
    /// The delay before delivery number `deliveries + 1` (exponential with jitter).
    pub fn retry_delay(&self, deliveries: i64) -> Duration {
        let n = usize::try_from(deliveries.saturating_sub(1)).unwrap_or(0);
        backon::ExponentialBuilder::default()
            .with_min_delay(self.retry_min)
            .with_max_delay(self.retry_max)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(n)
            .unwrap_or(self.retry_max)
    }
}

impl<H: Handler> ConsumerGroup<H> {
    pub(super) async fn settle(&self, m: &jetstream::Message, d: &Delivery, outcome: Outcome, feed: Feed) {
        let count =
            |outcome| MessageSettled { consumer: &self.spec.name, stream_sequence: d.stream_sequence, outcome }.emit();
        match outcome {
            Outcome::Done => {
                let acked = if self.config.double_ack { m.double_ack().await } else { m.ack().await };
                if let Err(e) = acked {
                    tracing::warn!(consumer = %self.spec.name, error = %e, "ack failed; the message will be redelivered");
                }
                count(MessageOutcome::Ok);
                if d.deliveries > 1 {
                    self.first_failures.take((feed, d.stream_sequence));
                }
            }
            Outcome::Retry(e) if d.deliveries < self.config.max_deliver => {
                let delay = self.config.retry_delay(d.deliveries);
                self.first_failures.record((feed, d.stream_sequence), OffsetDateTime::now_utc());
                let _ = m.ack_with(AckKind::Nak(Some(delay))).await;
                MessageRetried {
                    consumer: &self.spec.name,
                    stream_sequence: d.stream_sequence,
                    deliveries: d.deliveries,
                    retry_in: delay,
                    error: &e,
                }
                .emit();
            }
            Outcome::Retry(e) => {
                self.dead_letter(m, feed, ErrorKind::Transient, &e).await;
                count(MessageOutcome::DeadLettered);
            }
            Outcome::Reject(e) => {
                self.dead_letter(m, feed, ErrorKind::Permanent, &e).await;
                count(MessageOutcome::DeadLettered);
            }
        }
    }
}

/// When each still-failing message first failed, for the `Trellis-First-Failure` header. Kept in
/// memory (a restart forgets it: the header then shows the failure this replica saw first) and
/// bounded.
#[derive(Default)]
pub(super) struct FirstFailures(std::sync::Mutex<HashMap<(Feed, u64), OffsetDateTime>>);

impl FirstFailures {
    const LIMIT: usize = 100_000;

    pub(super) fn record(&self, key: (Feed, u64), now: OffsetDateTime) {
        let mut map = self.0.lock().expect("first failures lock");
        if map.len() >= Self::LIMIT {
            map.clear();
        }
        map.entry(key).or_insert(now);
    }

    pub(super) fn take(&self, key: (Feed, u64)) -> Option<OffsetDateTime> {
        self.0.lock().expect("first failures lock").remove(&key)
    }
}
