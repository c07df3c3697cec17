//! The OpenAPI document is generated with the router (`trellis_api::app::api_router`), and these
//! tests keep the two in step: every documented operation is routed, no documented path takes an
//! undocumented method, and the security requirements are declared.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::TestApp;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// `(path, method) -> operation` of a document.
fn operations(doc: &Value) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if let Some(op) = item.get(method) {
                out.insert((path.clone(), method.to_owned()), op.clone());
            }
        }
    }
    out
}

/// The path with every `{param}` filled: a fresh uuid (user parameters also take an id).
fn concrete(path: &str) -> String {
    path.split('/')
        .map(
            |seg| {
                if seg.starts_with('{') && seg.ends_with('}') {
                    uuid::Uuid::new_v4().to_string()
                } else {
                    seg.to_owned()
                }
            },
        )
        .collect::<Vec<_>>()
        .join("/")
}

fn generated() -> Value {
    let (_router, doc) = trellis_api::app::api_router();
    serde_json::to_value(&doc).expect("the document serialises")
}

#[tokio::test]
async fn the_served_document_is_openapi_3_1_and_is_the_generated_one() {
    let app = TestApp::spawn().await;
    let r = app.get("/openapi.json", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let version = r.body["openapi"].as_str().expect("an openapi field");
    assert!(version.starts_with("3.1."), "OpenAPI 3.1.x, got {version}");
    assert_eq!(r.body["info"]["title"], "Trellis API");
    assert_eq!(r.body, generated(), "the served document is the one built with the router");
    let scheme = &r.body["components"]["securitySchemes"]["bearer"];
    assert_eq!((&scheme["type"], &scheme["scheme"]), (&json!("http"), &json!("bearer")));
}

#[tokio::test]
async fn every_documented_operation_is_routed_and_no_other_method_is() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    // Signing out revokes the caller's tokens: those operations get a user of their own.
    let bob = app.register("bob").await;
    let doc = generated();
    let ops = operations(&doc);
    assert!(ops.len() >= 20, "the document lists the API: {} operations", ops.len());

    for (path, method) in ops.keys() {
        let token = if path.starts_with("/v1/sessions") { &bob.token } else { &alice.token };
        let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let body = matches!(method.as_str(), "post" | "put" | "patch").then(|| json!({}));
        let r = app.request(m, &concrete(path), Some(token), body).await;
        assert!(
            !matches!(r.problem(), "route-not-found" | "method-not-allowed"),
            "{method} {path} is documented but not routed: {} {:?}",
            r.status,
            r.body
        );
        assert_ne!(r.status, 500, "{method} {path}: {:?}", r.body);
    }

    // Conversely, a documented path answers every undocumented method with 405.
    let paths: BTreeSet<&String> = ops.keys().map(|(p, _)| p).collect();
    for path in &paths {
        for method in METHODS.iter().filter(|m| !ops.contains_key(&((*path).clone(), (**m).to_owned()))) {
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let body = matches!(*method, "post" | "put" | "patch").then(|| json!({}));
            let r = app.request(m, &concrete(path), Some(&alice.token), body).await;
            assert_eq!(
                (r.status, r.problem()),
                (405, "method-not-allowed"),
                "{method} {path} is routed but not documented"
            );
        }
    }

    // The router saw every documented path template, and no other template under /v1.
    let (_, metrics) = app.admin_get("/metrics").await;
    let routed: BTreeSet<String> = metrics
        .lines()
        .filter(|l| l.starts_with("trellis_http_request_duration_seconds_count{"))
        .filter_map(|l| l.split("route=\"").nth(1).and_then(|r| r.split('"').next()))
        .filter(|r| r.starts_with("/v1/"))
        .map(str::to_owned)
        .collect();
    let documented: BTreeSet<String> = paths.iter().map(|p| (*p).clone()).collect();
    assert_eq!(routed, documented, "the route templates the router matched are the documented paths");
}

#[tokio::test]
async fn the_contract_paths_are_documented() {
    let ops = operations(&generated());
    let contract = [
        ("post", "/v1/users"),
        ("post", "/v1/sessions"),
        ("delete", "/v1/sessions/current"),
        ("get", "/v1/me"),
        ("patch", "/v1/me"),
        ("get", "/v1/users/{user}"),
        ("get", "/v1/me/contacts"),
        ("put", "/v1/me/contacts/{user_id}"),
        ("delete", "/v1/me/contacts/{user_id}"),
        ("post", "/v1/me/circles"),
        ("get", "/v1/me/circles"),
        ("get", "/v1/me/circles/{id}"),
        ("patch", "/v1/me/circles/{id}"),
        ("delete", "/v1/me/circles/{id}"),
        ("put", "/v1/me/circles/{id}/members/{user_id}"),
        ("delete", "/v1/me/circles/{id}/members/{user_id}"),
        ("post", "/v1/disputes"),
        ("get", "/v1/disputes/{id}"),
        ("get", "/v1/me/disputes"),
        ("get", "/v1/moderation/disputes"),
        ("post", "/v1/moderation/disputes/{id}/decision"),
        ("get", "/v1/users/{user}/score"),
        ("get", "/v1/search/users"),
    ];
    for (method, path) in contract {
        assert!(ops.contains_key(&(path.to_owned(), method.to_owned())), "{method} {path} is documented");
    }
}

#[tokio::test]
async fn every_operation_but_sign_up_and_log_in_requires_the_bearer_token() {
    let ops = operations(&generated());
    let open = [("/v1/users", "post"), ("/v1/sessions", "post")];
    for ((path, method), op) in &ops {
        let is_open = open.contains(&(path.as_str(), method.as_str()));
        let security = op.get("security").cloned().unwrap_or(Value::Null);
        if is_open {
            assert!(
                security.is_null() || security.as_array().is_some_and(|s| s.is_empty()),
                "{method} {path} needs no token: {security}"
            );
        } else {
            assert_eq!(security, json!([{"bearer": []}]), "{method} {path} declares the bearer requirement");
        }
        assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()), "{method} {path} documents responses");
    }
    for (path, method) in open {
        assert!(ops.contains_key(&(path.to_owned(), method.to_owned())), "{method} {path} is documented");
    }
    // The writes anyone may call are the ones that ignore `Idempotency-Key`.
    let mut anonymous: Vec<(String, String)> = trellis_api::idempotency::ANONYMOUS_WRITES
        .iter()
        .map(|(method, path)| ((*path).to_owned(), method.to_lowercase()))
        .collect();
    anonymous.sort();
    let mut open: Vec<(String, String)> = open.iter().map(|(p, m)| ((*p).to_owned(), (*m).to_owned())).collect();
    open.sort();
    assert_eq!(anonymous, open, "idempotency::ANONYMOUS_WRITES lists the operations without a bearer requirement");
}

#[tokio::test]
async fn documented_operations_answer_anonymous_callers_as_documented() {
    let app = TestApp::spawn().await;
    let ops = operations(&generated());
    for ((path, method), op) in &ops {
        if op.get("security").is_none() {
            continue;
        }
        let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let body = matches!(method.as_str(), "post" | "put" | "patch").then(|| json!({}));
        let r = app.request(m, &concrete(path), None, body).await;
        assert_eq!((r.status, r.problem()), (401, "unauthenticated"), "{method} {path} without a token");
        assert!(op["responses"].get("401").is_some(), "{method} {path} documents its 401");
    }
}
