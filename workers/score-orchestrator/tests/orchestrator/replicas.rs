use std::time::Duration;

use trellis_testkit::{TestDb, nats_prefix};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_run_at_once_and_simultaneous_requests_coalesce() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = nats_prefix();
    seed_users(&db, 30_000, 100).await;
    seed_contacts(&db, 30_000).await;
    // A first success, so that neither replica runs at start-up.
    let once = run_once_ok(&db).await;
    assert_eq!(once["users"], 30_000);

    let api = Api::start(&db, &prefix, &[]).await;
    let admin = api.register("root").await;
    make_admin(&db, admin.id).await;
    let a = Replica::start(&db, &prefix, "replica-a", &["--score-schedule-check", "200ms"]).await;
    let b = Replica::start(&db, &prefix, "replica-b", &["--score-schedule-check", "200ms"]).await;

    const REQUESTS: usize = 5;
    futures::future::join_all((0..REQUESTS).map(|_| api.request_run(&admin))).await;
    // Every request is handled (acknowledged by one replica or the other) …
    eventually("every run request handled", Duration::from_secs(45), || async {
        (handled(&a.metrics().await) + handled(&b.metrics().await) >= REQUESTS as f64).then_some(())
    })
    .await;
    // … and nothing is left to run.
    let all = eventually("no run in progress or pending", Duration::from_secs(45), || async {
        let all = runs(&db).await;
        let pending = count(&db, "SELECT count(*) FROM score.scheduler WHERE run_pending").await;
        (pending == 0 && all.iter().all(|r| r.status != RunStatus::Running)).then_some(all)
    })
    .await;

    let manual: Vec<&Run> = all.iter().filter(|r| r.trigger == "manual").collect();
    assert!(all.iter().all(|r| r.status == RunStatus::Succeeded), "{all:#?}");
    assert!(
        (1..=2).contains(&manual.len()),
        "{REQUESTS} simultaneous requests make one run and at most one follow-up, not {}: {all:#?}",
        manual.len()
    );
    assert_eq!(all.len(), 1 + manual.len(), "only the first --run-once and the manual runs: {all:#?}");
    assert!(all.iter().all(|r| r.requested_by.is_none() || r.requested_by == Some(admin.id)));
    // One at a time: no two runs' [started_at, finished_at] intervals overlap.
    for (i, x) in all.iter().enumerate() {
        for y in &all[i + 1..] {
            let (xs, xf) = (x.started_at.unwrap(), x.finished_at.unwrap());
            let (ys, yf) = (y.started_at.unwrap(), y.finished_at.unwrap());
            assert!(xf <= ys || yf <= xs, "runs overlap:\n{x:#?}\n{y:#?}");
        }
    }
    assert_eq!(count(&db, "SELECT count(*) FROM score.user_scores").await, 30_001);
}
