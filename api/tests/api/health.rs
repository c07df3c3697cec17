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
