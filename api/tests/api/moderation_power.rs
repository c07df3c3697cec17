//! Moderation power: disputes against moderators and admins are for admins only, a
//! moderator's role is checked when they decide, and wrongful suspensions are undone by an
//! audited reinstatement that publishes `identity.user_reinstated`.

use serde_json::{Value, json};

use crate::helpers::{PASSWORD, TestApp, TestUser};

fn id(dispute: &Value) -> String {
    dispute["id"].as_str().unwrap().to_owned()
}

fn ids(r: &crate::helpers::Resp) -> Vec<String> {
    r.body["items"].as_array().expect("a list").iter().map(id).collect()
}

async fn with_role(app: &TestApp, handle: &str, role: &str) -> TestUser {
    let user = app.register(handle).await;
    app.grant_role(&user, role).await;
    user
}

async fn decide(app: &TestApp, who: &TestUser, dispute: &str, decision: &str) -> crate::helpers::Resp {
    app.post(
        &format!("/v1/moderation/disputes/{dispute}/decision"),
        Some(&who.token),
        json!({"decision": decision, "note": "looked into it"}),
    )
    .await
}

/// (action, from, to, actor) of a user's audited changes, oldest first.
async fn audit(app: &TestApp, user: &TestUser) -> Vec<(String, String, String, String)> {
    sqlx::query_as(
        "SELECT action, from_value, to_value, actor FROM identity.user_admin_audit WHERE user_id = $1::uuid ORDER BY id",
    )
    .bind(&user.id)
    .fetch_all(&app.db.pool)
    .await
    .expect("reading the audit")
}

fn row(action: &str, from: &str, to: &str, actor: &str) -> (String, String, String, String) {
    (action.into(), from.into(), to.into(), actor.into())
}

#[tokio::test]
async fn only_admins_see_and_decide_disputes_against_moderators_and_admins() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let moderator = with_role(&app, "mod", "moderator").await;
    let peer = with_role(&app, "peer", "moderator").await;
    let admin = with_role(&app, "admin", "admin").await;
    let second_admin = with_role(&app, "admin2", "admin").await;
    let against_user = id(&app.file_dispute(&alice, &bob, "spam").await);
    let against_moderator = id(&app.file_dispute(&alice, &moderator, "harassment").await);
    let against_admin = id(&app.file_dispute(&alice, &admin, "impersonation").await);

    let queue = |who: &TestUser| {
        let token = who.token.clone();
        let app = &app;
        async move { ids(&app.get("/v1/moderation/disputes?limit=100", Some(&token)).await) }
    };
    assert_eq!(queue(&peer).await, [against_user.as_str()], "a moderator sees disputes against users only");
    assert_eq!(queue(&moderator).await, [against_user.as_str()]);
    assert_eq!(queue(&admin).await, [against_moderator.as_str(), against_user.as_str()], "P1 then P2; not their own");
    assert_eq!(queue(&second_admin).await, [against_admin.as_str(), against_moderator.as_str(), against_user.as_str()]);

    for dispute in [&against_moderator, &against_admin] {
        let r = app.get(&format!("/v1/disputes/{dispute}"), Some(&peer.token)).await;
        assert_eq!((r.status, r.problem()), (404, "not-found"), "{:?}", r.body);
        let r = decide(&app, &peer, dispute, "upheld").await;
        assert_eq!((r.status, r.problem()), (404, "not-found"), "{:?}", r.body);
    }
    let r = decide(&app, &admin, &against_admin, "dismissed").await;
    assert_eq!((r.status, r.problem()), (404, "not-found"), "an admin does not decide a dispute against themselves");
    let r = app.get(&format!("/v1/disputes/{against_admin}"), Some(&alice.token)).await;
    assert_eq!((r.status, r.body["status"].as_str()), (200, Some("pending")), "its reporter still sees it");

    let r = decide(&app, &admin, &against_moderator, "upheld").await;
    assert_eq!((r.status, r.body["status"].as_str()), (200, Some("upheld")), "{:?}", r.body);
    assert_eq!(app.get("/v1/me", Some(&moderator.token)).await.status, 401, "an admin may suspend a moderator");
    let r = decide(&app, &second_admin, &against_admin, "dismissed").await;
    assert_eq!(r.status, 200, "another admin decides it: {:?}", r.body);
}

/// A moderator's permission is the target's role when they decide, read under the target's
/// row lock: a dispute filed against a user who has since become a moderator is an admin's.
#[tokio::test]
async fn a_target_promoted_after_filing_is_moderated_by_admins_only() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let moderator = with_role(&app, "mod", "moderator").await;
    let admin = with_role(&app, "admin", "admin").await;
    let dispute = id(&app.file_dispute(&alice, &bob, "harassment").await);
    assert_eq!(ids(&app.get("/v1/moderation/disputes", Some(&moderator.token)).await), [dispute.as_str()]);
    app.grant_role(&bob, "moderator").await;

    assert_eq!(ids(&app.get("/v1/moderation/disputes", Some(&moderator.token)).await), Vec::<String>::new());
    let r = decide(&app, &moderator, &dispute, "upheld").await;
    assert_eq!((r.status, r.problem()), (404, "not-found"), "{:?}", r.body);
    assert_eq!(app.get("/v1/me", Some(&bob.token)).await.status, 200);
    let r = decide(&app, &admin, &dispute, "dismissed").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

#[tokio::test]
async fn an_admin_reinstates_a_wrongly_suspended_user_audited_and_published_in_one_transaction() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let moderator = with_role(&app, "mod", "moderator").await;
    let admin = with_role(&app, "admin", "admin").await;
    let dispute = id(&app.file_dispute(&alice, &bob, "impersonation").await);
    assert_eq!(decide(&app, &moderator, &dispute, "upheld").await.status, 200);
    assert_eq!(app.get("/v1/me", Some(&bob.token)).await.status, 401, "bob is suspended");
    let path = "/v1/admin/users/bob/reinstate";

    let r = app.post(path, Some(&admin.token), json!({"reason": "  "})).await;
    assert_eq!((r.status, r.problem()), (422, "validation"), "{:?}", r.body);
    assert_eq!(r.body["errors"][0]["field"], "reason");
    let r = app.post(path, Some(&admin.token), json!({"reason": "x".repeat(2001)})).await;
    assert_eq!((r.status, r.body["errors"][0]["code"].as_str()), (422, Some("too_long")), "{:?}", r.body);
    let r = app.post(path, Some(&admin.token), json!({})).await;
    assert_eq!((r.status, r.problem()), (422, "validation"), "a reason is required: {:?}", r.body);
    let r = app.post("/v1/admin/users/nobody/reinstate", Some(&admin.token), json!({"reason": "x"})).await;
    assert_eq!((r.status, r.problem()), (404, "not-found"));
    let r = app.post(path, Some(&moderator.token), json!({"reason": "it was not him"})).await;
    assert_eq!((r.status, r.problem()), (403, "forbidden"), "moderators do not reinstate");
    assert_eq!(audit(&app, &bob).await, [row("suspend", "active", "suspended", "mod")], "nothing else changed");

    let r = app.post(path, Some(&admin.token), json!({"reason": "the impersonation report was mistaken"})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        (&r.body["action"], &r.body["from"], &r.body["to"], &r.body["actor"], &r.body["user_id"]),
        (&json!("reinstate"), &json!("suspended"), &json!("active"), &json!("admin"), &json!(bob.id)),
        "{:?}",
        r.body
    );
    assert_eq!(
        audit(&app, &bob).await,
        [row("suspend", "active", "suspended", "mod"), row("reinstate", "suspended", "active", "admin")]
    );
    // The event was written with the change: it carries the time of the audit row's
    // transaction (`now()`, the same for every statement of one transaction).
    let same_transaction: bool = sqlx::query_scalar(
        "SELECT (o.payload->>'occurred_at')::timestamptz = a.acted_at
         FROM ops.outbox o, identity.user_admin_audit a
         WHERE o.subject = 'events.identity.user_reinstated' AND a.action = 'reinstate'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert!(same_transaction);
    let events = app.wait_for_events("identity.user_reinstated", 1).await;
    assert_eq!(events[0].payload["data"], json!({"user_id": bob.id}));
    assert_eq!(events[0].payload["actor_id"], json!(admin.id));

    assert_eq!(app.get("/v1/me", Some(&bob.token)).await.status, 401, "the old token stays revoked");
    let r = app.post("/v1/sessions", None, json!({"login": "bob", "password": PASSWORD})).await;
    assert_eq!(r.status, 201, "bob signs in again: {:?}", r.body);
    let r = app.get(&format!("/v1/disputes/{dispute}"), Some(&alice.token)).await;
    assert_eq!(r.body["status"], "upheld", "the dispute stays upheld");

    let r = app.post(path, Some(&admin.token), json!({"reason": "again"})).await;
    assert_eq!((r.status, r.problem()), (409, "user-not-suspended"), "{:?}", r.body);
    assert_eq!(audit(&app, &bob).await.len(), 2, "a refused reinstatement records nothing");
}
