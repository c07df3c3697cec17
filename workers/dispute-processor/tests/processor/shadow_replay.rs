//! The shadow candidate judges each dispute on the facts the primary judged it on:
//! the processor's library decides real batches (one batch with an in-batch suspension and an
//! R4 group; batches one after another, where the primary's own decisions suspend the target;
//! two concurrent batches forced to overlap), and the candidate's comparer, with the same
//! rules, matches every one of them. The same inputs compared by a candidate whose rules differ
//! show the difference.

use std::collections::HashMap;
use std::time::Duration;

use dispute_processor::{Candidate, Processor, ProcessorArgs, Rules};
use time::OffsetDateTime;
use trellis_domain::adjudication::{self, Facts, Judgement, Rule};
use trellis_domain::disputes::{DisputeKind, DisputeStatus};
use trellis_domain::shadow::{Comparison, ComparisonResult};
use trellis_domain::{DisputeId, UserId};
use trellis_testkit::TestDb;
use uuid::Uuid;

use crate::harness::*;

/// The current (latest) decision of each dispute: (status, rule).
async fn decisions(db: &TestDb, ids: &[Uuid]) -> Vec<(String, String)> {
    let rows: HashMap<Uuid, (String, String)> = sqlx::query_as::<_, (Uuid, String, String)>(
        "SELECT id, status, coalesce(decision_rule, '') FROM security.disputes WHERE id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(id, s, r)| (id, (s, r)))
    .collect();
    ids.iter().map(|id| rows[id].clone()).collect()
}

fn pair(status: &str, rule: &str) -> (String, String) {
    (status.to_owned(), rule.to_owned())
}

/// A digest of everything production the candidate could touch.
async fn production(db: &TestDb) -> String {
    sqlx::query_scalar(
        "SELECT concat_ws('/',
            (SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t.id), '')) FROM security.disputes t),
            (SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t.id), '')) FROM security.dispute_decisions t),
            (SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t.user_id), '')) FROM security.hidden_users t),
            (SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t.id), '')) FROM identity.users t),
            (SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t.token_hash), '')) FROM identity.tokens t),
            (SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t.seq), '')) FROM ops.outbox t))",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// Waits until `n` backends of this test's database wait for a lock.
async fn lock_waiters(db: &TestDb, n: i64) {
    eventually(&format!("{n} batches to wait for the target's row"), WAIT, || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&db.pool)
        .await
        .ok()?;
        (waiting >= n).then_some(())
    })
    .await;
}

fn results(comparisons: &[Comparison]) -> HashMap<Uuid, &Comparison> {
    comparisons.iter().map(|c| (c.key.parse().expect("a dispute id"), c)).collect()
}

/// The rules without R2: a suspended reporter or target changes nothing.
fn without_r2(f: &Facts) -> Judgement {
    let mut f = f.clone();
    f.reporter_suspended = false;
    f.target_suspended = false;
    adjudication::adjudicate(&f)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_candidate_judges_each_batch_on_the_facts_the_primary_read() {
    let db = TestDb::migrated().await.unwrap();
    let primary = Processor::new(db.pool.clone(), ProcessorArgs::default());
    let mut credible = Vec::new();
    for _ in 0..5 {
        credible.push(user(&db, Some(500)).await);
    }
    let [c1, c2, c3, c4, c5] = credible[..] else { unreachable!() };
    let imp = DisputeKind::Impersonation;
    let har = DisputeKind::Harassment;

    // A: one batch. The first impersonation is corroborated (R4) and upholds the others with
    // it, the reporter's repeat among them; the harassment judged after it in the same batch
    // sees its target suspended (R2).
    let ta = user(&db, None).await;
    let a = [
        file(&db, c1, ta, imp).await,
        file(&db, c2, ta, imp).await,
        file(&db, c3, ta, imp).await,
        file(&db, c4, ta, har).await,
        file(&db, c1, ta, imp).await,
    ];
    primary.decide(&a).await.unwrap();
    let upheld = pair("upheld", "R4");
    let moot = pair("dismissed", "R2");
    assert_eq!(
        decisions(&db, &a).await,
        [upheld.clone(), upheld.clone(), upheld.clone(), moot.clone(), upheld.clone()]
    );

    // B: one batch each. Two go to review, the third upholds them (R4) and suspends the
    // target: the primary's own decision, which the disputes after it see (R2).
    let tb = user(&db, None).await;
    let mut b = Vec::new();
    for (reporter, kind) in [(c1, imp), (c2, imp), (c3, imp), (c4, har), (c5, DisputeKind::Spam)] {
        let id = file(&db, reporter, tb, kind).await;
        primary.decide(&[id]).await.unwrap();
        b.push(id);
    }
    assert_eq!(decisions(&db, &b).await, [upheld.clone(), upheld.clone(), upheld.clone(), moot.clone(), moot.clone()]);

    // C: two concurrent batches that both suspend the target. Both read their facts, then wait
    // for the target's row (held here); released, one suspends and commits, and the other
    // records its decision after that, on facts that did not see the suspension.
    let tc = user(&db, None).await;
    let mut c = Vec::new();
    for (reporter, kind) in [(c1, imp), (c2, imp), (c1, har), (c2, har)] {
        let id = file(&db, reporter, tc, kind).await;
        primary.decide(&[id]).await.unwrap();
        c.push(id);
    }
    let (ca3, cb3) = (file(&db, c3, tc, imp).await, file(&db, c3, tc, har).await);
    let mut hold = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM identity.users WHERE id = $1 FOR UPDATE").bind(tc).execute(&mut *hold).await.unwrap();
    let (pa, pb) = (primary.clone(), primary.clone());
    let batch_a = tokio::spawn(async move { pa.decide(&[ca3]).await });
    let batch_b = tokio::spawn(async move { pb.decide(&[cb3]).await });
    lock_waiters(&db, 2).await;
    hold.rollback().await.unwrap();
    batch_a.await.unwrap().unwrap();
    batch_b.await.unwrap().unwrap();
    c.extend([ca3, cb3]);
    assert_eq!(decisions(&db, &[ca3, cb3]).await, [upheld.clone(), upheld.clone()], "each judged before the other");
    let overlap: bool = sqlx::query_scalar(
        "SELECT max(facts_at) < min(decided_at) FROM security.dispute_decisions WHERE dispute_id = ANY($1)",
    )
    .bind([ca3, cb3])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(overlap, "the later batch read its facts before the earlier one decided");

    // Not comparable: never decided by the primary; decided by a moderator first; a score its
    // facts read rewritten since.
    let never = file(&db, c4, user(&db, None).await, DisputeKind::Spam).await;
    let moderated = file(&db, c4, user(&db, None).await, DisputeKind::Spam).await;
    let moderator = user(&db, None).await;
    let mut tx = db.pool.begin().await.unwrap();
    let by_hand = trellis_store::disputes::Decision {
        status: DisputeStatus::Dismissed,
        rule: "moderator",
        reasons: serde_json::json!(["checked by hand"]),
        rules_version: adjudication::RULES_VERSION,
        decided_by: Some(UserId(moderator)),
        note: Some("checked by hand"),
    };
    trellis_store::disputes::record_decision(&mut tx, DisputeId(moderated), &by_hand).await.unwrap();
    tx.commit().await.unwrap();
    let rescored_reporter = user(&db, Some(450)).await;
    let rescored = file(&db, rescored_reporter, user(&db, None).await, DisputeKind::IncorrectInfo).await;
    primary.decide(&[rescored]).await.unwrap();
    set_score(&db, rescored_reporter, 460).await;

    let inputs: Vec<Uuid> = a.iter().chain(&b).chain(&c).copied().chain([never, moderated, rescored]).collect();
    trellis_store::shadow_disputes::record_inputs(&db.pool, &inputs).await.unwrap();
    let args = ProcessorArgs { dispute_shadow_missing_after: Duration::ZERO, ..ProcessorArgs::default() };
    let before = production(&db).await;
    let candidate = Candidate::new(db.pool.clone(), &args, Rules::PRODUCTION);
    let round = candidate.compare_ready(OffsetDateTime::UNIX_EPOCH).await.unwrap();
    assert_eq!(production(&db).await, before, "the candidate changed nothing outside the shadow schema");
    assert_eq!(round.claimed, inputs.len());
    let got = results(&round.comparisons);
    for id in &inputs[..inputs.len() - 3] {
        let c = got[id];
        assert_eq!((c.result, &c.diffs), (ComparisonResult::Matched, &Vec::new()), "{id}: {c:?}");
    }
    let why = |id: Uuid| {
        let c = got[&id];
        assert_eq!(c.result, ComparisonResult::Missing, "{c:?}");
        c.diffs[0].candidate.as_str().unwrap_or_default().to_owned()
    };
    assert!(why(never).contains("no decision within 0s"), "{}", why(never));
    assert!(why(moderated).contains("moderator decided it"), "{}", why(moderated));
    assert!(why(rescored).contains("trust score"), "{}", why(rescored));

    let recorded: Vec<(Uuid, String, String)> =
        sqlx::query_as("SELECT dispute_id, status, rule FROM shadow.dispute_decisions WHERE dispute_id = ANY($1)")
            .bind(&inputs)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(recorded.len(), inputs.len() - 3, "one candidate decision per comparable input");
    let again = candidate.compare_ready(OffsetDateTime::UNIX_EPOCH).await.unwrap();
    assert_eq!(again.claimed, 0, "each input is compared once");

    // The same inputs, compared by a candidate without R2: every dispute the primary found moot
    // (the batch's own suspension in A, the earlier batch's in B) differs, field by field.
    sqlx::query("UPDATE shadow.dispute_inputs SET compared_at = NULL").execute(&db.pool).await.unwrap();
    sqlx::query("DELETE FROM shadow.dispute_decisions").execute(&db.pool).await.unwrap();
    let other = Candidate::new(db.pool.clone(), &args, Rules { version: "test-without-r2", judge: without_r2 });
    let round = other.compare_ready(OffsetDateTime::UNIX_EPOCH).await.unwrap();
    let got = results(&round.comparisons);
    let mismatched: Vec<Uuid> =
        inputs.iter().copied().filter(|id| got[id].result == ComparisonResult::Mismatched).collect();
    assert_eq!(mismatched, [a[3], b[3], b[4]], "{:?}", round.comparisons);
    let fields: Vec<&str> = got[&a[3]].diffs.iter().map(|d| d.field.as_str()).collect();
    assert_eq!(fields, ["reasons", "rule", "status"]);
    assert_eq!(got[&a[3]].diffs[1].primary, Rule::R2Invalid.id());
}
