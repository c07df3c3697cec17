use std::time::Duration;

use trellis_testkit::{TestDb, nats_prefix};

use crate::harness::*;

const USERS: i64 = 100_000;

/// Whether a backend of this database is in a run's write phase (copying the new scores in, or
/// upserting them).
async fn writing(db: &TestDb) -> bool {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active'
           AND (query LIKE 'COPY score_new%' OR query LIKE '%INSERT INTO score.user_scores%')
           AND pid <> pg_backend_pid()",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    n > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_write_leaves_no_partial_scores_and_a_new_run_succeeds() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = nats_prefix();
    seed_users(&db, USERS, 100).await;
    seed_contacts(&db, USERS).await;

    // No run ever succeeded: replica-a starts one at once.
    let mut a = Replica::start(&db, &prefix, "replica-a", &["--score-schedule-check", "200ms"]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    let killed = loop {
        pace.tick().await;
        let all = runs(&db).await;
        assert!(
            all.iter().all(|r| r.status != RunStatus::Succeeded),
            "the run finished before it could be killed: {all:#?}"
        );
        if writing(&db).await {
            a.kill().await;
            break all;
        }
        assert!(tokio::time::Instant::now() < deadline, "replica-a's run never reached its write phase: {all:#?}");
    };
    assert_eq!(killed.len(), 1, "{killed:#?}");
    let killed = &killed[0];
    assert_eq!((killed.status.as_str(), killed.host.as_deref()), ("running", Some("replica-a")));
    assert_eq!(count(&db, "SELECT count(*) FROM score.user_scores").await, 0, "no partial scores are visible");

    // A second replica takes over once PostgreSQL has ended the dead replica's session (and with
    // it the lease): it finds no successful run and runs at start-up.
    let _b = Replica::start(&db, &prefix, "replica-b", &["--score-schedule-check", "200ms"]).await;
    let all = eventually("a successful run by replica-b", Duration::from_secs(45), || async {
        // All or nothing at every moment in between.
        let visible = count(&db, "SELECT count(*) FROM score.user_scores").await;
        assert!(visible == 0 || visible == USERS, "{visible} of {USERS} scores visible");
        let all = runs(&db).await;
        all.iter().any(|r| r.status == RunStatus::Succeeded).then_some(all)
    })
    .await;
    let dead = all.iter().find(|r| r.id == killed.id).expect("the killed run is still recorded");
    assert_eq!(dead.status, RunStatus::Failed, "{dead:#?}");
    assert!(dead.error.as_deref().unwrap_or("").contains("abandoned"), "{dead:#?}");
    assert!(dead.finished_at.is_some());
    let done: Vec<&Run> = all.iter().filter(|r| r.status == RunStatus::Succeeded).collect();
    assert_eq!(done.len(), 1, "{all:#?}");
    assert_eq!(done[0].host.as_deref(), Some("replica-b"));
    assert_eq!(done[0].users, Some(USERS));
    assert!(
        done[0].started_at.unwrap() >= dead.finished_at.unwrap(),
        "the new run started after the dead one was failed"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM score.user_scores").await, USERS);
    let of_run: i64 = sqlx::query_scalar("SELECT count(*) FROM score.user_scores WHERE run_id = $1")
        .bind(done[0].id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(of_run, USERS, "every score comes from the run that succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_keeps_failing_ends_in_the_dlq_with_every_attempt_marked_failed() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start(&db, &prefix, &[]).await;
    // A first run, so that the replica makes no start-up run of its own.
    run_once_ok(&db).await;
    let admin = api.register("root").await;
    make_admin(&db, admin.id).await;
    // From now on every write of scores breaks a constraint: the run fails each time.
    exec(&db, "ALTER TABLE score.user_scores ADD CONSTRAINT test_refuses_everything CHECK (score < 0) NOT VALID").await;
    let _replica = Replica::start(
        &db,
        &prefix,
        "replica-a",
        &["--score-schedule-check", "1h", "--max-deliver", "2", "--retry-min", "50ms", "--retry-max", "100ms"],
    )
    .await;
    api.request_run(&admin).await;

    let topology = trellis_runtime::nats::Topology::new(&prefix).unwrap();
    let client = async_nats::connect(trellis_testkit::nats_url()).await.unwrap();
    let js = trellis_runtime::nats::jetstream(client, Duration::from_secs(5));
    let dead = eventually("the request in the DLQ", Duration::from_secs(30), || async {
        let letters = trellis_runtime::dlq::read(&js, &topology, Some(score_orchestrator::CONSUMER), 1).await.ok()?;
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    assert_eq!(dead.len(), 1, "dead-lettered once");
    assert_eq!(dead[0].kind(), "transient");
    assert_eq!(dead[0].original_subject(), "events.scores.run_requested");
    assert!(dead[0].error().contains("test_refuses_everything"), "{}", dead[0].error());
    let manual: Vec<Run> = runs(&db).await.into_iter().filter(|r| r.trigger == "manual").collect();
    assert_eq!(manual.len(), 2, "one run per delivery: {manual:#?}");
    for run in &manual {
        assert_eq!(run.status, RunStatus::Failed);
        assert!(run.error.as_deref().unwrap_or("").contains("test_refuses_everything"), "{run:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_run_died_with_its_replica_is_served_by_the_next_lease_holder() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = nats_prefix();
    seed_users(&db, USERS, 100).await;
    seed_contacts(&db, USERS).await;
    // A success first: no replica makes a start-up run, and the schedule is not due.
    let first = run_once_ok(&db).await;
    // Its scores gone, the next run rewrites every one: a write phase long enough to be killed in.
    exec(&db, "DELETE FROM score.user_scores").await;
    // A request no message carries any more, as one coalesced into the pending flag while a run
    // went on: only the database remembers it.
    exec(&db, "UPDATE score.scheduler SET run_pending = true, pending_trigger = 'manual', pending_since = now()").await;

    let mut a = Replica::start(&db, &prefix, "replica-a", &["--score-schedule-check", "200ms"]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    let killed = loop {
        pace.tick().await;
        if writing(&db).await {
            a.kill().await;
            let all = runs(&db).await;
            break all.into_iter().find(|r| r.status == RunStatus::Running).expect("the run replica-a was making");
        }
        assert!(tokio::time::Instant::now() < deadline, "replica-a never reached a run's write phase");
    };
    assert_eq!((killed.trigger.as_str(), killed.host.as_deref()), ("manual", Some("replica-a")));

    // Replica-b has no message and no due schedule to go by: the run left `running` is what tells
    // it that a request is owed.
    let _b = Replica::start(&db, &prefix, "replica-b", &["--score-schedule-check", "200ms"]).await;
    let all = eventually("the request served by replica-b", Duration::from_secs(45), || async {
        let all = runs(&db).await;
        all.iter().any(|r| r.status == RunStatus::Succeeded && r.host.as_deref() == Some("replica-b")).then_some(all)
    })
    .await;
    let dead = all.iter().find(|r| r.id == killed.id).expect("the killed run is still recorded");
    assert_eq!(dead.status, RunStatus::Failed, "{dead:#?}");
    let served: Vec<&Run> = all
        .iter()
        .filter(|r| r.status == RunStatus::Succeeded && r.id.to_string() != first["run_id"].as_str().unwrap())
        .collect();
    assert_eq!(served.len(), 1, "one run serves the request: {all:#?}");
    assert_eq!(served[0].trigger, "manual", "the run serves the request the dead one took: {all:#?}");
    assert!(served[0].started_at.unwrap() >= dead.finished_at.unwrap());
    let pending: bool =
        sqlx::query_scalar("SELECT run_pending FROM score.scheduler").fetch_one(&db.pool).await.unwrap();
    assert!(!pending, "nothing is left pending");
}
