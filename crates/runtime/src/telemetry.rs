//! Logging and the Prometheus recorder.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global `tracing` subscriber. `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(true);
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    // A second init (tests running several apps in one process) keeps the first subscriber.
    drop(result);
}

/// Latency buckets in seconds, 1 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle)
/// and starts its upkeep. Every `*_seconds` histogram gets real buckets.
pub fn install_metrics() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("bucket list is not empty")
                .install_recorder()
                .expect("the metrics recorder is installed once");
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawning the upkeep thread");
            record_binary_size();
            handle
        })
        .clone()
}

/// `trellis_build_binary_size_bytes`: the size of this process's executable, read once at
/// start-up. The guide's B→C table has "API binary size > 200 MB" as a trigger; every binary
/// exports it so that the trigger (and the dashboard) can see each of them.
fn record_binary_size() {
    match std::env::current_exe().and_then(std::fs::metadata) {
        Ok(meta) => crate::instrument::BinarySizeRead { bytes: meta.len() }.emit(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read this executable's size; trellis_build_binary_size_bytes is not exported")
        }
    }
}
