//! A three-node JetStream cluster on loopback, for tests of the system on a cluster: three
//! nats-server processes (`NATS_SERVER_BIN`, as [`PrivateNats`](crate::PrivateNats)) named
//! `n1`..`n3`, each with its own store directory, client, cluster and monitoring ports, and
//! routes to the other two. [`NatsCluster::start`] returns once JetStream's meta leader is
//! elected and an R3 stream can be placed; a node can be killed with SIGKILL
//! ([`NatsCluster::kill`]) or stopped with SIGTERM ([`NatsCluster::stop`]), and started again on
//! its ports and store ([`NatsCluster::restart`]).
//!
//! Each node carries the server tag `node:<name>`, so that a test with R1 streams can place them
//! (`Placement { tags: ["node:n1"] }`) on a node it will not kill.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

use crate::{eventually, eventually_ok, free_port, within_deadline};

/// How long [`NatsCluster::restart`] waits for the cluster to agree on a meta leader again.
pub const FORMED_WITHIN: Duration = Duration::from_secs(60);

/// How long [`NatsCluster::start`] waits for a new cluster to elect a meta leader, and then to
/// place an R3 stream, before it forms a fresh one instead.
pub const PLACEABLE_WITHIN: Duration = Duration::from_secs(30);

/// How many times [`NatsCluster::start`] forms a cluster before it gives up.
pub const FORMATIONS: usize = 3;

/// One node's fixed addresses, kept across restarts.
struct Node {
    name: String,
    client_port: u16,
    cluster_port: u16,
    http_port: u16,
    config: PathBuf,
    /// Where its output goes (set when it is spawned).
    log: PathBuf,
    child: Option<Child>,
}

pub struct NatsCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
}

impl NatsCluster {
    /// Starts `n1`..`n3` and waits until JetStream's meta leader is elected and an R3 stream can
    /// be placed. A cluster that has not got there within [`PLACEABLE_WITHIN`] is stopped and a
    /// fresh one (new ports, new stores) formed in its place, at most [`FORMATIONS`] times: the
    /// tests are about the system on a formed cluster, and on a loaded machine nats-server now and
    /// then leaves a new cluster unable to place a stream for minutes. Each abandoned formation is
    /// reported on stderr with its reason and the nodes' logs; the last failure is returned.
    pub async fn start() -> anyhow::Result<NatsCluster> {
        let mut reasons = Vec::new();
        for formation in 1..=FORMATIONS {
            let cluster = NatsCluster::form()?;
            match cluster.wait_usable().await {
                Ok(()) => return Ok(cluster),
                Err(why) => {
                    eprintln!("formation {formation} of the NATS cluster abandoned: {why}\n{}", cluster.log_tails());
                    reasons.push(why);
                }
            }
        }
        anyhow::bail!("the NATS cluster did not form {FORMATIONS} times: {}", reasons.join("; "))
    }

    /// Writes the nodes' configurations and starts them.
    fn form() -> anyhow::Result<NatsCluster> {
        let dir = std::env::temp_dir().join(format!("trellis-nats-cluster-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let mut nodes = Vec::new();
        for i in 1..=3 {
            let name = format!("n{i}");
            nodes.push(Node {
                config: dir.join(format!("{name}.conf")),
                log: PathBuf::new(),
                name,
                client_port: free_port(),
                cluster_port: free_port(),
                http_port: free_port(),
                child: None,
            });
        }
        let routes: Vec<String> = nodes.iter().map(|n| format!("nats-route://127.0.0.1:{}", n.cluster_port)).collect();
        for node in &nodes {
            let store = dir.join(&node.name);
            std::fs::create_dir_all(&store)?;
            let config = format!(
                "server_name: {name}\n\
                 server_tags: [\"node:{name}\"]\n\
                 listen: 127.0.0.1:{client}\n\
                 http: 127.0.0.1:{http}\n\
                 jetstream {{\n  store_dir: \"{store}\"\n}}\n\
                 cluster {{\n  name: trellis-test\n  listen: 127.0.0.1:{cluster}\n  routes: [\n    {routes}\n  ]\n}}\n",
                name = node.name,
                client = node.client_port,
                http = node.http_port,
                store = store.display(),
                cluster = node.cluster_port,
                routes = routes.join("\n    "),
            );
            std::fs::write(&node.config, config)?;
        }
        let mut cluster = NatsCluster { dir, nodes };
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i)?;
        }
        Ok(cluster)
    }

    /// Waits until the running nodes agree on a meta leader and JetStream can place a stream on
    /// all three nodes; the reason it cannot yet, once [`PLACEABLE_WITHIN`] has passed.
    ///
    /// An elected meta leader is not enough: until it has heard from every peer, nats-server
    /// 2.10 refuses an R3 stream ("no suitable peers for placement"), which a service takes for
    /// a refusal of its configuration. Each try creates a stream of its own name, so that a
    /// creation still under way from an earlier try (its answer timed out) is not in the way.
    async fn wait_usable(&self) -> Result<(), String> {
        within_deadline(PLACEABLE_WITHIN, || self.formed()).await?;
        let urls = self.urls();
        let client =
            async_nats::connect(urls.as_slice()).await.map_err(|e| format!("connecting to the cluster: {e}"))?;
        let client = &client;
        let mut tries = 0;
        within_deadline(PLACEABLE_WITHIN, || {
            tries += 1;
            let probe = format!("CLUSTER_PROBE_{tries}");
            async move {
                let api = |verb: &str| format!("$JS.API.STREAM.{verb}.{probe}");
                let create = serde_json::json!({"name": probe, "subjects": [format!("cluster-probe.{probe}")],
                "num_replicas": 3, "storage": "memory"});
                let answer = |reply: Result<async_nats::Message, async_nats::RequestError>| {
                    let reply = reply.map_err(|e| format!("{probe}: {e}"))?;
                    serde_json::from_slice::<serde_json::Value>(&reply.payload).map_err(|e| format!("{probe}: {e}"))
                };
                let created = answer(client.request(api("CREATE"), create.to_string().into()).await)?;
                if let Some(error) = created.get("error") {
                    return Err(format!("creating {probe}: {error}"));
                }
                let deleted = answer(client.request(api("DELETE"), bytes::Bytes::new()).await)?;
                if deleted["success"] == true { Ok(()) } else { Err(format!("deleting {probe}: {deleted}")) }
            }
        })
        .await
    }

    /// The last lines of each node's log.
    fn log_tails(&self) -> String {
        let tail = |node: &Node| {
            let text = std::fs::read_to_string(&node.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        };
        self.nodes.iter().map(|n| format!("--- {} ({})\n{}", n.name, n.log.display(), tail(n))).collect()
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        anyhow::ensure!(node.child.is_none(), "{} is running", node.name);
        let (path, log) = crate::log_file(&format!("nats-cluster-{}", node.name));
        node.log = path;
        let child = Command::new(crate::PrivateNats::binary())
            .arg("-c")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!("starting {} for {} (set NATS_SERVER_BIN)", crate::PrivateNats::binary(), node.name)
            })?;
        node.child = Some(child);
        Ok(())
    }

    /// Waits until every running node is up and reports the same elected meta leader.
    async fn wait_formed(&self) {
        eventually_ok("the NATS cluster's JetStream meta leader", FORMED_WITHIN, || self.formed()).await;
    }

    /// Whether every running node is up and reports the same elected meta leader.
    async fn formed(&self) -> Result<(), String> {
        let mut leader = None;
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let seen = meta_leader_seen_by(node.http_port).await.ok_or(format!("{} sees no meta leader", node.name))?;
            if *leader.get_or_insert_with(|| seen.clone()) != seen {
                return Err(format!("{} sees {seen} as the meta leader, another node {leader:?}", node.name));
            }
        }
        Ok(())
    }

    /// The client URLs, one per node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("nats://127.0.0.1:{}", n.client_port)).collect()
    }

    /// The client URLs as one comma-separated `NATS_URL`.
    pub fn nats_url(&self) -> String {
        self.urls().join(",")
    }

    /// The node names, `n1`..`n3`.
    pub fn names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// The name of JetStream's meta leader, as a running node reports it.
    pub async fn meta_leader(&self) -> anyhow::Result<String> {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            if let Some(leader) = meta_leader_seen_by(node.http_port).await {
                return Ok(leader);
            }
        }
        anyhow::bail!("no running node reports a meta leader")
    }

    /// A node that is not the meta leader.
    pub async fn a_follower(&self) -> anyhow::Result<String> {
        let leader = self.meta_leader().await?;
        self.names().into_iter().find(|n| *n != leader).context("a three-node cluster has a follower")
    }

    /// The names of the client connections node `name` holds (its `/connz`); empty while it
    /// does not answer.
    pub async fn client_names(&self, name: &str) -> Vec<String> {
        let port = self.nodes[self.index(name)].http_port;
        let Some(connz) = monitoring(port, "connz").await else { return Vec::new() };
        let connections = connz["connections"].as_array().cloned().unwrap_or_default();
        connections.iter().filter_map(|c| c["name"].as_str().map(str::to_owned)).collect()
    }

    fn index(&self, name: &str) -> usize {
        self.nodes.iter().position(|n| n.name == name).unwrap_or_else(|| panic!("no node {name} in the cluster"))
    }

    /// Kills node `name` with SIGKILL (no shutdown of its own) and waits for it to be gone.
    pub fn kill(&mut self, name: &str) {
        let i = self.index(name);
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops node `name` as an operator stops a server for a restart (SIGTERM: nats-server shuts
    /// down cleanly) and waits for it to be gone.
    pub async fn stop(&mut self, name: &str) {
        let i = self.index(name);
        let Some(mut child) = self.nodes[i].child.take() else { return };
        let sent = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {name} failed");
        eventually(&format!("{name} to exit after SIGTERM"), FORMED_WITHIN, || {
            let exited = child.try_wait().expect("polling a node").is_some();
            async move { exited.then_some(()) }
        })
        .await;
    }

    /// Starts node `name` again, on its ports and store, and waits until the running nodes
    /// agree on a meta leader again.
    pub async fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self.index(name);
        self.spawn(i)?;
        self.wait_formed().await;
        Ok(())
    }

    /// Whether node `name` is running.
    pub fn is_running(&self, name: &str) -> bool {
        self.nodes[self.index(name)].child.is_some()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The meta leader a node's monitoring endpoint (`/jsz`) reports, once one is elected.
async fn meta_leader_seen_by(http_port: u16) -> Option<String> {
    let jsz = monitoring(http_port, "jsz").await?;
    let leader = jsz["meta_cluster"]["leader"].as_str()?;
    (!leader.is_empty()).then(|| leader.to_owned())
}

/// A node's monitoring endpoint `/<what>` as JSON.
async fn monitoring(http_port: u16, what: &str) -> Option<serde_json::Value> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().ok()?;
    client.get(format!("http://127.0.0.1:{http_port}/{what}")).send().await.ok()?.json().await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JetStream API answers through the URL list: a meta leader exists and a node reaches
    /// it. (The raw request: async-nats's account info does not decode 2.9's answer.)
    async fn jetstream_answers(urls: &[String]) -> Option<()> {
        let client = async_nats::connect(urls).await.ok()?;
        let reply = client.request("$JS.API.INFO", bytes::Bytes::new()).await.ok()?;
        let info: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
        info.get("error").is_none().then_some(())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn three_nodes_elect_a_meta_leader_and_outlive_a_follower_killed_with_sigkill() {
        let mut cluster = NatsCluster::start().await.unwrap();
        assert_eq!(cluster.names(), ["n1", "n2", "n3"]);
        assert_eq!(cluster.urls().len(), 3);
        let leader = cluster.meta_leader().await.unwrap();
        assert!(cluster.names().contains(&leader), "{leader}");
        let urls = cluster.urls();
        assert_eq!(cluster.nats_url(), urls.join(","));
        eventually("JetStream through the cluster", FORMED_WITHIN, || jetstream_answers(&urls)).await;

        let follower = cluster.a_follower().await.unwrap();
        assert_ne!(follower, leader);
        cluster.kill(&follower);
        assert!(!cluster.is_running(&follower));
        assert_eq!(cluster.meta_leader().await.unwrap(), leader, "a follower's death moves no leadership");
        eventually("JetStream without the follower", FORMED_WITHIN, || jetstream_answers(&urls)).await;

        cluster.restart(&follower).await.unwrap();
        assert!(cluster.is_running(&follower));
        let port = cluster.nodes[cluster.index(&follower)].http_port;
        let seen = meta_leader_seen_by(port).await;
        assert!(seen.is_some(), "the restarted {follower} rejoined and sees a leader");
    }
}
