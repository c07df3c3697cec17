//! `/readyz` on the public port tells a status and nothing else; the admin port's names each
//! check and its error.

use std::time::Duration;

use serde_json::json;
use trellis_testkit::{PrivateNats, eventually};

use crate::helpers::{Options, TestApp, readiness_check};

#[tokio::test]
async fn the_public_readyz_answers_the_status_only_while_the_admin_port_names_the_failing_check() {
    let mut nats = PrivateNats::start().expect("a private nats-server");
    let app = TestApp::spawn_with(Options { nats_url: Some(nats.url()), ..Options::default() }).await;
    let ready = eventually("the public /readyz to say ready", Duration::from_secs(10), || async {
        let r = app.get("/readyz", None).await;
        (r.body["status"] == "ready").then_some(r)
    })
    .await;
    assert_eq!(ready.body, json!({"status": "ready"}), "the public port shows no check");

    nats.stop();
    let admin = app.wait_for_readiness("degraded", &["nats"], Duration::from_secs(10)).await;
    let nats_check = readiness_check(&admin, "nats");
    assert_eq!(nats_check["ok"], false);
    let error = nats_check["error"].as_str().expect("the admin port tells why");
    assert!(!error.is_empty());

    let public = app.get("/readyz", None).await;
    assert_eq!((public.status, &public.body), (200, &json!({"status": "degraded"})));
    let text = serde_json::to_string(&public.body).unwrap();
    for leak in ["nats", "database", error] {
        assert!(!text.contains(leak), "the public /readyz names {leak:?}: {text}");
    }
}

/// The processors the API can run in-process export their series from start-up, whichever
/// side executes them (an alert on an absent series would otherwise fire on every API until a
/// flag says `monolith`), as their workers do.
#[tokio::test]
async fn the_in_process_processors_series_exist_from_start_up() {
    let app = TestApp::spawn().await;
    for outcome in ["succeeded", "failed", "abandoned"] {
        let series = format!("outcome=\"{outcome}\"");
        assert!(app.labelled_metric("trellis_score_runs_total", &series).await.is_some(), "score runs {outcome}");
    }
    assert!(app.metric("trellis_score_in_progress_runs").await.is_some(), "score runs in progress");
    for priority in ["p0", "p1", "p2", "p3"] {
        let series = format!("priority=\"{priority}\"");
        let depth = app.labelled_metric("trellis_dispute_queue_depth_messages", &series).await;
        assert!(depth.is_some(), "dispute queue depth of {priority}");
    }
    for consumer in ["search-projector", "score-orchestrator", "dispute-processor-p0"] {
        let series = format!("consumer=\"{consumer}\"");
        assert!(app.labelled_metric("trellis_worker_in_flight_messages", &series).await.is_some(), "{consumer}");
    }
}

/// Every family the API exports (it runs the relay and can run every processor) is named in
/// one crate's `instrument` module, once, and follows `trellis_<area>_<what>_<unit>`: a metric
/// emitted anywhere else, or a name typed twice, fails here.
#[tokio::test]
async fn every_exported_metric_is_named_once_in_an_instrument_module() {
    let app = TestApp::spawn().await;
    let (status, text) = app.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let defined: Vec<&str> = [
        trellis_runtime::instrument::NAMES,
        trellis_api::instrument::NAMES,
        dispute_processor::instrument::NAMES,
        search_projector::instrument::NAMES,
        score_orchestrator::instrument::NAMES,
    ]
    .concat();
    let mut unique = defined.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), defined.len(), "a name is defined twice: {defined:?}");
    for name in &defined {
        trellis_runtime::instrument::check_name(name).unwrap();
    }
    let exported: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("trellis_"))
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .map(|n| ["_bucket", "_sum", "_count"].iter().fold(n, |n, s| n.strip_suffix(s).unwrap_or(n)))
        .collect();
    assert!(exported.len() > 20, "the API exports its families: {exported:?}");
    for name in exported {
        assert!(defined.contains(&name), "{name} is exported but named in no instrument module");
    }
}
