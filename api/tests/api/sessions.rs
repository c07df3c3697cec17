//! The credential lifecycle: a password or e-mail change signs out the other sessions, signing
//! out everywhere, the list of sessions, the idle timeout, the per-user cap, pruning, and why
//! sign-in and registration never replay an `Idempotency-Key`.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use trellis_domain::UserId;
use trellis_store::identity::{NewToken, TokenLimits};
use trellis_testkit::eventually;

use crate::helpers::{Options, PASSWORD, TestApp};

/// Signs `handle` in again; returns the new token.
async fn sign_in(app: &TestApp, handle: &str, password: &str) -> String {
    let r = app.post("/v1/sessions", None, json!({"login": handle, "password": password})).await;
    assert_eq!(r.status, 201, "signing {handle} in: {:?}", r.body);
    r.body["token"].as_str().unwrap().to_owned()
}

async fn status_of(app: &TestApp, token: &str) -> u16 {
    app.get("/v1/me", Some(token)).await.status
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.db.pool).await.expect(sql)
}

#[tokio::test]
async fn a_password_change_signs_out_every_other_session_of_the_user() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let (phone, tablet) = (sign_in(&app, "alice", PASSWORD).await, sign_in(&app, "alice", PASSWORD).await);

    let new_password = "a brand new password";
    let r =
        app.patch("/v1/me", Some(&alice.token), json!({"password": new_password, "current_password": PASSWORD})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(status_of(&app, &alice.token).await, 200, "the session that made the change stays");
    assert_eq!(status_of(&app, &phone).await, 401, "another session is signed out");
    assert_eq!(status_of(&app, &tablet).await, 401, "every other session is signed out");
    assert_eq!(status_of(&app, &bob.token).await, 200, "other users keep theirs");
    let old = app.post("/v1/sessions", None, json!({"login": "alice", "password": PASSWORD})).await;
    assert_eq!(old.status, 401, "the old password no longer signs in");
    sign_in(&app, "alice", new_password).await;
}

#[tokio::test]
async fn an_email_change_signs_out_every_other_session_of_the_user() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let phone = sign_in(&app, "alice", PASSWORD).await;
    let r = app
        .patch("/v1/me", Some(&alice.token), json!({"email": "alice@elsewhere.example", "current_password": PASSWORD}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(status_of(&app, &phone).await, 401);
    assert_eq!(status_of(&app, &alice.token).await, 200);

    // A display name is not a credential: it signs no one out.
    let laptop = sign_in(&app, "alice", PASSWORD).await;
    let r = app.patch("/v1/me", Some(&alice.token), json!({"display_name": "Alice L."})).await;
    assert_eq!(r.status, 200);
    assert_eq!(status_of(&app, &laptop).await, 200);
}

#[tokio::test]
async fn signing_out_everywhere_revokes_every_token_of_the_caller_and_no_one_elses() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let phone = sign_in(&app, "alice", PASSWORD).await;

    let r = app.delete("/v1/sessions", Some(&phone)).await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    assert_eq!(status_of(&app, &phone).await, 401, "the caller's own token");
    assert_eq!(status_of(&app, &alice.token).await, 401, "and every other one");
    assert_eq!(status_of(&app, &bob.token).await, 200);
    let r = app.delete("/v1/sessions", None).await;
    assert_eq!((r.status, r.problem()), (401, "unauthenticated"));
    sign_in(&app, "alice", PASSWORD).await;
}

#[tokio::test]
async fn the_sessions_list_shows_live_tokens_newest_first_and_marks_the_current_one() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let second = sign_in(&app, "alice", PASSWORD).await;
    let third = sign_in(&app, "alice", PASSWORD).await;
    assert_eq!(app.delete("/v1/sessions/current", Some(&third)).await.status, 204);

    let r = app.get("/v1/me/sessions", Some(&second)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let items = r.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "the revoked session is not listed: {items:?}");
    assert_eq!(items.iter().map(|s| s["current"].as_bool().unwrap()).collect::<Vec<_>>(), [true, false]);
    for session in items {
        assert_eq!(session["client_address"], "127.0.0.1", "{session:?}");
        for field in ["created_at", "last_used_at", "idle_expires_at", "expires_at"] {
            let at = session[field].as_str().unwrap_or_else(|| panic!("{field} in {session:?}"));
            time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).unwrap();
        }
        let text = session.to_string();
        assert!(!text.contains(&second) && !text.contains(&alice.token), "no token is shown");
    }
    assert!(items[0]["created_at"].as_str() >= items[1]["created_at"].as_str(), "newest first");

    // Pages of one, the cursor carrying on where the last page ended.
    let pages = app.pages("/v1/me/sessions?limit=1", &second).await;
    let paged: Vec<Value> = pages.into_iter().flatten().collect();
    assert_eq!(&paged, items);
    let bobs = app.get("/v1/me/sessions", Some(&bob.token)).await;
    assert_eq!(bobs.body["items"].as_array().map(Vec::len), Some(1), "bob sees his own only");
    let r = app.get("/v1/me/sessions?cursor=not-a-cursor", Some(&second)).await;
    assert_eq!((r.status, r.problem()), (400, "invalid-cursor"));
}

#[tokio::test]
async fn a_token_unused_for_the_idle_timeout_stops_authenticating() {
    let app =
        TestApp::spawn_with(Options { args: vec!["--token-idle-timeout".into(), "10m".into()], ..Options::default() })
            .await;
    let alice = app.register("alice").await;
    let phone = sign_in(&app, "alice", PASSWORD).await;
    sqlx::query("UPDATE identity.tokens SET last_used_at = now() - interval '11 minutes' WHERE user_id = $1::uuid")
        .bind(&alice.id)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let fresh = sign_in(&app, "alice", PASSWORD).await;
    for (token, path) in [(&alice.token, "/v1/me"), (&phone, "/v1/me/contacts"), (&phone, "/v1/me/sessions")] {
        let r = app.get(path, Some(token)).await;
        assert_eq!((r.status, r.problem()), (401, "unauthenticated"), "{path} with an idle token");
    }
    let r = app.put(&format!("/v1/me/contacts/{}", alice.id), Some(&phone), json!({"label": ""})).await;
    assert_eq!(r.status, 401, "writes too: {:?}", r.body);
    assert_eq!(status_of(&app, &fresh).await, 200);
    let listed = app.get("/v1/me/sessions", Some(&fresh)).await;
    assert_eq!(listed.body["items"].as_array().map(Vec::len), Some(1), "idle sessions are not listed");
}

#[tokio::test]
async fn a_tokens_last_use_is_written_in_batches_at_most_once_a_minute() {
    // A process of its own: the gauge that tells a flush happened is one per process.
    let app = TestApp::spawn_with(Options {
        args: vec!["--activity-flush-interval".into(), "100ms".into()],
        process: true,
        ..Options::default()
    })
    .await;
    let alice = app.register("alice").await;
    let hash: Vec<u8> = {
        use sha2::Digest as _;
        sha2::Sha256::digest(alice.token.as_bytes()).to_vec()
    };
    sqlx::query("UPDATE identity.tokens SET last_used_at = now() - interval '2 minutes' WHERE token_hash = $1")
        .bind(&hash)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let last_used = || async {
        sqlx::query_as::<_, (time::OffsetDateTime, String)>(
            "SELECT last_used_at, xmin::text FROM identity.tokens WHERE token_hash = $1",
        )
        .bind(&hash)
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
    };
    let (before, _) = last_used().await;
    for _ in 0..20 {
        assert_eq!(app.get("/v1/me/contacts", Some(&alice.token)).await.status, 200);
    }
    let (after, version) = eventually("the token's use to be written", Duration::from_secs(10), || async {
        let (at, version) = last_used().await;
        (at > before).then_some((at, version))
    })
    .await;
    assert!(time::OffsetDateTime::now_utc() - after < time::Duration::seconds(10));
    // Used again within the minute: a flush that follows (known by the daily-active-users gauge
    // counting a row written after these requests) leaves the row alone.
    for _ in 0..20 {
        assert_eq!(app.get("/v1/me/contacts", Some(&alice.token)).await.status, 200);
    }
    let bob = app.register("bob").await;
    sqlx::query("INSERT INTO identity.user_activity (user_id, last_active_at) VALUES ($1::uuid, now())")
        .bind(&bob.id)
        .execute(&app.db.pool)
        .await
        .unwrap();
    eventually("a flush that counts bob", Duration::from_secs(10), || async {
        (app.metric("trellis_api_daily_active_users").await == Some(2.0)).then_some(())
    })
    .await;
    assert_eq!(last_used().await, (after, version), "the token's row was rewritten within the minute");
}

#[tokio::test]
async fn a_user_holds_at_most_the_token_cap_and_a_sign_in_past_it_revokes_the_oldest() {
    let app =
        TestApp::spawn_with(Options { args: vec!["--tokens-per-user".into(), "3".into()], ..Options::default() }).await;
    let alice = app.register("alice").await;
    let mut tokens = vec![alice.token.clone()];
    for _ in 0..3 {
        tokens.push(sign_in(&app, "alice", PASSWORD).await);
    }
    assert_eq!(status_of(&app, &tokens[0]).await, 401, "the oldest token was revoked");
    for token in &tokens[1..] {
        assert_eq!(status_of(&app, token).await, 200);
    }
    let listed = app.get("/v1/me/sessions", Some(&tokens[3])).await;
    assert_eq!(listed.body["items"].as_array().map(Vec::len), Some(3));
    let live = "SELECT count(*) FROM identity.tokens WHERE revoked_at IS NULL";
    assert_eq!(count(&app, live).await, 3);
}

#[tokio::test]
async fn revoked_expired_and_idle_tokens_are_pruned() {
    let app = TestApp::spawn_with(Options {
        args: vec!["--prune-interval".into(), "200ms".into(), "--token-idle-timeout".into(), "10m".into()],
        ..Options::default()
    })
    .await;
    let alice = app.register("alice").await;
    let revoked = sign_in(&app, "alice", PASSWORD).await;
    assert_eq!(app.delete("/v1/sessions/current", Some(&revoked)).await.status, 204);
    let (expired, idle) = (sign_in(&app, "alice", PASSWORD).await, sign_in(&app, "alice", PASSWORD).await);
    let hash = |t: &str| {
        use sha2::Digest as _;
        sha2::Sha256::digest(t.as_bytes()).to_vec()
    };
    sqlx::query("UPDATE identity.tokens SET expires_at = now() - interval '1 second' WHERE token_hash = $1")
        .bind(hash(&expired))
        .execute(&app.db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE identity.tokens SET last_used_at = now() - interval '11 minutes' WHERE token_hash = $1")
        .bind(hash(&idle))
        .execute(&app.db.pool)
        .await
        .unwrap();
    eventually("dead tokens to be pruned", Duration::from_secs(10), || async {
        (count(&app, "SELECT count(*) FROM identity.tokens").await == 1).then_some(())
    })
    .await;
    assert_eq!(status_of(&app, &alice.token).await, 200, "the live token stays");
}

#[tokio::test]
async fn a_token_is_issued_only_while_the_user_is_active_with_the_password_checked() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let user = UserId(alice.id.parse().unwrap());
    let limits = TokenLimits { idle_timeout: Duration::from_secs(3600), per_user: 20 };
    let issue = |hash: [u8; 32], checked: Option<String>| {
        let pool = app.db.pool.clone();
        async move {
            let mut conn = pool.acquire().await.unwrap();
            let token = NewToken {
                token_hash: &hash,
                user_id: user,
                expires_at: time::OffsetDateTime::now_utc() + time::Duration::hours(1),
                client_addr: Some("192.0.2.1"),
                checked_password_hash: checked.as_deref(),
            };
            trellis_store::identity::issue_token(&mut conn, &token, limits).await.unwrap()
        }
    };
    let stored: String = sqlx::query_scalar("SELECT password_hash FROM identity.users WHERE id = $1::uuid")
        .bind(&alice.id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(issue([1; 32], Some(stored.clone())).await, "the password checked is still the user's");
    // A sign-in that checked the password before it changed issues nothing.
    let r = app
        .patch("/v1/me", Some(&alice.token), json!({"password": "a brand new password", "current_password": PASSWORD}))
        .await;
    assert_eq!(r.status, 200);
    assert!(!issue([2; 32], Some(stored)).await, "a password that is no longer the user's");
    app.suspend_in_db(&alice).await;
    assert!(!issue([3; 32], None).await, "a suspended user");
    let hashes: Vec<Vec<u8>> = (1..=3).map(|b| vec![b; 32]).collect();
    let issued: i64 = sqlx::query_scalar("SELECT count(*) FROM identity.tokens WHERE token_hash = ANY($1)")
        .bind(&hashes)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(issued, 1, "only the first was issued");
}

/// A keyed `POST`.
async fn keyed(app: &TestApp, path: &str, body: Value, key: &str) -> crate::helpers::Resp {
    app.send(app.build(Method::POST, path, None, Some(body)).header("idempotency-key", key)).await
}

#[tokio::test]
async fn sign_in_ignores_the_idempotency_key_so_a_retry_passes_every_check_again() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let creds = json!({"login": "alice", "password": PASSWORD});
    let first = keyed(&app, "/v1/sessions", creds.clone(), "sign-in-1").await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    assert_eq!(first.header("idempotent-replayed"), None, "not an idempotent operation");
    let second = keyed(&app, "/v1/sessions", creds.clone(), "sign-in-1").await;
    assert_eq!(second.status, 201);
    assert_ne!(second.body["token"], first.body["token"], "another sign-in, not a replay");

    // After a password change the same request with the same key is refused, as any sign-in.
    let r = app
        .patch("/v1/me", Some(&alice.token), json!({"password": "a brand new password", "current_password": PASSWORD}))
        .await;
    assert_eq!(r.status, 200);
    let stale = keyed(&app, "/v1/sessions", creds.clone(), "sign-in-1").await;
    assert_eq!((stale.status, stale.problem()), (401, "unauthenticated"), "{:?}", stale.body);

    // And after a suspension.
    let creds = json!({"login": "alice", "password": "a brand new password"});
    assert_eq!(keyed(&app, "/v1/sessions", creds.clone(), "sign-in-2").await.status, 201);
    app.suspend_in_db(&alice).await;
    let suspended = keyed(&app, "/v1/sessions", creds, "sign-in-2").await;
    assert_eq!(suspended.status, 403, "{:?}", suspended.body);

    let live = "SELECT count(*) FROM identity.tokens WHERE revoked_at IS NULL";
    assert_eq!(count(&app, live).await, 2, "the tokens of the passed sign-ins only (the others were revoked)");
    assert_eq!(count(&app, "SELECT count(*) FROM ops.idempotency_keys").await, 0, "no key is kept");
}

#[tokio::test]
async fn registration_ignores_the_idempotency_key_and_keeps_none() {
    let app = TestApp::spawn().await;
    let body = json!({"handle": "alice", "display_name": "Alice", "email": "alice@example.com", "password": PASSWORD});
    let first = keyed(&app, "/v1/users", body.clone(), "sign-up-1").await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    assert_eq!(first.header("idempotent-replayed"), None);
    let again = keyed(&app, "/v1/users", body, "sign-up-1").await;
    assert_eq!((again.status, again.problem()), (409, "handle-taken"), "processed again: {:?}", again.body);
    assert_eq!(count(&app, "SELECT count(*) FROM identity.users").await, 1);
    assert_eq!(count(&app, "SELECT count(*) FROM ops.idempotency_keys").await, 0, "anonymous callers keep no key");
    // The client that lost the first response signs in.
    let token = sign_in(&app, "alice", PASSWORD).await;
    assert_eq!(status_of(&app, &token).await, 200);
}
