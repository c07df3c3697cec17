//! The Grafana dashboard and the Prometheus rules query only metrics that live processes
//! export: a renamed metric breaks this test, not the dashboard.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use trellis_testkit::TestDb;

use crate::harness::{System, queried_names, read, yaml};

const DASHBOARD: &str = "deploy/grafana/trellis.json";

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON")
}

fn dashboard_exprs() -> Vec<String> {
    dashboard()["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("every target has an expr").to_owned())
        .collect()
}

fn rule_exprs() -> (Vec<String>, BTreeSet<String>) {
    let doc = yaml("deploy/prometheus/trellis.rules.yml");
    let (mut exprs, mut records) = (Vec::new(), BTreeSet::new());
    for group in doc["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            exprs.push(rule["expr"].as_str().expect("expr").to_owned());
            if let Some(record) = rule["record"].as_str() {
                records.insert(record.to_owned());
            }
        }
    }
    (exprs, records)
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_rules_query_is_exported_by_a_live_process() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let system = System::start(&db, &prefix).await;
    // A registration: a request for the request histogram, and an event that the search
    // projector applies, so that its checkpoint (and the checkpoint's age) exists.
    let registered = crate::harness::http()
        .post(format!("http://{}/v1/users", system.api_addr))
        .json(&serde_json::json!({"handle": "dash", "display_name": "Dash", "email": "dash@example.com",
                                  "password": "correct horse battery staple"}))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);

    let (rule_exprs, records) = rule_exprs();
    let mut queried = BTreeSet::new();
    for expr in dashboard_exprs().iter().chain(&rule_exprs) {
        queried.extend(queried_names(expr));
    }
    // Gauges sampled in the background (consumer pending, DLQ depth, DAU) appear within seconds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let missing = loop {
        let mut exported = BTreeSet::new();
        for process in system.processes() {
            exported.extend(crate::harness::exported_names(&process.metrics().await));
        }
        let missing: Vec<&String> =
            queried.iter().filter(|name| !exported.contains(*name) && !records.contains(*name)).collect();
        if missing.is_empty() || tokio::time::Instant::now() >= deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(missing.is_empty(), "queried but exported by no process of {:?}: {missing:?}", system.metrics_urls());
    // The check has teeth: the dashboard queries worker, API and outbox metrics.
    for name in
        ["trellis_worker_messages_total", "trellis_http_request_duration_seconds_bucket", "trellis_outbox_pending_rows"]
    {
        assert!(queried.contains(name), "the dashboard no longer queries {name}");
    }
}

#[test]
fn every_recording_rule_the_dashboard_queries_exists() {
    let (_, records) = rule_exprs();
    for expr in dashboard_exprs() {
        for name in queried_names(&expr).into_iter().filter(|n| n.contains(':')) {
            assert!(records.contains(&name), "the dashboard queries {name}, which no recording rule defines");
        }
    }
}

#[test]
fn the_dashboard_has_a_row_per_worker_with_throughput_errors_latency_lag_and_dlq() {
    let dashboard = dashboard();
    let panels = dashboard["panels"].as_array().unwrap();
    for worker in ["score-orchestrator", "search-projector", "dispute-processor"] {
        let start = panels
            .iter()
            .position(|p| p["type"] == "row" && p["title"] == format!("Worker: {worker}"))
            .unwrap_or_else(|| panic!("no row for {worker}"));
        let titles: Vec<&str> = panels[start + 1..]
            .iter()
            .take_while(|p| p["type"] != "row")
            .map(|p| p["title"].as_str().unwrap_or_default())
            .collect();
        for wanted in ["Throughput", "Errors", "Handle latency p95", "Consumer lag", "DLQ depth"] {
            assert!(titles.contains(&wanted), "{worker}'s row has no {wanted} panel: {titles:?}");
        }
    }
    for row in ["API", "Outbox"] {
        assert!(panels.iter().any(|p| p["type"] == "row" && p["title"] == row), "no {row} row");
    }
    assert!(
        panels
            .iter()
            .any(|p| p["type"] == "row" && p["title"].as_str().unwrap_or_default().starts_with("Stage triggers")),
        "no stage-trigger row"
    );
}
