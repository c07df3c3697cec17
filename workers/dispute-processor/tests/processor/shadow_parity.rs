//! Shadow parity of the dispute processor with real processes: `trellis-api`
//! in-process, the `dispute-processor` binary as a child, `trellisctl` as a child. An identical
//! candidate matches the primary on every filing and may be promoted; a candidate with
//! different rules is caught, the promotion gate refuses it (unless forced), and it has no
//! effect whatever it decides. Both sides run the candidate: the worker while the monolith is
//! the primary, and the monolith while the worker is.

use std::path::PathBuf;
use std::time::Duration;

use dispute_processor::{DisputeCandidate, JudgingRules, ProcessorArgs};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use trellis_domain::adjudication::{self, Facts, Judgement, Rule};
use trellis_domain::disputes::DisputeStatus;
use trellis_domain::flags::{Executor, Flag};
use trellis_runtime::consumer::{RunnerConfig, RunnerContext};
use trellis_runtime::nats::Topology;
use trellis_testkit::TestDb;
use uuid::Uuid;

use crate::harness::*;

async fn set_flag(db: &TestDb, value: Executor) {
    let change = trellis_store::cutover::flags::Change {
        flag: Flag::DisputeExecutor,
        value,
        actor: "shadow-tests",
        reason: "test set-up",
        forced: false,
    };
    trellis_store::cutover::flags::set(&db.pool, &change).await.expect("setting dispute.executor");
}

/// `trellisctl`, built next to this package's binary by the workspace build.
fn trellisctl() -> PathBuf {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_dispute-processor")).with_file_name("trellisctl");
    assert!(path.exists(), "{} is missing: build the workspace (cargo build --workspace --bins)", path.display());
    path
}

struct Ctl {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn ctl(db: &TestDb, args: &[&str]) -> Ctl {
    let out = tokio::process::Command::new(trellisctl())
        .args(["--database-url", &db.url])
        .args(args)
        .env("TRELLIS_ACTOR", "shadow-tests")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("running trellisctl");
    Ctl {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Waits until the candidate's consumer exists (the candidate receives only what is published
/// after) and returns its filter subject.
async fn candidate_consumer(prefix: &str) -> String {
    let client = async_nats::connect(trellis_testkit::nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    eventually("the candidate's consumer", WAIT, || {
        let js = js.clone();
        async move {
            let stream = js.get_stream(format!("{prefix}_EVENTS")).await.ok()?;
            let info = stream.consumer_info(format!("{prefix}_dispute-processor-shadow")).await.ok()?;
            Some(info.config.filter_subject.clone())
        }
    })
    .await
}

/// Waits until the comparisons recorded for the dispute processor add up to `n`.
async fn compared(db: &TestDb, n: i64) {
    eventually(&format!("{n} comparisons"), WAIT, || async {
        let made: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(count), 0)::bigint FROM shadow.comparisons WHERE processor = 'dispute'",
        )
        .fetch_one(&db.pool)
        .await
        .ok()?;
        assert!(made <= n, "more comparisons than filings: {made} > {n}");
        (made == n).then_some(())
    })
    .await;
}

/// Filings that exercise what "the same input" must survive: an impersonation group whose third
/// filing is corroborated (R4) and upholds the two before it, suspending the target; a filing
/// against the suspended target (R2); a repeat (R1); and a burst against one target filed at
/// once, which the primary decides in shared batches. Returns every filing.
async fn file_the_scenario(api: &Api, db: &TestDb) -> Vec<Uuid> {
    let t = tag();
    let mut credible = Vec::new();
    for i in 0..4 {
        let r = api.register(&format!("c{i}{t}")).await;
        set_score(db, r.id, 500).await;
        credible.push(r);
    }
    let plain = api.register(&format!("p{t}")).await;
    let (impostor, spammer, bullied) = (
        api.register(&format!("imp{t}")).await,
        api.register(&format!("spm{t}")).await,
        api.register(&format!("bul{t}")).await,
    );
    let mut ids = Vec::new();
    for r in &credible[..3] {
        let id = api.file(r, impostor.id, "impersonation").await;
        api.decided(r, id).await;
        ids.push(id);
    }
    assert_eq!(rule_of(db, ids[0]).await, "R4", "upheld with the third");
    let moot = api.file(&plain, impostor.id, "harassment").await;
    api.decided(&plain, moot).await;
    assert_eq!(rule_of(db, moot).await, "R2");
    ids.push(moot);
    for _ in 0..2 {
        let id = api.file(&plain, spammer.id, "spam").await;
        api.decided(&plain, id).await;
        ids.push(id);
    }
    let burst = credible.iter().chain([&plain]).map(|r| api.file(r, bullied.id, "harassment"));
    ids.extend(futures::future::join_all(burst).await);
    all_decided(db, &ids).await;
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn an_identical_candidate_in_the_worker_matches_the_monolith_and_may_be_promoted() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    set_flag(&db, Executor::Monolith).await;
    let api = Api::start(&db, &prefix).await;
    let worker = Replica::start(&db, &prefix, &["--dispute-shadow-compare-every", "200ms"]).await;
    set_flag(&db, Executor::Shadow).await;
    assert_eq!(candidate_consumer(&prefix).await, format!("{prefix}.events.disputes.filed.>"), "one wildcard filter");

    let ids = file_the_scenario(&api, &db).await;
    let n = ids.len() as i64;
    compared(&db, n).await;

    let report = ctl(&db, &["--output", "json", "parity", "dispute"]).await;
    assert!(report.ok, "{}", report.stderr);
    let report: Value = serde_json::from_str(&report.stdout).expect("a JSON report");
    assert_eq!(
        (&report["matched"], &report["mismatched"], &report["missing"]),
        (&Value::from(n), &Value::from(0), &Value::from(0)),
        "{report:#}"
    );
    assert_eq!(report["period"]["candidate"], "worker");
    let text = eventually("the worker to count its comparisons", WAIT, || async {
        let text = worker.metrics().await;
        let matched = r#"trellis_shadow_comparisons_total{processor="dispute",result="matched"}"#;
        (series(&text, matched) == Some(n as f64)).then_some(text)
    })
    .await;
    let mismatched = r#"trellis_shadow_comparisons_total{processor="dispute",result="mismatched"}"#;
    assert_eq!(series(&text, mismatched), Some(0.0));
    let decided: i64 = sqlx::query_scalar("SELECT count(*) FROM shadow.dispute_decisions WHERE dispute_id = ANY($1)")
        .bind(&ids)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(decided, n, "the candidate's decisions are recorded");

    let min = n.to_string();
    let promoted = ctl(
        &db,
        &[
            "flags",
            "set",
            "dispute.executor",
            "worker",
            "--reason",
            "parity clean",
            "--promotion-min-comparisons",
            &min,
        ],
    )
    .await;
    assert!(promoted.ok, "the gate lets an identical candidate through: {}{}", promoted.stdout, promoted.stderr);
    assert!(promoted.stdout.contains("dispute.executor: shadow → worker"), "{}", promoted.stdout);
    let forced: bool = sqlx::query_scalar(
        "SELECT forced FROM ops.feature_flag_audit WHERE name = 'dispute.executor' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(!forced);
}

/// Upholds what R5 would hand to a moderator: a rule set that differs from the primary's.
fn upholds_reviews(f: &Facts) -> Judgement {
    let mut judgement = adjudication::adjudicate(f);
    if judgement.rule == Rule::R5Otherwise {
        judgement.status = DisputeStatus::Upheld;
    }
    judgement
}

#[tokio::test(flavor = "multi_thread")]
async fn a_candidate_with_other_rules_is_caught_refused_unless_forced_and_has_no_effect() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    set_flag(&db, Executor::Monolith).await;
    let api = Api::start(&db, &prefix).await;

    // The worker side's candidate, run here with rules of the test's own.
    let stop = CancellationToken::new();
    let flags = trellis_runtime::cutover::flags::Flags::watch(
        db.pool.clone(),
        Duration::from_millis(200),
        &tokio_util::task::TaskTracker::new(),
        stop.clone(),
    );
    let gate = flags.candidate_gate(Flag::DisputeExecutor, Executor::Worker);
    let client = async_nats::connect(trellis_testkit::nats_url()).await.unwrap();
    let ctx = RunnerContext {
        js: trellis_runtime::nats::jetstream(client, Duration::from_secs(5)),
        topology: Topology::new(&prefix).unwrap(),
        host: "shadow-tests".into(),
        version: "test".into(),
    };
    let args = ProcessorArgs { dispute_shadow_compare_every: Duration::from_millis(200), ..ProcessorArgs::default() };
    let candidate = DisputeCandidate::new(
        db.pool.clone(),
        &args,
        JudgingRules { version: "test-upholds-reviews", judge: upholds_reviews },
    );
    let shadow = tokio::spawn(trellis_runtime::cutover::run_shadow(
        std::sync::Arc::new(candidate),
        gate,
        db.pool.clone(),
        ctx,
        RunnerConfig::default(),
        stop.clone(),
    ));
    set_flag(&db, Executor::Shadow).await;
    candidate_consumer(&prefix).await;

    // Impersonation and harassment go to review (R5): the candidate upholds them, which would
    // suspend their targets. The repeat is dismissed (R1) by both.
    let t = tag();
    let reporter = api.register(&format!("rep{t}")).await;
    let mut targets = Vec::new();
    let mut ids = Vec::new();
    for (i, kind) in ["impersonation", "harassment", "spam", "spam"].into_iter().enumerate() {
        if i < 3 {
            targets.push(api.register(&format!("t{i}{t}")).await);
        }
        let id = api.file(&reporter, targets[i.min(2)].id, kind).await;
        api.decided(&reporter, id).await;
        ids.push(id);
    }
    compared(&db, 4).await;

    let report = ctl(&db, &["parity", "dispute"]).await;
    assert!(report.ok, "{}", report.stderr);
    assert!(report.stdout.contains("matched     1\n"), "{}", report.stdout);
    assert!(report.stdout.contains("mismatched  3 (mismatch rate 75.0000%)"), "{}", report.stdout);
    assert!(report.stdout.contains(&format!("mismatched {}", ids[0])), "the first difference: {}", report.stdout);
    assert!(report.stdout.contains(r#"status: primary "needs_review", candidate "upheld""#), "{}", report.stdout);

    let set = ["flags", "set", "dispute.executor", "worker", "--reason", "promote", "--promotion-min-comparisons", "1"];
    let refused = ctl(&db, &set).await;
    assert!(!refused.ok, "the gate refuses: {}", refused.stdout);
    assert!(
        refused.stderr.contains("refused to set dispute.executor to worker")
            && refused.stderr.contains("mismatch rate 75.0000% (3 of 4)"),
        "{}",
        refused.stderr
    );
    let value: String = sqlx::query_scalar("SELECT value FROM ops.feature_flags WHERE name = 'dispute.executor'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(value, "shadow", "nothing changed");
    let forced = ctl(&db, &[&set[..], &["--force"]].concat()).await;
    assert!(forced.ok, "{}{}", forced.stdout, forced.stderr);
    assert!(forced.stdout.contains("forced past the promotion gate"), "{}", forced.stdout);
    let (to, audit_forced): (String, bool) = sqlx::query_as(
        "SELECT to_value, forced FROM ops.feature_flag_audit WHERE name = 'dispute.executor' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((to.as_str(), audit_forced), ("worker", true), "the audit records that it was forced");

    // No effect: the candidate upheld an impersonation and a harassment dispute, yet their
    // targets are active with working tokens, the disputes stand as the primary decided, and
    // every event in the outbox is the primary's.
    let upheld: Vec<Uuid> = sqlx::query_scalar(
        "SELECT dispute_id FROM shadow.dispute_decisions WHERE status = 'upheld' ORDER BY dispute_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut want = ids[..3].to_vec();
    want.sort();
    assert_eq!(upheld, want, "the candidate's decisions are recorded in the shadow schema");
    for target in &targets {
        let Response { status, body: _, .. } =
            api.request(reqwest::Method::GET, "/v1/me", Some(&target.token), None).await;
        assert_eq!(status, 200, "the target is not suspended, their token works");
    }
    for id in &ids[..3] {
        assert_eq!(api.dispute(&reporter, *id).await["status"], "needs_review");
    }
    let (events, decisions, suspensions): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM ops.outbox WHERE subject = 'events.disputes.decided'),
                (SELECT count(*) FROM security.dispute_decisions),
                (SELECT count(*) FROM ops.outbox WHERE subject = 'events.identity.user_suspended')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((events, decisions, suspensions), (4, 4, 0), "one event per decision of the primary's, nothing else");
    stop.cancel();
    shadow.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_monolith_runs_the_candidate_while_the_worker_is_the_primary() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let _worker = Replica::start(&db, &prefix, &[]).await;
    let api = Api::start(&db, &prefix).await;
    set_flag(&db, Executor::Shadow).await;
    candidate_consumer(&prefix).await;
    let ids = file_the_scenario(&api, &db).await;
    compared(&db, ids.len() as i64).await;
    let report = ctl(&db, &["--output", "json", "parity", "dispute"]).await;
    let report: Value = serde_json::from_str(&report.stdout).expect("a JSON report");
    assert_eq!((&report["period"]["primary"], &report["period"]["candidate"]), (&"worker".into(), &"monolith".into()));
    assert_eq!((&report["matched"], &report["mismatched"]), (&Value::from(ids.len()), &Value::from(0)), "{report:#}");
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT x.xact) FROM security.dispute_decisions x JOIN shadow.dispute_decisions s
         ON s.primary_decision_id = x.id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(audited > 1, "the comparisons span several of the primary's batches");
}
