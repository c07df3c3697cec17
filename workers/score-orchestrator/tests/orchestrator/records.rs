use std::collections::{HashMap, HashSet};

use serde_json::Value;
use trellis_testkit::TestDb;
use uuid::Uuid;

use crate::harness::*;

/// The `events.scores.updated` events of `run` in the outbox: each one's `(user, score)` list.
async fn score_events(db: &TestDb, run: Uuid) -> Vec<Vec<(Uuid, i32)>> {
    let payloads: Vec<Value> = sqlx::query_scalar(
        "SELECT payload FROM ops.outbox WHERE subject = 'events.scores.updated' AND payload->'data'->>'run_id' = $1
         ORDER BY seq",
    )
    .bind(run.to_string())
    .fetch_all(&db.pool)
    .await
    .unwrap();
    payloads
        .iter()
        .map(|p| {
            assert_eq!((&p["type"], &p["version"]), (&"scores.updated".into(), &1.into()), "{p}");
            p["data"]["scores"]
                .as_array()
                .expect("a list of scores")
                .iter()
                .map(|s| (s["user_id"].as_str().unwrap().parse().unwrap(), s["score"].as_i64().unwrap() as i32))
                .collect()
        })
        .collect()
}

/// The events cover exactly `changed` (each once, in chunks of at most 1000) with the stored scores.
fn assert_events_cover(events: &[Vec<(Uuid, i32)>], changed: &HashSet<Uuid>, stored: &HashMap<Uuid, (f64, i32)>) {
    assert_eq!(
        events.len(),
        changed.len().div_ceil(1000),
        "chunks of 1000: {:?}",
        events.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert!(events.iter().all(|e| !e.is_empty() && e.len() <= 1000));
    let mut seen = HashSet::new();
    for &(user, score) in events.iter().flatten() {
        assert!(seen.insert(user), "{user} appears twice");
        assert_eq!(score, stored[&user].1, "the event carries {user}'s new score");
    }
    assert_eq!(&seen, changed, "the events name exactly the users whose score changed");
}

fn run_of(all: &[Run], id: &Value) -> Run {
    let id: Uuid = id.as_str().unwrap().parse().unwrap();
    all.iter().find(|r| r.id == id).cloned().expect("the printed run is recorded")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_records_every_field_and_emits_events_for_exactly_the_changed_scores() {
    let db = TestDb::migrated().await.unwrap();
    let ids = seed_users(&db, 2500, 50).await;
    let edges = seed_contacts(&db, 2500).await;

    let printed = run_once_ok(&db).await;
    let all = runs(&db).await;
    let run = run_of(&all, &printed["run_id"]);
    assert_eq!(run.trigger, "cli");
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(run.requested_by, None);
    assert_eq!(run.host.as_deref(), Some("run-once"));
    assert_eq!(run.algorithm.as_deref(), Some("eigentrust-v1"));
    assert_eq!((run.users, run.edges, run.scores_changed), (Some(2500), Some(edges), Some(2500)));
    assert!(run.iterations.is_some_and(|i| (1..=200).contains(&i)), "{run:#?}");
    assert!(run.residual.is_some_and(|r| (0.0..1e-10).contains(&r)), "converged: {run:#?}");
    for (phase, ms) in [("load", run.load_ms), ("compute", run.compute_ms), ("write", run.write_ms)] {
        assert!(ms.is_some_and(|ms| (0..60_000).contains(&ms)), "{phase} duration: {run:#?}");
    }
    assert!(run.error.is_none());
    assert!(run.started_at.unwrap() <= run.finished_at.unwrap());
    let stored = stored_scores(&db).await;
    let everyone: HashSet<Uuid> = ids.iter().copied().collect();
    assert_events_cover(&score_events(&db, run.id).await, &everyone, &stored);

    // Nothing changed: nothing is rewritten and no event is written.
    let outbox = count(&db, "SELECT count(*) FROM ops.outbox").await;
    let printed = run_once_ok(&db).await;
    assert_eq!(printed["scores_changed"], 0);
    let again = run_of(&runs(&db).await, &printed["run_id"]);
    assert_eq!((again.status.as_str(), again.scores_changed), ("succeeded", Some(0)));
    assert_eq!(count(&db, "SELECT count(*) FROM ops.outbox").await, outbox, "no new events");
    assert_eq!(stored_scores(&db).await, stored);
    assert_eq!(count(&db, &format!("SELECT count(*) FROM score.user_scores WHERE run_id <> '{}'", run.id)).await, 0);

    // An upheld dispute against the most trusted user moves only some scores (no trust value).
    let top = *stored.iter().max_by(|a, b| a.1.0.total_cmp(&b.1.0)).unwrap().0;
    let reporter = ids.iter().copied().find(|&u| u != top).unwrap();
    sqlx::query(
        "INSERT INTO security.disputes (id, reporter_id, target_id, kind, priority, status, description, decided_at)
         VALUES ($1, $2, $3, 'spam', 2, 'upheld', 'test', now())",
    )
    .bind(Uuid::now_v7())
    .bind(reporter)
    .bind(top)
    .execute(&db.pool)
    .await
    .unwrap();
    let printed = run_once_ok(&db).await;
    let third = run_of(&runs(&db).await, &printed["run_id"]);
    let after = stored_scores(&db).await;
    let changed: HashSet<Uuid> = after.iter().filter(|(u, v)| stored[*u] != **v).map(|(u, _)| *u).collect();
    assert!(changed.contains(&top) && changed.len() < 2500, "{} changed", changed.len());
    assert_eq!(third.scores_changed, Some(changed.len() as i64));
    assert_events_cover(&score_events(&db, third.id).await, &changed, &after);
    for (user, (_, _)) in &after {
        let row_run: Uuid = sqlx::query_scalar("SELECT run_id FROM score.user_scores WHERE user_id = $1")
            .bind(user)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(row_run == third.id, changed.contains(user), "{user}: rewritten only if changed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_prints_the_run_summary_as_json_and_exits_zero() {
    let db = TestDb::migrated().await.unwrap();
    seed_users(&db, 40, 4).await;
    let edges = seed_contacts(&db, 40).await;
    let (ok, stdout, stderr) = run_once(&db, "oncall").await;
    assert!(ok, "exit status 0; stderr:\n{stderr}");
    let printed: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("stdout is JSON ({e}):\n{stdout}"));
    let printed = printed.as_array().expect("a list of the runs made");
    assert_eq!(printed.len(), 1, "{printed:?}");
    let summary = &printed[0];
    let all = runs(&db).await;
    assert_eq!(all.len(), 1);
    let run = &all[0];
    assert_eq!(summary["run_id"], run.id.to_string());
    assert_eq!(summary["trigger"], "cli");
    assert_eq!(run.host.as_deref(), Some("oncall"));
    assert_eq!(summary["users"], 40);
    assert_eq!(summary["edges"], edges);
    assert_eq!(summary["scores_changed"], 40);
    assert_eq!(summary["iterations"].as_i64(), run.iterations.map(i64::from));
    let (printed_residual, residual) = (summary["residual"].as_f64().unwrap(), run.residual.unwrap());
    assert!((printed_residual - residual).abs() <= residual * 1e-12, "{printed_residual} vs {residual}");
    for key in ["load_ms", "compute_ms"] {
        assert_eq!(summary[key].as_i64(), if key == "load_ms" { run.load_ms } else { run.compute_ms }, "{key}");
    }
    assert!(summary["write_ms"].as_i64().is_some_and(|ms| ms >= run.write_ms.unwrap()), "{summary}");
    assert_eq!(count(&db, "SELECT count(*) FROM score.user_scores").await, 40);
}
