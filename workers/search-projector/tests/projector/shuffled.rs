//! Order independence and idempotency: the library's handler fed a history's events shuffled
//! and partly duplicated leaves the model equal to a rebuild; irrelevant, unknown and malformed
//! events.

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use search_projector::Projector;
use serde_json::json;
use trellis_runtime::consumer::{Delivery, Handler, Outcome};
use trellis_testkit::TestDb;

use crate::harness::*;

/// Every event of the outbox, as the runner would deliver it.
async fn outbox_deliveries(db: &TestDb) -> Vec<Delivery> {
    let rows: Vec<(i64, String, serde_json::Value)> =
        sqlx::query_as("SELECT seq, subject, payload FROM ops.outbox ORDER BY seq").fetch_all(&db.pool).await.unwrap();
    rows.into_iter()
        .map(|(seq, subject, payload)| Delivery {
            subject,
            envelope: serde_json::from_value(payload).expect("outbox payloads are envelopes"),
            stream_sequence: seq as u64,
            deliveries: 1,
            replays: 0,
            span: tracing::Span::none(),
            trace: None,
        })
        .collect()
}

async fn reset_model(db: &TestDb) {
    sqlx::query("TRUNCATE search.directory, search.contacts").execute(&db.pool).await.unwrap();
    sqlx::query("UPDATE search.checkpoint SET last_event_at = NULL, last_stream_sequence = NULL, updated_at = NULL")
        .execute(&db.pool)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn shuffled_and_duplicated_events_leave_the_model_equal_to_a_rebuild() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start(&db, &prefix).await;
    random_history(&api, 10, 150, 11).await;
    let deliveries = outbox_deliveries(&db).await;
    let max_sequence = deliveries.iter().map(|d| d.stream_sequence).max().unwrap() as i64;
    let expected = rebuilt_model(&db).await;
    assert!(!expected.contacts.is_empty());
    let projector = Projector::new(db.pool.clone());
    let handle = tokio::runtime::Handle::current();

    let mut runner = TestRunner::new(ProptestConfig { cases: 8, ..ProptestConfig::default() });
    let strategy = (any::<u64>(), 1usize..48, 0u32..50);
    let result = runner.run(&strategy, |(seed, chunk, duplicate_percent)| {
        tokio::task::block_in_place(|| {
            handle.block_on(async {
                reset_model(&db).await;
                let mut rng = StdRng::seed_from_u64(seed);
                let mut events = deliveries.clone();
                for d in &deliveries {
                    if rng.random_range(0..100) < duplicate_percent {
                        events.push(Delivery { deliveries: 2, ..d.clone() });
                    }
                }
                events.shuffle(&mut rng);
                for batch in events.chunks(chunk) {
                    let outcomes = projector.handle(batch).await;
                    assert!(outcomes.iter().all(|o| *o == Outcome::Done), "{outcomes:?}");
                }
                let projected = model(&db).await;
                prop_assert_eq!(&projected, &expected);
                let checkpoint =
                    trellis_store::search_model::checkpoint(&mut db.pool.acquire().await.unwrap()).await.unwrap();
                prop_assert_eq!(checkpoint.last_stream_sequence, Some(max_sequence));
                Ok(())
            })
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[tokio::test]
async fn irrelevant_events_are_skipped_and_unknown_or_malformed_ones_rejected() {
    let db = TestDb::migrated().await.unwrap();
    let projector = Projector::new(db.pool.clone());
    let (reporter, target, dispute) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let filed =
        json!({"dispute_id": dispute, "reporter_id": reporter, "target_id": target, "kind": "spam", "priority": "P2"});
    let batch = [
        delivery("disputes.filed", filed, 1),
        delivery("identity.user_registered", json!({"handle": "no id"}), 2),
        delivery("scores.run_requested", json!({"requested_by": null, "reason": "manual"}), 3),
        delivery("contacts.contact_added", json!({"owner_id": "not a uuid", "contact_id": 1, "label": ""}), 4),
        delivery("some.future_event", json!(null), 5),
        delivery("disputes.filed", json!({"whatever": true}), 6),
    ];
    let outcomes = projector.handle(&batch).await;
    assert_eq!(outcomes[0], Outcome::Done);
    assert!(matches!(outcomes[1], Outcome::Reject(_)), "{outcomes:?}");
    assert_eq!(outcomes[2], Outcome::Done);
    assert!(matches!(outcomes[3], Outcome::Reject(_)), "{outcomes:?}");
    // A type this code does not know, and a malformed event of a type the model does not need,
    // are dead-lettered too: nothing is lost if a newer producer meant them for the projector.
    assert!(matches!(&outcomes[4], Outcome::Reject(e) if e.contains("unknown event type")), "{outcomes:?}");
    assert!(matches!(&outcomes[5], Outcome::Reject(e) if e.contains("malformed disputes.filed")), "{outcomes:?}");
    let checkpoint = trellis_store::search_model::checkpoint(&mut db.pool.acquire().await.unwrap()).await.unwrap();
    assert_eq!(checkpoint.last_stream_sequence, Some(3), "skipped events advance the checkpoint; rejected ones do not");
    // A registration of a user who does not exist (any more) leaves no document.
    let ghost = uuid::Uuid::now_v7();
    let outcomes = projector
        .handle(&[delivery(
            "identity.user_registered",
            json!({"user_id": ghost, "handle": "g", "display_name": "G"}),
            5,
        )])
        .await;
    assert_eq!(outcomes, [Outcome::Done]);
    assert_eq!(model(&db).await.directory.len(), 0);
}

#[tokio::test]
async fn an_event_of_a_version_this_code_does_not_read_is_rejected_not_projected() {
    let db = TestDb::migrated().await.unwrap();
    let projector = Projector::new(db.pool.clone());
    let mut newer = delivery("identity.user_verified", json!({"user_id": uuid::Uuid::now_v7()}), 1);
    newer.envelope.version = 2;
    let outcomes = projector.handle(&[newer]).await;
    assert!(matches!(&outcomes[0], Outcome::Reject(e) if e.contains("version 2")), "{outcomes:?}");
    let checkpoint = trellis_store::search_model::checkpoint(&mut db.pool.acquire().await.unwrap()).await.unwrap();
    assert_eq!(checkpoint.last_stream_sequence, None, "a rejected event does not advance the checkpoint");
}
