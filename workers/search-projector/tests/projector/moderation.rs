//! Suspended and hidden users vanish from results answered by the index (issue 5 §3, §4).

use std::time::Duration;

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
    let (status, _) = api.request(reqwest::Method::GET, "/v1/me", Some(&impostor.token), None).await;
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
