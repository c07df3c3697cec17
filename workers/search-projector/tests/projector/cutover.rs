//! Cutover: `search.executor` moves the projection between `trellis-api`
//! (in-process) and the `search-projector` worker, both pulling from the same consumer.

use std::time::Duration;

use trellis_domain::flags::{Executor, Flag};
use trellis_store::cutover::flags::{self, Change};
use trellis_testkit::TestDb;

use crate::harness::*;

/// `trellis_worker_messages_total{consumer="search-projector",outcome="ok"}` in a scrape.
fn handled(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("trellis_worker_messages_total{") && l.contains("consumer=\"search-projector\""))
        .filter(|l| l.contains("outcome=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn acting_on(metrics: &str, value: Executor) -> bool {
    let series = format!("trellis_cutover_flag_state{{flag=\"search.executor\",value=\"{}\"}} 1", value.as_str());
    metrics.lines().any(|l| l == series)
}

async fn flip(db: &TestDb, value: Executor) {
    let change = Change { flag: Flag::SearchExecutor, value, actor: "test", reason: "flip under load", forced: false };
    flags::set(&db.pool, &change).await.expect("setting the flag");
}

#[tokio::test(flavor = "multi_thread")]
async fn flipping_the_search_executor_under_writes_loses_nothing_and_ends_equal_to_a_rebuild() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start_with(&db, &prefix, &["--flag-poll", "200ms"]).await;
    let worker = Replica::start(&db, &prefix, &["--batch-size", "16", "--flag-poll", "200ms"]).await;

    // Writes go on while the executor moves back and forth 20 times (ending on `worker`).
    let flips = async {
        for i in 0..20 {
            flip(&db, if i % 2 == 0 { Executor::Monolith } else { Executor::Worker }).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let (users, ()) = tokio::join!(random_history(&api, 16, 300, 23), flips);
    caught_up(&db, &prefix).await;

    let projected = model(&db).await;
    assert_eq!(projected.directory.len(), users.len(), "every registered user has a document");
    assert_eq!(projected, rebuilt_model(&db).await, "the projected model equals a rebuild");
    let (in_api, in_worker) = (handled(&api.metrics().await), handled(&worker.metrics().await));
    assert!(in_api > 0.0 && in_worker > 0.0, "both sides executed: api {in_api}, worker {in_worker}");
    let audited = flags::audit(&db.pool, Some(Flag::SearchExecutor), 100).await.unwrap();
    assert_eq!(audited.len(), 20, "every flip is audited");
    // Every event the outbox holds was delivered to the consumer: nothing is left behind.
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.outbox").fetch_one(&db.pool).await.unwrap();
    let client = async_nats::connect(trellis_testkit::nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(format!("{prefix}_EVENTS")).await.unwrap();
    let info = stream.info().await.unwrap().clone();
    assert_eq!(info.state.messages, events as u64, "one stream message per outbox event");
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer(&format!("{prefix}_{}", search_projector::CONSUMER)).await.unwrap();
    let consumer = consumer.info().await.unwrap();
    assert_eq!(consumer.ack_floor.stream_sequence, info.state.last_sequence, "every event acknowledged");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_process_exports_the_executor_it_acts_on() {
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    let api = Api::start_with(&db, &prefix, &["--flag-poll", "200ms"]).await;
    let worker = Replica::start(&db, &prefix, &["--flag-poll", "200ms"]).await;
    for value in [Executor::Monolith, Executor::Worker] {
        flip(&db, value).await;
        eventually("both processes to act on the new value", Duration::from_secs(10), || async {
            (acting_on(&api.metrics().await, value) && acting_on(&worker.metrics().await, value)).then_some(())
        })
        .await;
    }
    // While the API executes, a user registered through it is projected by the API alone: once
    // the worker has finished its pull in hand, it stands by.
    flip(&db, Executor::Monolith).await;
    let standing_by = format!("trellis_consumer_standby_state{{consumer=\"{}\"}} 1", search_projector::CONSUMER);
    eventually("the worker to stand by", Duration::from_secs(10), || async {
        worker.metrics().await.lines().any(|l| l == standing_by).then_some(())
    })
    .await;
    let before = handled(&worker.metrics().await);
    let user = api.register("monolithic").await;
    caught_up(&db, &prefix).await;
    assert!(directory_row(&db, user.id).await.is_some(), "projected in-process");
    assert_eq!(handled(&worker.metrics().await), before, "the worker stood by");
}

/// A consumer group the server refuses stops its process with the refusal, whichever process
/// runs it: the worker exits 1 with it, and `trellis-api` stops with it too (instead of serving
/// on without its projector).
#[tokio::test(flavor = "multi_thread")]
async fn a_group_the_server_refuses_stops_the_worker_and_the_api_alike() {
    use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    // The projector's durable consumer, made beforehand with a deliver policy that the server
    // will not change into the projector's.
    let js = async_nats::jetstream::new(async_nats::connect(trellis_testkit::nats_url()).await.unwrap());
    let topology = trellis_runtime::nats::Topology::new(&prefix).unwrap();
    trellis_runtime::nats::ensure_streams(&js, &topology).await.unwrap();
    let stream = js.get_stream(topology.events_stream()).await.unwrap();
    let squatter = pull::Config {
        durable_name: Some(topology.name(search_projector::CONSUMER)),
        filter_subject: topology.subject("events.>"),
        deliver_policy: DeliverPolicy::Last,
        ack_policy: AckPolicy::Explicit,
        ..Default::default()
    };
    stream.create_consumer(squatter).await.unwrap();

    flip(&db, Executor::Worker).await;
    let (log, out) = trellis_testkit::log_file("search-projector");
    let mut worker = std::process::Command::new(env!("CARGO_BIN_EXE_search-projector"))
        .env("DATABASE_URL", &db.url)
        .envs(trellis_testkit::UNLIMITED_STREAMS)
        .env("NATS_URL", trellis_testkit::nats_url())
        .env("NATS_PREFIX", &prefix)
        .env("ADMIN_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "json")
        .env("FLAG_POLL", "200ms")
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .spawn()
        .expect("the projector starts");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = worker.try_wait().unwrap() {
            break status;
        }
        assert!(tokio::time::Instant::now() < deadline, "the worker still runs with a refused group");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(1), "the worker fails");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("consumer group search-projector cannot run"), "the worker says why:\n{text}");

    flip(&db, Executor::Monolith).await;
    let mut api = trellis_testkit::http::Api::spawn(&db.url, &prefix).args(["--flag-poll", "200ms"]).spawn();
    assert_eq!(api.wait_exit(Duration::from_secs(30)).await, Some(1), "the API stops on its own, and fails");
    let text = api.log_text();
    assert!(text.contains("consumer group search-projector cannot run"), "the API says why:\n{text}");
}
