//! The consumer-group runner: drives a processor's handler from its durable pull consumer,
//! its replay consumer and the MAX_DELIVERIES safety net.
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
//!
//! The runner's parts, one concern each: `handler` (what a processor implements), `declare`
//! (the consumers' configurations, their declaration and verification), `pull` (pull requests,
//! the batch window, handing a batch to the handler), `settle` (ack, nak with backoff, term),
//! `dead_letter` and `rescue` (the MAX_DELIVERIES safety net). The cutover gate (standing by
//! while this process is not the executor) is `crate::cutover::gate`.

mod dead_letter;
mod declare;
mod handler;
mod pull;
mod rescue;
mod settle;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use tokio_util::sync::CancellationToken;

use crate::dlq;
use crate::instrument::{ConsumerSampled, DlqSampled};
use crate::nats::Topology;
pub use declare::{Bound, ConsumerError};
pub use handler::{Delivery, EachMessage, Handler, MessageHandler, Outcome};
use settle::FirstFailures;

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

/// One processor's consumer group: the runner of its main consumer, its replay consumer and
/// its MAX_DELIVERIES watchers. Every replica of a worker runs one with the same spec.
pub struct ConsumerGroup<H> {
    ctx: RunnerContext,
    pub(crate) spec: ConsumerSpec,
    config: RunnerConfig,
    handler: Arc<H>,
    bound: Arc<AtomicBool>,
    pulling: tokio::sync::watch::Sender<bool>,
    first_failures: FirstFailures,
    /// While closed, this process is not the executor: it does not pull (see [`Self::gated`]).
    pub(crate) gate: Option<tokio::sync::watch::Receiver<bool>>,
    pub(crate) standing_by: Arc<AtomicBool>,
    /// Whether a new main consumer starts at the stream's end rather than its start.
    new_messages_only: bool,
}

/// Whether a group is ready: bound, or standing by, or not asked to run (its cutover gate is
/// closed: a group that waits for another to pull first, as the dispute processor's lower
/// priorities do, has not even started then).
#[derive(Clone)]
pub struct Readiness {
    bound: Arc<AtomicBool>,
    standing_by: Arc<AtomicBool>,
    gate: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.bound.load(Ordering::Acquire)
            || self.standing_by.load(Ordering::Acquire)
            || self.gate.as_ref().is_some_and(|gate| !*gate.borrow())
    }
}

/// A pulling loop's feed: the main consumer or the replay consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Feed {
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

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// True once every consumer is declared and verified.
    pub fn bound_flag(&self) -> Arc<AtomicBool> {
        self.bound.clone()
    }

    /// What `/readyz` asks of this group (see [`Readiness`]).
    pub fn readiness(&self) -> Readiness {
        Readiness { bound: self.bound.clone(), standing_by: self.standing_by.clone(), gate: self.gate.clone() }
    }

    /// Turns true once the first pull request on the main consumer has been sent: from then on,
    /// a message waiting in the stream is on its way to this group. A scheduler over several
    /// groups uses it to start them in order.
    pub fn pulling(&self) -> tokio::sync::watch::Receiver<bool> {
        self.pulling.subscribe()
    }

    fn durable(&self) -> String {
        self.ctx.topology.name(&self.spec.name)
    }

    /// Binds (retrying while NATS is unreachable), then pulls until `stop` is cancelled. On
    /// `stop` it stops fetching and lets the batch in hand (every message of the current pull
    /// that has arrived) finish; the worker bounds that by its grace period. A configuration
    /// the server will not keep is returned as an error.
    pub async fn run(self, stop: CancellationToken) -> Result<(), ConsumerError> {
        crate::instrument::register_consumer(&self.spec.name);
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
        let main = tokio::spawn(this.clone().pull_loop(bound.main, Feed::Main, stop.clone()));
        let replay = tokio::spawn(this.clone().pull_loop(bound.replay, Feed::Replay, stop.clone()));
        let [main_advisory, replay_advisory] = bound.advisories;
        let main_advisory = tokio::spawn(this.clone().advisory_loop(main_advisory, stop.clone()));
        let replay_advisory = tokio::spawn(this.clone().advisory_loop(replay_advisory, stop.clone()));
        let sampler = tokio::spawn(this.clone().sample_loop(stop.clone()));
        let _ = tokio::join!(main, replay, main_advisory, replay_advisory, sampler);
        Ok(())
    }

    fn original_subject(&self, subject: &str, feed: Feed) -> String {
        let unprefixed = self.ctx.topology.unprefixed(subject);
        match feed {
            Feed::Main => unprefixed.to_owned(),
            Feed::Replay => {
                unprefixed.strip_prefix(&format!("replay.{}.", self.spec.name)).unwrap_or(unprefixed).to_owned()
            }
        }
    }

    /// Keeps the consumer and DLQ gauges current.
    async fn sample_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
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
                ConsumerSampled {
                    consumer: &self.spec.name,
                    pending: info.num_pending,
                    ack_pending: info.num_ack_pending,
                }
                .emit();
            }
            if let Ok(depth) = dlq::depth(&self.ctx.js, &self.ctx.topology, &self.spec.name).await {
                DlqSampled { consumer: &self.spec.name, depth }.emit();
            }
        }
    }
}

type PullConsumer = consumer::Consumer<consumer::pull::Config>;
