use std::time::Duration;

use time::OffsetDateTime;
use trellis_testkit::{TestDb, nats_prefix};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_runs_on_its_own_at_start_up_only_while_no_run_ever_succeeded() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = nats_prefix();
    seed_users(&db, 200, 10).await;
    let edges = seed_contacts(&db, 200).await;

    let mut a = Replica::start(&db, &prefix, "replica-a", &["--score-schedule-check", "100ms"]).await;
    let all = wait_succeeded(&db, 1, Duration::from_secs(30)).await;
    assert_eq!(all.len(), 1, "{all:#?}");
    let first = &all[0];
    assert_eq!(first.trigger, "startup");
    assert_eq!(first.requested_by, None);
    assert_eq!(first.host.as_deref(), Some("replica-a"));
    assert_eq!((first.users, first.edges), (Some(200), Some(edges)));
    assert_eq!(count(&db, "SELECT count(*) FROM score.user_scores").await, 200);
    a.kill().await;

    // A success exists now: a fresh replica does not run at start-up, only once the success
    // is older than its schedule.
    let schedule = Duration::from_secs(4);
    let _b =
        Replica::start(&db, &prefix, "replica-b", &["--score-schedule", "4s", "--score-schedule-check", "100ms"]).await;
    let ready_at = OffsetDateTime::now_utc();
    let first_done = first.finished_at.unwrap();
    assert!(
        ready_at - first_done < schedule - Duration::from_secs(1),
        "precondition: replica-b was ready while the success was recent ({} after it)",
        ready_at - first_done
    );
    let all = wait_succeeded(&db, 2, Duration::from_secs(30)).await;
    assert_eq!(all.len(), 2, "{all:#?}");
    let second = &all[1];
    assert_eq!(second.trigger, "schedule", "not a start-up run: {second:#?}");
    assert_eq!(second.host.as_deref(), Some("replica-b"));
    let waited = second.started_at.unwrap() - first_done;
    assert!(waited >= schedule, "the scheduled run started only {waited} after the last success");
}

/// Whether any session holds an advisory lock (the run lease) in this database.
async fn lease_held(db: &TestDb) -> bool {
    count(
        db,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .await
        > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_starting_together_make_one_start_up_run() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = nats_prefix();
    seed_users(&db, 30_000, 100).await;
    seed_contacts(&db, 30_000).await;
    let args = ["--score-schedule-check", "100ms"];
    let (_a, _b) = tokio::join!(
        Replica::start(&db, &prefix, "replica-a", &args),
        Replica::start(&db, &prefix, "replica-b", &args)
    );
    wait_succeeded(&db, 1, Duration::from_secs(30)).await;
    // Once the lease is free and nothing is pending, no follow-up can start any more (the
    // holder starts one before it releases the lease, and a success is on record).
    let all = eventually("the lease free and no run pending", Duration::from_secs(30), || async {
        let pending = count(&db, "SELECT count(*) FROM score.scheduler WHERE run_pending").await;
        (pending == 0 && !lease_held(&db).await).then_some(runs(&db).await)
    })
    .await;
    assert_eq!(all.len(), 1, "one start-up run, however many replicas checked during it: {all:#?}");
    assert_eq!((all[0].trigger.as_str(), all[0].status.as_str()), ("startup", "succeeded"));
}
