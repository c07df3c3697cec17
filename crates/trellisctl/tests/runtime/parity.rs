//! `trellisctl parity` and the promotion gate of `trellisctl flags set`, against a real
//! database: comparisons are recorded the way a candidate records them.

use serde_json::json;
use trellis_domain::flags::Flag;
use trellis_domain::shadow::{Comparison, ComparisonResult};
use trellis_testkit::TestDb;

use crate::helpers::{Ctl, run_ctl};

async fn ctl(db: &TestDb, args: &[&str]) -> Ctl {
    run_ctl(&["--database-url", &db.url], args, "parity-tests").await
}

async fn set(db: &TestDb, name: &str, value: &str, extra: &[&str]) -> Ctl {
    let mut args = vec!["flags", "set", name, value, "--reason", "cutover rehearsal"];
    args.extend_from_slice(extra);
    ctl(db, &args).await
}

async fn forced(db: &TestDb) -> Vec<bool> {
    sqlx::query_scalar("SELECT forced FROM ops.feature_flag_audit ORDER BY id").fetch_all(&db.pool).await.unwrap()
}

#[tokio::test]
async fn parity_reports_a_shadow_periods_counts_and_first_differences_and_the_gate_reads_them() {
    let db = TestDb::migrated().await.unwrap();
    let out = ctl(&db, &["parity", "score"]).await;
    assert!(!out.success() && out.stderr.contains("score.executor has never been in shadow"), "{out:?}");
    let out = ctl(&db, &["parity", "scores"]).await;
    assert!(!out.success() && out.stderr.contains("unknown processor \"scores\""), "{out:?}");

    assert!(set(&db, "score.executor", "monolith", &[]).await.success());
    let out = set(&db, "score.executor", "worker", &[]).await;
    assert!(!out.success(), "{out:?}");
    assert!(out.stderr.contains("refused to set score.executor to worker"), "{out:?}");
    assert!(out.stderr.contains("is not running the worker in shadow"), "{out:?}");

    assert!(set(&db, "score.executor", "shadow", &[]).await.success());
    let recorded = [
        Comparison { key: "runs a/b".into(), result: ComparisonResult::Matched, count: 3, diffs: vec![] },
        Comparison::of("user 7", &json!({"score": 61, "trust": 0.5}), &json!({"score": 62, "trust": 0.5})),
        Comparison::missing("run c", "no primary run on the same input"),
    ];
    trellis_store::cutover::record(&db.pool, Flag::ScoreExecutor, &recorded).await.unwrap();

    let table = ctl(&db, &["parity", "score"]).await;
    assert!(table.success(), "{table:?}");
    assert!(table.stdout.contains("primary monolith, candidate worker"), "{table:?}");
    assert!(table.stdout.contains("matched     3\n"), "{table:?}");
    assert!(table.stdout.contains("mismatched  1 (mismatch rate 25.0000%)"), "{table:?}");
    assert!(table.stdout.contains("missing     1\n"), "{table:?}");
    assert!(table.stdout.contains("mismatched user 7"), "{table:?}");
    assert!(table.stdout.contains("    score: primary 61, candidate 62\n"), "only the differing field: {table:?}");
    let report = ctl(&db, &["--output", "json", "parity", "score", "--limit", "1"]).await.json();
    assert_eq!(
        (report["matched"].as_i64(), report["mismatched"].as_i64(), report["missing"].as_i64()),
        (Some(3), Some(1), Some(1))
    );
    assert_eq!(report["period"]["ended_at"], serde_json::Value::Null);
    let first = report["first_differences"].as_array().unwrap();
    assert_eq!(first.len(), 1, "--limit 1: {report}");
    assert_eq!(first[0]["diffs"], json!([{"field": "score", "primary": 61, "candidate": 62}]));

    // 4 comparisons, 1 mismatched: refused at the defaults, and at a relaxed count, for its rate.
    let out = set(&db, "score.executor", "worker", &["--promotion-min-comparisons", "4"]).await;
    assert!(!out.success() && out.stderr.contains("mismatch rate 25.0000% (1 of 4) is above 0.1000%"), "{out:?}");
    let out = set(&db, "score.executor", "worker", &["--promotion-max-mismatch-rate", "2"]).await;
    assert!(!out.success() && out.stderr.contains("a fraction between 0 and 1, not 2"), "{out:?}");
    let out = set(
        &db,
        "score.executor",
        "worker",
        &["--promotion-min-comparisons", "4", "--promotion-max-mismatch-rate", "0.25"],
    )
    .await;
    assert!(out.success(), "within the configured gate: {out:?}");
    assert!(!out.stdout.contains("forced"), "{out:?}");

    // Forced past the gate: done, said, and audited as forced.
    assert!(set(&db, "dispute.executor", "monolith", &[]).await.success());
    let out = set(&db, "dispute.executor", "worker", &["--force"]).await;
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.contains("forced past the promotion gate"), "{out:?}");
    assert_eq!(forced(&db).await, [false, false, false, false, true]);

    // The period ended with the promotion: the report says so, and still counts it.
    let report = ctl(&db, &["--output", "json", "parity", "score"]).await.json();
    assert!(report["period"]["ended_at"].is_string(), "{report}");
    assert_eq!(report["matched"], 3);
}
