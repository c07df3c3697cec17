//! Real processes of the workspace's binaries (built next to `trellisctl`), the repository's
//! deploy files, and the metric names in a scrape or a PromQL expression.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

/// A binary of the workspace, built next to `trellisctl` (`cargo xtask test` builds them all).
pub fn binary(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_trellisctl")).with_file_name(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace --bins` first", path.display());
    path
}

/// A child process with an admin listener, killed when dropped.
pub struct Process {
    pub name: String,
    pub admin: SocketAddr,
    /// Where its output goes.
    pub log: PathBuf,
    child: Child,
}

impl Process {
    /// Starts `name` with the common settings of a test and `env`, and waits for `/readyz`.
    pub async fn start(name: &str, db: &TestDb, prefix: &str, env: &[(&str, String)]) -> Process {
        let admin: SocketAddr =
            format!("127.0.0.1:{}", trellis_testkit::free_port().expect("a free port")).parse().unwrap();
        let (log, log_file) = trellis_testkit::log_file(name);
        let mut cmd = Command::new(binary(name));
        cmd.env("DATABASE_URL", &db.url)
            .env("NATS_URL", trellis_testkit::nats_url())
            .env("NATS_PREFIX", prefix)
            .env("ADMIN_ADDR", admin.to_string())
            .env("LOG_FORMAT", "json")
            .env("SHUTDOWN_GRACE", "2s")
            .stdin(Stdio::null())
            .stdout(log_file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let mut process = Process { name: name.to_owned(), admin, log, child };
        process.wait_ready().await;
        process
    }

    async fn wait_ready(&mut self) {
        let url = format!("http://{}/readyz", self.admin);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited before it was ready: {status}", self.name);
            }
            if let Ok(resp) = http().get(&url).send().await
                && resp.status() == 200
            {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{} is not ready after 30 s", self.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.admin)
    }

    pub async fn metrics(&self) -> String {
        let resp = http().get(self.metrics_url()).send().await.expect("/metrics answers");
        assert_eq!(resp.status(), 200, "{} /metrics", self.name);
        resp.text().await.expect("the metrics text")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(5)).build().expect("an HTTP client")
}

/// The API and every worker of the workspace, on one database and NATS prefix.
pub struct System {
    pub api: Process,
    pub api_addr: SocketAddr,
    pub workers: Vec<Process>,
}

impl System {
    pub async fn start(db: &TestDb, prefix: &str) -> System {
        let api_addr: SocketAddr =
            format!("127.0.0.1:{}", trellis_testkit::free_port().expect("a free port")).parse().unwrap();
        let api = Process::start(
            "trellis-api",
            db,
            prefix,
            &[("API_ADDR", api_addr.to_string()), ("ACTIVITY_FLUSH_INTERVAL", "200ms".into())],
        )
        .await;
        let names = ["score-orchestrator", "search-projector", "dispute-processor"];
        let mut workers = Vec::new();
        for name in names {
            workers.push(Process::start(name, db, prefix, &[]).await);
        }
        System { api, api_addr, workers }
    }

    pub fn processes(&self) -> impl Iterator<Item = &Process> {
        std::iter::once(&self.api).chain(&self.workers)
    }

    pub fn metrics_urls(&self) -> Vec<String> {
        self.processes().map(Process::metrics_url).collect()
    }
}

/// The metric names of a scrape (histograms as `_bucket`, `_sum` and `_count`).
pub fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
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
