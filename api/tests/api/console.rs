//! The on-call console over plain HTTP: who may sign in, the session cookie, the security
//! headers, CSRF and origin checks, read-only operators, and the dead-letter actions end to
//! end (a real DLQ, the search projector running in-process on its replay consumer). The same
//! flows in a real browser: `console_browser.rs`.

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use trellis_domain::flags::{Executor, Flag};
use trellis_runtime::dlq::{self, DeadLetter, ErrorKind};
use trellis_testkit::eventually_ok;

use crate::helpers::{Options, PASSWORD, TestApp, TestUser};

/// A browser-less console client: keeps its session cookie, follows no redirect.
pub struct Console {
    base: String,
    http: reqwest::Client,
    cookie: Option<String>,
}

pub struct Page {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Page {
    pub fn location(&self) -> Option<&str> {
        self.headers.get(LOCATION).and_then(|v| v.to_str().ok())
    }

    /// The CSRF token the page's forms carry.
    pub fn csrf(&self) -> String {
        let at = self.body.find("name=\"csrf\" value=\"").expect("a form with a CSRF token") + 19;
        self.body[at..].split('"').next().unwrap().to_owned()
    }
}

impl Console {
    pub fn new(app: &TestApp) -> Self {
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        Console { base: format!("http://{}", app.addr), http, cookie: None }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Page {
        let req = match &self.cookie {
            Some(c) => req.header("cookie", format!("trellis_console={c}")),
            None => req,
        };
        let r = req.send().await.expect("the console answers");
        Page { status: r.status(), headers: r.headers().clone(), body: r.text().await.unwrap() }
    }

    pub async fn get(&self, path: &str) -> Page {
        self.send(self.http.get(format!("{}{path}", self.base))).await
    }

    pub async fn post(&self, path: &str, form: &[(&str, &str)]) -> Page {
        self.send(self.http.post(format!("{}{path}", self.base)).form(form)).await
    }

    /// Signs in; returns the answer (a 303 to the console with the cookie, or a refusal).
    pub async fn sign_in(&mut self, login: &str) -> Page {
        let page = self.post("/console/sign-in", &[("login", login), ("password", PASSWORD)]).await;
        if let Some(cookie) = page.headers.get(SET_COOKIE).and_then(|v| v.to_str().ok()) {
            let value = cookie.split(';').next().unwrap().split_once('=').unwrap().1;
            self.cookie = Some(value.to_owned());
        }
        page
    }
}

/// Sets `flag` to `monolith`: this app runs that processor in its own process.
pub async fn run_in_process(app: &TestApp, flag: Flag) {
    let change = trellis_store::cutover::flags::Change {
        flag,
        value: Executor::Monolith,
        actor: "test",
        reason: "the processor in the API's process",
        forced: true,
    };
    trellis_store::cutover::flags::set(&app.db.pool, &change).await.unwrap();
}

async fn user_with_role(app: &TestApp, handle: &str, role: &str) -> TestUser {
    let user = app.register(handle).await;
    app.grant_role(&user, role).await;
    user
}

async fn flag(app: &TestApp, flag: Flag) -> Executor {
    trellis_store::cutover::flags::get(&app.db.pool, flag).await.unwrap().value
}

#[tokio::test]
async fn only_console_roles_sign_in_and_the_session_cookie_is_locked_down() {
    let app = TestApp::spawn().await;
    app.register("plain").await;
    user_with_role(&app, "oper", "operator").await;

    let mut anonymous = Console::new(&app);
    let page = anonymous.get("/console").await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(page.location(), Some("/console/sign-in"));
    let page = anonymous.get("/console/sign-in").await;
    assert_eq!(page.status, 200);
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(page.headers["x-frame-options"], "DENY");

    let refused = anonymous.sign_in("plain").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    assert!(refused.body.contains("may not use the console"), "{}", refused.body);
    assert!(refused.headers.get(SET_COOKIE).is_none());
    let wrong = anonymous.post("/console/sign-in", &[("login", "oper"), ("password", "not the password")]).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.headers.get(SET_COOKIE).is_none());

    let mut operator = Console::new(&app);
    let signed_in = operator.sign_in("oper").await;
    assert_eq!(signed_in.status, StatusCode::SEE_OTHER, "{}", signed_in.body);
    let cookie = signed_in.headers[SET_COOKIE].to_str().unwrap();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/console", "Max-Age=28800"] {
        assert!(cookie.contains(part), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    let overview = operator.get("/console").await;
    assert_eq!(overview.status, 200, "{}", overview.body);
    assert!(overview.body.contains("Overview") && overview.body.contains("oper"), "{}", overview.body);
    assert_eq!(overview.headers["cache-control"], "no-store");

    // Behind a TLS-terminating proxy the cookie is Secure.
    let tls = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = tls
        .post(format!("http://{}/console/sign-in", app.addr))
        .header("x-forwarded-proto", "https")
        .form(&[("login", "oper"), ("password", PASSWORD)])
        .send()
        .await
        .unwrap();
    assert!(r.headers()[SET_COOKIE].to_str().unwrap().contains("; Secure"));

    // Signing out revokes the session's token.
    let csrf = overview.csrf();
    let out = operator.post("/console/sign-out", &[("csrf", &csrf)]).await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert_eq!(operator.get("/console").await.location(), Some("/console/sign-in"));
}

#[tokio::test]
async fn a_post_without_the_sessions_csrf_token_or_from_another_origin_is_refused_and_changes_nothing() {
    let app = TestApp::spawn().await;
    user_with_role(&app, "oper", "operator").await;
    let mut console = Console::new(&app);
    console.sign_in("oper").await;
    let csrf = console.get("/console/cutover").await.csrf();

    let forged = console.post("/console/cutover/search.executor", &[("value", "shadow"), ("reason", "forged")]).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN, "{}", forged.body);
    let wrong = console
        .post("/console/cutover/search.executor", &[("value", "shadow"), ("reason", "forged"), ("csrf", "00ff")])
        .await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    let cross_site = console
        .send(
            console
                .http
                .post(format!("{}/console/cutover/search.executor", console.base))
                .header("origin", "https://evil.example")
                .form(&[("value", "shadow"), ("reason", "forged"), ("csrf", csrf.as_str())]),
        )
        .await;
    assert_eq!(cross_site.status, StatusCode::FORBIDDEN);
    assert_eq!(flag(&app, Flag::SearchExecutor).await, Executor::Worker, "nothing changed");

    // The same form with the token: the flag changes, audited with the signed-in account.
    let done = console
        .post(
            "/console/cutover/search.executor",
            &[("value", "shadow"), ("reason", "shadow period"), ("csrf", &csrf), ("force", "1")],
        )
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    assert_eq!(flag(&app, Flag::SearchExecutor).await, Executor::Shadow);
    let (actor,): (String,) = sqlx::query_as("SELECT actor FROM ops.feature_flag_audit ORDER BY id DESC LIMIT 1")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(actor, "oper (console)");
    // And back in one click: the roll-back form.
    let page = console.get("/console/cutover").await;
    assert!(page.body.contains("Roll back to worker"), "{}", page.body);
    let back = console
        .post(
            "/console/cutover/search.executor",
            &[("value", "worker"), ("rollback", "1"), ("reason", "done"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(back.status, StatusCode::SEE_OTHER, "{}", back.body);
    assert_eq!(flag(&app, Flag::SearchExecutor).await, Executor::Worker);
    // The shadow period's parity report is on the page (no comparison in so short a period).
    let page = console.get("/console/cutover").await;
    assert!(page.body.contains("Shadow period since"), "{}", page.body);
    assert!(page.body.contains("<strong>0</strong> matched"), "{}", page.body);
}

#[tokio::test]
async fn a_read_only_operator_sees_every_page_and_every_action_is_refused_on_the_server() {
    let app = TestApp::spawn().await;
    user_with_role(&app, "watcher", "read_only_operator").await;
    let mut console = Console::new(&app);
    assert_eq!(console.sign_in("watcher").await.status, StatusCode::SEE_OTHER);
    for path in ["/console", "/console/dead-letters", "/console/cutover", "/console/score-runs"] {
        let page = console.get(path).await;
        assert_eq!(page.status, 200, "{path}: {}", page.body);
        assert!(!page.body.contains("type=\"submit\" name=\"intent\""), "{path} offers no action");
    }
    let cutover = console.get("/console/cutover").await;
    assert!(!cutover.body.contains("Force past the promotion gate"), "no flag form");
    let csrf = cutover.csrf();
    let flip = console
        .post(
            "/console/cutover/search.executor",
            &[("value", "shadow"), ("reason", "x"), ("csrf", &csrf), ("force", "1")],
        )
        .await;
    assert_eq!(flip.status, StatusCode::FORBIDDEN);
    assert_eq!(flag(&app, Flag::SearchExecutor).await, Executor::Worker);
    let run = console.post("/console/score-runs", &[("csrf", &csrf)]).await;
    assert_eq!(run.status, StatusCode::FORBIDDEN);
    let (requested,): (i64,) = sqlx::query_as("SELECT count(*) FROM ops.outbox WHERE subject LIKE '%run_requested'")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(requested, 0);
    let purge = console.post("/console/dead-letters/confirm", &[("intent", "purge:matching"), ("csrf", &csrf)]).await;
    assert_eq!(purge.status, StatusCode::FORBIDDEN);
    // Moderation is not theirs.
    assert_eq!(console.get("/console/moderation").await.status, StatusCode::FORBIDDEN);
}

/// Publishes a dead letter of `consumer` as the runtime would.
pub async fn dead_letter(app: &TestApp, consumer: &str, subject: &str, error: &str, seq: u64, payload: Vec<u8>) {
    let client = async_nats::connect(&app.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let topology = trellis_runtime::nats::Topology::new(&app.prefix).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let letter = DeadLetter {
        consumer,
        original_subject: subject,
        stream: "EVENTS",
        stream_sequence: seq,
        deliveries: 1,
        kind: if payload.first() == Some(&b'{') { ErrorKind::Permanent } else { ErrorKind::Decode },
        error,
        first_failure: now,
        host: "test",
        version: "test",
        now,
        trace: None,
    };
    dlq::publish(&js, &topology, &letter, None, payload.into()).await.unwrap();
}

/// Waits until `consumer`'s replay consumer exists: its processor runs (in this app, once the
/// flag it was given has reached it).
pub async fn until_replayable(app: &TestApp, consumer: &str) {
    let client = async_nats::connect(&app.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let topology = trellis_runtime::nats::Topology::new(&app.prefix).unwrap();
    eventually_ok(&format!("{consumer} takes replays"), std::time::Duration::from_secs(60), || async {
        let stream = js.get_stream(topology.replay_stream()).await.map_err(|e| e.to_string())?;
        let found: Result<async_nats::jetstream::consumer::PullConsumer, _> =
            stream.get_consumer(&topology.name(consumer)).await;
        found.map(|_| ()).map_err(|e| e.to_string())
    })
    .await;
}

async fn audit_status(app: &TestApp, action: &str) -> Vec<(String, i32, Option<serde_json::Value>)> {
    sqlx::query_as("SELECT status, done, outcome FROM ops.dlq_audit WHERE action = $1 ORDER BY started_at")
        .bind(action)
        .fetch_all(&app.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn dead_letters_are_found_by_fingerprint_replayed_with_a_canary_parked_and_purged() {
    let app = TestApp::spawn().await;
    // The search projector runs in this process (and drains its replay consumer).
    run_in_process(&app, Flag::SearchExecutor).await;
    user_with_role(&app, "oper", "operator").await;
    let bob = app.register("bob").await;
    // A real event of the projector's (bob's registration) dead-lettered twice over, and three
    // poisoned messages of another cause.
    let (subject, envelope): (String, serde_json::Value) =
        sqlx::query_as("SELECT subject, payload FROM ops.outbox WHERE subject LIKE '%user_registered' LIMIT 1")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    let good = serde_json::to_vec(&envelope).unwrap();
    for seq in [1, 2] {
        dead_letter(&app, "search-projector", &subject, "db timeout after 30 ms", seq, good.clone()).await;
    }
    for seq in [3, 4, 5] {
        dead_letter(
            &app,
            "search-projector",
            &subject,
            "payload is not an event envelope: expected value at line 1 column 1",
            seq,
            b"garbage".to_vec(),
        )
        .await;
    }
    until_replayable(&app, "search-projector").await;
    let mut console = Console::new(&app);
    console.sign_in("oper").await;
    let overview = console.get("/console").await;
    let depth = "<a class=\"status-bad\" href=\"/console/dead-letters?consumer=search-projector\">5</a>";
    assert!(overview.body.contains(depth), "the overview counts them: {}", overview.body);
    let list = console.get("/console/dead-letters").await;
    assert!(list.body.contains("<strong>5</strong> dead letters match"), "{}", list.body);
    assert!(list.body.contains("permanent: db timeout after N ms"), "grouped by fingerprint: {}", list.body);
    let csrf = list.csrf();

    // The poisoned group by its fingerprint: a replay with one canary stops when it dies again.
    let poisoned = [
        ("fingerprint", "decode: payload is not an event envelope: expected value at line N column N"),
        ("csrf", csrf.as_str()),
    ];
    let found = console.get("/console/dead-letters?fingerprint=decode%3A+payload+is+not+an+event+envelope%3A+expected+value+at+line+N+column+N").await;
    assert!(found.body.contains("<strong>3</strong> dead letters match"), "{}", found.body);
    let mut form = poisoned.to_vec();
    form.push(("intent", "replay:matching"));
    let confirm = console.post("/console/dead-letters/confirm", &form).await;
    assert_eq!(confirm.status, 200, "{}", confirm.body);
    assert!(confirm.body.contains("replay 3 dead letters"), "the confirmation names the count: {}", confirm.body);
    form.extend([("expected", "3"), ("reason", "try the poisoned ones"), ("canary", "1")]);
    let started = console.post("/console/dead-letters/act", &form).await;
    assert_eq!(started.status, StatusCode::SEE_OTHER, "{}", started.body);
    eventually_ok("the canary dies again and the replay stops", std::time::Duration::from_secs(60), || async {
        let rows = audit_status(&app, "replay").await;
        match rows.first() {
            Some((status, _, outcome)) if status == "stopped" => Ok(outcome.clone()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let action = console.get(started.location().unwrap()).await;
    assert!(action.body.contains("canaries died again"), "{}", action.body);

    // Park the poisoned ones (out of every replay), then purge them with a typed confirmation.
    let mut park = poisoned.to_vec();
    park.extend([("intent", "park:matching"), ("expected", "3"), ("reason", "poison, keep for analysis")]);
    assert_eq!(console.post("/console/dead-letters/act", &park).await.status, StatusCode::SEE_OTHER);
    let rest = console.get("/console/dead-letters").await;
    assert!(rest.body.contains("<strong>2</strong> dead letters match"), "parked ones are out: {}", rest.body);
    let parked = console.get("/console/dead-letters?parked=1").await;
    assert!(parked.body.contains("<strong>3</strong> parked dead letters match"), "{}", parked.body);

    // Everything matching (the two good ones) replays: the canary passes, the rest follows,
    // and the projector indexes bob.
    let replay = [
        ("intent", "replay:matching"),
        ("csrf", csrf.as_str()),
        ("expected", "2"),
        ("reason", "db is back"),
        ("canary", "1"),
    ];
    let started = console.post("/console/dead-letters/act", &replay).await;
    assert_eq!(started.status, StatusCode::SEE_OTHER, "{}", started.body);
    eventually_ok("the replay completes", std::time::Duration::from_secs(60), || async {
        let rows = audit_status(&app, "replay").await;
        match rows.get(1) {
            Some((status, 2, _)) if status == "completed" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let _ = bob;
    let left = console.get("/console/dead-letters").await;
    assert!(left.body.contains("<strong>0</strong> dead letters match"), "{}", left.body);

    let mut purge = vec![
        ("fingerprint", "decode: payload is not an event envelope: expected value at line N column N"),
        ("parked", "1"),
        ("csrf", csrf.as_str()),
    ];
    purge.extend([("intent", "purge:matching"), ("expected", "3"), ("reason", "analysed"), ("confirm", "purge 2")]);
    let mistyped = console.post("/console/dead-letters/act", &purge).await;
    assert_eq!(mistyped.status, StatusCode::BAD_REQUEST, "the typed count must match");
    purge.pop();
    purge.push(("confirm", "purge 3"));
    assert_eq!(console.post("/console/dead-letters/act", &purge).await.status, StatusCode::SEE_OTHER);
    eventually_ok("the purge completes", std::time::Duration::from_secs(60), || async {
        match audit_status(&app, "purge").await.first() {
            Some((status, 3, _)) if status == "completed" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let (parked_rows,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM ops.dlq_parked").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(parked_rows, 0);
    assert!(console.get("/console/dead-letters?parked=1").await.body.contains("<strong>0</strong> parked"));
    // Every action is audited with the signed-in account.
    let actors: Vec<(String,)> =
        sqlx::query_as("SELECT DISTINCT actor FROM ops.dlq_audit").fetch_all(&app.db.pool).await.unwrap();
    assert_eq!(actors, vec![("oper (console)".to_owned(),)]);
}

#[tokio::test]
async fn the_overview_charts_each_processors_throughput_and_reads_the_stage_triggers() {
    // The console samples this app's own /metrics, where the in-process projector counts.
    let admin = trellis_testkit::free_port();
    let admin_addr = format!("127.0.0.1:{admin}");
    let metrics = format!("http://{admin_addr}/metrics");
    let args = ["--admin-addr", &admin_addr, "--metrics-url", &metrics, "--console-sample-interval", "1s"];
    let app = TestApp::spawn_with(Options { args: args.map(String::from).to_vec(), ..Options::default() }).await;
    run_in_process(&app, Flag::SearchExecutor).await;
    user_with_role(&app, "oper", "operator").await;
    let mut console = Console::new(&app);
    console.sign_in("oper").await;
    for i in 0..5 {
        app.register(&format!("user{i}")).await;
    }
    let page = eventually_ok(
        "the search projector's chart shows handled messages",
        std::time::Duration::from_secs(60),
        || async {
            let page = console.get("/console").await;
            // The projector's row: its chart's summary says it handled messages in the hour.
            let row = page
                .body
                .split("<code>search.executor</code>")
                .nth(1)
                .unwrap_or("")
                .split("</tr>")
                .next()
                .unwrap_or("");
            match row.split("aria-label=\"").nth(1).and_then(|l| l.split('"').next()) {
                Some(summary)
                    if summary
                        .split("over the hour ")
                        .nth(1)
                        .and_then(|rest| rest.split("/s").next())
                        .and_then(|n| n.parse::<f64>().ok())
                        .is_some_and(|n| n > 0.0) =>
                {
                    Ok(page)
                }
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert!(page.body.contains("<polyline"), "{}", page.body);
    // One process (this one) pulls from the search projector's consumer; the dispute
    // processor's consumers do not exist (its flag says `worker`, and no worker runs).
    let cell = |consumer: &str| {
        let row = page.body.split(&format!("<code>{consumer}</code></td>")).nth(1).unwrap_or("").to_owned();
        row.split("<td class=\"num\">").nth(3).unwrap_or("").split('<').next().unwrap_or("").to_owned()
    };
    assert_eq!(cell("search-projector"), "1", "{}", page.body);
    let dispute = page.body.split("<code>dispute-processor-p0</code></td>").nth(1).unwrap_or("");
    assert!(dispute.split("</tr>").next().unwrap_or("").contains("unavailable"), "{}", page.body);
    // The cutover page shows what this process acts on, as its /metrics reports it.
    let cutover = console.get("/console/cutover").await;
    let row =
        cutover.body.split(&format!("<code>{metrics}</code>")).nth(1).unwrap_or("").split("</tr>").next().unwrap_or("");
    assert!(row.contains("<span class=\"status-ok\">monolith</span>"), "{row}: {}", cutover.body);
    assert!(page.body.contains("Stage triggers"), "{}", page.body);
    for metric in trellis_domain::stage::TRIGGERS.iter().map(|t| t.metric) {
        assert!(page.body.contains(metric), "the trigger {metric} is shown: {}", page.body);
    }
}

#[tokio::test]
async fn a_long_replay_shows_its_progress_and_stops_when_cancelled_losing_nothing() {
    let app = TestApp::spawn().await;
    user_with_role(&app, "oper", "operator").await;
    for seq in 1..=20 {
        let payload = format!("{{\"n\":{seq}}}").into_bytes();
        dead_letter(&app, "score-orchestrator", "events.scores.run_requested", "lease lost", seq, payload).await;
    }
    let mut console = Console::new(&app);
    console.sign_in("oper").await;
    let csrf = console.get("/console/dead-letters").await.csrf();
    // Two a second: about ten seconds for the twenty.
    let form = [
        ("intent", "replay:matching"),
        ("csrf", csrf.as_str()),
        ("expected", "20"),
        ("reason", "slowly"),
        ("rate", "2"),
        ("canary", "0"),
    ];
    let started = console.post("/console/dead-letters/act", &form).await;
    assert_eq!(started.status, StatusCode::SEE_OTHER, "{}", started.body);
    let page = started.location().unwrap().to_owned();
    eventually_ok("the replay records progress", std::time::Duration::from_secs(30), || async {
        match audit_status(&app, "replay").await.first() {
            Some((status, done, _)) if status == "running" && *done > 0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let running = console.get(&page).await;
    assert!(running.body.contains("<progress"), "{}", running.body);
    let cancelled = console.post(&format!("{page}/cancel"), &[("csrf", &csrf)]).await;
    assert_eq!(cancelled.status, StatusCode::SEE_OTHER, "{}", cancelled.body);
    let done = eventually_ok("the replay stops", std::time::Duration::from_secs(30), || async {
        match audit_status(&app, "replay").await.first() {
            Some((status, done, _)) if status == "cancelled" => Ok(*done),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(done > 0 && done < 20, "stopped part-way: {done}");
    // Nothing lost: what was replayed left the DLQ, the rest is still there.
    let left = console.get("/console/dead-letters").await;
    let expected = format!("<strong>{}</strong> dead letters match", 20 - done);
    assert!(left.body.contains(&expected), "{expected}: {}", left.body);
    let client = async_nats::connect(&app.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let topology = trellis_runtime::nats::Topology::new(&app.prefix).unwrap();
    let mut replay = js.get_stream(topology.replay_stream()).await.unwrap();
    assert_eq!(replay.info().await.unwrap().state.messages, done as u64);
    let status = console.get(&page).await;
    assert!(status.body.contains("cancelled") && status.body.contains("oper (console)"), "{}", status.body);
}

#[tokio::test]
async fn a_moderator_decides_a_dispute_that_needs_review_from_the_queue() {
    let app = TestApp::spawn().await;
    run_in_process(&app, Flag::DisputeExecutor).await;
    user_with_role(&app, "mod", "moderator").await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let filed = app
        .post(
            "/v1/disputes",
            Some(&alice.token),
            serde_json::json!({"target_id": bob.id, "kind": "spam", "description": "sends me ads"}),
        )
        .await;
    assert_eq!(filed.status, 201, "{:?}", filed.body);
    let id = filed.body["id"].as_str().unwrap().to_owned();
    let mut console = Console::new(&app);
    console.sign_in("mod").await;
    // Nothing is known of either: the rules leave it to a moderator.
    let queue = eventually_ok("the dispute reaches the queue", std::time::Duration::from_secs(60), || async {
        let page = console.get("/console/moderation").await;
        if page.body.contains(&id) { Ok(page) } else { Err("not yet".to_owned()) }
    })
    .await;
    assert!(queue.body.contains("sends me ads"), "{}", queue.body);
    let csrf = queue.csrf();
    let decided = console
        .post(
            &format!("/console/moderation/{id}"),
            &[("csrf", &csrf), ("decision", "dismissed"), ("note", "ads are allowed")],
        )
        .await;
    assert_eq!(decided.status, StatusCode::SEE_OTHER, "{}", decided.body);
    let (status, note): (String, Option<String>) =
        sqlx::query_as("SELECT status, decision_note FROM security.disputes WHERE id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), note.as_deref()), ("dismissed", Some("ads are allowed")));
    assert!(!console.get("/console/moderation").await.body.contains(&id), "decided: out of the queue");
    // Operations pages are not a moderator's.
    assert_eq!(console.get("/console/dead-letters").await.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn the_console_can_be_served_on_the_admin_listener_only_or_not_at_all() {
    let app =
        TestApp::spawn_with(Options { args: vec!["--console".into(), "admin".into()], ..Options::default() }).await;
    user_with_role(&app, "oper", "operator").await;
    let public = Console::new(&app).get("/console/sign-in").await;
    assert_eq!(public.status, StatusCode::NOT_FOUND, "not on the public listener");
    assert!(public.body.contains("route-not-found"), "the API's problem: {}", public.body);
    let mut admin = Console { base: format!("http://{}", app.admin_addr), ..Console::new(&app) };
    assert_eq!(admin.sign_in("oper").await.status, StatusCode::SEE_OTHER);
    let overview = admin.get("/console").await;
    assert_eq!(overview.status, 200, "{}", overview.body);
    assert!(overview.body.contains("Overview"));
    // The admin listener's own routes are unchanged.
    assert_eq!(admin.get("/readyz").await.status, 200);

    let off = TestApp::spawn_with(Options { args: vec!["--console".into(), "off".into()], ..Options::default() }).await;
    assert_eq!(Console::new(&off).get("/console/sign-in").await.status, StatusCode::NOT_FOUND);
    let on_admin = Console { base: format!("http://{}", off.admin_addr), ..Console::new(&off) };
    assert_eq!(on_admin.get("/console/sign-in").await.status, StatusCode::NOT_FOUND);
}
