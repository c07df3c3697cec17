//! The harness: a test's world and real `trellis-probe-worker` processes
//! (`trellis_testkit::probe`), and consumer groups run in this process with a recording handler.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trellis_runtime::consumer::{ConsumerError, ConsumerGroup, ConsumerSpec, Delivery, Handler, Outcome, RunnerConfig};
use trellis_testkit::Process;
pub use trellis_testkit::eventually;

pub use trellis_testkit::probe::Env;

/// A `trellis-probe-worker` child process.
pub type Worker = Process;

/// Runs a consumer group named `group` on `events.probe.>` with `handler` in this process; it
/// stops when the returned value is dropped.
pub async fn start_group<H: Handler>(env: &Env, group: &str, config: RunnerConfig, handler: Arc<H>) -> Running {
    let spec = ConsumerSpec { name: group.into(), filter_subject: "events.probe.>".into() };
    let group = ConsumerGroup::new(env.context(), spec, config, handler);
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
pub async fn publish_ok(env: &Env, count: usize) -> Vec<u64> {
    let mut sequences = Vec::with_capacity(count);
    for _ in 0..count {
        sequences.push(env.publish("ok").await.1);
    }
    sequences
}

/// Runs `trellisctl` (the on-call tool, a binary of the workspace) with the test's database,
/// NATS server and prefix; asserts it succeeded.
pub async fn trellisctl(env: &Env, args: &[&str]) {
    let out = tokio::process::Command::new(trellis_testkit::process::binary("trellisctl"))
        .args(["--database-url", &env.db.url, "--nats-url", &env.nats_url, "--nats-prefix", &env.prefix])
        .args(args)
        .env("TRELLIS_ACTOR", "runtime-tests")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("running trellisctl");
    assert!(out.status.success(), "trellisctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
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
