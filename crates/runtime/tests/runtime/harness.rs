//! The harness: a NATS prefix per test with its streams declared, consumer groups run in this
//! process, a recording handler, and bounded polling.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trellis_runtime::consumer::{
    ConsumerError, ConsumerGroup, ConsumerSpec, Delivery, Handler, Outcome, RunnerConfig, RunnerContext,
};
use trellis_runtime::nats::Topology;

/// A test's world: its own NATS prefix, with the streams declared, and a JetStream client.
pub struct Env {
    pub topology: Topology,
    pub js: jetstream::Context,
}

impl Env {
    pub async fn new() -> Env {
        let topology = Topology::new(&trellis_testkit::nats_prefix()).expect("a valid prefix");
        let client = async_nats::connect(trellis_testkit::nats_url()).await.expect("connecting to NATS");
        let js = trellis_runtime::nats::jetstream(client, Duration::from_secs(10));
        trellis_runtime::nats::ensure_streams(&js, &topology).await.expect("declaring the streams");
        Env { topology, js }
    }

    /// Runs a consumer group named `group` on `events.probe.>` with `handler`; it stops when the
    /// returned value is dropped.
    pub async fn start_group<H: Handler>(&self, group: &str, config: RunnerConfig, handler: Arc<H>) -> Running {
        let ctx = RunnerContext {
            js: self.js.clone(),
            topology: self.topology.clone(),
            host: "runtime-tests".into(),
            version: "test".into(),
        };
        let spec = ConsumerSpec { name: group.into(), filter_subject: "events.probe.>".into() };
        let group = ConsumerGroup::new(ctx, spec, config, handler);
        let mut pulling = group.pulling();
        let stop = CancellationToken::new();
        let run = tokio::spawn(group.run(stop.clone()));
        tokio::time::timeout(Duration::from_secs(10), pulling.wait_for(|p| *p))
            .await
            .expect("the group made its first pull request within 10 s")
            .expect("the group is running");
        Running { stop, run: Some(run) }
    }

    /// Publishes `count` events on `events.probe.ok`; returns their stream sequences.
    pub async fn publish(&self, count: usize) -> Vec<u64> {
        let mut acks = Vec::with_capacity(count);
        for _ in 0..count {
            let envelope = json!({
                "id": uuid::Uuid::now_v7(),
                "type": "probe.requested",
                "version": 1,
                "occurred_at": time::OffsetDateTime::now_utc()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap(),
                "actor_id": null,
                "data": {},
            });
            let subject = self.topology.subject("events.probe.ok");
            let payload = serde_json::to_vec(&envelope).unwrap().into();
            acks.push(self.js.publish(subject, payload).await.expect("publishing"));
        }
        let mut sequences = Vec::with_capacity(count);
        for ack in acks {
            sequences.push(ack.await.expect("the publish ack").sequence);
        }
        sequences
    }

    /// The durable consumer of `group` on the events stream, as the server sees it.
    pub async fn consumer_info(&self, group: &str) -> consumer::Info {
        let stream = self.js.get_stream(self.topology.events_stream()).await.expect("the events stream");
        let mut c: consumer::PullConsumer =
            stream.get_consumer(&self.topology.name(group)).await.expect("the consumer");
        c.info().await.expect("consumer info").clone()
    }
}

/// A running consumer group: stopped (and joined) by [`Running::stop`], or stopped when dropped.
pub struct Running {
    stop: CancellationToken,
    run: Option<JoinHandle<Result<(), ConsumerError>>>,
}

impl Running {
    pub async fn stop(mut self) {
        self.stop.cancel();
        let run = self.run.take().expect("running");
        run.await.expect("the group's task").expect("the group ran");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What a handler was handed: one entry per delivery, in the order of handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub replica: &'static str,
    pub batch: usize,
    pub stream_sequence: u64,
    pub deliveries: i64,
}

/// A handler that records every delivery it is handed (in a log shared between replicas) and
/// is busy for `first_batch_takes` with its first batch; the others are done at once.
pub struct Recorder {
    replica: &'static str,
    first_batch_takes: Duration,
    log: Arc<Mutex<Vec<Seen>>>,
    batches: watch::Sender<usize>,
}

impl Recorder {
    pub fn new(replica: &'static str, first_batch_takes: Duration, log: Arc<Mutex<Vec<Seen>>>) -> Arc<Self> {
        Arc::new(Self { replica, first_batch_takes, log, batches: watch::Sender::new(0) })
    }

    /// Waits (up to 10 s) until the handler has been handed `count` batches.
    pub async fn wait_for_batches(&self, count: usize) {
        let mut batches = self.batches.subscribe();
        tokio::time::timeout(Duration::from_secs(10), batches.wait_for(|n| *n >= count))
            .await
            .unwrap_or_else(|_| panic!("{} was not handed {count} batches within 10 s", self.replica))
            .expect("the recorder is alive");
    }

    /// Batches handed to this replica so far.
    pub fn batches(&self) -> usize {
        *self.batches.borrow()
    }
}

impl Handler for Recorder {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let mut number = 0;
        self.batches.send_modify(|n| {
            *n += 1;
            number = *n;
        });
        self.log.lock().unwrap().extend(batch.iter().map(|d| Seen {
            replica: self.replica,
            batch: number,
            stream_sequence: d.stream_sequence,
            deliveries: d.deliveries,
        }));
        if number == 1 {
            tokio::time::sleep(self.first_batch_takes).await;
        }
        vec![Outcome::Done; batch.len()]
    }
}

/// Polls `check` every 50 ms until it yields a value; panics with `what` after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
