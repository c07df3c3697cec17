//! The event catalogue (`trellis_domain::events::catalogue`) against the commands: every
//! command run once or more against a real database, the types each one emitted compared with
//! the producers the catalogue names, and the outbox rows `commit` wrote compared with both.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use trellis_commands::Emitted;
use trellis_commands::disputes::{Decided, DecidedBy, Filing, FilingLimits, Moderator};
use trellis_commands::identity::{NewAccount, ProfileChange};
use trellis_domain::disputes::{Description, DisputeKind, DisputeStatus, Verdict};
use trellis_domain::events::EventType;
use trellis_domain::events::catalogue;
use trellis_domain::identity::{AdminReason, DisplayName, Email, Handle, Role};
use trellis_domain::score::InputDigest;
use trellis_domain::social::{CircleName, ContactLabel};
use trellis_domain::{CircleId, DisputeId, UserId};
use trellis_store::identity::TargetRow;
use trellis_store::scores::{NewScore, RunResult};
use trellis_store::user_admin::Actor;
use trellis_testkit::TestDb;

/// The types each command emitted, by the command's name in the catalogue.
#[derive(Default)]
struct Observed(BTreeMap<&'static str, BTreeSet<EventType>>);

impl Observed {
    fn record<T>(&mut self, command: &'static str, emitted: &Emitted<T>) {
        self.0.entry(command).or_default().extend(emitted.event_types());
    }
}

/// Runs `trellis_commands::<module>::<function>(args)` in a transaction of its own, records the
/// types it emitted under `<module>::<function>`, commits, and gives back what it did.
macro_rules! run {
    ($db:expr, $observed:expr, $module:ident::$function:ident($($arg:expr),*)) => {{
        let mut tx = $db.pool.begin().await.unwrap();
        let emitted = trellis_commands::$module::$function(&mut tx, $($arg),*)
            .await
            .expect(concat!(stringify!($module), "::", stringify!($function)));
        $observed.record(concat!(stringify!($module), "::", stringify!($function)), &emitted);
        trellis_commands::commit(tx, emitted).await.unwrap()
    }};
}

async fn register(db: &TestDb, observed: &mut Observed, handle: &str) -> UserId {
    let id = UserId::new();
    let handle = Handle::parse(handle).unwrap();
    let display_name = DisplayName::parse(handle.as_str()).unwrap();
    let email = Email::parse(&format!("{}@example.com", handle.as_str())).unwrap();
    let account = NewAccount { id, handle: &handle, display_name: &display_name, email: &email, password_hash: "-" };
    run!(db, observed, identity::register(&account));
    id
}

fn target(id: UserId) -> TargetRow {
    TargetRow { id: id.0, status: trellis_domain::identity::UserStatus::Active }
}

#[tokio::test]
async fn every_event_type_is_emitted_by_the_commands_the_catalogue_names_and_written_by_commit() {
    let db = TestDb::migrated().await.unwrap();
    let mut observed = Observed::default();
    let alice = register(&db, &mut observed, "alice").await;
    let bob = register(&db, &mut observed, "bob").await;
    let carol = register(&db, &mut observed, "carol").await;
    let dave = register(&db, &mut observed, "dave").await;
    let operator = Actor { name: "catalogue-test", user_id: None };
    let reason = AdminReason::parse("the catalogue test").unwrap();

    // Identity and user administration.
    let name = DisplayName::parse("Alice A.").unwrap();
    let change = ProfileChange { display_name: Some(&name), ..ProfileChange::default() };
    run!(db, observed, identity::update_profile(alice, &change, &[]));
    run!(db, observed, users::grant_role(carol, Role::Moderator, &operator, &reason));
    run!(db, observed, users::set_verified(bob, true));
    run!(db, observed, users::set_verified(bob, false));

    // Contacts and circles.
    let label = ContactLabel::parse("met at the gym").unwrap();
    run!(db, observed, contacts::put(alice, &target(bob), &label));
    run!(db, observed, contacts::put(alice, &target(bob), &ContactLabel::parse("climbing partner").unwrap()));
    run!(db, observed, contacts::put(alice, &target(dave), &label));
    let circle = CircleId::new();
    run!(db, observed, circles::create(alice, circle, &CircleName::parse("climbing").unwrap()));
    run!(db, observed, circles::rename(alice, circle, &CircleName::parse("bouldering").unwrap()));
    run!(db, observed, circles::add_member(alice, circle, dave));
    run!(db, observed, circles::remove_member(alice, circle, dave));
    run!(db, observed, circles::add_member(alice, circle, dave));
    run!(db, observed, contacts::remove(alice, dave));
    run!(db, observed, circles::delete(alice, circle));

    // Disputes: a filing, a moderator's decision, and a rule's (as the processor applies it).
    let limits = FilingLimits { open: 20, open_p0: 3, p0_min_account_age: Duration::ZERO };
    let description = Description::parse("pretends to be me").unwrap();
    let filing = Filing {
        id: DisputeId::new(),
        reporter: alice,
        target: bob,
        kind: DisputeKind::Impersonation,
        description: &description,
        evidence: None,
    };
    run!(db, observed, disputes::file(&filing, &limits));
    let moderator = Moderator { id: carol, role: Role::Moderator };
    run!(db, observed, disputes::moderate(moderator, filing.id, Verdict::Upheld, "it is an impersonation"));
    let harassment = Filing { id: DisputeId::new(), target: dave, kind: DisputeKind::Harassment, ..filing };
    run!(db, observed, disputes::file(&harassment, &limits));
    let decided = Decided {
        dispute: harassment.id,
        target: dave,
        kind: DisputeKind::Harassment,
        status: DisputeStatus::Upheld,
        by: DecidedBy::Rule("R4"),
    };
    run!(db, observed, disputes::apply_decision(&decided));
    run!(db, observed, users::reinstate(bob, &operator, &reason));

    // Scores: a request, and a run's results.
    let requested = trellis_commands::scores::request_run(Some(alice), "the catalogue test", OffsetDateTime::now_utc());
    observed.record("scores::request_run", &requested);
    trellis_commands::commit(db.pool.begin().await.unwrap(), requested).await.unwrap();
    let run_id = uuid::Uuid::now_v7();
    let mut conn = db.pool.acquire().await.unwrap();
    trellis_store::scores::request_run(&mut *conn, "manual", None).await.unwrap();
    let started = trellis_store::scores::start_pending_run(&mut conn, run_id, "test", "test").await.unwrap();
    assert!(started.is_some(), "the run starts from the pending request");
    drop(conn);
    let changed = [NewScore { user_id: alice.0, trust: 0.5, score: 500 }];
    let result = RunResult {
        run_id,
        changed: &changed,
        stale: &[],
        users: 4,
        edges: 1,
        iterations: 1,
        residual: 0.0,
        load_ms: 0,
        compute_ms: 0,
        input_digest: InputDigest::new(),
    };
    let mut tx = db.pool.begin().await.unwrap();
    let recorded = trellis_commands::scores::record_run(&mut tx, &result, Duration::from_secs(5)).await.unwrap();
    observed.record("scores::record_run", &recorded);
    let finish = trellis_commands::scores::finish_run(&result, Instant::now());
    trellis_commands::commit_with(tx, recorded, finish).await.unwrap();

    // Each command emitted only types whose entry names it as a producer…
    let mut emitted = BTreeSet::new();
    for (command, types) in &observed.0 {
        for &t in types {
            let producers: Vec<&str> = catalogue::entry(t).producers.iter().map(|p| p.command).collect();
            assert!(producers.contains(command), "{command} emits {t}, but the catalogue names {producers:?}");
            emitted.insert(t);
        }
    }
    // …and every producer the catalogue names emitted its type: no dead variant, no stale producer.
    for entry in catalogue::entries() {
        for producer in entry.producers {
            let types = observed.0.get(producer.command);
            assert!(
                types.is_some_and(|types| types.contains(&entry.event_type)),
                "the catalogue names {} as a producer of {}, but it emitted {types:?}",
                producer.command,
                entry.event_type
            );
        }
    }
    assert_eq!(emitted, EventType::ALL.iter().copied().collect::<BTreeSet<_>>(), "every type is produced");

    // What commit wrote: one outbox row per event, every type among them.
    let written: Vec<String> =
        sqlx::query_scalar("SELECT payload->>'type' FROM ops.outbox ORDER BY seq").fetch_all(&db.pool).await.unwrap();
    let written: BTreeSet<EventType> = written.iter().map(|t| EventType::parse(t).expect("a known type")).collect();
    assert_eq!(written, emitted);
}

#[tokio::test]
async fn a_score_run_writes_its_changed_scores_in_chunks_of_a_thousand_in_order() {
    let db = TestDb::migrated().await.unwrap();
    let run_id = uuid::Uuid::now_v7();
    let changed: Vec<NewScore> =
        (0..2_500).map(|i| NewScore { user_id: uuid::Uuid::now_v7(), trust: 0.0, score: i }).collect();
    let result = RunResult {
        run_id,
        changed: &changed,
        stale: &[],
        users: 2_500,
        edges: 0,
        iterations: 1,
        residual: 0.0,
        load_ms: 0,
        compute_ms: 0,
        input_digest: InputDigest::new(),
    };
    let mut tx = db.pool.begin().await.unwrap();
    let mut emitted = Emitted::none();
    emitted.absorb(trellis_commands::scores::record_run(&mut tx, &result, Duration::from_secs(5)).await.unwrap());
    emitted.absorb(trellis_commands::scores::request_run(None, "after the run", OffsetDateTime::now_utc()));
    trellis_commands::commit(tx, emitted).await.unwrap();

    let rows: Vec<(String, serde_json::Value)> =
        sqlx::query_as("SELECT payload->>'type', payload->'data' FROM ops.outbox ORDER BY seq")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let types: Vec<&str> = rows.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(types, ["scores.updated", "scores.updated", "scores.updated", "scores.run_requested"]);
    let scores: Vec<i64> = rows[..3]
        .iter()
        .flat_map(|(_, data)| data["scores"].as_array().unwrap().iter().map(|s| s["score"].as_i64().unwrap()))
        .collect();
    assert_eq!(scores, (0..2_500).collect::<Vec<i64>>(), "every changed score once, in order");
    let sizes: Vec<usize> = rows[..3].iter().map(|(_, data)| data["scores"].as_array().unwrap().len()).collect();
    assert_eq!(sizes, [1000, 1000, 500]);
}
