//! `/readyz` on the public port tells a status and nothing else; the admin port's names each
//! check and its error.

use std::time::Duration;

use serde_json::json;
use trellis_testkit::{PrivateNats, eventually};

use crate::helpers::{Options, TestApp};

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
    let admin = eventually("the admin /readyz to say degraded", Duration::from_secs(10), || async {
        let r = app.admin_readyz().await;
        (r.body["status"] == "degraded").then_some(r)
    })
    .await;
    let nats_check = admin.body["checks"].as_array().unwrap().iter().find(|c| c["name"] == "nats").expect("nats check");
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
    assert!(app.metric("trellis_score_runs_in_progress").await.is_some(), "score runs in progress");
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
