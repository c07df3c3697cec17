//! Each event type updates the model, through the API, the relay and a projector process.

use std::time::Duration;

use time::OffsetDateTime;
use trellis_domain::events::{Event, EventPayload, ScoresUpdated, UserScore};
use trellis_domain::ids::UserId;
use trellis_testkit::TestDb;
use uuid::Uuid;

use crate::harness::*;

const WAIT: Duration = Duration::from_secs(20);

async fn until_directory(db: &TestDb, user: Uuid, what: &str, ok: impl Fn(&DirectoryRow) -> bool) -> DirectoryRow {
    eventually(what, WAIT, || async { directory_row(db, user).await.filter(|r| ok(r)) }).await
}

async fn until_contact(db: &TestDb, owner: Uuid, contact: Uuid, what: &str, ok: impl Fn(&ContactRow) -> bool) {
    eventually(what, WAIT, || async { contact_row(db, owner, contact).await.filter(|r| ok(r)) }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn each_event_type_updates_the_model() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start(&db, &prefix).await;
    let projector = Replica::start(&db, &prefix, &["--batch-size", "64"]).await;

    // identity.user_registered
    let alice = api.register("alice").await;
    let bob = api.register("bob").await;
    let carol = api.register("carol").await;
    let mo = api.register("moderator").await;
    make_role(&db, mo.id, "moderator").await;
    let row = until_directory(&db, bob.id, "bob's directory document", |_| true).await;
    assert_eq!(row, (bob.id, "bob".into(), "bob".into(), false, None, "active".into(), false));

    // contacts.contact_added / contact_updated
    api.put_contact(&alice, bob.id, "climbing partner").await;
    until_contact(&db, alice.id, bob.id, "alice's contact bob", |r| r.4 == "climbing partner").await;
    api.put_contact(&alice, bob.id, "neighbour").await;
    until_contact(&db, alice.id, bob.id, "the new label", |r| {
        r.4 == "neighbour" && r.6 == "bob bob neighbour " && r.5.is_empty()
    })
    .await;

    // circles: created (no member yet), member_added, renamed, member_removed, deleted
    let climbing = api.create_circle(&alice, "Climbing").await;
    let work = api.create_circle(&alice, "Work").await;
    api.add_member(&alice, climbing, bob.id).await;
    api.add_member(&alice, work, bob.id).await;
    until_contact(&db, alice.id, bob.id, "two circles", |r| r.5 == ["Climbing", "Work"]).await;
    api.rename_circle(&alice, climbing, "Bouldering").await;
    until_contact(&db, alice.id, bob.id, "the renamed circle", |r| {
        r.5 == ["Bouldering", "Work"] && r.6 == "bob bob neighbour bouldering work"
    })
    .await;
    api.remove_member(&alice, work, bob.id).await;
    until_contact(&db, alice.id, bob.id, "one circle", |r| r.5 == ["Bouldering"]).await;
    api.delete_circle(&alice, climbing).await;
    until_contact(&db, alice.id, bob.id, "no circle", |r| r.5.is_empty()).await;

    // identity.profile_updated: the directory and the contact documents that show bob
    api.put_contact(&carol, bob.id, "").await;
    api.rename_me(&bob, "Robert Paulson").await;
    until_directory(&db, bob.id, "bob's new name", |r| r.2 == "Robert Paulson").await;
    until_contact(&db, alice.id, bob.id, "bob's new name at alice's", |r| r.3 == "Robert Paulson").await;
    until_contact(&db, carol.id, bob.id, "bob's new name at carol's", |r| r.6 == "bob robert paulson  ").await;

    // scores.updated (as a score run writes it: rows, then the event through the outbox)
    let run = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO score.user_scores (user_id, trust, score, run_id, computed_at) VALUES ($1, 0.5, 731, $2, now())",
    )
    .bind(carol.id)
    .bind(run)
    .execute(&db.pool)
    .await
    .unwrap();
    let event = Event::new(
        &EventPayload::ScoresUpdated(ScoresUpdated {
            run_id: run,
            scores: vec![UserScore { user_id: UserId(carol.id), score: 731 }],
        }),
        None,
        OffsetDateTime::now_utc(),
    );
    let tx = db.pool.begin().await.unwrap();
    trellis_commands::commit(tx, trellis_commands::Emitted::events(vec![event])).await.unwrap();
    until_directory(&db, carol.id, "carol's score", |r| r.4 == Some(731)).await;

    // disputes.decided: upheld spam hides; identity.user_suspended (upheld harassment)
    api.uphold(&alice, &mo, carol.id, "spam").await;
    until_directory(&db, carol.id, "carol hidden", |r| r.6).await;
    api.uphold(&alice, &mo, bob.id, "harassment").await;
    until_directory(&db, bob.id, "bob suspended", |r| r.5 == "suspended").await;

    // contacts.contact_removed
    api.remove_contact(&alice, bob.id).await;
    eventually("alice's contact document of bob gone", WAIT, || async {
        contact_row(&db, alice.id, bob.id).await.is_none().then_some(())
    })
    .await;

    // The model is what a rebuild makes of the base tables, and the freshness metrics exist.
    caught_up(&db, &prefix).await;
    let checkpoint = trellis_store::search_model::checkpoint(&mut db.pool.acquire().await.unwrap()).await.unwrap();
    assert!(checkpoint.last_event_at.is_some() && checkpoint.last_stream_sequence.unwrap_or(0) > 0, "{checkpoint:?}");
    eventually("both freshness gauges", WAIT, || async {
        let text = projector.metrics().await;
        (text.contains("trellis_search_projection_lag_seconds")
            && text.contains("trellis_search_checkpoint_age_seconds"))
        .then_some(())
    })
    .await;
    let projected = model(&db).await;
    assert_eq!(projected.directory.len(), 4);
    assert_eq!(projected, rebuilt_model(&db).await);
}
