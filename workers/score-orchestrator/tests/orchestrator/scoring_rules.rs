use trellis_testkit::{TestDb, nats_prefix};
use uuid::Uuid;

use crate::harness::*;

async fn add_contacts(db: &TestDb, edges: &[(Uuid, Uuid)]) {
    for (owner, contact) in edges {
        sqlx::query("INSERT INTO contacts.contacts (owner_id, contact_id) VALUES ($1, $2)")
            .bind(owner)
            .bind(contact)
            .execute(&db.pool)
            .await
            .unwrap();
    }
}

async fn dispute(db: &TestDb, reporter: Uuid, target: Uuid, status: &str, decided_days_ago: Option<i32>) {
    sqlx::query(
        "INSERT INTO security.disputes (id, reporter_id, target_id, kind, priority, status, description, decided_at)
         VALUES ($1, $2, $3, 'spam', 2, $4, 'test', now() - make_interval(days => $5))",
    )
    .bind(Uuid::now_v7())
    .bind(reporter)
    .bind(target)
    .bind(status)
    .bind(decided_days_ago.unwrap_or(0))
    .execute(&db.pool)
    .await
    .unwrap();
}

/// The stored scores equal the domain function's on `expected`, bit for bit, for exactly its users.
async fn assert_stored(db: &TestDb, expected: &Expected) {
    let stored = stored_scores(db).await;
    assert_eq!(stored.len(), expected.users.len(), "one score per active user: {stored:?}");
    for &user in &expected.users {
        assert_eq!(stored.get(&user), Some(&expected.of(user)), "{user}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspended_users_get_no_score_and_an_upheld_dispute_halves_the_trust_the_score_ranks() {
    let db = TestDb::migrated().await.unwrap();
    let api = Api::start(&db, &nats_prefix(), &[]).await;
    let viewer = api.register("viewer").await;
    let u = seed_users(&db, 6, 3).await; // u[2] and u[5] verified
    let edges = vec![
        (u[0], u[1]),
        (u[1], u[2]),
        (u[2], u[0]),
        (u[3], u[0]),
        (u[4], u[0]),
        (u[5], u[4]),
        (u[0], u[5]),
        (u[1], u[3]),
        (u[3], u[4]),
    ];
    add_contacts(&db, &edges).await;
    let verified = [u[2], u[5]];
    let everyone: Vec<Uuid> = u.iter().copied().chain([viewer.id]).collect();

    run_once_ok(&db).await;
    assert_stored(&db, &Expected::compute(&everyone, &edges, &verified, &[])).await;

    // Suspend u[3]: gone from the graph with all of its edges, and its score removed.
    let suspended = u[3];
    exec(&db, &format!("UPDATE identity.users SET status = 'suspended' WHERE id = '{suspended}'")).await;
    let run = run_once_ok(&db).await;
    let active: Vec<Uuid> = everyone.iter().copied().filter(|&x| x != suspended).collect();
    let kept: Vec<(Uuid, Uuid)> = edges.iter().copied().filter(|&(a, b)| a != suspended && b != suspended).collect();
    let without_dispute = Expected::compute(&active, &kept, &verified, &[]);
    assert_stored(&db, &without_dispute).await;
    assert_eq!(run["users"], 6);
    assert_eq!(run["edges"], kept.len());
    let row: i64 = sqlx::query_scalar("SELECT count(*) FROM score.user_scores WHERE user_id = $1")
        .bind(suspended)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(row, 0, "a suspended user has no score row");
    // The API still finds the user (it resolves suspended users too) and says there is no score.
    let body = api.score(&viewer.token, suspended).await;
    assert_eq!(body["status"], "not_yet_scored", "{body}");
    assert!(body["score"].is_null() && body["trust"].is_null(), "{body}");

    // An upheld dispute against the most trusted user; a dismissed one and one upheld over a
    // year ago against another user change nothing.
    let target = u[0];
    let (target_trust, target_score) = without_dispute.of(target);
    assert!(
        without_dispute.trust.iter().all(|&t| t <= target_trust),
        "precondition: the target is the most trusted: {:?}",
        without_dispute.trust
    );
    dispute(&db, u[1], target, "upheld", Some(1)).await;
    dispute(&db, u[0], u[2], "dismissed", Some(1)).await;
    dispute(&db, u[0], u[2], "upheld", Some(400)).await;
    dispute(&db, u[1], u[2], "pending", None).await;
    run_once_ok(&db).await;
    let with_dispute = Expected::compute(&active, &kept, &verified, &[(target, 1)]);
    assert_stored(&db, &with_dispute).await;
    let stored = stored_scores(&db).await;
    let (trust, score) = stored[&target];
    assert_eq!(trust, target_trust, "the stored trust is t, before the penalty");
    assert!(score < target_score, "the dispute lowers the score: {score} < {target_score}");
    // The score ranks t/2: the share of the other active users whose trust is below half the target's.
    let below = stored.iter().filter(|(id, (t, _))| **id != target && *t < trust * 0.5).count();
    assert_eq!(score, (1000 * below / (active.len() - 1)) as i32);
    // Had u[2]'s disputes counted, its score would differ from the one stored.
    let if_counted = Expected::compute(&active, &kept, &verified, &[(target, 1), (u[2], 1)]);
    assert_ne!(if_counted.of(u[2]).1, stored[&u[2]].1, "dismissed, old and pending disputes do not count");
    assert_eq!(api.score(&viewer.token, target).await["score"].as_i64(), Some(i64::from(score)));
}
