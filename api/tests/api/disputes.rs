//! Filing disputes (`/v1/disputes`, `/v1/me/disputes`) and moderating them
//! (`/v1/moderation/disputes`).

use serde_json::{Value, json};

use crate::helpers::{PASSWORD, TestApp, TestUser};

fn ids(items: &[Value]) -> Vec<String> {
    items.iter().map(|i| i["id"].as_str().unwrap().to_owned()).collect()
}

fn id(dispute: &Value) -> String {
    dispute["id"].as_str().unwrap().to_owned()
}

fn fields(r: &crate::helpers::Resp) -> Vec<&str> {
    r.body["errors"].as_array().map(|e| e.iter().map(|e| e["field"].as_str().unwrap()).collect()).unwrap_or_default()
}

async fn new_moderator(app: &TestApp, handle: &str) -> TestUser {
    let user = app.register(handle).await;
    app.grant_role(&user, "moderator").await;
    user
}

async fn decide(app: &TestApp, moderator: &TestUser, dispute: &str, decision: &str) -> crate::helpers::Resp {
    app.post(
        &format!("/v1/moderation/disputes/{dispute}/decision"),
        Some(&moderator.token),
        json!({"decision": decision, "note": "looked into it"}),
    )
    .await
}

async fn search_handles(app: &TestApp, as_user: &TestUser, q: &str) -> Vec<String> {
    let r = app.get(&format!("/v1/search/users?q={q}"), Some(&as_user.token)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["items"].as_array().unwrap().iter().map(|h| h["handle"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn each_kind_of_dispute_gets_the_priority_of_its_kind() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    for (kind, priority) in [("impersonation", "P0"), ("harassment", "P1"), ("spam", "P2"), ("incorrect_info", "P3")] {
        let r = app
            .post(
                "/v1/disputes",
                Some(&alice.token),
                json!({"target_id": bob.id, "kind": kind, "description": "details", "evidence": "https://example.com/x"}),
            )
            .await;
        assert_eq!(r.status, 201, "{kind}: {:?}", r.body);
        let id = r.body["id"].as_str().unwrap();
        assert_eq!(r.header("location"), Some(format!("/v1/disputes/{id}").as_str()));
        assert_eq!(r.body["kind"], kind);
        assert_eq!(r.body["priority"], priority, "{kind}");
        assert_eq!(r.body["status"], "pending");
        assert_eq!(r.body["reporter_id"], alice.id.as_str());
        assert_eq!(r.body["target_id"], bob.id.as_str());
        assert_eq!(r.body["evidence"], "https://example.com/x");
        assert!(r.body["decision"].is_null());
    }
}

#[tokio::test]
async fn a_dispute_can_name_its_target_by_handle_and_evidence_is_optional() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let r = app
        .post("/v1/disputes", Some(&alice.token), json!({"target_id": "BOB", "kind": "spam", "description": "x"}))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["target_id"], bob.id.as_str());
    assert!(r.body["evidence"].is_null());
}

#[tokio::test]
async fn an_unknown_kind_and_an_empty_description_are_both_reported_per_field() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let r = app
        .post(
            "/v1/disputes",
            Some(&alice.token),
            json!({"target_id": bob.id, "kind": "rudeness", "description": "   "}),
        )
        .await;
    assert_eq!((r.status, r.problem()), (422, "validation"), "{:?}", r.body);
    assert_eq!(fields(&r), ["kind", "description"]);

    let r = app
        .post(
            "/v1/disputes",
            Some(&alice.token),
            json!({"target_id": bob.id, "kind": "spam", "description": "x", "evidence": "e".repeat(2001)}),
        )
        .await;
    assert_eq!((r.status, fields(&r)), (422, vec!["evidence"]), "{:?}", r.body);
    let mine = app.get("/v1/me/disputes", Some(&alice.token)).await;
    assert_eq!(mine.body["items"], json!([]), "nothing was filed");
}

#[tokio::test]
async fn you_cannot_dispute_yourself() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    for target in [alice.id.as_str(), "alice"] {
        let r = app
            .post("/v1/disputes", Some(&alice.token), json!({"target_id": target, "kind": "spam", "description": "me"}))
            .await;
        assert_eq!((r.status, r.problem()), (422, "self-dispute"), "{target}: {:?}", r.body);
    }
}

#[tokio::test]
async fn disputing_an_unknown_user_is_404() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let unknown = uuid::Uuid::now_v7().to_string();
    for target in [unknown.as_str(), "nobody"] {
        let r = app
            .post("/v1/disputes", Some(&alice.token), json!({"target_id": target, "kind": "spam", "description": "x"}))
            .await;
        assert_eq!((r.status, r.problem()), (404, "not-found"), "{target}: {:?}", r.body);
    }
}

#[tokio::test]
async fn the_reporter_sees_a_pending_dispute_without_a_decision_and_the_target_does_not_see_it() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let filed = app.file_dispute(&alice, &bob, "harassment").await;
    let path = format!("/v1/disputes/{}", id(&filed));

    let r = app.get(&path, Some(&alice.token)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["status"], "pending");
    assert!(r.body.get("decision").is_some_and(Value::is_null), "decision is present and null: {:?}", r.body);
    assert_eq!(r.body["description"], "alice reports harassment");
    assert_eq!(r.body["priority"], "P1");

    let r = app.get(&path, Some(&bob.token)).await;
    assert_eq!((r.status, r.problem()), (404, "not-found"));
    let r = app.get(&format!("/v1/disputes/{}", uuid::Uuid::now_v7()), Some(&alice.token)).await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn my_disputes_lists_what_i_filed_newest_first_across_pages() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let carol = app.register("carol").await;
    let mut filed = Vec::new();
    for kind in ["spam", "impersonation", "incorrect_info", "harassment", "spam"] {
        filed.push(id(&app.file_dispute(&alice, &bob, kind).await));
    }
    // Others' disputes, even against alice, are not hers.
    app.file_dispute(&carol, &bob, "spam").await;
    app.file_dispute(&bob, &alice, "spam").await;
    filed.reverse();

    let pages = app.pages("/v1/me/disputes?limit=2", &alice.token).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
    let all: Vec<Value> = pages.into_iter().flatten().collect();
    assert_eq!(ids(&all), filed, "newest first, each once");
    assert!(all.iter().all(|d| d["reporter_id"] == alice.id.as_str()));
}

#[tokio::test]
async fn the_moderation_queue_filters_by_status_and_priority_and_orders_by_priority_then_age() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let carol = app.register("carol").await;
    let moderator = new_moderator(&app, "mod").await;
    let spam = id(&app.file_dispute(&alice, &bob, "spam").await);
    let imp_old = id(&app.file_dispute(&alice, &bob, "impersonation").await);
    let info = id(&app.file_dispute(&carol, &bob, "incorrect_info").await);
    let harass = id(&app.file_dispute(&carol, &bob, "harassment").await);
    let imp_new = id(&app.file_dispute(&carol, &alice, "impersonation").await);

    let all = app.pages("/v1/moderation/disputes?limit=2", &moderator.token).await;
    assert_eq!(all.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
    let all: Vec<Value> = all.into_iter().flatten().collect();
    assert_eq!(ids(&all), [imp_old.as_str(), imp_new.as_str(), harass.as_str(), spam.as_str(), info.as_str()]);

    let r = app.get("/v1/moderation/disputes?status=pending&priority=P0", Some(&moderator.token)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(ids(r.body["items"].as_array().unwrap()), [imp_old.as_str(), imp_new.as_str()]);

    assert_eq!(decide(&app, &moderator, &imp_old, "dismissed").await.status, 200);
    let r = app.get("/v1/moderation/disputes?status=pending&priority=P0", Some(&moderator.token)).await;
    assert_eq!(ids(r.body["items"].as_array().unwrap()), [imp_new.as_str()]);
    let r = app.get("/v1/moderation/disputes?status=dismissed", Some(&moderator.token)).await;
    assert_eq!(ids(r.body["items"].as_array().unwrap()), [imp_old.as_str()]);
    let r = app.get("/v1/moderation/disputes?priority=P2", Some(&moderator.token)).await;
    assert_eq!(ids(r.body["items"].as_array().unwrap()), [spam.as_str()]);

    let lower = app.get("/v1/moderation/disputes?status=pending&priority=p0", Some(&moderator.token)).await;
    assert_eq!(ids(lower.body["items"].as_array().unwrap()), [imp_new.as_str()], "priorities are case-insensitive");
    for query in ["status=closed", "priority=P4", "priority=urgent"] {
        let r = app.get(&format!("/v1/moderation/disputes?{query}"), Some(&moderator.token)).await;
        assert_eq!((r.status, r.problem()), (422, "validation"), "{query}: {:?}", r.body);
    }
    let r = app.get("/v1/moderation/disputes?cursor=bm9wZQ", Some(&moderator.token)).await;
    assert_eq!((r.status, r.problem()), (400, "invalid-cursor"));
}

#[tokio::test]
async fn upholding_an_impersonation_dispute_suspends_the_target_and_tells_the_reporter() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let moderator = new_moderator(&app, "mod").await;
    let dispute = id(&app.file_dispute(&alice, &bob, "impersonation").await);
    assert_eq!(app.get("/v1/me", Some(&bob.token)).await.status, 200);

    let r = app
        .post(
            &format!("/v1/moderation/disputes/{dispute}/decision"),
            Some(&moderator.token),
            json!({"decision": "upheld", "note": "same photo as the real alice"}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["status"], "upheld");
    assert_eq!(r.body["decision"]["decided_by"], moderator.id.as_str(), "moderators see who decided");

    let r = app.get("/v1/me", Some(&bob.token)).await;
    assert_eq!((r.status, r.problem()), (401, "unauthenticated"), "the target's token stops working");
    let r = app.post("/v1/sessions", None, json!({"login": "bob", "password": PASSWORD})).await;
    assert_eq!((r.status, r.problem()), (403, "forbidden"), "the target cannot sign in again");
    let profile = app.get(&format!("/v1/users/{}", bob.id), Some(&alice.token)).await;
    assert_eq!(profile.body["status"], "suspended");

    let r = app.get(&format!("/v1/disputes/{dispute}"), Some(&alice.token)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["status"], "upheld");
    let decision = &r.body["decision"];
    assert_eq!(decision["rule"], "moderator");
    assert_eq!(decision["note"], "same photo as the real alice", "the reporter sees the moderator's note");
    assert_eq!(decision["reasons"], json!(["upheld after review"]), "and the outcome in generic words");
    assert!(decision["rules_version"].is_null());
    assert!(decision["decided_at"].is_string());
    assert!(decision.get("decided_by").is_none(), "the reporter does not learn which moderator decided");
}

#[tokio::test]
async fn a_decided_dispute_cannot_be_decided_again() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let moderator = new_moderator(&app, "mod").await;
    let other = new_moderator(&app, "mod2").await;
    let dispute = id(&app.file_dispute(&alice, &bob, "incorrect_info").await);
    assert_eq!(decide(&app, &moderator, &dispute, "dismissed").await.status, 200);
    for (who, decision) in [(&moderator, "upheld"), (&other, "dismissed")] {
        let r = decide(&app, who, &dispute, decision).await;
        assert_eq!((r.status, r.problem()), (409, "dispute-already-decided"), "{:?}", r.body);
    }
    let r = app.get(&format!("/v1/disputes/{dispute}"), Some(&alice.token)).await;
    assert_eq!(r.body["status"], "dismissed", "the first decision stands");
}

#[tokio::test]
async fn upholding_each_kind_has_the_effect_of_its_kind_on_the_target() {
    // kind → (target still signs in, target still found by search)
    let cases = [
        ("impersonation", false, false),
        ("harassment", false, false),
        ("spam", true, false),
        ("incorrect_info", true, true),
    ];
    for (kind, can_use_token, searchable) in cases {
        let app = TestApp::spawn().await;
        let alice = app.register("alice").await;
        let target = app.register("target_user").await;
        let moderator = new_moderator(&app, "mod").await;
        assert_eq!(search_handles(&app, &alice, "target").await, ["target_user"]);
        let dispute = id(&app.file_dispute(&alice, &target, kind).await);
        let r = decide(&app, &moderator, &dispute, "upheld").await;
        assert_eq!((r.status, r.body["status"].as_str()), (200, Some("upheld")), "{kind}: {:?}", r.body);

        let me = app.get("/v1/me", Some(&target.token)).await;
        assert_eq!(me.status == 200, can_use_token, "{kind}: token after upheld: {}", me.status);
        let found = search_handles(&app, &alice, "target").await;
        assert_eq!(!found.is_empty(), searchable, "{kind}: search after upheld: {found:?}");
    }
}

#[tokio::test]
async fn upheld_spam_hides_the_target_from_search_but_leaves_the_account_active() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let spammer = app.register("spammer").await;
    app.register("spam_fan").await;
    let moderator = new_moderator(&app, "mod").await;
    let mut before = search_handles(&app, &alice, "spam").await;
    before.sort();
    assert_eq!(before, ["spam_fan", "spammer"]);
    let dispute = id(&app.file_dispute(&alice, &spammer, "spam").await);
    assert_eq!(decide(&app, &moderator, &dispute, "upheld").await.status, 200);

    assert_eq!(search_handles(&app, &alice, "spam").await, ["spam_fan"]);
    assert_eq!(search_handles(&app, &moderator, "spammer").await, Vec::<String>::new(), "hidden from everyone");
    let me = app.get("/v1/me", Some(&spammer.token)).await;
    assert_eq!((me.status, me.body["status"].as_str()), (200, Some("active")));
}

#[tokio::test]
async fn a_dismissed_dispute_has_no_effect_on_the_target() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let moderator = new_moderator(&app, "mod").await;
    let dispute = id(&app.file_dispute(&alice, &bob, "impersonation").await);
    let r = app
        .post(
            &format!("/v1/moderation/disputes/{dispute}/decision"),
            Some(&moderator.token),
            json!({"decision": "dismissed", "note": "this is the real bob"}),
        )
        .await;
    assert_eq!((r.status, r.body["status"].as_str()), (200, Some("dismissed")), "{:?}", r.body);

    let me = app.get("/v1/me", Some(&bob.token)).await;
    assert_eq!((me.status, me.body["status"].as_str()), (200, Some("active")));
    assert_eq!(app.post("/v1/sessions", None, json!({"login": "bob", "password": PASSWORD})).await.status, 201);
    assert_eq!(search_handles(&app, &alice, "bob").await, ["bob"]);
    let seen = app.get(&format!("/v1/disputes/{dispute}"), Some(&alice.token)).await;
    assert_eq!(seen.body["status"], "dismissed");
    assert_eq!(seen.body["decision"]["rule"], "moderator");
    assert_eq!(seen.body["decision"]["note"], "this is the real bob");
}

#[tokio::test]
async fn a_moderator_cannot_decide_a_dispute_they_filed_and_never_sees_one_against_themselves() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let moderator = new_moderator(&app, "mod").await;
    let as_reporter = id(&app.file_dispute(&moderator, &alice, "impersonation").await);
    let as_target = id(&app.file_dispute(&alice, &moderator, "impersonation").await);

    let r = decide(&app, &moderator, &as_reporter, "upheld").await;
    assert_eq!((r.status, r.problem()), (403, "forbidden"), "{:?}", r.body);
    let seen = app.get(&format!("/v1/disputes/{as_reporter}"), Some(&moderator.token)).await;
    assert_eq!((seen.status, seen.body["status"].as_str()), (200, Some("pending")), "its reporter sees it");

    let r = decide(&app, &moderator, &as_target, "dismissed").await;
    assert_eq!((r.status, r.problem()), (404, "not-found"), "{:?}", r.body);
    let seen = app.get(&format!("/v1/disputes/{as_target}"), Some(&moderator.token)).await;
    assert_eq!((seen.status, seen.problem()), (404, "not-found"), "the target does not see it: {:?}", seen.body);
    let queue = app.get("/v1/moderation/disputes", Some(&moderator.token)).await;
    assert_eq!(ids(queue.body["items"].as_array().unwrap()), [as_reporter.as_str()], "nor in the queue");
    assert_eq!(app.get(&format!("/v1/disputes/{as_target}"), Some(&alice.token)).await.body["status"], "pending");
    assert_eq!(app.get("/v1/me", Some(&alice.token)).await.status, 200, "alice was not suspended");
    assert_eq!(app.get("/v1/me", Some(&moderator.token)).await.status, 200, "nor was the moderator");
}

#[tokio::test]
async fn an_invalid_decision_or_note_is_422_and_an_unknown_dispute_404() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let moderator = new_moderator(&app, "mod").await;
    let dispute = id(&app.file_dispute(&alice, &bob, "spam").await);
    let path = format!("/v1/moderation/disputes/{dispute}/decision");

    let r = app.post(&path, Some(&moderator.token), json!({"decision": "maybe", "note": "hmm"})).await;
    assert_eq!((r.status, r.problem(), fields(&r)), (422, "validation", vec!["decision"]), "{:?}", r.body);
    let r = app.post(&path, Some(&moderator.token), json!({"decision": "upheld", "note": "  "})).await;
    assert_eq!((r.status, r.problem(), fields(&r)), (422, "validation", vec!["note"]), "{:?}", r.body);
    assert_eq!(app.get(&format!("/v1/disputes/{dispute}"), Some(&alice.token)).await.body["status"], "pending");

    let r = decide(&app, &moderator, &uuid::Uuid::now_v7().to_string(), "upheld").await;
    assert_eq!((r.status, r.problem()), (404, "not-found"));
}
