//! Moderation power: no rule upholds a dispute against a moderator or an admin, wherever the
//! processor runs (the worker, or `trellis-api` in-process); only admins see and decide such a
//! dispute, and nobody sees one against themselves; the role that counts is the one in the
//! facts, and a role granted while a batch decides fails the batch, which is judged again; the
//! shadow candidate reads roles and statuses (reinstatements included) as the primary's
//! snapshot saw them.

use std::time::Duration;

use dispute_processor::{DecideError, DisputeCandidate, JudgingRules, Processor, ProcessorArgs};
use serde_json::Value;
use time::OffsetDateTime;
use trellis_domain::UserId;
use trellis_domain::disputes::DisputeKind;
use trellis_domain::flags::{Executor, Flag};
use trellis_domain::identity::{AdminReason, Role};
use trellis_domain::shadow::ComparisonResult;
use trellis_store::user_admin::Actor;
use trellis_testkit::TestDb;
use uuid::Uuid;

use crate::harness::*;

const ACTOR: Actor<'static> = Actor { name: "moderation-tests", user_id: None };

async fn grant(db: &TestDb, user: Uuid, role: Role) {
    let reason = AdminReason::parse("test set-up").unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    let granted = trellis_commands::users::grant_role(&mut tx, UserId(user), role, &ACTOR, &reason).await;
    trellis_commands::commit(tx, granted.expect("granting a role")).await.expect("committing a role");
}

/// The current decision of a dispute: (status, rule, reasons).
async fn decision(db: &TestDb, id: Uuid) -> (String, String, Value) {
    sqlx::query_as(
        "SELECT status, coalesce(decision_rule, ''), coalesce(decision_reasons, 'null') FROM security.disputes WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .expect("reading a dispute")
}

async fn status_of(db: &TestDb, user: Uuid) -> String {
    sqlx::query_scalar("SELECT status FROM identity.users WHERE id = $1").bind(user).fetch_one(&db.pool).await.unwrap()
}

/// The ids in a moderation queue answer.
fn queued(body: &Value) -> Vec<Uuid> {
    body["items"].as_array().expect("queue items").iter().map(|d| d["id"].as_str().unwrap().parse().unwrap()).collect()
}

/// Three credible reporters file harassment disputes against a moderator, decided by the
/// processor running as `executor`: none is upheld (three would be, against a user), and only
/// an admin other than the target sees and decides them.
async fn corroborated_disputes_against_a_moderator_go_to_admins(executor: Executor) {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let change = trellis_store::cutover::flags::Change {
        flag: Flag::DisputeExecutor,
        value: executor,
        actor: "moderation-tests",
        reason: "test set-up",
        forced: false,
    };
    trellis_store::cutover::flags::set(&db.pool, &change).await.expect("setting dispute.executor");
    let api = Api::start(&db, &prefix).await;
    let _worker = match executor {
        Executor::Worker => Some(Replica::start(&db, &prefix, &[]).await),
        _ => None,
    };
    let t = tag();
    let target = api.register(&format!("tgt{t}")).await;
    make_role(&db, target.id, "moderator").await;
    let peer = api.register(&format!("peer{t}")).await;
    make_role(&db, peer.id, "moderator").await;
    let admin = api.register(&format!("adm{t}")).await;
    make_role(&db, admin.id, "admin").await;
    let mut filed = Vec::new();
    for i in 0..3 {
        let reporter = api.register(&format!("c{i}{t}")).await;
        set_score(&db, reporter.id, 500).await;
        let id = api.file(&reporter, target.id, "harassment").await;
        let seen = api.decided(&reporter, id).await;
        assert_eq!(seen["status"], "needs_review", "reporter {i}: {seen:?}");
        assert_eq!(
            (&seen["decision"]["rule"], &seen["decision"]["reasons"]),
            (&Value::from("automatic"), &serde_json::json!(["under review: a person will decide it"])),
            "the reporter learns nothing of the other reports: {seen:?}"
        );
        filed.push(id);
    }
    let (status, rule, reasons) = decision(&db, filed[2]).await;
    assert_eq!((status.as_str(), rule.as_str()), ("needs_review", "R5"), "{reasons}");
    assert!(reasons.to_string().contains("3 credible reporter(s)"), "{reasons}");
    assert!(reasons.to_string().contains("only an admin reviews it"), "{reasons}");
    let Response { status: code, body: _, .. } =
        api.request(reqwest::Method::GET, "/v1/me", Some(&target.token), None).await;
    assert_eq!(code, 200, "the moderator is not suspended");
    let suspensions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ops.outbox WHERE subject = 'events.identity.user_suspended'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(suspensions, 0);

    let queue = |user: &User| {
        let token = user.token.clone();
        let api = &api;
        async move {
            let Response { status: code, body, .. } =
                api.request(reqwest::Method::GET, "/v1/moderation/disputes?limit=100", Some(&token), None).await;
            assert_eq!(code, 200, "{body:?}");
            queued(&body)
        }
    };
    assert_eq!(queue(&admin).await, filed, "admins see disputes against a moderator");
    assert_eq!(queue(&peer).await, Vec::<Uuid>::new(), "other moderators do not");
    assert_eq!(queue(&target).await, Vec::<Uuid>::new(), "nor does the target");
    for (who, user) in [("another moderator", &peer), ("the target", &target)] {
        let path = format!("/v1/disputes/{}", filed[0]);
        let Response { status: code, body, .. } =
            api.request(reqwest::Method::GET, &path, Some(&user.token), None).await;
        assert_eq!(code, 404, "{who} does not see it: {body:?}");
        let (code, body) = api.moderate(user, filed[0], "dismissed").await;
        assert_eq!(code, 404, "{who} cannot decide it: {body:?}");
    }
    let path = format!("/v1/disputes/{}", filed[0]);
    let Response { status: code, body, .. } = api.request(reqwest::Method::GET, &path, Some(&admin.token), None).await;
    assert_eq!((code, body["decision"]["rule"].as_str()), (200, Some("R5")), "an admin sees everything: {body:?}");
    let (code, body) = api.moderate(&admin, filed[0], "upheld").await;
    assert_eq!(code, 200, "an admin decides it: {body:?}");
    assert_eq!(status_of(&db, target.id).await, "suspended", "an admin's upheld harassment suspends a moderator");
    let suspender: (String, Option<Uuid>) = sqlx::query_as(
        "SELECT actor, actor_id FROM identity.user_admin_audit WHERE user_id = $1 AND action = 'suspend'",
    )
    .bind(target.id)
    .fetch_one(&db.pool)
    .await
    .expect("the suspension is audited");
    assert_eq!(suspender, (admin.handle.clone(), Some(admin.id)));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_never_upholds_a_dispute_against_a_moderator_and_only_admins_see_it() {
    corroborated_disputes_against_a_moderator_go_to_admins(Executor::Worker).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_in_process_processor_never_upholds_a_dispute_against_a_moderator_either() {
    corroborated_disputes_against_a_moderator_go_to_admins(Executor::Monolith).await;
}

/// Disputes filed while the target was a user, decided after they became an admin: the role
/// when the batch reads its facts counts.
#[tokio::test]
async fn the_role_when_the_batch_reads_its_facts_counts_not_the_role_at_filing() {
    let db = TestDb::migrated().await.unwrap();
    let primary = Processor::new(db.pool.clone(), ProcessorArgs::default());
    let target = user(&db, None).await;
    let mut filed = Vec::new();
    for _ in 0..3 {
        filed.push(file(&db, user(&db, Some(500)).await, target, DisputeKind::Impersonation).await);
    }
    grant(&db, target, Role::Admin).await;
    primary.decide(&filed).await.unwrap();
    for id in &filed {
        assert_eq!(decision(&db, *id).await.0, "needs_review");
    }
    assert_eq!(status_of(&db, target).await, "active");
}

/// A role granted after a batch read its facts (while it waits for the target's row) fails the
/// batch: nothing is decided, and judged again, the dispute goes to review.
#[tokio::test(flavor = "multi_thread")]
async fn a_target_promoted_while_the_batch_decides_fails_the_batch_and_is_judged_again() {
    let db = TestDb::migrated().await.unwrap();
    let primary = Processor::new(db.pool.clone(), ProcessorArgs::default());
    let target = user(&db, None).await;
    let mut filed = Vec::new();
    for _ in 0..2 {
        filed.push(file(&db, user(&db, Some(500)).await, target, DisputeKind::Harassment).await);
    }
    primary.decide(&filed).await.unwrap();
    // The third corroborates the two (R4), and would suspend the target.
    filed.push(file(&db, user(&db, Some(500)).await, target, DisputeKind::Harassment).await);

    let mut hold = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM identity.users WHERE id = $1 FOR UPDATE")
        .bind(target)
        .execute(&mut *hold)
        .await
        .unwrap();
    let batch = tokio::spawn({
        let (primary, third) = (primary.clone(), filed[2]);
        async move { primary.decide(&[third]).await }
    });
    eventually("the batch to wait for the target's row", WAIT, || async {
        assert!(!batch.is_finished(), "the batch finished without waiting for the target's row");
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&db.pool)
        .await
        .ok()?;
        (waiting >= 1).then_some(())
    })
    .await;
    sqlx::query("UPDATE identity.users SET role = 'moderator' WHERE id = $1")
        .bind(target)
        .execute(&mut *hold)
        .await
        .unwrap();
    hold.commit().await.unwrap();
    match batch.await.unwrap() {
        Err(DecideError::TargetPrivileged(id)) => assert_eq!(id, target),
        other => panic!("the batch must fail for the promoted target, not {other:?}"),
    }
    assert_eq!(status_of(&db, target).await, "active");
    assert_eq!(decision(&db, filed[2]).await.0, "pending", "the failed batch decided nothing");
    assert_eq!(decision(&db, filed[0]).await.0, "needs_review", "nor upheld the others");

    primary.decide(&[filed[2]]).await.unwrap();
    let (status, rule, _) = decision(&db, filed[2]).await;
    assert_eq!((status.as_str(), rule.as_str()), ("needs_review", "R5"));
}

/// The candidate reads a target's role and status as the primary's snapshot saw them, from
/// the user administration audit: a role granted or taken away, and a reinstatement, after a
/// decision do not change its replay.
#[tokio::test(flavor = "multi_thread")]
async fn the_shadow_candidate_replays_roles_and_reinstatements_as_the_primary_saw_them() {
    let db = TestDb::migrated().await.unwrap();
    let primary = Processor::new(db.pool.clone(), ProcessorArgs::default());
    let mut credible = Vec::new();
    for _ in 0..4 {
        credible.push(user(&db, Some(500)).await);
    }
    let har = DisputeKind::Harassment;
    let mut inputs = Vec::new();
    let mut decide_each = async |target: Uuid, kinds: &[(usize, DisputeKind)]| {
        let mut ids = Vec::new();
        for (reporter, kind) in kinds {
            let id = file(&db, credible[*reporter], target, *kind).await;
            primary.decide(&[id]).await.unwrap();
            ids.push(id);
        }
        inputs.extend(&ids);
        ids
    };

    // Made a moderator before the third filing is decided, a user again after: reviewed.
    let protected = user(&db, None).await;
    decide_each(protected, &[(0, har), (1, har)]).await;
    grant(&db, protected, Role::Moderator).await;
    let third = decide_each(protected, &[(2, har)]).await[0];
    grant(&db, protected, Role::User).await;
    assert_eq!(decision(&db, third).await.0, "needs_review");

    // Upheld while a user, made a moderator after: the replay still sees a user.
    let promoted = user(&db, None).await;
    let upheld = decide_each(promoted, &[(0, har), (1, har), (2, har)]).await[2];
    assert_eq!(decision(&db, upheld).await.1, "R4");
    grant(&db, promoted, Role::Moderator).await;

    // Suspended (R4), a dispute against them moot (R2), reinstated, then one that is not.
    let wronged = user(&db, None).await;
    decide_each(wronged, &[(0, har), (1, har), (2, har)]).await;
    let moot = decide_each(wronged, &[(3, DisputeKind::Spam)]).await[0];
    assert_eq!(decision(&db, moot).await.1, "R2");
    let reason = AdminReason::parse("wrongly suspended").unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    let reinstated = trellis_commands::users::reinstate(&mut tx, UserId(wronged), &ACTOR, &reason).await;
    trellis_commands::commit(tx, reinstated.expect("reinstating")).await.expect("committing a reinstatement");
    let after = decide_each(wronged, &[(3, DisputeKind::IncorrectInfo)]).await[0];
    assert_eq!(decision(&db, after).await.1, "R5", "reinstated: not moot any more");

    trellis_store::cutover::disputes::record_inputs(&db.pool, &inputs).await.unwrap();
    let args = ProcessorArgs { dispute_shadow_missing_after: Duration::from_secs(3600), ..ProcessorArgs::default() };
    let candidate = DisputeCandidate::new(db.pool.clone(), &args, JudgingRules::PRODUCTION);
    let round = candidate.compare_ready(OffsetDateTime::UNIX_EPOCH).await.unwrap();
    assert_eq!(round.claimed, inputs.len());
    for c in &round.comparisons {
        assert_eq!((c.result, &c.diffs), (ComparisonResult::Matched, &Vec::new()), "{c:?}");
    }
}
