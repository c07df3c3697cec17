//! `trellis-dlq-bench`: the dead letters of `cargo xtask bench console`, and the floor of the
//! console's dead-letters page.
//!
//! - `trellis-dlq-bench fill COUNT` publishes COUNT dead letters to the DLQ stream of
//!   `NATS_PREFIX` (the stream must exist: start trellis-api on the prefix first), with the
//!   headers the runtime writes (`trellis_runtime::dlq::dead_letter_headers`), spread over three
//!   consumers and twenty error fingerprints of uneven sizes, each payload an event envelope.
//!   Prints one JSON line: how many, the DLQ's depth, the fingerprint and consumer of a middling
//!   group, and the newest sequence. With no worker running, it also creates the processors'
//!   consumer groups on the events stream (as durable pull consumers), so that the console's
//!   overview finds each one as in a deployment.
//! - `trellis-dlq-bench read REPEAT CONCURRENCY` reads the whole DLQ REPEAT times with the raw
//!   async-nats ordered consumer (consumer, info, every message to the last: what
//!   `trellis_runtime::dlq::read` does, without keeping anything), one reader at a time,
//!   alternating with a read through `trellis_runtime::dlq::read`, then with CONCURRENCY raw
//!   readers at once; with the reader's own CPU time per raw read.
//!   Prints one JSON line of milliseconds per read (median and max of each).
//!
//! - `trellis-dlq-bench clean` deletes the prefix's streams.
//!
//! Each takes `NATS_URL` (default `nats://127.0.0.1:4222`) and `NATS_PREFIX`.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use futures::StreamExt as _;
use serde_json::json;
use time::OffsetDateTime;
use trellis_runtime::dlq::{self, DeadLetter, ErrorKind};
use trellis_runtime::nats::{self, Topology};

/// The consumers the dead letters are spread over (the processors' own names, so that the
/// console's overview counts them).
const CONSUMERS: [&str; 3] = ["search-projector", "score-orchestrator", "dispute-processor-p1"];

/// The causes: consumer (index into [`CONSUMERS`]), kind, and the error text, where `{n}` is
/// replaced by a number and `{id}` by a UUID (both masked in the fingerprint).
const CAUSES: [(usize, ErrorKind, &str); 20] = [
    (0, ErrorKind::Transient, "pool timed out while waiting for an open connection after {n} ms"),
    (1, ErrorKind::Permanent, "score run {id} is already finished"),
    (2, ErrorKind::Permanent, "dispute {id} is already decided"),
    (0, ErrorKind::Permanent, "directory document of user {id} has no handle"),
    (2, ErrorKind::Transient, "could not serialize access due to concurrent update (attempt {n})"),
    (1, ErrorKind::Transient, "advisory lock score_run held by another session (pid {n})"),
    (0, ErrorKind::Decode, "not an event envelope: missing field `type` at line 1 column {n}"),
    (2, ErrorKind::Permanent, "reporter {id} is suspended"),
    (1, ErrorKind::MaxDeliveries, "delivered {n} times without an outcome"),
    (0, ErrorKind::Transient, "canceling statement due to statement timeout ({n} rows of search.name_postings)"),
    (2, ErrorKind::Transient, "deadlock detected: process {n} waits for ShareLock on transaction {n}"),
    (1, ErrorKind::Transient, "connection reset by peer (os error {n})"),
    (0, ErrorKind::Permanent, "contact {id} of owner {id} not found"),
    (2, ErrorKind::Decode, "invalid type: string \"{n}\", expected u8 at line 1 column {n}"),
    (1, ErrorKind::Permanent, "graph of {n} edges exceeds the run's limit"),
    (0, ErrorKind::MaxDeliveries, "delivered {n} times without an outcome"),
    (2, ErrorKind::Permanent, "rule r{n} refers to an unknown score version"),
    (1, ErrorKind::Decode, "unknown event type `scores.run_requested` version {n}"),
    (0, ErrorKind::Permanent, "unknown event type `contacts.contact_merged` version {n}"),
    (2, ErrorKind::MaxDeliveries, "delivered {n} times without an outcome"),
];

/// Every processor's consumer group, as the console's overview lists them.
const PROCESSOR_CONSUMERS: [&str; 6] = [
    "search-projector",
    "score-orchestrator",
    "dispute-processor-p0",
    "dispute-processor-p1",
    "dispute-processor-p2",
    "dispute-processor-p3",
];

/// The event type of each consumer's dead letters.
const EVENT_TYPES: [&str; 3] = ["contacts.contact_added", "scores.run_requested", "disputes.filed"];

/// splitmix64: the same letters on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn uuid(&mut self) -> uuid::Uuid {
        uuid::Builder::from_random_bytes(((u128::from(self.next()) << 64) | u128::from(self.next())).to_be_bytes())
            .into_uuid()
    }
}

fn error_text(template: &str, rng: &mut Rng) -> String {
    let mut out = template.to_owned();
    while let Some(at) = out.find("{id}") {
        out.replace_range(at..at + 4, &rng.uuid().to_string());
    }
    while let Some(at) = out.find("{n}") {
        out.replace_range(at..at + 3, &(rng.next() % 100_000).to_string());
    }
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let prefix = std::env::var("NATS_PREFIX").map_err(|_| anyhow::anyhow!("NATS_PREFIX is required"))?;
    let topology = Topology::new(&prefix)?;
    let client = nats::connect(
        &trellis_runtime::nats_options::NatsOptions::from_url(&nats_url),
        "dlq-bench",
        Duration::from_secs(10),
    )
    .await?;
    let js = nats::jetstream(client, Duration::from_secs(30));
    let number = |i: usize, what: &str| -> anyhow::Result<u64> {
        args.get(i)
            .ok_or_else(|| anyhow::anyhow!("missing {what}"))?
            .parse()
            .map_err(|e| anyhow::anyhow!("{what}: {e}"))
    };
    let out = match args.first().map(String::as_str) {
        Some("fill") => fill(&js, &topology, number(1, "COUNT")?).await?,
        Some("read") => read(&js, &topology, number(1, "REPEAT")?, number(2, "CONCURRENCY")?).await?,
        Some("clean") => {
            let mut deleted = Vec::new();
            for stream in
                [topology.events_stream(), topology.dlq_stream(), topology.replay_stream(), topology.advisory_stream()]
            {
                if js.delete_stream(&stream).await.is_ok() {
                    deleted.push(stream);
                }
            }
            json!({ "deleted": deleted })
        }
        _ => anyhow::bail!("usage: trellis-dlq-bench fill COUNT | read REPEAT CONCURRENCY | clean"),
    };
    println!("{out}");
    Ok(())
}

async fn fill(js: &jetstream::Context, topology: &Topology, count: u64) -> anyhow::Result<serde_json::Value> {
    let mut rng = Rng(42);
    let now = OffsetDateTime::now_utc();
    let events_stream = topology.events_stream();
    let events = js.get_stream(&events_stream).await?;
    for name in PROCESSOR_CONSUMERS {
        let durable = topology.name(name);
        if events.get_consumer::<consumer::pull::Config>(&durable).await.is_err() {
            events
                .create_consumer(consumer::pull::Config {
                    durable_name: Some(durable),
                    filter_subject: topology.subject("events.>"),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ..Default::default()
                })
                .await?;
        }
    }
    let mut sizes = [0u64; CAUSES.len()];
    let mut acks = Vec::with_capacity(1024);
    let mut newest = 0;
    for n in 0..count {
        // Uneven groups, as in a real incident: cause i with weight about 1 / (i + 1).
        let cause = ((CAUSES.len() as f64 + 1.0).powf(rng.unit()) - 1.0) as usize % CAUSES.len();
        sizes[cause] += 1;
        let (consumer, kind, template) = CAUSES[cause];
        let error = error_text(template, &mut rng);
        let event_type = EVENT_TYPES[consumer];
        let minutes_ago = time::Duration::minutes((count - n) as i64 / 20);
        let letter = DeadLetter {
            consumer: CONSUMERS[consumer],
            original_subject: &topology.subject(&format!("events.{event_type}")),
            stream: &events_stream,
            stream_sequence: 1_000 + n * 7,
            deliveries: if kind == ErrorKind::Permanent || kind == ErrorKind::Decode { 1 } else { 5 },
            kind,
            error: &error,
            first_failure: now - minutes_ago - time::Duration::seconds(30),
            host: "bench-worker-1",
            version: env!("CARGO_PKG_VERSION"),
            now: now - minutes_ago,
            trace: None,
        };
        let headers = dlq::dead_letter_headers(&letter, None);
        let payload: Bytes = serde_json::to_vec(&json!({
            "id": rng.uuid(), "type": event_type, "version": 1,
            "occurred_at": "2026-11-25T12:00:00Z", "actor_id": rng.uuid(),
            "data": {"owner_id": rng.uuid(), "contact_id": rng.uuid(), "label": format!("contact {n}")},
        }))?
        .into();
        let subject = topology.subject(&format!("dlq.{}", CONSUMERS[consumer]));
        acks.push(js.publish_with_headers(subject, headers, payload).await?);
        if acks.len() == 1024 {
            for ack in acks.drain(..) {
                newest = newest.max(ack.await?.sequence);
            }
        }
    }
    for ack in acks {
        newest = newest.max(ack.await?.sequence);
    }
    let depth = js.get_stream(topology.dlq_stream()).await?.info().await?.state.messages;
    // A middling group: the fifth largest.
    let mut by_size: Vec<usize> = (0..CAUSES.len()).collect();
    by_size.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
    let middling = by_size[4.min(by_size.len() - 1)];
    // A cause's fingerprint does not depend on the numbers and ids drawn (they are masked).
    let fingerprint_of = |cause: usize, rng: &mut Rng| {
        let (_, kind, template) = CAUSES[cause];
        format!("{}: {}", kind.as_str(), dlq::mask(&error_text(template, rng)))
    };
    let fingerprint = fingerprint_of(middling, &mut rng);
    // One fingerprint can be several consumers' (`delivered N times without an outcome`).
    let everywhere: u64 = (0..CAUSES.len())
        .filter(|&cause| fingerprint_of(cause, &mut rng) == fingerprint)
        .map(|cause| sizes[cause])
        .sum();
    Ok(json!({
        "published": count,
        "depth": depth,
        "groups": sizes.iter().filter(|&&s| s > 0).count(),
        "fingerprint": fingerprint,
        "fingerprint_count": everywhere,
        "fingerprint_consumer": CONSUMERS[CAUSES[middling].0],
        "fingerprint_consumer_count": sizes[middling],
        "newest_sequence": newest,
    }))
}

/// One whole read of the DLQ with the ordered consumer; returns the messages read.
async fn raw_read(js: &jetstream::Context, topology: &Topology) -> anyhow::Result<u64> {
    let stream = js.get_stream(topology.dlq_stream()).await?;
    let mut reader = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: topology.subject("dlq.>"),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    if reader.info().await?.num_pending == 0 {
        return Ok(0);
    }
    let mut messages = reader.messages().await?;
    let mut read = 0;
    while let Some(m) = tokio::time::timeout(Duration::from_secs(10), messages.next()).await? {
        let m = m?;
        read += 1;
        if m.info().map_err(|e| anyhow::anyhow!(e))?.pending == 0 {
            break;
        }
    }
    Ok(read)
}

/// This process's CPU time so far (user and system, `/proc/self/stat`, 10 ms ticks).
fn cpu_ms() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let after = stat.rsplit_once(')').ok_or_else(|| anyhow::anyhow!("malformed /proc/self/stat"))?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 * 10.0)
}

fn summary(mut ms: Vec<f64>) -> serde_json::Value {
    ms.sort_by(f64::total_cmp);
    json!({ "median_ms": ms[ms.len() / 2], "max_ms": ms[ms.len() - 1], "reads": ms.len() })
}

async fn read(
    js: &jetstream::Context,
    topology: &Topology,
    repeat: u64,
    concurrency: u64,
) -> anyhow::Result<serde_json::Value> {
    let repeat = repeat.max(1);
    // The raw read and the runtime's alternate, so that neither has the colder store.
    let (mut sequential, mut runtime) = (Vec::new(), Vec::new());
    let mut messages = 0;
    let mut raw_cpu_ms = 0.0;
    for _ in 0..repeat {
        let cpu = cpu_ms()?;
        let started = Instant::now();
        messages = raw_read(js, topology).await?;
        sequential.push(started.elapsed().as_secs_f64() * 1000.0);
        raw_cpu_ms += cpu_ms()? - cpu;
        let started = Instant::now();
        let entries = dlq::read(js, topology, None, 1).await?;
        runtime.push(started.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(entries.len() as u64 == messages, "read {} then {messages}", entries.len());
    }
    let mut concurrent = Vec::new();
    for _ in 0..repeat {
        let readers = (0..concurrency.max(1)).map(|_| async {
            let started = Instant::now();
            raw_read(js, topology).await.map(|_| started.elapsed().as_secs_f64() * 1000.0)
        });
        for took in futures::future::join_all(readers).await {
            concurrent.push(took?);
        }
    }
    Ok(json!({
        "messages": messages,
        "raw": summary(sequential),
        "raw_cpu_ms_per_read": raw_cpu_ms / repeat as f64,
        "raw_concurrent": summary(concurrent),
        "concurrency": concurrency.max(1),
        "runtime_read": summary(runtime),
    }))
}
