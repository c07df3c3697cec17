//! Dead letters: their headers, publishing them, reading them back, replaying and purging.
//!
//! A dead letter is the original payload with the original headers (less `Nats-*`) plus the
//! `Trellis-*` headers below, on `dlq.<consumer>` in the `DLQ` stream. A replay republishes it
//! on `replay.<consumer>.<original subject>` (the `REPLAY` stream), which only that consumer's
//! replay consumer reads, with its replay count raised; if it dies again it comes back with
//! its whole history.

use async_nats::HeaderMap;

use crate::trace::TraceHeaders;
use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::nats::Topology;

/// Subject prefix of the server's MAX_DELIVERIES advisories.
pub const MAX_DELIVERIES_ADVISORY: &str = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES";

pub const ORIGINAL_SUBJECT: &str = "Trellis-Original-Subject";
pub const ORIGINAL_STREAM: &str = "Trellis-Original-Stream";
pub const STREAM_SEQUENCE: &str = "Trellis-Stream-Sequence";
pub const ORIGINAL_MSG_ID: &str = "Trellis-Original-Msg-Id";
pub const CONSUMER: &str = "Trellis-Consumer";
pub const DELIVERIES: &str = "Trellis-Deliveries";
pub const ERROR_KIND: &str = "Trellis-Error-Kind";
pub const ERROR: &str = "Trellis-Error";
pub const FIRST_FAILURE: &str = "Trellis-First-Failure";
pub const LAST_FAILURE: &str = "Trellis-Last-Failure";
pub const WORKER_HOST: &str = "Trellis-Worker-Host";
pub const WORKER_VERSION: &str = "Trellis-Worker-Version";
pub const REPLAY_COUNT: &str = "Trellis-Replay-Count";
pub const REPLAY_AUDIT_ID: &str = "Trellis-Replay-Audit-Id";
pub const HISTORY: &str = "Trellis-History";
/// The W3C trace context of the failed delivery (its process span), so that on-call can find
/// the trace of the request behind a dead letter; a replay's trace links to it.
pub const TRACEPARENT: &str = "Trellis-Traceparent";
pub const TRACESTATE: &str = "Trellis-Tracestate";

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The payload is not an event envelope.
    Decode,
    /// Transient failures until `max_deliver`.
    Transient,
    /// The handler rejected it.
    Permanent,
    /// Delivered `max_deliver` times with no outcome at all (found by the safety net).
    MaxDeliveries,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Decode => "decode",
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
            ErrorKind::MaxDeliveries => "max_deliveries",
        }
    }
}

/// What is known about a failure when it is dead-lettered.
pub struct DeadLetter<'a> {
    pub consumer: &'a str,
    pub original_subject: &'a str,
    pub stream: &'a str,
    pub stream_sequence: u64,
    pub deliveries: i64,
    pub kind: ErrorKind,
    pub error: &'a str,
    pub first_failure: OffsetDateTime,
    pub host: &'a str,
    pub version: &'a str,
    pub now: OffsetDateTime,
    /// The trace context of the failed delivery; without one, the message's own.
    pub trace: Option<TraceHeaders>,
}

/// One failure in a message's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub consumer: String,
    pub kind: ErrorKind,
    pub error: String,
    pub deliveries: i64,
    pub replays: u32,
}

/// The replay count a message carries (0 if it was never replayed).
pub fn replay_count(headers: Option<&HeaderMap>) -> u32 {
    headers.and_then(|h| h.get(REPLAY_COUNT)).and_then(|v| v.as_str().parse().ok()).unwrap_or(0)
}

/// The failure history a message carries.
pub fn history(headers: Option<&HeaderMap>) -> Vec<Failure> {
    headers.and_then(|h| h.get(HISTORY)).and_then(|v| serde_json::from_str(v.as_str()).ok()).unwrap_or_default()
}

/// Header values are one line; error texts are cut to a readable length.
fn header_text(text: &str) -> String {
    let one_line: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    one_line.chars().take(1000).collect()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// Copies the headers that travel with a message, without the server's `Nats-*` ones and
/// without the `Trellis-*` ones that are about to be rewritten.
fn carried_headers(original: Option<&HeaderMap>) -> HeaderMap {
    let mut out = HeaderMap::new();
    if let Some(h) = original {
        for (name, values) in h.iter() {
            let n: &str = name.as_ref();
            if n.starts_with("Nats-") || n.starts_with("Trellis-") {
                continue;
            }
            for v in values {
                out.append(n, v.as_str());
            }
        }
    }
    out
}

/// The dead letter's headers and deterministic message id.
pub fn dead_letter_headers(letter: &DeadLetter<'_>, original: Option<&HeaderMap>) -> HeaderMap {
    let mut h = carried_headers(original);
    let replays = replay_count(original);
    let mut past = history(original);
    past.push(Failure {
        at: letter.now,
        consumer: letter.consumer.to_owned(),
        kind: letter.kind,
        error: header_text(letter.error),
        deliveries: letter.deliveries,
        replays,
    });
    // Keep the header bounded: the oldest failure and the most recent ones.
    if past.len() > 10 {
        let first = past[0].clone();
        past.drain(..past.len() - 9);
        past.insert(0, first);
    }
    let msg_id = format!("dlq-{}-{}", letter.stream, letter.stream_sequence);
    h.insert("Nats-Msg-Id", msg_id.as_str());
    if let Some(id) = original.and_then(|o| o.get("Nats-Msg-Id")) {
        h.insert(ORIGINAL_MSG_ID, id.as_str());
    }
    h.insert(ORIGINAL_SUBJECT, letter.original_subject);
    h.insert(ORIGINAL_STREAM, letter.stream);
    h.insert(STREAM_SEQUENCE, letter.stream_sequence.to_string().as_str());
    h.insert(CONSUMER, letter.consumer);
    h.insert(DELIVERIES, letter.deliveries.to_string().as_str());
    h.insert(ERROR_KIND, letter.kind.as_str());
    h.insert(ERROR, header_text(letter.error).as_str());
    h.insert(FIRST_FAILURE, rfc3339(letter.first_failure).as_str());
    h.insert(LAST_FAILURE, rfc3339(letter.now).as_str());
    h.insert(WORKER_HOST, letter.host);
    h.insert(WORKER_VERSION, letter.version);
    h.insert(REPLAY_COUNT, replays.to_string().as_str());
    if let Some(audit) = original.and_then(|o| o.get(REPLAY_AUDIT_ID)) {
        h.insert(REPLAY_AUDIT_ID, audit.as_str());
    }
    h.insert(HISTORY, serde_json::to_string(&past).unwrap_or_default().as_str());
    if let Some(trace) = letter.trace.clone().or_else(|| TraceHeaders::from_nats(original)) {
        h.insert(TRACEPARENT, trace.traceparent.as_str());
        if let Some(state) = &trace.tracestate {
            h.insert(TRACESTATE, state.as_str());
        }
    }
    h
}

/// The failed delivery's trace context a dead letter (or its replay) carries.
pub fn failed_trace(headers: Option<&HeaderMap>) -> Option<TraceHeaders> {
    let headers = headers?;
    let traceparent = headers.get(TRACEPARENT)?.as_str().to_owned();
    let tracestate = headers.get(TRACESTATE).map(|v| v.as_str().to_owned());
    Some(TraceHeaders { traceparent, tracestate })
}

/// Publishes a dead letter and waits for the DLQ stream to acknowledge it.
pub async fn publish(
    js: &jetstream::Context,
    topology: &Topology,
    letter: &DeadLetter<'_>,
    original: Option<&HeaderMap>,
    payload: Bytes,
) -> anyhow::Result<()> {
    let headers = dead_letter_headers(letter, original);
    let subject = topology.subject(&format!("dlq.{}", letter.consumer));
    js.publish_with_headers(subject, headers, payload).await?.await?;
    Ok(())
}

/// Dead letters of `consumer` now in the DLQ.
pub async fn depth(js: &jetstream::Context, topology: &Topology, consumer: &str) -> anyhow::Result<u64> {
    let stream = js.get_stream(topology.dlq_stream()).await?;
    let mut subjects = stream.info_with_subjects(topology.subject(&format!("dlq.{consumer}"))).await?;
    let mut total = 0u64;
    while let Some(entry) = subjects.next().await {
        total += entry?.1 as u64;
    }
    Ok(total)
}

/// A dead letter as stored.
#[derive(Debug, Clone)]
pub struct Entry {
    pub sequence: u64,
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
    pub time: OffsetDateTime,
    /// [`Entry::fingerprint`], computed once.
    fingerprint: std::sync::OnceLock<String>,
}

impl Entry {
    pub fn new(sequence: u64, subject: String, headers: HeaderMap, payload: Bytes, time: OffsetDateTime) -> Self {
        Entry { sequence, subject, headers, payload, time, fingerprint: std::sync::OnceLock::new() }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }

    pub fn consumer(&self) -> &str {
        self.header(CONSUMER).unwrap_or("")
    }

    pub fn kind(&self) -> &str {
        self.header(ERROR_KIND).unwrap_or("")
    }

    pub fn error(&self) -> &str {
        self.header(ERROR).unwrap_or("")
    }

    pub fn replays(&self) -> u32 {
        replay_count(Some(&self.headers))
    }

    pub fn original_subject(&self) -> &str {
        self.header(ORIGINAL_SUBJECT).unwrap_or("")
    }

    /// The trace id of the failed delivery (32 hex digits), if the dead letter carries one.
    pub fn trace_id(&self) -> Option<String> {
        let trace = failed_trace(Some(&self.headers))?;
        trace.span_context().map(|sc| sc.trace_id().to_string())
    }

    /// The error kind plus the error text with numbers and ids masked: equal for failures of
    /// the same cause.
    pub fn fingerprint(&self) -> &str {
        self.fingerprint.get_or_init(|| format!("{}: {}", self.kind(), mask(self.error())))
    }
}

/// Masks UUIDs, hex strings and numbers so that failures of one cause read the same.
pub fn mask(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for token in text.split_inclusive(|c: char| c.is_whitespace() || ",;:()[]{}'\"=/".contains(c)) {
        let (word, sep) = match token.char_indices().last() {
            Some((i, c)) if c.is_whitespace() || ",;:()[]{}'\"=/".contains(c) => (&token[..i], &token[i..]),
            _ => (token, ""),
        };
        let looks_like_id = uuid::Uuid::parse_str(word).is_ok()
            || (word.len() >= 8
                && word.chars().all(|c| c.is_ascii_hexdigit())
                && word.chars().any(|c| c.is_ascii_digit()));
        if looks_like_id {
            out.push_str("<id>");
        } else {
            let mut last_digit = false;
            for c in word.chars() {
                if c.is_ascii_digit() {
                    if !last_digit {
                        out.push('N');
                    }
                    last_digit = true;
                } else {
                    out.push(c);
                    last_digit = false;
                }
            }
        }
        out.push_str(sep);
    }
    out
}

/// Reads every dead letter on `dlq.<consumer>` (or all consumers), from `from_sequence` on.
pub async fn read(
    js: &jetstream::Context,
    topology: &Topology,
    consumer: Option<&str>,
    from_sequence: u64,
) -> anyhow::Result<Vec<Entry>> {
    let stream = js.get_stream(topology.dlq_stream()).await?;
    let filter = topology.subject(&match consumer {
        Some(c) => format!("dlq.{c}"),
        None => "dlq.>".to_owned(),
    });
    let deliver_policy = if from_sequence > 1 {
        consumer::DeliverPolicy::ByStartSequence { start_sequence: from_sequence }
    } else {
        consumer::DeliverPolicy::All
    };
    let mut reader = stream
        .create_consumer(consumer::pull::OrderedConfig { filter_subject: filter, deliver_policy, ..Default::default() })
        .await?;
    let pending = reader.info().await?.num_pending;
    let mut out = Vec::with_capacity(pending as usize);
    if pending == 0 {
        return Ok(out);
    }
    let mut messages = reader.messages().await?;
    while let Some(m) = tokio::time::timeout(std::time::Duration::from_secs(10), messages.next()).await? {
        let m = m?;
        let info = m.info().map_err(|e| anyhow::anyhow!(e))?;
        let (sequence, time, left) = (info.stream_sequence, info.published, info.pending);
        out.push(Entry::new(
            sequence,
            m.subject.to_string(),
            m.headers.clone().unwrap_or_default(),
            m.payload.clone(),
            time,
        ));
        if left == 0 {
            break;
        }
    }
    Ok(out)
}

/// Reads one dead letter by its DLQ sequence.
pub async fn get(js: &jetstream::Context, topology: &Topology, sequence: u64) -> anyhow::Result<Entry> {
    let stream = js.get_stream(topology.dlq_stream()).await?;
    let m = stream.get_raw_message(sequence).await?;
    Ok(Entry::new(m.sequence, m.subject.to_string(), m.headers, m.payload, m.time))
}

/// Publishes replays of many dead letters with their acknowledgements pipelined; does not
/// remove them from the DLQ (see [`remove`] and [`remove_through`]): a dead letter may leave
/// only once its own replay was acknowledged. Returns, per entry, the replay's sequence in the
/// REPLAY stream or the error.
pub async fn publish_replays(
    js: &jetstream::Context,
    topology: &Topology,
    entries: &[Entry],
    audit_id: &str,
) -> Vec<anyhow::Result<u64>> {
    let mut acks = Vec::with_capacity(entries.len());
    for entry in entries {
        let sent = async {
            let consumer = entry.consumer();
            let original = entry.original_subject();
            anyhow::ensure!(
                !consumer.is_empty() && !original.is_empty(),
                "dead letter {} lacks its Trellis headers",
                entry.sequence
            );
            let mut h = carried_headers(Some(&entry.headers));
            h.insert("Nats-Msg-Id", format!("replay-{audit_id}-{}", entry.sequence).as_str());
            h.insert(REPLAY_COUNT, (entry.replays() + 1).to_string().as_str());
            h.insert(REPLAY_AUDIT_ID, audit_id);
            if let Some(history) = entry.header(HISTORY) {
                h.insert(HISTORY, history);
            }
            // A replay is a new trace; its consumer's process span links to the failed delivery.
            replay_trace().to_nats(&mut h);
            if let Some(failed) = failed_trace(Some(&entry.headers)) {
                h.insert(TRACEPARENT, failed.traceparent.as_str());
                if let Some(state) = &failed.tracestate {
                    h.insert(TRACESTATE, state.as_str());
                }
            }
            let subject = topology.subject(&format!("replay.{consumer}.{original}"));
            Ok(js.publish_with_headers(subject, h, entry.payload.clone()).await?)
        }
        .await;
        acks.push(sent);
    }
    futures::future::join_all(acks.into_iter().map(|sent| async move {
        match sent {
            Ok(ack) => ack.await.map(|a| a.sequence).map_err(anyhow::Error::from),
            Err(e) => Err(e),
        }
    }))
    .await
}

/// A new trace context for a replay: a fresh trace id and span id, sampled.
fn replay_trace() -> TraceHeaders {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let span_id = &uuid::Uuid::new_v4().simple().to_string()[..16];
    TraceHeaders { traceparent: format!("00-{trace_id}-{span_id}-01"), tracestate: None }
}

/// Removes these dead letters one by one (requests in flight together).
pub async fn remove(js: &jetstream::Context, topology: &Topology, sequences: &[u64]) -> Vec<anyhow::Result<()>> {
    let stream = match js.get_stream(topology.dlq_stream()).await {
        Ok(s) => s,
        Err(e) => return sequences.iter().map(|_| Err(anyhow::anyhow!("DLQ stream: {e}"))).collect(),
    };
    let stream = &stream;
    futures::future::join_all(sequences.iter().map(|&seq| async move {
        stream.delete_message(seq).await?;
        Ok(())
    }))
    .await
}

/// Removes every dead letter of `consumer` up to and including `sequence` in one request: for
/// a caller that knows it has acted on all of them.
pub async fn remove_through(
    js: &jetstream::Context,
    topology: &Topology,
    consumer: &str,
    sequence: u64,
) -> anyhow::Result<u64> {
    let stream = js.get_stream(topology.dlq_stream()).await?;
    let purged = stream.purge().filter(topology.subject(&format!("dlq.{consumer}"))).sequence(sequence + 1).await?;
    Ok(purged.purged)
}

/// Removes a dead letter for good.
pub async fn purge(js: &jetstream::Context, topology: &Topology, sequence: u64) -> anyhow::Result<()> {
    let stream = js.get_stream(topology.dlq_stream()).await?;
    stream.delete_message(sequence).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_makes_failures_of_one_cause_equal() {
        let a = mask("user 01a213ba-43e7-757c-a822-ecce10dd6734 not found after 3 tries (seq=1234)");
        let b = mask("user 01a213bb-0000-757c-a822-ecce10dd6799 not found after 5 tries (seq=99)");
        assert_eq!(a, b);
        assert_eq!(a, "user <id> not found after N tries (seq=N)");
    }

    #[test]
    fn dead_letter_headers_carry_the_history_and_a_deterministic_id() {
        let now = time::macros::datetime!(2026-11-25 12:00 UTC);
        let letter = DeadLetter {
            consumer: "search-projector",
            original_subject: "events.contacts.contact_added",
            stream: "EVENTS",
            stream_sequence: 42,
            deliveries: 5,
            kind: ErrorKind::Transient,
            error: "db down\nagain",
            first_failure: now - time::Duration::minutes(1),
            host: "h",
            version: "v",
            now,
            trace: None,
        };
        let mut original = HeaderMap::new();
        original.insert("Nats-Msg-Id", "evt-1");
        original.insert("X-Custom", "kept");
        let h = dead_letter_headers(&letter, Some(&original));
        assert_eq!(h.get("Nats-Msg-Id").unwrap().as_str(), "dlq-EVENTS-42");
        assert_eq!(h.get(ORIGINAL_MSG_ID).unwrap().as_str(), "evt-1");
        assert_eq!(h.get("X-Custom").unwrap().as_str(), "kept");
        assert_eq!(h.get(ERROR).unwrap().as_str(), "db down again");
        assert_eq!(h.get(REPLAY_COUNT).unwrap().as_str(), "0");
        assert_eq!(history(Some(&h)).len(), 1);
        // dying again after a replay keeps the history and the count
        let mut replayed = carried_headers(Some(&h));
        replayed.insert(REPLAY_COUNT, "1");
        replayed.insert(HISTORY, h.get(HISTORY).unwrap().as_str());
        let again =
            dead_letter_headers(&DeadLetter { stream: "REPLAY", stream_sequence: 7, ..letter }, Some(&replayed));
        assert_eq!(again.get(REPLAY_COUNT).unwrap().as_str(), "1");
        let past = history(Some(&again));
        assert_eq!(past.len(), 2);
        assert_eq!(past[1].replays, 1);
        assert_eq!(again.get("Nats-Msg-Id").unwrap().as_str(), "dlq-REPLAY-7");
    }
}
