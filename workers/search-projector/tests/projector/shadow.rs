//! Shadow: while `search.executor` says `shadow`, the candidate side projects its
//! own copy of the events into `shadow.search_*`, and its documents are compared with the read
//! model's on the same input; the promotion gate reads the comparisons.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use search_projector::shadow::{Comparer, ComparerConfig, Rules, candidate_group};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use trellis_domain::flags::{Executor, Flag};
use trellis_domain::shadow::Tally;
use trellis_runtime::consumer::{RunnerConfig, RunnerContext};
use trellis_runtime::nats::Topology;
use trellis_store::flags::{self, Change};
use trellis_testkit::TestDb;
use uuid::Uuid;

use crate::harness::*;

const SETTLE: Duration = Duration::from_secs(90);

fn candidate_consumer() -> String {
    trellis_runtime::shadow::candidate_spec(search_projector::consumer_spec()).name
}

/// `trellisctl`, built next to this package's binary by the workspace build.
fn trellisctl() -> PathBuf {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_search-projector")).with_file_name("trellisctl");
    assert!(path.exists(), "{} is missing: build it (cargo build -p trellisctl)", path.display());
    path
}

struct Ctl {
    success: bool,
    stdout: String,
    stderr: String,
}

async fn ctl(db: &TestDb, args: &[&str]) -> Ctl {
    let out = tokio::process::Command::new(trellisctl())
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("TRELLIS_ACTOR", "shadow-tests")
        .output()
        .await
        .expect("trellisctl runs");
    Ctl {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn set_flag(db: &TestDb, value: Executor, reason: &str) {
    let change = Change { flag: Flag::SearchExecutor, value, actor: "test", reason, forced: false };
    flags::set(&db.pool, &change).await.expect("setting the flag");
}

/// Starts a shadow period of `search.executor` with `primary` as the primary.
async fn start_shadow(db: &TestDb, primary: Executor) {
    set_flag(db, primary, "the primary").await;
    set_flag(db, Executor::Shadow, "shadow period").await;
}

async fn period(db: &TestDb) -> trellis_store::shadow::Period {
    trellis_store::shadow::latest_period(&db.pool, Flag::SearchExecutor).await.unwrap().expect("a shadow period")
}

async fn tally(db: &TestDb) -> Tally {
    trellis_store::shadow::tally(&db.pool, Flag::SearchExecutor, &period(db).await).await.unwrap()
}

async fn jetstream() -> async_nats::jetstream::Context {
    async_nats::jetstream::new(async_nats::connect(trellis_testkit::nats_url()).await.expect("NATS"))
}

/// Waits until the candidate's consumer exists: from then on, every event reaches it.
async fn candidate_listening(prefix: &str) {
    let js = jetstream().await;
    let stream = format!("{prefix}_EVENTS");
    let consumer = format!("{prefix}_{}", candidate_consumer());
    eventually("the candidate's consumer", Duration::from_secs(30), || {
        let (js, stream, consumer) = (js.clone(), stream.clone(), consumer.clone());
        async move {
            let stream = js.get_stream(&stream).await.ok()?;
            match stream.consumer_info(&consumer).await {
                Ok(_) => Some(()),
                Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => None,
                Err(e) => panic!("reading {consumer}: {e}"),
            }
        }
    })
    .await;
}

/// Waits until every outbox row is published and each of `consumers` has nothing pending or
/// unacknowledged.
async fn consumers_caught_up(db: &TestDb, prefix: &str, consumers: &[String]) {
    let js = jetstream().await;
    let stream = format!("{prefix}_EVENTS");
    eventually("the consumers to catch up", SETTLE, || {
        let js = js.clone();
        let stream = stream.clone();
        async move {
            let unpublished: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.outbox WHERE published_at IS NULL")
                .fetch_one(&db.pool)
                .await
                .ok()?;
            if unpublished > 0 {
                return None;
            }
            let stream = js.get_stream(&stream).await.ok()?;
            for name in consumers {
                let info = stream.consumer_info(format!("{prefix}_{name}")).await.ok()?;
                if info.num_pending > 0 || info.num_ack_pending > 0 {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
}

/// Waits until the comparer has settled every candidate document version of the period.
async fn all_settled(db: &TestDb) {
    let since = period(db).await.started_at;
    eventually("every candidate document version to be settled", SETTLE, || async {
        let left = trellis_store::shadow_search::unsettled_count(&db.pool, since).await.ok()?;
        (left == 0).then_some(())
    })
    .await;
}

async fn candidate_documents(db: &TestDb) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM shadow.search_directory) + (SELECT count(*) FROM shadow.search_contacts)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// The sum of `trellis_shadow_comparisons_total{processor="search",result}` in a scrape.
fn comparisons_metric(metrics: &str, result: &str) -> f64 {
    let series = format!("trellis_shadow_comparisons_total{{processor=\"search\",result=\"{result}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&series)).map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The latest audit row of `search.executor`: (from, to, forced).
async fn last_audit(db: &TestDb) -> (String, String, bool) {
    sqlx::query_as(
        "SELECT from_value, to_value, forced FROM ops.feature_flag_audit WHERE name = 'search.executor'
         ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_identical_worker_candidate_under_concurrent_writes_matches_everything_and_may_be_promoted() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start_with(&db, &prefix, &["--flag-poll", "200ms"]).await;
    let worker =
        Replica::start(&db, &prefix, &["--flag-poll", "200ms", "--search-shadow-compare-every", "100ms"]).await;
    start_shadow(&db, Executor::Monolith).await;
    candidate_listening(&prefix).await;

    // Two writers at once, while both sides project and the comparer compares.
    let (a, b) = tokio::join!(random_history(&api, 10, 160, 7), random_history(&api, 10, 160, 8));
    let users = a.len() + b.len();
    consumers_caught_up(&db, &prefix, &[search_projector::CONSUMER.into(), candidate_consumer()]).await;
    all_settled(&db).await;

    let t = tally(&db).await;
    assert_eq!((t.mismatched, t.missing), (0, 0), "an identical candidate differs nowhere: {t:?}");
    assert!(t.matched >= candidate_documents(&db).await, "every candidate document was compared: {t:?}");
    assert!(t.matched >= users as i64, "{t:?}");
    // The candidate's side exports what it recorded.
    let metrics = worker.metrics().await;
    assert_eq!(comparisons_metric(&metrics, "matched"), t.matched as f64, "the metric counts the comparisons");
    assert_eq!(comparisons_metric(&metrics, "mismatched"), 0.0);

    let parity = ctl(&db, &["--output", "json", "parity", "search"]).await;
    assert!(parity.success, "{}", parity.stderr);
    let report: Value = serde_json::from_str(&parity.stdout).unwrap();
    assert_eq!((report["matched"].as_i64(), report["mismatched"].as_i64()), (Some(t.matched), Some(0)), "{report}");
    assert_eq!(
        (report["period"]["primary"].as_str(), report["period"]["candidate"].as_str()),
        (Some("monolith"), Some("worker"))
    );
    assert_eq!(report["first_differences"], Value::Array(Vec::new()));

    let min = users.to_string();
    let promoted = ctl(
        &db,
        &["flags", "set", "search.executor", "worker", "--reason", "parity clean", "--promotion-min-comparisons", &min],
    )
    .await;
    assert!(promoted.success, "the gate lets a clean candidate through: {}", promoted.stderr);
    assert!(promoted.stdout.contains("search.executor: shadow → worker"), "{}", promoted.stdout);
    assert_eq!(last_audit(&db).await, ("shadow".into(), "worker".into(), false));
    drop(api);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_candidate_with_a_different_rule_is_caught_field_by_field_and_the_gate_refuses_it_unless_forced() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start_with(&db, &prefix, &["--flag-poll", "200ms"]).await;

    // The worker's side, in this process, with a rule only this test uses: labels upper-cased.
    let stop = CancellationToken::new();
    let _stop_on_drop = stop.clone().drop_guard();
    let client = async_nats::connect(trellis_testkit::nats_url()).await.unwrap();
    let ctx = RunnerContext {
        js: trellis_runtime::nats::jetstream(client, Duration::from_secs(5)),
        topology: Topology::new(&prefix).unwrap(),
        host: "test".into(),
        version: "test".into(),
    };
    let shouting = Rules { directory: |_| {}, contact: |d| d.label = d.label.to_uppercase() };
    let config = RunnerConfig { batch_size: 1000, batch_window: Duration::from_millis(50), ..RunnerConfig::default() };
    let flags = trellis_runtime::flags::Flags::watch(db.pool.clone(), Duration::from_millis(200), stop.clone());
    let gate = flags.candidate_gate(Flag::SearchExecutor, Executor::Worker);
    let (pool, group_ctx) = (db.pool.clone(), ctx.clone());
    let make = move || candidate_group(group_ctx.clone(), config.clone(), pool.clone(), shouting);
    tokio::spawn(trellis_runtime::shadow::run_candidate(make, gate.clone(), stop.clone()));
    let comparer = Comparer::new(
        db.pool.clone(),
        ctx,
        ComparerConfig { every: Duration::from_millis(100), missing_after: Duration::from_secs(300), batch: 1000 },
    );
    tokio::spawn(trellis_runtime::flags::while_open(gate, stop.clone(), move |t| comparer.clone().run(t)));

    start_shadow(&db, Executor::Monolith).await;
    candidate_listening(&prefix).await;
    random_history(&api, 10, 160, 11).await;
    consumers_caught_up(&db, &prefix, &[search_projector::CONSUMER.into(), candidate_consumer()]).await;
    all_settled(&db).await;

    let t = tally(&db).await;
    assert!(t.mismatched > 0 && t.matched > 0, "labelled contacts differ, the rest match: {t:?}");
    assert_eq!(t.missing, 0, "{t:?}");
    // Only the rule's difference shows: same input on both sides, so no other field differs.
    let differences: Vec<(String, Value)> =
        sqlx::query_as("SELECT key, diffs FROM shadow.comparisons WHERE processor = 'search' AND result <> 'matched'")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(differences.len() as i64, t.mismatched);
    for (key, diffs) in &differences {
        assert!(key.starts_with("contacts/"), "{key}");
        let diffs = diffs.as_array().unwrap();
        assert_eq!(diffs.len(), 1, "{key}: {diffs:?}");
        let (primary, candidate) = (diffs[0]["primary"].as_str().unwrap(), diffs[0]["candidate"].as_str().unwrap());
        assert_eq!((diffs[0]["field"].as_str(), primary.to_uppercase().as_str()), (Some("label"), candidate), "{key}");
    }

    let refused = ctl(
        &db,
        &["flags", "set", "search.executor", "worker", "--reason", "ship it", "--promotion-min-comparisons", "1"],
    )
    .await;
    assert!(!refused.success, "the gate refuses: {}", refused.stdout);
    assert!(refused.stderr.contains("refused to set search.executor to worker"), "{}", refused.stderr);
    assert!(refused.stderr.contains("mismatch rate"), "it says why: {}", refused.stderr);
    assert_eq!(last_audit(&db).await.1, "shadow", "nothing changed");

    let parity = ctl(&db, &["parity", "search", "--limit", "3"]).await;
    assert!(parity.success, "{}", parity.stderr);
    assert!(parity.stdout.contains(&format!("mismatched  {}", t.mismatched)), "{}", parity.stdout);
    assert!(parity.stdout.contains("first differences:"), "{}", parity.stdout);
    let (primary, candidate) = {
        let first = &differences[0].1[0];
        (first["primary"].to_string(), first["candidate"].to_string())
    };
    assert!(
        parity.stdout.contains(&format!("label: primary {primary}, candidate {candidate}")),
        "the first mismatch field by field: {}",
        parity.stdout
    );

    let forced = ctl(
        &db,
        &[
            "flags",
            "set",
            "search.executor",
            "worker",
            "--reason",
            "ship it",
            "--promotion-min-comparisons",
            "1",
            "--force",
        ],
    )
    .await;
    assert!(forced.success, "{}", forced.stderr);
    assert!(forced.stdout.contains("forced past the promotion gate"), "{}", forced.stdout);
    assert_eq!(last_audit(&db).await, ("shadow".into(), "worker".into(), true));
    drop(api);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_identical_monolith_candidate_matches_the_worker_primary() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start_with(&db, &prefix, &["--flag-poll", "200ms", "--search-shadow-compare-every", "100ms"]).await;
    let _worker = Replica::start(&db, &prefix, &["--flag-poll", "200ms"]).await;
    start_shadow(&db, Executor::Worker).await;
    candidate_listening(&prefix).await;

    let (a, b) = tokio::join!(random_history(&api, 8, 120, 21), random_history(&api, 8, 120, 22));
    consumers_caught_up(&db, &prefix, &[search_projector::CONSUMER.into(), candidate_consumer()]).await;
    all_settled(&db).await;

    let t = tally(&db).await;
    assert_eq!((t.mismatched, t.missing), (0, 0), "{t:?}");
    assert!(t.matched >= (a.len() + b.len()) as i64, "{t:?}");
    // The recorder is global to this test process, shared with the other in-process tests.
    assert!(comparisons_metric(&api.metrics().await, "matched") >= t.matched as f64, "the API exports them");
    let p = period(&db).await;
    assert_eq!((p.primary, p.candidate()), (Executor::Worker, Executor::Monolith));
}

/// A digest of the production tables the candidate must never write.
async fn production_digest(db: &TestDb) -> Vec<(String, Option<String>)> {
    let mut digest = Vec::new();
    for table in [
        "ops.outbox",
        "identity.users",
        "identity.tokens",
        "contacts.contacts",
        "circles.circles",
        "circles.members",
        "search.directory",
        "search.contacts",
        "search.name_postings",
        "search.checkpoint",
        "score.user_scores",
        "security.disputes",
    ] {
        let md5: Option<String> =
            sqlx::query_scalar(&format!("SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {table} t"))
                .fetch_one(&db.pool)
                .await
                .unwrap();
        digest.push((table.to_owned(), md5));
    }
    digest
}

#[tokio::test(flavor = "multi_thread")]
async fn the_candidate_alone_writes_only_its_shadow_tables_and_unanswered_documents_are_missing() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    // The worker is the primary but does not run: only the API's candidate processes events.
    let api = Api::start_with(
        &db,
        &prefix,
        &["--flag-poll", "200ms", "--search-shadow-compare-every", "100ms", "--search-shadow-missing-after", "1s"],
    )
    .await;
    start_shadow(&db, Executor::Worker).await;
    candidate_listening(&prefix).await;
    let users = random_history(&api, 6, 60, 31).await;
    consumers_caught_up(&db, &prefix, &[candidate_consumer()]).await;
    all_settled(&db).await;

    let directory: i64 = sqlx::query_scalar("SELECT count(*) FROM shadow.search_directory WHERE document IS NOT NULL")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(directory, users.len() as i64, "the candidate projected every user");
    let t = tally(&db).await;
    assert_eq!((t.matched, t.mismatched), (0, 0), "nothing to compare with: {t:?}");
    assert!(t.missing >= users.len() as i64, "every version the primary never answered is missing: {t:?}");
    let parity = ctl(&db, &["parity", "search"]).await;
    assert!(parity.stdout.contains("the primary has not applied stream sequence"), "{}", parity.stdout);

    // The candidate keeps its own checkpoint: the last event it applied.
    let mut conn = db.pool.acquire().await.unwrap();
    let own = trellis_store::shadow_search::checkpoint(&mut conn).await.unwrap();
    let mut stream = jetstream().await.get_stream(format!("{prefix}_EVENTS")).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    assert_eq!(own.last_stream_sequence, Some(last as i64), "the candidate's checkpoint");
    // Nothing outside the shadow schema moved: no read model, no checkpoint, no outbox row.
    let checkpoint = trellis_store::search_model::checkpoint(&mut conn).await.unwrap();
    assert_eq!(checkpoint.last_stream_sequence, None, "the read model's checkpoint is untouched");
    let documents: i64 =
        sqlx::query_scalar("SELECT (SELECT count(*) FROM search.directory) + (SELECT count(*) FROM search.contacts)")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(documents, 0, "the read model is untouched");

    // One more event, published straight to the stream (no API write, no outbox row): whatever
    // changes now is the candidate's doing.
    let before = production_digest(&db).await;
    let version = |user: Uuid| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT version FROM shadow.search_directory WHERE user_id = $1")
                .bind(user)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let target = users[0].id;
    let was = version(target).await;
    let event = trellis_domain::events::Event::new(
        &trellis_domain::events::EventPayload::UserVerified(trellis_domain::events::UserRef {
            user_id: trellis_domain::ids::UserId(target),
        }),
        None,
        time::OffsetDateTime::now_utc(),
    );
    let js = jetstream().await;
    js.publish(format!("{prefix}.{}", event.subject), serde_json::to_vec(&event.envelope).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    eventually("the candidate to re-read the document", SETTLE, || async {
        (version(target).await > was).then_some(())
    })
    .await;
    consumers_caught_up(&db, &prefix, &[candidate_consumer()]).await;
    all_settled(&db).await;
    assert_eq!(production_digest(&db).await, before, "the candidate changed nothing outside its shadow tables");
    drop(api);
}

/// Runs comparison rounds until every candidate version since `since` is settled and no
/// suspect waits.
async fn rounds_until_settled(
    db: &TestDb,
    comparer: &Comparer,
    ledger: &mut search_projector::shadow::Ledger,
    since: time::OffsetDateTime,
) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    let mut pace = tokio::time::interval(Duration::from_millis(25));
    loop {
        pace.tick().await;
        comparer.round(ledger, since).await.expect("a comparison round");
        let left = trellis_store::shadow_search::unsettled_count(&db.pool, since).await.unwrap();
        if left == 0 && ledger.pending().is_empty() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{left} versions still unsettled after {SETTLE:?}");
    }
}

/// The hole of a fence taken from the stream alone: a change committed with its event still in
/// the outbox is read by one side (here a rebuild of the read model) and not the other. Its
/// event is in no stream yet, so both sides pass the stream's last sequence without applying it.
/// The fence waits for the outbox to publish it: the candidate then re-reads the document and
/// the suspicion is dropped, never recorded as a mismatch.
#[tokio::test(flavor = "multi_thread")]
async fn a_difference_from_a_change_whose_event_is_not_published_yet_is_not_a_mismatch() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    // This test publishes the outbox itself, when it chooses to.
    let api = Api::start_with(&db, &prefix, &["--flag-poll", "200ms", "--no-relay"]).await;
    let client = async_nats::connect(trellis_testkit::nats_url()).await.unwrap();
    let ctx = RunnerContext {
        js: trellis_runtime::nats::jetstream(client, Duration::from_secs(5)),
        topology: Topology::new(&prefix).unwrap(),
        host: "test".into(),
        version: "test".into(),
    };
    let relay = trellis_runtime::relay::Relay::new(
        db.pool.clone(),
        ctx.js.clone(),
        ctx.topology.clone(),
        trellis_runtime::relay::RelayConfig::default(),
    );

    // The worker's side in this process (the production rule), its comparer driven round by round.
    let stop = CancellationToken::new();
    let _stop_on_drop = stop.clone().drop_guard();
    let flags = trellis_runtime::flags::Flags::watch(db.pool.clone(), Duration::from_millis(200), stop.clone());
    let gate = flags.candidate_gate(Flag::SearchExecutor, Executor::Worker);
    let (pool, group_ctx) = (db.pool.clone(), ctx.clone());
    let make = move || candidate_group(group_ctx.clone(), RunnerConfig::default(), pool.clone(), Rules::PRODUCTION);
    tokio::spawn(trellis_runtime::shadow::run_candidate(make, gate, stop.clone()));
    let config = ComparerConfig { every: Duration::from_secs(1), missing_after: Duration::from_secs(300), batch: 1000 };
    let comparer = Comparer::new(db.pool.clone(), ctx, config);
    let mut ledger = search_projector::shadow::Ledger::new(config.missing_after);

    start_shadow(&db, Executor::Monolith).await;
    candidate_listening(&prefix).await;
    let since = period(&db).await.started_at;
    let (owner, friend) = (api.register("owner").await, api.register("friend").await);
    api.put_contact(&owner, friend.id, "before").await;
    relay.drain().await.unwrap();
    consumers_caught_up(&db, &prefix, &[search_projector::CONSUMER.into(), candidate_consumer()]).await;
    rounds_until_settled(&db, &comparer, &mut ledger, since).await;
    assert_eq!((tally(&db).await.mismatched, ledger.pending().len()), (0, 0));

    // Both sides apply a label change (the candidate's new version is not compared yet)...
    api.put_contact(&owner, friend.id, "mid").await;
    relay.drain().await.unwrap();
    consumers_caught_up(&db, &prefix, &[search_projector::CONSUMER.into(), candidate_consumer()]).await;
    // ...then the label changes again, its event staying in the outbox, and the read model is
    // rebuilt meanwhile: it reads the newest label, the candidate's version has the one before.
    api.put_contact(&owner, friend.id, "after").await;
    trellis_store::search_model::rebuild(&db.pool, trellis_store::search_model::RebuildScope::All, |_| {})
        .await
        .unwrap();
    assert_eq!(contact_row(&db, owner.id, friend.id).await.unwrap().4, "after");
    let document = trellis_store::shadow_search::DocKey::Contact { owner: owner.id, contact: friend.id };
    comparer.round(&mut ledger, since).await.unwrap();
    let pending = ledger.pending();
    assert_eq!(pending.iter().map(|p| p.0).collect::<Vec<_>>(), [document], "a suspect, not a verdict");
    // Both floors are at the stream's end already: a fence from the stream alone would pass now.
    for _ in 0..3 {
        comparer.round(&mut ledger, since).await.unwrap();
    }
    let t = tally(&db).await;
    assert_eq!((t.mismatched, t.missing), (0, 0), "nothing recorded against the suspect meanwhile: {t:?}");
    assert_eq!(ledger.pending(), pending, "the fence waits for the outbox");

    relay.drain().await.unwrap();
    consumers_caught_up(&db, &prefix, &[search_projector::CONSUMER.into(), candidate_consumer()]).await;
    rounds_until_settled(&db, &comparer, &mut ledger, since).await;
    let t = tally(&db).await;
    assert_eq!((t.mismatched, t.missing), (0, 0), "{t:?}");
    let recorded: Vec<String> =
        sqlx::query_scalar("SELECT key FROM shadow.comparisons WHERE processor = 'search' ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(recorded.iter().all(|k| !k.starts_with(&document.to_string())), "matches are folded: {recorded:?}");
    let settled: (i64, i64, Option<Value>) = sqlx::query_as(
        "SELECT version, settled_version, document FROM shadow.search_contacts WHERE owner_id = $1 AND contact_id = $2",
    )
    .bind(owner.id)
    .bind(friend.id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(settled.0, settled.1, "the re-read version was compared");
    assert_eq!(settled.2.unwrap()["label"], "after");
    drop(api);
}
