//! `trellis-probe-worker`, the worker whose handler does what each message asks (`ok`,
//! `fail_until:N`, `fail`, `reject`, `panic`, `crash`, `sleep:MS`), for the tests of the worker
//! runtime and of the on-call tool: its events, its process, and the table it records what it
//! handled in.

use serde_json::json;
use uuid::Uuid;

use crate::TestDb;
use crate::process::Spawn;

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
    (format!("{prefix}.events.probe.{verb}"), headers, serde_json::to_vec(&envelope).unwrap().into())
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
