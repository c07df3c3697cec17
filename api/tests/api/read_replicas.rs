//! Read replicas (`DATABASE_READ_URL`) against a real streaming replica: a primary and a
//! `pg_basebackup` replica of the test's own (`trellis_testkit::replica`). A writer reads its
//! own writes while the replica's replay is paused; a replica lagging past the bound is
//! bypassed; with replay running, the lag-tolerant reads run on the replica; a bad
//! `Trellis-Commit-LSN` is a 400.

use reqwest::Method;
use serde_json::{Value, json};
use trellis_testkit::http::{Api, Response, User};
use trellis_testkit::metrics::sum;
use trellis_testkit::replica::ReplicatedPostgres;
use trellis_testkit::{TestDb, eventually_ok};

const WITHIN: std::time::Duration = std::time::Duration::from_secs(30);
const LSN: &str = "trellis-commit-lsn";

/// An API on a database of a primary with one streaming replica. Fields drop in order: the API,
/// the database, then the clusters.
struct Replicated {
    api: Api,
    db: TestDb,
    pg: ReplicatedPostgres,
}

impl Replicated {
    /// The clusters, a migrated database on the primary (replayed on the replica), and an API
    /// reading from the replica with lag bound `max_lag`, polling it every 20 ms.
    async fn start(max_lag: &str) -> Replicated {
        let pg = ReplicatedPostgres::start().await.expect("a primary and its streaming replica");
        let db = TestDb::migrated_on(&pg.primary_url("postgres")).await.expect("a database on the primary");
        pg.wait_for_database(&db.name).await.expect("the database on the replica");
        let api = Api::start(api_spawn(&pg, &db, max_lag)).await;
        Replicated { api, db, pg }
    }

    /// The replica's name in the metrics.
    fn replica(&self) -> String {
        format!("127.0.0.1:{}", self.pg.replica_port)
    }

    async fn replica_pool(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.pg.replica_url(&self.db.name)).await.expect("connecting to the replica")
    }
}

fn api_spawn(pg: &ReplicatedPostgres, db: &TestDb, max_lag: &str) -> trellis_testkit::Spawn {
    Api::spawn(&db.url, &trellis_testkit::nats_prefix())
        .env("DATABASE_READ_URL", pg.replica_url(&db.name))
        .env("DATABASE_READ_POLL_INTERVAL", "20ms")
        .env("DATABASE_READ_MAX_LAG", max_lag)
}

/// What one scrape of the API's metrics says about its reads.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Reads {
    primary: f64,
    replica: f64,
    own_write: f64,
    lagging: f64,
    unauthenticated: f64,
}

async fn reads(api: &Api, replica: &str) -> Reads {
    let text = api.metrics().await;
    let read = |target: &str| sum(&text, "trellis_api_db_reads_total", &[&format!("target=\"{target}\"")]);
    let fell_back =
        |reason: &str| sum(&text, "trellis_api_db_replica_fallbacks_total", &[&format!("reason=\"{reason}\"")]);
    Reads {
        primary: read("primary"),
        replica: read(replica),
        own_write: fell_back("own_write"),
        lagging: fell_back("lagging"),
        unauthenticated: fell_back("unauthenticated"),
    }
}

/// The replica's lag gauges: (bytes, seconds).
async fn lag(api: &Api, replica: &str) -> (f64, f64) {
    let text = api.metrics().await;
    let label = format!("replica=\"{replica}\"");
    (
        sum(&text, "trellis_api_db_replica_lag_bytes", &[&label]),
        sum(&text, "trellis_api_db_replica_lag_seconds", &[&label]),
    )
}

async fn get(api: &Api, path: &str, token: &str, lsn: Option<&str>) -> Response {
    let mut request = api.build(Method::GET, path, Some(token), None);
    if let Some(lsn) = lsn {
        request = request.header(LSN, lsn);
    }
    api.send(request).await
}

fn handles(list: &Response) -> Vec<String> {
    let items = list.body["items"].as_array().unwrap_or_else(|| panic!("a list: {:?}", list.body));
    items.iter().map(|c| c["handle"].as_str().unwrap_or_default().to_owned()).collect()
}

async fn add_contact(api: &Api, owner: &User, contact: &User) -> Response {
    let path = format!("/v1/me/contacts/{}", contact.handle);
    let r = api.request(Method::PUT, &path, Some(&owner.token), Some(json!({"label": "friend"}))).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    r
}

/// Waits until `user`'s contact list is served by the replica (it has replayed what they need).
async fn wait_served_by_replica(api: &Api, replica: &str, user: &User) {
    eventually_ok("a read served by the replica", WITHIN, || async {
        let before = reads(api, replica).await;
        let r = get(api, "/v1/me/contacts", &user.token, None).await;
        let after = reads(api, replica).await;
        if r.status != 200 {
            return Err(format!("{} {:?}", r.status, r.body));
        }
        if after.replica > before.replica { Ok(()) } else { Err(format!("served by the primary: {after:?}")) }
    })
    .await;
}

#[tokio::test]
async fn a_writer_reads_its_own_write_while_the_replica_replays_nothing() {
    let r = Replicated::start("60s").await;
    let (api, replica) = (&r.api, r.replica());
    let alice = api.register("alice").await;
    let bob = api.register("bob").await;
    r.pg.catch_up().await.unwrap();
    wait_served_by_replica(api, &replica, &alice).await;
    wait_served_by_replica(api, &replica, &bob).await;
    // Another API process, which will know nothing of her write. (Started now: a process uses a
    // replica only once it has seen it replay a position it saw the primary at.)
    let other = Api::start(api_spawn(&r.pg, &r.db, "60s").args(["--no-relay"])).await;
    wait_served_by_replica(&other, &replica, &bob).await;

    r.pg.pause_replay().await.unwrap();
    let put = add_contact(api, &alice, &bob).await;
    let lsn = put.header(LSN).expect("a write's answer carries its commit LSN").to_owned();

    // Her next read, without the header: this process remembers her token's write.
    let before = reads(api, &replica).await;
    let list = get(api, "/v1/me/contacts", &alice.token, None).await;
    assert_eq!((list.status, handles(&list)), (200, vec!["bob".to_owned()]));
    let after = reads(api, &replica).await;
    assert_eq!(after.primary - before.primary, 1.0, "{before:?} -> {after:?}");
    assert_eq!(after.own_write - before.own_write, 1.0, "{before:?} -> {after:?}");
    assert_eq!(after.replica, before.replica, "{before:?} -> {after:?}");

    // Bob wrote nothing: the replica, within the bound, still serves him.
    let before = after;
    assert_eq!(get(api, "/v1/me/contacts", &bob.token, None).await.status, 200);
    let after = reads(api, &replica).await;
    assert_eq!((after.replica - before.replica, after.primary), (1.0, before.primary), "{before:?} -> {after:?}");

    // The other API process: without the header the replica answers (without the contact);
    // with it, the primary does.
    let stale = get(&other, "/v1/me/contacts", &alice.token, None).await;
    assert_eq!((stale.status, handles(&stale)), (200, Vec::<String>::new()), "the paused replica's answer");
    let before = reads(&other, &replica).await;
    let fresh = get(&other, "/v1/me/contacts", &alice.token, Some(&lsn)).await;
    assert_eq!((fresh.status, handles(&fresh)), (200, vec!["bob".to_owned()]));
    let after = reads(&other, &replica).await;
    assert_eq!(after.own_write - before.own_write, 1.0, "{before:?} -> {after:?}");
    // The highest position there is only sends the read to the primary.
    let highest = get(&other, "/v1/me/contacts", &bob.token, Some("FFFFFFFF/FFFFFFFF")).await;
    assert_eq!(highest.status, 200, "{:?}", highest.body);
    assert_eq!(reads(&other, &replica).await.own_write - after.own_write, 1.0);

    // A token the paused replica has never seen is checked on the primary, not refused.
    let carol = api.register("carol").await;
    let before = reads(api, &replica).await;
    let me = get(api, "/v1/me", &carol.token, None).await;
    assert_eq!((me.status, me.body["handle"].as_str()), (200, Some("carol")), "{:?}", me.body);
    let after = reads(api, &replica).await;
    assert_eq!(after.unauthenticated - before.unauthenticated, 1.0, "{before:?} -> {after:?}");

    // Once the replica has replayed her write, it serves her again, with the contact.
    r.pg.resume_replay().await.unwrap();
    r.pg.catch_up().await.unwrap();
    wait_served_by_replica(api, &replica, &alice).await;
    assert_eq!(handles(&get(api, "/v1/me/contacts", &alice.token, None).await), vec!["bob".to_owned()]);
}

#[tokio::test]
async fn a_replica_lagging_past_the_bound_is_bypassed_and_its_lag_is_measured() {
    let r = Replicated::start("1s").await;
    let (api, replica) = (&r.api, r.replica());
    let alice = api.register("alice").await;
    let bob = api.register("bob").await;
    let carol = api.register("carol").await;
    add_contact(api, &alice, &bob).await;
    let login = json!({"login": "carol", "password": trellis_testkit::http::PASSWORD});
    let second = api.request(Method::POST, "/v1/sessions", None, Some(login)).await;
    assert_eq!(second.status, 201, "{:?}", second.body);
    let carol_elsewhere = second.body["token"].as_str().unwrap().to_owned();
    r.pg.catch_up().await.unwrap();
    wait_served_by_replica(api, &replica, &alice).await;
    wait_no_lag(api, &replica).await;

    r.pg.pause_replay().await.unwrap();
    // Carol signs out everywhere: the primary moves on; the replica still has her other token.
    let out = api.request(Method::DELETE, "/v1/sessions", Some(&carol.token), None).await;
    assert_eq!(out.status, 204, "{:?}", out.body);
    eventually_ok("the replica's lag past the 1 s bound", WITHIN, || async {
        let (bytes, seconds) = lag(api, &replica).await;
        if bytes > 0.0 && seconds > 1.0 { Ok(()) } else { Err(format!("lag {bytes} bytes, {seconds} s")) }
    })
    .await;

    // Alice wrote nothing since: her read would be the replica's, but it lags too much.
    let before = reads(api, &replica).await;
    let list = get(api, "/v1/me/contacts", &alice.token, None).await;
    assert_eq!((list.status, handles(&list)), (200, vec!["bob".to_owned()]));
    let after = reads(api, &replica).await;
    assert_eq!(after.lagging - before.lagging, 1.0, "{before:?} -> {after:?}");
    assert_eq!((after.primary - before.primary, after.replica), (1.0, before.replica), "{before:?} -> {after:?}");
    // The revoked token, which the paused replica would still accept, is refused past the bound.
    assert_eq!(get(api, "/v1/me", &carol_elsewhere, None).await.status, 401);

    r.pg.resume_replay().await.unwrap();
    r.pg.catch_up().await.unwrap();
    wait_no_lag(api, &replica).await;
    wait_served_by_replica(api, &replica, &alice).await;
}

/// Waits until the replica has replayed all the primary wrote (the primary keeps writing a
/// little in the background: the relay, the server's own records).
async fn wait_no_lag(api: &Api, replica: &str) {
    eventually_ok("no lag", WITHIN, || async {
        let lag = lag(api, replica).await;
        if lag == (0.0, 0.0) { Ok(()) } else { Err(format!("lag {lag:?}")) }
    })
    .await;
}

/// Index and sequential scans of `contacts.contacts` on a server, as its statistics say.
async fn contact_scans(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables
         WHERE schemaname = 'contacts' AND relname = 'contacts'",
    )
    .fetch_one(pool)
    .await
    .expect("the table's statistics")
}

#[tokio::test]
async fn with_replay_running_the_lag_tolerant_reads_run_on_the_replica() {
    let r = Replicated::start("60s").await;
    let (api, replica) = (&r.api, r.replica());
    let alice = api.register_named("alice", "Alice Replica").await;
    let bob = api.register_named("bob", "Bob Replica").await;
    add_contact(api, &alice, &bob).await;
    let circle = api.request(Method::POST, "/v1/me/circles", Some(&alice.token), Some(json!({"name": "Close"}))).await;
    assert_eq!(circle.status, 201, "{:?}", circle.body);
    let circle = circle.body["id"].as_str().unwrap().to_owned();
    r.pg.catch_up().await.unwrap();
    wait_served_by_replica(api, &replica, &alice).await;

    // Each route: one read, on the replica.
    let routes = [
        "/v1/me/contacts".to_owned(),
        "/v1/me/circles".to_owned(),
        format!("/v1/me/circles/{circle}/members"),
        "/v1/me".to_owned(),
        "/v1/users/bob".to_owned(),
        "/v1/users/bob/score".to_owned(),
        "/v1/search/users?q=bob".to_owned(),
        "/v1/me/contacts/search?q=bob".to_owned(),
    ];
    for path in &routes {
        let before = reads(api, &replica).await;
        let answer = get(api, path, &alice.token, None).await;
        assert_eq!(answer.status, 200, "{path}: {:?}", answer.body);
        let after = reads(api, &replica).await;
        assert_eq!(
            (after.replica - before.replica, after.primary - before.primary),
            (1.0, 0.0),
            "{path}: {before:?} -> {after:?}"
        );
    }
    assert_eq!(get(api, "/v1/users/bob", &alice.token, None).await.body["handle"], Value::from("bob"));

    // The replica's own statistics count the scans of these reads.
    let on_replica = r.replica_pool().await;
    let scans = contact_scans(&on_replica).await;
    for _ in 0..10 {
        assert_eq!(get(api, "/v1/me/contacts", &alice.token, None).await.status, 200);
    }
    eventually_ok("the replica to count the reads' scans", WITHIN, || async {
        let now = contact_scans(&on_replica).await;
        if now >= scans + 10 { Ok(()) } else { Err(format!("{} scans more", now - scans)) }
    })
    .await;
}

#[tokio::test]
async fn a_commit_lsn_header_that_is_not_a_position_is_a_400_problem() {
    // Without read replicas the header is checked all the same, and writes answer none.
    let db = TestDb::migrated().await.unwrap();
    let api = Api::start(Api::spawn(&db.url, &trellis_testkit::nats_prefix())).await;
    let alice = api.register("alice").await;
    let bob = api.register("bob").await;
    let put = add_contact(&api, &alice, &bob).await;
    assert_eq!(put.header(LSN), None, "no replicas, no position");
    for bad in ["latest", "0/0/0", "1/123456789", "-1/0", "0x1/0", "1/", "16/B374D848;x"] {
        let r = get(&api, "/v1/me/contacts", &alice.token, Some(bad)).await;
        assert_eq!(r.status, 400, "{bad}: {:?}", r.body);
        assert_eq!(r.header("content-type"), Some("application/problem+json"), "{bad}");
        assert_eq!(r.problem(), "invalid-commit-lsn", "{bad}: {:?}", r.body);
        assert_eq!(r.body["status"], 400, "{bad}");
    }
    let good = get(&api, "/v1/me/contacts", &alice.token, Some("16/B374D848")).await;
    assert_eq!((good.status, handles(&good)), (200, vec!["bob".to_owned()]));
}
