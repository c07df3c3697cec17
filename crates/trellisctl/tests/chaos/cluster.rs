//! The scenarios on a three-node cluster, one fault each, under the writer's steady load: the
//! events stream's leader killed with SIGKILL, the leader of each worker's consumer killed, two
//! of the three nodes lost (no quorum), and a rolling restart. Each ends with the writer
//! stopped, the system settled and [`System::assert_invariants`].

use crate::harness::*;

/// (a) SIGKILL to the node that leads the events stream: a new leader is elected, the relay
/// publishes through it, the node comes back and catches up, and nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread")]
async fn the_events_stream_leader_killed_with_sigkill_loses_and_doubles_nothing() {
    let mut system = System::on_cluster().await;
    let writer = Writer::start(&system);
    writer.wait_writes(scaled(25)).await;
    system.published_through_now().await;

    let events = system.events();
    let leader = system.leader(&events, || system.stream_leader(&events)).await;
    system.cluster_mut().kill(&leader);
    system.new_leader(&events, &leader, || system.stream_leader(&events)).await;
    writer.wait_writes(scaled(25)).await;
    system.published_through_now().await;

    system.cluster_mut().restart(&leader).await.expect("restarting the killed node");
    system.wait_replicated(&leader).await;
    writer.wait_writes(scaled(25)).await;
    let written = writer.stop().await;
    system.settle(&written).await;
    system.assert_invariants(&written).await;
}

/// (b) SIGKILL to the node that leads a worker's consumer, until every worker's has lost its
/// leader once (a node that leads several of them at once is killed once for all): each
/// consumer gets a new leader, its worker goes on consuming and acknowledging through it, and
/// the node comes back; acks lost with the old leader are redelivered and applied once.
#[tokio::test(flavor = "multi_thread")]
async fn the_leader_of_each_workers_consumer_killed_with_sigkill_loses_and_doubles_nothing() {
    let mut system = System::on_cluster().await;
    let writer = Writer::start(&system);
    writer.wait_writes(scaled(25)).await;

    let mut left: Vec<String> = WORKERS.iter().map(|(_, consumer)| system.topology.name(consumer)).collect();
    while let Some(first) = left.first().cloned() {
        let victim = system.leader(&first, || system.consumer_leader(&first)).await;
        let mut led = Vec::new();
        for consumer in &left {
            if system.leader(consumer, || system.consumer_leader(consumer)).await == victim {
                led.push(consumer.clone());
            }
        }
        system.cluster_mut().kill(&victim);
        for consumer in &led {
            system.new_leader(consumer, &victim, || system.consumer_leader(consumer)).await;
            system.consumes_past_now(consumer).await;
        }
        left.retain(|c| !led.contains(c));
        system.cluster_mut().restart(&victim).await.expect("restarting the killed node");
        system.wait_replicated(&victim).await;
    }
    let written = writer.stop().await;
    system.settle(&written).await;
    system.assert_invariants(&written).await;
}

/// (c) Two of the three nodes killed: JetStream has no quorum. The API goes on committing
/// writes (each answered 2xx) into the outbox and its `/readyz` says `degraded`, naming the
/// `jetstream` check; once the nodes are back, the backlog drains oldest first, once.
#[tokio::test(flavor = "multi_thread")]
async fn without_quorum_writes_commit_to_the_outbox_and_drain_in_order_once_it_returns() {
    let mut system = System::on_cluster().await;
    let writer = Writer::start(&system);
    writer.wait_writes(scaled(25)).await;
    system.published_through_now().await;
    system.api_readiness("ready").await;

    // The events stream's leader and another node go; a follower stays.
    let events = system.events();
    let leader = system.leader(&events, || system.stream_leader(&events)).await;
    let other = system.cluster().names().into_iter().find(|n| *n != leader).expect("another node");
    system.cluster_mut().kill(&leader);
    system.cluster_mut().kill(&other);

    writer.wait_writes(scaled(40)).await;
    system.wait_degraded_by_jetstream().await;
    let written = writer.stop().await;
    let backlog = system.unpublished().await;
    assert!(backlog.len() >= scaled(40), "the writes since the quorum was lost wait in the outbox: {}", backlog.len());

    system.cluster_mut().restart(&leader).await.expect("restarting a node");
    system.cluster_mut().restart(&other).await.expect("restarting a node");
    system.settle(&written).await;
    let messages = system.assert_invariants(&written).await;
    assert_in_outbox_order(&messages, &backlog);
    system.api_readiness("ready").await;
}

/// (d) A rolling restart: each node in turn stopped (SIGTERM) and started again, the next one
/// only once the cluster, every stream and every consumer have a leader without it and, after
/// its return, every replica is current again.
#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_of_the_three_nodes_loses_and_doubles_nothing() {
    let mut system = System::on_cluster().await;
    let writer = Writer::start(&system);
    writer.wait_writes(scaled(25)).await;

    for node in system.cluster().names() {
        system.cluster_mut().stop(&node).await;
        system.wait_leaders().await;
        writer.wait_writes(scaled(10)).await;
        system.cluster_mut().restart(&node).await.expect("restarting a node");
        system.wait_replicated(&node).await;
    }
    let written = writer.stop().await;
    system.settle(&written).await;
    system.assert_invariants(&written).await;
}
