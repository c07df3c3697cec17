//! The transactional outbox and its relay: every mutation's event reaches the `EVENTS` stream
//! with the right subject, envelope and message id; a NATS outage loses and duplicates nothing;
//! two relays over one backlog publish every event exactly once.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use time::OffsetDateTime;
use trellis_domain::UserId;
use trellis_domain::events::{ContactChanged, Event, EventPayload};
use trellis_testkit::{PrivateNats, StoredMessage, TestDb, eventually};
use uuid::Uuid;

use crate::helpers::{Options, TestApp, readiness_check};

/// One event a test expects: the subject without the prefix, the envelope type, the actor and
/// the exact `data`.
struct Expected {
    subject: String,
    event_type: &'static str,
    actor: String,
    data: Value,
}

fn expected(subject: &str, event_type: &'static str, actor: &str, data: Value) -> Expected {
    Expected { subject: subject.to_owned(), event_type, actor: actor.to_owned(), data }
}

/// An outbox row, as the relay saw it.
#[derive(Debug, sqlx::FromRow)]
struct OutboxRow {
    seq: i64,
    id: Uuid,
    subject: String,
    payload: Value,
    published_at: Option<OffsetDateTime>,
}

async fn outbox_rows(app: &TestApp) -> Vec<OutboxRow> {
    sqlx::query_as("SELECT seq, id, subject, payload, published_at FROM ops.outbox ORDER BY seq")
        .fetch_all(&app.db.pool)
        .await
        .expect("reading the outbox")
}

/// Waits until every outbox row is in the stream and marked published, checks that the stream
/// and the outbox agree message by message, then finds each expected event exactly once.
async fn check_events(app: &TestApp, expected: &[Expected]) {
    let rows = outbox_rows(app).await;
    assert!(rows.len() >= expected.len(), "the outbox has {} rows for {} expected events", rows.len(), expected.len());
    let messages = app
        .events()
        .await
        .wait_for(&app.subject("events.>"), rows.len(), Duration::from_secs(20))
        .await
        .expect("every outbox event reaches the stream");
    app.wait_all_published(Duration::from_secs(20)).await;
    let rows = outbox_rows(app).await;
    assert_eq!(messages.len(), rows.len(), "one stream message per outbox row");

    // The stream holds exactly the outbox, row by row, in outbox order.
    for (msg, row) in messages.iter().zip(&rows) {
        assert!(row.published_at.is_some(), "row {} is marked published", row.seq);
        assert_eq!(msg.msg_id.as_deref(), Some(row.id.to_string().as_str()), "Nats-Msg-Id is the outbox id");
        assert_eq!(msg.subject, app.subject(&row.subject), "subject of row {}", row.seq);
        assert_eq!(msg.payload, row.payload, "the stream carries the outbox payload of row {}", row.seq);
        check_envelope(msg);
    }

    for want in expected {
        let found: Vec<&StoredMessage> = messages
            .iter()
            .filter(|m| m.payload["type"] == want.event_type && m.payload["data"] == want.data)
            .collect();
        assert_eq!(found.len(), 1, "exactly one {} event with data {}: {messages:#?}", want.event_type, want.data);
        let msg = found[0];
        assert_eq!(msg.subject, app.subject(&want.subject), "subject of {}", want.event_type);
        assert_eq!(msg.payload["actor_id"], want.actor.as_str(), "actor of {}", want.event_type);
    }
}

/// The envelope `{id, type, version, occurred_at, actor_id, data}`, its id the message id.
fn check_envelope(msg: &StoredMessage) {
    let envelope = msg.payload.as_object().expect("the payload is a JSON object");
    let mut keys: Vec<&str> = envelope.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["actor_id", "data", "id", "occurred_at", "type", "version"], "envelope fields");
    assert_eq!(envelope["id"].as_str(), msg.msg_id.as_deref(), "envelope id == Nats-Msg-Id");
    assert_eq!(envelope["version"], 1);
    let subject_type = msg.subject.split_once(".events.").map(|(_, rest)| rest).unwrap_or("");
    let event_type = envelope["type"].as_str().unwrap();
    assert!(subject_type.starts_with(event_type), "subject {} carries type {event_type}", msg.subject);
    let occurred = envelope["occurred_at"].as_str().expect("occurred_at is a string");
    let occurred = OffsetDateTime::parse(occurred, &time::format_description::well_known::Rfc3339)
        .expect("occurred_at is RFC 3339");
    let age = OffsetDateTime::now_utc() - occurred;
    assert!(age >= time::Duration::seconds(-5) && age < time::Duration::minutes(5), "occurred_at is now-ish: {age}");
    assert!(envelope["data"].is_object(), "data is an object");
}

/// Commits an outbox row on `subject` as a process other than the API would: its commit notifies
/// the relays.
async fn write_as_another_process(app: &TestApp, subject: &str) {
    sqlx::query("INSERT INTO ops.outbox (id, subject, payload) VALUES (gen_random_uuid(), $1, '{}')")
        .bind(subject)
        .execute(&app.db.pool)
        .await
        .expect("writing an outbox row as another process");
}

/// The API's request connections write outbox rows without a commit notification (notifying
/// commits run one at a time, database-wide): its own relay is woken in-process instead. With
/// the relay's poll an hour apart, only that wake can publish what the requests wrote. Any other
/// writer (a worker, `trellisctl`) still notifies.
#[tokio::test]
async fn api_writes_wake_their_own_relay_and_notify_nobody_while_other_writers_notify() {
    let app =
        TestApp::spawn_with(Options { args: vec!["--relay-poll-interval".into(), "1h".into()], ..Options::default() })
            .await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&app.db.pool).await.expect("a LISTEN connection");
    listener.listen("trellis_outbox").await.expect("LISTEN");
    let alice = app.register("alice").await;
    for i in 0..3 {
        let r = app.patch("/v1/me", Some(&alice.token), json!({"display_name": format!("Alice {i}")})).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        app.wait_all_published(Duration::from_secs(20)).await;
    }
    assert_eq!(outbox_rows(&app).await.len(), 4, "a registration and three profile updates");
    let notified = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await;
    assert!(notified.is_err(), "an API write notified the relays through the database: {notified:?}");

    write_as_another_process(&app, "events.test.other_writer").await;
    let notified = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await;
    assert!(matches!(notified, Ok(Ok(_))), "another writer's commit notifies: {notified:?}");
}

/// A relay that has been quiet for a `RELAY_MIN_BATCH_INTERVAL` publishes the next commit at once;
/// while commits notify faster than one an interval, it takes what they wrote in one batch an
/// interval (a batch's rows share the claim's `published_at`).
#[tokio::test]
async fn commits_within_the_minimum_batch_interval_go_out_in_one_batch_and_a_quiet_relay_waits_for_none() {
    const INTERVAL: Duration = Duration::from_secs(2);
    const WRITES: usize = 40;
    let args = ["--relay-min-batch-interval", "2s", "--relay-poll-interval", "1h"];
    let app = TestApp::spawn_with(Options { args: args.map(String::from).to_vec(), ..Options::default() }).await;
    let write = || write_as_another_process(&app, "events.test.burst");

    // The relay drained as it started and has been quiet since (its poll is an hour apart): the
    // first commit an interval and a half later is not held back.
    tokio::time::sleep(INTERVAL + INTERVAL / 2).await;
    write().await;
    app.wait_all_published(Duration::from_secs(30)).await;
    let delay: f64 = sqlx::query_scalar("SELECT EXTRACT(EPOCH FROM published_at - created_at)::float8 FROM ops.outbox")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(delay < INTERVAL.as_secs_f64() / 2.0, "a quiet relay held a commit back {delay} s");

    // A burst right after that batch: one batch an interval at most.
    let started = std::time::Instant::now();
    for _ in 1..WRITES {
        write().await;
    }
    let writing = started.elapsed();
    app.wait_all_published(Duration::from_secs(30)).await;
    let batches: Vec<OffsetDateTime> =
        sqlx::query_scalar("SELECT DISTINCT published_at FROM ops.outbox WHERE published_at IS NOT NULL ORDER BY 1")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    // The first commit's batch, the burst's first an interval after it, then one an interval.
    let most = 2 + (writing.as_secs_f64() / INTERVAL.as_secs_f64()).ceil() as usize;
    assert!(
        batches.len() <= most,
        "{WRITES} commits in {writing:?} went out in {} batches: {batches:?}",
        batches.len()
    );
    for pair in batches.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= INTERVAL - Duration::from_millis(200), "two batches {gap} apart: {batches:?}");
    }
    assert_eq!(app.events().await.count(&app.subject("events.test.burst")).await.unwrap(), WRITES as u64);
}

#[tokio::test]
async fn registering_and_updating_a_profile_publish_identity_events() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let r = app.patch("/v1/me", Some(&alice.token), json!({"display_name": "Alice Liddell"})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    check_events(
        &app,
        &[
            expected(
                "events.identity.user_registered",
                "identity.user_registered",
                &alice.id,
                json!({"user_id": alice.id, "handle": "alice", "display_name": "alice name"}),
            ),
            expected(
                "events.identity.profile_updated",
                "identity.profile_updated",
                &alice.id,
                json!({"user_id": alice.id, "display_name": "Alice Liddell", "email_changed": false}),
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn adding_updating_and_removing_a_contact_publish_contact_events() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let path = format!("/v1/me/contacts/{}", bob.id);
    assert_eq!(app.put(&path, Some(&alice.token), json!({"label": "friend"})).await.status, 201);
    assert_eq!(app.put(&path, Some(&alice.token), json!({"label": "best friend"})).await.status, 200);
    assert_eq!(app.delete(&path, Some(&alice.token)).await.status, 204);

    let change = |label: &str| json!({"owner_id": alice.id, "contact_id": bob.id, "label": label});
    check_events(
        &app,
        &[
            expected("events.contacts.contact_added", "contacts.contact_added", &alice.id, change("friend")),
            expected("events.contacts.contact_updated", "contacts.contact_updated", &alice.id, change("best friend")),
            expected(
                "events.contacts.contact_removed",
                "contacts.contact_removed",
                &alice.id,
                json!({"owner_id": alice.id, "contact_id": bob.id}),
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn circle_changes_and_memberships_publish_circle_events() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let t = Some(alice.token.as_str());
    assert_eq!(app.put(&format!("/v1/me/contacts/{}", bob.id), t, json!({"label": ""})).await.status, 201);
    let created = app.post("/v1/me/circles", t, json!({"name": "Family"})).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let circle = created.body["id"].as_str().unwrap().to_owned();
    assert_eq!(app.patch(&format!("/v1/me/circles/{circle}"), t, json!({"name": "Kin"})).await.status, 200);
    let member = format!("/v1/me/circles/{circle}/members/{}", bob.id);
    assert_eq!(app.put(&member, t, json!({})).await.status, 201);
    assert_eq!(app.delete(&member, t).await.status, 204);
    assert_eq!(app.delete(&format!("/v1/me/circles/{circle}"), t).await.status, 204);

    let named = |name: &str| json!({"circle_id": circle, "owner_id": alice.id, "name": name});
    let membership = json!({"circle_id": circle, "owner_id": alice.id, "user_id": bob.id});
    check_events(
        &app,
        &[
            expected("events.circles.circle_created", "circles.circle_created", &alice.id, named("Family")),
            expected("events.circles.circle_renamed", "circles.circle_renamed", &alice.id, named("Kin")),
            expected("events.circles.member_added", "circles.member_added", &alice.id, membership.clone()),
            expected("events.circles.member_removed", "circles.member_removed", &alice.id, membership),
            expected(
                "events.circles.circle_deleted",
                "circles.circle_deleted",
                &alice.id,
                json!({"circle_id": circle, "owner_id": alice.id}),
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn filed_disputes_go_to_their_priority_subject_and_decisions_publish_their_effects() {
    let app = TestApp::spawn().await;
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let moderator = app.register("moddy").await;
    app.grant_role(&moderator, "moderator").await;

    let mut expect = Vec::new();
    let mut impersonation = String::new();
    for (kind, priority) in [("impersonation", "P0"), ("harassment", "P1"), ("spam", "P2"), ("incorrect_info", "P3")] {
        let r = app
            .post(
                "/v1/disputes",
                Some(&alice.token),
                json!({"target_id": bob.id, "kind": kind, "description": format!("bob did {kind}")}),
            )
            .await;
        assert_eq!(r.status, 201, "{kind}: {:?}", r.body);
        let id = r.body["id"].as_str().unwrap().to_owned();
        if kind == "impersonation" {
            impersonation = id.clone();
        }
        expect.push(expected(
            &format!("events.disputes.filed.{}", priority.to_ascii_lowercase()),
            "disputes.filed",
            &alice.id,
            json!({"dispute_id": id, "reporter_id": alice.id, "target_id": bob.id, "kind": kind, "priority": priority}),
        ));
    }
    let r = app
        .post(
            &format!("/v1/moderation/disputes/{impersonation}/decision"),
            Some(&moderator.token),
            json!({"decision": "upheld", "note": "clearly not who they claim"}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    expect.push(expected(
        "events.identity.user_suspended",
        "identity.user_suspended",
        &moderator.id,
        json!({"user_id": bob.id, "reason": "upheld impersonation dispute", "dispute_id": impersonation}),
    ));
    expect.push(expected(
        "events.disputes.decided",
        "disputes.decided",
        &moderator.id,
        json!({
            "dispute_id": impersonation, "target_id": bob.id, "kind": "impersonation", "status": "upheld",
            "rule": "moderator", "decided_by": moderator.id
        }),
    ));
    check_events(&app, &expect).await;

    // Each priority subject holds exactly its one filed dispute.
    let reader = app.events().await;
    for p in ["p0", "p1", "p2", "p3"] {
        let filter = app.subject(&format!("events.disputes.filed.{p}"));
        assert_eq!(reader.count(&filter).await.unwrap(), 1, "{filter}");
    }
}

#[tokio::test]
async fn a_nats_outage_keeps_writes_working_and_the_backlog_drains_in_order_exactly_once() {
    const WRITES: usize = 20;
    let mut nats = PrivateNats::start().expect("a private nats-server");
    // A process of its own: the backlog gauge is one per process.
    let app = TestApp::spawn_with(Options { nats_url: Some(nats.url()), process: true, ..Options::default() }).await;
    let alice = app.register("alice").await;
    app.wait_for_events("identity.user_registered", 1).await;
    app.wait_all_published(Duration::from_secs(10)).await;
    app.wait_for_readiness("ready", &[], Duration::from_secs(10)).await;

    nats.stop();
    let report = app.wait_for_readiness("degraded", &["nats"], Duration::from_secs(10)).await;
    assert_eq!(readiness_check(&report, "database")["ok"], true, "{report}");

    for i in 0..WRITES {
        let r = app.post("/v1/me/circles", Some(&alice.token), json!({"name": format!("circle {i}")})).await;
        assert_eq!(r.status, 201, "write {i} during the outage: {:?}", r.body);
    }
    let r = app.patch("/v1/me", Some(&alice.token), json!({"display_name": "Alice in the dark"})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let pending = WRITES as i64 + 1;
    assert_eq!(app.unpublished().await, pending, "every write of the outage waits in the outbox");
    app.wait_for_readiness("degraded", &["nats"], Duration::from_secs(5)).await;

    // The backlog gauge is sampled every 2 s.
    // The whole backlog, once a sample was taken after the last write.
    eventually(&format!("trellis_outbox_pending_rows at {pending}"), Duration::from_secs(15), || async {
        (app.metric("trellis_outbox_pending_rows").await == Some(pending as f64)).then_some(())
    })
    .await;
    assert_eq!(app.unpublished().await, pending, "nothing was marked published while NATS was down");

    nats.restart().expect("nats-server restarts");
    let total = WRITES + 2;
    let messages = app
        .events()
        .await
        .wait_for(&app.subject("events.>"), total, Duration::from_secs(60))
        .await
        .expect("the backlog drains after NATS returns");
    app.wait_all_published(Duration::from_secs(30)).await;
    app.wait_for_readiness("ready", &[], Duration::from_secs(30)).await;

    // Exactly once: the stream's own count, and distinct message ids.
    let reader = app.events().await;
    assert_eq!(reader.count(&app.subject("events.>")).await.unwrap(), total as u64, "no duplicates in the stream");
    let ids: HashSet<&str> = messages.iter().map(|m| m.msg_id.as_deref().expect("Nats-Msg-Id")).collect();
    assert_eq!(ids.len(), total, "distinct message ids");
    // Oldest first: the stream order is the outbox order.
    let rows = outbox_rows(&app).await;
    assert_eq!(rows.len(), total);
    let outbox_order: Vec<String> = rows.iter().map(|r| r.id.to_string()).collect();
    let stream_order: Vec<String> = messages.iter().map(|m| m.msg_id.clone().unwrap()).collect();
    assert_eq!(stream_order, outbox_order, "the stream holds the events in outbox order");
    assert!(rows.iter().all(|r| r.published_at.is_some()));
    assert_eq!(messages.iter().filter(|m| m.payload["type"] == "circles.circle_created").count(), WRITES);
    eventually("trellis_outbox_pending_rows at 0", Duration::from_secs(15), || async {
        (app.metric("trellis_outbox_pending_rows").await == Some(0.0)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn two_relays_over_one_backlog_publish_every_event_exactly_once() {
    const BACKLOG: usize = 5_000;
    let db = TestDb::migrated().await.expect("test database");
    let prefix = trellis_testkit::nats_prefix();

    // The backlog is written while no relay runs.
    let owner = UserId::new();
    let now = OffsetDateTime::now_utc();
    let events: Vec<Event> = (0..BACKLOG)
        .map(|i| {
            let payload = EventPayload::ContactAdded(ContactChanged {
                owner_id: owner,
                contact_id: UserId::new(),
                label: format!("contact {i}"),
            });
            Event::new(&payload, Some(owner), now)
        })
        .collect();
    let tx = db.pool.begin().await.unwrap();
    trellis_commands::commit(tx, trellis_commands::Emitted::events(events.clone())).await.unwrap();
    let event_ids: HashSet<String> = events.iter().map(|e| e.envelope.id.to_string()).collect();
    assert_eq!(event_ids.len(), BACKLOG);

    // A plain subscriber sees every publish, duplicates included (the stream would drop those
    // within its duplicate window, hiding a relay that sends an event twice).
    let wire = async_nats::connect(trellis_testkit::nats_url()).await.unwrap();
    let mut on_the_wire = wire.subscribe(format!("{prefix}.events.>")).await.unwrap();
    wire.flush().await.unwrap();

    let options = || Options { args: vec!["--relay-batch-size".into(), "100".into()], ..Options::default() };
    let handle = db.handle();
    let (first, second) = tokio::join!(
        TestApp::start_on(db, prefix.clone(), options()),
        TestApp::start_on(handle, prefix.clone(), options()),
    );
    assert_ne!(first.addr, second.addr);

    let reader = first.events().await;
    reader.wait_until_declared(Duration::from_secs(10)).await;
    let messages = reader
        .wait_for(&first.subject("events.>"), BACKLOG, Duration::from_secs(120))
        .await
        .expect("the whole backlog reaches the stream");
    first.wait_all_published(Duration::from_secs(60)).await;

    assert_eq!(reader.count(&first.subject("events.>")).await.unwrap(), BACKLOG as u64, "messages in the stream");
    let in_stream: HashSet<String> = messages.iter().map(|m| m.msg_id.clone().expect("Nats-Msg-Id")).collect();
    assert_eq!(in_stream.len(), BACKLOG, "distinct message ids in the stream");
    assert_eq!(in_stream, event_ids, "the stream holds exactly the backlog");
    for m in &messages {
        assert_eq!(m.subject, format!("{prefix}.events.contacts.contact_added"));
        assert_eq!(m.payload["id"].as_str(), m.msg_id.as_deref());
    }

    // Every row was acknowledged, so every publish has passed the server; a round trip on the
    // subscriber's connection makes sure it has received whatever the server sent it.
    wire.flush().await.unwrap();
    let mut sent: HashMap<String, usize> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sent.len() < BACKLOG {
        let msg = tokio::time::timeout_at(deadline, on_the_wire.next())
            .await
            .unwrap_or_else(|_| panic!("only {} distinct events seen on the wire", sent.len()))
            .expect("subscription open");
        let id = msg.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).expect("Nats-Msg-Id").to_string();
        *sent.entry(id).or_default() += 1;
    }
    wire.flush().await.unwrap();
    while let Some(Some(msg)) = futures::FutureExt::now_or_never(on_the_wire.next()) {
        let id = msg.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).expect("Nats-Msg-Id").to_string();
        *sent.entry(id).or_default() += 1;
    }
    let twice: Vec<(&String, &usize)> = sent.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "events the relays published more than once: {twice:?}");
    assert_eq!(sent.len(), BACKLOG);

    // Both replicas shut down cleanly, relays included.
    second.stop().await;
    let (db, _) = first.stop().await;
    let published: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.outbox WHERE published_at IS NOT NULL")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(published, BACKLOG as i64);
}

#[tokio::test]
async fn republishing_a_window_resends_it_and_the_stream_keeps_one_copy_of_each_event() {
    let app = TestApp::spawn().await;
    for handle in ["alice", "bob", "carol"] {
        app.register(handle).await;
    }
    app.wait_for_events("identity.user_registered", 3).await;
    app.wait_all_published(Duration::from_secs(10)).await;

    // What `trellisctl outbox republish --since 5m` does.
    let since = OffsetDateTime::now_utc() - time::Duration::minutes(5);
    let reset = trellis_store::outbox::reset_published_since(&app.db.pool, since).await.unwrap();
    assert_eq!(reset, 3);
    app.wait_all_published(Duration::from_secs(10)).await;

    // Within the duplicate window JetStream drops the copies: still exactly three.
    let reader = app.events().await;
    let filter = app.subject("events.>");
    assert_eq!(reader.count(&filter).await.unwrap(), 3);
    let published: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.outbox WHERE published_at IS NOT NULL")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(published, 3);
}

#[tokio::test]
async fn the_relay_exports_how_full_each_stream_is() {
    let args = ["--events-stream-max-bytes", "1MiB", "--stream-poll-interval", "100ms"];
    let app = TestApp::spawn_with(Options {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        process: true,
        ..Options::default()
    })
    .await;
    for stream in ["EVENTS", "DLQ", "REPLAY", "ADVISORIES"] {
        for name in ["trellis_stream_stored_bytes", "trellis_stream_stored_messages", "trellis_stream_limit_ratio"] {
            let labels = format!("stream=\"{stream}\"");
            assert!(app.labelled_metric(name, &labels).await.is_some(), "{name}{{{labels}}} from start-up");
        }
    }
    app.register("alice").await;
    app.wait_for_events("identity.user_registered", 1).await;
    let (bytes, ratio) =
        eventually("the EVENTS stream's gauges to count the event", Duration::from_secs(10), || async {
            // One scrape: the three gauges of one poll.
            let (_, text) = app.admin_get("/metrics").await;
            let gauge = |name: &str| trellis_testkit::metrics::series(&text, &format!("{name}{{stream=\"EVENTS\"}}"));
            let (bytes, ratio) = (gauge("trellis_stream_stored_bytes")?, gauge("trellis_stream_limit_ratio")?);
            (gauge("trellis_stream_stored_messages")? >= 1.0).then_some((bytes, ratio))
        })
        .await;
    assert!(bytes > 0.0 && (ratio - bytes / (1024.0 * 1024.0)).abs() < 1e-9, "bytes {bytes}, ratio {ratio}");
    // Streams without a byte limit (the test's DLQ) report a ratio of 0.
    assert_eq!(app.labelled_metric("trellis_stream_limit_ratio", "stream=\"DLQ\"").await, Some(0.0));
}

/// The API as deployed once every processor runs in its worker: logged in to NATS as
/// `trellis-api` of `deploy/nats/auth.conf` (publish `events.>`, declare the streams, no
/// consumer), its relay publishes what a request wrote.
#[tokio::test]
async fn the_relay_publishes_as_the_apis_own_nats_user() {
    use trellis_domain::flags::{Executor, Flag};
    let nats = PrivateNats::deployed().expect("a nats-server with the deployed permissions");
    let db = TestDb::migrated().await.unwrap();
    for flag in Flag::ALL {
        let change = trellis_store::cutover::flags::Change {
            flag,
            value: Executor::Worker,
            actor: "test",
            reason: "the API runs no processor",
            forced: false,
        };
        trellis_store::cutover::flags::set(&db.pool, &change).await.expect("setting the flag");
    }
    let args = ["--nats-user", "trellis-api", "--nats-password", "api-nats-pw"];
    let options = Options {
        nats_url: Some(nats.url()),
        process: true,
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        ..Options::default()
    };
    let app = TestApp::start_on(db, String::new(), options).await;
    app.wait_for_readiness("ready", &[], Duration::from_secs(10)).await;
    app.register("alice").await;
    app.wait_all_published(Duration::from_secs(10)).await;
    let operator = trellis_testkit::probe::connect(&nats.url_as("trellisctl", "ctl-nats-pw")).await;
    let mut events = operator.get_stream("EVENTS").await.expect("the API declared the stream");
    assert!(events.info().await.unwrap().state.messages >= 1, "the registration's event is in EVENTS");
}

/// A full `EVENTS` stream (discard `new`) refuses the relay's publishes; the events wait in the
/// outbox, and nothing the stream held is dropped, on nats-server 2.9 too (whose own check lets
/// a stream near its limit drop its oldest messages: the relay checks the room itself).
#[tokio::test]
async fn a_full_events_stream_keeps_the_rest_in_the_outbox_and_drops_nothing() {
    const CIRCLES: usize = 60;
    let args = ["--events-stream-max-bytes", "16KiB"];
    let app = TestApp::spawn_with(Options {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        process: true,
        ..Options::default()
    })
    .await;
    let alice = app.register("alice").await;
    for i in 0..CIRCLES {
        let r = app.post("/v1/me/circles", Some(&alice.token), json!({"name": format!("circle {i}")})).await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }
    eventually("the relay to find the stream full", Duration::from_secs(15), || async {
        (app.metric("trellis_outbox_relay_errors_total").await? > 0.0).then_some(())
    })
    .await;
    let js = trellis_testkit::probe::connect(&app.nats_url).await;
    let mut events = js.get_stream(format!("{}_EVENTS", app.prefix)).await.unwrap();
    let state = events.info().await.unwrap().state.clone();
    let waiting = app.unpublished().await;
    assert!(waiting > 0, "some events wait in the outbox: {state:?}");
    assert_eq!(state.first_sequence, 1, "the stream dropped nothing: {state:?}");
    assert_eq!(state.messages as i64 + waiting, CIRCLES as i64 + 1, "every event is in the stream or the outbox");
    assert!(state.bytes <= 16 * 1024, "{state:?}");
}
