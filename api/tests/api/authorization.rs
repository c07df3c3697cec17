//! The authorization matrix: every endpoint against anonymous, another ordinary user, the owner,
//! a moderator and an admin.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Resp, TestApp, TestUser};

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Anonymous,
    Other,
    Owner,
    Moderator,
    Admin,
}

const CALLERS: [Caller; 5] = [Caller::Anonymous, Caller::Other, Caller::Owner, Caller::Moderator, Caller::Admin];

/// One app with the owner's data: a contact (bob) in a circle, a dispute against bob; plus
/// another user, a moderator and an admin, each with data of their own.
struct World {
    app: TestApp,
    owner: TestUser,
    other: TestUser,
    moderator: TestUser,
    admin: TestUser,
    bob: TestUser,
    circle: String,
    dispute: String,
}

impl World {
    async fn new() -> Self {
        let app = TestApp::spawn().await;
        let owner = app.register("owner").await;
        let other = app.register("other").await;
        let moderator = app.register("moder").await;
        app.grant_role(&moderator, "moderator").await;
        let admin = app.register("admin").await;
        app.grant_role(&admin, "admin").await;
        let bob = app.register("bob").await;

        app.add_contact(&owner, &bob).await;
        let circle = app.create_circle(&owner, "Friends").await;
        let r = app.put(&format!("/v1/me/circles/{circle}/members/{}", bob.id), Some(&owner.token), json!({})).await;
        assert_eq!(r.status, 201);
        let dispute = app.file_dispute(&owner, &bob, "spam").await["id"].as_str().unwrap().to_owned();

        // Everybody else has bob as a contact too, a circle of the same name and a dispute of
        // their own, so that "not found" can only mean "not yours".
        for user in [&other, &moderator, &admin] {
            app.add_contact(user, &bob).await;
            app.create_circle(user, "Friends").await;
            app.file_dispute(user, &bob, "incorrect_info").await;
        }
        Self { app, owner, other, moderator, admin, bob, circle, dispute }
    }

    fn token(&self, caller: Caller) -> Option<&str> {
        match caller {
            Caller::Anonymous => None,
            Caller::Other => Some(&self.other.token),
            Caller::Owner => Some(&self.owner.token),
            Caller::Moderator => Some(&self.moderator.token),
            Caller::Admin => Some(&self.admin.token),
        }
    }

    fn user(&self, caller: Caller) -> &TestUser {
        match caller {
            Caller::Anonymous => unreachable!("anonymous has no user"),
            Caller::Other => &self.other,
            Caller::Owner => &self.owner,
            Caller::Moderator => &self.moderator,
            Caller::Admin => &self.admin,
        }
    }

    async fn call(&self, caller: Caller, method: &Method, path: &str, body: &Option<Value>) -> Resp {
        self.app.request(method.clone(), path, self.token(caller), body.clone()).await
    }

    /// The owner's data, as the owner sees it; must not change when others try their hand.
    async fn owner_snapshot(&self) -> Value {
        let t = Some(self.owner.token.as_str());
        json!({
            "contacts": self.app.get("/v1/me/contacts", t).await.body["items"],
            "circle": self.app.get(&format!("/v1/me/circles/{}", self.circle), t).await.body,
            "members": self.app.get(&format!("/v1/me/circles/{}/members", self.circle), t).await.body["items"],
            "dispute": self.app.get(&format!("/v1/disputes/{}", self.dispute), t).await.body,
        })
    }
}

/// Every authenticated endpoint, as (method, OpenAPI path template, concrete path, body), with a
/// well-formed request so that only authorization decides.
fn every_endpoint(w: &World) -> Vec<(Method, &'static str, String, Option<Value>)> {
    let (c, d, b) = (&w.circle, &w.dispute, &w.bob.id);
    vec![
        (Method::GET, "/v1/me", "/v1/me".into(), None),
        (Method::PATCH, "/v1/me", "/v1/me".into(), Some(json!({"display_name": "New Name"}))),
        (Method::DELETE, "/v1/sessions/current", "/v1/sessions/current".into(), None),
        (Method::DELETE, "/v1/sessions", "/v1/sessions".into(), None),
        (Method::GET, "/v1/me/sessions", "/v1/me/sessions".into(), None),
        (Method::GET, "/v1/users/{user}", format!("/v1/users/{b}"), None),
        (Method::GET, "/v1/me/contacts", "/v1/me/contacts".into(), None),
        (Method::PUT, "/v1/me/contacts/{user_id}", format!("/v1/me/contacts/{b}"), Some(json!({"label": "x"}))),
        (Method::DELETE, "/v1/me/contacts/{user_id}", format!("/v1/me/contacts/{b}"), None),
        (Method::GET, "/v1/me/circles", "/v1/me/circles".into(), None),
        (Method::POST, "/v1/me/circles", "/v1/me/circles".into(), Some(json!({"name": "New"}))),
        (Method::GET, "/v1/me/circles/{id}", format!("/v1/me/circles/{c}"), None),
        (Method::PATCH, "/v1/me/circles/{id}", format!("/v1/me/circles/{c}"), Some(json!({"name": "Renamed"}))),
        (Method::DELETE, "/v1/me/circles/{id}", format!("/v1/me/circles/{c}"), None),
        (Method::GET, "/v1/me/circles/{id}/members", format!("/v1/me/circles/{c}/members"), None),
        (
            Method::PUT,
            "/v1/me/circles/{id}/members/{user_id}",
            format!("/v1/me/circles/{c}/members/{b}"),
            Some(json!({})),
        ),
        (Method::DELETE, "/v1/me/circles/{id}/members/{user_id}", format!("/v1/me/circles/{c}/members/{b}"), None),
        (
            Method::POST,
            "/v1/disputes",
            "/v1/disputes".into(),
            Some(json!({"target_id": b, "kind": "spam", "description": "x"})),
        ),
        (Method::GET, "/v1/disputes/{id}", format!("/v1/disputes/{d}"), None),
        (Method::GET, "/v1/me/disputes", "/v1/me/disputes".into(), None),
        (Method::GET, "/v1/moderation/disputes", "/v1/moderation/disputes".into(), None),
        (
            Method::POST,
            "/v1/moderation/disputes/{id}/decision",
            format!("/v1/moderation/disputes/{d}/decision"),
            Some(json!({"decision": "upheld", "note": "x"})),
        ),
        (Method::GET, "/v1/users/{user}/score", format!("/v1/users/{b}/score"), None),
        (Method::GET, "/v1/search/users", "/v1/search/users?q=bob".into(), None),
        (Method::POST, "/v1/admin/score-runs", "/v1/admin/score-runs".into(), None),
        (Method::GET, "/v1/admin/flags", "/v1/admin/flags".into(), None),
        (
            Method::PUT,
            "/v1/admin/flags/{name}",
            "/v1/admin/flags/score.executor".into(),
            Some(json!({"value": "worker", "reason": "x"})),
        ),
        (Method::GET, "/v1/admin/flags/{name}/history", "/v1/admin/flags/score.executor/history".into(), None),
        (
            Method::POST,
            "/v1/admin/users/{user}/reinstate",
            format!("/v1/admin/users/{b}/reinstate"),
            Some(json!({"reason": "x"})),
        ),
        (Method::GET, "/v1/me/contacts/search", "/v1/me/contacts/search?q=bob".into(), None),
    ]
}

/// (method, path) of every operation the OpenAPI document marks as needing a bearer token.
async fn documented_authenticated_endpoints(app: &TestApp) -> BTreeSet<(String, String)> {
    let doc = app.get("/openapi.json", None).await;
    assert_eq!(doc.status, 200);
    let mut found = BTreeSet::new();
    for (path, item) in doc.body["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().unwrap() {
            if op.get("security").and_then(Value::as_array).is_some_and(|s| !s.is_empty()) {
                found.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    found
}

#[tokio::test]
async fn every_endpoint_refuses_anonymous_callers_and_bad_tokens_with_401() {
    let w = World::new().await;
    let before = w.owner_snapshot().await;
    let endpoints = every_endpoint(&w);
    let covered: BTreeSet<(String, String)> =
        endpoints.iter().map(|(m, template, _, _)| (m.to_string(), (*template).to_owned())).collect();
    assert_eq!(covered, documented_authenticated_endpoints(&w.app).await, "the matrix covers every endpoint");
    for (method, _, path, body) in &endpoints {
        let r = w.call(Caller::Anonymous, method, path, body).await;
        assert_eq!((r.status, r.problem()), (401, "unauthenticated"), "{method} {path}: {:?}", r.body);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{method} {path}");
        for token in ["trl_not-a-real-token", "garbage"] {
            let r = w.app.request(method.clone(), path, Some(token), body.clone()).await;
            assert_eq!((r.status, r.problem()), (401, "unauthenticated"), "{method} {path} with {token}");
        }
    }
    assert_eq!(w.owner_snapshot().await, before, "nothing changed");
}

#[tokio::test]
async fn reads_follow_the_matrix_for_every_role() {
    let w = World::new().await;
    let (c, d, b) = (&w.circle, &w.dispute, &w.bob.id);
    // [anonymous, other user, owner, moderator, admin]
    let table: Vec<(String, [u16; 5])> = vec![
        ("/v1/me".into(), [401, 200, 200, 200, 200]),
        (format!("/v1/users/{b}"), [401, 200, 200, 200, 200]),
        ("/v1/me/contacts".into(), [401, 200, 200, 200, 200]),
        ("/v1/me/circles".into(), [401, 200, 200, 200, 200]),
        (format!("/v1/me/circles/{c}"), [401, 404, 200, 404, 404]),
        (format!("/v1/me/circles/{c}/members"), [401, 404, 200, 404, 404]),
        (format!("/v1/disputes/{d}"), [401, 404, 200, 200, 200]),
        ("/v1/me/disputes".into(), [401, 200, 200, 200, 200]),
        ("/v1/moderation/disputes".into(), [401, 403, 403, 200, 200]),
        ("/v1/moderation/disputes?status=pending&priority=P2".into(), [401, 403, 403, 200, 200]),
        (format!("/v1/users/{b}/score"), [401, 200, 200, 200, 200]),
        ("/v1/search/users?q=bob".into(), [401, 200, 200, 200, 200]),
    ];
    for (path, expected) in &table {
        for (caller, want) in CALLERS.into_iter().zip(expected) {
            let r = w.call(caller, &Method::GET, path, &None).await;
            assert_eq!(r.status, *want, "GET {path} as {caller:?}: {:?}", r.body);
            let slug = match want {
                401 => "unauthenticated",
                403 => "forbidden",
                404 => "not-found",
                _ => "",
            };
            assert_eq!(r.problem(), slug, "GET {path} as {caller:?}");
        }
    }
}

#[tokio::test]
async fn lists_only_ever_show_the_callers_own_items() {
    let w = World::new().await;
    for caller in [Caller::Other, Caller::Owner, Caller::Moderator, Caller::Admin] {
        let me = w.user(caller);
        let token = w.token(caller);

        let contacts = w.app.get("/v1/me/contacts", token).await;
        let contacts = contacts.body["items"].as_array().unwrap();
        assert_eq!(contacts.len(), 1, "{caller:?}: {contacts:?}");
        assert_eq!(contacts[0]["user_id"], w.bob.id.as_str());
        assert_eq!(contacts[0]["label"], "", "{caller:?} sees their own edge to bob");

        let circles = w.app.get("/v1/me/circles", token).await;
        let circles = circles.body["items"].as_array().unwrap();
        assert_eq!(circles.len(), 1, "{caller:?}: {circles:?}");
        assert_eq!(circles[0]["id"] == w.circle.as_str(), caller == Caller::Owner, "{caller:?}");
        let own_circle = circles[0]["id"].as_str().unwrap();
        let owned = w.app.get(&format!("/v1/me/circles/{own_circle}"), token).await;
        assert_eq!(owned.status, 200, "{caller:?} reads their own circle");

        let disputes = w.app.get("/v1/me/disputes", token).await;
        let disputes = disputes.body["items"].as_array().unwrap();
        assert_eq!(disputes.len(), 1, "{caller:?}: {disputes:?}");
        assert_eq!(disputes[0]["reporter_id"], me.id.as_str());
        assert_eq!(disputes[0]["id"] == w.dispute.as_str(), caller == Caller::Owner, "{caller:?}");
    }
}

#[tokio::test]
async fn no_one_but_the_owner_can_change_the_owners_contacts_and_circles() {
    let w = World::new().await;
    let before = w.owner_snapshot().await;
    let (c, b) = (&w.circle, &w.bob.id);
    let attempts: Vec<(Method, String, Option<Value>)> = vec![
        (Method::PATCH, format!("/v1/me/circles/{c}"), Some(json!({"name": "Hijacked"}))),
        (Method::PUT, format!("/v1/me/circles/{c}/members/{b}"), Some(json!({}))),
        (Method::DELETE, format!("/v1/me/circles/{c}/members/{b}"), None),
        (Method::DELETE, format!("/v1/me/circles/{c}"), None),
    ];
    for caller in [Caller::Other, Caller::Moderator, Caller::Admin] {
        for (method, path, body) in &attempts {
            let r = w.call(caller, method, path, body).await;
            assert_eq!((r.status, r.problem()), (404, "not-found"), "{method} {path} as {caller:?}: {:?}", r.body);
        }
    }
    assert_eq!(w.owner_snapshot().await, before, "the owner's data is untouched");

    // Contacts are addressed through /v1/me: another caller's DELETE removes *their* edge to
    // bob, never the owner's.
    let r = w.app.delete(&format!("/v1/me/contacts/{b}"), Some(&w.other.token)).await;
    assert_eq!(r.status, 204);
    assert_eq!(w.owner_snapshot().await, before);
    assert_eq!(w.app.get("/v1/me/contacts", Some(&w.other.token)).await.body["items"], json!([]));
}

#[tokio::test]
async fn the_owner_can_use_every_endpoint_on_their_own_data() {
    let w = World::new().await;
    let (c, b) = (&w.circle, &w.bob.id);
    let t = Some(w.owner.token.as_str());
    let steps: Vec<(Method, String, Option<Value>, u16)> = vec![
        (Method::GET, format!("/v1/me/circles/{c}"), None, 200),
        (Method::GET, format!("/v1/me/circles/{c}/members"), None, 200),
        (Method::PATCH, format!("/v1/me/circles/{c}"), Some(json!({"name": "Renamed"})), 200),
        (Method::PUT, format!("/v1/me/contacts/{b}"), Some(json!({"label": "neighbour"})), 200),
        (Method::PUT, format!("/v1/me/circles/{c}/members/{b}"), Some(json!({})), 200),
        (Method::DELETE, format!("/v1/me/circles/{c}/members/{b}"), None, 204),
        (Method::PUT, format!("/v1/me/circles/{c}/members/{b}"), Some(json!({})), 201),
        (Method::GET, format!("/v1/disputes/{}", w.dispute), None, 200),
        (Method::DELETE, format!("/v1/me/contacts/{b}"), None, 204),
        (Method::DELETE, format!("/v1/me/circles/{c}"), None, 204),
        (Method::POST, "/v1/me/circles".into(), Some(json!({"name": "Second"})), 201),
        (Method::PUT, format!("/v1/me/contacts/{b}"), Some(json!({"label": "again"})), 201),
        (
            Method::POST,
            "/v1/disputes".into(),
            Some(json!({"target_id": b, "kind": "harassment", "description": "x"})),
            201,
        ),
        (Method::PATCH, "/v1/me".into(), Some(json!({"display_name": "Owner Renamed"})), 200),
        (Method::GET, "/v1/me/sessions".into(), None, 200),
        (Method::DELETE, "/v1/sessions/current".into(), None, 204),
    ];
    for (method, path, body, want) in steps {
        let r = w.app.request(method.clone(), &path, t, body).await;
        assert_eq!(r.status, want, "{method} {path}: {:?}", r.body);
    }
    assert_eq!(w.app.get("/v1/me", t).await.status, 401, "the session is gone after logout");
}

#[tokio::test]
async fn moderation_needs_the_moderator_or_admin_role() {
    let w = World::new().await;
    let third = w.app.register("third").await;
    // One pending dispute per decider, none of which they are party to.
    let mut disputes = Vec::new();
    for _ in 0..4 {
        disputes.push(w.app.file_dispute(&third, &w.bob, "incorrect_info").await["id"].as_str().unwrap().to_owned());
    }
    let cases = [
        (Caller::Other, 403, "pending"),
        (Caller::Owner, 403, "pending"),
        (Caller::Moderator, 200, "dismissed"),
        (Caller::Admin, 200, "dismissed"),
    ];
    for ((caller, want, status_after), dispute) in cases.into_iter().zip(&disputes) {
        let queue = w.call(caller, &Method::GET, "/v1/moderation/disputes?status=pending", &None).await;
        assert_eq!(queue.status, want, "queue as {caller:?}");
        if want == 200 {
            let ids: Vec<&str> =
                queue.body["items"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
            assert!(
                ids.contains(&dispute.as_str()) && ids.contains(&w.dispute.as_str()),
                "{caller:?} sees every pending dispute"
            );
        } else {
            assert_eq!(queue.problem(), "forbidden");
        }
        let body = Some(json!({"decision": "dismissed", "note": "not enough evidence"}));
        let r = w.call(caller, &Method::POST, &format!("/v1/moderation/disputes/{dispute}/decision"), &body).await;
        assert_eq!(r.status, want, "deciding as {caller:?}: {:?}", r.body);
        if want == 403 {
            assert_eq!(r.problem(), "forbidden");
        }
        let seen = w.app.get(&format!("/v1/disputes/{dispute}"), Some(&third.token)).await;
        assert_eq!(seen.body["status"], status_after, "after {caller:?} tried");
    }
}

#[tokio::test]
async fn only_admins_may_request_a_score_run() {
    let w = World::new().await;
    for (caller, want) in [(Caller::Other, 403), (Caller::Owner, 403), (Caller::Moderator, 403), (Caller::Admin, 202)] {
        let r = w.call(caller, &Method::POST, "/v1/admin/score-runs", &None).await;
        assert_eq!(r.status, want, "as {caller:?}: {:?}", r.body);
        if want == 403 {
            assert_eq!(r.problem(), "forbidden");
        }
    }
    // Exactly the admin's request reached the outbox, attributed to the admin.
    let requests = w.app.wait_for_events("scores.run_requested", 1).await;
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].payload["data"]["reason"], "POST /v1/admin/score-runs");
    assert!(requests[0].payload["data"]["requested_by"].is_string());
}

#[tokio::test]
async fn only_admins_may_reinstate_a_user() {
    let w = World::new().await;
    w.app.suspend_in_db(&w.bob).await;
    let path = format!("/v1/admin/users/{}/reinstate", w.bob.id);
    let body = Some(json!({"reason": "suspended by mistake"}));
    for caller in [Caller::Other, Caller::Owner, Caller::Moderator] {
        let r = w.call(caller, &Method::POST, &path, &body).await;
        assert_eq!((r.status, r.problem()), (403, "forbidden"), "as {caller:?}: {:?}", r.body);
    }
    let profile = w.app.get(&format!("/v1/users/{}", w.bob.id), Some(&w.owner.token)).await;
    assert_eq!(profile.body["status"], "suspended", "nobody but an admin reinstated bob");
    let r = w.call(Caller::Admin, &Method::POST, &path, &body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

#[tokio::test]
async fn moderators_and_admins_read_any_dispute_but_not_others_contacts_or_circles() {
    let w = World::new().await;
    for caller in [Caller::Moderator, Caller::Admin] {
        let token = w.token(caller);
        let r = w.app.get(&format!("/v1/disputes/{}", w.dispute), token).await;
        assert_eq!(r.status, 200, "{caller:?}");
        assert_eq!(r.body["reporter_id"], w.owner.id.as_str());
        assert_eq!(r.body["description"], "owner reports spam");

        let circle = w.app.get(&format!("/v1/me/circles/{}", w.circle), token).await;
        assert_eq!((circle.status, circle.problem()), (404, "not-found"), "{caller:?}");
        let members = w.app.get(&format!("/v1/me/circles/{}/members", w.circle), token).await;
        assert_eq!(members.status, 404, "{caller:?}");
        let contacts = w.app.get("/v1/me/contacts", token).await;
        assert!(
            contacts.body["items"].as_array().unwrap().iter().all(|c| c["user_id"] == w.bob.id.as_str()),
            "{caller:?} sees only their own contacts"
        );
    }
    // The reporter sees the outcome but not which moderator decided; a moderator sees both.
    let r = w
        .app
        .post(
            &format!("/v1/moderation/disputes/{}/decision", w.dispute),
            Some(&w.admin.token),
            json!({"decision": "dismissed", "note": "no spam found"}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let as_owner = w.app.get(&format!("/v1/disputes/{}", w.dispute), Some(&w.owner.token)).await;
    assert!(as_owner.body["decision"].is_object() && as_owner.body["decision"].get("decided_by").is_none());
    let as_moderator = w.app.get(&format!("/v1/disputes/{}", w.dispute), Some(&w.moderator.token)).await;
    assert_eq!(as_moderator.body["decision"]["decided_by"], w.admin.id.as_str());
}
