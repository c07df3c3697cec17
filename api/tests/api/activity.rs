//! Daily active users: requests with a live token count their user once; the gauge comes from
//! the database, written in batches rather than per request. Only requests that authenticated
//! count.

use std::time::Duration;

use trellis_testkit::eventually;

use crate::helpers::{Options, TestApp};

async fn activity_rows(app: &TestApp) -> Vec<(uuid::Uuid, i64)> {
    sqlx::query_as(
        "SELECT user_id, (extract(epoch FROM now() - last_active_at))::bigint FROM identity.user_activity ORDER BY 1",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn users_seen_with_a_live_token_are_daily_active_users_and_the_gauge_counts_them() {
    // A process of its own: the gauge is one per process.
    let app = TestApp::spawn_with(Options {
        args: vec!["--activity-flush-interval".into(), "200ms".into()],
        process: true,
        ..Default::default()
    })
    .await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let carol = app.register("carol").await;
    for _ in 0..20 {
        assert_eq!(app.get("/v1/me", Some(&alice.token)).await.status, 200);
    }
    assert_eq!(app.get("/v1/me", Some(&bob.token)).await.status, 200);
    // A token that authenticates nobody, and a revoked one, count no one.
    assert_eq!(app.get("/v1/me", Some("trl_not-a-token")).await.status, 401);
    assert_eq!(app.delete("/v1/sessions/current", Some(&carol.token)).await.status, 204);

    eventually("trellis_api_daily_active_users at 2", Duration::from_secs(10), || async {
        (app.metric("trellis_api_daily_active_users").await == Some(2.0)).then_some(())
    })
    .await;
    let rows = activity_rows(&app).await;
    let mut expected: Vec<uuid::Uuid> = [&alice, &bob].iter().map(|u| u.id.parse().unwrap()).collect();
    expected.sort();
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), expected, "one row per active user, none for carol");

    // Activity older than 24 hours does not count.
    sqlx::query("UPDATE identity.user_activity SET last_active_at = now() - interval '25 hours' WHERE user_id = $1")
        .bind(alice.id.parse::<uuid::Uuid>().unwrap())
        .execute(&app.db.pool)
        .await
        .unwrap();
    eventually("trellis_api_daily_active_users at 1", Duration::from_secs(10), || async {
        (app.metric("trellis_api_daily_active_users").await == Some(1.0)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_user_active_within_the_hour_costs_no_further_activity_write() {
    // A process of its own: the gauge that tells a flush happened is one per process.
    let app = TestApp::spawn_with(Options {
        args: vec!["--activity-flush-interval".into(), "100ms".into()],
        process: true,
        ..Default::default()
    })
    .await;
    let alice = app.register("alice").await;
    let id: uuid::Uuid = alice.id.parse().unwrap();
    let stamp = || async {
        sqlx::query_scalar::<_, time::OffsetDateTime>(
            "SELECT last_active_at FROM identity.user_activity WHERE user_id = $1",
        )
        .bind(id)
        .fetch_optional(&app.db.pool)
        .await
        .unwrap()
    };
    let first = eventually("alice's activity to be written", Duration::from_secs(10), || async {
        assert_eq!(app.get("/v1/me", Some(&alice.token)).await.status, 200);
        stamp().await
    })
    .await;
    // Alice is active again; then a flush is known to have happened after her request when the
    // gauge counts a row written after it. Her row was not rewritten within the hour…
    let xmin = || async {
        sqlx::query_scalar::<_, String>("SELECT xmin::text FROM identity.user_activity WHERE user_id = $1")
            .bind(id)
            .fetch_one(&app.db.pool)
            .await
            .unwrap()
    };
    let version = xmin().await;
    assert_eq!(app.get("/v1/me", Some(&alice.token)).await.status, 200);
    let bob = app.register("bob").await;
    sqlx::query("INSERT INTO identity.user_activity (user_id, last_active_at) VALUES ($1, now())")
        .bind(bob.id.parse::<uuid::Uuid>().unwrap())
        .execute(&app.db.pool)
        .await
        .unwrap();
    eventually("a flush that counts bob", Duration::from_secs(10), || async {
        (app.metric("trellis_api_daily_active_users").await == Some(2.0)).then_some(())
    })
    .await;
    assert_eq!(stamp().await, Some(first));
    assert_eq!(xmin().await, version, "the row was rewritten within the hour");
    // …and is once it is older than that.
    sqlx::query("UPDATE identity.user_activity SET last_active_at = now() - interval '2 hours' WHERE user_id = $1")
        .bind(id)
        .execute(&app.db.pool)
        .await
        .unwrap();
    eventually("alice's activity refreshed after an hour", Duration::from_secs(10), || async {
        assert_eq!(app.get("/v1/me", Some(&alice.token)).await.status, 200);
        stamp().await.is_some_and(|at| at > first).then_some(())
    })
    .await;
}

#[tokio::test]
async fn tokens_that_do_not_authenticate_never_crowd_out_signed_in_users() {
    // The tracker remembers 5 tokens between two flushes; 50 callers with made-up tokens come
    // first. The only flush is the one of the graceful stop.
    // An hour between flushes is longer than a console session's idle timeout: no console here.
    let args = ["--activity-max-tokens", "5", "--activity-flush-interval", "1h", "--console", "off"]
        .map(String::from)
        .to_vec();
    let app = TestApp::spawn_with(Options { args, ..Default::default() }).await;
    let alice = app.register("alice").await;
    for i in 0..50 {
        let r = app.get("/v1/me", Some(&format!("trl_made-up-{i}"))).await;
        assert_eq!(r.status, 401);
    }
    assert_eq!(app.get("/v1/me", Some(&alice.token)).await.status, 200);
    let (db, _) = app.stop().await;
    let rows: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT user_id FROM identity.user_activity").fetch_all(&db.pool).await.unwrap();
    assert_eq!(rows, [alice.id.parse::<uuid::Uuid>().unwrap()], "alice is a daily active user");
}
