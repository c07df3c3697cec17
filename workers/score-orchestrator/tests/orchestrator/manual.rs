use std::time::Duration;

use trellis_testkit::{TestDb, nats_prefix};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_trigger_leads_to_a_run_whose_scores_the_api_serves() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = nats_prefix();
    let api = Api::start(&db, &prefix, &[]).await;
    let _replica = Replica::start(&db, &prefix, "replica-a", &["--score-schedule-check", "200ms"]).await;
    // No run ever succeeded: it makes one over the empty graph at start-up.
    let first = wait_succeeded(&db, 1, Duration::from_secs(30)).await;
    assert_eq!((first[0].trigger.as_str(), first[0].users), ("startup", Some(0)));

    let admin = api.register("root").await;
    make_admin(&db, admin.id).await;
    let ada = api.register("ada").await;
    let bob = api.register("bob").await;
    let cyd = api.register("cyd").await;
    let dee = api.register("dee").await;
    // A star around bob, who points back at ada and cyd; root has no contacts (dangling).
    let edges = [(&ada, &bob), (&cyd, &bob), (&dee, &bob), (&bob, &ada), (&bob, &cyd)];
    for (owner, contact) in edges {
        api.add_contact(owner, contact).await;
    }
    set_verified(&db, cyd.id).await;
    let before = api.score(&ada.token, bob.id).await;
    assert_eq!(before["status"], "not_yet_scored", "{before}");
    assert!(before["score"].is_null() && before["trust"].is_null(), "{before}");

    api.request_run(&admin).await;
    let all = wait_succeeded(&db, 2, Duration::from_secs(30)).await;
    assert_eq!(all.len(), 2, "one run per request: {all:#?}");
    let run = &all[1];
    assert_eq!(run.trigger, "manual");
    assert_eq!(run.requested_by, Some(admin.id), "the run records who asked for it");
    assert_eq!(run.host.as_deref(), Some("replica-a"));
    assert_eq!((run.users, run.edges, run.scores_changed), (Some(5), Some(5), Some(5)));

    let users = [&admin, &ada, &bob, &cyd, &dee].map(|u| u.id);
    let expected = Expected::compute(&users, &edges.map(|(a, b)| (a.id, b.id)), &[cyd.id], &[]);
    let mut distinct = expected.scores.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() >= 3, "the graph separates users: {:?}", expected.scores);
    let stored = stored_scores(&db).await;
    assert_eq!(stored.len(), 5);
    for user in users {
        let (trust, score) = expected.of(user);
        assert_eq!(stored[&user], (trust, score), "stored value of {user} is the domain function's, bit for bit");
        let body = api.score(&dee.token, user).await;
        assert_eq!(body["status"], "scored", "{body}");
        assert_eq!(body["user_id"], user.to_string());
        assert_eq!(body["score"].as_i64(), Some(i64::from(score)), "{user}: {body}");
        let served = body["trust"].as_f64().expect("a trust value");
        assert!((served - trust).abs() <= trust * 1e-12, "{user}: served trust {served}, expected {trust}");
        assert_eq!(body["stale"], false);
        assert!(body["computed_at"].is_string(), "{body}");
    }
    let rows_of_run: i64 = sqlx::query_scalar("SELECT count(*) FROM score.user_scores WHERE run_id = $1")
        .bind(run.id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows_of_run, 5, "the manual run wrote every score");
    // Also by handle: the route resolves either.
    let by_handle = api.request(reqwest::Method::GET, "/v1/users/bob/score", Some(&ada.token), None).await;
    assert_eq!((by_handle.status, by_handle.body["score"].as_i64()), (200, Some(i64::from(expected.of(bob.id).1))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trellisctl_score_run_wait_requests_a_run_and_prints_its_record() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = nats_prefix();
    // The API relays the request; the replica runs it.
    let _api = Api::start(&db, &prefix, &[]).await;
    let _replica = Replica::start(&db, &prefix, "replica-a", &["--score-schedule-check", "200ms"]).await;
    wait_succeeded(&db, 1, Duration::from_secs(30)).await;
    seed_users(&db, 50, 5).await;

    let out = tokio::process::Command::new(trellisctl())
        .args(["--output", "json", "score", "run", "--wait", "--timeout", "60s"])
        .env("DATABASE_URL", &db.url)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    let json_start = stdout.find('{').expect("a JSON run record");
    let record: serde_json::Value = serde_json::from_str(&stdout[json_start..]).unwrap();
    assert_eq!((record["status"].as_str(), record["trigger"].as_str()), (Some("succeeded"), Some("manual")));
    assert_eq!(record["users"], 50);
    let runs = runs(&db).await;
    assert_eq!(runs.len(), 2, "the start-up run and the requested one");

    // Bad input is a message and a non-zero exit.
    let bad = tokio::process::Command::new(trellisctl())
        .args(["score", "show", "not-a-uuid"])
        .env("DATABASE_URL", &db.url)
        .output()
        .await
        .unwrap();
    assert!(!bad.status.success());
    assert!(!bad.stderr.is_empty());
}
