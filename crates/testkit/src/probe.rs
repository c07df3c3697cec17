//! `trellis-probe-worker`, the worker whose handler does what each message asks (`ok`,
//! `fail_until:N`, `fail`, `reject`, `panic`, `crash`, `sleep:MS`), for the tests of the worker
//! runtime and of the on-call tool: a test's world ([`Env`]: database, NATS prefix, streams),
//! the probe's events, its process, the table it records what it handled in, and the dead
//! letters and consumers as the server sees them.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use serde_json::json;
use trellis_runtime::consumer::RunnerContext;
use trellis_runtime::dlq::{self, Entry};
use trellis_runtime::nats::Topology;
use uuid::Uuid;

use crate::process::{Process, Spawn};
use crate::{TestDb, eventually};

/// A test's world: its own database (with the [`RECORDS`] table), its own NATS prefix with the
/// streams declared, and a JetStream client on it.
pub struct Env {
    pub db: TestDb,
    pub prefix: String,
    pub nats_url: String,
    pub topology: Topology,
    pub js: jetstream::Context,
}

impl Env {
    pub async fn new() -> Env {
        Env::on(&crate::nats_url()).await
    }

    /// An environment on another NATS server (a private one, for outage tests).
    pub async fn on(nats_url: &str) -> Env {
        Env::on_prefixed(nats_url, &crate::nats_prefix()).await
    }

    /// An environment on another NATS server with `prefix` (empty: the production names, on a
    /// server of the test's own).
    pub async fn on_prefixed(nats_url: &str, prefix: &str) -> Env {
        let db = TestDb::migrated().await.expect("a test database");
        let prefix = prefix.to_owned();
        let topology = Topology::new(&prefix).expect("a valid prefix");
        let js = connect(nats_url).await;
        trellis_runtime::nats::ensure_streams(&js, &topology).await.expect("declaring the streams");
        create_record_table(&db, RECORDS).await;
        Env { db, prefix, nats_url: nats_url.to_owned(), topology, js }
    }

    /// A probe worker with the usual fast test settings (and `extra` flags after them, which
    /// win), once its `/readyz` says ready.
    pub async fn worker(&self, extra: &[&str]) -> Process {
        worker(&self.db.url, &self.nats_url, &self.prefix, extra).ready().await
    }

    /// A probe worker, not waited for.
    pub fn worker_unready(&self, extra: &[&str]) -> Process {
        worker(&self.db.url, &self.nats_url, &self.prefix, extra).spawn()
    }

    /// What a consumer group run in the test's own process is given.
    pub fn context(&self) -> RunnerContext {
        RunnerContext {
            js: self.js.clone(),
            topology: self.topology.clone(),
            host: "tests".into(),
            version: "test".into(),
        }
    }

    /// Publishes an event whose handler will do what `probe` says; its id and its sequence in
    /// the events stream.
    pub async fn publish(&self, probe: &str) -> (Uuid, u64) {
        publish(&self.js, &self.prefix, probe).await
    }

    /// Publishes `count` events, without waiting for each ack before sending the next.
    pub async fn publish_many(&self, probe: &str, count: usize) -> Vec<Uuid> {
        publish_many(&self.js, &self.prefix, probe, count).await
    }

    /// Publishes raw bytes on `events.probe.<tail>`; the message id and sequence.
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

    /// What the probe workers recorded in `table`, in the order they handled it.
    pub async fn records_in(&self, table: &str) -> Vec<Record> {
        records_in(&self.db, table).await
    }

    /// What the probe workers recorded in [`RECORDS`].
    pub async fn records(&self) -> Vec<Record> {
        self.records_in(RECORDS).await
    }

    /// Waits until `id` is recorded in `table`; returns its rows.
    pub async fn wait_for_record_in(&self, table: &str, id: Uuid, within: Duration) -> Vec<Record> {
        eventually(&format!("event {id} recorded in {table}"), within, || async {
            let rows: Vec<Record> = self.records_in(table).await.into_iter().filter(|r| r.event_id == id).collect();
            (!rows.is_empty()).then_some(rows)
        })
        .await
    }

    /// Waits until `id` is recorded in [`RECORDS`]; returns its rows.
    pub async fn wait_for_record(&self, id: Uuid, within: Duration) -> Vec<Record> {
        self.wait_for_record_in(RECORDS, id, within).await
    }

    /// The durable consumer `group` on `stream` (events or replay), as the server sees it.
    pub async fn consumer_info(&self, stream: &str, group: &str) -> consumer::Info {
        let stream = self.js.get_stream(stream).await.expect("the stream");
        let mut c: consumer::PullConsumer =
            stream.get_consumer(&self.topology.name(group)).await.expect("the consumer");
        c.info().await.expect("consumer info").clone()
    }

    /// Waits until the group's consumer on `stream` holds nothing: every message acked or
    /// terminated.
    pub async fn wait_until_settled(&self, stream: &str, group: &str, within: Duration) -> consumer::Info {
        eventually(&format!("consumer {group} on {stream} settled"), within, || async {
            let info = self.consumer_info(stream, group).await;
            (info.num_pending == 0 && info.num_ack_pending == 0).then_some(info)
        })
        .await
    }
}

/// A JetStream client on `url`, which waits for a server that is not up yet.
/// Credentials in `url` are used as the processes use them.
pub async fn connect(url: &str) -> jetstream::Context {
    let options = trellis_runtime::nats_options::NatsOptions::from_url(url);
    let client = trellis_runtime::nats::connect(&options, "tests", Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("connecting to NATS at {}: {e}", options.url));
    trellis_runtime::nats::jetstream(client, Duration::from_secs(10))
}

/// The table every probe worker of a test records what it handled in (unless told otherwise).
pub const RECORDS: &str = "ops_probe_handled";

/// The consumer group the probe worker runs by default.
pub const PROBE: &str = "probe";

/// One handled message, as the probe worker recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub event_id: Uuid,
    pub stream_sequence: i64,
    pub deliveries: i64,
    pub pid: i32,
}

/// Creates a record table. The workers would create it, but several starting at once race on
/// `CREATE TABLE`.
pub async fn create_record_table(db: &TestDb, table: &str) {
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (event_id uuid NOT NULL, stream_sequence bigint NOT NULL,
         deliveries bigint NOT NULL, pid integer NOT NULL, handled_at timestamptz NOT NULL DEFAULT now())"
    ))
    .execute(&db.pool)
    .await
    .expect("creating the record table");
}

/// The rows of a record table, in the order they were handled.
pub async fn records_in(db: &TestDb, table: &str) -> Vec<Record> {
    sqlx::query_as::<_, (Uuid, i64, i64, i32)>(&format!(
        "SELECT event_id, stream_sequence, deliveries, pid FROM {table} ORDER BY handled_at, ctid"
    ))
    .fetch_all(&db.pool)
    .await
    .expect("reading the record table")
    .into_iter()
    .map(|(event_id, stream_sequence, deliveries, pid)| Record { event_id, stream_sequence, deliveries, pid })
    .collect()
}

/// An event envelope for the probe worker under `prefix`, on `events.probe.<probe verb>`:
/// subject, headers (`Nats-Msg-Id` = `id`) and payload.
pub fn event(prefix: &str, id: Uuid, probe: &str) -> (String, async_nats::HeaderMap, bytes::Bytes) {
    let envelope = json!({
        "id": id,
        "type": "probe.requested",
        "version": 1,
        "occurred_at": time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap(),
        "actor_id": null,
        "data": {"probe": probe},
    });
    let verb = probe.split(':').next().unwrap_or("ok").replace('_', "-");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id.to_string().as_str());
    let subject = Topology::new(prefix).expect("a valid prefix").subject(&format!("events.probe.{verb}"));
    (subject, headers, serde_json::to_vec(&envelope).unwrap().into())
}

/// Publishes an event whose handler will do what `probe` says; its id and its sequence in the
/// events stream.
pub async fn publish(js: &async_nats::jetstream::Context, prefix: &str, probe: &str) -> (Uuid, u64) {
    let id = Uuid::now_v7();
    let (subject, headers, payload) = event(prefix, id, probe);
    let ack =
        js.publish_with_headers(subject, headers, payload).await.expect("publishing").await.expect("the publish ack");
    (id, ack.sequence)
}

/// Publishes `count` events, without waiting for each ack before sending the next.
pub async fn publish_many(js: &async_nats::jetstream::Context, prefix: &str, probe: &str, count: usize) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(256) {
        let mut acks = Vec::with_capacity(chunk.len());
        for _ in chunk {
            let id = Uuid::now_v7();
            let (subject, headers, payload) = event(prefix, id, probe);
            acks.push(js.publish_with_headers(subject, headers, payload).await.expect("publishing"));
            ids.push(id);
        }
        for ack in acks {
            ack.await.expect("the publish ack");
        }
    }
    ids
}

/// The fast settings of a probe worker in a test, with the flags in `extra` (pairs of flag and
/// value) replacing them or added after them.
pub fn worker_args(extra: &[&str]) -> Vec<String> {
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

/// A probe worker on `database_url`, `nats_url` and `prefix`, recording into [`RECORDS`], with
/// [`worker_args`]`(extra)`.
pub fn worker(database_url: &str, nats_url: &str, prefix: &str, extra: &[&str]) -> Spawn {
    Spawn::new("trellis-probe-worker")
        .on(database_url, prefix)
        .env("NATS_URL", nats_url)
        .env("RUST_LOG", "info")
        .env("PROBE_RECORD_TABLE", RECORDS)
        .args(worker_args(extra))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_flags_replace_the_defaults_or_come_after_them() {
        let args = worker_args(&["--ack-wait", "1s", "--concurrency", "4"]);
        let pairs: Vec<_> = args.chunks(2).map(|p| (p[0].as_str(), p[1].as_str())).collect();
        assert!(pairs.contains(&("--ack-wait", "1s")) && !pairs.contains(&("--ack-wait", "2s")));
        assert_eq!(pairs.last(), Some(&("--concurrency", "4")));
    }

    #[test]
    fn an_event_goes_to_its_verbs_subject_under_the_prefix() {
        let (subject, headers, _) = event("t1", Uuid::nil(), "fail_until:2");
        assert_eq!(subject, "t1.events.probe.fail-until");
        assert_eq!(headers.get("Nats-Msg-Id").map(|v| v.to_string()), Some(Uuid::nil().to_string()));
    }
}
