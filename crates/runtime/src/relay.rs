//! The outbox relay: moves events from `ops.outbox` to the `EVENTS` stream.
//!
//! A batch is claimed with `FOR UPDATE SKIP LOCKED` (so relays in several API replicas split
//! the work), published with `Nats-Msg-Id` = event id and the acknowledgements pipelined, and
//! marked published only for the events JetStream acknowledged. A crash between publish and
//! mark re-sends the batch; the stream's duplicate window drops the copies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::{HeaderMap, HeaderName};
use backon::BackoffBuilder;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use trellis_store::outbox;

use crate::instrument::{OutboxPruned, OutboxSampled, RelayBatchPublished, RelayFailed};
use crate::nats::Topology;
use crate::trace::{ParentMode, TraceHeaders};

/// The channel the outbox trigger notifies on commit.
pub const OUTBOX_CHANNEL: &str = "trellis_outbox";

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Events claimed and published per transaction.
    pub batch_size: i64,
    /// How often to look for events when no notification arrives (the fallback).
    pub poll_interval: Duration,
    /// The least time from the start of one drain to the start of the next. Commits that
    /// notify within it go out together in the next drain's batch instead of one claim,
    /// publish, mark and commit each; it delays a publish by at most this, and only while
    /// notifications come faster than one an interval (a quiet relay drains at once).
    pub min_batch_interval: Duration,
    /// How long published events are kept (for `trellisctl outbox republish`).
    pub retention: Duration,
    /// How often published events past retention are pruned.
    pub prune_interval: Duration,
    /// How often the streams' fill levels are read (`stream_limits`).
    pub stream_poll_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 2000,
            poll_interval: Duration::from_secs(1),
            min_batch_interval: Duration::from_millis(10),
            retention: Duration::from_secs(72 * 3600),
            prune_interval: Duration::from_secs(60),
            stream_poll_interval: crate::stream_limits::POLL_EVERY,
        }
    }
}

#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    js: jetstream::Context,
    topology: Topology,
    config: RelayConfig,
    wake: Arc<Notify>,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("publishing to JetStream: {0}")]
    Publish(String),
}

impl Relay {
    /// `pool` should be the relay's own small pool (a bulkhead): HTTP requests never queue
    /// behind a batch that is waiting for JetStream.
    pub fn new(pool: PgPool, js: jetstream::Context, topology: Topology, config: RelayConfig) -> Self {
        crate::stream_limits::register(&topology);
        Self { pool, js, topology, config, wake: Arc::new(Notify::new()) }
    }

    /// Wakes the relay as a commit notification would: for writers in this process whose
    /// sessions do not notify (`trellis.outbox_notify = off`, see docs/ARCHITECTURE.md).
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Runs until `shutdown`: relays, samples the backlog gauges and the streams' fill levels
    /// (`stream_limits`), and prunes.
    pub async fn run(self, shutdown: CancellationToken) {
        crate::instrument::register_relay();
        let sampler = tokio::spawn(sample_backlog(self.pool.clone(), shutdown.clone()));
        let pruner = tokio::spawn(prune_loop(self.pool.clone(), self.config.clone(), shutdown.clone()));
        let streams = tokio::spawn(crate::stream_limits::run(
            self.js.clone(),
            self.topology.clone(),
            self.config.stream_poll_interval,
            shutdown.clone(),
        ));
        self.relay_loop(&shutdown).await;
        let _ = tokio::join!(sampler, pruner, streams);
    }

    async fn relay_loop(&self, shutdown: &CancellationToken) {
        let mut listener: Option<PgListener> = None;
        let mut backoff = new_backoff();
        let mut last_drain: Option<Instant> = None;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let wait = last_drain.map_or(Duration::ZERO, |at| {
                (at + self.config.min_batch_interval).saturating_duration_since(Instant::now())
            });
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
            // What was committed until now is all in this drain: the wakes and notifications
            // already received are spent, or each would start a drain of its own that finds
            // nothing.
            let _ = futures::FutureExt::now_or_never(self.wake.notified());
            if let Some(l) = listener.as_mut() {
                while l.next_buffered().is_some() {}
            }
            last_drain = Some(Instant::now());
            match self.drain().await {
                Ok(_) => backoff = new_backoff(),
                Err(e) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    RelayFailed { error: &e, retry_in: delay }.emit();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
            if listener.is_none() {
                listener = self.listen().await;
            }
            // Wait for a commit notification, a wake from this process, the poll interval, or
            // shutdown.
            let poll = tokio::time::sleep(self.config.poll_interval);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = poll => {}
                _ = self.wake.notified() => {}
                got = recv(&mut listener) => {
                    if let Err(e) = got {
                        tracing::warn!(error = %e, "outbox LISTEN connection lost; polling until it is back");
                        listener = None;
                    }
                }
            }
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        let mut l = PgListener::connect_with(&self.pool).await.ok()?;
        l.listen(OUTBOX_CHANNEL).await.ok()?;
        Some(l)
    }

    /// Relays batches until the outbox has no unclaimed event. Returns how many were published.
    ///
    /// Two batches are in flight at once: while JetStream acknowledges one, the next is claimed
    /// (SKIP LOCKED passes over the first's locked rows) and sent. Its publishes follow the
    /// first's on the one connection, so the stream keeps outbox order.
    pub async fn drain(&self) -> Result<u64, RelayError> {
        let mut total = 0u64;
        let mut in_flight: Option<InFlight> = None;
        loop {
            let unacknowledged = in_flight.as_ref().map_or(0, |b| b.bytes);
            let next = match self.send_batch(unacknowledged).await {
                Ok(next) => next,
                Err(e) => {
                    if let Some(prev) = in_flight.take() {
                        // Marks what was acknowledged; the claim's error is the one to report.
                        let _ = self.settle(prev).await;
                    }
                    return Err(e);
                }
            };
            if let Some(prev) = in_flight.take() {
                match self.settle(prev).await {
                    Ok(n) => total += n as u64,
                    Err(e) => {
                        if let Some(next) = next {
                            let _ = self.settle(next).await;
                        }
                        return Err(e);
                    }
                }
            }
            match next {
                Some(batch) => {
                    let full = batch.claimed as i64 >= self.config.batch_size;
                    if full {
                        in_flight = Some(batch);
                    } else {
                        return Ok(total + self.settle(batch).await? as u64);
                    }
                }
                None => return Ok(total),
            }
        }
    }

    /// Claims and publishes one batch; returns what is still to be acknowledged and marked
    /// (`None` when there was nothing to claim). `unacknowledged`: the bytes of the batch still in
    /// flight, which the stream may not count yet.
    async fn send_batch(&self, unacknowledged: u64) -> Result<Option<InFlight>, RelayError> {
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        let batch = outbox::claim(&mut tx, self.config.batch_size).await?;
        if batch.is_empty() {
            tx.rollback().await?;
            return Ok(None);
        }
        let mut room = self.events_room(unacknowledged).await;
        let mut acks = Vec::with_capacity(batch.len());
        let mut send_error = None;
        let mut bytes = 0;
        for event in &batch {
            let subject = self.topology.subject(&event.subject);
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", event.id.to_string().as_str());
            let span = publish_span(event, &subject);
            // The row's context goes on as it is (a consumer's span is the child of the
            // request's outbox write); a row without one carries the publish span's.
            let trace = event
                .traceparent
                .as_ref()
                .map(|tp| TraceHeaders { traceparent: tp.clone(), tracestate: event.tracestate.clone() })
                .filter(|t| t.span_context().is_some())
                .or_else(|| TraceHeaders::of(&tracing_opentelemetry::OpenTelemetrySpanExt::context(&span)));
            if let Some(trace) = &trace {
                trace.to_nats(&mut headers);
            }
            let size = stored_size(&subject, &headers, event.payload.len());
            if let Some(room) = room.as_mut() {
                if *room < size {
                    // What is not sent stays unpublished in the outbox, for the next attempt.
                    send_error = Some(format!(
                        "the {} stream is full (max_bytes {}): publishing waits until it has room",
                        self.topology.events_stream(),
                        self.topology.streams().events_max_bytes
                    ));
                    break;
                }
                *room -= size;
            }
            let published =
                self.js.publish_with_headers(subject, headers, event.payload.clone().into()).instrument(span).await;
            match published {
                Ok(ack) => {
                    acks.push((event.seq, ack));
                    bytes += size;
                }
                Err(e) => {
                    send_error = Some(e.to_string());
                    break;
                }
            }
        }
        Ok(Some(InFlight { tx, claimed: batch.len(), acks, send_error, started, bytes }))
    }

    /// The bytes the events stream still takes, when it has a byte limit (`None`: no limit, or
    /// its state cannot be read now; then the server's own `discard: new` refusal decides).
    ///
    /// The relay does not rely on the server's refusal alone: nats-server 2.9 underestimates a
    /// message's stored size in that check, so near the limit it stores the message and drops
    /// the oldest instead (docs/ARCHITECTURE.md, "Outbox retention, `max_age` and what alerts first").
    async fn events_room(&self, unacknowledged: u64) -> Option<u64> {
        let max_bytes = u64::try_from(self.topology.streams().events_max_bytes).ok().filter(|m| *m > 0)?;
        // One STREAM.INFO request: looking the stream up already returns its state.
        let stored = self.js.get_stream(self.topology.events_stream()).await.ok()?.cached_info().state.bytes;
        Some(max_bytes.saturating_sub(stored).saturating_sub(unacknowledged))
    }

    /// Waits for a batch's acknowledgements and marks exactly the acknowledged events published.
    async fn settle(&self, batch: InFlight) -> Result<usize, RelayError> {
        let InFlight { mut tx, acks, send_error, started, .. } = batch;
        let results =
            futures::future::join_all(acks.into_iter().map(|(seq, ack)| async move { (seq, ack.await) })).await;
        let mut published = Vec::with_capacity(results.len());
        let mut ack_error = None;
        for (seq, result) in results {
            match result {
                Ok(_) => published.push(seq),
                Err(e) => ack_error = Some(e.to_string()),
            }
        }
        if !published.is_empty() {
            outbox::mark_published(&mut tx, &published).await?;
        }
        tx.commit().await?;
        RelayBatchPublished { rows: published.len(), duration: started.elapsed() }.emit();
        match send_error.or(ack_error) {
            Some(e) => Err(RelayError::Publish(e)),
            None => Ok(published.len()),
        }
    }
}

/// The relay's span for publishing one event: a child of the span that wrote the row (the
/// request's outbox write) and linked to it, with the messaging attributes of the OpenTelemetry
/// semantic conventions.
fn publish_span(event: &outbox::PendingEvent, subject: &str) -> tracing::Span {
    let span = tracing::info_span!(
        parent: None,
        "publish",
        otel.name = %format_args!("publish {}", event.subject),
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.operation.type = "send",
        messaging.destination.name = %subject,
        messaging.message.id = %event.id,
        trellis.outbox.seq = event.seq,
    );
    let row = event.traceparent.as_deref().and_then(|tp| TraceHeaders::parse(tp, event.tracestate.as_deref()));
    if let Some(row) = row {
        crate::trace::relate(&span, &row, ParentMode::Child);
    }
    crate::trace::started(span)
}

/// A claimed batch whose publishes are sent and whose acknowledgements are awaited; its row
/// locks hold until it is settled.
struct InFlight {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    claimed: usize,
    acks: Vec<(i64, async_nats::jetstream::context::PublishAckFuture)>,
    send_error: Option<String>,
    started: Instant,
    /// What its published events take in the stream ([`stored_size`]).
    bytes: u64,
}

/// What an event takes in a file-backed stream, over-estimated: its subject, its headers as
/// they are sent (`NATS/1.0`, then `name: value` lines), its payload and the store's record
/// overhead.
fn stored_size(subject: &str, headers: &HeaderMap, payload: usize) -> u64 {
    let header_lines: usize = headers
        .iter()
        .map(|(name, values)| {
            values.iter().map(|v| <HeaderName as AsRef<str>>::as_ref(name).len() + v.as_str().len() + 4).sum::<usize>()
        })
        .sum();
    (subject.len() + 12 + header_lines + payload + 64) as u64
}

/// The next notification of a LISTEN connection; never, without one (so that polling decides).
pub(crate) async fn recv(listener: &mut Option<PgListener>) -> Result<(), sqlx::Error> {
    match listener {
        Some(l) => l.recv().await.map(drop),
        None => std::future::pending().await,
    }
}

fn new_backoff() -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Keeps `trellis_outbox_pending_rows` and `trellis_outbox_oldest_pending_age_seconds` current.
async fn sample_backlog(pool: PgPool, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let pending = outbox::pending_count(&pool)
            .await
            .inspect_err(|e| tracing::debug!(error = %e, "sampling the outbox backlog failed"))
            .ok();
        let oldest_age_seconds = outbox::oldest_pending_age_seconds(&pool).await.ok();
        OutboxSampled { pending, oldest_age_seconds }.emit();
    }
}

async fn prune_loop(pool: PgPool, config: RelayConfig, shutdown: CancellationToken) {
    const BATCH: i64 = 10_000;
    let mut tick = tokio::time::interval(config.prune_interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let before = time::OffsetDateTime::now_utc() - config.retention;
        loop {
            match outbox::prune(&pool, before, BATCH).await {
                Ok(n) => {
                    OutboxPruned { rows: n }.emit();
                    if (n as i64) < BATCH || shutdown.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pruning the outbox failed");
                    break;
                }
            }
        }
    }
}
