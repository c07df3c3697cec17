//! `GET /v1/users/{user}/score` and `GET /v1/search/users` over the base tables.

use serde_json::{Value, json};

use crate::helpers::{Options, TestApp, TestUser};

/// Records a finished score run and `user`'s score in it, computed `hours_ago` hours ago.
async fn insert_score(app: &TestApp, user: &TestUser, trust: f64, score: i32, hours_ago: i32) {
    let run: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO score.runs (id, trigger, status) VALUES ($1, 'manual', 'succeeded') RETURNING id",
    )
    .bind(uuid::Uuid::now_v7())
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO score.user_scores (user_id, trust, score, run_id, computed_at)
         VALUES ($1::uuid, $2, $3, $4, now() - make_interval(hours => $5))",
    )
    .bind(&user.id)
    .bind(trust)
    .bind(score)
    .bind(run)
    .bind(hours_ago)
    .execute(&app.db.pool)
    .await
    .unwrap();
}

async fn set_display_name(app: &TestApp, user: &TestUser, name: &str) {
    let r = app.patch("/v1/me", Some(&user.token), json!({"display_name": name})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

fn handles(items: &[Value]) -> Vec<String> {
    items.iter().map(|h| h["handle"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn a_user_never_scored_answers_not_yet_scored_instead_of_an_error() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    for key in [bob.id.as_str(), "bob"] {
        let r = app.get(&format!("/v1/users/{key}/score"), Some(&alice.token)).await;
        assert_eq!(r.status, 200, "{key}: {:?}", r.body);
        assert_eq!(
            r.body,
            json!({"user_id": bob.id, "status": "not_yet_scored", "score": null, "trust": null,
                   "computed_at": null, "stale": false})
        );
    }
    let r = app.get("/v1/users/nobody/score", Some(&alice.token)).await;
    assert_eq!((r.status, r.problem()), (404, "not-found"));
}

#[tokio::test]
async fn a_scored_user_shows_the_score_trust_and_time_of_the_run() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    insert_score(&app, &bob, 0.125, 640, 1).await;

    let r = app.get("/v1/users/bob/score", Some(&alice.token)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["user_id"], bob.id.as_str());
    assert_eq!(r.body["status"], "scored");
    assert_eq!(r.body["score"], 640);
    assert_eq!(r.body["trust"], 0.125);
    assert_eq!(r.body["stale"], false);
    let computed_at = time::OffsetDateTime::parse(
        r.body["computed_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let age = time::OffsetDateTime::now_utc() - computed_at;
    assert!(age > time::Duration::minutes(59) && age < time::Duration::minutes(61), "computed {age} ago");

    // Alice's own score is independent.
    let mine = app.get(&format!("/v1/users/{}/score", alice.id), Some(&alice.token)).await;
    assert_eq!(mine.body["status"], "not_yet_scored");
}

#[tokio::test]
async fn a_score_older_than_24_hours_is_stale() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let old = app.register("old_score").await;
    let recent = app.register("recent_score").await;
    insert_score(&app, &old, 0.5, 900, 25).await;
    insert_score(&app, &recent, 0.5, 900, 23).await;

    let r = app.get("/v1/users/old_score/score", Some(&alice.token)).await;
    assert_eq!((r.status, &r.body["status"], &r.body["stale"]), (200, &json!("scored"), &json!(true)), "{:?}", r.body);
    assert_eq!(r.body["score"], 900, "a stale score is still served");
    let r = app.get("/v1/users/recent_score/score", Some(&alice.token)).await;
    assert_eq!(r.body["stale"], false, "{:?}", r.body);
}

#[tokio::test]
async fn search_needs_a_query_of_at_least_two_characters() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    for query in ["", "?q=", "?q=a", "?q=%20a%20"] {
        let r = app.get(&format!("/v1/search/users{query}"), Some(&alice.token)).await;
        assert_eq!((r.status, r.problem()), (422, "validation"), "{query:?}: {:?}", r.body);
        assert_eq!(r.body["errors"][0]["field"], "q");
    }
    let r = app.get(&format!("/v1/search/users?q={}", "a".repeat(101)), Some(&alice.token)).await;
    assert_eq!((r.status, r.body["errors"][0]["code"].as_str()), (422, Some("too_long")));
    let r = app.get("/v1/search/users?q=al", Some(&alice.token)).await;
    assert_eq!(r.status, 200);
    assert_eq!(handles(r.body["items"].as_array().unwrap()), ["alice"]);
}

#[tokio::test]
async fn like_wildcards_in_the_query_match_only_themselves() {
    let app = TestApp::spawn().await;
    let searcher = app.register("searcher").await;
    app.register("pat").await;
    app.register("p_t_fan").await;
    let percent = app.register("percent").await;
    set_display_name(&app, &percent, "100% real").await;
    // `%`, `_` and `\` are literal in handles; in names they separate words.
    for (q, expected) in [("p_t", vec!["p_t_fan"]), ("p%25", vec![]), ("100%25", vec!["percent"]), ("a%5C", vec![])] {
        let r = app.get(&format!("/v1/search/users?q={q}"), Some(&searcher.token)).await;
        assert_eq!(r.status, 200, "{q}: {:?}", r.body);
        assert_eq!(handles(r.body["items"].as_array().unwrap()), expected, "q={q}");
    }
}

#[tokio::test]
async fn search_limits_are_1_to_50() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    for limit in [0, 51] {
        let r = app.get(&format!("/v1/search/users?q=alice&limit={limit}"), Some(&alice.token)).await;
        assert_eq!((r.status, r.problem()), (422, "validation"), "limit={limit}: {:?}", r.body);
        assert_eq!(r.body["errors"][0]["field"], "limit");
    }
    let r = app.get("/v1/search/users?q=alice&limit=50", Some(&alice.token)).await;
    assert_eq!(r.status, 200);
    let r = app.get("/v1/search/users?q=alice&cursor=garbage!", Some(&alice.token)).await;
    assert_eq!((r.status, r.problem()), (400, "invalid-cursor"));
}

#[tokio::test]
async fn search_ranks_exact_handle_then_handle_prefix_then_name_and_higher_score_first_within_each() {
    let app = TestApp::spawn().await;
    let searcher = app.register("searcher").await;
    let ann = app.register("ann").await;
    let anna = app.register("anna").await;
    let annabel = app.register("annabel").await;
    let annika = app.register("annika").await;
    let joanne = app.register("joanne").await;
    let zoe = app.register("zoe").await;
    let bob = app.register("bob").await;
    set_display_name(&app, &joanne, "Jo Ann Smith").await;
    set_display_name(&app, &zoe, "Zoe Annan").await;
    set_display_name(&app, &bob, "Bob Builder").await;
    // The exact match ranks first even with the lowest score; prefixes and names by score.
    insert_score(&app, &ann, 0.01, 10, 1).await;
    insert_score(&app, &annabel, 0.3, 900, 1).await;
    insert_score(&app, &anna, 0.1, 300, 1).await;
    insert_score(&app, &zoe, 0.2, 700, 1).await;
    insert_score(&app, &joanne, 0.05, 100, 1).await;
    let _ = annika; // a prefix match with no score: after the scored prefixes

    let r = app.get("/v1/search/users?q=Ann", Some(&searcher.token)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["source"], "database");
    let items = r.body["items"].as_array().unwrap();
    assert_eq!(handles(items), ["ann", "annabel", "anna", "annika", "zoe", "joanne"]);
    assert_eq!(items[0]["score"], 10);
    assert_eq!(items[0]["id"], ann.id.as_str());
    assert_eq!(items[0]["display_name"], "ann name");
    assert_eq!(items[0]["verified"], false);
    assert!(items[3]["score"].is_null());
    assert!(r.body["next_cursor"].is_null());
}

#[tokio::test]
async fn suspended_users_never_appear_in_search() {
    let app = TestApp::spawn().await;
    let searcher = app.register("searcher").await;
    app.register("carol").await;
    let caroline = app.register("caroline").await;
    let named = app.register("someone").await;
    set_display_name(&app, &named, "Carol Named").await;
    insert_score(&app, &caroline, 0.9, 1000, 1).await;

    let before = app.get("/v1/search/users?q=carol", Some(&searcher.token)).await;
    assert_eq!(handles(before.body["items"].as_array().unwrap()), ["carol", "caroline", "someone"]);
    app.suspend_in_db(&caroline).await;
    app.suspend_in_db(&named).await;
    let after = app.get("/v1/search/users?q=carol", Some(&searcher.token)).await;
    assert_eq!(handles(after.body["items"].as_array().unwrap()), ["carol"]);
    let exact = app.get("/v1/search/users?q=caroline", Some(&searcher.token)).await;
    assert_eq!(exact.body["items"], json!([]), "not even by exact handle");
}

#[tokio::test]
async fn search_results_page_through_a_cursor_in_rank_order() {
    let app = TestApp::spawn().await;
    let searcher = app.register("searcher").await;
    let mut users = Vec::new();
    for (i, handle) in ["pat", "pat_a", "pat_b", "pat_c", "pat_d"].into_iter().enumerate() {
        let user = app.register(handle).await;
        // Distinct scores make the order total: exact match, then prefixes by descending score.
        insert_score(&app, &user, 0.1, 100 * (i as i32 + 1), 1).await;
        users.push(user);
    }
    let one_page = app.get("/v1/search/users?q=pat&limit=50", Some(&searcher.token)).await;
    let expected = handles(one_page.body["items"].as_array().unwrap());
    assert_eq!(expected, ["pat", "pat_d", "pat_c", "pat_b", "pat_a"]);

    let pages = app.pages("/v1/search/users?q=pat&limit=2", &searcher.token).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
    let paged: Vec<String> = pages.iter().flat_map(|p| handles(p)).collect();
    assert_eq!(paged, expected, "every hit once, in the same order");
}

/// Projects the read model from the base tables, as the search projector would, and marks it
/// caught up with the newest event.
async fn project_by_hand(app: &TestApp) {
    trellis_store::search_model::rebuild(&app.db.pool, trellis_store::search_model::RebuildScope::All, |_| {})
        .await
        .unwrap();
    sqlx::query(
        "UPDATE search.checkpoint SET last_event_at = (SELECT max(created_at) FROM ops.outbox), last_stream_sequence = 1,
             updated_at = now()",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
}

/// Polls a search until it answers from `source` (the API re-decides at most once a second).
async fn search_from(app: &TestApp, path: &str, token: &str, source: &str) -> crate::helpers::Resp {
    let what = format!("{path} to answer from {source}");
    trellis_testkit::eventually(&what, std::time::Duration::from_secs(10), || async {
        let r = app.get(path, Some(token)).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        (r.body["source"] == source).then(|| {
            assert_eq!(r.header("x-search-source"), Some(source));
            r
        })
    })
    .await
}

#[tokio::test]
async fn search_answers_from_the_index_when_fresh_and_from_the_database_when_it_lags() {
    // A process of its own: its fallback counter counts this test's searches only.
    let app = TestApp::spawn_with(Options { process: true, ..Options::default() }).await;
    let alice = app.register("alice").await;
    let bob = app.register("bobby").await;
    app.add_contact(&alice, &bob).await;

    // Users exist but the read model is empty: the database answers, and says so.
    let db = search_from(&app, "/v1/search/users?q=bob", &alice.token, "database").await;
    let fallbacks = app.metric("trellis_search_fallbacks_total{endpoint=\"users\"}").await.unwrap_or(0.0);
    assert!(fallbacks >= 1.0, "fallbacks are counted");

    project_by_hand(&app).await;
    let index = search_from(&app, "/v1/search/users?q=bob", &alice.token, "index").await;
    assert_eq!(index.body["items"], db.body["items"], "the same results from either source");
    let contacts = search_from(&app, "/v1/me/contacts/search?q=bob", &alice.token, "index").await;
    assert_eq!(contacts.body["items"][0]["handle"], "bobby");

    // A new event the projection has not applied, older than the allowed lag: fallback again.
    sqlx::query("UPDATE search.checkpoint SET last_event_at = last_event_at - interval '10 minutes'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    app.register("carol").await;
    search_from(&app, "/v1/search/users?q=bob", &alice.token, "database").await;
    let contacts = search_from(&app, "/v1/me/contacts/search?q=bob", &alice.token, "database").await;
    assert_eq!(contacts.body["items"][0]["handle"], "bobby", "the fallback finds the same contact");
}

#[tokio::test]
async fn contact_search_matches_handle_name_label_and_circle_and_only_the_callers_own() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bobby").await;
    let carol = app.register("carol").await;
    let r =
        app.put(&format!("/v1/me/contacts/{}", bob.id), Some(&alice.token), json!({"label": "climbing partner"})).await;
    assert_eq!(r.status, 201);
    app.add_contact(&alice, &carol).await;
    let circle = app.create_circle(&alice, "Book Club").await;
    let r = app.put(&format!("/v1/me/circles/{circle}/members/{}", carol.id), Some(&alice.token), json!({})).await;
    assert_eq!(r.status, 201);
    // carol's own contacts are not alice's.
    app.add_contact(&carol, &bob).await;

    for (q, want) in [("bobby", "bobby"), ("climbing", "bobby"), ("book", "carol"), ("carol name", "carol")] {
        let r =
            search_from(&app, &format!("/v1/me/contacts/search?q={}", q.replace(' ', "%20")), &alice.token, "database")
                .await;
        let handles: Vec<&str> =
            r.body["items"].as_array().unwrap().iter().map(|i| i["handle"].as_str().unwrap()).collect();
        assert_eq!(handles, [want], "q={q}");
    }
    let r = search_from(&app, "/v1/me/contacts/search?q=book", &alice.token, "database").await;
    assert_eq!(r.body["items"][0]["circles"], json!(["Book Club"]));
    let r = search_from(&app, "/v1/me/contacts/search?q=climbing", &carol.token, "database").await;
    assert_eq!(r.body["items"], json!([]), "carol's search does not see alice's labels");
    let short = app.get("/v1/me/contacts/search?q=b", Some(&alice.token)).await;
    assert_eq!(short.status, 422);
}

/// The handles `q` finds over `documents`, straight from the store (ranked, first 50).
async fn store_search(app: &TestApp, documents: trellis_store::search::Documents, q: &str) -> Vec<String> {
    trellis_store::search::users(&app.db.pool, documents, q, 0, 50)
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.handle)
        .collect()
}

#[tokio::test]
async fn name_search_matches_word_prefixes_and_one_typo_alike_over_the_index_and_the_base_tables() {
    use trellis_store::search::Documents;
    let app = TestApp::spawn().await;
    let names = [
        ("maria", "Maria Fischer"),
        ("mariam", "Mariam Okafor"),
        ("mario", "Mario Rossi"),
        ("marta", "Marta Kim"),
        ("joann", "Jo Ann Smith-Williams"),
        ("zed", "Zed Q. Fischer"),
        ("ana", "Ana Lee"),
        ("agent", "Agent 4711"),
    ];
    for (i, (handle, name)) in names.iter().enumerate() {
        let user = app.register(handle).await;
        set_display_name(&app, &user, name).await;
        insert_score(&app, &user, 0.1, 100 * (i as i32 + 1), 1).await;
    }
    project_by_hand(&app).await;
    let cases: &[(&str, &[&str])] = &[
        // A word prefix, best score first (handle matches come first: none here).
        ("fisch", &["zed", "maria"]),
        // One edit: deletion, insertion, substitution, adjacent transposition.
        ("fischr", &["zed", "maria"]),
        ("fiischer", &["zed", "maria"]),
        ("fisher", &["zed", "maria"]),
        ("fischre", &["zed", "maria"]),
        ("marai", &["maria"]),
        // Two edits are too many.
        ("fsher", &[]),
        // Every word of the query must match a word of the name.
        ("maria fisch", &["maria"]),
        ("jo williams", &["joann"]),
        ("smith williams", &["joann"]),
        ("maria rossi", &["mario"]),
        ("maria lee", &[]),
        // Handle prefix first, then names by score.
        ("mari", &["mario", "mariam", "maria"]),
        ("mar", &["marta", "mario", "mariam", "maria"]),
        ("okafo", &["mariam"]),
        // No typo allowance below 3 characters; one-character words are not matched.
        ("le", &["ana"]),
        ("kin", &["marta"]),
        ("q", &[]),
        // One-character words of the query are left out, not required.
        ("zed q fisch", &["zed"]),
        // Numbers match by prefix only: one digit off is another number.
        ("471", &["agent"]),
        ("4712", &[]),
    ];
    // Not in the read model: only the caller of the one-statement search.
    let searcher = app.register("searcher").await;
    for (q, expected) in cases {
        let index = store_search(&app, Documents::Index, q).await;
        let base = store_search(&app, Documents::Base, q).await;
        assert_eq!(index, *expected, "q={q:?} over the index");
        assert_eq!(base, index, "q={q:?}: the base tables and the index agree");
        one_statement_agrees(&app, &searcher, q, &index).await;
    }
    // Exact handles among prefixes, and prefixes past a range cap of 0 and 2.
    for q in ["maria", "ma", "mario", "agent", "jo", "zed"] {
        let index = store_search(&app, Documents::Index, q).await;
        one_statement_agrees(&app, &searcher, q, &index).await;
    }
}

/// The API's one-statement search (authentication included) answers what `users` answers over
/// the index, whether the handle tier sorts the range of the prefix or walks the score order
/// (a range cap below the prefix's matches), page by page; and it authenticates the caller.
async fn one_statement_agrees(app: &TestApp, caller: &crate::helpers::TestUser, q: &str, expected: &[String]) {
    let token_hash = trellis_api::auth::hash_token(&caller.token);
    let idle = std::time::Duration::from_secs(3600);
    for cap in [0, 2, trellis_store::search::HANDLE_RANGE_CAP] {
        let search = |offset, limit| {
            trellis_store::search::indexed_users_for_token(&app.db.pool, &token_hash, idle, q, offset, limit, cap)
        };
        let (caller_id, hits) = search(0, 50).await.unwrap().expect("the caller authenticates");
        assert_eq!(caller_id.to_string(), caller.id, "q={q:?}, cap {cap}");
        let handles: Vec<String> = hits.into_iter().map(|h| h.handle).collect();
        assert_eq!(handles, expected, "q={q:?}, cap {cap}: one statement and the tiers agree");
        let (_, second) = search(1, 2).await.unwrap().unwrap();
        let second: Vec<String> = second.into_iter().map(|h| h.handle).collect();
        assert_eq!(second, expected.iter().skip(1).take(2).cloned().collect::<Vec<_>>(), "q={q:?}, cap {cap}: page 2");
    }
    let unknown = trellis_api::auth::hash_token("trl_not_a_token");
    let refused =
        trellis_store::search::indexed_users_for_token(&app.db.pool, &unknown, idle, q, 0, 50, 0).await.unwrap();
    assert!(refused.is_none(), "an unknown token finds nothing, not even an empty page");
}
