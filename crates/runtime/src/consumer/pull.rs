//! Pulling: pull requests, the batch window across them, and handing a batch to the handler.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;
use trellis_domain::events::Envelope;

use super::handler::panic_text;
use super::{ConsumerGroup, Delivery, Handler, Outcome, PullConsumer, Source};
use crate::dlq::{self, ErrorKind};

impl<H: Handler> ConsumerGroup<H> {
    pub(super) async fn pull_loop(self: Arc<Self>, consumer: PullConsumer, source: Source, stop: CancellationToken) {
        let mut failures = 0u32;
        // The batch being gathered, and when its window closes (set by its first message).
        let mut held: Vec<jetstream::Message> = Vec::with_capacity(self.config.batch_size);
        let mut closes: Option<Instant> = None;
        let mut gate = self.gate.clone();
        while !stop.is_cancelled() {
            if gate.as_ref().is_some_and(|g| !*g.borrow()) {
                if !held.is_empty() {
                    self.process(std::mem::take(&mut held), source).await;
                    closes = None;
                }
                if !self.until_executor(&mut gate, &stop).await {
                    return;
                }
            }
            // A held batch's window is a timer of its own (below), not the pull's expiry.
            // No idle heartbeats: async-nats 0.51's `Batch` answers a heartbeat with
            // `Poll::Pending` without registering a waker, so the stream stalls until its own
            // timer (expiry + 5 s) and drops what arrived meanwhile — a message delivered to an
            // idle pull would wait for `ack_wait` to be redelivered. The server's expiry (408)
            // and that timer end a pull just as well.
            let batch = consumer
                .batch()
                .max_messages(self.config.batch_size - held.len())
                .expires(self.config.fetch_expiry)
                .messages()
                .await;
            let batch = match batch {
                Ok(b) => {
                    failures = 0;
                    if source == Source::Main {
                        self.pulling.send_replace(true);
                    }
                    b
                }
                Err(e) => {
                    failures += 1;
                    let delay = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                    tracing::warn!(consumer = %self.spec.name, error = %e, retry_in = ?delay, "pull request failed");
                    if !held.is_empty() {
                        self.process(std::mem::take(&mut held), source).await;
                        closes = None;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = stop.cancelled() => return,
                    }
                }
            };
            let mut chunks = batch.ready_chunks(self.config.batch_size);
            loop {
                let window = async {
                    match closes {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                let chunk = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    _ = window => None,
                    chunk = chunks.next() => match chunk {
                        Some(chunk) => Some(chunk),
                        None => break,
                    },
                };
                if let Some(chunk) = chunk {
                    held.extend(chunk.into_iter().filter_map(|m| match m {
                        Ok(m) => Some(m),
                        Err(e) => {
                            tracing::debug!(consumer = %self.spec.name, error = %e, "pull batch ended");
                            None
                        }
                    }));
                    if !held.is_empty() && closes.is_none() {
                        closes = Some(Instant::now() + self.config.batch_window);
                    }
                }
                let full = held.len() >= self.config.batch_size;
                if !held.is_empty() && (full || closes.is_some_and(|at| Instant::now() >= at)) {
                    self.process(std::mem::take(&mut held), source).await;
                    closes = None;
                }
            }
            if stop.is_cancelled() {
                // The batch being gathered and the rest of the pull in hand are finished too.
                // The server already counts every message of this pull that arrived as
                // delivered to this replica; handing them back (nak) would redeliver them to
                // another one, which is what a graceful stop must not do. `ready_chunks`
                // splits a pull by arrival timing, so "the chunk being handled" is not the batch.
                while let Some(Some(chunk)) = chunks.next().now_or_never() {
                    held.extend(chunk.into_iter().filter_map(Result::ok));
                }
                if !held.is_empty() {
                    self.process(std::mem::take(&mut held), source).await;
                }
            }
        }
    }

    async fn process(&self, messages: Vec<jetstream::Message>, source: Source) {
        let consumer = self.spec.name.clone();
        let in_flight = metrics::gauge!("trellis_worker_in_flight_messages", "consumer" => consumer.clone());
        in_flight.increment(messages.len() as f64);
        let mut deliveries = Vec::with_capacity(messages.len());
        let mut decoded = Vec::with_capacity(messages.len());
        for m in messages {
            match self.decode(&m, source) {
                Ok(d) => {
                    deliveries.push(d);
                    decoded.push(m);
                }
                Err(e) => {
                    metrics::counter!("trellis_worker_messages_total", "consumer" => consumer.clone(), "outcome" => "decode_error").increment(1);
                    self.dead_letter(&m, source, ErrorKind::Decode, &e).await;
                    in_flight.decrement(1.0);
                }
            }
        }
        if deliveries.is_empty() {
            return;
        }
        let started = Instant::now();
        // Long handlers keep their messages alive, so JetStream does not redeliver mid-way.
        let keep_alive = async {
            let mut tick = tokio::time::interval(self.config.ack_wait / 3);
            tick.tick().await;
            loop {
                tick.tick().await;
                for m in &decoded {
                    let _ = m.ack_with(AckKind::Progress).await;
                }
            }
        };
        let handled = AssertUnwindSafe(self.handler.handle(&deliveries)).catch_unwind();
        let outcomes = tokio::select! {
            outcomes = handled => outcomes,
            _ = keep_alive => unreachable!("the keep-alive loop never ends"),
        };
        let outcomes = match outcomes {
            Ok(o) if o.len() == deliveries.len() => o,
            Ok(o) => {
                let e = format!("handler returned {} outcomes for {} messages", o.len(), deliveries.len());
                vec![Outcome::Retry(e); deliveries.len()]
            }
            Err(panic) => vec![Outcome::Retry(format!("handler panicked: {}", panic_text(&panic))); deliveries.len()],
        };
        metrics::histogram!("trellis_worker_handle_duration_seconds", "consumer" => consumer.clone())
            .record(started.elapsed().as_secs_f64());
        let acts =
            decoded.iter().zip(&deliveries).zip(outcomes).map(|((m, d), outcome)| self.settle(m, d, outcome, source));
        futures::future::join_all(acts).await;
        in_flight.decrement(deliveries.len() as f64);
    }

    fn decode(&self, m: &jetstream::Message, source: Source) -> Result<Delivery, String> {
        let info = m.info().map_err(|e| format!("not a JetStream message: {e}"))?;
        let envelope: Envelope =
            serde_json::from_slice(&m.payload).map_err(|e| format!("payload is not an event envelope: {e}"))?;
        let subject = self.original_subject(m.subject.as_str(), source);
        Ok(Delivery {
            subject,
            envelope,
            stream_sequence: info.stream_sequence,
            deliveries: info.delivered,
            replays: dlq::replay_count(m.headers.as_ref()),
        })
    }
}
