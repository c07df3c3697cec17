//! The harness: a database and a NATS prefix per test with the streams declared, consumer
//! groups run in this process with a recording handler, and real `trellis-probe-worker`
//! processes (`trellis_testkit::probe`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trellis_runtime::consumer::{
    ConsumerError, ConsumerGroup, ConsumerSpec, Delivery, Handler, Outcome, RunnerConfig, RunnerContext,
};
use trellis_runtime::dlq::{self, Entry};
use trellis_runtime::nats::Topology;
pub use trellis_testkit::eventually;
use trellis_testkit::probe::{self, RECORDS, Record};
use trellis_testkit::{Process, TestDb};
use uuid::Uuid;

/// A `trellis-probe-worker` child process.
pub type Worker = Process;

/// A test's world: its own database, its own NATS prefix with the streams declared, a
/// JetStream client on it.
pub struct Env {
    pub db: TestDb,
    pub prefix: String,
    pub nats_url: String,
    pub topology: Topology,
    pub js: jetstream::Context,
}

impl Env {
    pub async fn new() -> Env {
        Env::on(&trellis_testkit::nats_url()).await
    }

    /// An environment on another NATS server (a private one, for outage tests).
    pub async fn on(nats_url: &str) -> Env {
        let db = TestDb::migrated().await.expect("a test database");
        let prefix = trellis_testkit::nats_prefix();
        let topology = Topology::new(&prefix).expect("a valid prefix");
        let js = connect(nats_url).await;
        trellis_runtime::nats::ensure_streams(&js, &topology).await.expect("declaring the streams");
        probe::create_record_table(&db, RECORDS).await;
        Env { db, prefix, nats_url: nats_url.to_owned(), topology, js }
    }

    /// A probe worker with the usual fast test settings (and `extra` flags after them, which
    /// win), once its `/readyz` says ready.
    pub async fn worker(&self, extra: &[&str]) -> Worker {
        probe::worker(&self.db.url, &self.nats_url, &self.prefix, extra).ready().await
    }

    /// A probe worker, not waited for.
    pub fn worker_unready(&self, extra: &[&str]) -> Worker {
        probe::worker(&self.db.url, &self.nats_url, &self.prefix, extra).spawn()
    }

    /// Runs a consumer group named `group` on `events.probe.>` with `handler` in this process;
    /// it stops when the returned value is dropped.
    pub async fn start_group<H: Handler>(&self, group: &str, config: RunnerConfig, handler: Arc<H>) -> Running {
        let spec = ConsumerSpec { name: group.into(), filter_subject: "events.probe.>".into() };
        let group = ConsumerGroup::new(self.context(), spec, config, handler);
        let mut pulling = group.pulling();
        let stop = CancellationToken::new();
        let run = tokio::spawn(group.run(stop.clone()));
        tokio::time::timeout(Duration::from_secs(10), pulling.wait_for(|p| *p))
            .await
            .expect("the group made its first pull request within 10 s")
            .expect("the group is running");
        Running { stop, run: Some(run) }
    }

    /// What a consumer group run in this process is given.
    pub fn context(&self) -> RunnerContext {
        RunnerContext {
            js: self.js.clone(),
            topology: self.topology.clone(),
            host: "runtime-tests".into(),
            version: "test".into(),
        }
    }

    /// Publishes an event whose handler will do what `probe` says; returns its id and its
    /// sequence in the events stream.
    pub async fn publish(&self, probe: &str) -> (Uuid, u64) {
        probe::publish(&self.js, &self.prefix, probe).await
    }

    /// Publishes `count` events on `events.probe.ok`; returns their stream sequences.
    pub async fn publish_ok(&self, count: usize) -> Vec<u64> {
        let mut sequences = Vec::with_capacity(count);
        for _ in 0..count {
            sequences.push(self.publish("ok").await.1);
        }
        sequences
    }

    /// Publishes many events without waiting for each ack before sending the next.
    pub async fn publish_many(&self, probe: &str, count: usize) -> Vec<Uuid> {
        probe::publish_many(&self.js, &self.prefix, probe, count).await
    }

    /// Publishes raw bytes on `events.probe.<tail>`; returns the message id and sequence.
    pub async fn publish_raw(&self, tail: &str, payload: &'static [u8]) -> (String, u64) {
        let msg_id = format!("raw-{}", Uuid::new_v4());
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        let subject = self.topology.subject(&format!("events.probe.{tail}"));
        let ack = self
            .js
            .publish_with_headers(subject, headers, payload.into())
            .await
            .expect("publishing")
            .await
            .expect("the publish ack");
        (msg_id, ack.sequence)
    }

    /// Every dead letter now in the DLQ (of one consumer, or all).
    pub async fn dead_letters(&self, consumer: Option<&str>) -> Vec<Entry> {
        dlq::read(&self.js, &self.topology, consumer, 1).await.expect("reading the DLQ")
    }

    /// Waits until the DLQ holds at least `count` dead letters (of `consumer`, or all).
    pub async fn wait_for_dead_letters(&self, consumer: Option<&str>, count: usize, within: Duration) -> Vec<Entry> {
        eventually(&format!("{count} dead letters of {consumer:?}"), within, || async {
            let entries = self.dead_letters(consumer).await;
            (entries.len() >= count).then_some(entries)
        })
        .await
    }

    /// What the probe workers recorded in [`RECORDS`].
    pub async fn records(&self) -> Vec<Record> {
        probe::records_in(&self.db, RECORDS).await
    }

    /// Waits until `id` is recorded; returns its rows.
    pub async fn wait_for_record(&self, id: Uuid, within: Duration) -> Vec<Record> {
        eventually(&format!("event {id} recorded"), within, || async {
            let rows: Vec<Record> = self.records().await.into_iter().filter(|r| r.event_id == id).collect();
            (!rows.is_empty()).then_some(rows)
        })
        .await
    }

    /// The durable consumer `group` on the events (or replay) stream, as the server sees it.
    pub async fn consumer_info(&self, stream: &str, group: &str) -> consumer::Info {
        let stream = self.js.get_stream(stream).await.expect("the stream");
        let mut c: consumer::PullConsumer =
            stream.get_consumer(&self.topology.name(group)).await.expect("the consumer");
        c.info().await.expect("consumer info").clone()
    }

    /// The durable consumer `group` on the events stream.
    pub async fn events_consumer_info(&self, group: &str) -> consumer::Info {
        self.consumer_info(&self.topology.events_stream(), group).await
    }

    /// Waits until the group's main consumer holds nothing: every message acked or terminated.
    pub async fn wait_until_settled(&self, stream: &str, group: &str, within: Duration) -> consumer::Info {
        eventually(&format!("consumer {group} on {stream} settled"), within, || async {
            let info = self.consumer_info(stream, group).await;
            (info.num_pending == 0 && info.num_ack_pending == 0).then_some(info)
        })
        .await
    }

    /// Runs `trellisctl` (the on-call tool, a binary of the workspace) with this test's
    /// database, NATS server and prefix; asserts it succeeded.
    pub async fn trellisctl(&self, args: &[&str]) {
        let out = tokio::process::Command::new(trellis_testkit::process::binary("trellisctl"))
            .args(["--database-url", &self.db.url, "--nats-url", &self.nats_url, "--nats-prefix", &self.prefix])
            .args(args)
            .env("TRELLIS_ACTOR", "runtime-tests")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .expect("running trellisctl");
        assert!(out.status.success(), "trellisctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// A JetStream client on `url`, which waits for a server that is not up yet.
pub async fn connect(url: &str) -> jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting to NATS at {url}: {e}"));
    trellis_runtime::nats::jetstream(client, Duration::from_secs(10))
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
