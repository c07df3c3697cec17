//! The on-call console in a real browser (headless Chromium through chromedriver): an operator
//! signs in, finds poisoned dead letters by fingerprint, replays everything matching with a
//! canary, parks and purges, flips a cutover flag and back, triggers a score run and watches it
//! finish; a form posted without the session's CSRF token is refused; a user without a console
//! role is refused and a read-only operator cannot act. Every page is checked with axe-core (no
//! serious or critical violation) and saved as a screenshot under `target/screenshots/`.

use std::time::Duration;

use trellis_domain::flags::{Executor, Flag};
use trellis_testkit::browser::Browser;
use trellis_testkit::eventually_ok;

use crate::console::{dead_letter, run_in_process, until_replayable};
use crate::helpers::{Options, PASSWORD, TestApp};

const WAIT: Duration = Duration::from_secs(60);

async fn sign_in(browser: &Browser, app: &TestApp, login: &str) {
    browser.goto(&format!("http://{}/console/sign-in", app.addr)).await.unwrap();
    browser.fill("#login", login).await.unwrap();
    browser.fill("#password", PASSWORD).await.unwrap();
    browser.click("form[action='/console/sign-in'] button[type=submit]").await.unwrap();
}

/// The page shown has no serious accessibility violation; saves its screenshot.
async fn check_page(browser: &Browser, name: &str) {
    let serious = browser.serious_violations().await.unwrap();
    assert!(serious.is_empty(), "{name}: {}", serious.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("\n"));
    browser.screenshot(name).await.unwrap();
}

async fn text_becomes(browser: &Browser, css: &str, wanted: &str) {
    eventually_ok(&format!("`{css}` says {wanted}"), WAIT, || async {
        match browser.text_of(css).await {
            Ok(text) if text.contains(wanted) => Ok(()),
            Ok(text) => Err(text),
            Err(e) => Err(format!("{e:#}")),
        }
    })
    .await;
}

#[tokio::test]
async fn an_operator_works_the_console_in_a_browser() {
    // The console samples this app's own /metrics for its charts.
    let admin = format!("127.0.0.1:{}", trellis_testkit::free_port());
    let metrics = format!("http://{admin}/metrics");
    let args = ["--admin-addr", &admin, "--metrics-url", &metrics, "--console-sample-interval", "1s"];
    let app = TestApp::spawn_with(Options { args: args.map(String::from).to_vec(), ..Options::default() }).await;
    for flag in Flag::ALL {
        run_in_process(&app, flag).await;
    }
    let oper = app.register("oper").await;
    app.grant_role(&oper, "operator").await;
    for handle in ["bob", "carol"] {
        app.register(handle).await;
    }
    let (subject, envelope): (String, serde_json::Value) =
        sqlx::query_as("SELECT subject, payload FROM ops.outbox WHERE subject LIKE '%user_registered' LIMIT 1")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    for seq in [1, 2] {
        let good = serde_json::to_vec(&envelope).unwrap();
        dead_letter(&app, "search-projector", &subject, "db timeout after 30 ms", seq, good).await;
    }
    let poison = "payload is not an event envelope: expected value at line 1 column 1";
    for seq in [3, 4, 5] {
        dead_letter(&app, "search-projector", &subject, poison, seq, b"garbage".to_vec()).await;
    }

    until_replayable(&app, "search-projector").await;
    let browser = Browser::start().await.unwrap();
    browser.goto(&format!("http://{}/console", app.addr)).await.unwrap();
    browser.wait_for("#login").await.unwrap();
    check_page(&browser, "console-sign-in").await;
    sign_in(&browser, &app, "oper").await;
    text_becomes(&browser, "h1", "Overview").await;
    text_becomes(&browser, "#overview", "search-projector").await;
    // The charts fill in as samples arrive (the page refreshes itself).
    eventually_ok("three charts", WAIT, || async {
        let n = browser.client().execute("return document.querySelectorAll('svg.chart').length;", Vec::new()).await;
        match n {
            Ok(n) if n == serde_json::json!(3) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    check_page(&browser, "console-overview").await;

    // Find the poisoned ones by their fingerprint.
    browser.click("nav a[href='/console/dead-letters']").await.unwrap();
    text_becomes(&browser, "main", "5 dead letters match").await;
    check_page(&browser, "console-dead-letters").await;
    browser.click("a[href*='fingerprint=decode']").await.unwrap();
    text_becomes(&browser, "main", "3 dead letters match").await;

    // Replay everything matching with a canary: it dies again, and the replay stops.
    browser.click("button[value='replay:matching']").await.unwrap();
    text_becomes(&browser, "h1", "replay 3 dead letters").await;
    check_page(&browser, "console-confirm-replay").await;
    browser.wait_for("#reason").await.unwrap();
    browser.fill("#reason", "try the poisoned ones").await.unwrap();
    browser.fill("#canary", "1").await.unwrap();
    browser.click("main form button[type=submit]").await.unwrap();
    text_becomes(&browser, "#action-status", "stopped").await;
    text_becomes(&browser, "main", "canaries died again").await;
    check_page(&browser, "console-replay-stopped").await;

    // Park them.
    browser
        .goto(&format!(
            "http://{}/console/dead-letters?fingerprint=decode%3A+payload+is+not+an+event+envelope%3A+expected+value+at+line+N+column+N",
            app.addr
        ))
        .await
        .unwrap();
    text_becomes(&browser, "main", "3 dead letters match").await;
    browser.click("button[value='park:matching']").await.unwrap();
    browser.wait_for("#reason").await.unwrap();
    browser.fill("#reason", "poison, kept for analysis").await.unwrap();
    browser.click("main form button[type=submit]").await.unwrap();
    text_becomes(&browser, "#action-status", "completed").await;

    // Replay everything left with a canary: it passes, the rest follows, the projector takes them.
    browser.click("nav a[href='/console/dead-letters']").await.unwrap();
    text_becomes(&browser, "main", "2 dead letters match").await;
    browser.click("button[value='replay:matching']").await.unwrap();
    browser.wait_for("#reason").await.unwrap();
    browser.fill("#reason", "the database is back").await.unwrap();
    browser.click("main form button[type=submit]").await.unwrap();
    text_becomes(&browser, "#action-status", "completed").await;
    text_becomes(&browser, "main", "canaries were processed without dying again").await;
    check_page(&browser, "console-replay-completed").await;
    browser.click("nav a[href='/console/dead-letters']").await.unwrap();
    text_becomes(&browser, "main", "0 dead letters match").await;

    // Look at a parked one, then purge the parked ones with the typed confirmation.
    browser.goto(&format!("http://{}/console/dead-letters?parked=1", app.addr)).await.unwrap();
    text_becomes(&browser, "main", "3 parked dead letters match").await;
    browser.click("main table a[href^='/console/dead-letters/']").await.unwrap();
    text_becomes(&browser, "h1", "Dead letter").await;
    text_becomes(&browser, "main", "Failure history").await;
    check_page(&browser, "console-dead-letter").await;
    browser.goto(&format!("http://{}/console/dead-letters?parked=1", app.addr)).await.unwrap();
    browser.click("button[value='purge:matching']").await.unwrap();
    browser.wait_for("#reason").await.unwrap();
    browser.fill("#reason", "analysed").await.unwrap();
    browser.fill("#confirm", "purge 3").await.unwrap();
    check_page(&browser, "console-confirm-purge").await;
    browser.click("main form button[type=submit]").await.unwrap();
    text_becomes(&browser, "#action-status", "completed").await;
    browser.goto(&format!("http://{}/console/dead-letters?parked=1", app.addr)).await.unwrap();
    text_becomes(&browser, "main", "0 parked dead letters match").await;

    // A cutover flag to shadow and back in one click.
    browser.click("nav a[href='/console/cutover']").await.unwrap();
    text_becomes(&browser, "h1", "Cutover flags").await;
    let form = "form[action='/console/cutover/dispute.executor']";
    browser.click(&format!("{form} select[name=value] option[value=shadow]")).await.unwrap();
    browser.fill(&format!("{form} input[name=reason]"), "shadow period").await.unwrap();
    browser.click(&format!("{form} input[name=force]")).await.unwrap();
    browser.click(&format!("{form} button[type=submit]")).await.unwrap();
    text_becomes(&browser, "#flag-dispute\\.executor", "shadow").await;
    check_page(&browser, "console-cutover").await;
    let rollback = "form[action='/console/cutover/dispute.executor'] input[name=rollback]";
    browser.wait_for(rollback).await.unwrap();
    // Rolling back is one click (its reason is filled in).
    let back = "section[aria-labelledby='flag-dispute.executor'] form:nth-of-type(2)";
    browser.click(&format!("{back} button[type=submit]")).await.unwrap();
    text_becomes(&browser, "#flag-dispute\\.executor", "monolith").await;
    let flag = trellis_store::cutover::flags::get(&app.db.pool, Flag::DisputeExecutor).await.unwrap();
    assert_eq!(flag.value, Executor::Monolith);

    // Trigger a score run and watch it finish (the page refreshes itself).
    browser.click("nav a[href='/console/score-runs']").await.unwrap();
    browser.wait_for("#runs").await.unwrap();
    let runs = "return document.querySelectorAll('tr.run').length;";
    let before = browser.client().execute(runs, Vec::new()).await.unwrap().as_u64().unwrap();
    browser.click("form[action='/console/score-runs'] button").await.unwrap();
    eventually_ok("the requested run is shown, succeeded", WAIT, || async {
        let n = browser.client().execute(runs, Vec::new()).await.map_err(|e| e.to_string())?.as_u64().unwrap_or(0);
        let newest = browser.text_of("tr.run:first-child .run-status").await.map_err(|e| e.to_string())?;
        if n == before + 1 && newest == "succeeded" { Ok(()) } else { Err(format!("{n} runs, the newest {newest}")) }
    })
    .await;
    let (users,): (Option<i64>,) = sqlx::query_as("SELECT users FROM score.runs ORDER BY created_at DESC LIMIT 1")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(users.is_some_and(|u| u >= 3), "the run scored the registered users: {users:?}");
    check_page(&browser, "console-score-runs").await;

    // A post without the session's CSRF token is refused, even from the console's own page.
    let status = browser
        .client()
        .execute(
            "return fetch('/console/score-runs', {method: 'POST', credentials: 'same-origin'}).then(r => r.status);",
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(status, serde_json::json!(403));
    browser.close().await.unwrap();
}

#[tokio::test]
async fn a_user_without_a_console_role_is_refused_and_a_read_only_operator_cannot_act() {
    let app = TestApp::spawn().await;
    app.register("plain").await;
    let watcher = app.register("watcher").await;
    app.grant_role(&watcher, "read_only_operator").await;
    let moderator = app.register("mod").await;
    app.grant_role(&moderator, "moderator").await;

    let browser = Browser::start().await.unwrap();
    sign_in(&browser, &app, "plain").await;
    text_becomes(&browser, "[role=alert]", "may not use the console").await;
    check_page(&browser, "console-sign-in-refused").await;

    sign_in(&browser, &app, "watcher").await;
    text_becomes(&browser, "h1", "Overview").await;
    browser.click("nav a[href='/console/cutover']").await.unwrap();
    text_becomes(&browser, "h1", "Cutover flags").await;
    let forms = browser
        .client()
        .execute("return document.querySelectorAll(\"form[action^='/console/cutover/']\").length;", Vec::new())
        .await
        .unwrap();
    assert_eq!(forms, serde_json::json!(0), "a read-only operator gets no flag form");
    check_page(&browser, "console-cutover-read-only").await;
    // Posting anyway, with the session's own CSRF token: refused on the server.
    let status = browser
        .client()
        .execute_async(
            "const done = arguments[arguments.length - 1];
             const csrf = document.querySelector('input[name=csrf]').value;
             fetch('/console/cutover/search.executor', {method: 'POST', credentials: 'same-origin',
                 body: new URLSearchParams({csrf, value: 'shadow', reason: 'x', force: '1'})})
               .then(r => done(r.status));",
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(status, serde_json::json!(403));
    let flag = trellis_store::cutover::flags::get(&app.db.pool, Flag::SearchExecutor).await.unwrap();
    assert_eq!(flag.value, Executor::Worker);
    browser.click("header form[action='/console/sign-out'] button").await.unwrap();
    browser.wait_for("#login").await.unwrap();

    // A moderator sees the moderation queue only.
    sign_in(&browser, &app, "mod").await;
    text_becomes(&browser, "h1", "Moderation queue").await;
    check_page(&browser, "console-moderation").await;
    browser.close().await.unwrap();
}
