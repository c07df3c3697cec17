//! The cutover flags' admin API: `GET /v1/admin/flags`, `PUT /v1/admin/flags/{name}` and
//! `GET /v1/admin/flags/{name}/history`.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestApp, TestUser};

async fn admin(app: &TestApp) -> TestUser {
    let admin = app.register("root").await;
    app.grant_role(&admin, "admin").await;
    admin
}

/// Every audit row: (name, from, to, actor, reason, forced).
async fn audit(app: &TestApp) -> Vec<(String, String, String, String, String, bool)> {
    sqlx::query_as("SELECT name, from_value, to_value, actor, reason, forced FROM ops.feature_flag_audit ORDER BY id")
        .fetch_all(&app.db.pool)
        .await
        .expect("reading the audit")
}

/// name → value, as the list answers it.
async fn values(app: &TestApp, token: &str) -> Vec<(String, String)> {
    let r = app.get("/v1/admin/flags", Some(token)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|f| (f["name"].as_str().unwrap().to_owned(), f["value"].as_str().unwrap().to_owned()))
        .collect()
}

fn all_worker() -> Vec<(String, String)> {
    ["dispute.executor", "score.executor", "search.executor"].map(|n| (n.to_owned(), "worker".to_owned())).to_vec()
}

#[tokio::test]
async fn admins_list_the_three_flags_at_worker() {
    let app = TestApp::spawn().await;
    let root = admin(&app).await;
    let r = app.get("/v1/admin/flags", Some(&root.token)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let items = r.body["items"].as_array().expect("items");
    assert_eq!(items.len(), 3);
    for f in items {
        assert_eq!(f["value"], "worker", "{f}");
        assert_eq!(f["previous"], Value::Null, "{f}");
        assert_eq!(f["updated_by"], "migration", "{f}");
        assert!(f["updated_at"].as_str().is_some_and(|t| t.contains('T')), "an RFC 3339 time: {f}");
    }
    assert_eq!(values(&app, &root.token).await, all_worker());
}

#[tokio::test]
async fn an_admin_sets_a_flag_and_exactly_one_audit_row_names_them() {
    let app = TestApp::spawn().await;
    let root = admin(&app).await;
    let t = Some(root.token.as_str());
    let r = app.put("/v1/admin/flags/search.executor", t, json!({"value": "shadow", "reason": "  parity run  "})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body, json!({"name": "search.executor", "from": "worker", "to": "shadow"}));
    assert_eq!(
        audit(&app).await,
        [("search.executor".into(), "worker".into(), "shadow".into(), "root".into(), "parity run".into(), false)]
    );
    let list = app.get("/v1/admin/flags", t).await;
    let search = list.body["items"].as_array().unwrap().iter().find(|f| f["name"] == "search.executor").unwrap();
    assert_eq!(
        (&search["value"], &search["previous"], &search["updated_by"]),
        (&json!("shadow"), &json!("worker"), &json!("root"))
    );

    // The same value again: answered, nothing recorded.
    let again = app.put("/v1/admin/flags/search.executor", t, json!({"value": "shadow", "reason": "again"})).await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.body, json!({"name": "search.executor", "from": "shadow", "to": "shadow"}));
    assert_eq!(audit(&app).await.len(), 1, "setting the current value writes no audit row");

    let back = app.put("/v1/admin/flags/search.executor", t, json!({"value": "worker", "reason": "parity ok"})).await;
    assert_eq!(back.body, json!({"name": "search.executor", "from": "shadow", "to": "worker"}));
    let history = app.get("/v1/admin/flags/search.executor/history", t).await;
    assert_eq!(history.status, 200, "{:?}", history.body);
    let items = history.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(
        (&items[0]["from"], &items[0]["to"], &items[0]["reason"]),
        (&json!("shadow"), &json!("worker"), &json!("parity ok")),
        "newest first"
    );
    assert_eq!((&items[1]["actor"], &items[1]["forced"]), (&json!("root"), &json!(false)));
    let one = app.get("/v1/admin/flags/search.executor/history?limit=1", t).await;
    assert_eq!(one.body["items"].as_array().unwrap().len(), 1);
    let none = app.get("/v1/admin/flags/score.executor/history", t).await;
    assert_eq!(none.body, json!({"items": []}));
}

#[tokio::test]
async fn unknown_flags_are_404_and_bad_values_or_reasons_are_422_per_field() {
    let app = TestApp::spawn().await;
    let root = admin(&app).await;
    let t = Some(root.token.as_str());

    let r = app.put("/v1/admin/flags/score.exec", t, json!({"value": "worker", "reason": "x"})).await;
    assert_eq!((r.status, r.problem()), (404, "not-found"), "{:?}", r.body);
    let r = app.get("/v1/admin/flags/nope/history", t).await;
    assert_eq!((r.status, r.problem()), (404, "not-found"), "{:?}", r.body);
    let r = app.get("/v1/admin/flags/score.executor/history?limit=0", t).await;
    assert_eq!((r.status, r.problem()), (422, "validation"), "{:?}", r.body);

    // (body, the per-field errors as (field, code))
    let cases: [(Value, &[(&str, &str)]); 5] = [
        (json!({"value": "Worker", "reason": "x"}), &[("value", "unknown_value")]),
        (json!({"value": "monolith", "reason": ""}), &[("reason", "required")]),
        (json!({"value": "monolith", "reason": " \t "}), &[("reason", "required")]),
        (json!({"value": "sideways", "reason": ""}), &[("value", "unknown_value"), ("reason", "required")]),
        (json!({"value": "monolith"}), &[("body", "invalid")]),
    ];
    for (body, want) in cases {
        let r = app.put("/v1/admin/flags/score.executor", t, body.clone()).await;
        assert_eq!((r.status, r.problem()), (422, "validation"), "{body}: {:?}", r.body);
        let got: Vec<(&str, &str)> = r.body["errors"]
            .as_array()
            .expect("per-field errors")
            .iter()
            .map(|e| (e["field"].as_str().unwrap(), e["code"].as_str().unwrap()))
            .collect();
        assert_eq!(got, want, "{body}");
    }
    let r = app.put("/v1/admin/flags/score.executor", t, json!({"value": "Worker", "reason": "x"})).await;
    assert!(r.body["errors"][0]["message"].as_str().unwrap().contains("monolith, worker, shadow"), "{:?}", r.body);
    let r =
        app.put("/v1/admin/flags/score.executor", t, json!({"value": "monolith", "reason": "x", "forse": true})).await;
    assert_eq!((r.status, r.problem()), (422, "validation"), "unknown fields are refused: {:?}", r.body);

    assert!(audit(&app).await.is_empty(), "nothing recorded");
    assert_eq!(values(&app, &root.token).await, all_worker(), "nothing changed");
}

#[tokio::test]
async fn only_admins_read_or_change_flags() {
    let app = TestApp::spawn().await;
    let root = admin(&app).await;
    let user = app.register("alice").await;
    let moderator = app.register("moder").await;
    app.grant_role(&moderator, "moderator").await;
    let change = Some(json!({"value": "monolith", "reason": "takeover"}));
    let endpoints = [
        (Method::GET, "/v1/admin/flags", None),
        (Method::PUT, "/v1/admin/flags/score.executor", change.clone()),
        // The role is checked first: a non-admin learns nothing about names or bodies.
        (Method::PUT, "/v1/admin/flags/nope", Some(json!({"bogus": 1}))),
        (Method::GET, "/v1/admin/flags/score.executor/history", None),
    ];
    for (method, path, body) in &endpoints {
        let r = app.request(method.clone(), path, None, body.clone()).await;
        assert_eq!((r.status, r.problem()), (401, "unauthenticated"), "{method} {path}: {:?}", r.body);
        for caller in [&user, &moderator] {
            let r = app.request(method.clone(), path, Some(&caller.token), body.clone()).await;
            assert_eq!(
                (r.status, r.problem()),
                (403, "forbidden"),
                "{method} {path} as {}: {:?}",
                caller.handle,
                r.body
            );
        }
    }
    assert!(audit(&app).await.is_empty());
    assert_eq!(values(&app, &root.token).await, all_worker(), "nothing changed");
    let r = app.request(Method::PUT, "/v1/admin/flags/score.executor", Some(&root.token), change).await;
    assert_eq!(r.status, 200, "the admin may: {:?}", r.body);
}

/// Records `n` comparisons of the score orchestrator's shadow: `matched` of them matched.
async fn comparisons(app: &TestApp, n: i64, matched: i64) {
    use trellis_domain::shadow::{Comparison, ComparisonResult};
    let mut all =
        vec![Comparison { key: "run a/b".into(), result: ComparisonResult::Matched, count: matched, diffs: vec![] }];
    for i in 0..(n - matched) {
        all.push(Comparison::of(format!("user {i}"), &json!({"score": 1}), &json!({"score": 2})));
    }
    trellis_store::cutover::record(&app.db.pool, trellis_domain::flags::Flag::ScoreExecutor, &all).await.unwrap();
}

#[tokio::test]
async fn promoting_the_worker_needs_a_passing_shadow_period_or_force_which_is_audited() {
    let app = TestApp::spawn().await;
    let root = admin(&app).await;
    let t = Some(root.token.as_str());
    let put = |value: &'static str, force: bool| {
        app.put("/v1/admin/flags/score.executor", t, json!({"value": value, "reason": "cutover", "force": force}))
    };
    assert_eq!(put("monolith", false).await.status, 200, "a rollback is never refused");

    // Straight from monolith: no shadow period in progress.
    let r = put("worker", false).await;
    assert_eq!((r.status, r.problem()), (409, "promotion-refused"), "{:?}", r.body);
    assert!(r.body["detail"].as_str().unwrap().contains("is not running the worker in shadow"), "{:?}", r.body);

    // In shadow, with the monolith as primary: too few comparisons (the default asks 1000), then
    // enough but too many mismatches (the default allows 0.1 %).
    assert_eq!(put("shadow", false).await.status, 200);
    comparisons(&app, 10, 10).await;
    let r = put("worker", false).await;
    assert_eq!((r.status, r.problem()), (409, "promotion-refused"), "{:?}", r.body);
    let detail = r.body["detail"].as_str().unwrap();
    assert!(detail.contains("10 comparisons made, 1000 required") && detail.contains("--force"), "{detail}");
    comparisons(&app, 1000, 990).await;
    let r = put("worker", false).await;
    assert!(r.body["detail"].as_str().unwrap().contains("mismatch rate 0.9901% (10 of 1010)"), "{:?}", r.body);
    let now = values(&app, &root.token).await.into_iter().find(|(name, _)| name == "score.executor").unwrap();
    assert_eq!(now.1, "shadow", "nothing changed");

    // Forced through: changed, and the audit says so.
    let r = put("worker", true).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(r.body["forced_past"].as_str().unwrap().contains("mismatch rate"), "{:?}", r.body);
    let forced: Vec<bool> = audit(&app).await.into_iter().map(|a| a.5).collect();
    assert_eq!(forced, [false, false, true], "only the forced promotion is recorded as forced");

    // A new shadow period starts its count afresh; a clean one passes without force.
    assert_eq!(put("monolith", false).await.status, 200);
    assert_eq!(put("shadow", false).await.status, 200);
    let r = put("worker", false).await;
    assert!(r.body["detail"].as_str().unwrap().contains("0 comparisons made"), "{:?}", r.body);
    comparisons(&app, 1000, 1000).await;
    let r = put("worker", false).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(r.body.get("forced_past").is_none(), "{:?}", r.body);
    assert!(!audit(&app).await.last().unwrap().5, "not forced");
}
