//! Abuse limits, tried as an attacker would: each test floods or forges one thing against a
//! real API and checks the bound that holds it (docs/SECURITY.md, "Abuse limits").

use std::time::Duration;

use futures::StreamExt as _;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

use trellis_testkit::eventually;

use crate::helpers::{Options, PASSWORD, Resp, TestApp};

/// A `trellis-api` child process with `args`: these tests read its metrics, which apps in one
/// process would share.
fn with(args: &[&str]) -> Options {
    Options { args: args.iter().map(|a| a.to_string()).collect(), process: true, ..Default::default() }
}

async fn login(app: &TestApp, login: &str, password: &str) -> Resp {
    app.post("/v1/sessions", None, json!({"login": login, "password": password})).await
}

async fn login_from(app: &TestApp, client: &reqwest::Client, login: &str, headers: &[(&str, &str)]) -> Resp {
    let mut req = app.build_on(
        client,
        Method::POST,
        "/v1/sessions",
        None,
        Some(json!({"login": login, "password": "wrong password!"})),
    );
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    app.send(req).await
}

async fn limiter_keys(app: &TestApp, limiter: &str) -> f64 {
    app.labelled_metric("trellis_api_rate_limiter_keys", &format!("limiter=\"{limiter}\""))
        .await
        .unwrap_or_else(|| panic!("trellis_api_rate_limiter_keys{{limiter=\"{limiter}\"}} is exported"))
}

/// A TCP connection to the API from the loopback address `from`.
async fn connect_from(app: &TestApp, from: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(app.addr).await.expect("connects")
}

/// Reads until the server closes the connection (or resets it); the bytes read.
async fn read_to_close(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut read = Vec::new();
    let mut buf = [0u8; 4096];
    let outcome = tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(outcome.is_ok(), "the server kept the connection open for {within:?}");
    read
}

fn assert_overloaded(r: &Resp) {
    assert_eq!((r.status, r.problem()), (503, "overloaded"), "{:?}", r.body);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let retry_after: u64 = r.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!(retry_after >= 1);
}

// --- Login limiter memory ---------------------------------------------------------------

#[tokio::test]
async fn a_login_longer_than_254_characters_is_refused_before_it_is_looked_up_or_counted() {
    let app = TestApp::spawn_with(with(&[])).await;
    let long = "a".repeat(255);
    let r = login(&app, &long, PASSWORD).await;
    assert_eq!((r.status, r.problem()), (422, "validation"), "{:?}", r.body);
    assert_eq!(r.body["errors"][0]["field"], "login");
    assert_eq!(r.body["errors"][0]["code"], "too_long");
    assert_eq!(limiter_keys(&app, "login_account").await, 0.0);
    assert_eq!(limiter_keys(&app, "login_address").await, 0.0);
    // 254 characters are a login like any other.
    assert_eq!(login(&app, &"a".repeat(254), PASSWORD).await.status, 401);
}

#[tokio::test]
async fn twenty_thousand_distinct_long_logins_leave_the_login_limiter_bounded() {
    // The address allowance is lifted so that every attempt reaches the account limiter; the
    // hashing slots are one slot with no queue, so attempts past it are shed instead of hashed.
    // A sign-in reserves its slot before the account lookup, so only the attempts that got the
    // slot reach the account limiter (some tens in the test's time): its capacity is set below
    // that, so that the bound is what the test sees.
    let args = [
        "--login-rate-per-address",
        "1000000",
        "--rate-limiter-capacity",
        "20",
        "--password-hash-concurrency",
        "1",
        "--password-hash-queue",
        "0",
    ];
    // A process of its own: the gauge read below is this app's alone.
    let options = Options { args: args.map(String::from).to_vec(), process: true, ..Default::default() };
    let app = TestApp::spawn_with(options).await;
    let statuses: Vec<u16> = futures::stream::iter(0..20_000)
        .map(|i| {
            let app = &app;
            async move {
                let login = format!("{i:08}{}", "x".repeat(242));
                assert_eq!(login.chars().count(), 250);
                login_status(app, &login).await
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| [401, 503].contains(s)), "only 401 and 503: {:?}", distinct(&statuses));
    let keys = limiter_keys(&app, "login_account").await;
    assert!(keys <= 20.0, "{keys} account keys for 20,000 logins");
    assert!(keys >= 10.0, "the limiter keeps recent keys ({keys})");
}

async fn login_status(app: &TestApp, login: &str) -> u16 {
    let req =
        app.build(Method::POST, "/v1/sessions", None, Some(json!({"login": login, "password": "wrong password!"})));
    req.send().await.expect("request sent").status().as_u16()
}

fn distinct(statuses: &[u16]) -> Vec<u16> {
    let mut d = statuses.to_vec();
    d.sort_unstable();
    d.dedup();
    d
}

#[tokio::test]
async fn a_login_its_address_refuses_adds_no_account_key() {
    let app = TestApp::spawn_with(with(&["--login-rate-per-address", "2"])).await;
    for i in 0..2 {
        assert_eq!(login(&app, &format!("someone{i}"), "wrong password!").await.status, 401);
    }
    for i in 2..10 {
        let r = login(&app, &format!("someone{i}"), "wrong password!").await;
        assert_eq!((r.status, r.problem()), (429, "rate-limited"));
    }
    assert_eq!(limiter_keys(&app, "login_account").await, 2.0);
    assert_eq!(limiter_keys(&app, "login_address").await, 1.0);
}

#[tokio::test]
async fn a_users_handle_and_email_share_one_login_allowance() {
    let app = TestApp::spawn().await;
    app.register("alice").await;
    for login_name in ["alice", "ALICE@example.com"].iter().cycle().take(10) {
        assert_eq!(login(&app, login_name, "wrong password!").await.status, 401);
    }
    for login_name in ["alice", "Alice@Example.COM"] {
        let r = login(&app, login_name, PASSWORD).await;
        assert_eq!((r.status, r.problem()), (429, "rate-limited"), "{login_name}");
    }
}

#[tokio::test]
async fn forwarded_addresses_count_only_from_a_trusted_proxy() {
    let proxy = TestApp::client_from("127.0.0.1");
    // No trusted proxies: a forged X-Forwarded-For changes nothing.
    let app = TestApp::spawn_with(with(&["--login-rate-per-address", "2"])).await;
    for (i, forged) in ["198.51.100.1", "198.51.100.2", "198.51.100.3"].into_iter().enumerate() {
        let r = login_from(&app, &proxy, &format!("user{i}"), &[("x-forwarded-for", forged)]).await;
        assert_eq!(r.status, if i < 2 { 401 } else { 429 }, "{forged}");
    }
    drop(app);

    // Loopback is the proxy: each forwarded client has its own allowance.
    let app = TestApp::spawn_with(with(&["--login-rate-per-address", "2", "--trusted-proxies", "127.0.0.0/8"])).await;
    let first = [("x-forwarded-for", "203.0.113.9, 198.51.100.1")];
    for i in 0..2 {
        assert_eq!(login_from(&app, &proxy, &format!("user{i}"), &first).await.status, 401);
    }
    assert_eq!(login_from(&app, &proxy, "user2", &first).await.status, 429);
    // The left-most entry is the client's own claim and is not believed: same client.
    let spoofed = [("x-forwarded-for", "203.0.113.10, 198.51.100.1")];
    assert_eq!(login_from(&app, &proxy, "user3", &spoofed).await.status, 429);
    let second = [("forwarded", "for=198.51.100.2;proto=https")];
    assert_eq!(login_from(&app, &proxy, "user4", &second).await.status, 401);
    // One IPv6 /64 is one client.
    let v6a = [("forwarded", "for=\"[2001:db8:1:2::a]\"")];
    let v6b = [("forwarded", "for=\"[2001:db8:1:2::b]:4711\"")];
    assert_eq!(login_from(&app, &proxy, "user5", &v6a).await.status, 401);
    assert_eq!(login_from(&app, &proxy, "user6", &v6b).await.status, 401);
    assert_eq!(login_from(&app, &proxy, "user7", &v6a).await.status, 429);
}

#[tokio::test]
async fn login_answers_are_counted_by_status_for_the_alert() {
    // A process of its own (`with`): the apps of this test process share one metrics recorder,
    // and other tests' logins would count here too.
    let app = TestApp::spawn_with(with(&["--login-rate-per-address", "2"])).await;
    let count = |status: &'static str| {
        let app = &app;
        async move { app.labelled_metric("trellis_api_login_responses_total", &format!("status=\"{status}\"")).await }
    };
    assert_eq!(count("401").await, Some(0.0), "every status exists from start-up");
    assert_eq!(count("429").await, Some(0.0));
    for _ in 0..3 {
        login(&app, "nobody", "wrong password!").await;
    }
    assert_eq!(count("401").await, Some(2.0));
    assert_eq!(count("429").await, Some(1.0));
}

// --- Unthrottled argon2 -----------------------------------------------------------------

async fn hashes(app: &TestApp, operation: &str) -> f64 {
    app.labelled_metric("trellis_api_password_hashes_total", &format!("operation=\"{operation}\""))
        .await
        .expect("trellis_api_password_hashes_total is exported")
}

#[tokio::test]
async fn a_registration_with_a_taken_handle_or_email_is_refused_before_hashing() {
    let app = TestApp::spawn_with(with(&[])).await;
    app.register("alice").await;
    let before = hashes(&app, "hash").await;
    let r = app
        .post(
            "/v1/users",
            None,
            json!({"handle": "alice", "display_name": "x", "email": "new@example.com", "password": PASSWORD}),
        )
        .await;
    assert_eq!((r.status, r.problem()), (409, "handle-taken"));
    let r = app
        .post(
            "/v1/users",
            None,
            json!({"handle": "alice2", "display_name": "x", "email": "alice@example.com", "password": PASSWORD}),
        )
        .await;
    assert_eq!((r.status, r.problem()), (409, "registration-refused"));
    assert_eq!(hashes(&app, "hash").await, before, "no password was hashed for a refused registration");
}

#[tokio::test]
async fn password_hashing_beyond_its_slots_and_queue_is_answered_503_at_once() {
    let app = TestApp::spawn_with(with(&[
        "--password-hash-concurrency",
        "1",
        "--password-hash-queue",
        "0",
        "--login-rate-per-address",
        "100000",
    ]))
    .await;
    let app = &app;
    let mut bursts = 0;
    let shed = eventually("16 logins at once to find the one hashing slot taken", Duration::from_secs(60), || {
        bursts += 1;
        let burst_no = bursts;
        async move {
            let burst: Vec<Resp> = futures::future::join_all(
                (0..16).map(|i| async move { login(app, &format!("nobody{burst_no}_{i}"), "wrong password!").await }),
            )
            .await;
            let statuses: Vec<u16> = burst.iter().map(|r| r.status).collect();
            assert!(statuses.iter().all(|s| [401, 503].contains(s)), "{statuses:?}");
            burst.into_iter().find(|r| r.status == 503)
        }
    })
    .await;
    assert_overloaded(&shed);
    let shed = app.labelled_metric("trellis_api_requests_shed_total", "reason=\"password_hashing\"").await;
    assert!(shed.unwrap_or(0.0) >= 1.0, "{shed:?}");
}

#[tokio::test]
async fn a_sign_in_finding_hashing_saturated_is_shed_before_it_looks_the_account_up() {
    let app = TestApp::spawn_with(with(&["--password-hash-concurrency", "1", "--password-hash-queue", "0"])).await;
    // The first sign-in takes the one hashing slot, then waits for its account lookup.
    let mut blocker = app.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE identity.users IN ACCESS EXCLUSIVE MODE").execute(&mut *blocker).await.unwrap();
    let first = tokio::spawn(
        app.build(Method::POST, "/v1/sessions", None, Some(json!({"login": "nobody", "password": "wrong password!"})))
            .send(),
    );
    until_waiting_for_a_lock(&app, 1).await;
    // A second is answered while the table is still locked: it never queried.
    let second = login(&app, "somebody", "wrong password!").await;
    assert_overloaded(&second);
    blocker.commit().await.unwrap();
    assert_eq!(first.await.unwrap().unwrap().status(), 401);
}

async fn register_from(app: &TestApp, client: &reqwest::Client, handle: &str) -> Resp {
    let body =
        json!({"handle": handle, "display_name": "x", "email": format!("{handle}@example.com"), "password": PASSWORD});
    app.send(app.build_on(client, Method::POST, "/v1/users", None, Some(body))).await
}

#[tokio::test]
async fn passwords_are_hashed_on_the_gates_own_low_priority_threads() {
    // In this process: the test reads this process's threads.
    let args = vec!["--password-hash-concurrency".into(), "2".into()];
    let _app = TestApp::spawn_with(Options { args, ..Default::default() }).await;
    // The threads of this test process (other tests' apps run here too, on the same kind).
    let threads: Vec<(String, i64)> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| {
            let task = task.ok()?.path();
            let name = std::fs::read_to_string(task.join("comm")).ok()?.trim().to_owned();
            let stat = std::fs::read_to_string(task.join("stat")).ok()?;
            // After the parenthesised name come the fields from the third (state) on; the
            // nineteenth is the nice value.
            let nice = stat.rsplit_once(')')?.1.split_whitespace().nth(16)?.parse().ok()?;
            Some((name, nice))
        })
        .filter(|(name, _)| name.starts_with("password-hash-"))
        .collect();
    assert!(threads.len() >= 2, "the gate's threads exist: {threads:?}");
    assert!(threads.iter().all(|(_, nice)| *nice == 19), "each runs at nice 19: {threads:?}");
}

#[tokio::test]
async fn registrations_are_limited_per_client_address() {
    let app = TestApp::spawn_with(with(&["--registration-rate-per-address", "3"])).await;
    let attacker = TestApp::client_from("127.0.0.2");
    for i in 0..3 {
        assert_eq!(register_from(&app, &attacker, &format!("bot{i}")).await.status, 201);
    }
    let r = register_from(&app, &attacker, "bot3").await;
    assert_eq!((r.status, r.problem()), (429, "rate-limited"), "{:?}", r.body);
    let retry_after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (60..=1200).contains(&retry_after),
        "an hour's allowance of 3 comes back one every 20 minutes: {retry_after}"
    );
    let legitimate = TestApp::client_from("127.0.0.3");
    assert_eq!(register_from(&app, &legitimate, "erin").await.status, 201);
}

#[tokio::test]
async fn registrations_are_limited_globally() {
    let app = TestApp::spawn_with(with(&["--registration-rate-global", "2"])).await;
    for (i, ip) in ["127.0.0.2", "127.0.0.3", "127.0.0.4"].into_iter().enumerate() {
        let r = register_from(&app, &TestApp::client_from(ip), &format!("user{i}")).await;
        assert_eq!(r.status, if i < 2 { 201 } else { 429 }, "{ip}: {:?}", r.body);
    }
}

#[tokio::test]
async fn current_password_checks_are_limited_per_user() {
    let app = TestApp::spawn_with(with(&["--current-password-rate-per-user", "3"])).await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let change = json!({"password": "a brand new password", "current_password": "not my password"});
    for _ in 0..3 {
        let r = app.patch("/v1/me", Some(&alice.token), change.clone()).await;
        assert_eq!((r.status, r.body["errors"][0]["code"].as_str()), (422, Some("incorrect")));
    }
    let right = json!({"password": "a brand new password", "current_password": PASSWORD});
    let r = app.patch("/v1/me", Some(&alice.token), right.clone()).await;
    assert_eq!((r.status, r.problem()), (429, "rate-limited"), "even the right password waits: {:?}", r.body);
    assert!(r.header("retry-after").is_some());
    assert_eq!(app.patch("/v1/me", Some(&bob.token), right).await.status, 200, "another user is not limited");
    // A display name needs no password check and is not limited.
    assert_eq!(app.patch("/v1/me", Some(&alice.token), json!({"display_name": "Alice"})).await.status, 200);
}

// --- Forgeable cursors --------------------------------------------------------------------

const CURSOR_KEY: &str = "a test cursor key of thirty-two bytes or more";

fn sealed(list: &str, key: &Value) -> String {
    let key_bytes = trellis_store::page::CursorKey::new(CURSOR_KEY.as_bytes());
    key_bytes.seal(list, &trellis_store::page::Cursor::of(key))
}

#[tokio::test]
async fn a_forged_search_cursor_is_400_and_an_offset_past_the_cap_is_422() {
    let app = TestApp::spawn_with(with(&["--cursor-key", CURSOR_KEY])).await;
    let alice = app.register("alice").await;
    for (_, handle) in (0..3).zip(["alice_a", "alice_b", "alice_c"]) {
        app.register(handle).await;
    }
    let first = app.get("/v1/search/users?q=alice&limit=2", Some(&alice.token)).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let next = first.body["next_cursor"].as_str().expect("a second page").to_owned();
    assert_eq!(
        app.get(&format!("/v1/search/users?q=alice&limit=2&cursor={next}"), Some(&alice.token)).await.status,
        200
    );

    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let (_, tag) = next.split_once('.').expect("a sealed cursor has a tag");
    let forged = [
        b64("100000000"),                      // yesterday's unsealed offset cursor
        format!("{}.{tag}", b64("100000000")), // a real tag on another offset
        sealed("search-contacts", &json!(2)),  // another list's cursor
        trellis_store::page::CursorKey::new(b"another deployment's key, 32 bytes")
            .seal("search-users", &trellis_store::page::Cursor::of(&2)),
    ];
    for cursor in forged {
        let r = app.get(&format!("/v1/search/users?q=alice&cursor={cursor}"), Some(&alice.token)).await;
        assert_eq!((r.status, r.problem()), (400, "invalid-cursor"), "{cursor}: {:?}", r.body);
    }
    let past_cap = sealed("search-users", &json!(1000));
    let r = app.get(&format!("/v1/search/users?q=alice&cursor={past_cap}"), Some(&alice.token)).await;
    assert_eq!((r.status, r.problem()), (422, "cursor-out-of-range"), "{:?}", r.body);
    let within = sealed("search-users", &json!(999));
    assert_eq!(app.get(&format!("/v1/search/users?q=alice&cursor={within}"), Some(&alice.token)).await.status, 200);
}

#[tokio::test]
async fn every_list_cursor_is_sealed_for_its_list() {
    let app = TestApp::spawn_with(with(&["--cursor-key", CURSOR_KEY])).await;
    let alice = app.register("alice").await;
    for handle in ["bob", "carol", "dave"] {
        let user = app.register(handle).await;
        app.add_contact(&alice, &user).await;
    }
    let pages = app.pages("/v1/me/contacts?limit=1", &alice.token).await;
    assert_eq!(pages.len(), 3, "sealed cursors page through the list");
    // A well-formed position, unsealed (what every cursor was before) or sealed for another list.
    use base64::Engine as _;
    let unsealed = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("\"{}\"", uuid::Uuid::nil()));
    for cursor in [unsealed, sealed("circles", &json!(uuid::Uuid::nil()))] {
        let r = app.get(&format!("/v1/me/contacts?cursor={cursor}"), Some(&alice.token)).await;
        assert_eq!((r.status, r.problem()), (400, "invalid-cursor"), "{cursor}: {:?}", r.body);
    }
    let genuine = sealed("contacts", &json!(uuid::Uuid::nil()));
    assert_eq!(app.get(&format!("/v1/me/contacts?cursor={genuine}"), Some(&alice.token)).await.status, 200);
}

#[tokio::test]
async fn a_cursor_key_shorter_than_32_bytes_is_refused_at_start_up() {
    let db = trellis_testkit::TestDb::migrated().await.unwrap();
    let args = [
        "trellis-api",
        "--database-url",
        &db.url,
        "--api-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--cursor-key",
        "too short",
    ];
    let config = <trellis_api::Config as clap::Parser>::try_parse_from(args).unwrap();
    let error = match trellis_api::start(config, tokio_util::sync::CancellationToken::new()).await {
        Ok(_) => panic!("started with a short cursor key"),
        Err(e) => e,
    };
    assert!(format!("{error:#}").contains("CURSOR_KEY must be at least 32 bytes"), "{error:#}");
}

// --- Slow clients ---------------------------------------------------------------------------

#[tokio::test]
async fn a_connection_that_never_finishes_its_request_head_is_closed() {
    let app = TestApp::spawn_with(with(&["--header-read-timeout", "1s"])).await;
    let mut slow = connect_from(&app, "127.0.0.2").await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: trellis\r\nX-Slow: ").await.unwrap();
    read_to_close(&mut slow, Duration::from_secs(10)).await;
    // An idle keep-alive connection is closed the same way.
    let mut idle = connect_from(&app, "127.0.0.2").await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: trellis\r\n\r\n").await.unwrap();
    let answer = read_to_close(&mut idle, Duration::from_secs(10)).await;
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
}

/// The first request head is read before hyper takes over (into a small buffer, so that a slow
/// client costs little): a head that arrives in pieces, a body sent with its head, and a request
/// pipelined behind the first reach the router intact.
#[tokio::test]
async fn heads_in_pieces_bodies_sent_with_their_head_and_pipelined_requests_are_served() {
    let app = TestApp::spawn_with(with(&["--header-read-timeout", "10s"])).await;
    let mut pieces = connect_from(&app, "127.0.0.2").await;
    pieces.set_nodelay(true).unwrap();
    for piece in ["GET /hea", "lthz HTTP/1.1\r\nHo", "st: trellis\r\nConnection: close\r\n", "\r\n"] {
        pieces.write_all(piece.as_bytes()).await.unwrap();
        // Apart, as a slow client sends them (the test wants separate reads, not readiness).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer = String::from_utf8_lossy(&read_to_close(&mut pieces, Duration::from_secs(10)).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let mut with_body = connect_from(&app, "127.0.0.2").await;
    let body = r#"{"login":"nobody","password":"not-the-password-1"}"#;
    let request = format!(
        "POST /v1/sessions HTTP/1.1\r\nHost: trellis\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    with_body.write_all(request.as_bytes()).await.unwrap();
    let answer = String::from_utf8_lossy(&read_to_close(&mut with_body, Duration::from_secs(10)).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 401"), "the body reached the handler whole: {answer}");

    let mut pipelined = connect_from(&app, "127.0.0.2").await;
    let two = "GET /healthz HTTP/1.1\r\nHost: trellis\r\n\r\nGET /healthz HTTP/1.1\r\nHost: trellis\r\n\
               Connection: close\r\n\r\n";
    pipelined.write_all(two.as_bytes()).await.unwrap();
    let answer = String::from_utf8_lossy(&read_to_close(&mut pipelined, Duration::from_secs(10)).await).into_owned();
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
}

#[tokio::test]
async fn connections_beyond_the_per_address_cap_are_answered_503_and_others_are_served() {
    let app = TestApp::spawn_with(with(&["--max-connections-per-address", "2"])).await;
    // Two idle connections take 127.0.0.2's allowance (accepted in order, before the third).
    let _held = [connect_from(&app, "127.0.0.2").await, connect_from(&app, "127.0.0.2").await];
    let mut third = connect_from(&app, "127.0.0.2").await;
    third.write_all(b"GET /healthz HTTP/1.1\r\nHost: trellis\r\n\r\n").await.unwrap();
    let answer = String::from_utf8_lossy(&read_to_close(&mut third, Duration::from_secs(10)).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"), "{answer}");
    assert!(answer.contains("urn:trellis:problem:overloaded"), "{answer}");

    let legitimate = TestApp::client_from("127.0.0.3");
    let r = app.send(app.build_on(&legitimate, Method::GET, "/healthz", None, None)).await;
    assert_eq!(r.status, 200);
    let shed = app.labelled_metric("trellis_api_requests_shed_total", "reason=\"connections_per_address\"").await;
    assert_eq!(shed, Some(1.0));

    // Closing one frees a place.
    drop(_held);
    let attacker = TestApp::client_from("127.0.0.2");
    eventually("127.0.0.2 to be served again", Duration::from_secs(10), || async {
        let status = attacker.get(app.url("/healthz")).send().await.map(|r| r.status().as_u16());
        status.is_ok_and(|s| s == 200).then_some(())
    })
    .await;
}

/// Waits until `n` sessions of the app's database wait for a lock.
async fn until_waiting_for_a_lock(app: &TestApp, n: i64) {
    eventually(&format!("{n} requests waiting for a lock in the database"), Duration::from_secs(10), || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
        (waiting >= n).then_some(())
    })
    .await;
}

#[tokio::test]
async fn connections_beyond_the_total_cap_are_answered_503_when_every_open_one_is_busy() {
    let app = TestApp::spawn_with(with(&["--max-connections", "2"])).await;
    let alice = app.register("alice").await;
    // Two requests held inside the database: both open connections are busy.
    let mut blocker = app.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE contacts.contacts IN ACCESS EXCLUSIVE MODE").execute(&mut *blocker).await.unwrap();
    // One after the other: a connection that has not yet sent its request can itself be
    // displaced; once its request waits in the database it cannot.
    let mut busy = Vec::new();
    for (n, from) in [(1, "127.0.0.2"), (2, "127.0.0.3")] {
        let request =
            app.build_on(&TestApp::client_from(from), Method::GET, "/v1/me/contacts", Some(&alice.token), None);
        busy.push(tokio::spawn(request.send()));
        until_waiting_for_a_lock(&app, n).await;
    }
    let mut third = connect_from(&app, "127.0.0.4").await;
    third.write_all(b"GET /healthz HTTP/1.1\r\nHost: trellis\r\n\r\n").await.unwrap();
    let answer = String::from_utf8_lossy(&read_to_close(&mut third, Duration::from_secs(10)).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    blocker.commit().await.unwrap();
    for request in busy {
        assert_eq!(request.await.unwrap().unwrap().status(), 200, "a busy connection is never displaced");
    }
}

#[tokio::test]
async fn at_the_cap_a_new_connection_displaces_the_one_waiting_longest_for_a_request() {
    // Header-read timeout far above the test's waits: only displacement can close a connection.
    let app = TestApp::spawn_with(with(&["--max-connections", "4", "--header-read-timeout", "60s"])).await;
    let mut slow = Vec::new();
    for from in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        let mut connection = connect_from(&app, from).await;
        connection.write_all(b"GET /healthz HTTP/1.1\r\nHost: trellis\r\nX-Slow: ").await.unwrap();
        slow.push(connection);
    }
    // Every place is taken by a connection that never finishes its request head; a client that
    // sends its request at once is still served, from an address never seen before.
    let legitimate = TestApp::client_from("127.0.0.9");
    for _ in 0..3 {
        let r = app.send(app.build_on(&legitimate, Method::GET, "/healthz", None, None)).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    // The oldest slow connection made way for it, well before any timeout.
    read_to_close(&mut slow[0], Duration::from_secs(10)).await;
    let displaced = app.metric("trellis_api_connections_displaced_total").await.expect("exported");
    assert!(displaced >= 1.0, "{displaced}");
    assert_eq!(app.labelled_metric("trellis_api_requests_shed_total", "reason=\"connections\"").await, Some(0.0));
}

/// Sends `GET /healthz` on a kept-alive connection and reads the whole answer.
async fn healthz_on(stream: &mut TcpStream) -> String {
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: trellis\r\n\r\n").await.unwrap();
    let mut read = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await.expect("answered").unwrap();
        assert!(n > 0, "the connection was closed: {}", String::from_utf8_lossy(&read));
        read.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&read).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                .expect("a content length");
            if body.len() >= length {
                return text;
            }
        }
    }
}

#[tokio::test]
async fn a_connection_that_was_served_is_displaced_only_after_those_that_never_sent_a_request() {
    let app = TestApp::spawn_with(with(&["--max-connections", "3", "--header-read-timeout", "60s"])).await;
    // The oldest connection is a client's, idle between two requests.
    let mut client = connect_from(&app, "127.0.0.9").await;
    assert!(healthz_on(&mut client).await.starts_with("HTTP/1.1 200"));
    let mut slow = Vec::new();
    for from in ["127.0.0.2", "127.0.0.3"] {
        let mut connection = connect_from(&app, from).await;
        connection.write_all(b"GET /healthz HTTP/1.1\r\nHost: trellis\r\nX-Slow: ").await.unwrap();
        slow.push(connection);
    }
    // A new connection displaces the older slow one, not the client's older idle one.
    let mut newcomer = connect_from(&app, "127.0.0.4").await;
    assert!(healthz_on(&mut newcomer).await.starts_with("HTTP/1.1 200"));
    read_to_close(&mut slow[0], Duration::from_secs(10)).await;
    assert!(healthz_on(&mut client).await.starts_with("HTTP/1.1 200"), "the client's connection is still open");
}

/// The soft and hard limits of open files of process `pid`.
fn open_file_limits(pid: u32) -> Option<(String, String)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line.split_whitespace().skip(3);
    Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
}

#[tokio::test]
async fn the_api_raises_its_soft_limit_of_open_files_to_the_hard_limit() {
    let db = trellis_testkit::TestDb::migrated().await.unwrap();
    // Started with a soft limit of 512, as a shell or a service manager may leave it.
    let mut child = std::process::Command::new("sh")
        .args(["-c", "ulimit -Sn 512 && exec \"$0\"", env!("CARGO_BIN_EXE_trellis-api")])
        .env("DATABASE_URL", &db.url)
        .envs(trellis_testkit::UNLIMITED_STREAMS)
        .env("NATS_URL", trellis_testkit::nats_url())
        .env("NATS_PREFIX", trellis_testkit::nats_prefix())
        .env("API_ADDR", "127.0.0.1:0")
        .env("ADMIN_ADDR", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (soft, _) = eventually("the soft limit of open files raised to the hard one", Duration::from_secs(30), || {
        let exited = child.try_wait().unwrap();
        async move {
            assert!(exited.is_none(), "trellis-api exited: {exited:?}");
            open_file_limits(pid).filter(|(soft, hard)| soft == hard)
        }
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert_ne!(soft, "512");
}

#[tokio::test]
async fn the_public_listener_queues_as_many_connections_as_the_kernel_allows_up_to_4096() {
    let app = TestApp::spawn().await;
    let listening = std::process::Command::new("ss").args(["-Hltn", "src", &app.addr.to_string()]).output().unwrap();
    let listening = String::from_utf8(listening.stdout).unwrap();
    // A listening socket's Send-Q is its backlog: "LISTEN <Recv-Q> <Send-Q> <local> <peer>".
    let backlog: u32 = listening.split_whitespace().nth(2).expect("the listener is listed").parse().unwrap();
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap().trim().parse().unwrap();
    assert_eq!(backlog, trellis_api::serve::LISTEN_BACKLOG.min(somaxconn), "{listening}");
}

/// A request's status and how long its answer took.
async fn timed(request: impl std::future::Future<Output = Resp>) -> (u16, Duration) {
    let started = std::time::Instant::now();
    let r = request.await;
    (r.status, started.elapsed())
}

/// A refused request's answer waits `REFUSAL_DELAY`, holding neither an in-flight permit nor a
/// database connection: with one in-flight permit, a request sent while a refusal waits is
/// served at once.
#[tokio::test]
async fn a_refused_request_waits_the_refusal_delay_holding_no_permit() {
    let app = TestApp::spawn_with(with(&["--refusal-delay", "2s", "--max-in-flight-requests", "1"])).await;
    let alice = app.register("alice").await;
    let refusal = timed(app.get("/v1/me", Some("trl_not_a_token_at_all")));
    let during = async {
        // Well inside the refusal's 2 s wait (placing the request, not waiting for readiness).
        tokio::time::sleep(Duration::from_millis(500)).await;
        timed(app.get("/v1/me/contacts", Some(&alice.token))).await
    };
    let ((refused, waited), (served, took)) = tokio::join!(refusal, during);
    assert_eq!(refused, 401);
    assert!(waited >= Duration::from_secs(2), "answered after {waited:?}");
    assert_eq!(served, 200, "served while the refusal waited");
    assert!(took < Duration::from_secs(1), "at once, not after the refusal: {took:?}");
}

/// Each kind of refusal is held (a forged cursor 400, a bad token 401, an over-long login 422,
/// the login limiter's 429); an answer about a resource (404) is not.
#[tokio::test]
async fn every_kind_of_refusal_waits_the_refusal_delay_and_an_answer_about_a_resource_does_not() {
    const DELAY: Duration = Duration::from_secs(2);
    let app = TestApp::spawn_with(with(&["--refusal-delay", "2s", "--login-rate-per-account", "1"])).await;
    let alice = app.register("alice").await;
    let long_login = "l".repeat(255);
    let (forged_cursor, bad_token, too_long, missing) = tokio::join!(
        timed(app.get("/v1/search/users?q=alice&cursor=AAAA", Some(&alice.token))),
        timed(app.get("/v1/me", Some("trl_not_a_token_at_all"))),
        timed(login(&app, &long_login, "not-the-password-1")),
        timed(app.get("/v1/users/nobody-at-all", Some(&alice.token))),
    );
    for (what, (status, took), expected) in
        [("forged cursor", forged_cursor, 400), ("bad token", bad_token, 401), ("long login", too_long, 422)]
    {
        assert_eq!(status, expected, "{what}");
        assert!(took >= DELAY, "{what}: answered after {took:?}");
    }
    assert_eq!(missing.0, 404);
    assert!(missing.1 < DELAY, "a 404 is not a refusal: answered after {:?}", missing.1);

    // One login attempt a minute for this account: the second is the limiter's 429, held too.
    assert_eq!(timed(login(&app, "nobody-at-all", "not-the-password-1")).await.0, 401);
    let (status, took) = timed(login(&app, "nobody-at-all", "not-the-password-1")).await;
    assert_eq!(status, 429);
    assert!(took >= DELAY, "429 answered after {took:?}");
}

#[tokio::test]
async fn requests_beyond_the_in_flight_cap_are_shed_at_once() {
    let app = TestApp::spawn_with(with(&["--max-in-flight-requests", "1"])).await;
    let alice = app.register("alice").await;
    // Hold the contacts table so that one request stays in flight inside the database.
    let mut blocker = app.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE contacts.contacts IN ACCESS EXCLUSIVE MODE").execute(&mut *blocker).await.unwrap();
    let in_flight = tokio::spawn(app.build(Method::GET, "/v1/me/contacts", Some(&alice.token), None).send());
    until_waiting_for_a_lock(&app, 1).await;
    let started = tokio::time::Instant::now();
    let shed = app.get("/v1/me", Some(&alice.token)).await;
    assert_overloaded(&shed);
    assert!(started.elapsed() < Duration::from_secs(2), "shed at once, not queued: {:?}", started.elapsed());
    blocker.commit().await.unwrap();
    assert_eq!(in_flight.await.unwrap().unwrap().status(), 200);
    assert_eq!(app.get("/v1/me", Some(&alice.token)).await.status, 200);
}

// --- Dispute flooding -------------------------------------------------------------------------

async fn file(
    app: &TestApp,
    reporter: &crate::helpers::TestUser,
    target: &crate::helpers::TestUser,
    kind: &str,
) -> Resp {
    app.post(
        "/v1/disputes",
        Some(&reporter.token),
        json!({"target_id": target.id, "kind": kind, "description": format!("{kind} by {}", target.handle)}),
    )
    .await
}

#[tokio::test]
async fn a_reporter_has_a_bounded_number_of_open_disputes_and_fewer_at_p0() {
    let app = TestApp::spawn_with(with(&["--dispute-open-limit", "3", "--dispute-open-limit-p0", "1"])).await;
    let alice = app.register("alice").await;
    let targets = [app.register("bob").await, app.register("carol").await, app.register("dave").await];
    let first_p0 = file(&app, &alice, &targets[0], "impersonation").await;
    assert_eq!(first_p0.status, 201);
    let r = file(&app, &alice, &targets[1], "impersonation").await;
    assert_eq!((r.status, r.problem()), (429, "open-dispute-limit"), "{:?}", r.body);
    assert!(r.header("retry-after").is_some());
    assert_eq!(file(&app, &alice, &targets[1], "spam").await.status, 201);
    assert_eq!(file(&app, &alice, &targets[2], "spam").await.status, 201);
    let r = file(&app, &alice, &targets[2], "harassment").await;
    assert_eq!((r.status, r.problem()), (429, "open-dispute-limit"));

    // A decided dispute no longer counts.
    let moderator = app.register("moderator").await;
    app.grant_role(&moderator, "moderator").await;
    let id = first_p0.body["id"].as_str().unwrap();
    let decided = app
        .post(
            &format!("/v1/moderation/disputes/{id}/decision"),
            Some(&moderator.token),
            json!({"decision": "dismissed", "note": "no"}),
        )
        .await;
    assert_eq!(decided.status, 200, "{:?}", decided.body);
    assert_eq!(file(&app, &alice, &targets[1], "impersonation").await.status, 201);
}

#[tokio::test]
async fn concurrent_filings_of_one_reporter_cannot_pass_the_open_limit_together() {
    let app = TestApp::spawn_with(with(&["--dispute-open-limit", "2"])).await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let results = futures::future::join_all((0..12).map(|_| file(&app, &alice, &bob, "spam"))).await;
    let filed = results.iter().filter(|r| r.status == 201).count();
    assert_eq!(filed, 2, "{:?}", results.iter().map(|r| r.status).collect::<Vec<_>>());
    assert!(results.iter().all(|r| r.status == 201 || r.problem() == "open-dispute-limit"));
}

#[tokio::test]
async fn one_reporters_waiting_filings_leave_the_database_pool_to_everyone_else() {
    let app = TestApp::spawn_with(with(&["--db-pool-size", "3"])).await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    // Hold alice's filing lock from outside, as a filing on another replica would.
    let mut other_replica = app.db.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(1953066613, hashtext($1::uuid::text))")
        .bind(&alice.id)
        .execute(&mut *other_replica)
        .await
        .unwrap();
    let filings: Vec<_> = (0..12)
        .map(|i| {
            let body = json!({"target_id": bob.id, "kind": "spam", "description": format!("spam number {i}")});
            tokio::spawn(app.build(Method::POST, "/v1/disputes", Some(&alice.token), Some(body)).send())
        })
        .collect();
    until_waiting_for_a_lock(&app, 1).await;
    // Twelve filings wait, yet the pool of three serves everyone else meanwhile.
    for _ in 0..5 {
        let r = app.get("/v1/me/contacts", Some(&bob.token)).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    sqlx::query("SELECT pg_advisory_unlock_all()").execute(&mut *other_replica).await.unwrap();
    for filing in filings {
        let status = filing.await.unwrap().unwrap().status().as_u16();
        assert!(status == 201 || status == 429, "{status}");
    }
}

#[tokio::test]
async fn a_new_account_cannot_file_an_impersonation_dispute() {
    let app = TestApp::spawn_with(with(&["--dispute-p0-min-account-age", "1h"])).await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let r = file(&app, &alice, &bob, "impersonation").await;
    assert_eq!((r.status, r.problem()), (422, "account-too-new"), "{:?}", r.body);
    assert_eq!(file(&app, &alice, &bob, "spam").await.status, 201, "other kinds are open to new accounts");
    sqlx::query("UPDATE identity.users SET created_at = now() - interval '2 hours' WHERE id = $1::uuid")
        .bind(&alice.id)
        .execute(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(file(&app, &alice, &bob, "impersonation").await.status, 201);
}

// --- Registration privacy and input hygiene -------------------------------------------------

#[tokio::test]
async fn a_taken_email_gets_the_generic_answer_in_any_spelling() {
    let app = TestApp::spawn().await;
    let r = app
        .post(
            "/v1/users",
            None,
            json!({"handle": "joerg", "display_name": "Jörg", "email": "ＪＯＥＲＧ@Bücher.Example", "password": PASSWORD}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["user"]["email"], "joerg@xn--bcher-kva.example");
    for spelling in ["joerg@xn--bcher-kva.example", "Joerg@BÜCHER.example", "ｊｏｅｒｇ@bücher。example"] {
        let r = app
            .post(
                "/v1/users",
                None,
                json!({"handle": "joerg2", "display_name": "J", "email": spelling, "password": PASSWORD}),
            )
            .await;
        assert_eq!((r.status, r.problem()), (409, "registration-refused"), "{spelling}: {:?}", r.body);
        let detail = r.body["detail"].as_str().unwrap();
        assert!(!detail.contains("e-mail") && !detail.contains(spelling), "the answer names nothing: {detail}");
    }
    // Login finds the account by any spelling of its address.
    assert_eq!(login(&app, "JOERG@bücher.example", PASSWORD).await.status, 201);
}

#[tokio::test]
async fn display_names_with_format_characters_or_look_alike_scripts_are_refused() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    for (name, code) in [
        ("Bob\u{202e}kcilc", "invalid_characters"),
        ("Bo\u{200b}b", "invalid_characters"),
        ("\u{0410}lice", "mixed_script"),
    ] {
        let r = app
            .post(
                "/v1/users",
                None,
                json!({"handle": "mallory", "display_name": name, "email": "m@example.com", "password": PASSWORD}),
            )
            .await;
        assert_eq!((r.status, r.body["errors"][0]["code"].as_str()), (422, Some(code)), "{name:?}: {:?}", r.body);
        let r = app.patch("/v1/me", Some(&alice.token), json!({"display_name": name})).await;
        assert_eq!((r.status, r.body["errors"][0]["code"].as_str()), (422, Some(code)), "{name:?}: {:?}", r.body);
    }
    assert_eq!(app.patch("/v1/me", Some(&alice.token), json!({"display_name": "Алиса Alice"})).await.status, 200);
}
