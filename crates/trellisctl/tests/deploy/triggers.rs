//! `trellisctl triggers` against real processes and the database, and against a real
//! Prometheus (Debian's `prometheus`, which `cargo xtask test` installs) loading our rules.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use trellis_testkit::{TestDb, eventually};

use crate::harness::{System, binary, http, repo_root};

async fn exec(db: &TestDb, sql: &str) {
    sqlx::query(sql).execute(&db.pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// `n` users, each active `hours_ago` hours ago.
async fn active_users(db: &TestDb, n: u32, hours_ago: u32) {
    exec(
        db,
        &format!(
            "INSERT INTO identity.users (id, handle, display_name, email, password_hash)
             SELECT gen_random_uuid(), 'u{hours_ago}x' || i, 'User ' || i, 'u{hours_ago}x' || i || '@example.com', 'x'
             FROM generate_series(1, {n}) i"
        ),
    )
    .await;
    exec(
        db,
        &format!(
            "INSERT INTO identity.user_activity (user_id, last_active_at)
             SELECT id, now() - interval '{hours_ago} hours' FROM identity.users WHERE handle LIKE 'u{hours_ago}x%'"
        ),
    )
    .await;
}

/// `n` pending disputes filed `minutes_ago` minutes ago.
async fn pending_disputes(db: &TestDb, n: u32, minutes_ago: u32) {
    exec(
        db,
        &format!(
            "INSERT INTO security.disputes (id, reporter_id, target_id, kind, priority, description, created_at)
             SELECT gen_random_uuid(), r.id, t.id, 'spam', 1, 'test', now() - interval '{minutes_ago} minutes'
             FROM (SELECT id FROM identity.users ORDER BY id LIMIT 1) r,
                  (SELECT id FROM identity.users ORDER BY id DESC LIMIT 1) t, generate_series(1, {n})"
        ),
    )
    .await;
}

fn triggers(db: &TestDb, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_trellisctl"))
        .arg("triggers")
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env_remove("PROMETHEUS_URL")
        .env_remove("TRELLIS_METRICS_URLS")
        .stdin(Stdio::null())
        .output()
        .expect("trellisctl runs")
}

fn readings(db: &TestDb, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let out = triggers(db, &all);
    assert!(out.status.success(), "trellisctl triggers failed: {}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(json["manual"].as_array().map(Vec::len), Some(3), "the manual B→C checks are listed");
    json["triggers"].as_array().expect("triggers").clone()
}

fn find<'a>(readings: &'a [Value], alert: &str) -> &'a Value {
    readings.iter().find(|r| r["alert"] == alert).unwrap_or_else(|| panic!("no reading of {alert}: {readings:?}"))
}

#[tokio::test]
async fn triggers_reads_the_processes_and_the_database_and_says_which_are_met() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    // 1,001 users active today, 500 only yesterday; 101 disputes pending for two hours and 50
    // for ten minutes.
    active_users(&db, 1001, 2).await;
    active_users(&db, 500, 30).await;
    pending_disputes(&db, 101, 120).await;
    pending_disputes(&db, 50, 10).await;
    let system = System::start(&db, &prefix).await;
    let urls = system.metrics_urls().join(",");

    let r = readings(&db, &["--metrics-url", &urls]);
    assert_eq!(r.len(), trellis_domain::stage::TRIGGERS.len());
    let dau = find(&r, "StageTriggerDailyActiveUsersAToB");
    assert_eq!((dau["value"].as_f64(), dau["met"].as_bool()), (Some(1001.0), Some(true)));
    let dau_c = find(&r, "StageTriggerDailyActiveUsersBToC");
    assert_eq!((dau_c["value"].as_f64(), dau_c["met"].as_bool()), (Some(1001.0), Some(false)));
    let disputes = find(&r, "StageTriggerDisputeQueueDepth");
    assert_eq!((disputes["value"].as_f64(), disputes["met"].as_bool()), (Some(151.0), Some(true)));
    let size = find(&r, "StageTriggerBinarySize");
    let bytes = size["value"].as_f64().expect("binary sizes are scraped");
    let largest = system.processes().map(|p| std::fs::metadata(binary(&p.name)).unwrap().len()).max().unwrap();
    assert_eq!(bytes, largest as f64, "the largest binary's size");
    assert_eq!(size["met"], false);
    let latency = find(&r, "StageTriggerApiLatencyDuringBatch");
    assert_eq!(latency["met"], false);

    // At the threshold is not past it: 1,000 active users and 100 long-pending disputes.
    exec(&db, "DELETE FROM identity.user_activity WHERE user_id = (SELECT user_id FROM identity.user_activity WHERE last_active_at > now() - interval '3 hours' LIMIT 1)").await;
    exec(&db, "UPDATE security.disputes SET status = 'dismissed' WHERE id = (SELECT id FROM security.disputes WHERE created_at < now() - interval '1 hour' LIMIT 1)").await;
    let r = readings(&db, &["--metrics-url", &urls]);
    let dau = find(&r, "StageTriggerDailyActiveUsersAToB");
    assert_eq!((dau["value"].as_f64(), dau["met"].as_bool()), (Some(1000.0), Some(false)));
    let disputes = find(&r, "StageTriggerDisputeQueueDepth");
    assert_eq!((disputes["value"].as_f64(), disputes["met"].as_bool()), (Some(150.0), Some(false)));

    // The table form names every trigger and the manual checks.
    let out = triggers(&db, &["--metrics-url", &urls]);
    let table = String::from_utf8(out.stdout).unwrap();
    for line in ["daily active users", "binary size", "team size", "cross-domain coupling bugs"] {
        assert!(table.contains(line), "the table has no `{line}`:\n{table}");
    }
}

#[tokio::test]
async fn triggers_says_which_process_it_cannot_scrape_and_fails_on_an_unreachable_prometheus() {
    let db = TestDb::migrated().await.unwrap();
    let nothing = trellis_testkit::ClosedPort::new();
    let closed = format!("http://127.0.0.1:{}/metrics", nothing.port);
    let out = triggers(&db, &["--metrics-url", &closed]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&closed), "the unreachable URL is named");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("unreachable"), "{table}");

    let prometheus = format!("http://127.0.0.1:{}", nothing.port);
    let out = triggers(&db, &["--prometheus-url", &prometheus]);
    assert!(!out.status.success(), "an unreachable Prometheus is an error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("querying Prometheus"), "{out:?}");
}

/// Debian's `prometheus` binary.
fn prometheus_binary() -> PathBuf {
    ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("`prometheus` is not installed: `cargo xtask test` installs Debian's (apt-get install prometheus)")
}

struct Prometheus {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Prometheus {
    async fn start(system: &System) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("trellis-prometheus-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut config = String::from("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n");
        config.push_str(&format!(
            "  - {}\nscrape_configs:\n",
            repo_root().join("deploy/prometheus/trellis.rules.yml").display()
        ));
        for process in system.processes() {
            config.push_str(&format!(
                "  - job_name: {}\n    static_configs: [{{targets: [\"{}\"]}}]\n",
                process.name,
                process.admin()
            ));
        }
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        // Prometheus cannot report the port it got: its listener is found in /proc.
        let child = Command::new(prometheus_binary())
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg("--web.listen-address=127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts");
        let pid = child.id() as i32;
        let addr = eventually("prometheus to listen", Duration::from_secs(30), || async move {
            trellis_testkit::process::listening_addrs(pid).into_iter().next()
        })
        .await;
        let prometheus = Prometheus { child, dir, url: format!("http://{addr}") };
        eventually("prometheus to be ready", Duration::from_secs(30), || async {
            let resp = http().get(format!("{}/-/ready", prometheus.url)).send().await.ok()?;
            (resp.status() == 200).then_some(())
        })
        .await;
        prometheus
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn triggers_reads_a_prometheus_that_loads_the_rules() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    active_users(&db, 1500, 1).await;
    let system = System::start(&db, &prefix).await;
    let prometheus = Prometheus::start(&system).await;
    let args = ["--prometheus-url", prometheus.url.as_str()];

    // The API refreshes its gauge, Prometheus scrapes it and evaluates the rules: then the
    // A→B alert fires.
    let r = eventually("the A→B trigger to fire", Duration::from_secs(60), || async {
        let r = readings(&db, &args);
        (find(&r, "StageTriggerDailyActiveUsersAToB")["met"] == true).then_some(r)
    })
    .await;
    assert_eq!(find(&r, "StageTriggerDailyActiveUsersAToB")["value"].as_f64(), Some(1500.0));
    let dau_c = find(&r, "StageTriggerDailyActiveUsersBToC");
    assert_eq!((dau_c["value"].as_f64(), dau_c["met"].as_bool()), (Some(1500.0), Some(false)));
    let size = find(&r, "StageTriggerBinarySize");
    assert!(size["value"].as_f64().is_some_and(|v| v > 1e6), "{size}");
    assert_eq!(size["met"], false);
    // No score run computes, so the latency-during-batch rule has no value, and says so.
    let latency = find(&r, "StageTriggerApiLatencyDuringBatch");
    assert!(latency["value"].is_null(), "{latency}");
    assert!(latency["note"].as_str().unwrap_or_default().contains("trellis:api_p95_during_batch_seconds"));
}
