//! A shadow candidate's consumer group: it copies only what is published during a shadow
//! period, and its consumers are deleted when the period ends (not when the process stops).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use trellis_runtime::consumer::{ConsumerGroup, ConsumerSpec, Delivery, Handler, Outcome};

use crate::harness::{Env, eventually};

/// The stream sequences it was handed.
#[derive(Default)]
struct Seen(Mutex<Vec<u64>>);

impl Handler for Seen {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        self.0.lock().unwrap().extend(batch.iter().map(|d| d.stream_sequence));
        vec![Outcome::Done; batch.len()]
    }
}

async fn candidate_exists(env: &Env, durable: &str) -> bool {
    let stream = env.js.get_stream(env.topology.events_stream()).await.unwrap();
    stream.get_consumer::<async_nats::jetstream::consumer::pull::Config>(durable).await.is_ok()
}

async fn saw(seen: &Seen, want: &[u64]) {
    eventually("the candidate to handle what was published", Duration::from_secs(10), || async {
        (seen.0.lock().unwrap().as_slice() == want).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_candidate_copies_only_its_periods_messages_and_its_consumers_go_when_the_period_ends() {
    let env = Env::new().await;
    let ctx = env.context();
    let spec = trellis_runtime::cutover::candidate_spec(ConsumerSpec {
        name: "parity".into(),
        filter_subject: "events.probe.>".into(),
    });
    assert_eq!(spec.name, "parity-shadow");
    let durable = env.topology.name(&spec.name);
    let seen = Arc::new(Seen::default());
    let make = {
        let seen = seen.clone();
        move || ConsumerGroup::new(ctx.clone(), spec.clone(), Default::default(), seen.clone())
    };
    let (gate, open) = watch::channel(false);
    let stop = CancellationToken::new();
    let run = tokio::spawn(trellis_runtime::cutover::run_candidate(make, open, stop.clone()));

    // History before the period is not copied.
    env.publish_many("ok", 3).await;
    gate.send_replace(true);
    eventually("the candidate's consumer", Duration::from_secs(10), || async {
        candidate_exists(&env, &durable).await.then_some(())
    })
    .await;
    let (_, a) = env.publish("ok").await;
    let (_, b) = env.publish("ok").await;
    saw(&seen, &[a, b]).await;

    // The period ends: the consumers go; what is published until the next one is not copied.
    gate.send_replace(false);
    eventually("the candidate's consumer to be deleted", Duration::from_secs(10), || async {
        (!candidate_exists(&env, &durable).await).then_some(())
    })
    .await;
    env.publish("ok").await;
    gate.send_replace(true);
    eventually("the next period's consumer", Duration::from_secs(10), || async {
        candidate_exists(&env, &durable).await.then_some(())
    })
    .await;
    let (_, c) = env.publish("ok").await;
    saw(&seen, &[a, b, c]).await;

    // Stopping the process keeps the consumer: a restarted candidate resumes where it was.
    stop.cancel();
    run.await.unwrap();
    assert!(candidate_exists(&env, &durable).await, "the consumer outlives a stop");
    let mut c: PullConsumer =
        env.js.get_stream(env.topology.events_stream()).await.unwrap().get_consumer(&durable).await.unwrap();
    let info = c.info().await.unwrap();
    assert_eq!(info.config.deliver_policy, async_nats::jetstream::consumer::DeliverPolicy::New);
    assert_eq!(info.num_pending, 0);
}
