//! Pulling: pull requests, the batch window across them, and handing a batch to the handler.
//!
//! A pull request is polled until it ends, also while the handler works on an earlier part of
//! it. async-nats 0.51 ends a pull (its `Batch` stream) the first time it is polled after its
//! own timer, the expiry plus 5 s, has fired, whatever is still in its subscription buffer:
//! the messages the server sent in that pull meanwhile are dropped unhandled, and the server,
//! which counts them as delivered to this replica, redelivers them only after `ack_wait`, each
//! one delivery closer to the DLQ. So the messages that arrive while a batch is handled are
//! gathered for the next batch (and kept alive with in-progress acks, like the batch in hand).
//!
//! A pulling loop (one per consumer of a group: main and replay) holds at most `batch_size`
//! messages: a pull asks for what the batch being gathered still lacks, and the next pull is
//! made only once the last one has ended and no batch is being handled, so the messages being
//! handled, those gathered and those the pull may still bring are never more than one batch.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull::Batch;
use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use trellis_domain::events::Envelope;

use super::handler::panic_text;
use super::{ConsumerGroup, Delivery, Feed, Handler, Outcome, PullConsumer};
use crate::dlq::{self, ErrorKind};
use crate::instrument::{BatchHandled, BatchReceived, BatchSettled, MessageUndecodable};
use crate::trace::TraceHeaders;

/// The batch being gathered: the messages that have arrived, and when its window closes (set
/// by its first message).
struct Gathering {
    messages: Vec<jetstream::Message>,
    closes: Option<Instant>,
}

impl Gathering {
    fn new(batch_size: usize) -> Self {
        Self { messages: Vec::with_capacity(batch_size), closes: None }
    }

    fn push(&mut self, message: jetstream::Message, window: Duration) {
        if self.messages.is_empty() {
            self.closes = Some(Instant::now() + window);
        }
        self.messages.push(message);
    }

    fn take(&mut self) -> Vec<jetstream::Message> {
        self.closes = None;
        std::mem::take(&mut self.messages)
    }

    fn window_closed(&self) -> bool {
        self.closes.is_some_and(|at| Instant::now() >= at)
    }

    /// Resolves when the window closes; never while nothing is gathered.
    async fn window(&self) {
        match self.closes {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => std::future::pending().await,
        }
    }
}

/// The next message of the pull in hand; `None` once it has ended (it is then dropped).
/// Never resolves without a pull.
async fn next_of(pull: &mut Option<Batch>) -> Option<jetstream::Message> {
    loop {
        let Some(batch) = pull.as_mut() else { return std::future::pending().await };
        match batch.next().await {
            Some(Ok(m)) => return Some(m),
            Some(Err(e)) => tracing::debug!(error = %e, "pull request ended by the server"),
            None => {
                *pull = None;
                return None;
            }
        }
    }
}

/// Moves what the pull in hand has already received into `gathering`, without waiting.
///
/// Outside tokio's cooperative budget: each receive spends one unit of the task's budget (128
/// a turn), and a receive over budget answers `Pending` (its wake-up going to `now_or_never`'s
/// waker, which does nothing). The gathering then stopped every 128 messages and the task
/// yielded its turn: batches of 65 on average and a third of the drain rate. What is drained
/// here is bounded by the pull in hand (at most a batch), so nothing else starves.
fn take_arrived(pull: &mut Option<Batch>, gathering: &mut Gathering, window: Duration) {
    while let Some(Some(m)) = tokio::task::unconstrained(next_of(pull)).now_or_never() {
        gathering.push(m, window);
    }
}

impl<H: Handler> ConsumerGroup<H> {
    pub(super) async fn pull_loop(self: Arc<Self>, consumer: PullConsumer, feed: Feed, stop: CancellationToken) {
        let mut failures = 0u32;
        let window = self.config.batch_window;
        let mut gathering = Gathering::new(self.config.batch_size);
        let mut pull: Option<Batch> = None;
        let mut gate = self.gate.clone();
        loop {
            let stopping = stop.is_cancelled();
            if stopping {
                // Every message of the pull in hand that has arrived is handled: the server
                // counts it as delivered to this replica, and handing it back (nak) would
                // redeliver it to another one, which is what a graceful stop must not do.
                take_arrived(&mut pull, &mut gathering, window);
            }
            let executor = gate.as_ref().is_none_or(|g| *g.borrow());
            let due = stopping
                || gathering.messages.len() >= self.config.batch_size
                || gathering.window_closed()
                || (pull.is_none() && !executor);
            if !gathering.messages.is_empty() && due {
                let batch = gathering.take();
                self.handle_while_pulling(batch, feed, &mut pull, &mut gathering).await;
                continue;
            }
            if stopping {
                return;
            }
            if pull.is_none() {
                if !executor {
                    if !self.until_executor(&mut gate, &stop).await {
                        return;
                    }
                    continue;
                }
                // No idle heartbeats: async-nats 0.51's `Batch` answers a heartbeat with
                // `Poll::Pending` without registering a waker, so the stream stalls until its own
                // timer and drops what arrived meanwhile. The server's expiry (408) and that
                // timer end a pull just as well.
                let requested = consumer
                    .batch()
                    .max_messages(self.config.batch_size - gathering.messages.len())
                    .expires(self.config.fetch_expiry)
                    .messages()
                    .await;
                match requested {
                    Ok(batch) => {
                        failures = 0;
                        if feed == Feed::Main {
                            self.pulling.send_replace(true);
                        }
                        pull = Some(batch);
                    }
                    Err(e) => {
                        failures += 1;
                        let delay = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                        tracing::warn!(consumer = %self.spec.name, error = %e, retry_in = ?delay, "pull request failed");
                        if !gathering.messages.is_empty() {
                            let batch = gathering.take();
                            self.handle_while_pulling(batch, feed, &mut pull, &mut gathering).await;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = stop.cancelled() => {}
                        }
                    }
                }
                continue;
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => {}
                _ = gathering.window() => {}
                next = next_of(&mut pull) => {
                    if let Some(m) = next {
                        gathering.push(m, window);
                        // What has arrived together goes together: a zero window hands over
                        // every message already received, not the first one alone.
                        take_arrived(&mut pull, &mut gathering, window);
                    }
                }
            }
        }
    }

    /// Handles `batch` while the pull in hand goes on: what it brings meanwhile is gathered
    /// for the next batch and kept alive with in-progress acks, as the batch is.
    async fn handle_while_pulling(
        &self,
        batch: Vec<jetstream::Message>,
        feed: Feed,
        pull: &mut Option<Batch>,
        gathering: &mut Gathering,
    ) {
        let handled = self.process(batch, feed);
        tokio::pin!(handled);
        let mut keep_alive = tokio::time::interval(self.config.ack_wait / 3);
        keep_alive.tick().await;
        loop {
            tokio::select! {
                biased;
                () = &mut handled => return,
                _ = keep_alive.tick() => {
                    for m in &gathering.messages {
                        let _ = m.ack_with(AckKind::Progress).await;
                    }
                }
                next = next_of(pull) => {
                    if let Some(m) = next {
                        gathering.push(m, self.config.batch_window);
                    }
                }
            }
        }
    }

    async fn process(&self, messages: Vec<jetstream::Message>, feed: Feed) {
        let consumer = self.spec.name.as_str();
        BatchReceived { consumer, messages: messages.len() }.emit();
        let mut deliveries = Vec::with_capacity(messages.len());
        let mut decoded = Vec::with_capacity(messages.len());
        for m in messages {
            match self.decode(&m, feed) {
                Ok(d) => {
                    deliveries.push(d);
                    decoded.push(m);
                }
                Err(e) => {
                    let stream_sequence = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                    self.dead_letter(&m, feed, ErrorKind::Decode, &e).await;
                    MessageUndecodable { consumer, stream_sequence, error: &e }.emit();
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
        let batch_span = self.batch_span(&decoded, deliveries.len());
        let handled = AssertUnwindSafe(self.handler.handle(&deliveries)).catch_unwind().instrument(batch_span);
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
        BatchHandled { consumer, messages: deliveries.len(), duration: started.elapsed() }.emit();
        let acts = decoded
            .iter()
            .zip(&deliveries)
            .zip(outcomes)
            .map(|((m, d), outcome)| self.settle(m, d, outcome, feed).instrument(d.span.clone()));
        futures::future::join_all(acts).await;
        BatchSettled { consumer, messages: deliveries.len() }.emit();
    }

    fn decode(&self, m: &jetstream::Message, feed: Feed) -> Result<Delivery, String> {
        let info = m.info().map_err(|e| format!("not a JetStream message: {e}"))?;
        let envelope: Envelope =
            serde_json::from_slice(&m.payload).map_err(|e| format!("payload is not an event envelope: {e}"))?;
        let subject = self.original_subject(m.subject.as_str(), feed);
        let span = tracing::info_span!(
            parent: None,
            "process",
            otel.name = %format_args!("process {subject}"),
            otel.kind = "consumer",
            messaging.system = "nats",
            messaging.operation.type = "process",
            messaging.destination.name = %m.subject,
            messaging.consumer.group.name = %self.spec.name,
            messaging.message.id = %envelope.id.0,
            messaging.nats.message.delivery_count = info.delivered,
            messaging.nats.stream_sequence = info.stream_sequence,
        );
        let trace = TraceHeaders::from_nats(m.headers.as_ref()).filter(|t| t.span_context().is_some());
        if let Some(sc) = trace.as_ref().and_then(TraceHeaders::span_context) {
            crate::trace::relate(&span, &sc, crate::trace::consumer_parent());
        }
        // A replay links to the delivery that failed.
        if let Some(failed) = dlq::failed_trace(m.headers.as_ref()).and_then(|t| t.span_context()) {
            crate::trace::link(&span, &failed);
        }
        let span = crate::trace::started(span);
        Ok(Delivery {
            subject,
            envelope,
            stream_sequence: info.stream_sequence,
            deliveries: info.delivered,
            replays: dlq::replay_count(m.headers.as_ref()),
            span,
            trace,
        })
    }

    /// The span a batch is handled in: linked to the trace context of every message in it.
    fn batch_span(&self, messages: &[jetstream::Message], size: usize) -> tracing::Span {
        let span = tracing::info_span!(
            parent: None,
            "process batch",
            otel.name = %format_args!("process batch {}", self.spec.name),
            otel.kind = "consumer",
            messaging.system = "nats",
            messaging.operation.type = "process",
            messaging.consumer.group.name = %self.spec.name,
            messaging.batch.message_count = size,
        );
        for m in messages {
            if let Some(sc) = TraceHeaders::from_nats(m.headers.as_ref()).and_then(|t| t.span_context()) {
                crate::trace::link(&span, &sc);
            }
        }
        crate::trace::started(span)
    }
}
