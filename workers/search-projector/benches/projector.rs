//! `cargo xtask bench search` (second part): how fast the search projector applies events.
//!
//! - ingest: 100,000 events, each touching a distinct user document;
//! - coalescing: 100,000 events touching 10,000 documents;
//! - freshness: a steady 2,000 events/s for 20 s while the projector runs; the lag (now minus
//!   the newest applied event's time, from the checkpoint) sampled every 50 ms.
//!
//! Runs the projector's consumer group in this process against `DATABASE_URL` (a fresh,
//! migrated database) and `NATS_URL`. Prints Markdown rows for `docs/BENCHMARKS.md`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use search_projector::{BATCHING, Projector, consumer_spec};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use trellis_runtime::consumer::{ConsumerGroup, RunnerConfig, RunnerContext};
use trellis_runtime::nats::{self, Topology};
use uuid::Uuid;

const USERS: i64 = 100_000;

fn envelope(event_type: &str, data: serde_json::Value) -> Bytes {
    let now = OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).expect("time");
    serde_json::to_vec(&serde_json::json!({
        "id": Uuid::now_v7(), "type": event_type, "version": 1, "occurred_at": now, "actor_id": null, "data": data
    }))
    .expect("json")
    .into()
}

async fn publish(js: &jetstream::Context, topology: &Topology, users: &[Uuid], count: usize) -> anyhow::Result<()> {
    let subject = topology.subject("events.identity.profile_updated");
    let mut acks = Vec::with_capacity(1024);
    for i in 0..count {
        let user = users[i % users.len()];
        let data = serde_json::json!({"user_id": user, "display_name": format!("Bench {i}"), "email_changed": false});
        acks.push(js.publish(subject.clone(), envelope("identity.profile_updated", data)).await?);
        if acks.len() == 1024 {
            for a in acks.drain(..) {
                a.await?;
            }
        }
    }
    for a in acks {
        a.await?;
    }
    Ok(())
}

/// The `search-projector` binary's batching defaults.
fn projector_config() -> RunnerConfig {
    RunnerConfig { batch_size: BATCHING.size, batch_window: BATCHING.window, ..RunnerConfig::default() }
}

/// Runs the group until the consumer has nothing pending nor awaiting an ack; returns the time.
async fn drain(ctx: &RunnerContext, pool: &sqlx::PgPool, name: &str) -> anyhow::Result<Duration> {
    let spec = trellis_runtime::consumer::ConsumerSpec { name: name.into(), ..consumer_spec() };
    let config = RunnerConfig { max_ack_pending: 20_000, ..projector_config() };
    let group = ConsumerGroup::new(ctx.clone(), spec, config, Arc::new(Projector::new(pool.clone())));
    let stop = CancellationToken::new();
    let started = Instant::now();
    let run = tokio::spawn(group.run(stop.clone()));
    let stream = ctx.js.get_stream(ctx.topology.events_stream()).await?;
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let Ok(mut c) = stream.get_consumer::<jetstream::consumer::pull::Config>(&ctx.topology.name(name)).await else {
            continue;
        };
        let info = c.info().await?;
        if info.num_pending == 0 && info.num_ack_pending == 0 && info.delivered.stream_sequence > 0 {
            break;
        }
    }
    let took = started.elapsed();
    stop.cancel();
    run.await??;
    Ok(took)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    trellis_runtime::telemetry::init_logging(trellis_runtime::config::LogFormat::Pretty);
    let url = std::env::var("DATABASE_URL")?;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect(&url).await?;
    sqlx::query(
        "INSERT INTO identity.users (id, handle, display_name, email, password_hash)
         SELECT gen_random_uuid(), 'p' || i, 'Projected ' || i, 'p' || i || '@example.com', 'x'
         FROM generate_series(1, $1) AS i",
    )
    .bind(USERS)
    .execute(&pool)
    .await?;
    let users: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM identity.users ORDER BY handle").fetch_all(&pool).await?;
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let client = nats::connect(
        &trellis_runtime::nats_options::NatsOptions::from_url(&nats_url),
        "projector-bench",
        Duration::from_secs(10),
    )
    .await?;
    let js = nats::jetstream(client, Duration::from_secs(30));
    let mut rows = Vec::new();

    for (label, documents, target) in [
        ("ingest, 100,000 events on distinct documents", USERS as usize, "≥ 10,000 events/s"),
        ("coalescing, 100,000 events on 10,000 documents", 10_000, "≥ 50,000 events/s"),
    ] {
        let topology = Topology::new(&format!("benchsp{}{}", std::process::id(), documents))?;
        nats::ensure_streams(&js, &topology).await?;
        publish(&js, &topology, &users[..documents], USERS as usize).await?;
        let ctx =
            RunnerContext { js: js.clone(), topology: topology.clone(), host: "bench".into(), version: "bench".into() };
        let took = drain(&ctx, &pool, "search-projector").await?;
        rows.push(format!(
            "| projector {label} | {:.0} events/s ({:.2} s) | {target} |",
            USERS as f64 / took.as_secs_f64(),
            took.as_secs_f64()
        ));
        for stream in
            [topology.events_stream(), topology.dlq_stream(), topology.replay_stream(), topology.advisory_stream()]
        {
            let _ = js.delete_stream(stream).await;
        }
    }

    // Freshness under a steady 2,000 events/s.
    let topology = Topology::new(&format!("benchspf{}", std::process::id()))?;
    nats::ensure_streams(&js, &topology).await?;
    let ctx =
        RunnerContext { js: js.clone(), topology: topology.clone(), host: "bench".into(), version: "bench".into() };
    let config = projector_config();
    let group = ConsumerGroup::new(ctx, consumer_spec(), config, Arc::new(Projector::new(pool.clone())));
    let stop = CancellationToken::new();
    let run = tokio::spawn(group.run(stop.clone()));
    let sampler_stop = CancellationToken::new();
    let sampler = {
        let (pool, stop) = (pool.clone(), sampler_stop.clone());
        tokio::spawn(async move {
            let mut lags = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while !stop.is_cancelled() {
                tick.tick().await;
                let lag: Option<f64> = sqlx::query_scalar(
                    "SELECT EXTRACT(EPOCH FROM now() - last_event_at)::float8 FROM search.checkpoint",
                )
                .fetch_one(&pool)
                .await
                .ok()
                .flatten();
                if let Some(lag) = lag {
                    lags.push(lag);
                }
            }
            lags
        })
    };
    let subject = topology.subject("events.identity.profile_updated");
    let started = Instant::now();
    let mut sent = 0u64;
    // The first second warms up; samples count from then on.
    while started.elapsed() < Duration::from_secs(21) {
        let due = (started.elapsed().as_secs_f64() * 2000.0) as u64;
        while sent < due {
            let user = users[(sent as usize * 7919) % users.len()];
            let data =
                serde_json::json!({"user_id": user, "display_name": format!("Fresh {sent}"), "email_changed": false});
            let _ack = js.publish(subject.clone(), envelope("identity.profile_updated", data)).await?;
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sampler_stop.cancel();
    let mut lags = sampler.await?;
    stop.cancel();
    run.await??;
    let skip = lags.len().min(20);
    lags.drain(..skip);
    lags.sort_by(f64::total_cmp);
    let p = |q: f64| lags.get(((lags.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN);
    rows.push(format!(
        "| projector freshness at a steady 2,000 events/s for 20 s (lag sampled every 50 ms, {} samples) | p50 {:.3} s, p99 {:.3} s, max {:.3} s | p99 ≤ 1 s |",
        lags.len(),
        p(0.5),
        p(0.99),
        p(1.0)
    ));
    for stream in
        [topology.events_stream(), topology.dlq_stream(), topology.replay_stream(), topology.advisory_stream()]
    {
        let _ = js.delete_stream(stream).await;
    }
    for r in rows {
        println!("{r}");
    }
    Ok(())
}
