//! Real processes of the workspace's binaries (built next to `trellisctl`), the repository's
//! deploy files, and the metric names in a scrape or a PromQL expression.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use trellis_testkit::TestDb;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("the repository root")
}

pub fn read(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

pub fn yaml(relative: &str) -> serde_yaml_ng::Value {
    serde_yaml_ng::from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative} is not YAML: {e}"))
}

/// A compose file with its `<<` merge keys applied, as docker-compose reads it. A merged mapping
/// may bring a merge key of its own (`x-trellis` merges `x-hardened`): apply until none is left.
pub fn compose_file(relative: &str) -> serde_yaml_ng::Value {
    let mut compose = yaml(relative);
    for _ in 0..4 {
        compose.apply_merge().unwrap();
    }
    assert!(!serde_yaml_ng::to_string(&compose).unwrap().contains("<<"), "{relative}: merge keys nested deeper than 4");
    compose
}

pub use trellis_testkit::metrics::names as exported_names;
pub use trellis_testkit::process::binary;
pub use trellis_testkit::{Process, Spawn};

/// Starts `name` (a binary of the workspace) on the test's database and prefix with `env` on top
/// of the test settings, and waits for its `/readyz`.
pub async fn start(name: &str, db: &TestDb, prefix: &str, env: &[(&str, String)]) -> Process {
    env.iter().fold(Spawn::new(name).on(&db.url, prefix), |spawn, (k, v)| spawn.env(k, v)).ready().await
}

/// The `/metrics` URL of a process.
pub fn metrics_url(process: &Process) -> String {
    format!("http://{}/metrics", process.admin())
}

pub fn http() -> reqwest::Client {
    trellis_testkit::process::client(Duration::from_secs(5))
}

/// The API and every worker of the workspace, on one database and NATS prefix.
pub struct System {
    pub api: Process,
    pub api_addr: SocketAddr,
    pub workers: Vec<Process>,
}

impl System {
    pub async fn start(db: &TestDb, prefix: &str) -> System {
        let api = start("trellis-api", db, prefix, &[("ACTIVITY_FLUSH_INTERVAL", "200ms".into())]).await;
        let api_addr = api.api();
        let names = ["score-orchestrator", "search-projector", "dispute-processor"];
        let mut workers = Vec::new();
        for name in names {
            workers.push(start(name, db, prefix, &[]).await);
        }
        System { api, api_addr, workers }
    }

    pub fn processes(&self) -> impl Iterator<Item = &Process> {
        std::iter::once(&self.api).chain(&self.workers)
    }

    pub fn metrics_urls(&self) -> Vec<String> {
        self.processes().map(metrics_url).collect()
    }
}

/// The Trellis metric and recording-rule names a PromQL expression mentions.
pub fn queried_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(found) = expr[i..].find("trellis") {
        let start = i + found;
        let preceded_by_word = start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_' || bytes[end] == b':') {
            end += 1;
        }
        let name = &expr[start..end];
        if !preceded_by_word && (name.starts_with("trellis_") || name.starts_with("trellis:")) {
            names.insert(name.to_owned());
        }
        i = end.max(start + 1);
    }
    names
}

#[test]
fn queried_names_finds_metrics_and_recording_rules_but_not_label_values() {
    let names = queried_names(
        "histogram_quantile(0.95, sum by (le) (rate(trellis_http_request_duration_seconds_bucket{route=\"x_trellis_y\"}[5m]))) and trellis:score_batch_duration_seconds > 1",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["trellis:score_batch_duration_seconds", "trellis_http_request_duration_seconds_bucket"]
    );
}
