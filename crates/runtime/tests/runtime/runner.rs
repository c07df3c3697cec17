//! The consumer-group runner, driven through real `trellis-probe-worker` processes.

use std::collections::HashSet;
use std::time::Duration;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use trellis_runtime::dlq;
use trellis_testkit::PrivateNats;

use trellis_runtime::dlq::Entry;

use trellis_testkit::probe::PROBE;

use crate::harness::{Env, Worker, eventually, trellisctl};

const WAIT: Duration = Duration::from_secs(30);

fn rfc3339(text: Option<&str>) -> OffsetDateTime {
    OffsetDateTime::parse(text.expect("a time header"), &Rfc3339).expect("an RFC 3339 time")
}

#[tokio::test]
async fn an_undecodable_message_is_dead_lettered_at_once_with_every_header_and_its_payload() {
    let env = Env::new().await;
    let _worker = env.worker(&[]).await;
    let before = OffsetDateTime::now_utc();
    let (msg_id, seq) = env.publish_raw("garbage", b"this is not json {").await;

    let dead = env.wait_for_dead_letters(Some(PROBE), 1, WAIT).await;
    let info = env.wait_until_settled(&env.topology.events_stream(), PROBE, WAIT).await;
    assert_eq!(info.num_redelivered, 0, "an undecodable message is never retried");
    assert_eq!(dead.len(), 1, "dead-lettered exactly once");
    let d = &dead[0];
    assert_eq!(d.subject, format!("{}.dlq.{PROBE}", env.prefix));
    assert_eq!(&d.payload[..], b"this is not json {", "the original payload is kept byte for byte");
    assert_eq!(d.header(dlq::CONSUMER), Some(PROBE));
    assert_eq!(d.header(dlq::ORIGINAL_SUBJECT), Some("events.probe.garbage"));
    assert_eq!(d.header(dlq::ORIGINAL_STREAM), Some(env.topology.events_stream().as_str()));
    assert_eq!(d.header(dlq::STREAM_SEQUENCE), Some(seq.to_string().as_str()));
    assert_eq!(d.header(dlq::ORIGINAL_MSG_ID), Some(msg_id.as_str()));
    assert_eq!(d.header(dlq::DELIVERIES), Some("1"));
    assert_eq!(d.header(dlq::ERROR_KIND), Some("decode"));
    assert!(d.error().contains("not an event envelope"), "error text: {:?}", d.error());
    let first = rfc3339(d.header(dlq::FIRST_FAILURE));
    let last = rfc3339(d.header(dlq::LAST_FAILURE));
    assert!(before - Duration::from_secs(1) <= first && first <= last, "first {first}, last {last}");
    assert!(last <= OffsetDateTime::now_utc());
    assert!(!d.header(dlq::WORKER_HOST).unwrap_or("").is_empty(), "the worker host is named");
    assert_eq!(d.header(dlq::WORKER_VERSION), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(d.header(dlq::REPLAY_COUNT), Some("0"));
    let dlq_id = format!("dlq-{}-{seq}", env.topology.events_stream());
    assert_eq!(d.header("Nats-Msg-Id"), Some(dlq_id.as_str()), "the dead letter's id is deterministic");
    let history = dlq::history(Some(&d.headers));
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].kind, dlq::ErrorKind::Decode);
}

#[tokio::test]
async fn a_handler_that_fails_twice_then_succeeds_processes_the_message_once_without_a_dead_letter() {
    let env = Env::new().await;
    let _worker = env.worker(&["--max-deliver", "3"]).await;
    let (id, seq) = env.publish("fail_until:3").await;

    let rows = env.wait_for_record(id, WAIT).await;
    let info = env.wait_until_settled(&env.topology.events_stream(), PROBE, WAIT).await;
    assert_eq!(info.ack_floor.stream_sequence, seq, "the message was acked");
    assert_eq!(rows.len(), 1, "processed exactly once: {rows:?}");
    assert_eq!(rows[0].deliveries, 3, "it succeeded on the third delivery");
    assert_eq!(rows[0].stream_sequence, seq as i64);
    assert_eq!(env.records().await.len(), 1, "nothing else was recorded");
    assert!(env.dead_letters(None).await.is_empty(), "no dead letter");
}

#[tokio::test]
async fn a_handler_that_always_fails_dead_letters_the_message_once_after_max_deliver() {
    let env = Env::new().await;
    let _worker = env.worker(&["--max-deliver", "4"]).await;
    let (id, seq) = env.publish("fail").await;

    env.wait_for_dead_letters(Some(PROBE), 1, WAIT).await;
    let info = env.wait_until_settled(&env.topology.events_stream(), PROBE, WAIT).await;
    assert_eq!(info.ack_floor.stream_sequence, seq, "the original was terminated");
    let dead = env.dead_letters(None).await;
    assert_eq!(dead.len(), 1, "dead-lettered exactly once: {dead:?}");
    let d = &dead[0];
    assert_eq!(d.kind(), "transient");
    assert_eq!(d.header(dlq::DELIVERIES), Some("4"), "after max_deliver deliveries");
    assert_eq!(d.header(dlq::STREAM_SEQUENCE), Some(seq.to_string().as_str()));
    assert_eq!(d.error(), "probe: always failing");
    let first = rfc3339(d.header(dlq::FIRST_FAILURE));
    let last = rfc3339(d.header(dlq::LAST_FAILURE));
    assert!(first < last, "the first failure ({first}) predates the last ({last})");
    let envelope: serde_json::Value = serde_json::from_slice(&d.payload).unwrap();
    assert_eq!(envelope["id"], id.to_string(), "the dead letter carries the original envelope");
    assert!(env.records().await.is_empty(), "never handled");
}

#[tokio::test]
async fn a_rejected_message_is_dead_lettered_at_once_as_permanent() {
    let env = Env::new().await;
    let _worker = env.worker(&["--max-deliver", "5"]).await;
    let (_, seq) = env.publish("reject").await;

    let dead = env.wait_for_dead_letters(Some(PROBE), 1, WAIT).await;
    let info = env.wait_until_settled(&env.topology.events_stream(), PROBE, WAIT).await;
    assert_eq!(info.num_redelivered, 0, "a rejected message is not retried");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].kind(), "permanent");
    assert_eq!(dead[0].error(), "probe: rejected");
    assert_eq!(dead[0].header(dlq::DELIVERIES), Some("1"));
    assert_eq!(dead[0].header(dlq::STREAM_SEQUENCE), Some(seq.to_string().as_str()));
}

#[tokio::test]
async fn a_panicking_handler_leads_to_the_dlq_and_the_worker_stays_up() {
    let env = Env::new().await;
    let mut worker = env.worker(&["--max-deliver", "3"]).await;
    env.publish("panic").await;

    let dead = env.wait_for_dead_letters(Some(PROBE), 1, WAIT).await;
    assert_eq!(dead[0].kind(), "transient", "a panic counts as a transient failure");
    assert_eq!(dead[0].header(dlq::DELIVERIES), Some("3"));
    assert!(dead[0].error().contains("panicked") && dead[0].error().contains("probe: panicking as asked"));
    assert!(worker.alive(), "the worker survived the panics");

    let (after, _) = env.publish("ok").await;
    let rows = env.wait_for_record(after, WAIT).await;
    assert_eq!(rows[0].pid, worker.pid, "the same process handled the next message");
    assert_eq!(rows[0].deliveries, 1);
    assert!(worker.alive());
    assert_eq!(worker.readyz().await, Some(200));
}

/// Respawns the worker after each abort until the DLQ holds `count` dead letters of the probe
/// group; returns the last worker, how many restarts it took, and the dead letters.
async fn restart_until_dead_lettered(
    env: &Env,
    mut worker: Worker,
    args: &[&str],
    count: usize,
) -> (Worker, u32, Vec<Entry>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
    let mut restarts = 0;
    loop {
        let entries = env.dead_letters(Some(PROBE)).await;
        if entries.len() >= count {
            return (worker, restarts, entries);
        }
        if !worker.alive() {
            assert_eq!(worker.wait_exit(Duration::from_secs(5)).await, None, "the probe aborts the process");
            restarts += 1;
            assert!(restarts <= 6, "still not dead-lettered after {restarts} restarts");
            // Not waiting for readiness: a fast redelivery may crash it before /readyz is polled.
            worker = env.worker_unready(args);
        }
        assert!(tokio::time::Instant::now() < deadline, "not dead-lettered after {restarts} restarts");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_message_that_crashes_the_process_on_every_delivery_reaches_the_dlq_through_the_safety_net() {
    let env = Env::new().await;
    let args = ["--max-deliver", "3", "--ack-wait", "1s"];
    let worker = env.worker(&args).await;
    let (_, seq) = env.publish("crash").await;

    let (worker, restarts, dead) = restart_until_dead_lettered(&env, worker, &args, 1).await;
    assert!(restarts >= 2, "the process was restarted after each crash ({restarts} restarts)");
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.kind(), "max_deliveries");
    assert_eq!(d.header(dlq::DELIVERIES), Some("3"));
    assert_eq!(d.header(dlq::ORIGINAL_STREAM), Some(env.topology.events_stream().as_str()));
    assert_eq!(d.header(dlq::STREAM_SEQUENCE), Some(seq.to_string().as_str()));
    assert_eq!(d.header(dlq::ORIGINAL_SUBJECT), Some("events.probe.crash"));
    assert!(d.error().contains("delivered 3 times without an outcome"), "{:?}", d.error());

    // Replayed, it crashes the replay consumer's workers too: the safety net covers replays.
    trellisctl(&env, &["dlq", "replay", &d.sequence.to_string(), "--reason", "crash again"]).await;
    let (mut worker, restarts, again) = restart_until_dead_lettered(&env, worker, &args, 1).await;
    assert!(restarts >= 2, "{restarts} restarts");
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].kind(), "max_deliveries");
    assert_eq!(again[0].replays(), 1);
    assert_eq!(again[0].header(dlq::ORIGINAL_STREAM), Some(env.topology.replay_stream().as_str()));
    assert_eq!(again[0].original_subject(), "events.probe.crash");
    assert_eq!(dlq::history(Some(&again[0].headers)).len(), 2);
    assert!(worker.alive(), "the last worker is still up");
    worker.wait_ready(WAIT).await;
}

#[tokio::test]
async fn killing_a_worker_mid_batch_loses_nothing_because_the_other_replica_takes_over() {
    let env = Env::new().await;
    let args = ["--batch-size", "4", "--ack-wait", "2s"];
    let mut victim = env.worker(&args).await;
    let survivor = env.worker(&args).await;
    let ids = env.publish_many("sleep:300", 32).await;

    // Once the victim has finished one batch it is working on the next one.
    eventually("the victim finishing a batch", WAIT, || async {
        env.records().await.iter().any(|r| r.pid == victim.pid).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    victim.kill().await;
    assert!(!victim.alive());

    let rows = eventually("every message recorded", Duration::from_secs(45), || async {
        let rows = env.records().await;
        let seen: HashSet<_> = rows.iter().map(|r| r.event_id).collect();
        ids.iter().all(|id| seen.contains(id)).then_some(rows)
    })
    .await;
    assert!(
        rows.iter().any(|r| r.pid == survivor.pid && r.deliveries > 1),
        "the survivor took over messages the victim held unacked: {rows:?}"
    );
    env.wait_until_settled(&env.topology.events_stream(), PROBE, WAIT).await;
    assert!(env.dead_letters(None).await.is_empty(), "nothing was dead-lettered");
}

#[tokio::test]
async fn two_replicas_handle_every_message_exactly_once_in_total() {
    let env = Env::new().await;
    let args = ["--batch-size", "64", "--ack-wait", "10s"];
    let a = env.worker(&args).await;
    let b = env.worker(&args).await;
    const TOTAL: i64 = 2_000;
    env.publish_many("ok", TOTAL as usize).await;

    eventually("2,000 messages recorded", Duration::from_secs(45), || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM ops_probe_handled").fetch_one(&env.db.pool).await.ok()?;
        (n >= TOTAL).then_some(())
    })
    .await;
    let info = env.wait_until_settled(&env.topology.events_stream(), PROBE, WAIT).await;
    assert_eq!(info.num_redelivered, 0, "no message was delivered twice");
    let (total, distinct, by_a, by_b): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT event_id), count(*) FILTER (WHERE pid = $1), count(*) FILTER (WHERE pid = $2)
         FROM ops_probe_handled",
    )
    .bind(a.pid)
    .bind(b.pid)
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    assert_eq!((total, distinct), (TOTAL, TOTAL), "each message handled exactly once");
    assert_eq!(by_a + by_b, TOTAL);
    assert!(by_a > 0 && by_b > 0, "both replicas did some: {by_a} and {by_b}");
}

#[tokio::test]
async fn sigterm_lets_in_flight_messages_finish_and_none_is_delivered_twice() {
    let env = Env::new().await;
    let args = ["--batch-size", "4", "--ack-wait", "2s"];
    let mut first = env.worker(&args).await;
    let ids = env.publish_many("sleep:1000", 4).await;
    // The first replica holds all four before the second one starts.
    eventually("the first replica holding the batch", WAIT, || async {
        let info = env.consumer_info(&env.topology.events_stream(), PROBE).await;
        (info.num_ack_pending == 4 && info.num_pending == 0).then_some(())
    })
    .await;
    let second = env.worker(&args).await;
    first.terminate().await;

    let code = first.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "a graceful exit; log:\n{}", first.log_text());
    let rows = env.records().await;
    let recorded: HashSet<_> = rows.iter().map(|r| r.event_id).collect();
    assert_eq!(recorded, ids.iter().copied().collect(), "the in-flight messages completed");
    assert!(rows.iter().all(|r| r.pid == first.pid && r.deliveries == 1), "{rows:?}");

    let info = env.wait_until_settled(&env.topology.events_stream(), PROBE, WAIT).await;
    assert_eq!(info.num_redelivered, 0);
    // Past ack_wait, with another replica pulling: still no redelivery.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rows = env.records().await;
    assert_eq!(rows.len(), 4, "no duplicates: {rows:?}");
    assert!(rows.iter().all(|r| r.pid != second.pid));
    assert!(env.dead_letters(None).await.is_empty());
}

#[tokio::test]
async fn a_worker_survives_a_nats_restart_and_readyz_tells_the_truth_meanwhile() {
    let mut nats = PrivateNats::start().expect("a private nats-server");
    let env = Env::on(&nats.url()).await;
    let worker = env.worker(&[]).await;
    let (before, _) = env.publish("ok").await;
    env.wait_for_record(before, WAIT).await;

    nats.stop();
    eventually("/readyz reporting not ready", WAIT, || async { (worker.readyz().await == Some(503)).then_some(()) })
        .await;
    nats.restart().expect("restarting nats-server");
    eventually("/readyz ready again", WAIT, || async { (worker.readyz().await == Some(200)).then_some(()) }).await;

    let js = trellis_testkit::probe::connect(&nats.url()).await;
    let mut after = Vec::new();
    for _ in 0..5 {
        after.push(trellis_testkit::probe::publish(&js, &env.prefix, "ok").await.0);
    }
    for id in after {
        let rows = env.wait_for_record(id, Duration::from_secs(40)).await;
        assert_eq!(rows[0].pid, worker.pid, "the same process handled it after the restart");
    }
}

/// `/readyz` says not ready until the processors are installed: before, the consumer groups'
/// checks do not exist yet, and the database and NATS checks alone would say ready while
/// nothing is bound. (The probe's installation waits on an advisory lock the test holds.)
#[tokio::test]
async fn readyz_is_not_ready_until_the_processors_are_installed() {
    const INSTALL_LOCK: i64 = 7_271;
    let env = Env::new().await;
    let mut holder = env.db.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)").bind(INSTALL_LOCK).execute(&mut *holder).await.unwrap();
    let mut worker = env.worker_unready(&["--install-lock", &INSTALL_LOCK.to_string()]);
    worker.wait_listening(WAIT).await;

    let check = |body: &serde_json::Value, name: &str| {
        body["checks"].as_array().and_then(|c| c.iter().find(|c| c["name"] == name).cloned())
    };
    let (status, body) = eventually("the database and NATS checks to pass", WAIT, || async {
        let (status, body) = worker.readyz_checks().await?;
        let up = |name| check(&body, name).is_some_and(|c| c["ok"] == true);
        (up("database") && up("nats")).then_some((status, body))
    })
    .await;
    assert_eq!(status, 503, "not ready while installing: {body}");
    let processors = check(&body, "processors").expect("a processors check");
    assert_eq!((&processors["ok"], &processors["error"]), (&false.into(), &"installing the processors".into()));
    assert!(check(&body, &format!("consumer {PROBE}")).is_none(), "no group yet: {body}");

    sqlx::query("SELECT pg_advisory_unlock($1)").bind(INSTALL_LOCK).execute(&mut *holder).await.unwrap();
    worker.wait_ready(WAIT).await;
    let (_, body) = worker.readyz_checks().await.expect("/readyz answers");
    assert_eq!(check(&body, &format!("consumer {PROBE}")).map(|c| c["ok"].clone()), Some(true.into()), "{body}");
    assert_eq!(check(&body, "processors").map(|c| c["ok"].clone()), Some(true.into()));
}
