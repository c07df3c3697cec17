//! Errors are RFC 9457 problems with a stable type: unknown routes, wrong methods, unreadable
//! bodies, oversize bodies, wrong JSON types and an unavailable database. Every response
//! carries a request id.

use reqwest::Method;
use reqwest::header::CONTENT_TYPE;
use serde_json::json;
use trellis_testkit::TestDb;

use crate::helpers::{Options, Resp, TestApp, readiness_check};

const PROBLEM: &str = "application/problem+json";

fn assert_problem(r: &Resp, status: u16, slug: &str) {
    assert_eq!((r.status, r.problem()), (status, slug), "{:?}", r.body);
    assert_eq!(r.header("content-type"), Some(PROBLEM), "a problem document for {slug}");
    assert_eq!(r.body["status"], status, "the problem repeats the status");
    assert!(r.body["title"].as_str().is_some_and(|t| !t.is_empty()), "a title for {slug}");
    assert!(r.header("x-request-id").is_some_and(|id| !id.is_empty()), "a request id on {slug}");
}

#[tokio::test]
async fn an_unknown_route_is_a_route_not_found_problem() {
    let app = TestApp::spawn().await;
    assert_problem(&app.get("/v1/nothing-here", None).await, 404, "route-not-found");
    assert_problem(&app.post("/v2/users", None, json!({})).await, 404, "route-not-found");
}

#[tokio::test]
async fn a_wrong_method_is_a_method_not_allowed_problem() {
    let app = TestApp::spawn().await;
    assert_problem(&app.patch("/v1/sessions", None, json!({})).await, 405, "method-not-allowed");
    assert_problem(&app.request(Method::PUT, "/v1/me", None, None).await, 405, "method-not-allowed");
}

#[tokio::test]
async fn malformed_json_is_a_bad_request() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let req = app.build(Method::POST, "/v1/me/circles", Some(&alice.token), None);
    let r = app.send(req.header(CONTENT_TYPE, "application/json").body("{\"name\": ")).await;
    assert_problem(&r, 400, "malformed-json");
    let req = app.build(Method::POST, "/v1/users", None, None);
    let r = app.send(req.header(CONTENT_TYPE, "application/json").body("not json at all")).await;
    assert_problem(&r, 400, "malformed-json");
}

#[tokio::test]
async fn a_body_that_is_not_json_is_an_unsupported_media_type() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let req = app.build(Method::POST, "/v1/me/circles", Some(&alice.token), None);
    let r = app.send(req.header(CONTENT_TYPE, "text/plain").body("{\"name\": \"Family\"}")).await;
    assert_problem(&r, 415, "unsupported-media-type");
    let req = app.build(Method::POST, "/v1/users", None, None);
    let r = app.send(req.body("{}")).await;
    assert_problem(&r, 415, "unsupported-media-type");
}

#[tokio::test]
async fn an_oversize_body_is_payload_too_large() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let huge = json!({"name": "x".repeat(65 * 1024)});
    assert_problem(&app.post("/v1/me/circles", Some(&alice.token), huge.clone()).await, 413, "payload-too-large");
    // With an Idempotency-Key the body is read before the handler runs; same answer.
    let req = app.build(Method::POST, "/v1/me/circles", Some(&alice.token), Some(huge));
    assert_problem(&app.send(req.header("idempotency-key", "big")).await, 413, "payload-too-large");
    let circles: i64 =
        sqlx::query_scalar("SELECT count(*) FROM circles.circles").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(circles, 0);
}

#[tokio::test]
async fn json_of_the_wrong_types_is_a_validation_problem() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let r = app.post("/v1/me/circles", Some(&alice.token), json!({"name": 5})).await;
    assert_problem(&r, 422, "validation");
    assert!(r.body["errors"].as_array().is_some_and(|e| !e.is_empty()), "per-field errors: {:?}", r.body);
    let r = app.post("/v1/users", None, json!(["alice"])).await;
    assert_problem(&r, 422, "validation");
    let r = app.post("/v1/sessions", None, json!({"login": "alice"})).await;
    assert_problem(&r, 422, "validation");
}

#[tokio::test]
async fn an_unavailable_database_is_a_503_with_retry_after() {
    let closed = trellis_testkit::ClosedPort::new();
    let url = format!("postgres://postgres@127.0.0.1:{}/nowhere", closed.port);
    let nowhere = TestDb { name: String::new(), pool: sqlx::PgPool::connect_lazy(&url).unwrap(), url };
    let options = Options { args: vec!["--io-timeout".into(), "1s".into()], ..Options::default() };
    let app = TestApp::start_on(nowhere, trellis_testkit::nats_prefix(), options).await;

    let r = app.get("/v1/me", Some("trl_not-a-real-token")).await;
    assert_problem(&r, 503, "unavailable");
    let retry_after: u64 = r.header("retry-after").expect("Retry-After").parse().expect("seconds");
    assert!((1..=60).contains(&retry_after));

    let body = json!({"handle": "alice", "display_name": "A", "email": "a@example.com", "password": "long enough pw"});
    let r = app.post("/v1/users", None, body.clone()).await;
    assert_problem(&r, 503, "unavailable");
    assert!(r.header("retry-after").is_some());
    let req = app.build(Method::POST, "/v1/users", None, Some(body));
    let r = app.send(req.header("idempotency-key", "k")).await;
    assert_problem(&r, 503, "unavailable");

    let ready = app.admin_readyz().await;
    assert_eq!(ready.status, 503, "{:?}", ready.body);
    assert_eq!(ready.body["status"], "unready");
    let public = app.get("/readyz", None).await;
    assert_eq!((public.status, &public.body), (503, &json!({"status": "unready"})));
    assert_eq!(readiness_check(&ready.body, "database")["ok"], false);
    assert_eq!(app.get("/healthz", None).await.status, 200, "the process itself is alive");
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let responses = [
        app.get("/v1/me", Some(&alice.token)).await,
        app.get("/v1/me", None).await,
        app.get("/nowhere", None).await,
        app.get("/healthz", None).await,
        app.get("/readyz", None).await,
        app.get("/openapi.json", None).await,
        app.post("/v1/me/circles", Some(&alice.token), json!({"name": "Family"})).await,
    ];
    let mut ids = std::collections::HashSet::new();
    for r in &responses {
        let id = r.header("x-request-id").unwrap_or_else(|| panic!("no request id on a {} response", r.status));
        assert!(ids.insert(id.to_owned()), "request ids are unique");
    }
    // A caller's own request id is kept.
    let req = app.build(Method::GET, "/v1/me", Some(&alice.token), None).header("x-request-id", "trace-me-123");
    assert_eq!(app.send(req).await.header("x-request-id"), Some("trace-me-123"));
}

#[tokio::test]
async fn shutdown_lets_a_request_in_flight_finish() {
    let app = crate::helpers::TestApp::spawn().await;
    let alice = app.register("alice").await;
    // Hold the contacts table so the request waits inside the database.
    let mut blocker = app.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE contacts.contacts IN ACCESS EXCLUSIVE MODE").execute(&mut *blocker).await.unwrap();
    let request = app.build(reqwest::Method::GET, "/v1/me/contacts", Some(&alice.token), None);
    let in_flight = tokio::spawn(request.send());
    // Wait until the request is blocked on the lock, i.e. truly in flight.
    app.wait_for_lock_wait().await;
    app.begin_shutdown().await;
    blocker.commit().await.unwrap();
    let response = in_flight.await.unwrap().expect("the in-flight request is answered");
    assert_eq!(response.status(), 200);
    // The app then stops cleanly within its grace period.
    tokio::time::timeout(std::time::Duration::from_secs(10), app.stop()).await.expect("stopped in time");
}
