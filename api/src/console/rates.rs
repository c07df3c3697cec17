//! The processors' throughput and error rate over the last hour, for the overview's charts.
//!
//! With `PROMETHEUS_URL`, a range query of `trellis_worker_messages_total`; without it, this
//! process samples the processes' `/metrics` (`TRELLIS_METRICS_URLS`) every
//! `CONSOLE_SAMPLE_INTERVAL` and keeps an hour of samples (each API replica its own).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use maud::{Markup, html};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// How far back the charts go.
pub const WINDOW: Duration = Duration::from_secs(3600);

/// One point of a processor's chart: messages per second handled and failed since the point
/// before.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub at: OffsetDateTime,
    pub handled_per_s: f64,
    pub failed_per_s: f64,
}

/// Outcomes that count as failures (a retry, a dead letter, an undecodable message).
fn is_failure(outcome: &str) -> bool {
    outcome != "ok"
}

struct Sample {
    at: OffsetDateTime,
    /// (consumer, outcome) → the counter summed over the processes scraped.
    totals: HashMap<(String, String), f64>,
    /// consumer → how many of the processes scraped pull from it (not standing by).
    replicas: HashMap<String, u32>,
}

/// The samples of `trellis_worker_messages_total` this process took.
#[derive(Default)]
pub struct Sampler {
    samples: Mutex<VecDeque<Sample>>,
}

impl Sampler {
    /// Scrapes `urls` every `interval` until `stop`.
    pub async fn run(self: std::sync::Arc<Self>, urls: Vec<String>, interval: Duration, stop: CancellationToken) {
        let http = match reqwest::Client::builder().timeout(Duration::from_secs(5)).build() {
            Ok(http) => http,
            Err(e) => return tracing::warn!(error = %e, "console: no HTTP client for the throughput samples"),
        };
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut totals: HashMap<(String, String), f64> = HashMap::new();
            let mut replicas: HashMap<String, u32> = HashMap::new();
            for url in &urls {
                // A process that does not answer is left out of this sample.
                let Ok(samples) = trellis_ops::triggers::scrape(&http, url).await else { continue };
                for s in samples.iter().filter(|s| s.metric == "trellis_consumer_standby_state") {
                    let pulling = matches!(s.value, prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) if v == 0.0);
                    if let (true, Some(consumer)) = (pulling, s.labels.get("consumer")) {
                        *replicas.entry(consumer.to_owned()).or_default() += 1;
                    }
                }
                for s in samples.iter().filter(|s| s.metric == "trellis_worker_messages_total") {
                    let (Some(consumer), Some(outcome)) = (s.labels.get("consumer"), s.labels.get("outcome")) else {
                        continue;
                    };
                    if let prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) = s.value {
                        *totals.entry((consumer.to_owned(), outcome.to_owned())).or_default() += v;
                    }
                }
            }
            self.push(Sample { at: OffsetDateTime::now_utc(), totals, replicas });
        }
    }

    fn push(&self, sample: Sample) {
        let mut samples = self.samples.lock().expect("samples lock");
        let oldest = sample.at - WINDOW;
        while samples.front().is_some_and(|s| s.at < oldest) {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// How many processes pulled from `consumer` at the last sample (`None` before the first).
    pub fn replicas(&self, consumer: &str) -> Option<u32> {
        let samples = self.samples.lock().expect("samples lock");
        samples.back().map(|s| s.replicas.get(consumer).copied().unwrap_or(0))
    }

    /// The points of the consumers' sum: one per pair of successive samples. A counter that
    /// went down (a process restarted) counts from zero.
    pub fn series(&self, consumers: &[String]) -> Vec<Point> {
        let samples = self.samples.lock().expect("samples lock");
        let sum = |s: &Sample, failures: bool| -> f64 {
            s.totals
                .iter()
                .filter(|((c, o), _)| consumers.contains(c) && is_failure(o) == failures)
                .map(|(_, v)| v)
                .sum()
        };
        samples
            .iter()
            .zip(samples.iter().skip(1))
            .filter_map(|(a, b)| {
                let secs = (b.at - a.at).as_seconds_f64();
                (secs > 0.0).then(|| {
                    let delta = |failures: bool| {
                        let (before, after) = (sum(a, failures), sum(b, failures));
                        if after >= before { after - before } else { after }
                    };
                    Point { at: b.at, handled_per_s: delta(false) / secs, failed_per_s: delta(true) / secs }
                })
            })
            .collect()
    }
}

/// The points from a Prometheus range query over the last hour (one a minute).
pub async fn from_prometheus(url: &str, consumers: &[String]) -> anyhow::Result<Vec<Point>> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let end = OffsetDateTime::now_utc();
    let start = end - WINDOW;
    let selector = consumers.join("|");
    let query = |failures: bool| {
        let outcome = if failures { "outcome!=\"ok\"" } else { "outcome=\"ok\"" };
        format!("sum(rate(trellis_worker_messages_total{{consumer=~\"{selector}\",{outcome}}}[2m]))")
    };
    let mut handled: Vec<(f64, f64)> = Vec::new();
    let mut failed: HashMap<i64, f64> = HashMap::new();
    for failures in [false, true] {
        let response: serde_json::Value = http
            .get(format!("{}/api/v1/query_range", url.trim_end_matches('/')))
            .query(&[
                ("query", query(failures)),
                ("start", start.unix_timestamp().to_string()),
                ("end", end.unix_timestamp().to_string()),
                ("step", "60".to_owned()),
            ])
            .send()
            .await?
            .json()
            .await?;
        anyhow::ensure!(response["status"] == "success", "Prometheus refused the range query: {response}");
        let values = response["data"]["result"][0]["values"].as_array().cloned().unwrap_or_default();
        for v in values {
            let (Some(t), Some(x)) = (v[0].as_f64(), v[1].as_str().and_then(|x| x.parse::<f64>().ok())) else {
                continue;
            };
            if failures {
                failed.insert(t as i64, x);
            } else {
                handled.push((t, x));
            }
        }
    }
    Ok(handled
        .into_iter()
        .filter_map(|(t, x)| {
            let at = OffsetDateTime::from_unix_timestamp(t as i64).ok()?;
            Some(Point { at, handled_per_s: x, failed_per_s: failed.get(&(t as i64)).copied().unwrap_or(0.0) })
        })
        .collect())
}

/// A small chart of `points` (handled per second, and failed per second in red), drawn as SVG
/// with a text summary for screen readers and for a glance.
pub fn chart(points: &[Point]) -> Markup {
    const W: f64 = 240.0;
    const H: f64 = 48.0;
    if points.len() < 2 {
        return html! { span.muted { "collecting (a point per sample)" } };
    }
    let now = OffsetDateTime::now_utc();
    let max = points.iter().map(|p| p.handled_per_s.max(p.failed_per_s)).fold(0.0_f64, f64::max).max(1e-9);
    // The hour, or what there is of it so far (a process that started a minute ago draws its minute).
    let span = (now - points[0].at).as_seconds_f64().clamp(1.0, WINDOW.as_secs_f64());
    let x = |p: &Point| W - ((now - p.at).as_seconds_f64() / span * W).clamp(0.0, W);
    let y = |v: f64| H - v / max * (H - 2.0) - 1.0;
    let line = |f: fn(&Point) -> f64| -> String {
        points.iter().map(|p| format!("{:.1},{:.1}", x(p), y(f(p)))).collect::<Vec<_>>().join(" ")
    };
    let last = points.last().expect("two points");
    let handled: f64 = points.iter().map(|p| p.handled_per_s).sum::<f64>() / points.len() as f64;
    let failed: f64 = points.iter().map(|p| p.failed_per_s).sum::<f64>() / points.len() as f64;
    let error_rate = if handled + failed > 0.0 { failed / (handled + failed) * 100.0 } else { 0.0 };
    let summary = format!(
        "now {:.1}/s handled, {:.1}/s failed; over the hour {:.1}/s handled on average, {:.1} % failed",
        last.handled_per_s, last.failed_per_s, handled, error_rate
    );
    html! {
        svg.chart width=(W) height=(H) viewBox={"0 0 " (W) " " (H)} role="img" aria-label=(summary) {
            rect x="0" y="0" width=(W) height=(H) fill="#f6f8fa" stroke="#d0d7de" {}
            polyline points=(line(|p| p.handled_per_s)) fill="none" stroke="#0a58ca" stroke-width="1.5" {}
            polyline points=(line(|p| p.failed_per_s)) fill="none" stroke="#b42318" stroke-width="1.5" {}
        }
        br;
        span.muted { (summary) }
    }
}

/// How many processes pull from each consumer (not standing by), from Prometheus.
pub async fn replicas_from_prometheus(url: &str) -> anyhow::Result<HashMap<String, u32>> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let response: serde_json::Value = http
        .get(format!("{}/api/v1/query", url.trim_end_matches('/')))
        .query(&[("query", "count by (consumer) (trellis_consumer_standby_state == 0)")])
        .send()
        .await?
        .json()
        .await?;
    anyhow::ensure!(response["status"] == "success", "Prometheus refused the query: {response}");
    Ok(response["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|series| {
            let consumer = series["metric"]["consumer"].as_str()?.to_owned();
            let n = series["value"][1].as_str()?.parse::<f64>().ok()?;
            Some((consumer, n as u32))
        })
        .collect())
}
