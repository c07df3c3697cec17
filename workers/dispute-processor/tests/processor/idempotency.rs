//! Redelivery is idempotent, and two replicas never decide one dispute twice.

use std::time::Duration;

use dispute_processor::{Processor, ProcessorArgs};
use trellis_testkit::TestDb;
use uuid::Uuid;

use crate::harness::*;

async fn audit_rows(db: &TestDb, ids: &[Uuid]) -> Vec<(Uuid, i64)> {
    sqlx::query_as(
        "SELECT dispute_id, count(*) FROM security.dispute_decisions WHERE dispute_id = ANY($1) GROUP BY dispute_id",
    )
    .bind(ids)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

async fn outbox_decided(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM ops.outbox WHERE subject = 'events.disputes.decided'")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redelivered_decided_dispute_is_acked_with_no_effect() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start(&db, &prefix).await;
    let replica = Replica::start(&db, &prefix, &[]).await;
    let t = tag();
    let reporter = api.register(&format!("rep{t}")).await;
    let target = api.register(&format!("tgt{t}")).await;
    let id = api.file(&reporter, target.id, "harassment").await;
    let first = api.decided(&reporter, id).await;
    all_published(&db).await;
    let events_before = outbox_decided(&db).await;

    // Redeliver: the same event again on its subject, under a new message id so that
    // JetStream's duplicate window does not drop it.
    let payload: serde_json::Value =
        sqlx::query_scalar("SELECT payload FROM ops.outbox WHERE subject = 'events.disputes.filed.p1'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let client = async_nats::connect(trellis_testkit::nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", Uuid::new_v4().to_string().as_str());
    js.publish_with_headers(format!("{prefix}.events.disputes.filed.p1"), headers, payload.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let acked = r#"trellis_worker_messages_total{consumer="dispute-processor-p1",outcome="ok"}"#;
    eventually("the redelivered event to be acked", WAIT, || async {
        (series(&replica.metrics().await, acked) == Some(2.0)).then_some(())
    })
    .await;
    assert_eq!(api.dispute(&reporter, id).await, first, "the dispute is unchanged");
    assert_eq!(audit_rows(&db, &[id]).await, vec![(id, 1)], "decided once");
    assert_eq!(outbox_decided(&db).await, events_before, "no new event");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_never_decide_one_dispute_twice() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start(&db, &prefix).await;
    let t = tag();
    let mut reporters = Vec::new();
    for i in 0..10 {
        reporters.push(api.register(&format!("r{i}{t}")).await);
    }
    let target = api.register(&format!("tgt{t}")).await;
    for r in &reporters[..5] {
        set_score(&db, r.id, 700).await;
    }
    let _a = Replica::start(&db, &prefix, &["--batch-size", "4", "--short-batch-size", "4"]).await;
    let _b = Replica::start(&db, &prefix, &["--batch-size", "4", "--short-batch-size", "4"]).await;
    // Every kind from every reporter against one target: R4 upholds across batches and
    // replicas (the impersonation disputes suspend the target), R1 dismisses repeats.
    let mut ids = Vec::new();
    for _round in 0..2 {
        for kind in ["incorrect_info", "spam", "harassment", "impersonation"] {
            let filed = reporters.iter().map(|r| api.file(r, target.id, kind));
            ids.extend(futures::future::join_all(filed).await);
        }
    }
    all_decided(&db, &ids).await;
    // R2 dismisses what is filed against the target once it is suspended. Whether a filing of the
    // rounds above is judged before or after the suspension is a race between priorities, so
    // reporters who filed nothing yet file now.
    let status: String = sqlx::query_scalar("SELECT status FROM identity.users WHERE id = $1")
        .bind(target.id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(status, "suspended", "the corroborated impersonation disputes suspended the target");
    let mut late = Vec::new();
    for i in 0..4 {
        late.push(api.register(&format!("late{i}{t}")).await);
    }
    let filed = late.iter().map(|r| api.file(r, target.id, "harassment"));
    let late_ids = futures::future::join_all(filed).await;
    all_decided(&db, &late_ids).await;
    ids.extend(late_ids);
    // A dispute is judged on its own once (its R1–R5 decision) and decided finally at most
    // once; the one legitimate second row is a needs_review (R5) later upheld by R4 with a
    // corroborated one.
    let rows: Vec<(Uuid, i64, i64)> = sqlx::query_as(
        "SELECT dispute_id, count(*) FILTER (WHERE status IN ('upheld', 'dismissed')),
                count(*) FILTER (WHERE status = 'needs_review')
         FROM security.dispute_decisions WHERE dispute_id = ANY($1) GROUP BY dispute_id",
    )
    .bind(&ids)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), ids.len(), "every dispute decided");
    assert!(rows.iter().all(|(_, finals, reviews)| *finals <= 1 && *reviews <= 1), "decided twice: {rows:?}");
    let rules: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT rule FROM security.dispute_decisions WHERE dispute_id = ANY($1) ORDER BY rule",
    )
    .bind(&ids)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for rule in ["R1", "R2", "R4"] {
        assert!(rules.iter().any(|r| r == rule), "{rule} decided some of them: {rules:?}");
    }
    let audited: i64 = rows.iter().map(|(_, f, r)| f + r).sum();
    let decided: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.outbox WHERE subject = 'events.disputes.decided'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(decided, audited, "one decision event per decision");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_deciders_of_the_same_disputes_decide_each_once() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start(&db, &prefix).await;
    let t = tag();
    let reporter = api.register(&format!("rep{t}")).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let target = api.register(&format!("t{i}{t}")).await;
        ids.push(api.file(&reporter, target.id, "spam").await);
    }
    let a = Processor::new(db.pool.clone(), ProcessorArgs::default());
    let b = Processor::new(db.pool.clone(), ProcessorArgs::default());
    let (x, y) = tokio::join!(a.decide(&ids), b.decide(&ids));
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.len() + y.len(), ids.len(), "each dispute decided by exactly one: {} + {}", x.len(), y.len());
    assert!(x.is_disjoint(&y));
    assert!(audit_rows(&db, &ids).await.iter().all(|(_, n)| *n == 1));
    let again = tokio::time::timeout(Duration::from_secs(10), a.decide(&ids)).await.unwrap().unwrap();
    assert!(again.is_empty(), "already decided: nothing to do");
}
