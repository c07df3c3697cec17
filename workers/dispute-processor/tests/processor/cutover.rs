//! Cutover: `dispute.executor` moves the dispute processor between
//! `trellis-api` (in-process) and the `dispute-processor` worker, both pulling from the same
//! four per-priority consumers. Under a steady stream of filings it flips 20 times; and when
//! the API is killed (SIGKILL) mid-flip, the worker takes over what the API held.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use dispute_processor::consumer_name;
use trellis_domain::UserId;
use trellis_domain::disputes::Priority;
use trellis_domain::events::filed_subject;
use trellis_domain::flags::{Executor, Flag};
use trellis_store::cutover::flags::{self, Change};
use trellis_testkit::TestDb;
use uuid::Uuid;

use crate::harness::*;

async fn flip(db: &TestDb, value: Executor) {
    let change = Change { flag: Flag::DisputeExecutor, value, actor: "test", reason: "flip under load", forced: false };
    flags::set(&db.pool, &change).await.expect("setting the flag");
}

/// Messages the dispute consumers handled successfully, in a process's `/metrics`.
fn handled(metrics: &str) -> f64 {
    Priority::ALL
        .into_iter()
        .map(|p| {
            let consumer = format!("consumer=\"{}\"", consumer_name(p));
            sum(metrics, "trellis_worker_messages_total", &[&consumer, "outcome=\"ok\""])
        })
        .sum()
}

/// Automatic decisions a process made (`trellis_dispute_decisions_total`, every rule).
fn decisions(metrics: &str) -> f64 {
    sum(metrics, "trellis_dispute_decisions_total", &[])
}

/// The people of a workload whose every dispute is decided on its own by R1, R2 or R4,
/// whichever process takes it and in whatever order: no dispute is ever handed to a moderator
/// (R5, or R3 for a P0), so none can be decided a second time later (an R5 upheld by a later
/// R4 is the one legitimate second row), and "one decision row per dispute" is exact.
struct Cast {
    /// Credible reporters (score 500), each with an upheld dispute already, so R3 (low
    /// credibility) never applies to them.
    reporters: Vec<User>,
    /// A suspended user: any dispute against them is dismissed (R1, or R2 "moot"), at every
    /// priority.
    suspended: User,
    /// Users against whom two other credible reporters' spam disputes were upheld by a
    /// moderator: a reporter's first spam dispute against one is upheld (R4: three credible
    /// reporters, an unscored target), a repeat is dismissed (R1) or upheld with the first (R4).
    corroborated: Vec<User>,
}

impl Cast {
    async fn new(api: &Api, db: &TestDb) -> Self {
        let t = tag();
        let moderator = api.register(&format!("mod{t}")).await;
        make_role(db, moderator.id, "moderator").await;
        let mut credible = Vec::new();
        for i in 0..8 {
            let user = api.register(&format!("r{i}{t}")).await;
            set_score(db, user.id, 500).await;
            credible.push(user);
        }
        let reporters = credible.split_off(2);
        let suspended = api.register(&format!("sus{t}")).await;
        let mut conn = db.pool.acquire().await.unwrap();
        let status = trellis_domain::identity::UserStatus::Suspended;
        trellis_store::identity::set_status(&mut conn, UserId(suspended.id), status).await.expect("suspending a user");
        trellis_store::identity::revoke_all_tokens(&mut *conn, UserId(suspended.id)).await.expect("revoking tokens");
        let mut corroborated = Vec::new();
        for i in 0..4 {
            let target = api.register(&format!("t{i}{t}")).await;
            for seeder in &credible {
                let id = api.file(seeder, target.id, "spam").await;
                api.decided(seeder, id).await;
                assert_eq!(rule_of(db, id).await, "R5", "two reporters do not corroborate");
                let (status, body) = api.moderate(&moderator, id, "upheld").await;
                assert_eq!(status, 200, "{body:?}");
            }
            corroborated.push(target);
        }
        let first = reporters.iter().map(|r| api.file(r, corroborated[0].id, "spam"));
        let first = futures::future::join_all(first).await;
        all_decided(db, &first).await;
        for (r, id) in reporters.iter().zip(&first) {
            assert_eq!(api.dispute(r, *id).await["status"], "upheld", "{} has an upheld dispute", r.handle);
        }
        Self { reporters, suspended, corroborated }
    }

    /// The `k`-th dispute of reporter `r`: every priority, against the suspended user or a
    /// corroborated one.
    async fn file(&self, api: &Api, r: usize, k: usize) -> Uuid {
        let (target, kind) = match k % 4 {
            0 => (self.corroborated[(r + k / 4) % self.corroborated.len()].id, "spam"),
            1 => (self.suspended.id, "impersonation"),
            2 => (self.suspended.id, "harassment"),
            _ => (self.suspended.id, "incorrect_info"),
        };
        api.file(&self.reporters[r], target, kind).await
    }

    /// Every reporter files one dispute every 50 ms until `stop`; returns the ids.
    async fn file_until(&self, api: &Api, stop: &AtomicBool) -> Vec<Uuid> {
        let filers = (0..self.reporters.len()).map(|r| async move {
            let mut pace = tokio::time::interval(Duration::from_millis(50));
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut ids = Vec::new();
            while !stop.load(Ordering::Acquire) {
                pace.tick().await;
                ids.push(self.file(api, r, ids.len()).await);
            }
            ids
        });
        futures::future::join_all(filers).await.concat()
    }

    /// Every reporter files `n` disputes; returns the ids.
    async fn file_each(&self, api: &Api, n: usize) -> Vec<Uuid> {
        let filers = (0..self.reporters.len()).map(|r| async move {
            let mut ids = Vec::new();
            for k in 0..n {
                ids.push(self.file(api, r, k).await);
            }
            ids
        });
        futures::future::join_all(filers).await.concat()
    }
}

/// Messages delivered to the dispute consumers and not acknowledged yet (`None` until all
/// four exist).
async fn unacknowledged(prefix: &str) -> Option<usize> {
    let js = async_nats::jetstream::new(async_nats::connect(trellis_testkit::nats_url()).await.ok()?);
    let stream = js.get_stream(format!("{prefix}_EVENTS")).await.ok()?;
    let mut total = 0;
    for p in Priority::ALL {
        let mut consumer: PullConsumer = stream.get_consumer(&format!("{prefix}_{}", consumer_name(p))).await.ok()?;
        total += consumer.info().await.ok()?.num_ack_pending;
    }
    Some(total)
}

/// Waits until every outbox event is published and each dispute consumer has acknowledged
/// every event on its subject (none pending, none unacknowledged: so every decision its
/// handlers committed is counted in their process's metrics); then checks that the stream
/// holds exactly the outbox's events.
async fn drained(db: &TestDb, prefix: &str) {
    all_published(db).await;
    let js = async_nats::jetstream::new(async_nats::connect(trellis_testkit::nats_url()).await.unwrap());
    let mut stream = js.get_stream(format!("{prefix}_EVENTS")).await.unwrap();
    for p in Priority::ALL {
        let subject = format!("{prefix}.{}", filed_subject(p));
        // No message on the subject (none of that priority filed yet): the floor stays at 0.
        let last = stream.get_last_raw_message_by_subject(&subject).await.map_or(0, |m| m.sequence);
        let name = format!("{prefix}_{}", consumer_name(p));
        eventually(&format!("{name} to acknowledge every event on its subject"), WAIT, || async {
            let mut consumer: PullConsumer = stream.get_consumer(&name).await.ok()?;
            let info = consumer.info().await.ok()?;
            // A filtered consumer's floor moves past the other subjects' messages, so it ends at
            // or beyond the subject's last one.
            let floor = &info.ack_floor;
            let all_acked =
                floor.consumer_sequence == info.delivered.consumer_sequence && floor.stream_sequence >= last;
            (info.num_pending == 0 && info.num_ack_pending == 0 && all_acked).then_some(())
        })
        .await;
    }
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.outbox").fetch_one(&db.pool).await.unwrap();
    let info = stream.info().await.unwrap().clone();
    assert_eq!(info.state.messages, events as u64, "one stream message per outbox event");
}

/// Each of `ids` is decided exactly once (one row in the decision log, by R1, R2 or R4) and
/// is upheld or dismissed; returns how many are upheld and dismissed, and the priorities seen.
async fn decided_once(db: &TestDb, ids: &[Uuid]) -> (usize, usize, Vec<i16>) {
    let rows: Vec<(Uuid, String, i16, Vec<String>)> = sqlx::query_as(
        "SELECT d.id, d.status, d.priority,
                ARRAY(SELECT x.rule FROM security.dispute_decisions x WHERE x.dispute_id = d.id)
         FROM security.disputes d WHERE d.id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), ids.len(), "every filed dispute exists");
    let not_once: Vec<_> = rows.iter().filter(|(.., rules)| rules.len() != 1).collect();
    assert!(not_once.is_empty(), "decided other than once: {not_once:?}");
    let other: Vec<_> = rows
        .iter()
        .filter(|(_, status, _, rules)| {
            !matches!((status.as_str(), rules[0].as_str()), ("dismissed", "R1" | "R2") | ("upheld", "R4"))
        })
        .collect();
    assert!(other.is_empty(), "decided by another rule than the workload allows: {other:?}");
    let upheld = rows.iter().filter(|r| r.1 == "upheld").count();
    let mut priorities: Vec<i16> = rows.iter().map(|r| r.2).collect();
    priorities.sort_unstable();
    priorities.dedup();
    (upheld, rows.len() - upheld, priorities)
}

#[tokio::test(flavor = "multi_thread")]
async fn flipping_the_dispute_executor_under_filings_decides_every_dispute_exactly_once() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start_with(&db, &prefix, &["--flag-poll", "200ms"]).await;
    let worker = Replica::start(&db, &prefix, &["--flag-poll", "200ms"]).await;
    // The flag starts at `worker`: the worker decides the set-up's disputes.
    let cast = Cast::new(&api, &db).await;
    drained(&db, &prefix).await;
    let (worker_before, api_before) = (decisions(&worker.metrics().await), handled(&api.metrics().await));

    // Filings go on while the executor moves back and forth 20 times (ending on `worker`).
    let stop = AtomicBool::new(false);
    let flips = async {
        for i in 0..20 {
            flip(&db, if i % 2 == 0 { Executor::Monolith } else { Executor::Worker }).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        stop.store(true, Ordering::Release);
    };
    let (ids, ()) = tokio::join!(cast.file_until(&api, &stop), flips);
    all_decided(&db, &ids).await;
    drained(&db, &prefix).await;

    let (upheld, dismissed, priorities) = decided_once(&db, &ids).await;
    assert!(
        upheld > 0 && dismissed > 0,
        "the facts uphold some and dismiss some: {upheld} upheld, {dismissed} dismissed"
    );
    assert_eq!(priorities, [0, 1, 2, 3], "every priority was filed");
    // Each decision is made by one side: the worker counts its own, the API made the rest.
    let by_worker = decisions(&worker.metrics().await) - worker_before;
    let by_api = ids.len() as f64 - by_worker;
    let api_handled = handled(&api.metrics().await) - api_before;
    assert!(
        by_worker > 0.0 && by_api > 0.0 && api_handled > 0.0,
        "both sides decided: worker {by_worker}, api {by_api} (its consumers handled {api_handled} messages) of {}",
        ids.len()
    );
    let audited = flags::audit(&db.pool, Some(Flag::DisputeExecutor), 100).await.unwrap();
    assert_eq!(audited.len(), 20, "every flip is audited");
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_api_is_killed_mid_flip_the_worker_decides_what_it_held() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    flip(&db, Executor::Monolith).await;
    let mut api = Api::start_with(&db, &prefix, &["--flag-poll", "200ms"]).await;
    let worker = Replica::start(&db, &prefix, &["--flag-poll", "200ms"]).await;
    // The API decides the set-up's disputes; the worker stands by.
    let cast = Cast::new(&api, &db).await;

    // Hold the API in the middle of deciding: a SHARE lock on the decision log lets disputes
    // be filed and their events be published, and blocks the statement that records the
    // decisions, inside the deciding transaction. The API then holds delivered, unacknowledged
    // messages of its consumers and open, uncommitted decisions: exactly what a SIGKILL loses
    // if the take-over does not work.
    let (lock, ids, held) = hold_mid_decision(&db, &prefix, &api, &cast, 16).await;
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM security.disputes WHERE id = ANY($1) AND status = 'pending'")
            .bind(&ids)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(pending as usize, ids.len(), "nothing is decided while the API is held");

    flip(&db, Executor::Worker).await;
    api.kill().await;
    lock.rollback().await.unwrap();

    // The worker decides what was never delivered at once, and what the dead API held once
    // JetStream redelivers it (after the consumers' 30 s ack wait).
    all_decided(&db, &ids).await;
    // A new API relays the worker's decision events (the relay runs in the API); the flag says
    // `worker`, so it decides nothing.
    let relay = Api::start_with(&db, &prefix, &["--flag-poll", "200ms"]).await;
    drained(&db, &prefix).await;

    let (upheld, dismissed, priorities) = decided_once(&db, &ids).await;
    assert!(
        upheld > 0 && dismissed > 0,
        "the facts uphold some and dismiss some: {upheld} upheld, {dismissed} dismissed"
    );
    assert_eq!(priorities, [0, 1, 2, 3], "every priority was filed");
    assert_eq!(
        decisions(&worker.metrics().await),
        ids.len() as f64,
        "the worker decided every dispute, including the {held} messages the killed API held"
    );
    assert_eq!(handled(&relay.metrics().await), 0.0, "the new API decided nothing");
    let audited = flags::audit(&db.pool, Some(Flag::DisputeExecutor), 100).await.unwrap();
    assert_eq!(audited.len(), 2, "both changes are audited");
}

/// The API stops like a worker: on SIGTERM, what its in-process processor holds gets the grace
/// period and no more (a decision held up in the database is given up, and its messages are
/// redelivered to whoever executes next), and the process exits 0.
#[tokio::test(flavor = "multi_thread")]
async fn a_terminated_api_gives_its_processor_the_grace_period_and_no_more() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    flip(&db, Executor::Monolith).await;
    let grace = Duration::from_secs(2);
    let mut api = Api::start_with(&db, &prefix, &["--flag-poll", "200ms", "--shutdown-grace", "2s"]).await;
    let cast = Cast::new(&api, &db).await;

    // Hold the API in the middle of deciding (as above): its deciding statement waits on a lock
    // that the test keeps past the grace period, up to BATCH_TIMEOUT (30 s) unless the
    // shutdown gives up on it.
    let (lock, ids, _) = hold_mid_decision(&db, &prefix, &api, &cast, 4).await;

    let signalled = tokio::time::Instant::now();
    api.process.terminate().await;
    // Before BATCH_TIMEOUT (30 s), which would end the held statement anyway.
    let code = api.process.wait_exit(Duration::from_secs(25)).await;
    let took = signalled.elapsed();
    lock.rollback().await.unwrap();
    assert_eq!(code, Some(0), "a shutdown past its grace period is still an orderly exit");
    assert!(took < grace + Duration::from_secs(6), "exited {took:?} after SIGTERM, with a {grace:?} grace period");
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM security.disputes WHERE id = ANY($1) AND status = 'pending'")
            .bind(&ids)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(pending as usize, ids.len(), "the held batch was given up, not decided");
}

/// The API stops like a worker (the same host): a batch its in-process processor holds when
/// SIGTERM arrives is finished within the grace period, and its acks (flushed before the
/// connection is drained) are on the server by the time the process has exited, not
/// redelivered after `ACK_WAIT` (30 s) to whoever executes next.
#[tokio::test(flavor = "multi_thread")]
async fn a_terminated_api_acknowledges_what_its_processor_finishes_during_the_shutdown() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    flip(&db, Executor::Monolith).await;
    let mut api = Api::start_with(&db, &prefix, &["--flag-poll", "200ms", "--shutdown-grace", "20s"]).await;
    let cast = Cast::new(&api, &db).await;

    // The processor holds its batches mid-decision until the shutdown has started.
    let (lock, ids, _) = hold_mid_decision(&db, &prefix, &api, &cast, 4).await;
    api.process.terminate().await;
    eventually("the API to start its shutdown", WAIT, || async {
        api.process.log_text().contains("stopping: no new work").then_some(())
    })
    .await;
    lock.rollback().await.unwrap();

    let code = api.process.wait_exit(Duration::from_secs(25)).await;
    assert_eq!(code, Some(0), "a graceful exit; log:\n{}", api.process.log_text());
    let decided: i64 =
        sqlx::query_scalar("SELECT count(*) FROM security.disputes WHERE id = ANY($1) AND status <> 'pending'")
            .bind(&ids)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(decided > 0, "the held batches were decided within the grace period");
    // Well inside ACK_WAIT: only acks that reached the server before the exit can empty it.
    eventually("every dispute message acknowledged", Duration::from_secs(3), || async {
        (unacknowledged(&prefix).await? == 0).then_some(())
    })
    .await;
}

/// Files `filings` disputes (every priority in turn) through the API while the test holds a
/// SHARE lock on the decision log, which the deciding statement waits on; returns once the API's
/// processor waits on it holding unacknowledged messages: the lock (roll it back to let the
/// decisions go on), the disputes, and how many messages it holds.
async fn hold_mid_decision(
    db: &TestDb,
    prefix: &str,
    api: &Api,
    cast: &Cast,
    filings: usize,
) -> (sqlx::Transaction<'static, sqlx::Postgres>, Vec<Uuid>, usize) {
    let mut lock = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE security.dispute_decisions IN SHARE MODE").execute(&mut *lock).await.unwrap();
    let ids = cast.file_each(api, filings).await;
    all_published(db).await;
    let held = eventually("the API to hold messages mid-decision", WAIT, || async {
        let blocked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
             AND application_name = 'trellis-api-processors' AND wait_event_type = 'Lock'",
        )
        .fetch_one(&db.pool)
        .await
        .ok()?;
        let unacked = unacknowledged(prefix).await?;
        (blocked > 0 && unacked > 0).then_some(unacked)
    })
    .await;
    (lock, ids, held)
}
