use serde_json::json;

use crate::helpers::{PASSWORD, TestApp};

#[tokio::test]
async fn registering_returns_the_user_and_a_working_token() {
    let app = TestApp::spawn().await;
    let r = app
        .post(
            "/v1/users",
            None,
            json!({"handle": "Alice", "display_name": " Alice A ", "email": "Alice@Example.com", "password": PASSWORD}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["user"]["handle"], "alice");
    assert_eq!(r.body["user"]["display_name"], "Alice A");
    assert_eq!(r.body["user"]["email"], "alice@example.com");
    assert_eq!(r.body["user"]["role"], "user");
    let id = r.body["user"]["id"].as_str().unwrap();
    assert_eq!(r.header("location"), Some(format!("/v1/users/{id}").as_str()));
    let token = r.body["token"].as_str().unwrap();
    let me = app.get("/v1/me", Some(token)).await;
    assert_eq!(me.status, 200);
    assert_eq!(me.body["id"], id);
}

#[tokio::test]
async fn duplicate_handles_and_emails_conflict_case_insensitively() {
    let app = TestApp::spawn().await;
    app.register("alice").await;
    let r = app
        .post(
            "/v1/users",
            None,
            json!({"handle": "ALICE", "display_name": "x", "email": "other@example.com", "password": PASSWORD}),
        )
        .await;
    assert_eq!((r.status, r.problem()), (409, "handle-taken"));
    let r = app
        .post(
            "/v1/users",
            None,
            json!({"handle": "alice2", "display_name": "x", "email": "ALICE@example.com", "password": PASSWORD}),
        )
        .await;
    // A taken e-mail address gets the generic answer: it does not say the address has an account.
    assert_eq!((r.status, r.problem()), (409, "registration-refused"));
}

#[tokio::test]
async fn invalid_registrations_name_every_bad_field() {
    let app = TestApp::spawn().await;
    let r = app
        .post("/v1/users", None, json!({"handle": "a-b", "display_name": "", "email": "nope", "password": "short"}))
        .await;
    assert_eq!((r.status, r.problem()), (422, "validation"));
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let fields: Vec<&str> = r.body["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["handle", "display_name", "email", "password"]);
}

#[tokio::test]
async fn login_by_handle_or_email_and_logout_revokes_the_token() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    for login in ["alice", "ALICE@example.com"] {
        let r = app.post("/v1/sessions", None, json!({"login": login, "password": PASSWORD})).await;
        assert_eq!(r.status, 201, "{login}: {:?}", r.body);
        assert_eq!(r.body["user_id"], alice.id.as_str());
    }
    let wrong = app.post("/v1/sessions", None, json!({"login": "alice", "password": "wrong password!"})).await;
    assert_eq!((wrong.status, wrong.problem()), (401, "unauthenticated"));
    let unknown = app.post("/v1/sessions", None, json!({"login": "nobody", "password": PASSWORD})).await;
    assert_eq!(unknown.status, 401);

    assert_eq!(app.delete("/v1/sessions/current", Some(&alice.token)).await.status, 204);
    let after = app.get("/v1/me", Some(&alice.token)).await;
    assert_eq!((after.status, after.problem()), (401, "unauthenticated"));
    assert_eq!(after.header("www-authenticate"), Some("Bearer"));
}

#[tokio::test]
async fn login_attempts_are_rate_limited_per_login() {
    let app = TestApp::spawn().await;
    app.register("alice").await;
    for _ in 0..10 {
        let r = app.post("/v1/sessions", None, json!({"login": "alice", "password": "wrong password!"})).await;
        assert_eq!(r.status, 401);
    }
    let limited = app.post("/v1/sessions", None, json!({"login": "alice", "password": PASSWORD})).await;
    assert_eq!((limited.status, limited.problem()), (429, "rate-limited"));
    let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after));
}

#[tokio::test]
async fn profile_changes_need_the_current_password_for_email_and_password() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let r = app.patch("/v1/me", Some(&alice.token), json!({"display_name": "Alice Liddell"})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["display_name"], "Alice Liddell");
    assert_eq!(r.body["version"], 2);

    let r = app.patch("/v1/me", Some(&alice.token), json!({"email": "new@example.com"})).await;
    assert_eq!((r.status, r.body["errors"][0]["field"].as_str()), (422, Some("current_password")));
    let r = app
        .patch("/v1/me", Some(&alice.token), json!({"password": "a brand new password", "current_password": PASSWORD}))
        .await;
    assert_eq!(r.status, 200);
    let login = app.post("/v1/sessions", None, json!({"login": "alice", "password": "a brand new password"})).await;
    assert_eq!(login.status, 201);
    let r = app.patch("/v1/me", Some(&alice.token), json!({})).await;
    assert_eq!(r.status, 422);
    let r = app.patch("/v1/me", Some(&alice.token), json!({"role": "admin"})).await;
    assert_eq!(r.status, 422, "unknown fields are refused: {:?}", r.body);
}

#[tokio::test]
async fn public_profiles_resolve_by_id_or_handle() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    for key in [alice.id.as_str(), "alice", "ALICE"] {
        let r = app.get(&format!("/v1/users/{key}"), Some(&bob.token)).await;
        assert_eq!(r.status, 200, "{key}");
        assert_eq!(r.body["handle"], "alice");
        assert!(r.body.get("email").is_none(), "public profiles hide the e-mail");
    }
    assert_eq!(app.get("/v1/users/nobody", Some(&bob.token)).await.status, 404);
    assert_eq!(app.get("/v1/users/a-b", Some(&bob.token)).await.status, 404);
    assert_eq!(app.get("/v1/users/alice", None).await.status, 401);
}
