//! `trellisctl triggers`: the migration guide's stage triggers against live values. From a
//! Prometheus that loads `deploy/prometheus/trellis.rules.yml` (the trigger's recording rule
//! for the value, its alert for "met", so `for:` durations count), or, without one, straight
//! from the processes' `/metrics` and the database.

use trellis_domain::stage::{MANUAL_TRIGGERS, TRIGGERS};
use trellis_ops::triggers::{DEFAULT_METRICS_URLS, Reading, Source, show};

use crate::Output;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Read the values from this Prometheus (its HTTP API), which must load the rules of
    /// deploy/prometheus/trellis.rules.yml. Without it, the processes and the database are read.
    #[arg(long, env = "PROMETHEUS_URL")]
    prometheus_url: Option<String>,

    /// Without --prometheus-url: the `/metrics` URLs of the processes (comma-separated).
    #[arg(long = "metrics-url", env = "TRELLIS_METRICS_URLS", value_delimiter = ',', default_values = DEFAULT_METRICS_URLS)]
    metrics_urls: Vec<String>,
}

pub async fn run(pool: &sqlx::PgPool, args: Args, output: Output) -> anyhow::Result<()> {
    let source = match args.prometheus_url {
        Some(url) => Source::Prometheus(url),
        None => Source::Direct(args.metrics_urls),
    };
    let readings = trellis_ops::triggers::read_reporting(pool, &source, &|e| {
        eprintln!("trellisctl: {e:#}; its metrics are left out");
    })
    .await?;
    match output {
        Output::Json => {
            let manual: Vec<_> = MANUAL_TRIGGERS
                .iter()
                .map(|(metric, threshold)| serde_json::json!({"metric": metric, "threshold": threshold}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({"triggers": readings, "manual": manual}))?);
        }
        Output::Table => print_table(&readings),
    }
    Ok(())
}

fn print_table(readings: &[Reading]) {
    println!("{:<6} {:<46} {:>20} {:>12} {:<4} NOTE", "STAGE", "METRIC", "THRESHOLD", "CURRENT", "MET");
    for r in readings {
        let trigger = TRIGGERS.iter().find(|t| t.alert == r.alert).expect("a reading is of a trigger");
        println!(
            "{:<6} {:<46} {:>20} {:>12} {:<4} {}",
            r.transition,
            r.metric,
            format!("> {}", show(trigger.unit, r.threshold)),
            r.value.map_or_else(|| "-".to_owned(), |v| show(trigger.unit, v)),
            if r.met { "yes" } else { "no" },
            r.note.as_deref().unwrap_or("")
        );
    }
    for (metric, threshold) in MANUAL_TRIGGERS {
        println!("{:<6} {:<46} {:>20} {:>12} {:<4} manual check (runbook)", "B→C", metric, threshold, "-", "?");
    }
}
