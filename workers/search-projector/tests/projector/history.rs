//! A history of API mutations, projected by two replicas, equals a rebuild from the base tables.

use trellis_testkit::TestDb;

use crate::harness::*;

/// The history includes score runs, suspensions of scored users and reinstatements: a score
/// run removes a suspended user's score without an event, so the projection must not show a
/// suspended user's score in the first place (a rebuild never does).
#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_project_a_history_equal_to_a_rebuild() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start_scoring(&db, &prefix).await;
    // Small batches, so that both replicas get work while the history is written.
    let a = Replica::start(&db, &prefix, &["--batch-size", "8"]).await;
    let b = Replica::start(&db, &prefix, &["--batch-size", "8"]).await;
    let history = random_moderated_history(&api, &db, 12, 250, 7).await;
    assert!(history.score_runs >= 2, "{history:?}");
    assert!(history.suspended_with_a_score > 0 && history.reinstated > 0, "{history:?}");
    assert!(history.suspended > 0, "someone is suspended when the last run removes their score: {history:?}");
    caught_up(&db, &prefix).await;
    let projected = model(&db).await;
    assert_eq!(projected.directory.len(), history.users.len());
    assert!(!projected.contacts.is_empty(), "the history made contacts");
    assert!(projected.directory.iter().any(|d| d.4.is_some()), "the history scored users");
    assert_eq!(projected, rebuilt_model(&db).await, "the projected model equals a rebuild");
    // Every series exists from start-up, so "projected batches" is a count above zero.
    for replica in [&a, &b] {
        let text = replica.metrics().await;
        let handled: f64 = text
            .lines()
            .filter(|l| {
                l.starts_with("trellis_worker_messages_total{")
                    && l.contains("consumer=\"search-projector\"")
                    && l.contains("outcome=\"ok\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(handled > 0.0, "each replica projected batches:\n{text}");
    }
}
