//! `trellisctl dlq`: list, show, stats, replay (routing, canary, dry run), park, unpark and purge.

use std::time::Duration;

use time::OffsetDateTime;
use trellis_domain::events::{Event, EventPayload, EventType};
use trellis_runtime::dlq::{self, DeadLetter, ErrorKind};

use crate::helpers::{Env, PROBE, RECORDS, Worker, audit_rows, create_record_table, ctl, eventually};

const WAIT: Duration = Duration::from_secs(30);

/// Writes a dead letter directly, as a worker would.
async fn dead_letter(env: &Env, consumer: &str, seq: u64, kind: ErrorKind, error: &str) -> u64 {
    let payload = serde_json::to_vec(&serde_json::json!({"id": uuid::Uuid::now_v7(), "data": {"n": seq}})).unwrap();
    dead_letter_of(env, consumer, seq, kind, error, payload).await
}

/// Writes a dead letter of `payload` directly, as a worker would.
async fn dead_letter_of(env: &Env, consumer: &str, seq: u64, kind: ErrorKind, error: &str, payload: Vec<u8>) -> u64 {
    let now = OffsetDateTime::now_utc();
    let stream = env.topology.events_stream();
    let letter = DeadLetter {
        consumer,
        original_subject: "events.probe.synthetic",
        stream: &stream,
        stream_sequence: seq,
        deliveries: 1,
        kind,
        error,
        first_failure: now,
        host: "test-host",
        version: "test",
        now,
        trace: None,
    };
    dlq::publish(&env.js, &env.topology, &letter, None, payload.into()).await.expect("publishing a dead letter");
    let entries = env.dead_letters(None).await;
    entries.iter().find(|e| e.header(dlq::STREAM_SEQUENCE) == Some(&seq.to_string())).unwrap().sequence
}

fn sequences(json: &serde_json::Value) -> Vec<u64> {
    json.as_array().expect("a JSON array").iter().map(|e| e["sequence"].as_u64().unwrap()).collect()
}

#[tokio::test]
async fn list_filters_by_consumer_and_kind_stats_groups_by_fingerprint_and_show_prints_everything() {
    let env = Env::new().await;
    let a1 = dead_letter(&env, "alpha", 1, ErrorKind::Transient, "db timeout after 30 ms on row 12").await;
    let a2 = dead_letter(&env, "alpha", 2, ErrorKind::Transient, "db timeout after 45 ms on row 99").await;
    let a3 = dead_letter(&env, "alpha", 3, ErrorKind::Permanent, "unknown event version 7").await;
    let b1 = dead_letter(&env, "beta", 4, ErrorKind::Decode, "payload is not an event envelope").await;

    let all = ctl(&env, &["--output", "json", "dlq", "list"]).await.json();
    assert_eq!(sequences(&all), vec![a1, a2, a3, b1]);
    let alpha = ctl(&env, &["--output", "json", "dlq", "list", "--consumer", "alpha"]).await.json();
    assert_eq!(sequences(&alpha), vec![a1, a2, a3]);
    let transient = ctl(&env, &["--output", "json", "dlq", "list", "--consumer", "alpha", "--kind", "transient"]).await;
    let transient = transient.json();
    assert_eq!(sequences(&transient), vec![a1, a2]);
    assert_eq!(transient[0]["consumer"], "alpha");
    assert_eq!(transient[0]["kind"], "transient");
    assert_eq!(transient[0]["original_subject"], "events.probe.synthetic");
    let decode = ctl(&env, &["--output", "json", "dlq", "list", "--kind", "decode"]).await.json();
    assert_eq!(sequences(&decode), vec![b1]);
    let grep = ctl(&env, &["--output", "json", "dlq", "list", "--grep", "version"]).await.json();
    assert_eq!(sequences(&grep), vec![a3]);
    let table = ctl(&env, &["dlq", "list", "--consumer", "beta"]).await;
    assert!(table.success() && table.stdout.contains("1 of 1 dead letters"), "{table:?}");

    let stats = ctl(&env, &["--output", "json", "dlq", "stats"]).await.json();
    let groups = stats.as_array().unwrap();
    assert_eq!(groups.len(), 3, "two timeouts share one fingerprint: {stats:#}");
    assert_eq!(groups[0]["consumer"], "alpha");
    assert_eq!(groups[0]["fingerprint"], "transient: db timeout after N ms on row N");
    assert_eq!(groups[0]["count"], 2);
    let counts: Vec<u64> = groups.iter().map(|g| g["count"].as_u64().unwrap()).collect();
    assert_eq!(counts, vec![2, 1, 1]);
    let by_fingerprint =
        ctl(&env, &["--output", "json", "dlq", "list", "--fingerprint", "transient: db timeout after N ms on row N"])
            .await
            .json();
    assert_eq!(sequences(&by_fingerprint), vec![a1, a2]);

    let show = ctl(&env, &["dlq", "show", &a3.to_string()]).await;
    assert!(show.success(), "{show:?}");
    for expected in [
        &format!("sequence: {a3}"),
        "Trellis-Consumer: alpha",
        "Trellis-Error-Kind: permanent",
        "Trellis-Error: unknown event version 7",
        "Trellis-Original-Subject: events.probe.synthetic",
        "Trellis-Worker-Host: test-host",
        "\"n\": 3",
    ] {
        assert!(show.stdout.contains(expected), "`dlq show` lacks {expected:?}:\n{}", show.stdout);
    }
    let missing = ctl(&env, &["dlq", "show", "9999"]).await;
    assert!(!missing.success() && missing.stderr.contains("no dead letter 9999"), "{missing:?}");
}

#[tokio::test]
async fn show_says_what_the_dead_letters_event_says_or_why_it_does_not_decode() {
    let env = Env::new().await;
    let event = Event::new(&EventType::UserReinstated.example(), None, OffsetDateTime::now_utc());
    let payload = serde_json::to_vec(&event.envelope).unwrap();
    let reinstated = dead_letter_of(&env, "alpha", 1, ErrorKind::Transient, "db down", payload).await;
    let mut newer = event.envelope.clone();
    newer.version = 2;
    let newer = dead_letter_of(&env, "alpha", 2, ErrorKind::Permanent, "v2", serde_json::to_vec(&newer).unwrap()).await;
    let probe = dead_letter(&env, "alpha", 3, ErrorKind::Decode, "not an envelope").await;

    let EventPayload::UserReinstated(user) = EventType::UserReinstated.example() else { unreachable!() };
    let show = ctl(&env, &["dlq", "show", &reinstated.to_string()]).await;
    let says = format!("event: identity.user_reinstated v1: user {} was reinstated", user.user_id);
    assert!(show.success() && show.stdout.contains(&says), "`dlq show` lacks {says:?}:\n{}", show.stdout);
    let show = ctl(&env, &["dlq", "show", &newer.to_string()]).await;
    let says = "event: does not decode: identity.user_reinstated version 2 is not the version this code reads (1)";
    assert!(show.stdout.contains(says), "`dlq show` lacks {says:?}:\n{}", show.stdout);
    let show = ctl(&env, &["dlq", "show", &probe.to_string()]).await;
    let says = "event: does not decode: payload is not an event envelope";
    assert!(show.stdout.contains(says), "`dlq show` lacks {says:?}:\n{}", show.stdout);

    let json = ctl(&env, &["--output", "json", "dlq", "show", &reinstated.to_string()]).await.json();
    assert_eq!(json["event"]["decodes"], true);
    assert_eq!(json["event"]["type"], "identity.user_reinstated v1");
    let json = ctl(&env, &["--output", "json", "dlq", "show", &probe.to_string()]).await.json();
    assert_eq!(json["event"]["decodes"], false);
}

#[tokio::test]
async fn purge_needs_yes_removes_the_dead_letter_and_writes_an_audit_row() {
    let env = Env::new().await;
    let keep = dead_letter(&env, "alpha", 1, ErrorKind::Permanent, "bad").await;
    let gone = dead_letter(&env, "alpha", 2, ErrorKind::Permanent, "bad").await;

    let refused = ctl(&env, &["dlq", "purge", "--reason", "x", &gone.to_string()]).await;
    assert!(!refused.success(), "{refused:?}");
    assert!(refused.stderr.contains("add --yes to confirm"), "a clear message: {refused:?}");
    assert_eq!(env.dead_letters(None).await.len(), 2, "nothing purged without --yes");
    assert!(audit_rows(&env).await.is_empty());

    let nothing = ctl(&env, &["dlq", "replay", "--reason", "x"]).await;
    assert!(!nothing.success() && nothing.stderr.contains("nothing selected"), "{nothing:?}");

    let purged = ctl(&env, &["dlq", "purge", "--yes", "--reason", "x", &gone.to_string()]).await;
    assert!(purged.success(), "{purged:?}");
    let left: Vec<u64> = env.dead_letters(None).await.iter().map(|e| e.sequence).collect();
    assert_eq!(left, vec![keep]);
    let audit = audit_rows(&env).await;
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (audit[0].action.as_str(), audit[0].status.as_str(), audit[0].reason.as_str()),
        ("purge", "completed", "x")
    );
    assert_eq!(audit[0].sequences, vec![gone as i64]);
    assert_eq!(audit[0].outcome.as_ref().unwrap()["purged"], 1);
    assert!(purged.stdout.contains(&audit[0].id.to_string()), "the audit id is printed: {purged:?}");
}

#[tokio::test]
async fn a_dry_run_replay_changes_nothing() {
    let env = Env::new().await;
    let a = dead_letter(&env, "alpha", 1, ErrorKind::Transient, "x").await;
    let b = dead_letter(&env, "beta", 2, ErrorKind::Transient, "y").await;

    let dry = ctl(&env, &["dlq", "replay", "--all", "--dry-run"]).await;
    assert!(dry.success(), "{dry:?}");
    assert!(dry.stdout.contains("2 dead letters would be replayed"), "{dry:?}");
    assert!(dry.stdout.contains(&format!("{a} → replay.alpha.events.probe.synthetic")), "{dry:?}");
    let after = env.dead_letters(None).await;
    assert_eq!(after.iter().map(|e| e.sequence).collect::<Vec<_>>(), vec![a, b], "the DLQ is unchanged");
    assert!(after.iter().all(|e| e.replays() == 0));
    assert!(audit_rows(&env).await.is_empty(), "a dry run writes no audit row");
    let mut replay = env.js.get_stream(env.topology.replay_stream()).await.unwrap();
    assert_eq!(replay.info().await.unwrap().state.messages, 0, "nothing was sent to the REPLAY stream");
}

#[tokio::test]
async fn a_replay_reaches_only_the_consumer_that_failed_and_is_processed() {
    let env = Env::new().await;
    create_record_table(&env.db, "probe_a").await;
    create_record_table(&env.db, "probe_b").await;
    let a_args = |max: &'static str| ["--consumer", "group-a", "--record-table", "probe_a", "--max-deliver", max];
    let mut a = env.worker(&a_args("2")).await;
    let _b = env.worker(&["--consumer", "group-b", "--record-table", "probe_b", "--max-deliver", "4"]).await;
    let (id, _) = env.publish("fail_until:3").await;

    // B succeeds on its third delivery; A gives up after two.
    let b_rows = env.wait_for_record_in("probe_b", id, WAIT).await;
    assert_eq!(b_rows.len(), 1);
    let dead = env.wait_for_dead_letters(Some("group-a"), 1, WAIT).await;
    assert_eq!(dead[0].kind(), "transient");
    assert!(env.dead_letters(Some("group-b")).await.is_empty());
    // The fix is deployed: A comes back allowing more deliveries, then on-call replays.
    a.terminate().await;
    assert_eq!(a.wait_exit(WAIT).await, Some(0));
    let a = env.worker(&a_args("4")).await;

    let seq = dead[0].sequence.to_string();
    let replayed = ctl(&env, &["dlq", "replay", &seq, "--reason", "test"]).await;
    assert!(replayed.success(), "{replayed:?}");

    let a_rows = env.wait_for_record_in("probe_a", id, WAIT).await;
    assert_eq!(a_rows.len(), 1);
    assert_eq!(a_rows[0].pid, a.pid);
    assert_eq!(a_rows[0].deliveries, 3, "deliveries count afresh on the replay consumer");
    env.wait_until_settled(&env.topology.replay_stream(), "group-a", WAIT).await;
    let b_replay = env.consumer_info(&env.topology.replay_stream(), "group-b").await;
    assert_eq!(
        (b_replay.delivered.stream_sequence, b_replay.num_pending),
        (0, 0),
        "B's replay consumer never saw the message"
    );
    assert_eq!(env.records_in("probe_b").await.len(), 1, "B handled it only once, originally");
    assert!(env.records_in(RECORDS).await.is_empty());
    assert!(env.dead_letters(None).await.is_empty(), "the replayed message left the DLQ");

    let audit = audit_rows(&env).await;
    assert_eq!(audit.len(), 1);
    let row = &audit[0];
    assert_eq!((row.action.as_str(), row.status.as_str(), row.reason.as_str()), ("replay", "completed", "test"));
    assert_eq!(row.sequences, vec![dead[0].sequence as i64]);
    assert!(!row.dry_run);
    assert_eq!(row.outcome.as_ref().unwrap()["replayed"], 1);
}

#[tokio::test]
async fn a_replayed_message_that_dies_again_returns_with_its_count_raised_and_its_history() {
    let env = Env::new().await;
    let _worker = env.worker(&["--max-deliver", "2"]).await;
    let (id, seq) = env.publish("fail").await;
    let first = env.wait_for_dead_letters(Some(PROBE), 1, WAIT).await.remove(0);

    let replayed = ctl(&env, &["dlq", "replay", &first.sequence.to_string(), "--reason", "retry it"]).await;
    assert!(replayed.success(), "{replayed:?}");
    let again = eventually("the message dead again", WAIT, || async {
        let dead = env.dead_letters(None).await;
        dead.into_iter().find(|e| e.sequence != first.sequence)
    })
    .await;
    let audit = audit_rows(&env).await;
    assert_eq!(audit.len(), 1);

    let left = env.dead_letters(None).await;
    assert_eq!(left.len(), 1, "the first copy left the DLQ: {left:?}");
    assert_eq!(again.replays(), 1);
    assert_eq!(again.header(dlq::REPLAY_COUNT), Some("1"));
    assert_eq!(again.header(dlq::REPLAY_AUDIT_ID), Some(audit[0].id.to_string().as_str()));
    assert_eq!(again.consumer(), PROBE);
    assert_eq!(again.original_subject(), "events.probe.fail", "the original subject, not the replay subject");
    assert_eq!(again.header(dlq::ORIGINAL_STREAM), Some(env.topology.replay_stream().as_str()));
    assert_eq!(again.kind(), "transient");
    assert_eq!(again.payload, first.payload, "the same payload");
    let envelope: serde_json::Value = serde_json::from_slice(&again.payload).unwrap();
    assert_eq!(envelope["id"], id.to_string());
    let history = dlq::history(Some(&again.headers));
    assert_eq!(history.len(), 2, "both failures are in its history: {history:?}");
    assert_eq!((history[0].replays, history[0].deliveries), (0, 2));
    assert_eq!((history[1].replays, history[1].deliveries), (1, 2));
    assert!(history[0].at <= history[1].at);
    assert!(history.iter().all(|f| f.consumer == PROBE && f.kind == ErrorKind::Transient));
    assert_eq!(first.header(dlq::STREAM_SEQUENCE), Some(seq.to_string().as_str()));
}

#[tokio::test]
async fn a_canary_that_dies_again_stops_the_replay_and_the_rest_stay_in_the_dlq() {
    let env = Env::new().await;
    let _worker: Worker = env.worker(&["--max-deliver", "2"]).await;
    for _ in 0..3 {
        env.publish("fail").await;
    }
    let dead = env.wait_for_dead_letters(Some(PROBE), 3, WAIT).await;
    let original: Vec<u64> = dead.iter().map(|e| e.sequence).collect();

    let run =
        ctl(&env, &["dlq", "replay", "--all", "--canary", "1", "--canary-timeout", "30s", "--reason", "canary"]).await;
    assert!(!run.success(), "{run:?}");
    assert!(run.stderr.contains("the canary died again"), "{run:?}");

    let after = env.dead_letters(None).await;
    assert_eq!(after.len(), 3, "{after:?}");
    let untouched: Vec<u64> = after.iter().filter(|e| e.replays() == 0).map(|e| e.sequence).collect();
    assert_eq!(untouched, original[1..].to_vec(), "the rest were never sent");
    let back: Vec<_> = after.iter().filter(|e| e.replays() == 1).collect();
    assert_eq!(back.len(), 1, "the canary is back, replayed once");
    assert_eq!(back[0].payload, dead[0].payload);
    let audit = audit_rows(&env).await;
    assert_eq!(audit.len(), 1);
    assert_eq!((audit[0].action.as_str(), audit[0].status.as_str()), ("replay", "stopped"));
    assert_eq!(audit[0].outcome.as_ref().unwrap()["canary_died"], 1);
    let replay_stream = env.consumer_info(&env.topology.replay_stream(), PROBE).await;
    assert_eq!(replay_stream.delivered.stream_sequence, 1, "only the canary reached the replay consumer");
}

#[tokio::test]
async fn a_canary_that_survives_lets_the_rest_of_the_replay_through() {
    let env = Env::new().await;
    let mut worker = env.worker(&["--max-deliver", "2"]).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(env.publish("fail_until:3").await.0);
    }
    env.wait_for_dead_letters(Some(PROBE), 3, WAIT).await;
    // The fix is deployed (more deliveries allowed), then the replay goes out behind a canary.
    worker.terminate().await;
    assert_eq!(worker.wait_exit(WAIT).await, Some(0));
    let _worker = env.worker(&["--max-deliver", "4"]).await;

    let run =
        ctl(&env, &["dlq", "replay", "--all", "--canary", "1", "--canary-timeout", "30s", "--reason", "fixed"]).await;
    assert!(run.success(), "{run:?}");
    assert!(run.stdout.contains("replayed 3, failed 0"), "{run:?}");
    for id in ids {
        let rows = env.wait_for_record(id, WAIT).await;
        assert_eq!(rows.len(), 1);
    }
    assert!(env.dead_letters(None).await.is_empty(), "every dead letter left the DLQ");
    let audit = audit_rows(&env).await;
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (audit[0].status.as_str(), audit[0].outcome.as_ref().unwrap()["replayed"].as_u64()),
        ("completed", Some(3))
    );
}

#[tokio::test]
async fn a_dead_letter_carries_its_trace_and_a_replay_starts_a_new_trace_linked_to_it() {
    use trellis_testkit::otlp::OtlpReceiver;
    let env = Env::new().await;
    let otlp = OtlpReceiver::start().await.expect("the OTLP receiver");
    let otel = otlp.env("probe");
    let _worker = trellis_testkit::probe::worker(&env.db.url, &env.nats_url, &env.prefix, &["--max-deliver", "1"])
        .envs(otel.iter().map(|(k, v)| (*k, v.as_str())))
        .ready()
        .await;
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let (subject, mut headers, payload) = trellis_testkit::probe::event(&env.prefix, uuid::Uuid::now_v7(), "fail");
    headers.insert("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01").as_str());
    env.js.publish_with_headers(subject, headers, payload).await.unwrap().await.unwrap();

    // The dead letter carries the failed delivery's context: its process span, in the trace.
    let dead = env.wait_for_dead_letters(Some(PROBE), 1, WAIT).await.remove(0);
    assert_eq!(dead.trace_id().as_deref(), Some(trace_id.as_str()));
    let failed = dlq::failed_trace(Some(&dead.headers)).unwrap();
    let failed_span = failed.traceparent.split('-').nth(2).unwrap().to_owned();
    eventually("the failed delivery's process span", WAIT, || {
        let found = otlp.trace(&trace_id).into_iter().any(|s| s.span_id == failed_span && s.kind == 5);
        async move { found.then_some(()) }
    })
    .await;

    let seq = dead.sequence.to_string();
    let shown = ctl(&env, &["dlq", "show", &seq]).await;
    assert!(shown.success() && shown.stdout.contains(&format!("trace:    {trace_id}")), "{shown:?}");
    let json = ctl(&env, &["--output", "json", "dlq", "show", &seq]).await.json();
    assert_eq!(json["trace_id"], trace_id.as_str());

    // A replay is a new trace whose process span links back to the failed delivery.
    let replayed = ctl(&env, &["dlq", "replay", &seq, "--reason", "follow the trace"]).await;
    assert!(replayed.success(), "{replayed:?}");
    let replay = eventually("the replay's process span", WAIT, || {
        let found = otlp
            .spans()
            .into_iter()
            .find(|s| s.kind == 5 && s.trace_id != trace_id && s.links_to(&trace_id, &failed_span));
        async move { found }
    })
    .await;
    assert_eq!(replay.attr("messaging.consumer.group.name"), Some(PROBE));
    // Dead again: the new dead letter names the replay's trace.
    let again = eventually("the replay dead again", WAIT, || async {
        env.dead_letters(None).await.into_iter().find(|e| e.sequence != dead.sequence)
    })
    .await;
    assert_eq!(again.trace_id(), Some(replay.trace_id.clone()));
}

#[tokio::test]
async fn parked_dead_letters_stay_in_the_dlq_out_of_every_replay_until_unparked() {
    let env = Env::new().await;
    let poison = dead_letter(&env, "alpha", 1, ErrorKind::Permanent, "poison 1").await;
    let other = dead_letter(&env, "alpha", 2, ErrorKind::Permanent, "timeout").await;

    let refused = ctl(&env, &["dlq", "park", &poison.to_string()]).await;
    assert!(!refused.success() && refused.stderr.contains("--reason is required"), "{refused:?}");
    let parked = ctl(&env, &["dlq", "park", "--reason", "keep for analysis", "--grep", "poison"]).await;
    assert!(parked.success(), "{parked:?}");
    let listed = ctl(&env, &["--output", "json", "dlq", "list"]).await.json();
    assert_eq!(sequences(&listed), vec![other], "a parked one is out of the list");
    let listed = ctl(&env, &["--output", "json", "dlq", "list", "--parked"]).await.json();
    assert_eq!(sequences(&listed), vec![poison]);
    let shown = ctl(&env, &["--output", "json", "dlq", "show", &poison.to_string()]).await.json();
    assert_eq!(shown["parked"], true);
    // Replaying everything (or naming it) leaves the parked one where it is.
    let dry = ctl(&env, &["dlq", "replay", "--dry-run", "--all"]).await;
    assert!(dry.stdout.contains("1 dead letters would be replayed"), "{dry:?}");
    let named = ctl(&env, &["dlq", "replay", "--dry-run", &poison.to_string()]).await;
    assert!(named.stdout.contains("0 dead letters would be replayed"), "{named:?}");
    assert_eq!(env.dead_letters(None).await.len(), 2, "both still in the DLQ");

    let unparked = ctl(&env, &["dlq", "unpark", "--reason", "fixed", &poison.to_string()]).await;
    assert!(unparked.success(), "{unparked:?}");
    let listed = ctl(&env, &["--output", "json", "dlq", "list"]).await.json();
    assert_eq!(sequences(&listed), vec![poison, other]);
    let audit = audit_rows(&env).await;
    let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
    assert_eq!(actions, vec!["park", "unpark"]);
    assert!(audit.iter().all(|a| a.status == "completed"), "{audit:?}");
}
