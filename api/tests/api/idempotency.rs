//! `Idempotency-Key` on POST, PUT, PATCH and DELETE: replays, reuse with another request,
//! scoping per user, authentication first, what a key row keeps, server errors, expiry,
//! pruning, the stored-keys gauge and invalid keys.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use trellis_testkit::eventually;

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
    // The key is taken in the first request's own transaction, which now waits on the lock.
    app.wait_for_lock_wait().await;
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
async fn a_request_cut_off_by_the_request_timeout_releases_its_key_within_that_timeout() {
    // A write's handler gets the request timeout less the statement timeout (IO_TIMEOUT): cut
    // off at 1 s, its waiting statement ends by 2 s, and its transaction with it.
    let args = ["--request-timeout", "2s", "--io-timeout", "1s"].map(String::from).to_vec();
    let app = TestApp::spawn_with(Options { args, ..Options::default() }).await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let t = Some(alice.token.as_str());
    // The insert waits on a lock the test holds, past the request timeout.
    let mut holder = app.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE security.disputes IN EXCLUSIVE MODE").execute(&mut *holder).await.unwrap();
    let started = tokio::time::Instant::now();
    let cut = app.with_key(Method::POST, "/v1/disputes", t, Some(dispute(&bob)), "cut-off").await;
    assert_eq!((cut.status, cut.problem()), (503, "unavailable"), "{:?}", cut.body);
    assert!(cut.header("retry-after").is_some());

    // The key is released with the request's transaction (not left "in progress" until it
    // expires), within the request timeout, while the lock is still held.
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    while app.api_backends_in_transaction().await > 0 {
        assert!(started.elapsed() < Duration::from_millis(2500), "the cut-off request's transaction outlives it");
        pace.tick().await;
    }
    holder.rollback().await.unwrap();
    let retried = app.with_key(Method::POST, "/v1/disputes", t, Some(dispute(&bob)), "cut-off").await;
    assert_eq!((retried.status, retried.header("idempotent-replayed")), (201, Some("false")), "{:?}", retried.body);
    let again = app.with_key(Method::POST, "/v1/disputes", t, Some(dispute(&bob)), "cut-off").await;
    assert_eq!((again.status, again.header("idempotent-replayed")), (201, Some("true")));
    assert_eq!(count(&app, "SELECT count(*) FROM security.disputes").await, 1, "the cut-off insert never committed");
}

#[tokio::test]
async fn a_key_whose_token_does_not_authenticate_is_a_401_and_stores_nothing() {
    let app = TestApp::spawn().await;
    let body = Some(json!({"name": "A"}));
    for token in [None, Some("trl_not-a-token"), Some("garbage")] {
        let r = app.with_key(Method::POST, "/v1/me/circles", token, body.clone(), "k").await;
        assert_eq!((r.status, r.problem()), (401, "unauthenticated"), "{token:?}: {:?}", r.body);
        assert_eq!(r.header("idempotent-replayed"), None);
    }
    assert_eq!(count(&app, "SELECT count(*) FROM ops.idempotency_keys").await, 0, "no key for anyone unauthenticated");
}

#[tokio::test]
async fn keys_belong_to_the_user_whichever_of_their_tokens_sends_them() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let login = app.post("/v1/sessions", None, json!({"login": "alice", "password": PASSWORD})).await;
    assert_eq!(login.status, 201, "{:?}", login.body);
    let phone = login.body["token"].as_str().unwrap();
    assert_ne!(phone, alice.token);

    let body = Some(json!({"name": "Climbing"}));
    let laptop = app.with_key(Method::POST, "/v1/me/circles", Some(&alice.token), body.clone(), "same-key").await;
    assert_eq!((laptop.status, laptop.header("idempotent-replayed")), (201, Some("false")), "{:?}", laptop.body);
    let again = app.with_key(Method::POST, "/v1/me/circles", Some(phone), body, "same-key").await;
    assert_eq!((again.status, again.header("idempotent-replayed")), (201, Some("true")), "{:?}", again.body);
    assert_eq!(again.body, laptop.body);
    assert_eq!(count(&app, "SELECT count(*) FROM circles.circles").await, 1, "one circle");
    let principal: String =
        sqlx::query_scalar("SELECT principal FROM ops.idempotency_keys").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(principal, alice.id, "the key is the user's");
}

#[tokio::test]
async fn a_key_row_keeps_a_hash_of_the_path_not_the_path() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let path = format!("/v1/me/circles?padding={}", "p".repeat(8000));
    let r = app.with_key(Method::POST, &path, Some(&alice.token), Some(json!({"name": "A"})), "long-path").await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let (stored_path, path_hash, row_bytes): (String, Vec<u8>, i32) = sqlx::query_as(
        "SELECT path, path_hash, pg_column_size(k.*) FROM ops.idempotency_keys k WHERE key = 'long-path'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(stored_path, "", "the path is not stored");
    use sha2::Digest as _;
    assert_eq!(path_hash, sha2::Sha256::digest(path.as_bytes()).to_vec(), "its SHA-256 is");
    assert!(row_bytes < 2000, "the row stays small: {row_bytes} bytes");

    // The same key on another path is refused, and says so.
    let other =
        app.with_key(Method::POST, "/v1/me/circles", Some(&alice.token), Some(json!({"name": "A"})), "long-path").await;
    assert_eq!((other.status, other.problem()), (422, "idempotency-key-reused"), "{:?}", other.body);
    assert!(other.body["detail"].as_str().unwrap().contains("another endpoint"), "{:?}", other.body);
}

#[tokio::test]
async fn expired_keys_are_pruned_until_none_is_left() {
    let app =
        TestApp::spawn_with(Options { args: vec!["--prune-interval".into(), "200ms".into()], ..Options::default() })
            .await;
    let alice = app.register("alice").await;
    // A backlog of two and a half batches, and a few live keys.
    sqlx::query(
        "INSERT INTO ops.idempotency_keys (principal, key, method, request_hash, status, expires_at)
         SELECT $1, 'old-' || n, 'POST', '\\x00', 201, now() - interval '1 minute' FROM generate_series(1, 25000) n",
    )
    .bind(&alice.id)
    .execute(&app.db.pool)
    .await
    .unwrap();
    for key in ["live-1", "live-2", "live-3"] {
        let r = app.with_key(Method::POST, "/v1/me/circles", Some(&alice.token), Some(json!({"name": key})), key).await;
        assert_eq!(r.status, 201);
    }
    eventually("every expired key pruned", Duration::from_secs(30), || async {
        let expired = count(&app, "SELECT count(*) FROM ops.idempotency_keys WHERE expires_at <= now()").await;
        (expired == 0).then_some(())
    })
    .await;
    assert_eq!(count(&app, "SELECT count(*) FROM ops.idempotency_keys").await, 3, "live keys stay");
}

#[tokio::test]
async fn the_stored_keys_gauge_counts_the_tables_rows() {
    // A process of its own: the gauge is one per process.
    let args = vec!["--prune-interval".into(), "200ms".into()];
    let app = TestApp::spawn_with(Options { args, process: true, ..Options::default() }).await;
    let alice = app.register("alice").await;
    eventually("trellis_api_idempotency_keys to exist from start-up", Duration::from_secs(10), || async {
        app.metric("trellis_api_idempotency_keys").await
    })
    .await;
    sqlx::query(
        "INSERT INTO ops.idempotency_keys (principal, key, method, request_hash, status, expires_at)
         SELECT $1, 'k-' || n, 'POST', '\\x00', 201, now() + interval '1 hour' FROM generate_series(1, 500) n",
    )
    .bind(&alice.id)
    .execute(&app.db.pool)
    .await
    .unwrap();
    // The statistics the gauge reads are flushed by each backend within seconds.
    eventually("trellis_api_idempotency_keys at 500", Duration::from_secs(60), || async {
        (app.metric("trellis_api_idempotency_keys").await == Some(500.0)).then_some(())
    })
    .await;
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
