//! Batching across pull requests: "up to N messages or T ms".

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use trellis_runtime::consumer::{ConsumerGroup, ConsumerSpec, Delivery, Handler, Outcome, RunnerConfig};

use crate::harness::{Env, eventually};

/// Records the size of every batch it is handed.
#[derive(Default)]
struct Sizes(Mutex<Vec<usize>>);

impl Handler for Sizes {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        self.0.lock().unwrap().push(batch.len());
        vec![Outcome::Done; batch.len()]
    }
}

/// Publishes one message, then four more after `gap`, to a group with `config`; returns the
/// batch sizes its handler saw once all five were handled.
async fn batches(config: RunnerConfig, gap: Duration) -> Vec<usize> {
    let env = Env::new().await;
    let ctx = env.context();
    let spec = ConsumerSpec { name: "batching".into(), filter_subject: "events.probe.>".into() };
    let sizes = Arc::new(Sizes::default());
    let group = ConsumerGroup::new(ctx, spec, config, sizes.clone());
    let stop = CancellationToken::new();
    let bound = group.bound_flag();
    let run = tokio::spawn(group.run(stop.clone()));
    eventually("the group to bind its consumer", Duration::from_secs(10), || async {
        bound.load(std::sync::atomic::Ordering::Relaxed).then_some(())
    })
    .await;
    env.publish("ok").await;
    // The gap is what is under test: the first message is pulled alone.
    tokio::time::sleep(gap).await;
    for _ in 0..4 {
        env.publish("ok").await;
    }
    eventually("every message handled", Duration::from_secs(10), || async {
        (sizes.0.lock().unwrap().iter().sum::<usize>() >= 5).then_some(())
    })
    .await;
    stop.cancel();
    run.await.unwrap().unwrap();
    sizes.0.lock().unwrap().clone()
}

#[tokio::test]
async fn a_batch_window_gathers_messages_of_several_pulls_into_one_batch() {
    let config = RunnerConfig { batch_size: 100, batch_window: Duration::from_secs(3), ..RunnerConfig::default() };
    assert_eq!(batches(config, Duration::from_millis(300)).await, [5], "one batch across the gap");
}

#[tokio::test]
async fn without_a_window_what_has_arrived_is_handled_at_once() {
    let config = RunnerConfig { batch_size: 100, ..RunnerConfig::default() };
    let seen = batches(config, Duration::from_millis(300)).await;
    assert_eq!(seen.first(), Some(&1), "the first message went alone: {seen:?}");
}

#[tokio::test]
async fn a_full_batch_does_not_wait_for_its_window() {
    let config = RunnerConfig { batch_size: 1, batch_window: Duration::from_secs(30), ..RunnerConfig::default() };
    // Waiting out the 30 s window would miss the harness's 10 s deadline.
    assert_eq!(batches(config, Duration::ZERO).await, [1, 1, 1, 1, 1]);
}
