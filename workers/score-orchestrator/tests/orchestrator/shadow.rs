//! Shadow: the candidate computes from its own copy of each run request into
//! the shadow tables, its runs are compared with the primary run of the same input, and the
//! promotion gate reads the comparisons.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection as _;

use score_orchestrator::cutover::{self as candidate, ScoreCandidate};
use score_orchestrator::{Config, Orchestrator, ScoreRules};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use trellis_domain::flags::{Executor, Flag};
use trellis_domain::score;
use trellis_runtime::consumer::{RunnerConfig, RunnerContext};
use trellis_runtime::cutover::ShadowCandidate as _;
use trellis_store::cutover::scores::{self as shadow_scores, ShadowRun};
use trellis_testkit::{TestDb, nats_prefix};
use uuid::Uuid;

use crate::harness::*;

const CANDIDATE_CONSUMER: &str = "score-orchestrator-shadow";

/// Waits until `count` candidate runs are settled (compared, missing or not counted).
async fn wait_settled(db: &TestDb, count: usize) -> Vec<ShadowRun> {
    eventually(&format!("{count} settled shadow score runs"), Duration::from_secs(60), || async {
        let runs = shadow_scores::runs(&db.pool).await.expect("reading shadow.score_runs");
        (runs.iter().filter(|r| r.comparison.is_some()).count() >= count).then_some(runs)
    })
    .await
}

/// The comparisons recorded for the score processor: (key, result, count, diffs), in order.
async fn comparisons(db: &TestDb) -> Vec<(String, String, i64, Value)> {
    sqlx::query_as("SELECT key, result, count, diffs FROM shadow.comparisons WHERE processor = 'score' ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// `trellisctl --output json parity score`.
async fn parity(db: &TestDb) -> Value {
    let (ok, stdout, stderr) = run_trellisctl(db, &["--output", "json", "parity", "score", "--limit", "3"]).await;
    assert!(ok, "trellisctl parity score failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("parity prints JSON ({e}): {stdout}"))
}

/// Takes the run lease on `conn`, waiting (up to 30 s) while a replica holds it: a run's holder
/// releases it only after the run is recorded as succeeded.
async fn take_lease(conn: &mut sqlx::PgConnection) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !trellis_store::scores::try_lease(conn).await.unwrap() {
        assert!(tokio::time::Instant::now() < deadline, "the run lease still held elsewhere after 30 s");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `trellisctl score run` (the request goes through the outbox, so both consumers get it).
async fn request_run(db: &TestDb) {
    let (ok, _, stderr) = run_trellisctl(db, &["score", "run"]).await;
    assert!(ok, "trellisctl score run failed: {stderr}");
}

/// The candidate had no external effect: every `scores.updated` event in the outbox is of a
/// primary run, no candidate run is in `score.runs`, the scheduler's flag and the stored scores
/// are the primary's (the production rules' over the current graph, bit for bit).
async fn assert_no_external_effect(db: &TestDb, shadow: &[ShadowRun]) {
    let primary: HashSet<Uuid> = runs(db).await.iter().map(|r| r.id).collect();
    for run in shadow {
        assert!(!primary.contains(&run.id), "candidate run {} is not in score.runs", run.id);
    }
    let event_runs: Vec<Uuid> = sqlx::query_scalar(
        "SELECT DISTINCT (payload->'data'->>'run_id')::uuid FROM ops.outbox WHERE payload->>'type' = 'scores.updated'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(!event_runs.is_empty(), "the primary's runs published their scores");
    for run in event_runs {
        assert!(primary.contains(&run), "scores.updated of run {run}, which is not a primary run");
    }
    let algorithms: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT algorithm FROM score.runs").fetch_all(&db.pool).await.unwrap();
    assert_eq!(algorithms, [score::ALGORITHM_VERSION]);
    let expected = expected_from_db(db).await;
    let stored = stored_scores(db).await;
    assert_eq!(stored.len(), expected.users.len());
    for user in &expected.users {
        let (trust, score) = expected.of(*user);
        assert_eq!(stored[user].1, score, "stored score of {user} is the production rules'");
        assert_eq!(stored[user].0.to_bits(), trust.to_bits(), "stored trust of {user} is the production rules'");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identical_candidate_matches_every_user_and_the_gate_promotes_the_worker() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = nats_prefix();
    seed_users(&db, 40, 4).await;
    seed_contacts(&db, 40).await;
    // The monolith is the primary; the worker binary, the candidate, runs the production rules.
    set_score_executor(&db, Executor::Monolith).await;
    set_score_executor(&db, Executor::Shadow).await;
    let _api = Api::start(&db, &prefix, &["--flag-poll", "200ms"]).await;
    let worker =
        Replica::start(&db, &prefix, "candidate", &["--flag-poll", "200ms", "--score-shadow-wait", "5s"]).await;
    wait_for_consumer(&prefix, CANDIDATE_CONSUMER).await;
    // The primary's start-up run: no request, so the candidate does not run.
    wait_succeeded(&db, 1, Duration::from_secs(30)).await;

    request_run(&db).await;
    let shadow = wait_settled(&db, 1).await;
    let primary = wait_succeeded(&db, 2, Duration::from_secs(30)).await;
    let first = &shadow[0];
    assert_eq!(
        (first.comparison.as_deref(), first.users, first.host.as_str()),
        (Some("compared"), Some(40), "candidate")
    );
    assert_eq!(first.algorithm, score::ALGORITHM_VERSION);
    let compared_with = primary.iter().find(|r| Some(r.id) == first.primary_run_id).expect("a primary run");
    assert_eq!(compared_with.input_digest, first.input_digest, "compared with the primary run of the same input");
    assert!(primary.iter().all(|r| r.input_digest == first.input_digest), "nothing changed: one input");
    assert_eq!(first.max_trust_difference, Some(0.0), "the identical candidate's trust is the primary's, bit for bit");
    let recorded = comparisons(&db).await;
    assert_eq!(recorded.len(), 1, "all matched users are one comparison: {recorded:?}");
    assert_eq!((recorded[0].1.as_str(), recorded[0].2), ("matched", 40));
    assert_eq!(recorded[0].0, format!("candidate run {} / primary run {}", first.id, compared_with.id));
    let left: i64 = count(&db, "SELECT count(*) FROM shadow.scores").await;
    assert_eq!(left, 0, "a compared run's scores are dropped: its comparisons are the record");

    // The candidate needs neither the primary's lease nor its pending-run flag: with the lease
    // held elsewhere, the primary only records the request as pending, and the candidate runs.
    let mut lease = sqlx::PgConnection::connect(&db.url).await.unwrap();
    take_lease(&mut lease).await;
    exec(&db, &format!("UPDATE identity.users SET verified = NOT verified WHERE id = '{}'", seeded_id(3))).await;
    request_run(&db).await;
    let shadow = eventually("the candidate's second run", Duration::from_secs(30), || async {
        let runs = shadow_scores::runs(&db.pool).await.unwrap();
        (runs.len() == 2 && runs[1].status == "succeeded").then_some(runs)
    })
    .await;
    assert_ne!(shadow[1].input_digest, shadow[0].input_digest, "a verified flag is part of the input");
    eventually("the primary to record the request as pending", Duration::from_secs(30), || async {
        (count(&db, "SELECT count(*) FROM score.scheduler WHERE run_pending").await == 1).then_some(())
    })
    .await;
    // No primary run read this input: after the wait, the candidate run is missing, and the
    // primary's pending request is still there.
    let shadow = wait_settled(&db, 2).await;
    assert_eq!(shadow[1].comparison.as_deref(), Some("missing"));
    let recorded = comparisons(&db).await;
    let missing = recorded.last().unwrap();
    assert_eq!((missing.1.as_str(), missing.2), ("missing", 1));
    assert_eq!(missing.0, format!("candidate run {}", shadow[1].id));
    let why = missing.3[0]["candidate"].as_str().unwrap();
    assert!(why.starts_with("no primary run on the same input"), "{why}");
    assert_eq!(
        count(&db, "SELECT count(*) FROM score.scheduler WHERE run_pending").await,
        1,
        "the flag is the primary's"
    );
    assert_eq!(runs(&db).await.len(), 2, "no primary run while the lease was held");
    trellis_store::scores::release_lease(&mut lease).await.unwrap();
    drop(lease);

    // The next request: the primary serves it (and the pending one) on the new input, and so
    // does the candidate.
    request_run(&db).await;
    let shadow = wait_settled(&db, 3).await;
    assert_eq!(shadow[2].comparison.as_deref(), Some("compared"), "{:?}", shadow[2]);
    assert_eq!(shadow[2].input_digest, shadow[1].input_digest);

    let report = parity(&db).await;
    assert_eq!(
        (report["matched"].as_i64(), report["mismatched"].as_i64(), report["missing"].as_i64()),
        (Some(80), Some(0), Some(1))
    );
    assert_eq!(
        (report["period"]["primary"].as_str(), report["period"]["candidate"].as_str()),
        (Some("monolith"), Some("worker"))
    );
    let metrics = worker.metrics().await;
    assert!(
        metrics.lines().any(|l| l == r#"trellis_shadow_comparisons_total{processor="score",result="matched"} 80"#),
        "the worker counts what it compared:\n{metrics}"
    );
    assert_no_external_effect(&db, &shadow).await;

    // The gate counts exactly these comparisons: 81 required is refused, 80 passes.
    let set = ["flags", "set", "score.executor", "worker", "--reason", "shadow parity holds"];
    let (ok, _, stderr) = run_trellisctl(&db, &[&set[..], &["--promotion-min-comparisons", "81"]].concat()).await;
    assert!(!ok, "promotion with too few comparisons must be refused");
    assert!(stderr.contains("80 comparisons made, 81 required"), "{stderr}");
    let (ok, stdout, stderr) = run_trellisctl(&db, &[&set[..], &["--promotion-min-comparisons", "80"]].concat()).await;
    assert!(ok, "the identical candidate is promoted: {stdout}{stderr}");
    let flag = trellis_store::cutover::flags::get(&db.pool, Flag::ScoreExecutor).await.unwrap();
    assert_eq!(flag.value, Executor::Worker);
    let audit = trellis_store::cutover::flags::audit(&db.pool, Some(Flag::ScoreExecutor), 1).await.unwrap();
    assert!(!audit[0].forced, "promoted through the gate, not forced");
}

/// Scores upside down: the deliberately different rule of the test's candidate.
fn inverted_scores(trust: &[f64], upheld: &[u32]) -> Vec<i32> {
    score::scores(trust, upheld).into_iter().map(|s| score::MAX_SCORE - s).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_with_another_rule_mismatches_and_the_gate_refuses_until_forced() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = nats_prefix();
    seed_users(&db, 150, 5).await;
    seed_contacts(&db, 150).await;
    set_score_executor(&db, Executor::Monolith).await;
    set_score_executor(&db, Executor::Shadow).await;
    // The primary: the monolith. The candidate, in this process on the worker's side of the flag,
    // runs a rule only this test has.
    let _api = Api::start(&db, &prefix, &["--flag-poll", "200ms"]).await;
    let rules = ScoreRules { algorithm: "inverted-for-test", trust: score::compute_trust, scores: inverted_scores };
    let _candidate = InProcessCandidate::start(&db, &prefix, rules, true).await;
    wait_for_consumer(&prefix, CANDIDATE_CONSUMER).await;
    wait_succeeded(&db, 1, Duration::from_secs(30)).await;

    request_run(&db).await;
    let shadow = wait_settled(&db, 1).await;
    assert_eq!(
        (shadow[0].comparison.as_deref(), shadow[0].algorithm.as_str()),
        (Some("compared"), "inverted-for-test")
    );
    // The inverted rule agrees only where a score is its own mirror image (500).
    let expected = expected_from_db(&db).await;
    let agreeing = expected.scores.iter().filter(|&&s| s == score::MAX_SCORE - s).count() as i64;
    let differing = 150 - agreeing;
    assert!(differing > candidate::MISMATCH_ROWS as i64, "more mismatches than are listed one by one: {differing}");
    let recorded = comparisons(&db).await;
    let of = |result: &str| recorded.iter().filter(|c| c.1 == result).collect::<Vec<_>>();
    let mismatched = of("mismatched");
    assert_eq!(mismatched.iter().map(|c| c.2).sum::<i64>(), differing);
    assert_eq!(mismatched.len(), candidate::MISMATCH_ROWS + 1, "one row per listed user, then the rest folded");
    let folded = mismatched.last().unwrap();
    assert_eq!(folded.2, differing - candidate::MISMATCH_ROWS as i64);
    assert_eq!(of("matched").iter().map(|c| c.2).sum::<i64>(), agreeing);
    // The first mismatch, field by field: the score differs, the trust (same rule) does not.
    let (key, _, _, diffs) = mismatched[0];
    let user: Uuid = key.rsplit(" / user ").next().unwrap().parse().unwrap();
    let (_, expected_score) = expected.of(user);
    assert_eq!(diffs.as_array().unwrap().len(), 1, "{diffs}");
    assert_eq!(diffs[0]["field"], "score");
    assert_eq!(diffs[0]["primary"].as_i64(), Some(i64::from(expected_score)));
    assert_eq!(diffs[0]["candidate"].as_i64(), Some(i64::from(score::MAX_SCORE - expected_score)));

    let report = parity(&db).await;
    assert_eq!(report["mismatched"].as_i64(), Some(differing));
    assert_eq!(report["first_differences"][0]["key"].as_str(), Some(key.as_str()));
    assert_eq!(report["first_differences"][0]["diffs"][0]["field"], "score");
    let (ok, table, _) = run_trellisctl(&db, &["parity", "score"]).await;
    assert!(ok);
    let line = format!("score: primary {expected_score}, candidate {}", score::MAX_SCORE - expected_score);
    assert!(table.contains(&line), "the table shows the first mismatch field by field:\n{table}");
    assert_no_external_effect(&db, &shadow).await;

    // The gate refuses the worker and says why; --force promotes it, recorded as forced.
    let set = ["flags", "set", "score.executor", "worker", "--reason", "try it", "--promotion-min-comparisons", "10"];
    let (ok, _, stderr) = run_trellisctl(&db, &set).await;
    assert!(!ok, "a mismatching candidate must not be promoted");
    assert!(stderr.contains("mismatch rate") && stderr.contains("--force"), "{stderr}");
    assert_eq!(
        trellis_store::cutover::flags::get(&db.pool, Flag::ScoreExecutor).await.unwrap().value,
        Executor::Shadow
    );
    let (ok, stdout, stderr) = run_trellisctl(&db, &[&set[..], &["--force"]].concat()).await;
    assert!(ok, "--force promotes: {stdout}{stderr}");
    assert_eq!(
        trellis_store::cutover::flags::get(&db.pool, Flag::ScoreExecutor).await.unwrap().value,
        Executor::Worker
    );
    let audit = trellis_store::cutover::flags::audit(&db.pool, Some(Flag::ScoreExecutor), 1).await.unwrap();
    assert!(audit[0].forced, "the promotion is recorded as forced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monolith_is_the_candidate_while_the_worker_is_primary() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = nats_prefix();
    seed_users(&db, 30, 3).await;
    seed_contacts(&db, 30).await;
    // The default executor is the worker: it stays the primary, and the API runs the candidate.
    set_score_executor(&db, Executor::Shadow).await;
    let _worker = Replica::start(&db, &prefix, "primary", &["--flag-poll", "200ms"]).await;
    let _api = Api::start(&db, &prefix, &["--flag-poll", "200ms"]).await;
    wait_for_consumer(&prefix, CANDIDATE_CONSUMER).await;
    wait_succeeded(&db, 1, Duration::from_secs(30)).await;

    request_run(&db).await;
    let shadow = wait_settled(&db, 1).await;
    let primary = wait_succeeded(&db, 2, Duration::from_secs(30)).await;
    assert_eq!(shadow[0].comparison.as_deref(), Some("compared"));
    assert!(primary.iter().all(|r| r.host.as_deref() == Some("primary")), "the worker made every primary run");
    assert_ne!(shadow[0].host, "primary", "the API made the candidate run");
    let report = parity(&db).await;
    assert_eq!((report["matched"].as_i64(), report["mismatched"].as_i64()), (Some(30), Some(0)));
    assert_eq!(
        (report["period"]["primary"].as_str(), report["period"]["candidate"].as_str()),
        (Some("worker"), Some("monolith"))
    );
    assert_no_external_effect(&db, &shadow).await;
}

/// A candidate run in this process on the worker's side of the flag (as the worker binary runs
/// it), with rules of the test's choosing; stopped when dropped.
struct InProcessCandidate {
    candidate: ScoreCandidate,
    _stop: tokio_util::sync::DropGuard,
}

impl InProcessCandidate {
    /// Settles what can be settled of the shadow period in progress; how many runs were.
    async fn settle_pending(&self, db: &TestDb) -> usize {
        let period = trellis_store::cutover::latest_period(&db.pool, Flag::ScoreExecutor).await.unwrap();
        self.candidate.settle_pending(period.expect("a shadow period").started_at).await.unwrap().0
    }

    /// Starts the candidate's consumer group while its gate is open, and its comparer beside it
    /// when `comparer` (otherwise the test settles runs with `settle_pending`).
    async fn start(db: &TestDb, prefix: &str, rules: ScoreRules, comparer: bool) -> Self {
        let config = Config {
            database_url: db.url.parse().unwrap(),
            schedule: Duration::from_secs(86_400),
            schedule_check: Duration::from_secs(60),
            run_timeout: Duration::from_secs(60),
            threads: 2,
            host: "test-candidate".into(),
            shadow_wait: Duration::from_secs(30),
        };
        let orchestrator = Orchestrator::new(db.pool.clone(), config).unwrap();
        let candidate = ScoreCandidate::new(&orchestrator, rules);
        let client = async_nats::connect(trellis_testkit::nats_url()).await.unwrap();
        let ctx = RunnerContext {
            js: trellis_runtime::nats::jetstream(client, Duration::from_secs(5)),
            topology: trellis_runtime::nats::Topology::new(prefix).unwrap(),
            host: "test-candidate".into(),
            version: "test".into(),
        };
        let stop = CancellationToken::new();
        let flags = trellis_runtime::cutover::flags::Flags::watch(
            db.pool.clone(),
            Duration::from_millis(200),
            &tokio_util::task::TaskTracker::new(),
            stop.clone(),
        );
        let gate = flags.candidate_gate(Flag::ScoreExecutor, Executor::Worker);
        if comparer {
            let shadow = Arc::new(candidate.clone());
            let pool = db.pool.clone();
            tokio::spawn(trellis_runtime::cutover::run_shadow(
                shadow,
                gate,
                pool,
                ctx,
                RunnerConfig::default(),
                stop.clone(),
            ));
        } else {
            let make = {
                let candidate = candidate.clone();
                move || candidate.group(ctx.clone(), RunnerConfig::default())
            };
            tokio::spawn(trellis_runtime::cutover::run_candidate(make, gate, stop.clone()));
        }
        Self { candidate, _stop: stop.drop_guard() }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_primary_run_is_compared_only_on_the_users_it_still_proves() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = nats_prefix();
    seed_users(&db, 40, 4).await;
    seed_contacts(&db, 40).await;
    set_score_executor(&db, Executor::Monolith).await;
    set_score_executor(&db, Executor::Shadow).await;
    let _api = Api::start(&db, &prefix, &["--flag-poll", "200ms"]).await;
    let shadow = InProcessCandidate::start(&db, &prefix, ScoreRules::PRODUCTION, false).await;
    wait_for_consumer(&prefix, CANDIDATE_CONSUMER).await;
    wait_succeeded(&db, 1, Duration::from_secs(30)).await;

    request_run(&db).await;
    let candidate_ran = |n: usize| {
        let db = &db;
        async move {
            eventually(&format!("{n} candidate runs"), Duration::from_secs(30), || async {
                let runs = shadow_scores::runs(&db.pool).await.unwrap();
                (runs.len() == n && runs.iter().all(|r| r.status == "succeeded")).then_some(runs)
            })
            .await
        }
    };
    candidate_ran(1).await;
    let before = wait_succeeded(&db, 2, Duration::from_secs(30)).await;

    // Before anything is compared, a dispute upheld against a well-ranked user moves them down:
    // the next primary run (another input) rewrites the scores of everyone they pass, and only
    // theirs.
    let expected = expected_from_db(&db).await;
    let mut ranked: Vec<(i32, Uuid)> = expected.users.iter().map(|u| (expected.of(*u).1, *u)).collect();
    ranked.sort();
    let target = ranked[ranked.len() * 3 / 4].1;
    let reporter = ranked[0].1;
    sqlx::query(
        "INSERT INTO security.disputes (id, reporter_id, target_id, kind, priority, status, description, decided_at)
         VALUES ($1, $2, $3, 'spam', 2, 'upheld', 'test', now())",
    )
    .bind(Uuid::now_v7())
    .bind(reporter)
    .bind(target)
    .execute(&db.pool)
    .await
    .unwrap();
    request_run(&db).await;
    let after = wait_succeeded(&db, 3, Duration::from_secs(30)).await;
    let later = after.iter().find(|r| !before.iter().any(|b| b.id == r.id)).unwrap();
    assert_ne!(later.input_digest, before[1].input_digest, "an upheld dispute is part of the input");
    candidate_ran(2).await;
    let rewritten = count(&db, &format!("SELECT count(*) FROM score.user_scores WHERE run_id = '{}'", later.id)).await;
    assert!(rewritten > 0 && rewritten < 40, "the later run rewrote some scores, not all: {rewritten}");

    assert_eq!(shadow.settle_pending(&db).await, 2);
    let runs = shadow_scores::runs(&db.pool).await.unwrap();
    assert_eq!(runs[0].primary_run_id, Some(before[1].id), "the latest primary run of the same input");
    assert_eq!(runs[1].primary_run_id, Some(later.id));
    let recorded = comparisons(&db).await;
    let of_run = |run: &ShadowRun, result: &str| -> i64 {
        recorded
            .iter()
            .filter(|c| c.0.starts_with(&format!("candidate run {}", run.id)) && c.1 == result)
            .map(|c| c.2)
            .sum()
    };
    assert_eq!(of_run(&runs[0], "matched"), 40 - rewritten, "the users whose stored score is still the earlier run's");
    assert_eq!(of_run(&runs[0], "mismatched"), 0);
    assert_eq!(of_run(&runs[0], "missing"), rewritten, "the rest cannot be proven");
    let superseded = recorded.iter().find(|c| c.1 == "missing").unwrap();
    assert!(superseded.0.ends_with("/ users rescored by a later primary run"), "{}", superseded.0);
    assert!(superseded.3[0]["candidate"].as_str().unwrap().contains("later primary run"), "{}", superseded.3);
    assert_eq!((of_run(&runs[1], "matched"), of_run(&runs[1], "missing")), (40, 0), "the later input: all matched");
    assert_eq!(shadow.settle_pending(&db).await, 0, "each run is compared once");
    assert_eq!(comparisons(&db).await.len(), recorded.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_reads_the_graph_when_the_primary_starts_the_run_that_serves_the_request() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = nats_prefix();
    seed_users(&db, 30, 3).await;
    seed_contacts(&db, 30).await;
    set_score_executor(&db, Executor::Monolith).await;
    set_score_executor(&db, Executor::Shadow).await;
    // The schedule makes the start-up run, then looks again only in an hour: no schedule check
    // (which also serves a request left pending) runs between the steps below.
    let _api = Api::start(&db, &prefix, &["--flag-poll", "200ms", "--score-schedule-check", "1h"]).await;
    let _candidate = InProcessCandidate::start(&db, &prefix, ScoreRules::PRODUCTION, true).await;
    wait_for_consumer(&prefix, CANDIDATE_CONSUMER).await;
    let startup = wait_succeeded(&db, 1, Duration::from_secs(30)).await;

    // A run is in progress elsewhere (the test holds the lease): the request waits for the
    // follow-up run, and the graph changes meanwhile.
    let mut lease = sqlx::PgConnection::connect(&db.url).await.unwrap();
    take_lease(&mut lease).await;
    request_run(&db).await;
    // The primary's handler records the request as pending and only then tries the lease, so
    // the lease is held until the request is handled (acknowledged). Released earlier, it lets
    // that handler run at once, before the second request exists; the second request then
    // makes another primary run on the same graph, which the candidate's run is compared with
    // (or which a second candidate run waits for).
    handled_all(&db, &prefix, score_orchestrator::CONSUMER).await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM score.scheduler WHERE run_pending").await,
        1,
        "the primary recorded the request as pending"
    );
    exec(&db, &format!("UPDATE identity.users SET verified = NOT verified WHERE id = '{}'", seeded_id(2))).await;
    trellis_store::scores::release_lease(&mut lease).await.unwrap();
    drop(lease);
    // The next request finds the lease free: its run serves both requests, on the new graph.
    request_run(&db).await;
    let primary = wait_succeeded(&db, 2, Duration::from_secs(30)).await;
    assert_ne!(primary[1].input_digest, startup[0].input_digest);

    // The candidate waited for that run to start, so it read the same graph (a candidate that
    // read at once would have read the old one), and that one run served both requests.
    wait_settled(&db, 1).await;
    handled_all(&db, &prefix, CANDIDATE_CONSUMER).await;
    let shadow = shadow_scores::runs(&db.pool).await.unwrap();
    assert_eq!(shadow.len(), 1, "one candidate run served both requests: {shadow:?}");
    assert_eq!(shadow[0].input_digest, primary[1].input_digest, "the candidate read the primary's input");
    assert_eq!((shadow[0].comparison.as_deref(), shadow[0].primary_run_id), (Some("compared"), Some(primary[1].id)));
    let report = parity(&db).await;
    assert_eq!(
        (report["matched"].as_i64(), report["mismatched"].as_i64(), report["missing"].as_i64()),
        (Some(30), Some(0), Some(0))
    );
}
