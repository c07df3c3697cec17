//! A handler busy for longer than its pull lives: the rest of that pull is handled on its first
//! delivery, not redelivered after `ack_wait`.
//!
//! The scene of both tests: a group pulls a full batch (`BATCH` messages) in one pull request
//! whose first message alone is handed to the handler, and the handler keeps busy with it for
//! longer than the pull lives in async-nats (its expiry plus 5 s); meanwhile the server sends
//! the rest of the batch in that pull.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use trellis_runtime::consumer::RunnerConfig;

use crate::harness::{Env, Recorder, Seen, eventually, publish_ok, start_group};

const BATCH: usize = 8;
const PULL_EXPIRY: Duration = Duration::from_secs(4);
/// Longer than a pull lives on the client: async-nats ends a `Batch` stream polled after its
/// expiry plus 5 s.
const BUSY: Duration = Duration::from_secs(10);

fn config(ack_wait: Duration) -> RunnerConfig {
    RunnerConfig { batch_size: BATCH, fetch_expiry: PULL_EXPIRY, ack_wait, ..RunnerConfig::default() }
}

/// Sets the scene on a running group whose `busy` replica is about to pull: publishes one
/// message, waits until the handler is busy with it, then publishes the rest of the batch and
/// waits until the server has delivered all of it to that pull. Returns the sequences.
async fn a_full_pull_behind_a_busy_handler(
    env: &Env,
    group: &str,
    busy: &Recorder,
    log: &Mutex<Vec<Seen>>,
) -> Vec<u64> {
    let mut sequences = publish_ok(env, 1).await;
    busy.wait_for_batches(1).await;
    sequences.extend(publish_ok(env, BATCH - 1).await);
    eventually("the server to deliver the whole batch in the pull in hand", PULL_EXPIRY, || async {
        let info = env.consumer_info(&env.topology.events_stream(), group).await;
        (info.num_pending == 0 && info.num_ack_pending == BATCH).then_some(())
    })
    .await;
    assert_eq!(busy.batches(), 1, "the rest of the pull waits behind the busy handler");
    assert_eq!(log.lock().unwrap().len(), 1, "the handler is busy with the pull's first message alone");
    sequences
}

/// Waits until the group has acknowledged everything; asserts the server delivered each
/// message once (its consumer sequence counts redeliveries too).
async fn assert_settled_without_redelivery(env: &Env, group: &str, within: Duration) {
    let info = eventually("every message acknowledged", within, || async {
        let info = env.consumer_info(&env.topology.events_stream(), group).await;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(info)
    })
    .await;
    assert_eq!(info.delivered.consumer_sequence, BATCH as u64, "each message delivered once: {info:?}");
}

/// Every message exactly once, on its first delivery, the first alone and the rest together.
fn assert_each_handled_once_on_its_first_delivery(log: &[Seen], sequences: &[u64]) {
    let mut times: HashMap<u64, usize> = HashMap::new();
    for seen in log {
        *times.entry(seen.stream_sequence).or_default() += 1;
        assert_eq!(seen.deliveries, 1, "handled on its first delivery, not after ack_wait: {log:?}");
    }
    assert_eq!(times.len(), BATCH, "every message handled: {log:?}");
    assert!(sequences.iter().all(|s| times.get(s) == Some(&1)), "each message handled once: {log:?}");
    let batches: Vec<usize> = log.iter().map(|s| s.batch).collect();
    assert_eq!(batches, [[1].as_slice(), &[2; BATCH - 1]].concat(), "the rest of the pull is the next batch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_busy_past_its_pull_s_lifetime_loses_none_of_the_pull() {
    let env = Env::new().await;
    let ack_wait = Duration::from_secs(30);
    let log = Arc::new(Mutex::new(Vec::new()));
    let busy = Recorder::new("busy", BUSY, log.clone());
    let group = start_group(&env, "slow", config(ack_wait), busy.clone()).await;

    let sequences = a_full_pull_behind_a_busy_handler(&env, "slow", &busy, &log).await;
    // A message of that pull left unhandled would come back only after ack_wait.
    let within = BUSY + Duration::from_secs(10);
    assert!(within < ack_wait);
    eventually("every message of the pull handled", within, || async {
        (log.lock().unwrap().len() >= BATCH).then_some(())
    })
    .await;
    assert_settled_without_redelivery(&env, "slow", Duration::from_secs(10)).await;
    group.stop().await;
    assert_each_handled_once_on_its_first_delivery(&log.lock().unwrap(), &sequences);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_waiting_behind_a_handler_busy_past_ack_wait_are_not_redelivered_to_another_replica() {
    let env = Env::new().await;
    let ack_wait = Duration::from_secs(3);
    assert!(BUSY > ack_wait * 3, "the rest of the pull waits for several ack_waits");
    let log = Arc::new(Mutex::new(Vec::new()));
    let busy = Recorder::new("busy", BUSY, log.clone());
    let first = start_group(&env, "slow", config(ack_wait), busy.clone()).await;
    let sequences = a_full_pull_behind_a_busy_handler(&env, "slow", &busy, &log).await;

    // An idle replica pulls beside it: whatever the server redelivers goes there at once.
    let idle = Recorder::new("idle", Duration::ZERO, log.clone());
    let second = start_group(&env, "slow", config(ack_wait), idle).await;
    assert_settled_without_redelivery(&env, "slow", BUSY + Duration::from_secs(10)).await;
    first.stop().await;
    second.stop().await;
    let log = log.lock().unwrap();
    assert!(log.iter().all(|s| s.replica == "busy"), "nothing was redelivered to the idle replica: {log:?}");
    assert_each_handled_once_on_its_first_delivery(&log, &sequences);
}
