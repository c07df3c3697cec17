//! The consumer-group runner: drives a processor's handler from its durable pull consumer,
//! its replay consumer and the MAX_DELIVERIES safety net (DESIGN.md §3).
//!
//! | handler says | runner does |
//! |---|---|
//! | `Done` | ack (double-ack if the group asks for it) |
//! | `Retry` | nak with exponential backoff and jitter; at `max_deliver` → DLQ, then term |
//! | `Reject` | DLQ at once, then term |
//! | undecodable payload | DLQ at once (kind `decode`), then term |
//! | panic | caught; counted as `Retry` |
//!
//! The DLQ copy is published and acknowledged before the original is terminated, and its
//! `Nats-Msg-Id` is derived from the original's stream and sequence, so a crash in between
//! cannot dead-letter it twice (within the DLQ's duplicate window).

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer};
use backon::BackoffBuilder;
use futures::{FutureExt, StreamExt};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use trellis_domain::events::Envelope;

use crate::dlq::{self, DeadLetter, ErrorKind};
use crate::nats::Topology;

/// What a handler decided for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The effect is durable: acknowledge.
    Done,
    /// A transient failure (database down, timeout): try again later.
    Retry(String),
    /// A permanent failure (validation, unknown type or version): dead-letter now.
    Reject(String),
}

/// One decoded message handed to a handler.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The subject the event was published on, without the deployment prefix (for a replay,
    /// the original subject, not the replay subject).
    pub subject: String,
    pub envelope: Envelope,
    pub stream_sequence: u64,
    /// 1 on the first delivery.
    pub deliveries: i64,
    /// How many times this message was replayed from the DLQ (0 if never).
    pub replays: u32,
}

/// A handler of batches: one outcome per delivery, in order.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, batch: &[Delivery]) -> impl Future<Output = Vec<Outcome>> + Send;
}

/// A handler of one message at a time.
pub trait MessageHandler: Send + Sync + 'static {
    fn handle_one(&self, delivery: &Delivery) -> impl Future<Output = Outcome> + Send;
}

/// Runs a [`MessageHandler`] over a batch with bounded concurrency; a panic fails only its
/// own message.
pub struct EachMessage<H> {
    pub handler: H,
    pub concurrency: usize,
}

impl<H: MessageHandler> Handler for EachMessage<H> {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let each: Vec<_> = batch.iter().map(|d| self.one(d)).collect();
        futures::stream::iter(each).buffered(self.concurrency.max(1)).collect().await
    }
}

impl<H: MessageHandler> EachMessage<H> {
    async fn one(&self, delivery: &Delivery) -> Outcome {
        match AssertUnwindSafe(self.handler.handle_one(delivery)).catch_unwind().await {
            Ok(outcome) => outcome,
            Err(panic) => Outcome::Retry(format!("handler panicked: {}", panic_text(&panic))),
        }
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

/// How a consumer group pulls and retries.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Messages per pull request, and the most a handler sees at once.
    pub batch_size: usize,
    /// How long a batch may wait for more messages after its first one arrived, across pull
    /// requests, before it goes to the handler (it goes at once when it is full). Zero hands
    /// over whatever has arrived. A batch handler that coalesces (the search projector) wants
    /// a few tens of milliseconds here.
    pub batch_window: Duration,
    /// Deliveries before a failing message goes to the DLQ.
    pub max_deliver: i64,
    /// How long the server waits for an ack before redelivering.
    pub ack_wait: Duration,
    /// Unacknowledged messages the server lets this group hold (all replicas together).
    pub max_ack_pending: i64,
    /// How long one pull request waits for messages (and, for a gated group, how long the old
    /// executor may go on after a flip).
    pub fetch_expiry: Duration,
    /// Smallest and largest retry delay (exponential, with jitter).
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Ack with a server confirmation (double ack) instead of fire-and-forget.
    pub double_ack: bool,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            batch_window: Duration::ZERO,
            max_deliver: 5,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 4096,
            fetch_expiry: Duration::from_secs(5),
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            double_ack: false,
        }
    }
}

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

/// Where a group runs: JetStream, names and the identity written into dead letters.
#[derive(Clone)]
pub struct RunnerContext {
    pub js: jetstream::Context,
    pub topology: Topology,
    pub host: String,
    pub version: String,
}

/// The durable consumer of a processor: its name and its one filter subject (both without the
/// deployment prefix).
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub name: String,
    pub filter_subject: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("JetStream request for consumer {consumer} failed: {message}")]
    Request { consumer: String, message: String },
    #[error(
        "consumer {consumer} on {stream}: the server did not keep the configuration asked for ({field}: asked {asked}, \
         got {got}); nats-server 2.9 silently ignores some settings (e.g. filter_subjects) — upgrade it or change the \
         consumer"
    )]
    Mismatch { consumer: String, stream: String, field: &'static str, asked: String, got: String },
    #[error("consumer {consumer} on {stream}: the server refused its configuration: {message}")]
    Refused { consumer: String, stream: String, message: String },
}

/// The values of `trellis_worker_messages_total{outcome}`.
pub const OUTCOMES: &[&str] = &["ok", "retried", "dead_lettered", "decode_error"];

/// One processor's consumer group: the runner of its main consumer, its replay consumer and
/// its MAX_DELIVERIES watchers. Every replica of a worker runs one with the same spec.
pub struct ConsumerGroup<H> {
    ctx: RunnerContext,
    spec: ConsumerSpec,
    config: RunnerConfig,
    handler: Arc<H>,
    bound: Arc<AtomicBool>,
    pulling: tokio::sync::watch::Sender<bool>,
    first_failures: FirstFailures,
    /// While closed, this process is not the executor: it does not pull (see [`Self::gated`]).
    gate: Option<tokio::sync::watch::Receiver<bool>>,
    standing_by: Arc<AtomicBool>,
    /// Whether a new main consumer starts at the stream's end rather than its start.
    new_messages_only: bool,
}

/// A pulling loop's source: the main consumer or the replay consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    Main,
    Replay,
}

impl<H: Handler> ConsumerGroup<H> {
    pub fn new(ctx: RunnerContext, spec: ConsumerSpec, config: RunnerConfig, handler: Arc<H>) -> Self {
        Self {
            ctx,
            spec,
            config,
            handler,
            bound: Arc::new(AtomicBool::new(false)),
            pulling: tokio::sync::watch::Sender::new(false),
            first_failures: FirstFailures::default(),
            gate: None,
            standing_by: Arc::new(AtomicBool::new(false)),
            new_messages_only: false,
        }
    }

    /// A main consumer created by this group delivers only the messages published after its
    /// creation (a shadow candidate's copy starts when its period does, not with the
    /// stream's history).
    pub fn new_messages_only(mut self) -> Self {
        self.new_messages_only = true;
        self
    }

    /// Deletes the group's durable consumers (main, replay and the two MAX_DELIVERIES
    /// watchers); an absent one is not an error. For a shadow candidate whose period ended: the
    /// next period starts afresh instead of with the backlog of the gap.
    pub async fn delete_consumers(&self) -> Result<(), ConsumerError> {
        let t = &self.ctx.topology;
        let durable = self.durable();
        for (stream, name) in [
            (t.events_stream(), durable.clone()),
            (t.replay_stream(), durable.clone()),
            (t.advisory_stream(), durable.clone()),
            (t.advisory_stream(), format!("{durable}-replays")),
        ] {
            let request =
                |e: &dyn std::fmt::Display| ConsumerError::Request { consumer: name.clone(), message: e.to_string() };
            let s = self.ctx.js.get_stream(&stream).await.map_err(|e| request(&e))?;
            match s.delete_consumer(&name).await {
                Ok(_) => {}
                Err(e) => match e.kind() {
                    jetstream::stream::ConsumerErrorKind::JetStream(j)
                        if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND => {}
                    _ => return Err(request(&e)),
                },
            }
        }
        self.bound.store(false, Ordering::Release);
        Ok(())
    }

    /// Pulls only while `gate` is open (the cutover flag names this process the executor).
    /// When it closes, the group makes no new pull request: it finishes the pull in hand and
    /// waits (`trellis_consumer_standing_by{consumer}` says so). Until the gate first opens,
    /// the consumers are not even declared. The pull in hand lasts at most `fetch_expiry`,
    /// which bounds the overlap with the new executor; the handler's idempotency absorbs it.
    /// The pull in hand is finished rather than handed back (nak):
    /// every hand-back would raise the messages' delivery count, and rapid flips could push a
    /// healthy message to `max_deliver` and the DLQ.
    pub fn gated(mut self, gate: tokio::sync::watch::Receiver<bool>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// True while the group waits for its gate to open (for `/readyz`: standing by is ready).
    pub fn standing_by_flag(&self) -> Arc<AtomicBool> {
        self.standing_by.clone()
    }

    /// Waits until the gate is open (at once without a gate); false if `stop` came first.
    async fn until_executor(
        &self,
        gate: &mut Option<tokio::sync::watch::Receiver<bool>>,
        stop: &CancellationToken,
    ) -> bool {
        let Some(gate) = gate else { return true };
        if *gate.borrow_and_update() {
            return true;
        }
        self.standing_by.store(true, Ordering::Release);
        metrics::gauge!("trellis_consumer_standing_by", "consumer" => self.spec.name.clone()).set(1.0);
        tracing::info!(consumer = %self.spec.name, "not the executor: standing by");
        let open = tokio::select! {
            open = gate.wait_for(|open| *open) => open.is_ok(),
            _ = stop.cancelled() => false,
        };
        self.standing_by.store(false, Ordering::Release);
        metrics::gauge!("trellis_consumer_standing_by", "consumer" => self.spec.name.clone()).set(0.0);
        if open {
            tracing::info!(consumer = %self.spec.name, "the executor: pulling");
        }
        open
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// True once every consumer is declared and verified (for `/readyz`).
    pub fn bound_flag(&self) -> Arc<AtomicBool> {
        self.bound.clone()
    }

    /// Turns true once the first pull request on the main consumer has been sent: from then on,
    /// a message waiting in the stream is on its way to this group. A scheduler over several
    /// groups uses it to start them in order.
    pub fn pulling(&self) -> tokio::sync::watch::Receiver<bool> {
        self.pulling.subscribe()
    }

    /// Exports every series of this group at zero before the first message, so that a scrape
    /// (and an alert on a rate or an absent series) sees the group from its start.
    fn initialise_series(&self) {
        let consumer = self.spec.name.clone();
        for outcome in OUTCOMES {
            metrics::counter!("trellis_worker_messages_total", "consumer" => consumer.clone(), "outcome" => *outcome)
                .increment(0);
        }
        metrics::gauge!("trellis_worker_in_flight_messages", "consumer" => consumer.clone()).set(0.0);
        metrics::gauge!("trellis_dlq_depth_messages", "consumer" => consumer.clone()).increment(0.0);
        metrics::gauge!("trellis_consumer_pending_messages", "consumer" => consumer.clone()).increment(0.0);
        metrics::gauge!("trellis_consumer_ack_pending_messages", "consumer" => consumer.clone()).increment(0.0);
        // Registering is enough: the exporter renders a histogram with no observation yet.
        let _ = metrics::histogram!("trellis_worker_handle_duration_seconds", "consumer" => consumer);
    }

    fn durable(&self) -> String {
        self.ctx.topology.name(&self.spec.name)
    }

    fn main_config(&self) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(self.durable()),
            description: Some(format!("trellis consumer group {}", self.spec.name)),
            filter_subject: self.ctx.topology.subject(&self.spec.filter_subject),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.config.ack_wait,
            max_deliver: self.config.max_deliver,
            max_ack_pending: self.config.max_ack_pending,
            deliver_policy: if self.new_messages_only {
                consumer::DeliverPolicy::New
            } else {
                consumer::DeliverPolicy::All
            },
            ..Default::default()
        }
    }

    fn replay_config(&self) -> consumer::pull::Config {
        consumer::pull::Config {
            filter_subject: self.ctx.topology.subject(&format!("replay.{}.>", self.spec.name)),
            description: Some(format!("trellis replays for {}", self.spec.name)),
            ..self.main_config()
        }
    }

    /// The safety net's consumer of the MAX_DELIVERIES advisories about this group's consumer on
    /// `stream`. A consumer has one filter subject (nats-server 2.9), and the advisory stream only
    /// holds `<advisory>.<this deployment's stream>.>` (a wildcard in the stream token would not
    /// be a subset of it), so there is one per source stream, each with a durable of its own.
    fn advisory_config(&self, stream: &str, durable: String) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(durable),
            filter_subject: format!("{}.{stream}.{}", dlq::MAX_DELIVERIES_ADVISORY, self.durable()),
            description: Some(format!("trellis MAX_DELIVERIES safety net for {} on {stream}", self.spec.name)),
            max_deliver: -1,
            ..self.main_config()
        }
    }

    /// Declares (idempotently) and verifies the four consumers.
    pub async fn bind(&self) -> Result<Bound, ConsumerError> {
        let t = &self.ctx.topology;
        let main = declare(&self.ctx.js, &t.events_stream(), self.main_config()).await?;
        let replay = declare(&self.ctx.js, &t.replay_stream(), self.replay_config()).await?;
        let main_advisory = self.advisory_config(&t.events_stream(), self.durable());
        let main_advisory = declare(&self.ctx.js, &t.advisory_stream(), main_advisory).await?;
        let replay_advisory = self.advisory_config(&t.replay_stream(), format!("{}-replays", self.durable()));
        let replay_advisory = declare(&self.ctx.js, &t.advisory_stream(), replay_advisory).await?;
        self.bound.store(true, Ordering::Release);
        Ok(Bound { main, replay, advisories: [main_advisory, replay_advisory] })
    }

    /// Binds (retrying while NATS is unreachable), then pulls until `stop` is cancelled. On
    /// `stop` it stops fetching and lets the batch in hand (every message of the current pull
    /// that has arrived) finish; the worker bounds that by its grace period. A configuration
    /// the server will not keep is returned as an error.
    pub async fn run(self, stop: CancellationToken) -> Result<(), ConsumerError> {
        self.initialise_series();
        if !self.until_executor(&mut self.gate.clone(), &stop).await {
            return Ok(());
        }
        let bound = loop {
            match self.bind().await {
                Ok(b) => break b,
                Err(e @ (ConsumerError::Mismatch { .. } | ConsumerError::Refused { .. })) => return Err(e),
                Err(e) => {
                    tracing::warn!(consumer = %self.spec.name, error = %e, "binding the consumer failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => return Ok(()),
                    }
                }
            }
        };
        let this = Arc::new(self);
        let main = tokio::spawn(this.clone().pull_loop(bound.main, Source::Main, stop.clone()));
        let replay = tokio::spawn(this.clone().pull_loop(bound.replay, Source::Replay, stop.clone()));
        let [main_advisory, replay_advisory] = bound.advisories;
        let main_advisory = tokio::spawn(this.clone().advisory_loop(main_advisory, stop.clone()));
        let replay_advisory = tokio::spawn(this.clone().advisory_loop(replay_advisory, stop.clone()));
        let sampler = tokio::spawn(this.clone().sample_loop(stop.clone()));
        let _ = tokio::join!(main, replay, main_advisory, replay_advisory, sampler);
        Ok(())
    }

    async fn pull_loop(self: Arc<Self>, consumer: PullConsumer, source: Source, stop: CancellationToken) {
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

    fn original_subject(&self, subject: &str, source: Source) -> String {
        let unprefixed = self.ctx.topology.unprefixed(subject);
        match source {
            Source::Main => unprefixed.to_owned(),
            Source::Replay => {
                unprefixed.strip_prefix(&format!("replay.{}.", self.spec.name)).unwrap_or(unprefixed).to_owned()
            }
        }
    }

    async fn settle(&self, m: &jetstream::Message, d: &Delivery, outcome: Outcome, source: Source) {
        let consumer = self.spec.name.clone();
        let count = |outcome: &'static str| {
            metrics::counter!("trellis_worker_messages_total", "consumer" => consumer.clone(), "outcome" => outcome)
                .increment(1)
        };
        match outcome {
            Outcome::Done => {
                let acked = if self.config.double_ack { m.double_ack().await } else { m.ack().await };
                if let Err(e) = acked {
                    tracing::warn!(consumer = %self.spec.name, error = %e, "ack failed; the message will be redelivered");
                }
                count("ok");
                if d.deliveries > 1 {
                    self.first_failures.take((source, d.stream_sequence));
                }
                metrics::gauge!("trellis_worker_last_success_timestamp_seconds", "consumer" => consumer.clone())
                    .set(OffsetDateTime::now_utc().unix_timestamp() as f64);
            }
            Outcome::Retry(e) if d.deliveries < self.config.max_deliver => {
                let delay = self.config.retry_delay(d.deliveries);
                self.first_failures.record((source, d.stream_sequence), OffsetDateTime::now_utc());
                tracing::info!(consumer = %self.spec.name, seq = d.stream_sequence, deliveries = d.deliveries, retry_in = ?delay, error = %e, "transient failure; retrying");
                let _ = m.ack_with(AckKind::Nak(Some(delay))).await;
                count("retried");
            }
            Outcome::Retry(e) => {
                self.dead_letter(m, source, ErrorKind::Transient, &e).await;
                count("dead_lettered");
            }
            Outcome::Reject(e) => {
                self.dead_letter(m, source, ErrorKind::Permanent, &e).await;
                count("dead_lettered");
            }
        }
    }

    /// Publishes the DLQ copy, waits for its ack, then terminates the original. If the DLQ is
    /// unreachable the original is nak'ed instead, so it is never lost.
    async fn dead_letter(&self, m: &jetstream::Message, source: Source, kind: ErrorKind, error: &str) {
        let (stream, seq, deliveries) = match m.info() {
            Ok(i) => (i.stream.to_owned(), i.stream_sequence, i.delivered),
            Err(_) => (String::new(), 0, 0),
        };
        let now = OffsetDateTime::now_utc();
        let letter = DeadLetter {
            consumer: &self.spec.name,
            original_subject: &self.original_subject(m.subject.as_str(), source),
            first_failure: self.first_failures.take((source, seq)).unwrap_or(now),
            stream: &stream,
            stream_sequence: seq,
            deliveries,
            kind,
            error,
            host: &self.ctx.host,
            version: &self.ctx.version,
            now,
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

    /// The safety net: a MAX_DELIVERIES advisory for this group means a message was delivered
    /// `max_deliver` times without any outcome (the process died each time). Its original is
    /// read back from its stream and dead-lettered.
    async fn advisory_loop(self: Arc<Self>, consumer: PullConsumer, stop: CancellationToken) {
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
        let source = if a.stream == self.ctx.topology.replay_stream() { Source::Replay } else { Source::Main };
        let error =
            format!("delivered {} times without an outcome: the worker died or hung on every delivery", a.deliveries);
        let now = OffsetDateTime::now_utc();
        let letter = DeadLetter {
            consumer: &self.spec.name,
            original_subject: &self.original_subject(original.subject.as_str(), source),
            first_failure: self.first_failures.take((source, a.stream_seq)).unwrap_or(now),
            stream: &a.stream,
            stream_sequence: a.stream_seq,
            deliveries: a.deliveries,
            kind: ErrorKind::MaxDeliveries,
            error: &error,
            host: &self.ctx.host,
            version: &self.ctx.version,
            now,
        };
        dlq::publish(&self.ctx.js, &self.ctx.topology, &letter, Some(&original.headers), original.payload.clone())
            .await?;
        metrics::counter!("trellis_worker_messages_total", "consumer" => self.spec.name.clone(), "outcome" => "dead_lettered").increment(1);
        tracing::warn!(consumer = %self.spec.name, seq = a.stream_seq, "message rescued from MAX_DELIVERIES into the DLQ");
        Ok(())
    }

    /// Keeps the consumer and DLQ gauges current.
    async fn sample_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let consumer = self.spec.name.clone();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            if let Ok(mut c) = self
                .ctx
                .js
                .get_consumer_from_stream::<consumer::pull::Config, _, _>(
                    self.durable(),
                    self.ctx.topology.events_stream(),
                )
                .await
                && let Ok(info) = c.info().await
            {
                metrics::gauge!("trellis_consumer_pending_messages", "consumer" => consumer.clone())
                    .set(info.num_pending as f64);
                metrics::gauge!("trellis_consumer_ack_pending_messages", "consumer" => consumer.clone())
                    .set(info.num_ack_pending as f64);
            }
            if let Ok(depth) = dlq::depth(&self.ctx.js, &self.ctx.topology, &self.spec.name).await {
                metrics::gauge!("trellis_dlq_depth_messages", "consumer" => consumer.clone()).set(depth as f64);
            }
        }
    }
}

type PullConsumer = consumer::Consumer<consumer::pull::Config>;

/// The bound consumers of a group.
pub struct Bound {
    main: PullConsumer,
    replay: PullConsumer,
    /// MAX_DELIVERIES advisories about `main` and about `replay`.
    advisories: [PullConsumer; 2],
}

/// Creates the consumer, or updates it to `wanted`, and checks the server kept what matters.
async fn declare(
    js: &jetstream::Context,
    stream: &str,
    wanted: consumer::pull::Config,
) -> Result<PullConsumer, ConsumerError> {
    let name = wanted.durable_name.clone().unwrap_or_default();
    let request = |e: &dyn std::fmt::Display| ConsumerError::Request { consumer: name.clone(), message: e.to_string() };
    let s = js.get_stream(stream).await.map_err(|e| request(&e))?;
    let mut c: PullConsumer = s.create_consumer(wanted.clone()).await.map_err(|e| match e.kind() {
        // The server answered and said no: retrying will not change its mind.
        jetstream::stream::ConsumerErrorKind::JetStream(refusal) => {
            ConsumerError::Refused { consumer: name.clone(), stream: stream.to_owned(), message: refusal.to_string() }
        }
        _ => request(&e),
    })?;
    let got = c.info().await.map_err(|e| request(&e))?.config.clone();
    let mismatch = |field, asked: String, got: String| ConsumerError::Mismatch {
        consumer: name.clone(),
        stream: stream.to_owned(),
        field,
        asked,
        got,
    };
    if got.filter_subject != wanted.filter_subject || !got.filter_subjects.is_empty() {
        return Err(mismatch(
            "filter_subject",
            wanted.filter_subject.clone(),
            format!("{:?} / filter_subjects {:?}", got.filter_subject, got.filter_subjects),
        ));
    }
    if got.ack_policy != wanted.ack_policy {
        return Err(mismatch("ack_policy", format!("{:?}", wanted.ack_policy), format!("{:?}", got.ack_policy)));
    }
    if got.max_deliver != wanted.max_deliver {
        return Err(mismatch("max_deliver", wanted.max_deliver.to_string(), got.max_deliver.to_string()));
    }
    if got.ack_wait != wanted.ack_wait {
        return Err(mismatch("ack_wait", format!("{:?}", wanted.ack_wait), format!("{:?}", got.ack_wait)));
    }
    if got.max_ack_pending != wanted.max_ack_pending {
        return Err(mismatch("max_ack_pending", wanted.max_ack_pending.to_string(), got.max_ack_pending.to_string()));
    }
    Ok(c)
}

/// When each still-failing message first failed, for the `Trellis-First-Failure` header. Kept in
/// memory (a restart forgets it: the header then shows the failure this replica saw first) and
/// bounded.
#[derive(Default)]
struct FirstFailures(std::sync::Mutex<HashMap<(Source, u64), OffsetDateTime>>);

impl FirstFailures {
    const LIMIT: usize = 100_000;

    fn record(&self, key: (Source, u64), now: OffsetDateTime) {
        let mut map = self.0.lock().expect("first failures lock");
        if map.len() >= Self::LIMIT {
            map.clear();
        }
        map.entry(key).or_insert(now);
    }

    fn take(&self, key: (Source, u64)) -> Option<OffsetDateTime> {
        self.0.lock().expect("first failures lock").remove(&key)
    }
}
