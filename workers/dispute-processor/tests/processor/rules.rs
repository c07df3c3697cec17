//! Filing leads to a decision, for each rule, with reasons a moderator sees and an outcome its
//! reporter sees, and the effects of an upheld dispute: suspension revokes tokens and removes
//! the user from search.

use serde_json::Value;
use trellis_testkit::TestDb;

use crate::harness::*;

fn reasons(d: &Value) -> String {
    d["decision"]["reasons"].to_string()
}

/// The reporter's view of an automatic decision: its outcome in generic words.
fn outcome(d: &Value) -> (&str, &str, Vec<&str>) {
    let reasons = d["decision"]["reasons"].as_array().expect("reasons").iter().filter_map(Value::as_str).collect();
    (d["status"].as_str().unwrap_or(""), d["decision"]["rule"].as_str().unwrap_or(""), reasons)
}

#[tokio::test(flavor = "multi_thread")]
async fn each_rule_decides_with_its_reasons_and_the_reporter_sees_only_the_outcome() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start(&db, &prefix).await;
    let replica = Replica::start(&db, &prefix, &[]).await;
    let t = tag();
    let reporter = api.register(&format!("rep{t}")).await;
    let moderator = api.register(&format!("mod{t}")).await;
    make_role(&db, moderator.id, "moderator").await;
    let target = api.register(&format!("tgt{t}")).await;

    // R5: nothing decides it; a moderator gets it with reasons, the reporter an outcome.
    let first = api.file(&reporter, target.id, "spam").await;
    let d = api.decided(&reporter, first).await;
    assert_eq!(outcome(&d), ("needs_review", "automatic", vec!["under review: a person will decide it"]));
    assert!(d["decision"]["rules_version"].is_null(), "{d:?}");
    let d = api.dispute(&moderator, first).await;
    assert_eq!(d["decision"]["rule"], "R5");
    assert_eq!(d["decision"]["rules_version"], trellis_domain::adjudication::RULES_VERSION);
    assert!(reasons(&d).contains("needs review"), "{d:?}");

    // R1: the same reporter, target and kind while the first is undecided.
    let again = api.file(&reporter, target.id, "spam").await;
    let d = api.decided(&reporter, again).await;
    let repeat = "dismissed: you already filed a dispute of this kind against this user";
    assert_eq!(outcome(&d), ("dismissed", "automatic", vec![repeat]), "{d:?}");
    let d = api.dispute(&moderator, again).await;
    assert_eq!((d["status"].as_str(), d["decision"]["rule"].as_str()), (Some("dismissed"), Some("R1")), "{d:?}");
    assert!(reasons(&d).contains("1 undecided"), "{d:?}");

    // R3: five dismissed and none upheld in 90 days; P0 goes to review instead.
    let doubter = api.register(&format!("dbt{t}")).await;
    let mut others = Vec::new();
    for i in 0..5 {
        let other = api.register(&format!("o{i}{t}")).await;
        let id = api.file(&doubter, other.id, "incorrect_info").await;
        api.decided(&doubter, id).await;
        assert_eq!(rule_of(&db, id).await, "R5", "{i} dismissed so far");
        let (status, body) = api.moderate(&moderator, id, "dismissed").await;
        assert_eq!(status, 200, "{body:?}");
        others.push(other);
    }
    let low = api.file(&doubter, others[0].id, "harassment").await;
    api.decided(&doubter, low).await;
    let d = api.dispute(&moderator, low).await;
    assert_eq!((d["status"].as_str(), d["decision"]["rule"].as_str()), (Some("dismissed"), Some("R3")), "{d:?}");
    assert!(reasons(&d).contains("5 of the reporter's disputes"), "{d:?}");
    let p0 = api.file(&doubter, others[1].id, "impersonation").await;
    api.decided(&doubter, p0).await;
    let d = api.dispute(&moderator, p0).await;
    assert_eq!((d["status"].as_str(), d["decision"]["rule"].as_str()), (Some("needs_review"), Some("R3")), "{d:?}");

    // R4: three credible reporters; the third upholds the two others in the same decision.
    let victim = api.register(&format!("vic{t}")).await;
    let mut credible = Vec::new();
    for i in 0..3 {
        let r = api.register(&format!("c{i}{t}")).await;
        set_score(&db, r.id, 400 + i).await;
        credible.push(r);
    }
    set_score(&db, victim.id, 299).await;
    let mut filed = Vec::new();
    for (i, r) in credible.iter().enumerate() {
        let id = api.file(r, victim.id, "harassment").await;
        api.decided(r, id).await;
        let want = if i < 2 { "R5" } else { "R4" };
        assert_eq!(rule_of(&db, id).await, want, "reporter {i}");
        filed.push(id);
    }
    for (r, id) in credible.iter().zip(&filed) {
        let d = api.dispute(&moderator, *id).await;
        assert_eq!((d["status"].as_str(), d["decision"]["rule"].as_str()), (Some("upheld"), Some("R4")), "{d:?}");
        assert!(reasons(&d).contains("3 distinct reporters"), "{d:?}");
        // Its reporter is not told how many others reported the same user, nor by which rule.
        let d = api.dispute(r, *id).await;
        assert_eq!(outcome(&d), ("upheld", "automatic", vec!["upheld"]), "{d:?}");
        assert!(!d.to_string().contains("distinct") && !d.to_string().contains("R4"), "{d:?}");
    }
    // The upheld harassment suspended the victim: their token stops working.
    let Response { status, body: _, .. } = api.request(reqwest::Method::GET, "/v1/me", Some(&victim.token), None).await;
    assert_eq!(status, 401, "the suspended user's token is revoked");
    let Response { status, body, .. } = api
        .request(reqwest::Method::GET, &format!("/v1/search/users?q={}", victim.handle), Some(&reporter.token), None)
        .await;
    assert_eq!(status, 200);
    let handles: Vec<&str> = body["items"].as_array().unwrap().iter().filter_map(|i| i["handle"].as_str()).collect();
    assert!(!handles.contains(&victim.handle.as_str()), "the suspended user drops out of search: {body:?}");
    let suspended: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ops.outbox WHERE subject = 'events.identity.user_suspended' AND payload->'data'->>'user_id' = $1")
            .bind(victim.id.to_string())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(suspended, 1, "one user_suspended event");

    // R2: the victim is already suspended, so a new dispute against them is moot.
    let moot = api.file(&reporter, victim.id, "spam").await;
    api.decided(&reporter, moot).await;
    let d = api.dispute(&moderator, moot).await;
    assert_eq!((d["status"].as_str(), d["decision"]["rule"].as_str()), (Some("dismissed"), Some("R2")), "{d:?}");
    assert!(reasons(&d).contains("moot"), "{d:?}");

    // A moderator cannot decide an automatically decided dispute again.
    let (status, body) = api.moderate(&moderator, moot, "upheld").await;
    assert_eq!(status, 409, "{body:?}");

    // Every decision is audited once per decision, and the metrics count them.
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM security.dispute_decisions WHERE dispute_id = $1")
        .bind(filed[0])
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(audited, 2, "R5 then R4");
    let text = eventually("the metrics to count the decisions", WAIT, || async {
        let text = replica.metrics().await;
        (series(&text, r#"trellis_dispute_decisions_total{outcome="upheld",rule="R4"}"#) == Some(3.0)).then_some(text)
    })
    .await;
    assert_eq!(series(&text, r#"trellis_dispute_decisions_total{outcome="dismissed",rule="R2"}"#), Some(1.0));
    assert_eq!(series(&text, r#"trellis_dispute_decisions_total{outcome="dismissed",rule="R1"}"#), Some(1.0));
    assert_eq!(series(&text, r#"trellis_dispute_queue_depth_messages{priority="p0"}"#), Some(0.0), "{text}");
    assert!(text.contains(r#"trellis_dispute_decision_latency_seconds_bucket{priority="p1""#), "{text}");
    let ratio = series(&text, "trellis_dispute_auto_adjudication_ratio").expect("the ratio");
    assert!(ratio > 0.0 && ratio < 1.0, "{ratio}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upheld_spam_dispute_hides_the_target_from_search() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start(&db, &prefix).await;
    let _replica = Replica::start(&db, &prefix, &[]).await;
    let t = tag();
    let spammer = api.register(&format!("spm{t}")).await;
    let mut reporters = Vec::new();
    for i in 0..3 {
        let r = api.register(&format!("r{i}{t}")).await;
        set_score(&db, r.id, 800).await;
        reporters.push(r);
    }
    let mut last = None;
    for r in &reporters {
        let id = api.file(r, spammer.id, "spam").await;
        last = Some(api.decided(r, id).await);
    }
    let last = last.unwrap();
    assert_eq!(last["status"], "upheld");
    let id = last["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(rule_of(&db, id).await, "R4");
    let Response { status, body: _, .. } =
        api.request(reqwest::Method::GET, "/v1/me", Some(&spammer.token), None).await;
    assert_eq!(status, 200, "spam hides, it does not suspend");
    let Response { status: _, body, .. } = api
        .request(
            reqwest::Method::GET,
            &format!("/v1/search/users?q={}", spammer.handle),
            Some(&reporters[0].token),
            None,
        )
        .await;
    let handles: Vec<&str> = body["items"].as_array().unwrap().iter().filter_map(|i| i["handle"].as_str()).collect();
    assert!(!handles.contains(&spammer.handle.as_str()), "hidden from search: {body:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn moderators_get_needs_review_by_priority_then_age_and_their_decisions_apply_the_effects() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start(&db, &prefix).await;
    let _replica = Replica::start(&db, &prefix, &[]).await;
    let t = tag();
    let reporter = api.register(&format!("rep{t}")).await;
    let moderator = api.register(&format!("mod{t}")).await;
    make_role(&db, moderator.id, "moderator").await;
    let mut filed = Vec::new();
    for (i, kind) in ["incorrect_info", "harassment", "impersonation", "spam", "impersonation"].into_iter().enumerate()
    {
        let target = api.register(&format!("t{i}{t}")).await;
        let id = api.file(&reporter, target.id, kind).await;
        assert_eq!(api.decided(&reporter, id).await["status"], "needs_review");
        filed.push((id, target));
    }
    let Response { status, body: queue, .. } = api
        .request(reqwest::Method::GET, "/v1/moderation/disputes?status=needs_review", Some(&moderator.token), None)
        .await;
    assert_eq!(status, 200, "{queue:?}");
    let order: Vec<String> =
        queue["items"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_owned()).collect();
    let want: Vec<String> = [2, 4, 1, 3, 0].into_iter().map(|i| filed[i].0.to_string()).collect();
    assert_eq!(order, want, "P0 (oldest first), P1, P2, P3");

    let (impersonation, impostor) = &filed[2];
    let (status, body) = api.moderate(&moderator, *impersonation, "upheld").await;
    assert_eq!(status, 200, "{body:?}");
    let Response { status, body: _, .. } =
        api.request(reqwest::Method::GET, "/v1/me", Some(&impostor.token), None).await;
    assert_eq!(status, 401, "upheld by a moderator: the impostor is suspended");
    let seen = api.dispute(&reporter, *impersonation).await;
    assert_eq!(seen["status"], "upheld");
    assert_eq!(outcome(&seen), ("upheld", "moderator", vec!["upheld after review"]));
    assert_eq!(seen["decision"]["note"], "checked by hand", "the reporter sees the moderator's note: {seen:?}");
    assert!(seen["decision"]["decided_by"].is_null(), "the reporter does not see who decided");
    let (status, body) = api.moderate(&moderator, *impersonation, "dismissed").await;
    assert_eq!(status, 409, "{body:?}");
    let audit: Vec<(String, String)> =
        sqlx::query_as("SELECT rule, status FROM security.dispute_decisions WHERE dispute_id = $1 ORDER BY id")
            .bind(impersonation)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(audit, [("R5".into(), "needs_review".into()), ("moderator".into(), "upheld".into())]);
}
