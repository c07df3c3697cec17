//! Cutover: `score.executor` moves the orchestrator between `trellis-api`
//! (in-process) and the `score-orchestrator` worker, both pulling run requests from the same
//! consumer, while contacts are written and runs are requested through the API.
//!
//! What "every requested score run completed once" means, given how the orchestrator coalesces.
//! A request (`POST /v1/admin/score-runs`: an `events.scores.run_requested` event made at `t`) is
//! served by a run that starts after `t` and succeeds: that run's snapshot holds everything
//! committed before the request. Its handler finds such a run already succeeded (nothing to do),
//! or sets `score.scheduler.run_pending` and tries the lease; whoever holds the lease takes the
//! pending request after its current run. Requests that arrive during a run are so coalesced
//! into one follow-up run, which records the first of them (`requested_by`). With one admin per
//! request, "once" is:
//! - every request's event is delivered once and acknowledged: the consumer delivered exactly as
//!   many messages as there were requests, each handled by one side;
//! - every request is served: a run that started after it succeeded;
//! - no request makes two runs: every run but the start-up one names a requester, and no
//!   requester twice;
//! - one run at a time (the lease): no two runs' `[started_at, finished_at]` overlap;
//! - nothing is left over: no run running or failed, no request pending.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use time::OffsetDateTime;
use trellis_domain::flags::{Executor, Flag};
use trellis_store::cutover::flags::{self, Change};
use trellis_testkit::{TestDb, nats_prefix};
use uuid::Uuid;

use crate::harness::*;

/// Run requests made during the flips, each by an admin of its own, in bursts of `BURST` made
/// together: the first of a burst makes a run, which serves the others.
const REQUESTS: usize = 30;
const BURST: usize = 5;

async fn flip(db: &TestDb, value: Executor) {
    let change = Change { flag: Flag::ScoreExecutor, value, actor: "test", reason: "flip under load", forced: false };
    flags::set(&db.pool, &change).await.expect("setting the flag");
}

#[tokio::test(flavor = "multi_thread")]
async fn flipping_the_score_executor_under_writes_serves_every_run_request_once() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = nats_prefix();
    // A lease holder that stops being the executor leaves the pending request to the new one,
    // which serves it on its next message or schedule check.
    let fast = ["--flag-poll", "200ms", "--score-schedule-check", "500ms"];
    let api = Api::start(&db, &prefix, &fast).await;
    let worker = Replica::start(&db, &prefix, "replica-a", &fast).await;
    // The flag starts at `worker`: the worker makes the start-up run.
    wait_succeeded(&db, 1, Duration::from_secs(30)).await;
    // A small graph keeps every run short: many runs fit between the flips.
    let mut users = Vec::new();
    for i in 0..24 {
        users.push(api.register(&format!("user{i}")).await);
    }
    let mut admins = Vec::new();
    for i in 0..=REQUESTS {
        let admin = api.register(&format!("admin{i}")).await;
        make_admin(&db, admin.id).await;
        admins.push(admin);
    }

    // Contacts are written (one every 20 ms) and runs requested (five at once every second)
    // while the executor moves back and forth 20 times, ending on `worker`.
    let stop = AtomicBool::new(false);
    let writes = async {
        let mut pace = tokio::time::interval(Duration::from_millis(20));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut written = 0;
        'writing: for step in 1..users.len() {
            for (i, owner) in users.iter().enumerate() {
                if stop.load(Ordering::Acquire) {
                    break 'writing;
                }
                pace.tick().await;
                api.add_contact(owner, &users[(i + step) % users.len()]).await;
                written += 1;
            }
        }
        written
    };
    let requests = async {
        let mut pace = tokio::time::interval(Duration::from_secs(1));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut asked = Vec::new();
        for burst in admins[..REQUESTS].chunks(BURST) {
            pace.tick().await;
            let made = burst.iter().map(|admin| async { (admin.id, api.request_run(admin).await) });
            asked.extend(futures::future::join_all(made).await);
        }
        asked
    };
    let flips = async {
        for i in 0..20 {
            flip(&db, if i % 2 == 0 { Executor::Monolith } else { Executor::Worker }).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        stop.store(true, Ordering::Release);
    };
    let (written, mut asked, ()) = tokio::join!(writes, requests, flips);
    assert!(written > 0, "contacts were written during the flips");
    // One more request after the last write: the run that serves it sees every contact.
    let last = &admins[REQUESTS];
    asked.push((last.id, api.request_run(last).await));

    // Every request's event is delivered once and acknowledged, and nothing is left to run.
    eventually("every outbox event to be published", Duration::from_secs(60), || async {
        (count(&db, "SELECT count(*) FROM ops.outbox WHERE published_at IS NULL").await == 0).then_some(())
    })
    .await;
    let js = async_nats::jetstream::new(async_nats::connect(trellis_testkit::nats_url()).await.unwrap());
    let stream = js.get_stream(format!("{prefix}_EVENTS")).await.unwrap();
    let name = format!("{prefix}_{}", score_orchestrator::CONSUMER);
    let consumer = eventually("every run request to be acknowledged", Duration::from_secs(60), || async {
        let mut consumer: PullConsumer = stream.get_consumer(&name).await.ok()?;
        let info = consumer.info().await.ok()?.clone();
        let acked = info.ack_floor.consumer_sequence == info.delivered.consumer_sequence;
        (info.num_pending == 0 && info.num_ack_pending == 0 && acked).then_some(info)
    })
    .await;
    assert_eq!(consumer.delivered.consumer_sequence, asked.len() as u64, "each request delivered once");
    // A run still finishing writes its completion event meanwhile: compare once the outbox is
    // published again, with the stream read after the outbox.
    eventually("one stream message per outbox event", Duration::from_secs(60), || async {
        let unpublished = count(&db, "SELECT count(*) FROM ops.outbox WHERE published_at IS NULL").await;
        let events = count(&db, "SELECT count(*) FROM ops.outbox").await;
        let mut events_stream = js.get_stream(format!("{prefix}_EVENTS")).await.ok()?;
        let messages = events_stream.info().await.ok()?.state.messages;
        (unpublished == 0 && messages == events as u64).then_some(())
    })
    .await;
    eventually("no request to be left pending", Duration::from_secs(30), || async {
        (count(&db, "SELECT count(*) FROM score.scheduler WHERE run_pending").await == 0).then_some(())
    })
    .await;
    eventually("no run to be in progress", Duration::from_secs(30), || async {
        runs(&db).await.iter().all(|r| r.status != RunStatus::Running).then_some(())
    })
    .await;

    let all = runs(&db).await;
    let unfinished: Vec<&Run> = all.iter().filter(|r| r.status != RunStatus::Succeeded).collect();
    assert!(unfinished.is_empty(), "every run succeeded: {unfinished:#?}");
    assert_eq!(all[0].trigger, "startup", "{all:#?}");
    // One at a time: sorted by start, each run finished before the next started.
    for pair in all.windows(2) {
        assert!(pair[0].finished_at.unwrap() <= pair[1].started_at.unwrap(), "runs overlap:\n{pair:#?}");
    }
    // Every request is served by a run that started after it was made.
    let made: HashMap<Uuid, OffsetDateTime> = sqlx::query_as(
        "SELECT id, (payload->>'occurred_at')::timestamptz FROM ops.outbox WHERE payload->>'type' = 'scores.run_requested'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(made.len(), asked.len(), "every request is in the outbox");
    let serving = |event: &Uuid| all.iter().find(|r| r.started_at.unwrap() > made[event]);
    for (admin, event) in &asked {
        assert!(serving(event).is_some(), "the request of {admin} (event {event}) was served: {all:#?}");
    }
    // No request made two runs: each run after the start-up one names a distinct requester.
    let requesters: HashSet<Uuid> = asked.iter().map(|(admin, _)| *admin).collect();
    let named: Vec<Option<Uuid>> = all[1..].iter().map(|r| r.requested_by).collect();
    let distinct: HashSet<Uuid> = named.iter().flatten().copied().collect();
    assert!(
        named.iter().all(|n| n.is_some_and(|n| requesters.contains(&n))) && distinct.len() == named.len(),
        "one run per coalesced group of requests, each naming its first requester once: {all:#?}"
    );
    assert!(named.len() < asked.len(), "requests made together are served by one run: {all:#?}");
    // The last request's run saw every contact and every user.
    let final_run = serving(&asked[REQUESTS].1).unwrap();
    let contacts = count(&db, "SELECT count(*) FROM contacts.contacts").await;
    let active = count(&db, "SELECT count(*) FROM identity.users WHERE status = 'active'").await;
    assert_eq!((final_run.users, final_run.edges), (Some(active), Some(contacts)), "{final_run:#?}");
    // The flag ended on `worker`: the last request, made after that, is the worker's to run —
    // a lease holder that is no longer the executor makes no follow-up runs.
    assert_eq!(final_run.host.as_deref(), Some(worker.host.as_str()), "{final_run:#?}");

    // Both sides handled requests, and each delivery was handled once, by one side.
    let (in_api, in_worker) =
        eventually("both sides' counts to cover every request", Duration::from_secs(10), || async {
            let (in_api, in_worker) = (handled(&api.metrics().await), handled(&worker.metrics().await));
            (in_api + in_worker == asked.len() as f64).then_some((in_api, in_worker))
        })
        .await;
    assert!(in_api > 0.0 && in_worker > 0.0, "both sides executed: api {in_api}, worker {in_worker}");
    let audited = flags::audit(&db.pool, Some(Flag::ScoreExecutor), 100).await.unwrap();
    assert_eq!(audited.len(), 20, "every flip is audited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_the_schedule_check_serves_finishes_when_the_flag_moves_away_during_it() {
    let db = TestDb::migrated().await.unwrap();
    seed_users(&db, 30, 3).await;
    seed_contacts(&db, 30).await;
    // A request the previous executor left pending, which this side's schedule check serves.
    trellis_store::scores::request_run(&db.pool, "manual", None).await.unwrap();
    let config = score_orchestrator::Config {
        database_url: trellis_runtime::config::SecretUrl::new(db.url.clone()),
        schedule: Duration::from_secs(86_400),
        schedule_check: Duration::from_secs(3600),
        run_timeout: Duration::from_secs(60),
        threads: 2,
        host: "this-side".into(),
        shadow_wait: Duration::from_secs(30),
    };
    let (flag, gate) = tokio::sync::watch::channel(true);
    let orchestrator =
        score_orchestrator::Orchestrator::new(db.pool.clone(), config).unwrap().executing_while(gate.clone());
    // The run's load waits behind a lock the test holds, so that the flag moves during the run.
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE contacts.contacts IN ACCESS EXCLUSIVE MODE").execute(&mut *blocker).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let schedule = tokio::spawn(trellis_runtime::cutover::flags::while_open(gate, stop.clone(), move |stop| {
        orchestrator.clone().schedule(stop)
    }));
    eventually("the schedule check's run to start", Duration::from_secs(30), || async {
        runs(&db).await.iter().any(|r| r.status == RunStatus::Running).then_some(())
    })
    .await;

    flag.send_replace(false);
    blocker.rollback().await.unwrap();
    // Dropped half-way, the run would stay `running` until the next lease holder failed it as
    // abandoned, and the request it took would wait for the next request's run.
    let all = wait_succeeded(&db, 1, Duration::from_secs(30)).await;
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!((all[0].trigger.as_str(), all[0].host.as_deref()), ("manual", Some("this-side")));
    assert_eq!(count(&db, "SELECT count(*) FROM score.scheduler WHERE run_pending").await, 0, "the request was served");
    stop.cancel();
    schedule.await.unwrap();
}
