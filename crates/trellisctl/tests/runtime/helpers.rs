//! The harness: a database and a NATS prefix per test, real `trellis-probe-worker` child
//! processes, `trellisctl` runs, and bounded polling.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_runtime::dlq::{self, Entry};
use trellis_runtime::nats::Topology;
use trellis_testkit::TestDb;
use uuid::Uuid;

/// The table every probe worker of a test records what it handled in (unless told otherwise).
pub const RECORDS: &str = "ops_probe_handled";

/// The consumer group the probe worker runs by default.
pub const PROBE: &str = "probe";

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
        Worker::spawn(self, extra).await
    }

    /// Publishes an event whose handler will do what `probe` says; returns its id and its
    /// sequence in the events stream.
    pub async fn publish(&self, probe: &str) -> (Uuid, u64) {
        publish_on(&self.js, &self.topology, probe).await
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

    /// Publishes many events without waiting for each ack before sending the next.
    pub async fn publish_many(&self, probe: &str, count: usize) -> Vec<Uuid> {
        let mut ids = Vec::with_capacity(count);
        for chunk in (0..count).collect::<Vec<_>>().chunks(256) {
            let mut acks = Vec::with_capacity(chunk.len());
            for _ in chunk {
                let id = Uuid::now_v7();
                let (subject, headers, payload) = event(&self.topology, id, probe);
                acks.push(self.js.publish_with_headers(subject, headers, payload).await.expect("publishing"));
                ids.push(id);
            }
            for ack in acks {
                ack.await.expect("the publish ack");
            }
        }
        ids
    }

    /// Every dead letter now in the DLQ (of one consumer, or all).
    pub async fn dead_letters(&self, consumer: Option<&str>) -> Vec<Entry> {
        dlq::read(&self.js, &self.topology, consumer, 1).await.expect("reading the DLQ")
    }

    /// Waits until the DLQ holds at least `count` dead letters (of `consumer`, or all).
    pub async fn wait_for_dead_letters(&self, consumer: Option<&str>, count: usize, within: Duration) -> Vec<Entry> {
        eventually(within, &format!("{count} dead letters of {consumer:?}"), || async {
            let entries = self.dead_letters(consumer).await;
            (entries.len() >= count).then_some(entries)
        })
        .await
    }

    /// Rows of a record table: (event id, deliveries, pid), in insertion order.
    pub async fn records_in(&self, table: &str) -> Vec<Record> {
        sqlx::query_as::<_, (Uuid, i64, i64, i32)>(&format!(
            "SELECT event_id, stream_sequence, deliveries, pid FROM {table} ORDER BY handled_at, ctid"
        ))
        .fetch_all(&self.db.pool)
        .await
        .expect("reading the record table")
        .into_iter()
        .map(|(event_id, stream_sequence, deliveries, pid)| Record { event_id, stream_sequence, deliveries, pid })
        .collect()
    }

    pub async fn records(&self) -> Vec<Record> {
        self.records_in(RECORDS).await
    }

    /// Waits until `id` is recorded in `table`; returns its rows.
    pub async fn wait_for_record_in(&self, table: &str, id: Uuid, within: Duration) -> Vec<Record> {
        eventually(within, &format!("event {id} recorded in {table}"), || async {
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
        eventually(within, &format!("consumer {group} on {stream} settled"), || async {
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub event_id: Uuid,
    pub stream_sequence: i64,
    pub deliveries: i64,
    pub pid: i32,
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

pub async fn connect(url: &str) -> jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting to NATS at {url}: {e}"));
    trellis_runtime::nats::jetstream(client, Duration::from_secs(10))
}

pub async fn create_record_table(db: &TestDb, table: &str) {
    // The workers would create it, but several starting at once race on CREATE TABLE.
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (event_id uuid NOT NULL, stream_sequence bigint NOT NULL,
         deliveries bigint NOT NULL, pid integer NOT NULL, handled_at timestamptz NOT NULL DEFAULT now())"
    ))
    .execute(&db.pool)
    .await
    .expect("creating the record table");
}

/// An event envelope for the probe worker, on `events.probe.<probe verb>`.
fn event(topology: &Topology, id: Uuid, probe: &str) -> (String, async_nats::HeaderMap, bytes::Bytes) {
    let now = time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap();
    let envelope = json!({
        "id": id,
        "type": "probe.requested",
        "version": 1,
        "occurred_at": now,
        "actor_id": null,
        "data": {"probe": probe},
    });
    let verb = probe.split(':').next().unwrap_or("ok").replace('_', "-");
    let subject = topology.subject(&format!("events.probe.{verb}"));
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id.to_string().as_str());
    (subject, headers, serde_json::to_vec(&envelope).unwrap().into())
}

pub async fn publish_on(js: &jetstream::Context, topology: &Topology, probe: &str) -> (Uuid, u64) {
    let id = Uuid::now_v7();
    let (subject, headers, payload) = event(topology, id, probe);
    let ack =
        js.publish_with_headers(subject, headers, payload).await.expect("publishing").await.expect("the publish ack");
    (id, ack.sequence)
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

/// The probe worker binary, built next to `trellisctl`.
pub fn probe_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_trellisctl")).with_file_name("trellis-probe-worker");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p trellis-runtime --bins` (or run `cargo nextest run --workspace`)",
        path.display()
    );
    path
}

/// The fast test settings, with the flags in `extra` (pairs of flag and value) replacing them.
fn worker_args(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<(String, String)> = [
        ("--max-deliver", "3"),
        ("--retry-min", "50ms"),
        ("--retry-max", "200ms"),
        ("--ack-wait", "2s"),
        ("--batch-size", "16"),
        ("--shutdown-grace", "15s"),
        ("--io-timeout", "2s"),
    ]
    .iter()
    .map(|(f, v)| ((*f).to_owned(), (*v).to_owned()))
    .collect();
    assert!(extra.len().is_multiple_of(2), "worker flags come in pairs: {extra:?}");
    for pair in extra.chunks(2) {
        match args.iter_mut().find(|(f, _)| f == pair[0]) {
            Some(existing) => existing.1 = pair[1].to_owned(),
            None => args.push((pair[0].to_owned(), pair[1].to_owned())),
        }
    }
    args.into_iter().flat_map(|(f, v)| [f, v]).collect()
}

/// A `trellis-probe-worker` child process.
pub struct Worker {
    pub child: tokio::process::Child,
    pub pid: i32,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl Worker {
    /// Spawns a worker and waits until its `/readyz` says ready.
    pub async fn spawn(env: &Env, extra: &[&str]) -> Worker {
        let mut w = Self::spawn_unready(env, &env.nats_url, extra);
        w.wait_ready(Duration::from_secs(30)).await;
        w
    }

    /// Spawns a worker (against `nats_url`) without waiting for it.
    pub fn spawn_unready(env: &Env, nats_url: &str, extra: &[&str]) -> Worker {
        let port = trellis_testkit::free_port().expect("a free port");
        let admin: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let (log, file) = trellis_testkit::log_file(&format!("trellis-probe-worker-{}", env.prefix));
        let child = tokio::process::Command::new(probe_binary())
            .args(worker_args(extra))
            .env("DATABASE_URL", &env.db.url)
            .env("NATS_URL", nats_url)
            .env("NATS_PREFIX", &env.prefix)
            .env("ADMIN_ADDR", admin.to_string())
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env("PROBE_RECORD_TABLE", RECORDS)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("spawning trellis-probe-worker");
        let pid = child.id().expect("a pid") as i32;
        Worker { child, pid, admin, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `/readyz` status code, or `None` if the listener does not answer.
    pub async fn readyz(&self) -> Option<u16> {
        http_status(self.admin, "/readyz").await
    }

    pub async fn wait_ready(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.readyz().await == Some(200) {
                return;
            }
            assert!(self.alive(), "worker {} exited before it was ready; its log:\n{}", self.pid, self.log_text());
            assert!(
                tokio::time::Instant::now() < deadline,
                "worker {} not ready after {within:?}; its log:\n{}",
                self.pid,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("polling the worker").is_none()
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("killing the worker");
    }

    /// Sends SIGTERM.
    pub async fn terminate(&self) {
        let status = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await
            .expect("running kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid);
    }

    /// Waits for the process to exit; returns its exit code (None if killed by a signal).
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("waiting for the worker").code(),
            Err(_) => panic!("worker {} still running after {within:?}; its log:\n{}", self.pid, self.log_text()),
        }
    }
}

/// A plain HTTP/1.0 GET: the status code, or `None` if nothing answers.
pub async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        text.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(5), exchange).await.ok().flatten()
}
