//! Faults under a write: the API killed (SIGKILL, a child process) or its database backend
//! terminated while a request is in flight, every backend of its pool terminated, and the
//! connection lost while a transaction commits. A retry with the same `Idempotency-Key`
//! completes exactly once, and no request answers "retry" for a change that was made.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_testkit::http::Api;
use trellis_testkit::{TestDb, eventually};

use crate::helpers::{Options, PASSWORD, TestApp, TestUser, api_backends_in_transaction, waiting_on_lock};

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&db.pool).await.expect(sql)
}

const FILED: &str = "SELECT count(*) FROM ops.outbox WHERE payload->>'type' = 'disputes.filed'";

fn dispute(target: &TestUser) -> Value {
    json!({"target_id": target.id, "kind": "spam", "description": "sells watches"})
}

/// The `trellis-api` binary as a child process on `db` and `prefix`, once ready. Statements may
/// wait long: a waiting one ends because its client went, not because it timed out.
async fn api_process(db: &TestDb, prefix: &str) -> Api {
    Api::start(Api::spawn(&db.url, prefix).env("IO_TIMEOUT", "10s")).await
}

#[tokio::test]
async fn a_retry_after_the_api_was_killed_mid_request_completes_exactly_once() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let mut api = api_process(&db, &prefix).await;
    let alice = TestUser::from(api.register("alice").await);
    let bob = TestUser::from(api.register("bob").await);

    // The filing waits on a lock the test holds: the request is in flight, its key taken.
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE security.disputes IN EXCLUSIVE MODE").execute(&mut *holder).await.unwrap();
    let in_flight = api
        .build(Method::POST, "/v1/disputes", Some(&alice.token), Some(dispute(&bob)))
        .header("idempotency-key", "file-once")
        .send();
    let in_flight = tokio::spawn(in_flight);
    let pid = waiting_on_lock(&db).await;

    api.kill().await;
    assert!(in_flight.await.unwrap().is_err(), "the killed API answered nothing");
    // The killed process's transaction ends while the lock is still held, within seconds (its
    // statement could wait 10 s): the key's lease went with the process.
    eventually("the killed API's backend to end", Duration::from_secs(4), || async {
        let alive: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
            .bind(pid)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        (alive == 0 && api_backends_in_transaction(&db).await == 0).then_some(())
    })
    .await;
    holder.rollback().await.unwrap();

    let api = api_process(&db, &prefix).await;
    let retry = || {
        api.build(Method::POST, "/v1/disputes", Some(&alice.token), Some(dispute(&bob)))
            .header("idempotency-key", "file-once")
    };
    let retried = api.send(retry()).await;
    assert_eq!((retried.status, retried.header("idempotent-replayed")), (201, Some("false")), "{:?}", retried.body);
    let again = api.send(retry()).await;
    assert_eq!((again.status, again.header("idempotent-replayed")), (201, Some("true")), "{:?}", again.body);
    assert_eq!(again.body, retried.body);
    assert_eq!(count(&db, "SELECT count(*) FROM security.disputes").await, 1, "one dispute");
    assert_eq!(count(&db, FILED).await, 1, "one outbox event");
}

#[tokio::test]
async fn a_retry_after_the_requests_backend_was_terminated_completes_exactly_once() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    // Several idle connections in the pool besides the one the filing will use.
    let warm = (0..6).map(|_| app.get("/v1/me", Some(&alice.token)));
    assert!(futures::future::join_all(warm).await.iter().all(|r| r.status == 200));

    let mut holder = app.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE security.disputes IN EXCLUSIVE MODE").execute(&mut *holder).await.unwrap();
    let first = {
        let req = app.build(Method::POST, "/v1/disputes", Some(&alice.token), Some(dispute(&bob)));
        tokio::spawn(req.header("idempotency-key", "file-once").send())
    };
    let pid = app.wait_for_lock_wait().await;
    // The filing's backend, and every idle one of the pool with it.
    let ended = app.terminate_api_backends().await;
    assert!(ended >= 2, "{ended} backends ended");
    let terminated: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
        .bind(pid)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(terminated <= 1);
    holder.rollback().await.unwrap();

    let first = first.await.unwrap().unwrap();
    let status = first.status().as_u16();
    let body: Value = first.json().await.unwrap();
    assert_eq!(status, 201, "the filing ran again on a live connection, never a 503: {body:?}");
    let retried = app
        .send(
            app.build(Method::POST, "/v1/disputes", Some(&alice.token), Some(dispute(&bob)))
                .header("idempotency-key", "file-once"),
        )
        .await;
    assert_eq!((retried.status, retried.header("idempotent-replayed")), (201, Some("true")), "{:?}", retried.body);
    assert_eq!(retried.body["id"], body["id"]);
    assert_eq!(count(&app.db, "SELECT count(*) FROM security.disputes").await, 1, "one dispute");
    assert_eq!(count(&app.db, FILED).await, 1, "one outbox event");
}

#[tokio::test]
async fn after_every_backend_of_the_api_pool_is_terminated_the_next_requests_succeed() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let t = Some(alice.token.as_str());
    for round in 0..3 {
        // Fill the pool with idle connections, then end them all.
        let warm = (0..8).map(|_| app.get("/v1/me/contacts", t));
        assert!(futures::future::join_all(warm).await.iter().all(|r| r.status == 200));
        let ended = app.terminate_api_backends().await;
        assert!(ended >= 2, "round {round}: {ended} backends ended");
        eventually("the terminated backends to exit", Duration::from_secs(10), || async {
            let left: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'trellis-api'",
            )
            .bind(&app.db.name)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
            (left == 0).then_some(())
        })
        .await;

        let contact = format!("/v1/me/contacts/{}", bob.id);
        let steps: Vec<(Method, String, Option<Value>)> = match round {
            0 => vec![
                (Method::GET, "/v1/me".into(), None),
                (Method::GET, "/v1/me/contacts".into(), None),
                (Method::PUT, contact.clone(), Some(json!({"label": "friend"}))),
                (Method::POST, "/v1/me/circles".into(), Some(json!({"name": "climbing"}))),
                (Method::GET, "/v1/me/circles".into(), None),
            ],
            1 => vec![
                (Method::POST, "/v1/disputes".into(), Some(dispute(&bob))),
                (Method::DELETE, contact.clone(), None),
                (Method::PATCH, "/v1/me".into(), Some(json!({"display_name": "Alice A."}))),
            ],
            _ => Vec::new(),
        };
        for (method, path, body) in steps {
            let r = app.request(method.clone(), &path, t, body).await;
            assert!((200..300).contains(&r.status), "round {round}: {method} {path}: {} {:?}", r.status, r.body);
        }
        if round == 2 {
            // Many at once: every one meets a dead connection or a fresh one, none a 503.
            let reads = (0..16).map(|_| app.get("/v1/me", t));
            let statuses: Vec<u16> = futures::future::join_all(reads).await.iter().map(|r| r.status).collect();
            assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
        }
    }
}

/// A TCP proxy in front of PostgreSQL that, once armed, cuts the connection of the API's request
/// pool (`application_name` `trellis-api`) that sends a `COMMIT`: it forwards the `COMMIT` to the
/// server and, when the server answers (it has committed), closes the client's side instead of
/// relaying the answer.
struct CommitCutter {
    addr: SocketAddr,
    armed: Arc<AtomicBool>,
    cuts: Arc<AtomicUsize>,
}

/// A simple-protocol `Query` message of `COMMIT` (how sqlx commits).
const COMMIT_MESSAGE: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";
const API_POOL: &[u8] = b"application_name\0trellis-api\0";

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

impl CommitCutter {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("the proxy binds");
        let addr = listener.local_addr().unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicUsize::new(0));
        let (a, c) = (armed.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(Self::relay(client, upstream, a.clone(), c.clone()));
            }
        });
        Self { addr, armed, cuts }
    }

    async fn relay(client: TcpStream, upstream: SocketAddr, armed: Arc<AtomicBool>, cuts: Arc<AtomicUsize>) {
        let Ok(server) = TcpStream::connect(upstream).await else { return };
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        let cut = Arc::new(AtomicBool::new(false));
        let down = {
            let cut = cut.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match server_read.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if cut.load(Ordering::SeqCst) || client_write.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            })
        };
        let mut buf = vec![0u8; 64 * 1024];
        let mut api_pool = None;
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            // The first bytes are the startup message, with the application name.
            let is_api = *api_pool.get_or_insert_with(|| contains(chunk, API_POOL));
            if is_api && contains(chunk, COMMIT_MESSAGE) && armed.swap(false, Ordering::SeqCst) {
                // The answer is dropped (and the client's side closed once it arrives, so after
                // the server committed).
                cut.store(true, Ordering::SeqCst);
                cuts.fetch_add(1, Ordering::SeqCst);
                let _ = server_write.write_all(chunk).await;
                let _ = down.await;
                return;
            }
            if server_write.write_all(chunk).await.is_err() {
                break;
            }
        }
        down.abort();
    }

    /// `url` (the test database's) pointing at this proxy, without TLS.
    fn url(&self, url: &str) -> String {
        let mut url = reqwest::Url::parse(url).expect("the database URL parses");
        url.set_host(Some(&self.addr.ip().to_string())).unwrap();
        url.set_port(Some(self.addr.port())).unwrap();
        url.query_pairs_mut().append_pair("sslmode", "disable");
        url.to_string()
    }
}

#[tokio::test]
async fn a_commit_whose_connection_is_lost_is_never_answered_retry() {
    let db = TestDb::migrated().await.unwrap();
    let server = reqwest::Url::parse(&db.url).unwrap();
    let upstream = tokio::net::lookup_host((server.host_str().unwrap(), server.port().unwrap_or(5432)))
        .await
        .unwrap()
        .next()
        .unwrap();
    let cutter = CommitCutter::start(upstream).await;
    let options = Options { database_url: Some(cutter.url(&db.url)), ..Options::default() };
    let app = TestApp::start_on(db, trellis_testkit::nats_prefix(), options).await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;

    // With a key: the commit happened, so the answer is its response (found by running the
    // request again, which its key answers), not a 503.
    cutter.armed.store(true, Ordering::SeqCst);
    let keyed = || {
        app.build(Method::POST, "/v1/disputes", Some(&alice.token), Some(dispute(&bob))).header("idempotency-key", "k")
    };
    let filed = app.send(keyed()).await;
    assert_eq!(cutter.cuts.load(Ordering::SeqCst), 1, "the filing's commit was cut");
    assert_eq!(filed.status, 201, "the committed filing is answered as such: {:?}", filed.body);
    let row: uuid::Uuid = sqlx::query_scalar("SELECT id FROM security.disputes").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(filed.body["id"], row.to_string());
    let again = app.send(keyed()).await;
    assert_eq!((again.status, again.header("idempotent-replayed")), (201, Some("true")));
    assert_eq!(again.body["id"], filed.body["id"]);
    assert_eq!(count(&app.db, "SELECT count(*) FROM security.disputes").await, 1);
    assert_eq!(count(&app.db, FILED).await, 1);

    // Without a key nothing can tell: the answer says the outcome is unknown, and not "retry".
    cutter.armed.store(true, Ordering::SeqCst);
    let created = app.post("/v1/me/circles", Some(&alice.token), json!({"name": "climbing"})).await;
    assert_eq!(cutter.cuts.load(Ordering::SeqCst), 2, "the circle's commit was cut");
    assert_eq!((created.status, created.problem()), (500, "outcome-unknown"), "{:?}", created.body);
    assert_eq!(created.header("retry-after"), None);
    assert_eq!(count(&app.db, "SELECT count(*) FROM circles.circles").await, 1, "the circle was made");
}

#[tokio::test]
async fn an_admins_keyed_reinstatement_commits_in_its_unit_of_work_on_one_connection() {
    // As above: two connections, the flag watcher's LISTEN holds one. A reinstatement made on
    // a transaction of its own, beside its unit of work's, would wait for the other one.
    let args = ["--db-pool-size", "2", "--io-timeout", "2s", "--no-relay"].map(String::from).to_vec();
    let app = TestApp::spawn_with(Options { args, ..Options::default() }).await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let moderator = app.register("mod").await;
    app.grant_role(&moderator, "moderator").await;
    let admin = app.register("admin").await;
    app.grant_role(&admin, "admin").await;
    let disputed = app.file_dispute(&alice, &bob, "harassment").await;
    let path = format!("/v1/moderation/disputes/{}/decision", disputed["id"].as_str().unwrap());
    let upheld = app.post(&path, Some(&moderator.token), json!({"decision": "upheld", "note": "harassment"})).await;
    assert_eq!(upheld.status, 200, "{:?}", upheld.body);

    let reinstate = || {
        app.build(
            Method::POST,
            "/v1/admin/users/bob/reinstate",
            Some(&admin.token),
            Some(json!({"reason": "mistaken"})),
        )
        .header("idempotency-key", "reinstate-bob")
    };
    let r = app.send(reinstate()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.header("idempotent-replayed"), Some("false"));
    // The key, the status, the audit row and the event: one transaction's rows.
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT xmin::text FROM ops.idempotency_keys WHERE key = 'reinstate-bob'
         UNION ALL SELECT xmin::text FROM identity.users WHERE handle = 'bob'
         UNION ALL SELECT xmin::text FROM identity.user_admin_audit WHERE action = 'reinstate'
         UNION ALL SELECT xmin::text FROM ops.outbox WHERE subject = 'events.identity.user_reinstated'",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(rows.iter().all(|x| *x == rows[0]), "committed apart: {rows:?}");
    let replay = app.send(reinstate()).await;
    assert_eq!((replay.status, replay.header("idempotent-replayed")), (200, Some("true")), "{:?}", replay.body);
    assert_eq!(replay.body, r.body);
    assert_eq!(count(&app.db, "SELECT count(*) FROM identity.user_admin_audit WHERE action = 'reinstate'").await, 1);
}

#[tokio::test]
async fn every_keyed_write_commits_its_key_with_its_change_on_one_connection() {
    // Two connections in the pool, one of which the flag watcher's LISTEN keeps: a write that
    // used another connection while its unit of work holds the other would wait until
    // IO_TIMEOUT and answer 503.
    // No relay: it would mark the outbox rows published, and so give them another `xmin`.
    let args = ["--db-pool-size", "2", "--io-timeout", "2s", "--no-relay"].map(String::from).to_vec();
    let app = TestApp::spawn_with(Options { args, ..Options::default() }).await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let carol = app.register("carol").await;
    let moderator = app.register("mod").await;
    app.grant_role(&moderator, "moderator").await;
    let admin = app.register("admin").await;
    app.grant_role(&admin, "admin").await;
    let farewell = app.register("farewell").await;
    let disputed = app.file_dispute(&carol, &bob, "spam").await;
    let dispute_id = disputed["id"].as_str().unwrap();

    let a = Some(alice.token.as_str());
    let circle = "circle-of-alice";
    let steps: Vec<(&TestUser, Method, String, Option<Value>)> = vec![
        (&alice, Method::PATCH, "/v1/me".into(), Some(json!({"display_name": "Alice A."}))),
        (&alice, Method::PUT, format!("/v1/me/contacts/{}", bob.id), Some(json!({"label": "friend"}))),
        (&alice, Method::POST, "/v1/me/circles".into(), Some(json!({"name": circle}))),
        (&alice, Method::POST, "/v1/disputes".into(), Some(dispute(&bob))),
        (
            &moderator,
            Method::POST,
            format!("/v1/moderation/disputes/{dispute_id}/decision"),
            Some(json!({"decision": "dismissed", "note": "not spam"})),
        ),
        (&admin, Method::POST, "/v1/admin/score-runs".into(), None),
        (
            &admin,
            Method::PUT,
            "/v1/admin/flags/score.executor".into(),
            Some(json!({"value": "shadow", "reason": "parity"})),
        ),
        (&farewell, Method::DELETE, "/v1/sessions/current".into(), None),
        (&carol, Method::DELETE, "/v1/sessions".into(), None),
    ];
    let mut keys = 0;
    for (n, (user, method, path, body)) in steps.into_iter().enumerate() {
        let key = format!("write-{n}");
        let r =
            app.send(app.build(method.clone(), &path, Some(&user.token), body).header("idempotency-key", &key)).await;
        assert!((200..300).contains(&r.status), "{method} {path}: {} {:?}", r.status, r.body);
        assert_eq!(r.header("idempotent-replayed"), Some("false"), "{method} {path}");
        keys += 1;
        // The key row and the change are one transaction's rows.
        let xmin: String = sqlx::query_scalar("SELECT xmin::text FROM ops.idempotency_keys WHERE key = $1")
            .bind(&key)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
        let with_change: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM ops.outbox WHERE xmin::text = $1)
                 OR EXISTS (SELECT 1 FROM identity.tokens WHERE xmin::text = $1)
                 OR EXISTS (SELECT 1 FROM ops.feature_flag_audit WHERE xmin::text = $1)",
        )
        .bind(&xmin)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
        assert!(with_change, "{method} {path}: its key committed apart from its change");
    }
    // The circle's members, and the circle itself, through keyed writes too.
    let circle_id: String = sqlx::query_scalar("SELECT id::text FROM circles.circles WHERE name = $1")
        .bind(circle)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    for (n, (method, path, body)) in [
        (Method::PUT, format!("/v1/me/circles/{circle_id}/members/{}", bob.id), Some(json!({}))),
        (Method::DELETE, format!("/v1/me/circles/{circle_id}/members/{}", bob.id), None),
        (Method::PATCH, format!("/v1/me/circles/{circle_id}"), Some(json!({"name": "renamed"}))),
        (Method::DELETE, format!("/v1/me/circles/{circle_id}"), None),
        (Method::DELETE, format!("/v1/me/contacts/{}", bob.id), None),
    ]
    .into_iter()
    .enumerate()
    {
        let key = format!("circle-{n}");
        let r = app.send(app.build(method.clone(), &path, a, body.clone()).header("idempotency-key", &key)).await;
        assert!((200..300).contains(&r.status), "{method} {path}: {} {:?}", r.status, r.body);
        let replay = app.send(app.build(method.clone(), &path, a, body).header("idempotency-key", &key)).await;
        assert_eq!((replay.status, replay.header("idempotent-replayed")), (r.status, Some("true")), "{method} {path}");
        keys += 1;
    }
    assert_eq!(count(&app.db, "SELECT count(*) FROM ops.idempotency_keys WHERE status IS NOT NULL").await, keys);
    // Sign-up and sign-in keep no key, and work on one connection too.
    for (path, body) in [
        (
            "/v1/users",
            json!({"handle": "dave", "display_name": "Dave", "email": "dave@example.com", "password": PASSWORD}),
        ),
        ("/v1/sessions", json!({"login": "dave", "password": PASSWORD})),
    ] {
        let r = app.send(app.build(Method::POST, path, None, Some(body)).header("idempotency-key", "anon")).await;
        assert_eq!(r.status, 201, "{path}: {:?}", r.body);
    }
    assert_eq!(count(&app.db, "SELECT count(*) FROM ops.idempotency_keys").await, keys);
}
