//! The scenarios on one nats-server, one fault each, under the writer's steady load: each worker
//! killed with SIGKILL mid-batch, `trellis-api` killed mid-batch, the nats-server killed and
//! started again, every database backend of the system ended again and again, and the cutover
//! flags flipped. Each ends with the writer stopped, the system settled and
//! [`System::assert_invariants`].

use std::collections::BTreeSet;

use crate::harness::*;

/// (e) SIGKILL to each worker in turn while it holds deliveries it has not acknowledged, and a
/// new process started: the deliveries come again after `ACK_WAIT` and are applied once.
#[tokio::test(flavor = "multi_thread")]
async fn each_worker_killed_with_sigkill_mid_batch_loses_and_doubles_nothing() {
    let mut system = System::on_single().await;
    let writer = Writer::start(&system);
    writer.wait_writes(scaled(25)).await;
    for _ in 0..scale() {
        for i in 0..WORKERS.len() {
            system.kill_worker_mid_batch(i).await;
            writer.wait_writes(10).await;
            system.restart_worker(i).await;
            for consumer in system.consumers_of(i).iter().take(1) {
                system.consumes_past_now(consumer).await;
            }
        }
    }
    let written = writer.stop().await;
    system.settle(&written).await;
    system.assert_invariants(&written).await;
}

/// (f) SIGKILL to `trellis-api` while its relay has committed rows to publish, and a new process
/// started: the new relay publishes them (once: the stream drops a message id it has), and the
/// writes sent meanwhile are repeated until acknowledged, none made twice.
#[tokio::test(flavor = "multi_thread")]
async fn trellis_api_killed_with_sigkill_mid_batch_loses_and_doubles_nothing() {
    let mut system = System::on_single().await;
    let writer = Writer::start(&system);
    writer.wait_writes(scaled(25)).await;
    for _ in 0..scale() {
        system.kill_api_mid_batch().await;
        system.restart_api().await;
        writer.wait_writes(25).await;
        system.published_through_now().await;
    }
    let written = writer.stop().await;
    assert!(written.retries > 0, "no write was repeated: the API was never found down");
    system.settle(&written).await;
    system.assert_invariants(&written).await;
}

/// (g) SIGKILL to the nats-server, then started again on its port and store: writes go on
/// committing to the outbox, the API's `/readyz` says degraded, and once the server is back
/// the backlog drains oldest first, once; the workers reconnect and consume on.
#[tokio::test(flavor = "multi_thread")]
async fn the_nats_server_killed_and_restarted_loses_and_doubles_nothing() {
    let mut system = System::on_single().await;
    let writer = Writer::start(&system);
    writer.wait_writes(scaled(25)).await;
    let mut backlogs = Vec::new();
    for _ in 0..scale() {
        system.published_through_now().await;
        system.api_readiness("ready").await;
        system.single_nats().stop();
        writer.wait_writes(40).await;
        system.wait_degraded_by_jetstream().await;
        let backlog = system.unpublished().await;
        assert!(backlog.len() >= 40, "the writes since NATS went wait in the outbox: {}", backlog.len());
        backlogs.push(backlog);
        system.single_nats().restart().expect("restarting the nats-server");
        system.published_through_now().await;
        for i in 0..WORKERS.len() {
            system.consumes_past_now(&system.consumers_of(i)[0]).await;
        }
    }
    let written = writer.stop().await;
    system.settle(&written).await;
    let messages = system.assert_invariants(&written).await;
    for backlog in &backlogs {
        assert_in_outbox_order(&messages, backlog);
    }
    system.api_readiness("ready").await;
}

/// (h) `pg_terminate_backend` of every database backend of the API and the workers, again and
/// again (until each of the API's request pool and the three workers has lost one, and at least
/// five rounds): requests in flight fail and are repeated, the relay and the workers reconnect
/// and retry, and nothing is lost or made twice.
#[tokio::test(flavor = "multi_thread")]
async fn every_database_backend_terminated_repeatedly_loses_and_doubles_nothing() {
    let mut system = System::on_single().await;
    let writer = Writer::start(&system);
    writer.wait_writes(scaled(25)).await;
    let wanted: BTreeSet<&str> =
        ["trellis-api", "search-projector", "dispute-processor", "score-orchestrator"].into_iter().collect();
    let mut ended: BTreeSet<String> = BTreeSet::new();
    let mut rounds = 0;
    while rounds < scaled(5) || !wanted.iter().all(|w| ended.contains(*w)) {
        assert!(rounds < scaled(5) + 100, "never ended a backend of each process: ended {ended:?}");
        ended.extend(system.terminate_backends().await);
        rounds += 1;
        writer.wait_writes(10).await;
    }
    let written = writer.stop().await;
    system.settle(&written).await;
    system.assert_invariants(&written).await;
}

/// (i) The three cutover flags flipped under load, each through monolith, shadow and back to
/// worker: whichever side executes a processor, each event is applied once by it (the candidate
/// side of a shadow writes only its shadow tables).
#[tokio::test(flavor = "multi_thread")]
async fn cutover_flags_flipped_under_load_lose_and_double_nothing() {
    let mut system = System::on_single().await;
    let writer = Writer::start(&system);
    writer.wait_writes(scaled(25)).await;
    for _ in 0..scale() {
        for flag in ["search.executor", "dispute.executor", "score.executor"] {
            for value in ["monolith", "shadow", "worker"] {
                system.set_flag(flag, value).await;
                writer.wait_writes(15).await;
            }
        }
    }
    let written = writer.stop().await;
    system.settle(&written).await;
    system.assert_invariants(&written).await;
}
