//! The token cache across API processes: two `trellis-api` processes on one database, each with a
//! token cache whose TTL (60 s) is far longer than any test waits, so that only the database's
//! notification can explain a revoked, suspended or re-passworded token being refused by the
//! process that did not make the change (or a new role being seen there). And a token's own
//! expiry, which nothing notifies.

use std::time::Duration;

use serde_json::json;
use trellis_domain::UserId;
use trellis_store::identity::{NewToken, TokenLimits};
use trellis_testkit::eventually;

use crate::helpers::{Options, PASSWORD, TestApp};

const TTL: &str = "60s";

/// Far under [`TTL`]: a refusal within it is the notification's doing.
const NOTIFIED_WITHIN: Duration = Duration::from_secs(10);

const LOOKUPS: &str = "trellis_api_token_cache_lookups_total";

fn options(extra: &[&str]) -> Options {
    let mut args = vec!["--token-cache-ttl".to_owned(), TTL.to_owned()];
    args.extend(extra.iter().map(|a| a.to_string()));
    Options { process: true, args, ..Options::default() }
}

/// Two API processes on one database and prefix (the second without a relay).
async fn two_processes() -> (TestApp, TestApp) {
    let a = TestApp::spawn_with(options(&[])).await;
    let b = TestApp::start_on(a.db.handle(), a.prefix.clone(), options(&["--no-relay"])).await;
    (a, b)
}

async fn hits(app: &TestApp) -> f64 {
    app.labelled_metric(LOOKUPS, "outcome=\"hit\"").await.unwrap_or(0.0)
}

/// Uses `token` on `path` of `app` until a request of it is served from the cache (counted as
/// a hit): from then on the token is cached there. The cache is trusted only once its listener
/// listens, which this waits for too.
async fn until_cached(app: &TestApp, path: &str, token: &str) {
    eventually(&format!("{path} answered from the token cache"), Duration::from_secs(30), || async {
        let before = hits(app).await;
        let r = app.get(path, Some(token)).await;
        assert_eq!(r.status, 200, "{path}: {:?}", r.body);
        (hits(app).await > before).then_some(())
    })
    .await;
}

/// Caches `token` on `app` on both authenticating paths: the contact list (authenticated with
/// its page) and a `Principal` read (`/v1/me`).
async fn cache_everywhere(app: &TestApp, token: &str) {
    until_cached(app, "/v1/me/contacts", token).await;
    until_cached(app, "/v1/me", token).await;
}

/// Waits until `app` refuses `token` on both paths; panics after [`NOTIFIED_WITHIN`].
async fn until_refused(app: &TestApp, token: &str, what: &str) {
    for path in ["/v1/me/contacts", "/v1/me"] {
        eventually(&format!("{what}: {path} refused"), NOTIFIED_WITHIN, || async {
            let status = app.get(path, Some(token)).await.status;
            assert!(status == 200 || status == 401, "{path}: {status}");
            (status == 401).then_some(())
        })
        .await;
    }
}

async fn sign_in(app: &TestApp, handle: &str) -> String {
    let r = app.post("/v1/sessions", None, json!({"login": handle, "password": PASSWORD})).await;
    assert_eq!(r.status, 201, "signing {handle} in: {:?}", r.body);
    r.body["token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_sign_out_through_one_process_is_refused_by_the_other_that_had_the_token_cached() {
    let (a, b) = two_processes().await;
    let alice = a.register("alice").await;
    let bob = a.register("bob").await;
    let carol = a.register("carol").await;
    a.add_contact(&alice, &bob).await;
    a.add_contact(&alice, &carol).await;
    cache_everywhere(&a, &alice.token).await;
    cache_everywhere(&b, &alice.token).await;
    cache_everywhere(&b, &bob.token).await;

    // Pages read by the owner alone (cached) are the pages the combined statement reads.
    let pages = b.pages("/v1/me/contacts?limit=1", &alice.token).await;
    let handles: Vec<&str> = pages.iter().flatten().map(|c| c["handle"].as_str().unwrap()).collect();
    let mut expected = [(&bob.id, "bob"), (&carol.id, "carol")];
    expected.sort();
    assert_eq!(handles, expected.map(|(_, h)| h), "{pages:?}");

    let r = a.delete("/v1/sessions/current", Some(&alice.token)).await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    // The process that revoked forgets the token as it commits.
    assert_eq!(a.get("/v1/me/contacts", Some(&alice.token)).await.status, 401);
    assert_eq!(a.get("/v1/me", Some(&alice.token)).await.status, 401);
    // The other learns it from the database's notification, long before its 60 s TTL.
    until_refused(&b, &alice.token, "the signed-out token on the other process").await;
    // Other users' entries stay.
    let before = hits(&b).await;
    assert_eq!(b.get("/v1/me", Some(&bob.token)).await.status, 200);
    assert!(hits(&b).await > before, "bob's token is still served from the cache");
}

#[tokio::test]
async fn a_suspension_a_role_and_a_password_change_reach_every_process_that_had_the_tokens_cached() {
    let (a, b) = two_processes().await;
    let alice = a.register("alice").await;
    let mallory = a.register("mallory").await;
    let bob = a.register("bob").await;
    let alice_phone = sign_in(&a, "alice").await;
    for app in [&a, &b] {
        cache_everywhere(app, &alice.token).await;
        cache_everywhere(app, &alice_phone).await;
        cache_everywhere(app, &mallory.token).await;
    }

    // Suspended in the database, as an upheld dispute or on-call does: the user's status
    // changes, their tokens are not even revoked; neither process made the change.
    a.suspend_in_db(&mallory).await;
    until_refused(&a, &mallory.token, "the suspended user's token").await;
    until_refused(&b, &mallory.token, "the suspended user's token").await;

    // A role granted (as `trellisctl users grant-role` does): the demoted or promoted principal
    // is not served from the cache either.
    let queue = "/v1/moderation/disputes";
    until_cached(&b, "/v1/me", &bob.token).await;
    assert_eq!(b.get(queue, Some(&bob.token)).await.status, 403, "bob is not a moderator yet");
    a.grant_role(&bob, "moderator").await;
    eventually("the new role on the other process", NOTIFIED_WITHIN, || async {
        let status = b.get(queue, Some(&bob.token)).await.status;
        assert!(status == 200 || status == 403, "{queue}: {status}");
        (status == 200).then_some(())
    })
    .await;

    // A password change through A revokes alice's other sessions and changes her password.
    let r = a
        .patch("/v1/me", Some(&alice.token), json!({"password": "a brand new password", "current_password": PASSWORD}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(a.get("/v1/me", Some(&alice_phone)).await.status, 401);
    until_refused(&b, &alice_phone, "the session signed out by a password change").await;
    // The session that made the change keeps working everywhere (looked up again).
    for app in [&a, &b] {
        assert_eq!(app.get("/v1/me", Some(&alice.token)).await.status, 200);
        assert_eq!(app.get("/v1/me/contacts", Some(&alice.token)).await.status, 200);
    }
}

#[tokio::test]
async fn a_cached_token_is_refused_once_it_expires_though_nothing_notifies_it() {
    let app = TestApp::spawn_with(options(&[])).await;
    let alice = app.register("alice").await;
    // A token that expires in 3 seconds: no notification comes when it does.
    let (token, hash) = trellis_api::auth::new_token();
    let mut conn = app.db.pool.acquire().await.unwrap();
    let new = NewToken {
        token_hash: &hash,
        user_id: UserId(alice.id.parse().unwrap()),
        expires_at: time::OffsetDateTime::now_utc() + time::Duration::seconds(3),
        client_addr: None,
        checked_password_hash: None,
    };
    let limits = TokenLimits { idle_timeout: Duration::from_secs(3600), per_user: 20 };
    assert!(trellis_store::identity::issue_token(&mut conn, &new, limits).await.unwrap());
    drop(conn);
    until_cached(&app, "/v1/me/contacts", &token).await;
    // Refused from its expiry on, 57 s before the cache's TTL would have ended the entry.
    until_refused(&app, &token, "the expired token").await;
}

/// The pid of the token cache's LISTEN connection to `app`'s database, once it listens.
async fn listener_pid(app: &TestApp) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity
         WHERE datname = $1 AND application_name = 'trellis-api-token-cache' AND query ILIKE 'LISTEN%'",
    )
    .bind(&app.db.name)
    .fetch_optional(&app.db.pool)
    .await
    .expect("reading pg_stat_activity")
}

#[tokio::test]
async fn a_lost_listen_connection_is_replaced_and_revocations_are_notified_again() {
    let app = TestApp::spawn_with(options(&[])).await;
    let alice = app.register("alice").await;
    until_cached(&app, "/v1/me/contacts", &alice.token).await;
    let first = eventually("the cache's LISTEN connection", NOTIFIED_WITHIN, || listener_pid(&app)).await;

    let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(first)
        .fetch_one(&app.db.pool)
        .await
        .expect("terminating the LISTEN connection");
    assert!(ended);
    // A new connection listens; the cache was emptied and bypassed meanwhile, then fills again.
    eventually("a new LISTEN connection", NOTIFIED_WITHIN, || async {
        listener_pid(&app).await.filter(|pid| *pid != first)
    })
    .await;
    until_cached(&app, "/v1/me/contacts", &alice.token).await;

    // Revoked behind the API's back: only the new connection's notification can tell it.
    let revoked = sqlx::query("UPDATE identity.tokens SET revoked_at = now() WHERE user_id = $1::uuid")
        .bind(&alice.id)
        .execute(&app.db.pool)
        .await
        .expect("revoking");
    assert_eq!(revoked.rows_affected(), 1);
    until_refused(&app, &alice.token, "a token revoked after the reconnection").await;
}
