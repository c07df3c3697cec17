//! Suspended and hidden users vanish from results answered by the index; a suspended user's
//! document has no score; a reinstated user comes back.

use std::time::Duration;

use search_projector::Projector;
use search_projector::cutover::{CandidateProjector, DocumentRules};
use serde_json::json;
use trellis_runtime::consumer::{Handler, Outcome};
use trellis_testkit::TestDb;
use uuid::Uuid;

use crate::harness::*;

const WAIT: Duration = Duration::from_secs(30);

/// Waits until `/v1/search/users?q=` answers from the index with exactly `expected` among the
/// handles that start with `q` (name matches tolerate typos, so other handles sharing the
/// random tag may match too).
async fn until_index_answers(api: &Api, asker: &User, q: &str, expected: Vec<String>, what: &str) {
    let path = format!("/v1/search/users?q={q}&limit=50");
    eventually(what, WAIT, || async {
        let (source, body) = api.search(&path, asker).await;
        let prefixed: Vec<String> = hit_handles(&body).into_iter().filter(|h| h.starts_with(q)).collect();
        (source == "index" && prefixed == expected).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn suspended_and_hidden_users_vanish_from_index_results() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start(&db, &prefix).await;
    let _projector = Replica::start(&db, &prefix, &["--batch-size", "64"]).await;
    let tag = &Uuid::new_v4().simple().to_string()[..6];
    let reporter = api.register(&format!("rep{tag}")).await;
    let moderator = api.register(&format!("mod{tag}")).await;
    make_role(&db, moderator.id, "moderator").await;
    let impostor = api.register(&format!("v{tag}imp")).await;
    let spammer = api.register(&format!("v{tag}spam")).await;
    let bystander = api.register(&format!("v{tag}ok")).await;
    let q = format!("v{tag}");

    until_index_answers(&api, &reporter, &q, handles_of([&impostor, &spammer, &bystander]), "all three in the index")
        .await;

    api.uphold(&reporter, &moderator, impostor.id, "impersonation").await;
    api.uphold(&reporter, &moderator, spammer.id, "spam").await;
    let Response { status, body: _, .. } =
        api.request(reqwest::Method::GET, "/v1/me", Some(&impostor.token), None).await;
    assert_eq!(status, 401, "the suspended impostor's token is revoked");

    until_index_answers(&api, &reporter, &q, handles_of([&bystander]), "the suspended and the hidden user to vanish")
        .await;
    // The documents still exist; the index filters them.
    let imp = directory_row(&db, impostor.id).await.expect("the impostor's document");
    assert_eq!(imp.5, "suspended");
    let spam = directory_row(&db, spammer.id).await.expect("the spammer's document");
    assert!(spam.6, "the spammer's document is hidden");
    // Exact-handle searches do not find them either.
    for user in [&impostor, &spammer] {
        let (source, body) = api.search(&format!("/v1/search/users?q={}", user.handle), &reporter).await;
        assert_eq!(source, "index");
        assert!(!hit_handles(&body).contains(&user.handle), "{} found: {body:?}", user.handle);
    }
    let (source, body) = api.search(&format!("/v1/search/users?q={}", bystander.handle), &reporter).await;
    assert_eq!(source, "index");
    assert_eq!(body["items"][0]["handle"], bystander.handle.as_str(), "the exact handle comes first: {body:?}");
}

/// The score orchestrator keeps scores of active users only, and its next run deletes a
/// suspended user's score without an event: the document of a suspended user has no score from
/// the moment the suspension is projected, in the read model and, through the one shared
/// definition, in the shadow candidate's tables, as in a rebuild.
#[tokio::test]
async fn a_suspended_users_document_has_no_score_in_the_read_model_nor_in_the_shadow_candidates() {
    let db = TestDb::migrated().await.unwrap();
    let user = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO identity.users (id, handle, display_name, email, password_hash, status)
         VALUES ($1, 'scored_one', 'Scored One', 'scored@example.com', 'not a hash', 'suspended')",
    )
    .bind(user)
    .execute(&db.pool)
    .await
    .unwrap();
    // The score of the last run before the suspension: the next run deletes it.
    sqlx::query(
        "INSERT INTO score.user_scores (user_id, trust, score, run_id, computed_at) VALUES ($1, 0.5, 731, $2, now())",
    )
    .bind(user)
    .bind(Uuid::now_v7())
    .execute(&db.pool)
    .await
    .unwrap();
    let suspended = delivery(
        "identity.user_suspended",
        json!({"user_id": user, "reason": "upheld harassment dispute", "dispute_id": null}),
        1,
    );

    let outcomes = Projector::new(db.pool.clone()).handle(std::slice::from_ref(&suspended)).await;
    assert_eq!(outcomes, [Outcome::Done]);
    let outcomes = CandidateProjector::new(db.pool.clone(), DocumentRules::PRODUCTION).handle(&[suspended]).await;
    assert_eq!(outcomes, [Outcome::Done]);

    let projected = directory_row(&db, user).await.expect("the read model's document");
    assert_eq!((projected.4, projected.5.as_str()), (None, "suspended"), "{projected:?}");
    let candidate: serde_json::Value =
        sqlx::query_scalar("SELECT document FROM shadow.search_directory WHERE user_id = $1")
            .bind(user)
            .fetch_one(&db.pool)
            .await
            .expect("the candidate's document");
    assert_eq!((&candidate["score"], &candidate["status"]), (&json!(null), &json!("suspended")), "{candidate}");
    assert_eq!(rebuilt_model(&db).await.directory, [projected], "a rebuild agrees");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reinstated_user_comes_back_to_index_results() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start(&db, &prefix).await;
    let _projector = Replica::start(&db, &prefix, &["--batch-size", "64"]).await;
    let tag = &Uuid::new_v4().simple().to_string()[..6];
    let reporter = api.register(&format!("rep{tag}")).await;
    let moderator = api.register(&format!("mod{tag}")).await;
    make_role(&db, moderator.id, "moderator").await;
    let admin = api.register(&format!("adm{tag}")).await;
    make_role(&db, admin.id, "admin").await;
    let wronged = api.register(&format!("w{tag}x")).await;
    let q = format!("w{tag}");

    api.uphold(&reporter, &moderator, wronged.id, "harassment").await;
    until_index_answers(&api, &reporter, &q, Vec::new(), "the suspended user to vanish").await;
    api.reinstate(&admin, wronged.id).await;
    until_index_answers(&api, &reporter, &q, handles_of([&wronged]), "the reinstated user to come back").await;
    let doc = directory_row(&db, wronged.id).await.expect("the document");
    assert_eq!(doc.5, "active");
}
