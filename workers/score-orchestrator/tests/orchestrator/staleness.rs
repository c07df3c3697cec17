use time::OffsetDateTime;
use trellis_testkit::{TestDb, nats_prefix};

use crate::harness::*;

/// Moves every run and every score `hours` into the past.
async fn back_date(db: &TestDb, hours: i64) {
    exec(
        db,
        &format!(
            "UPDATE score.runs SET created_at = created_at - interval '{hours} hours',
                 started_at = started_at - interval '{hours} hours', finished_at = finished_at - interval '{hours} hours'"
        ),
    )
    .await;
    exec(db, &format!("UPDATE score.user_scores SET computed_at = computed_at - interval '{hours} hours'")).await;
}

fn age(body: &serde_json::Value) -> time::Duration {
    let at =
        OffsetDateTime::parse(body["computed_at"].as_str().unwrap(), &time::format_description::well_known::Rfc3339)
            .unwrap();
    OffsetDateTime::now_utc() - at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_are_served_as_stale_once_older_than_the_threshold() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = nats_prefix();
    let default = Api::start(&db, &prefix, &[]).await;
    let strict = Api::start(&db, &prefix, &["--score-stale-after", "1h", "--no-relay"]).await;
    let ada = default.register("ada").await;
    let bob = default.register("bob").await;
    default.add_contact(&ada, &bob).await;
    run_once_ok(&db).await;

    for api in [&default, &strict] {
        let body = api.score(&ada.token, bob.id).await;
        assert_eq!((&body["status"], &body["stale"]), (&"scored".into(), &false.into()), "{body}");
        assert!(age(&body) < time::Duration::minutes(1), "{body}");
    }

    back_date(&db, 2).await;
    let body = default.score(&ada.token, bob.id).await;
    assert_eq!(body["stale"], false, "2 h old is fresh by the default 24 h: {body}");
    assert!((age(&body) - time::Duration::hours(2)).abs() < time::Duration::minutes(1), "{body}");
    let body = strict.score(&ada.token, bob.id).await;
    assert_eq!(body["stale"], true, "2 h old is stale with --score-stale-after 1h: {body}");
    assert_eq!(body["status"], "scored", "a stale score is still served: {body}");
    assert!(body["score"].is_i64(), "{body}");

    back_date(&db, 23).await;
    for user in [&ada, &bob] {
        let body = default.score(&bob.token, user.id).await;
        assert_eq!(body["stale"], true, "25 h old is stale by the default 24 h: {body}");
        assert!((age(&body) - time::Duration::hours(25)).abs() < time::Duration::minutes(1), "{body}");
    }

    // A new run on an unchanged graph rewrites no score, yet every score is fresh again: the
    // run vouches for every active user.
    let run = run_once_ok(&db).await;
    assert_eq!(run["scores_changed"], 0);
    let body = strict.score(&ada.token, bob.id).await;
    assert_eq!(body["stale"], false, "{body}");
    assert!(age(&body) < time::Duration::minutes(1), "{body}");
}
