//! `Idempotency-Key` on POST, PUT, PATCH and DELETE: replays, reuse with another request,
//! scoping per caller, server errors, expiry and invalid keys.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Options, PASSWORD, Resp, TestApp, TestUser};

/// A request with an `Idempotency-Key`.
trait WithKey {
    async fn with_key(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>, key: &str) -> Resp;
}

impl WithKey for TestApp {
    async fn with_key(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>, key: &str) -> Resp {
        self.send(self.build(method, path, token, body).header("idempotency-key", key)).await
    }
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.db.pool).await.expect(sql)
}

fn dispute(target: &TestUser) -> Value {
    json!({"target_id": target.id, "kind": "spam", "description": "sells watches"})
}

#[tokio::test]
async fn the_same_key_and_body_replay_the_stored_response_and_the_mutation_happens_once() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let t = Some(alice.token.as_str());

    let first = app.with_key(Method::POST, "/v1/disputes", t, Some(dispute(&bob)), "file-once").await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    assert_eq!(first.header("idempotent-replayed"), Some("false"));
    let again = app.with_key(Method::POST, "/v1/disputes", t, Some(dispute(&bob)), "file-once").await;
    assert_eq!(again.status, 201);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body, "the stored body is replayed");
    assert_eq!(again.header("location"), first.header("location"));
    assert_eq!(again.header("content-type"), first.header("content-type"));

    assert_eq!(count(&app, "SELECT count(*) FROM security.disputes").await, 1, "one dispute");
    let filed = "SELECT count(*) FROM ops.outbox WHERE payload->>'type' = 'disputes.filed'";
    assert_eq!(count(&app, filed).await, 1, "one outbox event");
    app.wait_all_published(Duration::from_secs(10)).await;
    let in_stream = app.events().await.count(&app.subject("events.disputes.filed.>")).await.unwrap();
    assert_eq!(in_stream, 1, "one event in the stream");
    let listed = app.get("/v1/me/disputes", t).await;
    assert_eq!(listed.body["items"].as_array().map(Vec::len), Some(1), "{:?}", listed.body);
}

#[tokio::test]
async fn the_same_key_with_another_request_is_refused() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let t = Some(alice.token.as_str());
    let r = app.with_key(Method::POST, "/v1/disputes", t, Some(dispute(&bob)), "k").await;
    assert_eq!(r.status, 201);

    let other_body = json!({"target_id": bob.id, "kind": "harassment", "description": "rude"});
    let r = app.with_key(Method::POST, "/v1/disputes", t, Some(other_body), "k").await;
    assert_eq!((r.status, r.problem()), (422, "idempotency-key-reused"), "{:?}", r.body);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let r = app.with_key(Method::POST, "/v1/me/circles", t, Some(json!({"name": "x"})), "k").await;
    assert_eq!((r.status, r.problem()), (422, "idempotency-key-reused"), "another route: {:?}", r.body);

    assert_eq!(count(&app, "SELECT count(*) FROM security.disputes").await, 1);
    assert_eq!(count(&app, "SELECT count(*) FROM circles.circles").await, 0);
}

#[tokio::test]
async fn keys_are_scoped_per_caller() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let carol = app.register("carol").await;
    let bob = app.register("bob").await;
    let a = app.with_key(Method::POST, "/v1/disputes", Some(&alice.token), Some(dispute(&bob)), "shared").await;
    let c = app.with_key(Method::POST, "/v1/disputes", Some(&carol.token), Some(dispute(&bob)), "shared").await;
    assert_eq!((a.status, c.status), (201, 201));
    assert_eq!(c.header("idempotent-replayed"), Some("false"), "carol's key is her own");
    assert_ne!(a.body["id"], c.body["id"]);
    assert_eq!((&a.body["reporter_id"], &c.body["reporter_id"]), (&json!(alice.id), &json!(carol.id)));
    assert_eq!(count(&app, "SELECT count(*) FROM security.disputes").await, 2);
    // And each still replays its own.
    let again = app.with_key(Method::POST, "/v1/disputes", Some(&carol.token), Some(dispute(&bob)), "shared").await;
    assert_eq!((again.header("idempotent-replayed"), &again.body), (Some("true"), &c.body));
}

#[tokio::test]
async fn a_replayed_registration_returns_the_same_user_with_a_fresh_working_token() {
    let app = TestApp::spawn().await;
    let body = json!({"handle": "alice", "display_name": "Alice", "email": "alice@example.com", "password": PASSWORD});
    let first = app.with_key(Method::POST, "/v1/users", None, Some(body.clone()), "signup-1").await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    let again = app.with_key(Method::POST, "/v1/users", None, Some(body), "signup-1").await;
    assert_eq!(again.status, 201, "{:?}", again.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body["user"], first.body["user"], "the same user");
    assert_eq!(again.header("location"), first.header("location"));
    let (t1, t2) = (first.body["token"].as_str().unwrap(), again.body["token"].as_str().unwrap());
    assert_ne!(t1, t2, "a fresh token, never a stored one");
    assert!(again.body["expires_at"].is_string());
    for token in [t1, t2] {
        let me = app.get("/v1/me", Some(token)).await;
        assert_eq!((me.status, &me.body["id"]), (200, &first.body["user"]["id"]));
    }
    assert_eq!(count(&app, "SELECT count(*) FROM identity.users").await, 1, "no second user");
    let registered = "SELECT count(*) FROM ops.outbox WHERE payload->>'type' = 'identity.user_registered'";
    assert_eq!(count(&app, registered).await, 1);
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT response_body FROM ops.idempotency_keys").fetch_one(&app.db.pool).await.unwrap();
    let stored = String::from_utf8(stored).unwrap();
    assert!(!stored.contains(t1) && !stored.contains("token"), "no token is stored: {stored}");
}

#[tokio::test]
async fn keys_work_on_put_patch_and_delete() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let t = Some(alice.token.as_str());
    let contact = format!("/v1/me/contacts/{}", bob.id);

    // PUT: a fresh call would answer 200 (unchanged); the replay answers the stored 201.
    let put = app.with_key(Method::PUT, &contact, t, Some(json!({"label": "friend"})), "put-1").await;
    assert_eq!(put.status, 201);
    let again = app.with_key(Method::PUT, &contact, t, Some(json!({"label": "friend"})), "put-1").await;
    assert_eq!((again.status, again.header("idempotent-replayed")), (201, Some("true")));
    assert_eq!(again.body, put.body);

    // PATCH: a fresh call would bump the version again.
    let patch = app.with_key(Method::PATCH, "/v1/me", t, Some(json!({"display_name": "Al"})), "patch-1").await;
    assert_eq!((patch.status, &patch.body["version"]), (200, &json!(2)));
    let again = app.with_key(Method::PATCH, "/v1/me", t, Some(json!({"display_name": "Al"})), "patch-1").await;
    assert_eq!((again.status, again.header("idempotent-replayed")), (200, Some("true")));
    assert_eq!(again.body, patch.body);
    assert_eq!(app.get("/v1/me", t).await.body["version"], 2, "the profile changed once");

    // DELETE: a fresh call would be a 404 now.
    let delete = app.with_key(Method::DELETE, &contact, t, None, "delete-1").await;
    assert_eq!(delete.status, 204);
    let again = app.with_key(Method::DELETE, &contact, t, None, "delete-1").await;
    assert_eq!((again.status, again.header("idempotent-replayed")), (204, Some("true")));
    assert_eq!(app.delete(&contact, t).await.status, 404, "without the key it is a new request");

    let removed = "SELECT count(*) FROM ops.outbox WHERE payload->>'type' = 'contacts.contact_removed'";
    assert_eq!(count(&app, removed).await, 1);
    let updated = "SELECT count(*) FROM ops.outbox WHERE payload->>'type' = 'identity.profile_updated'";
    assert_eq!(count(&app, updated).await, 1);
}

#[tokio::test]
async fn a_server_error_is_not_stored_so_a_retry_runs_again() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let t = Some(alice.token.as_str());
    // Make the insert fail on the server's side.
    for sql in [
        "CREATE FUNCTION public.boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'boom'; END $$",
        "CREATE TRIGGER boom BEFORE INSERT ON security.disputes FOR EACH ROW EXECUTE FUNCTION public.boom()",
    ] {
        sqlx::query(sql).execute(&app.db.pool).await.unwrap();
    }
    let failed = app.with_key(Method::POST, "/v1/disputes", t, Some(dispute(&bob)), "retry-me").await;
    assert_eq!((failed.status, failed.problem()), (500, "internal"), "{:?}", failed.body);
    assert_eq!(count(&app, "SELECT count(*) FROM ops.idempotency_keys WHERE key = 'retry-me'").await, 0);

    sqlx::query("DROP TRIGGER boom ON security.disputes").execute(&app.db.pool).await.unwrap();
    let retried = app.with_key(Method::POST, "/v1/disputes", t, Some(dispute(&bob)), "retry-me").await;
    assert_eq!(retried.status, 201, "{:?}", retried.body);
    assert_eq!(retried.header("idempotent-replayed"), Some("false"), "the retry was processed");
    assert_eq!(count(&app, "SELECT count(*) FROM security.disputes").await, 1);
}

#[tokio::test]
async fn a_retry_while_the_first_request_runs_is_a_conflict() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    // The first insert waits on a lock the test holds, so the first request stays in flight.
    let mut holder = app.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE security.disputes IN EXCLUSIVE MODE").execute(&mut *holder).await.unwrap();

    let first = {
        let req = app.build(Method::POST, "/v1/disputes", Some(&alice.token), Some(dispute(&bob)));
        tokio::spawn(req.header("idempotency-key", "slow").send())
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    loop {
        pace.tick().await;
        let started = "SELECT count(*) FROM ops.idempotency_keys WHERE key = 'slow' AND status IS NULL";
        if count(&app, started).await == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the first request never took its key");
    }
    let second = app.with_key(Method::POST, "/v1/disputes", Some(&alice.token), Some(dispute(&bob)), "slow").await;
    assert_eq!((second.status, second.problem()), (409, "idempotency-request-in-progress"), "{:?}", second.body);

    holder.rollback().await.unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status().as_u16(), 201);
    let third = app.with_key(Method::POST, "/v1/disputes", Some(&alice.token), Some(dispute(&bob)), "slow").await;
    assert_eq!((third.status, third.header("idempotent-replayed")), (201, Some("true")));
    assert_eq!(count(&app, "SELECT count(*) FROM security.disputes").await, 1);
}

#[tokio::test]
async fn a_request_cut_off_by_the_request_timeout_releases_its_key() {
    let options = Options { args: vec!["--request-timeout".into(), "1s".into()], ..Options::default() };
    let app = TestApp::spawn_with(options).await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let t = Some(alice.token.as_str());
    // The insert waits on a lock the test holds, past the request timeout.
    let mut holder = app.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE security.disputes IN EXCLUSIVE MODE").execute(&mut *holder).await.unwrap();
    let cut = app.with_key(Method::POST, "/v1/disputes", t, Some(dispute(&bob)), "cut-off").await;
    assert_eq!((cut.status, cut.problem()), (503, "unavailable"), "{:?}", cut.body);
    assert!(cut.header("retry-after").is_some());

    // The key is released (not left "in progress" until it expires), so the retry runs.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    loop {
        pace.tick().await;
        if count(&app, "SELECT count(*) FROM ops.idempotency_keys WHERE key = 'cut-off'").await == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the key of a timed-out request is still held");
    }
    holder.rollback().await.unwrap();
    let retried = app.with_key(Method::POST, "/v1/disputes", t, Some(dispute(&bob)), "cut-off").await;
    assert_eq!((retried.status, retried.header("idempotent-replayed")), (201, Some("false")), "{:?}", retried.body);
    let again = app.with_key(Method::POST, "/v1/disputes", t, Some(dispute(&bob)), "cut-off").await;
    assert_eq!((again.status, again.header("idempotent-replayed")), (201, Some("true")));
    assert_eq!(count(&app, "SELECT count(*) FROM security.disputes").await, 1, "the cut-off insert never committed");
}

#[tokio::test]
async fn an_expired_key_is_treated_as_new() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let t = Some(alice.token.as_str());
    let first = app.with_key(Method::POST, "/v1/me/circles", t, Some(json!({"name": "A"})), "old").await;
    assert_eq!(first.status, 201);
    let stored_for =
        "SELECT count(*) FROM ops.idempotency_keys WHERE key = 'old' AND expires_at > now() + interval '23 hours'";
    assert_eq!(count(&app, stored_for).await, 1, "keys live for 24 h");
    sqlx::query("UPDATE ops.idempotency_keys SET expires_at = now() - interval '1 second' WHERE key = 'old'")
        .execute(&app.db.pool)
        .await
        .unwrap();

    // Another body with the expired key is a new request, not a 422.
    let second = app.with_key(Method::POST, "/v1/me/circles", t, Some(json!({"name": "B"})), "old").await;
    assert_eq!(second.status, 201, "{:?}", second.body);
    assert_eq!(second.header("idempotent-replayed"), Some("false"));
    assert_ne!(second.body["id"], first.body["id"]);
    // The key now belongs to the new request.
    let again = app.with_key(Method::POST, "/v1/me/circles", t, Some(json!({"name": "B"})), "old").await;
    assert_eq!((again.header("idempotent-replayed"), &again.body), (Some("true"), &second.body));
    assert_eq!(count(&app, "SELECT count(*) FROM circles.circles").await, 2);
}

#[tokio::test]
async fn an_invalid_key_is_a_bad_request_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let t = Some(alice.token.as_str());
    let too_long = "k".repeat(256);
    let r = app.with_key(Method::POST, "/v1/me/circles", t, Some(json!({"name": "A"})), &too_long).await;
    assert_eq!((r.status, r.problem()), (400, "invalid-idempotency-key"), "{:?}", r.body);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let r = app.with_key(Method::POST, "/v1/me/circles", t, Some(json!({"name": "A"})), "").await;
    assert_eq!((r.status, r.problem()), (400, "invalid-idempotency-key"), "an empty key");
    assert_eq!(count(&app, "SELECT count(*) FROM circles.circles").await, 0);

    let longest = "k".repeat(255);
    let r = app.with_key(Method::POST, "/v1/me/circles", t, Some(json!({"name": "A"})), &longest).await;
    assert_eq!(r.status, 201, "255 characters are fine: {:?}", r.body);
}
