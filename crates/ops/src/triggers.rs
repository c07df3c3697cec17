//! The migration guide's stage triggers against live values. From a Prometheus that loads
//! `deploy/prometheus/trellis.rules.yml` (the trigger's recording rule for the value, its alert
//! for "met", so `for:` durations count), or, without one, straight from the processes'
//! `/metrics` and the database. `trellisctl triggers` prints them; the console's overview shows
//! them.

use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Serialize;
use trellis_domain::stage::{self, TRIGGERS, Trigger, Unit};

/// The admin addresses of `cargo xtask up`: trellis-api, score-orchestrator, search-projector,
/// dispute-processor.
pub const DEFAULT_METRICS_URLS: &[&str] = &[
    "http://127.0.0.1:9080/metrics",
    "http://127.0.0.1:9081/metrics",
    "http://127.0.0.1:9082/metrics",
    "http://127.0.0.1:9083/metrics",
];

/// Where the values come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A Prometheus (its HTTP API) that loads the project's rules.
    Prometheus(String),
    /// The processes' `/metrics` URLs, and the database.
    Direct(Vec<String>),
}

/// Every trigger's reading from `source`.
pub async fn read(pool: &sqlx::PgPool, source: &Source) -> anyhow::Result<Vec<Reading>> {
    read_reporting(pool, source, &|_| {}).await
}

/// [`read`], telling `unreachable` why each process that could not be scraped was left out.
pub async fn read_reporting(
    pool: &sqlx::PgPool,
    source: &Source,
    unreachable: &(dyn Fn(&anyhow::Error) + Sync),
) -> anyhow::Result<Vec<Reading>> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    match source {
        Source::Prometheus(url) => from_prometheus(&http, url).await,
        Source::Direct(urls) => direct(&http, pool, urls, unreachable).await,
    }
}

/// One trigger's reading.
#[derive(Debug, Clone, Serialize)]
pub struct Reading {
    pub alert: &'static str,
    pub transition: &'static str,
    pub metric: &'static str,
    pub threshold: f64,
    /// `None` when no source has a value (see `note`).
    pub value: Option<f64>,
    pub met: bool,
    pub note: Option<String>,
}

pub fn show(unit: Unit, value: f64) -> String {
    match unit {
        Unit::Seconds if value < 1.0 => format!("{:.0} ms", value * 1000.0),
        Unit::Seconds if value < 120.0 => format!("{value:.1} s"),
        Unit::Seconds => format!("{:.1} min", value / 60.0),
        Unit::Bytes => format!("{:.1} MB", value / 1_000_000.0),
        Unit::Count => format!("{value:.0}"),
    }
}

fn reading(trigger: &Trigger, value: Option<f64>, met: bool, note: Option<String>) -> Reading {
    Reading {
        alert: trigger.alert,
        transition: trigger.transition.as_str(),
        metric: trigger.metric,
        threshold: trigger.threshold,
        value,
        met,
        note,
    }
}

async fn from_prometheus(http: &reqwest::Client, url: &str) -> anyhow::Result<Vec<Reading>> {
    let base = url.trim_end_matches('/');
    let firing = query(http, base, "ALERTS{alertstate=\"firing\"}").await?;
    let mut readings = Vec::new();
    for trigger in TRIGGERS {
        // NaN is PromQL's 0/0: no run in the window, say.
        let value = query(http, base, trigger.record).await?.into_iter().next().map(|(_, v)| v).filter(|v| !v.is_nan());
        let met =
            firing.iter().any(|(labels, _)| labels.get("alertname").and_then(|n| n.as_str()) == Some(trigger.alert));
        let note = match (value, trigger.sustained_for) {
            (None, _) => Some(format!("no value for {} (rule not loaded, or no data in its window)", trigger.record)),
            (Some(v), Some(secs)) if trigger.is_met(v) && !met => Some(format!(
                "over the threshold, not yet for {}",
                humantime::format_duration(Duration::from_secs(secs))
            )),
            _ => None,
        };
        readings.push(reading(trigger, value, met, note));
    }
    Ok(readings)
}

/// An instant query: the series' labels and values.
async fn query(
    http: &reqwest::Client,
    base: &str,
    promql: &str,
) -> anyhow::Result<Vec<(serde_json::Map<String, serde_json::Value>, f64)>> {
    let url = format!("{base}/api/v1/query");
    let response = http
        .get(&url)
        .query(&[("query", promql)])
        .send()
        .await
        .with_context(|| format!("querying Prometheus at {url}"))?;
    let status = response.status();
    let body: serde_json::Value =
        response.json().await.with_context(|| format!("Prometheus at {url} answered {status} with no JSON"))?;
    if body["status"] != "success" {
        bail!("Prometheus refused `{promql}`: {}", body["error"].as_str().unwrap_or("(no error text)"));
    }
    let Some(result) = body["data"]["result"].as_array() else {
        bail!("Prometheus answered `{promql}` with no result vector");
    };
    result
        .iter()
        .map(|series| {
            let labels = series["metric"].as_object().cloned().unwrap_or_default();
            let value = series["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .with_context(|| format!("Prometheus answered `{promql}` with a malformed sample: {series}"))?;
            Ok((labels, value))
        })
        .collect()
}

/// The values from the processes' `/metrics` (API latency, batch in progress, binary size) and
/// the database (everything the database knows better than one process).
async fn direct(
    http: &reqwest::Client,
    pool: &sqlx::PgPool,
    urls: &[String],
    report: &(dyn Fn(&anyhow::Error) + Sync),
) -> anyhow::Result<Vec<Reading>> {
    let mut samples = Vec::new();
    let mut unreachable = Vec::new();
    for url in urls {
        match scrape(http, url).await {
            Ok(scraped) => samples.extend(scraped),
            Err(e) => {
                report(&e);
                unreachable.push(url.as_str());
            }
        }
    }
    let gauges = |name: &str| -> Vec<f64> {
        samples
            .iter()
            .filter(|s| s.metric == name)
            .filter_map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => Some(v),
                _ => None,
            })
            .collect()
    };

    let db = |what: &'static str| move |e: sqlx::Error| anyhow::anyhow!("reading {what} from the database: {e}");
    let mean_run = trellis_store::scores::mean_run_seconds_last_day(pool).await.map_err(db("score runs"))?;
    let freshness = trellis_store::search::freshness(pool).await.map_err(db("the search checkpoint"))?;
    let sustained = Duration::from_secs(stage::DISPUTE_QUEUE_SUSTAINED_SECONDS);
    let (pending, pending_long) =
        trellis_store::disputes::pending_depth(pool, sustained).await.map_err(db("pending disputes"))?;
    let dau = trellis_store::activity::daily_active_users(pool).await.map_err(db("user activity"))?;
    let batch_running = gauges("trellis_score_in_progress_runs").iter().any(|v| *v > 0.0);
    let p95 = quantile(0.95, &histogram_buckets(&samples, "trellis_http_request_duration_seconds"));
    let binary_size = gauges("trellis_build_binary_size_bytes").into_iter().reduce(f64::max);

    let mut readings = Vec::new();
    for trigger in TRIGGERS {
        let (value, met, note) = match trigger.alert {
            "StageTriggerScoreBatchDuration" => (
                mean_run,
                mean_run.is_some_and(|v| trigger.is_met(v)),
                mean_run.is_none().then(|| "no score run finished in the last 24 h".to_owned()),
            ),
            "StageTriggerSearchIndexLag" => {
                let lag = freshness.lag();
                if lag == time::Duration::MAX {
                    (None, false, Some("the search projection has applied no event yet".to_owned()))
                } else {
                    let lag = lag.as_seconds_f64();
                    (Some(lag), trigger.is_met(lag), None)
                }
            }
            "StageTriggerDisputeQueueDepth" => (
                Some(pending as f64),
                trigger.is_met(pending_long as f64),
                Some(format!("{pending_long} pending for over 1 h (database)")),
            ),
            "StageTriggerApiLatencyDuringBatch" => match p95 {
                None => (None, false, Some("no API request histogram scraped".to_owned())),
                Some(p95) => (
                    Some(p95),
                    batch_running && trigger.is_met(p95),
                    Some(format!(
                        "since the API started; {}",
                        if batch_running { "a score run is computing" } else { "no score run computing" }
                    )),
                ),
            },
            "StageTriggerDailyActiveUsersAToB" | "StageTriggerDailyActiveUsersBToC" => {
                (Some(dau as f64), trigger.is_met(dau as f64), None)
            }
            "StageTriggerBinarySize" => (
                binary_size,
                binary_size.is_some_and(|v| trigger.is_met(v)),
                binary_size.is_none().then(|| "no process scraped".to_owned()),
            ),
            other => bail!("trigger {other} has no direct source; use --prometheus-url"),
        };
        let note = match (note, unreachable.is_empty()) {
            (note, true) => note,
            (Some(n), false) if uses_scrapes(trigger) => Some(format!("{n}; {} unreachable", unreachable.join(", "))),
            (None, false) if uses_scrapes(trigger) => Some(format!("{} unreachable", unreachable.join(", "))),
            (note, false) => note,
        };
        readings.push(reading(trigger, value, met, note));
    }
    Ok(readings)
}

fn uses_scrapes(trigger: &Trigger) -> bool {
    matches!(trigger.alert, "StageTriggerApiLatencyDuringBatch" | "StageTriggerBinarySize")
}

pub async fn scrape(http: &reqwest::Client, url: &str) -> anyhow::Result<Vec<prometheus_parse::Sample>> {
    let response = http.get(url).send().await.with_context(|| format!("cannot scrape {url}"))?;
    if !response.status().is_success() {
        bail!("scraping {url} answered {}", response.status());
    }
    let text = response.text().await.with_context(|| format!("reading {url}"))?;
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .with_context(|| format!("{url} is not in the Prometheus text format"))?;
    Ok(scrape.samples)
}

/// The cumulative buckets of a histogram summed over all its series: (upper bound, count).
fn histogram_buckets(samples: &[prometheus_parse::Sample], name: &str) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for sample in samples.iter().filter(|s| s.metric == name) {
        if let prometheus_parse::Value::Histogram(counts) = &sample.value {
            for c in counts {
                match buckets.iter_mut().find(|(le, _)| *le == c.less_than) {
                    Some((_, n)) => *n += c.count,
                    None => buckets.push((c.less_than, c.count)),
                }
            }
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The q-quantile of cumulative buckets, interpolated linearly inside the bucket it falls in
/// (what PromQL's `histogram_quantile` does); `None` without observations.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                // Past the last finite bound, the best answer is that bound.
                return Some(lower.0);
            }
            let in_bucket = count - lower.1;
            let fraction = if in_bucket > 0.0 { (rank - lower.1) / in_bucket } else { 1.0 };
            return Some(lower.0 + (le - lower.0) * fraction);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_interpolate_inside_their_bucket_like_promql() {
        // 60 observations, all between 0.5 and 1: PromQL's histogram_quantile(0.95) is 0.975.
        let buckets = [(0.5, 0.0), (1.0, 60.0), (f64::INFINITY, 60.0)];
        assert!((quantile(0.95, &buckets).unwrap() - 0.975).abs() < 1e-9);
        assert_eq!(quantile(0.95, &[(0.5, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(quantile(0.5, &[(0.5, 0.0), (f64::INFINITY, 10.0)]), Some(0.5));
    }
}
