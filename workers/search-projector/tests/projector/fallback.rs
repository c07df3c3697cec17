//! Fallback engages when the projector is stopped and disengages when it catches up: an API with
//! `--search-max-lag 1s`, a projector that is killed and started again.

use std::time::Duration;

use trellis_testkit::TestDb;
use uuid::Uuid;

use crate::harness::*;

const WAIT: Duration = Duration::from_secs(30);

/// Waits until both searches answer from the index with exactly `expected`.
async fn until_index_has(api: &Api, owner: &User, q: &str, expected: &[String], what: &str) {
    let users = format!("/v1/search/users?q={q}&limit=50");
    let contacts = format!("/v1/me/contacts/search?q={q}&limit=50");
    eventually(what, WAIT, || async {
        let (source, body) = api.search(&users, owner).await;
        if source != "index" || prefixed(&body, q) != expected {
            return None;
        }
        let (source, body) = api.search(&contacts, owner).await;
        (source == "index" && hit_handles(&body) == expected).then_some(())
    })
    .await;
}

/// The hits' handles that start with `q`: name matches tolerate typos, so handles sharing the
/// random tag may match too.
fn prefixed(body: &serde_json::Value, q: &str) -> Vec<String> {
    hit_handles(body).into_iter().filter(|h| h.starts_with(q)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn fallback_engages_while_the_projector_is_stopped_and_disengages_when_it_catches_up() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start_with(&db, &prefix, &["--search-max-lag", "1s"]).await;
    let tag = &Uuid::new_v4().simple().to_string()[..6];
    let owner = api.register(&format!("own{tag}")).await;
    let mut early = Vec::new();
    for i in 0..3 {
        let user = api.register(&format!("ear{tag}{i}")).await;
        api.put_contact(&owner, user.id, "early").await;
        early.push(user);
    }

    // Users exist and the model is empty: the base tables answer.
    let (source, body) = api.search(&format!("/v1/search/users?q=ear{tag}"), &owner).await;
    assert_eq!(source, "database", "an empty model while users exist is not used: {body:?}");
    assert_eq!(prefixed(&body, &format!("ear{tag}")), handles_of(&early));

    // A projector catches up: the index answers.
    let projector = Replica::start(&db, &prefix, &["--batch-size", "64"]).await;
    caught_up(&db, &prefix).await;
    until_index_has(&api, &owner, &format!("ear{tag}"), &handles_of(&early), "the index to answer").await;

    // The projector dies; writes go on. Once the newest event is more than 1 s past the last
    // applied one (and the cached decision has expired), both endpoints fall back.
    drop(projector);
    let users_before = api.fallbacks("users").await;
    let contacts_before = api.fallbacks("contacts").await;
    let users_path = format!("/v1/search/users?q=lat{tag}&limit=50");
    let contacts_path = format!("/v1/me/contacts/search?q=lat{tag}&limit=50");
    let mut late = Vec::new();
    let mut users_fallbacks = 0.0;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    let fallback_body = loop {
        pace.tick().await;
        assert!(tokio::time::Instant::now() < deadline, "no fallback after {WAIT:?} with the projector stopped");
        assert!(late.len() < 50, "no fallback after {} writes with the projector stopped", late.len());
        let user = api.register(&format!("lat{tag}{}", late.len())).await;
        api.put_contact(&owner, user.id, "late").await;
        late.push(user);
        let (source, body) = api.search(&users_path, &owner).await;
        if source == "database" {
            users_fallbacks += 1.0;
            break body;
        }
        assert_eq!(source, "index");
    };
    assert_eq!(
        prefixed(&fallback_body, &format!("lat{tag}")),
        handles_of(&late),
        "the base tables have every new user"
    );
    let (source, body) = api.search(&contacts_path, &owner).await;
    assert_eq!(source, "database", "contact search falls back too: {body:?}");
    assert_eq!(hit_handles(&body), handles_of(&late), "the base tables have every new contact");
    let users_after = api.fallbacks("users").await;
    let contacts_after = api.fallbacks("contacts").await;
    assert!(
        users_after - users_before >= users_fallbacks,
        "the users fallback counter went from {users_before} to {users_after}"
    );
    assert!(
        contacts_after - contacts_before >= 1.0,
        "the contacts fallback counter went from {contacts_before} to {contacts_after}"
    );
    // The index does not have the new users yet (nothing projected them).
    for user in &late {
        assert_eq!(directory_row(&db, user.id).await, None, "{} was projected with no projector", user.handle);
    }

    // A new projector catches up: the index answers again, new users included.
    let _projector = Replica::start(&db, &prefix, &["--batch-size", "64"]).await;
    caught_up(&db, &prefix).await;
    checkpoint_reaches_newest_event(&db).await;
    until_index_has(&api, &owner, &format!("lat{tag}"), &handles_of(&late), "the index to answer again").await;
    until_index_has(&api, &owner, &format!("ear{tag}"), &handles_of(&early), "the index to keep the early users").await;
}
