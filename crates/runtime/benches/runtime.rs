//! `cargo xtask bench runtime`: how fast one worker drains a consumer group through a no-op
//! handler with acks, and how fast `trellisctl dlq replay` moves dead letters back; and, in the
//! same run, this machine's limits for both, measured with async-nats alone (a publish loop, and
//! a pull-and-ack loop on a stream of its own): the runtime's figures as ratios to them.
//!
//! Needs NATS (`NATS_URL`), PostgreSQL (`DATABASE_URL`, for the replay audit) and a release
//! `trellisctl` (`TRELLISCTL`). Prints Markdown rows for `docs/BENCHMARKS.md`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use trellis_runtime::consumer::{ConsumerGroup, ConsumerSpec, Delivery, Handler, Outcome, RunnerConfig, RunnerContext};
use trellis_runtime::dlq::{self, DeadLetter, ErrorKind};
use trellis_runtime::nats::{self, Topology};

const DRAIN: u64 = 200_000;
const REPLAY: u64 = 50_000;

/// Counts the messages and the batches it is handed; notifies once it has had `DRAIN` messages.
#[derive(Default)]
struct Noop {
    messages: AtomicU64,
    batches: AtomicU64,
    drained: tokio::sync::Notify,
}

impl Handler for Noop {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        self.batches.fetch_add(1, Ordering::Relaxed);
        if self.messages.fetch_add(batch.len() as u64, Ordering::Relaxed) + batch.len() as u64 >= DRAIN {
            self.drained.notify_one();
        }
        vec![Outcome::Done; batch.len()]
    }
}

fn envelope(n: u64) -> Bytes {
    serde_json::to_vec(&serde_json::json!({
        "id": uuid::Uuid::now_v7(), "type": "probe.bench", "version": 1,
        "occurred_at": "2026-11-25T12:00:00Z", "actor_id": null, "data": {"n": n}
    }))
    .expect("json")
    .into()
}

/// Publishes `count` messages, `window` acknowledgements in flight.
async fn publish_many(js: &jetstream::Context, subject: &str, count: u64) -> anyhow::Result<()> {
    let mut pending = Vec::with_capacity(1024);
    for n in 0..count {
        pending.push(js.publish(subject.to_owned(), envelope(n)).await?);
        if pending.len() == 1024 {
            for ack in pending.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in pending {
        ack.await?;
    }
    Ok(())
}

/// This machine's limits with async-nats alone, on a file-stored stream of its own: the time to
/// publish `DRAIN` messages (as [`publish_many`]) and to pull and acknowledge them all with a
/// durable pull consumer (batches of 1,000, 20,000 unacknowledged at most, as the runtime's
/// drain is configured), until the server has every acknowledgement.
async fn raw_publish_and_drain(js: &jetstream::Context, prefix: &str) -> anyhow::Result<(Duration, Duration)> {
    use futures::StreamExt as _;
    let name = format!("{prefix}_RAW");
    let subject = format!("{prefix}.raw");
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    publish_many(js, &subject, DRAIN).await?;
    let publish = started.elapsed();
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut messages = consumer.stream().max_messages_per_batch(1000).messages().await?;
    for _ in 0..DRAIN {
        let message = messages.next().await.ok_or_else(|| anyhow::anyhow!("the pull ended"))?;
        message.map_err(|e| anyhow::anyhow!(e))?.ack().await.map_err(|e| anyhow::anyhow!(e))?;
    }
    let mut consumer = consumer;
    loop {
        let info = consumer.info().await?;
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drain = started.elapsed();
    drop(messages);
    js.delete_stream(&name).await?;
    Ok((publish, drain))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let prefix = format!("benchrt{}", std::process::id());
    let topology = Topology::new(&prefix)?;
    let client = nats::connect(
        &trellis_runtime::nats_options::NatsOptions::from_url(&nats_url),
        "runtime-bench",
        Duration::from_secs(10),
    )
    .await?;
    let js = nats::jetstream(client.clone(), Duration::from_secs(30));
    nats::ensure_streams(&js, &topology).await?;

    // 0. The anchors: async-nats alone.
    eprintln!("bench runtime: async-nats alone, publishing and draining {DRAIN} messages");
    let (raw_publish, raw_drain) = raw_publish_and_drain(&js, &prefix).await?;

    // 1. Drain.
    eprintln!("bench runtime: publishing {DRAIN} messages");
    publish_many(&js, &topology.subject("events.probe.bench"), DRAIN).await?;
    let counter = Arc::new(Noop::default());
    let ctx =
        RunnerContext { js: js.clone(), topology: topology.clone(), host: "bench".into(), version: "bench".into() };
    let config = RunnerConfig { batch_size: 1000, max_ack_pending: 20_000, ..RunnerConfig::default() };
    let group = ConsumerGroup::new(
        ctx,
        ConsumerSpec { name: "bench".into(), filter_subject: "events.probe.>".into() },
        config,
        counter.clone(),
    );
    let stop = CancellationToken::new();
    eprintln!("bench runtime: draining");
    let started = Instant::now();
    let mut run = tokio::spawn(group.run(stop.clone()));
    tokio::select! {
        _ = counter.drained.notified() => {}
        ended = &mut run => anyhow::bail!("the consumer group stopped: {:?}", ended?),
    }
    // Done when the server has every ack too.
    let stream = js.get_stream(topology.events_stream()).await?;
    loop {
        let mut c: jetstream::consumer::Consumer<jetstream::consumer::pull::Config> =
            stream.get_consumer(&topology.name("bench")).await.map_err(|e| anyhow::anyhow!(e))?;
        let info = c.info().await?;
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drain = started.elapsed();
    stop.cancel();
    run.await??;
    let handled = counter.messages.load(Ordering::Relaxed);
    anyhow::ensure!(handled == DRAIN, "handled {handled} of {DRAIN}");
    let batches = counter.batches.load(Ordering::Relaxed).max(1);

    // 2. Replay, end to end through `trellisctl dlq replay --all` (read, publish, delete, audit).
    eprintln!("bench runtime: writing {REPLAY} dead letters");
    let now = OffsetDateTime::now_utc();
    let mut acks = Vec::with_capacity(1024);
    for n in 0..REPLAY {
        let letter = DeadLetter {
            consumer: "bench",
            original_subject: "events.probe.bench",
            stream: &topology.events_stream(),
            stream_sequence: n + 1,
            deliveries: 5,
            kind: ErrorKind::Transient,
            error: "bench",
            first_failure: now,
            host: "bench",
            version: "bench",
            now,
            trace: None,
        };
        let headers = dlq::dead_letter_headers(&letter, None);
        acks.push(js.publish_with_headers(topology.subject("dlq.bench"), headers, envelope(n)).await?);
        if acks.len() == 1024 {
            for a in acks.drain(..) {
                a.await?;
            }
        }
    }
    for a in acks {
        a.await?;
    }
    let trellisctl = std::env::var("TRELLISCTL").unwrap_or_else(|_| "target/release/trellisctl".into());
    eprintln!("bench runtime: replaying with {trellisctl}");
    let started = Instant::now();
    let status = std::process::Command::new(&trellisctl)
        .args(["--nats-url", &nats_url, "--nats-prefix", &prefix, "dlq", "replay", "--all", "--reason", "benchmark"])
        .env("TRELLIS_ACTOR", "bench")
        .status()?;
    let replay = started.elapsed();
    anyhow::ensure!(status.success(), "trellisctl dlq replay failed: {status}");
    let left = dlq::depth(&js, &topology, "bench").await?;
    anyhow::ensure!(left == 0, "{left} dead letters left after the replay");
    let replayed = js.get_stream(topology.replay_stream()).await?.info().await?.state.messages;
    anyhow::ensure!(replayed == REPLAY, "REPLAY holds {replayed} of {REPLAY}");

    for stream in
        [topology.events_stream(), topology.dlq_stream(), topology.replay_stream(), topology.advisory_stream()]
    {
        let _ = js.delete_stream(stream).await;
    }
    let rate = |count: u64, took: Duration| count as f64 / took.as_secs_f64();
    println!(
        "| anchor: async-nats alone, publish {DRAIN} messages (1,024 acknowledgements in flight) | {:.0} msgs/s | — |",
        rate(DRAIN, raw_publish)
    );
    println!(
        "| anchor: async-nats alone, pull and ack {DRAIN} messages (batches of 1,000) | {:.0} msgs/s | — |",
        rate(DRAIN, raw_drain)
    );
    println!(
        "| runtime drain, {DRAIN} messages, no-op handler, one worker, acks on | {:.0} msgs/s ({:.2} s; {:.2} of the pull-and-ack anchor; {batches} batches, {:.0} messages each on average) | ≥ 60,000 msgs/s |",
        rate(DRAIN, drain),
        drain.as_secs_f64(),
        rate(DRAIN, drain) / rate(DRAIN, raw_drain),
        DRAIN as f64 / batches as f64
    );
    println!(
        "| `trellisctl dlq replay --all`, {REPLAY} dead letters, no rate cap | {:.0} msgs/s ({:.2} s, incl. reading the DLQ and the audit; {:.2} of the publish anchor) | ≥ 10,000 msgs/s |",
        rate(REPLAY, replay),
        replay.as_secs_f64(),
        rate(REPLAY, replay) / rate(DRAIN, raw_publish)
    );
    Ok(())
}
