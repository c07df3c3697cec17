//! The harness: a database and a NATS prefix per test, real `trellis-probe-worker` child
//! processes (`trellis_testkit::probe`), and `trellisctl` runs.

use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use trellis_runtime::dlq::{self, Entry};
use trellis_runtime::nats::Topology;
pub use trellis_testkit::eventually;
pub use trellis_testkit::probe::{PROBE, RECORDS, Record, create_record_table};
use trellis_testkit::{Process, TestDb, probe};
use uuid::Uuid;

/// A `trellis-probe-worker` child process.
pub type Worker = Process;

/// A test's world: its own database, its own NATS prefix, a JetStream client on it.
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
        create_record_table(&db, RECORDS).await;
        Env { db, prefix, nats_url: nats_url.to_owned(), topology, js }
    }

    /// A worker with the usual fast test settings (and `extra` flags after them, which win).
    pub async fn worker(&self, extra: &[&str]) -> Worker {
        probe::worker(&self.db.url, &self.nats_url, &self.prefix, extra).ready().await
    }

    /// Publishes an event whose handler will do what `probe` says; returns its id and its
    /// sequence in the events stream.
    pub async fn publish(&self, probe: &str) -> (Uuid, u64) {
        probe::publish(&self.js, &self.prefix, probe).await
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

    /// Rows of a record table, in the order they were handled.
    pub async fn records_in(&self, table: &str) -> Vec<Record> {
        probe::records_in(&self.db, table).await
    }

    /// Waits until `id` is recorded in `table`; returns its rows.
    pub async fn wait_for_record_in(&self, table: &str, id: Uuid, within: Duration) -> Vec<Record> {
        eventually(&format!("event {id} recorded in {table}"), within, || async {
            let rows: Vec<Record> = self.records_in(table).await.into_iter().filter(|r| r.event_id == id).collect();
            (!rows.is_empty()).then_some(rows)
        })
        .await
    }

    pub async fn wait_for_record(&self, id: Uuid, within: Duration) -> Vec<Record> {
        self.wait_for_record_in(RECORDS, id, within).await
    }

    /// The durable consumer `group` on the events (or replay) stream, as the server sees it.
    pub async fn consumer_info(&self, stream: &str, group: &str) -> consumer::Info {
        let stream = self.js.get_stream(stream).await.expect("the stream");
        let mut c: consumer::Consumer<consumer::pull::Config> =
            stream.get_consumer(&self.topology.name(group)).await.expect("the consumer");
        c.info().await.expect("consumer info").clone()
    }

    /// Waits until the group's main consumer holds nothing: every message acked or terminated.
    pub async fn wait_until_settled(&self, stream: &str, group: &str, within: Duration) -> consumer::Info {
        eventually(&format!("consumer {group} on {stream} settled"), within, || async {
            let info = self.consumer_info(stream, group).await;
            (info.num_pending == 0 && info.num_ack_pending == 0).then_some(info)
        })
        .await
    }

    /// Rows of `ops.dlq_audit`: (action, status, reason, sequences, dry_run), oldest first.
    pub async fn audit_rows(&self) -> Vec<Audit> {
        sqlx::query_as::<_, (Uuid, String, String, String, Vec<i64>, bool, Option<serde_json::Value>)>(
            "SELECT id, action, status, reason, sequences, dry_run, outcome FROM ops.dlq_audit ORDER BY started_at",
        )
        .fetch_all(&self.db.pool)
        .await
        .expect("reading ops.dlq_audit")
        .into_iter()
        .map(|(id, action, status, reason, sequences, dry_run, outcome)| Audit {
            id,
            action,
            status,
            reason,
            sequences,
            dry_run,
            outcome,
        })
        .collect()
    }

    /// Runs `trellisctl` with this test's database, NATS server and prefix.
    pub async fn ctl(&self, args: &[&str]) -> Ctl {
        let connection = ["--database-url", &self.db.url, "--nats-url", &self.nats_url, "--nats-prefix", &self.prefix];
        run_ctl(&connection, args, "runtime-tests").await
    }
}

/// Runs `trellisctl` with `connection` flags, then `args`, as `actor`.
pub async fn run_ctl(connection: &[&str], args: &[&str], actor: &str) -> Ctl {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_trellisctl"))
        .args(connection)
        .args(args)
        .env("TRELLIS_ACTOR", actor)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("running trellisctl");
    Ctl {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[derive(Debug, Clone)]
pub struct Audit {
    pub id: Uuid,
    pub action: String,
    pub status: String,
    pub reason: String,
    pub sequences: Vec<i64>,
    pub dry_run: bool,
    pub outcome: Option<serde_json::Value>,
}

/// What a `trellisctl` run printed and how it exited.
#[derive(Debug)]
pub struct Ctl {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ctl {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Asserts it succeeded and returns stdout parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        assert!(self.success(), "trellisctl failed: {self:?}");
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("trellisctl printed no JSON ({e}): {self:?}"))
    }
}

async fn connect(url: &str) -> jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting to NATS at {url}: {e}"));
    trellis_runtime::nats::jetstream(client, Duration::from_secs(10))
}
