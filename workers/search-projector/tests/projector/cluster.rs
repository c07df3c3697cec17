//! The system on a three-node JetStream cluster (`trellis_testkit::cluster`): the API (its relay)
//! and a projector process connect with `NATS_URL` listing the three nodes and declare R3
//! streams; an event goes end to end; a follower of the meta group is killed with SIGKILL and
//! the system keeps working. The whole system under faults, with exact invariants, is tested in
//! `crates/trellisctl/tests/chaos`.

use std::time::Duration;

use trellis_testkit::cluster::NatsCluster;
use trellis_testkit::{Spawn, TestDb};

use crate::harness::*;

const WAIT: Duration = Duration::from_secs(30);

async fn registered_and_projected(api: &Api, db: &TestDb, handle: &str) {
    let user = api.register(handle).await;
    let what = format!("{handle}'s directory document, through the cluster");
    eventually(&what, WAIT, || async { directory_row(db, user.id).await.map(|_| ()) }).await;
}

/// The processes' NATS connections (their connection names), node by node.
async fn connections_by_node(cluster: &NatsCluster) -> Vec<(String, usize)> {
    let mut by_node = Vec::new();
    for node in cluster.names().into_iter().filter(|n| cluster.is_running(n)) {
        let ours = cluster.client_names(&node).await.iter().filter(|c| PROCESSES.contains(&c.as_str())).count();
        by_node.push((node, ours));
    }
    by_node
}

/// The connection names of the two processes.
const PROCESSES: [&str; 2] = ["trellis-api", "search-projector"];

#[tokio::test(flavor = "multi_thread")]
async fn events_flow_through_a_three_node_cluster_and_survive_a_follower_killed_with_sigkill() {
    let mut cluster = NatsCluster::start().await.expect("starting the three-node cluster");
    let nats_url = cluster.nats_url();
    let leader = cluster.meta_leader().await.unwrap();

    let db = TestDb::migrated().await.unwrap();
    let prefix = trellis_testkit::nats_prefix();
    // The services declare the streams, R3: any one node may go.
    let on_cluster = |spawn: Spawn| spawn.env("NATS_URL", &nats_url).env("TRELLIS_STREAM_REPLICAS", "3");
    let api =
        Api(trellis_testkit::http::Api::start(on_cluster(trellis_testkit::http::Api::spawn(&db.url, &prefix))).await);
    let _projector = on_cluster(Spawn::new("search-projector").on(&db.url, &prefix)).ready().await;

    registered_and_projected(&api, &db, "before").await;

    // The victim: the follower that holds most of the processes' connections (each process
    // picks a node of the list at random), so that they must reconnect elsewhere.
    let by_node = eventually("the processes' connections", WAIT, || async {
        let by_node = connections_by_node(&cluster).await;
        (by_node.iter().map(|(_, n)| n).sum::<usize>() >= PROCESSES.len()).then_some(by_node)
    })
    .await;
    let (victim, on_victim) =
        by_node.iter().filter(|(node, _)| *node != leader).max_by_key(|(_, n)| *n).cloned().expect("two followers");
    cluster.kill(&victim);
    assert!(!cluster.is_running(&victim));
    assert_eq!(cluster.meta_leader().await.unwrap(), leader);
    // Every connection of the processes is back, on the two nodes left.
    let total: usize = by_node.iter().map(|(_, n)| n).sum();
    eventually(&format!("{on_victim} connection(s) from {victim} to reconnect"), WAIT, || async {
        let now: usize = connections_by_node(&cluster).await.iter().map(|(_, n)| n).sum();
        (now == total).then_some(())
    })
    .await;
    registered_and_projected(&api, &db, "after").await;
    registered_and_projected(&api, &db, "later").await;

    // The victim comes back on its ports and store, and the cluster agrees on a leader again.
    cluster.restart(&victim).await.unwrap();
    registered_and_projected(&api, &db, "rejoined").await;
}
