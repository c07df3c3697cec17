//! The MAX_DELIVERIES safety net: a message delivered `max_deliver` times without an outcome
//! (the process died each time) is read back from its stream and dead-lettered.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use futures::StreamExt;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::{ConsumerGroup, Feed, Handler, PullConsumer};
use crate::dlq::{self, DeadLetter, ErrorKind};
use crate::instrument::{MessageOutcome, MessageSettled};

impl<H: Handler> ConsumerGroup<H> {
    /// The safety net: a MAX_DELIVERIES advisory for this group means a message was delivered
    /// `max_deliver` times without any outcome (the process died each time). Its original is
    /// read back from its stream and dead-lettered.
    pub(super) async fn advisory_loop(self: Arc<Self>, consumer: PullConsumer, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let batch = consumer.batch().max_messages(64).expires(self.config.fetch_expiry).messages().await;
            let Ok(mut batch) = batch else {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.cancelled() => return,
                }
            };
            loop {
                let next = tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    next = batch.next() => next,
                };
                let Some(Ok(advisory)) = next else { break };
                match self.rescue(&advisory.payload).await {
                    Ok(()) => {
                        let _ = advisory.ack().await;
                    }
                    Err(e) => {
                        tracing::warn!(consumer = %self.spec.name, error = %e, "handling a MAX_DELIVERIES advisory failed");
                        let _ = advisory.ack_with(AckKind::Nak(Some(Duration::from_secs(5)))).await;
                    }
                }
            }
        }
    }

    async fn rescue(&self, advisory: &[u8]) -> anyhow::Result<()> {
        #[derive(serde::Deserialize)]
        struct MaxDeliveries {
            stream: String,
            stream_seq: u64,
            deliveries: i64,
        }
        let a: MaxDeliveries = serde_json::from_slice(advisory)?;
        let stream = self.ctx.js.get_stream(&a.stream).await?;
        let original = match stream.get_raw_message(a.stream_seq).await {
            Ok(m) => m,
            // Gone already (aged out or purged): nothing left to save.
            Err(e) if e.kind() == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let feed = if a.stream == self.ctx.topology.replay_stream() { Feed::Replay } else { Feed::Main };
        let error =
            format!("delivered {} times without an outcome: the worker died or hung on every delivery", a.deliveries);
        let now = OffsetDateTime::now_utc();
        let letter = DeadLetter {
            consumer: &self.spec.name,
            original_subject: &self.original_subject(original.subject.as_str(), feed),
            first_failure: self.first_failures.take((feed, a.stream_seq)).unwrap_or(now),
            stream: &a.stream,
            stream_sequence: a.stream_seq,
            deliveries: a.deliveries,
            kind: ErrorKind::MaxDeliveries,
            error: &error,
            host: &self.ctx.host,
            version: &self.ctx.version,
            now,
            trace: None,
        };
        dlq::publish(&self.ctx.js, &self.ctx.topology, &letter, Some(&original.headers), original.payload.clone())
            .await?;
        MessageSettled {
            consumer: &self.spec.name,
            stream_sequence: a.stream_seq,
            outcome: MessageOutcome::DeadLettered,
        }
        .emit();
        tracing::warn!(consumer = %self.spec.name, seq = a.stream_seq, "message rescued from MAX_DELIVERIES into the DLQ");
        Ok(())
    }
}
