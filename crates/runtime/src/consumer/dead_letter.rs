//! Dead-lettering a message: its DLQ copy is acknowledged before the original is terminated.

use async_nats::jetstream::{self, AckKind};
use time::OffsetDateTime;

use super::{ConsumerGroup, Feed, Handler};
use crate::dlq::{self, DeadLetter, ErrorKind};

impl<H: Handler> ConsumerGroup<H> {
    /// Publishes the DLQ copy, waits for its ack, then terminates the original. If the DLQ is
    /// unreachable the original is nak'ed instead, so it is never lost.
    pub(super) async fn dead_letter(&self, m: &jetstream::Message, feed: Feed, kind: ErrorKind, error: &str) {
        let (stream, seq, deliveries) = match m.info() {
            Ok(i) => (i.stream.to_owned(), i.stream_sequence, i.delivered),
            Err(_) => (String::new(), 0, 0),
        };
        let now = OffsetDateTime::now_utc();
        let letter = DeadLetter {
            consumer: &self.spec.name,
            original_subject: &self.original_subject(m.subject.as_str(), feed),
            first_failure: self.first_failures.take((feed, seq)).unwrap_or(now),
            stream: &stream,
            stream_sequence: seq,
            deliveries,
            kind,
            error,
            host: &self.ctx.host,
            version: &self.ctx.version,
            now,
            // Settling runs in the delivery's process span; an undecodable message has none.
            trace: crate::trace::TraceHeaders::current(),
        };
        match dlq::publish(&self.ctx.js, &self.ctx.topology, &letter, m.headers.as_ref(), m.payload.clone()).await {
            Ok(()) => {
                tracing::warn!(consumer = %self.spec.name, seq, kind = kind.as_str(), %error, "message dead-lettered");
                let _ = m.ack_with(AckKind::Term).await;
            }
            Err(e) => {
                tracing::error!(consumer = %self.spec.name, seq, error = %e, "publishing to the DLQ failed; the message stays");
                let _ = m.ack_with(AckKind::Nak(Some(self.config.retry_max))).await;
            }
        }
    }
}
