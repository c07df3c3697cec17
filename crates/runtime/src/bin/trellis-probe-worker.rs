//! `trellis-probe-worker`: a worker whose handler does what each message asks, to exercise and
//! measure the runtime with real processes (`cargo xtask bench runtime`, the runtime's tests).
//!
//! An event's `data.probe` says what to do: `ok` (the default), `fail_until:N` (transient
//! failure until delivery N), `fail` (always transient), `reject` (permanent), `panic`,
//! `crash` (abort the whole process), `sleep:MS`. With `--record-table`, every handled message
//! is inserted into that table (`event_id uuid, stream_sequence bigint, deliveries bigint,
//! pid integer`) in the same database, which the tests read.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use trellis_runtime::consumer::{ConsumerGroup, ConsumerSpec, Delivery, Handler, Outcome};
use trellis_runtime::host::{Host, Processor};

#[derive(Debug, clap::Args)]
struct ProbeArgs {
    /// The consumer group's name.
    #[arg(long, env = "PROBE_CONSUMER", default_value = "probe")]
    consumer: String,

    /// Its filter subject.
    #[arg(long, env = "PROBE_FILTER", default_value = "events.probe.>")]
    filter: String,

    /// Table to record handled messages in (created if missing).
    #[arg(long, env = "PROBE_RECORD_TABLE")]
    record_table: Option<String>,

    /// Holds the installation until this PostgreSQL advisory lock (a session lock, taken and
    /// released) is free: a test holds it to see the process between start and installed.
    #[arg(long, env = "PROBE_INSTALL_LOCK")]
    install_lock: Option<i64>,
}

/// The probe as a processor: one ungated group (it belongs to no cutover flag).
struct ProbeProcessor(ProbeArgs);

impl Processor for ProbeProcessor {
    fn name(&self) -> &'static str {
        "trellis-probe-worker"
    }

    fn register_metrics(&self, _host: &Host) {}

    fn install<'h>(&'h self, host: &'h Host) -> BoxFuture<'h, anyhow::Result<()>> {
        Box::pin(async move {
            let ProbeArgs { consumer, filter, record_table, install_lock } = &self.0;
            let pool = host.pool().clone();
            if let Some(key) = install_lock {
                let mut conn = pool.acquire().await?;
                sqlx::query("SELECT pg_advisory_lock($1)").bind(key).execute(&mut *conn).await?;
                sqlx::query("SELECT pg_advisory_unlock($1)").bind(key).execute(&mut *conn).await?;
            }
            if let Some(table) = record_table {
                sqlx::query(&format!(
                    "CREATE TABLE IF NOT EXISTS {table} (event_id uuid NOT NULL, stream_sequence bigint NOT NULL,
                     deliveries bigint NOT NULL, pid integer NOT NULL, handled_at timestamptz NOT NULL DEFAULT now())"
                ))
                .execute(&pool)
                .await?;
            }
            let handler = Arc::new(Probe { pool, record_table: record_table.clone() });
            let spec = ConsumerSpec { name: consumer.clone(), filter_subject: filter.clone() };
            host.spawn_group(ConsumerGroup::new(host.ctx().clone(), spec, host.runner(self.batching()), handler));
            Ok(())
        })
    }
}

struct Probe {
    pool: sqlx::PgPool,
    record_table: Option<String>,
}

impl Probe {
    async fn act(&self, d: &Delivery) -> Outcome {
        let probe = d.envelope.data.get("probe").and_then(|p| p.as_str()).unwrap_or("ok");
        let (verb, arg) = probe.split_once(':').unwrap_or((probe, ""));
        match verb {
            "ok" => Outcome::Done,
            "fail" => Outcome::Retry("probe: always failing".into()),
            "fail_until" => {
                let until: i64 = arg.parse().unwrap_or(1);
                if d.deliveries < until {
                    Outcome::Retry(format!("probe: failing until delivery {until}"))
                } else {
                    Outcome::Done
                }
            }
            "reject" => Outcome::Reject("probe: rejected".into()),
            "panic" => panic!("probe: panicking as asked"),
            "crash" => std::process::abort(),
            "sleep" => {
                tokio::time::sleep(Duration::from_millis(arg.parse().unwrap_or(0))).await;
                Outcome::Done
            }
            other => Outcome::Reject(format!("probe: unknown instruction {other:?}")),
        }
    }
}

impl Handler for Probe {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for d in batch {
            outcomes.push(self.act(d).await);
        }
        if let Some(table) = &self.record_table {
            let done: Vec<&Delivery> =
                batch.iter().zip(&outcomes).filter(|(_, o)| **o == Outcome::Done).map(|(d, _)| d).collect();
            let ids: Vec<uuid::Uuid> = done.iter().map(|d| d.envelope.id.0).collect();
            let seqs: Vec<i64> = done.iter().map(|d| d.stream_sequence as i64).collect();
            let deliveries: Vec<i64> = done.iter().map(|d| d.deliveries).collect();
            let recorded = sqlx::query(&format!(
                "INSERT INTO {table} (event_id, stream_sequence, deliveries, pid)
                 SELECT e, s, d, $4 FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[]) AS t(e, s, d)"
            ))
            .bind(&ids)
            .bind(&seqs)
            .bind(&deliveries)
            .bind(std::process::id() as i32)
            .execute(&self.pool)
            .await;
            if let Err(e) = recorded {
                return vec![Outcome::Retry(format!("recording failed: {e}")); batch.len()];
            }
        }
        outcomes
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    trellis_runtime::worker::main(
        "trellis-probe-worker",
        "A worker that does what each message asks (runtime tests and benchmarks)",
        trellis_runtime::worker::serving(ProbeProcessor),
    )
    .await
}
