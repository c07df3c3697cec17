//! Strict priority, its in-flight bound, and aging.

use std::time::Duration;

use time::OffsetDateTime;
use trellis_testkit::TestDb;
use uuid::Uuid;

use crate::harness::*;

/// Files `n` disputes of `kind` from distinct reporters against distinct targets (so no rule
/// but R5 applies), `parallel` at a time.
async fn file_many(api: &Api, n: usize, kind: &str, reporters: &[User], targets: &[User]) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(16) {
        let filed = chunk.iter().map(|&i| {
            let reporter = &reporters[i % reporters.len()];
            let target = &targets[(i / reporters.len()) % targets.len()];
            api.file(reporter, target.id, kind)
        });
        ids.extend(futures::future::join_all(filed).await);
    }
    ids
}

async fn users(api: &Api, prefix: &str, n: usize) -> Vec<User> {
    let t = tag();
    let mut all = Vec::new();
    for i in 0..n {
        all.push(api.register(&format!("{prefix}{i}{t}")).await);
    }
    all
}

/// When the one P0 filing of a test was stored in the events stream (the server's clock; the
/// database's is the same machine's).
async fn p0_arrival(prefix: &str) -> OffsetDateTime {
    let events = trellis_testkit::StreamReader::connect(&trellis_testkit::nats_url(), &format!("{prefix}_EVENTS"))
        .await
        .expect("connecting to NATS");
    let stream = events.js.get_stream(&events.stream).await.expect("the events stream");
    let subject = format!("{prefix}.{}", trellis_domain::events::filed_subject(trellis_domain::disputes::Priority::P0));
    stream.get_last_raw_message_by_subject(&subject).await.expect("the P0's message").time
}

fn decided_before(times: &[(Uuid, Option<OffsetDateTime>)], at: OffsetDateTime) -> usize {
    times.iter().filter(|(_, d)| d.is_some_and(|d| d < at)).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_p0_filed_after_1000_queued_p3_is_decided_within_one_short_batch() {
    const SHORT_BATCH: usize = 32;
    // The processor's default: two batches decided at once, so "one batch" in flight is two
    // short batches.
    const IN_FLIGHT: usize = 2 * SHORT_BATCH;
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start(&db, &prefix).await;
    // 40 reporters × 25 targets: every (reporter, target) pair once, so no dispute is a duplicate.
    let reporters = users(&api, "r", 40).await;
    let targets = users(&api, "t", 25).await;
    let p3 = file_many(&api, 1000, "incorrect_info", &reporters, &targets).await;
    let p0 = api.file(&reporters[0], targets[0].id, "impersonation").await;
    all_published(&db).await;

    let short = SHORT_BATCH.to_string();
    let _replica = Replica::start(&db, &prefix, &["--short-batch-size", &short]).await;
    all_decided(&db, &[p0]).await;
    let p0_at = decided_at(&db, &[p0]).await[0].1.expect("P0 decided");
    all_decided(&db, &p3).await;
    let before = decided_before(&decided_at(&db, &p3).await, p0_at);
    assert!(before <= IN_FLIGHT, "{before} P3 disputes were decided before the P0 (in flight: {IN_FLIGHT})");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_p0_filed_while_1000_p3_drain_waits_for_one_short_batch_at_most() {
    const SHORT_BATCH: usize = 32;
    const IN_FLIGHT: usize = 2 * SHORT_BATCH;
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start(&db, &prefix).await;
    let reporters = users(&api, "r", 40).await;
    let targets = users(&api, "t", 25).await;
    let p3 = file_many(&api, 1000, "incorrect_info", &reporters, &targets).await;
    all_published(&db).await;
    let short = SHORT_BATCH.to_string();
    let _replica = Replica::start(&db, &prefix, &["--short-batch-size", &short]).await;
    eventually("the backlog to start draining", WAIT, || async {
        let times = decided_at(&db, &p3).await;
        times.iter().any(|(_, d)| d.is_some()).then_some(())
    })
    .await;

    let p0 = api.file(&reporters[0], targets[0].id, "impersonation").await;
    all_decided(&db, &[p0]).await;
    let decided = decided_at(&db, &[p0]).await[0].1.expect("P0 decided");
    // The wait is counted from the P0's arrival in the stream, when the processor can first
    // see it: between its filing and then, the API's relay publishes it, and on a busy
    // machine the P3 lanes decide a batch more meanwhile, which says nothing of the processor.
    let arrived = p0_arrival(&prefix).await;
    let times = decided_at(&db, &p3).await;
    let meanwhile = times.iter().filter(|(_, d)| d.is_some_and(|d| d > arrived && d < decided)).count();
    let left = times.iter().filter(|(_, d)| d.is_none_or(|d| d > decided)).count();
    assert!(left > 0, "the backlog was still there when the P0 was decided (else this test proves nothing)");
    assert!(meanwhile <= IN_FLIGHT, "{meanwhile} P3 decided between the P0's arrival in the stream and its decision");
    all_decided(&db, &p3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn aging_serves_an_old_p3_while_p0_and_p1_traffic_continues() {
    const MAX_WAIT_P3: Duration = Duration::from_secs(2);
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start(&db, &prefix).await;
    let reporters = users(&api, "r", 20).await;
    let targets = users(&api, "t", 20).await;
    let old_p3 = api.file(&reporters[0], targets[0].id, "incorrect_info").await;
    let urgent = [
        file_many(&api, 300, "impersonation", &reporters, &targets).await,
        file_many(&api, 300, "harassment", &reporters, &targets).await,
    ]
    .concat();
    all_published(&db).await;
    // The thing under test: the P3 has waited longer than its maximum wait.
    eventually("the P3 to be older than its maximum wait", WAIT, || async {
        let age: f64 = sqlx::query_scalar(
            "SELECT extract(epoch FROM now() - created_at)::float8 FROM security.disputes WHERE id = $1",
        )
        .bind(old_p3)
        .fetch_one(&db.pool)
        .await
        .ok()?;
        (age > MAX_WAIT_P3.as_secs_f64()).then_some(())
    })
    .await;

    let max_wait = format!("{}s", MAX_WAIT_P3.as_secs());
    let _replica =
        Replica::start(&db, &prefix, &["--batch-size", "8", "--short-batch-size", "8", "--max-wait-p3", &max_wait])
            .await;
    all_decided(&db, &[old_p3]).await;
    let p3_at = decided_at(&db, &[old_p3]).await[0].1.expect("P3 decided");
    all_decided(&db, &urgent).await;
    let times = decided_at(&db, &urgent).await;
    let before = decided_before(&times, p3_at);
    // Strict priority alone would decide all 600 first. Aging gives the P3 one of the first
    // turns its group can take; but the groups start pulling in priority order, and until the
    // P3 group's first pull the P0 and P1 groups decide batch after batch: on an idle machine
    // ~100 of them, on a loaded one (a test suite beside a benchmark) over 200. The bound is
    // the part of the P0/P1 traffic that must still be waiting when the P3 is decided.
    assert!(before <= 400, "{before} P0/P1 disputes were decided before the overdue P3");
    assert!(times.len() - before >= 200, "P0/P1 traffic continued after it");
}
