//! The harness of the fault scenarios: the system on a three-node cluster or on one
//! nats-server ([`System`]), a steady writer through the API that repeats each write until the
//! API acknowledges it and records what it acknowledged ([`Writer`]), the invariants every
//! scenario ends with ([`System::settle`], [`System::assert_invariants`]), and the scenario's
//! line of the fault report ([`Report`], written where `TRELLIS_CHAOS_REPORT` says).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::ClusterInfo;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use reqwest::Method;
use serde_json::{Value, json};
use time::OffsetDateTime;
use trellis_runtime::nats::Topology;
use trellis_testkit::cluster::NatsCluster;
use trellis_testkit::http::{Api, Client, PASSWORD, User};
use trellis_testkit::search_model::{model, rebuilt_model};
use trellis_testkit::{
    PrivateNats, Process, Spawn, StoredMessage, StreamReader, TestDb, eventually_ok, within_deadline,
};
use uuid::Uuid;

/// The workers, as their binaries are named, each with the consumer whose leader scenario (b)
/// kills (the dispute processor's P1 group: harassment).
pub const WORKERS: [(&str, &str); 3] = [
    ("search-projector", "search-projector"),
    ("dispute-processor", "dispute-processor-p1"),
    ("score-orchestrator", "score-orchestrator"),
];

/// How long one step of a scenario may take: a leader election (nats-server's Raft waits
/// seconds before it campaigns), a node's restart and catch-up.
pub const STEP: Duration = Duration::from_secs(30);

/// How long the system may take to settle once the fault is over and the writer stopped: the
/// relay's backoff (at most 5 s) and the redelivery of acks lost with a leader ([`ACK_WAIT`]).
const SETTLE: Duration = Duration::from_secs(45);

/// The workers' `ACK_WAIT`: an ack sent to a consumer leader that died is lost, and the message
/// comes again after this (30 s by default, longer than a test should wait).
const ACK_WAIT: &str = "5s";

/// The writer's pace: 25 writes a second.
const WRITE_EVERY: Duration = Duration::from_millis(40);

/// How long the writer repeats one write before the scenario fails: the API's restart, the
/// database's reconnection, an election.
const ACKNOWLEDGED_WITHIN: Duration = Duration::from_secs(60);

/// The writer's pause between two attempts of a write.
const RETRY_EVERY: Duration = Duration::from_millis(100);

/// How much longer than the short form each phase of load runs: `TRELLIS_CHAOS_SCALE` (`cargo
/// xtask chaos` sets 4; the suite runs the short form, 1).
pub fn scale() -> usize {
    std::env::var("TRELLIS_CHAOS_SCALE").ok().and_then(|s| s.parse().ok()).filter(|s| *s > 0).unwrap_or(1)
}

/// `n` of the short form's writes (or rounds), times [`scale`].
pub fn scaled(n: usize) -> usize {
    n * scale()
}

/// Where the system's NATS runs.
pub enum Nats {
    /// A three-node cluster; the streams are R3.
    Cluster(NatsCluster),
    /// One nats-server of the test's own; the streams are R1.
    Single(PrivateNats),
}

/// How the system's processes are started, kept to start one again after it is killed.
struct Recipe {
    database_url: String,
    prefix: String,
    nats_url: String,
    replicas: &'static str,
}

impl Recipe {
    fn on_nats(&self, spawn: Spawn) -> Spawn {
        spawn.env("NATS_URL", &self.nats_url).env("TRELLIS_STREAM_REPLICAS", self.replicas)
    }

    /// The API; the writer registers a few users a second: the global registration limit opened too.
    fn api(&self) -> Spawn {
        self.on_nats(Api::spawn(&self.database_url, &self.prefix)).env("REGISTRATION_RATE_GLOBAL", "1000000")
    }

    fn worker(&self, name: &str) -> Spawn {
        self.on_nats(Spawn::new(name).on(&self.database_url, &self.prefix)).env("ACK_WAIT", ACK_WAIT)
    }
}

/// The system: its NATS, the test's database and prefix, the API and the three workers.
pub struct System {
    pub nats: Nats,
    pub db: TestDb,
    pub topology: Topology,
    /// The test's own connection to NATS (every node's URL), to read streams.
    pub js: jetstream::Context,
    pub api: Api,
    /// The client the writer sends with: the API's, again after it is started again.
    client: Arc<RwLock<Client>>,
    /// The workers, in [`WORKERS`] order.
    pub workers: Vec<Process>,
    pub people: People,
    recipe: Recipe,
    pub report: Report,
    /// Whether a process that runs score runs was killed: a run may have been abandoned.
    killed_runner: bool,
}

/// The users the writer writes as and about.
#[derive(Clone)]
pub struct People {
    /// Requests score runs.
    pub admin: User,
    /// Add each other as contacts and file disputes.
    pub writers: Vec<User>,
    /// The disputes' targets: moderators, whom no rule upholds a dispute against, so that no
    /// decision suspends or hides anyone the writer writes as or about.
    pub targets: Vec<User>,
}

impl System {
    /// The system on a three-node cluster: `NATS_URL` lists the three nodes,
    /// `TRELLIS_STREAM_REPLICAS=3` (the services declare R3 streams, their consumers inherit it).
    pub async fn on_cluster() -> System {
        let cluster = NatsCluster::start().await.expect("starting the three-node cluster");
        let (urls, nats_url) = (cluster.urls(), cluster.nats_url());
        System::start(Nats::Cluster(cluster), urls, nats_url, "3").await
    }

    /// The system on one nats-server of the test's own (which a scenario may kill), R1 streams.
    pub async fn on_single() -> System {
        let nats = PrivateNats::start().expect("starting a nats-server");
        let url = nats.url();
        System::start(Nats::Single(nats), vec![url.clone()], url, "1").await
    }

    /// Starts the API and the workers on `nats`, and registers the [`People`].
    async fn start(nats: Nats, urls: Vec<String>, nats_url: String, replicas: &'static str) -> System {
        let report = Report::new(match nats {
            Nats::Cluster(_) => "3 nodes",
            Nats::Single(_) => "1 node",
        });
        let db = TestDb::migrated().await.expect("a test database");
        let prefix = trellis_testkit::nats_prefix();
        let recipe = Recipe { database_url: db.url.clone(), prefix: prefix.clone(), nats_url, replicas };
        let api = Api::start(recipe.api());
        let workers = WORKERS.map(|(name, _)| recipe.worker(name).ready());
        let (api, workers) = tokio::join!(api, futures::future::join_all(workers));
        let client = async_nats::connect(urls.as_slice()).await.expect("connecting to NATS");
        let mut js = jetstream::new(client);
        // Listing consumers while a node is down waits for the missing node's answer for seconds.
        js.set_timeout(Duration::from_secs(10));
        let topology = Topology::new(&prefix).expect("a valid prefix");
        let people = People::register(&api, &db).await;
        let client = Arc::new(RwLock::new(api.client.clone()));
        System { nats, db, topology, js, api, client, workers, people, recipe, report, killed_runner: false }
    }

    /// The cluster, for the scenarios on one.
    pub fn cluster(&self) -> &NatsCluster {
        match &self.nats {
            Nats::Cluster(cluster) => cluster,
            Nats::Single(_) => panic!("the system runs on one nats-server, not a cluster"),
        }
    }

    pub fn cluster_mut(&mut self) -> &mut NatsCluster {
        match &mut self.nats {
            Nats::Cluster(cluster) => cluster,
            Nats::Single(_) => panic!("the system runs on one nats-server, not a cluster"),
        }
    }

    /// The nats-server, for the scenarios on one.
    pub fn single_nats(&mut self) -> &mut PrivateNats {
        match &mut self.nats {
            Nats::Single(nats) => nats,
            Nats::Cluster(_) => panic!("the system runs on a cluster"),
        }
    }

    /// Kills `trellis-api` with SIGKILL; the writer's requests fail until [`Self::restart_api`].
    pub async fn kill_api(&mut self) {
        self.killed_runner = true;
        self.api.kill().await;
    }

    /// Starts `trellis-api` again (on a new port, which the writer sends to from now on).
    pub async fn restart_api(&mut self) {
        self.api = Api::start(self.recipe.api()).await;
        *self.client.write().expect("the writer's client") = self.api.client.clone();
    }

    /// Kills worker `i` (of [`WORKERS`]) with SIGKILL.
    pub async fn kill_worker(&mut self, i: usize) {
        self.killed_runner |= WORKERS[i].0 == "score-orchestrator";
        self.workers[i].kill().await;
    }

    /// Starts worker `i` again and waits until it is ready.
    pub async fn restart_worker(&mut self, i: usize) {
        self.workers[i] = self.recipe.worker(WORKERS[i].0).ready().await;
    }

    /// Whether node `name` of the cluster is running (the one node of a single server always is).
    fn is_running(&self, name: &str) -> bool {
        match &self.nats {
            Nats::Cluster(cluster) => cluster.is_running(name),
            Nats::Single(_) => true,
        }
    }

    pub fn events(&self) -> String {
        self.topology.events_stream()
    }

    /// The test's four streams.
    pub fn streams(&self) -> [String; 4] {
        let t = &self.topology;
        [t.events_stream(), t.dlq_stream(), t.replay_stream(), t.advisory_stream()]
    }

    async fn stream(&self, stream: &str) -> Result<jetstream::stream::Stream, String> {
        self.js.get_stream(stream).await.map_err(|e| format!("stream {stream}: {e}"))
    }

    /// The node leading `stream`, as a running node reports it.
    pub async fn stream_leader(&self, stream: &str) -> Result<String, String> {
        let s = self.stream(stream).await?;
        leader_of(s.cached_info().cluster.as_ref()).ok_or_else(|| format!("stream {stream} has no leader"))
    }

    async fn consumer_info(&self, stream: &str, consumer: &str) -> Result<consumer::Info, String> {
        let s = self.stream(stream).await?;
        s.consumer_info(consumer).await.map_err(|e| format!("consumer {consumer}: {e}"))
    }

    /// The node leading `consumer` of the events stream.
    pub async fn consumer_leader(&self, consumer: &str) -> Result<String, String> {
        let info = self.consumer_info(&self.events(), consumer).await?;
        leader_of(info.cluster.as_ref()).ok_or_else(|| format!("consumer {consumer} has no leader"))
    }

    /// The leader of `what`, read by `leader`, once there is one.
    pub async fn leader<F, Fut>(&self, what: &str, leader: F) -> String
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<String, String>>,
    {
        eventually_ok(&format!("a leader of {what}"), STEP, leader).await
    }

    /// Waits until `what` (a stream or consumer's leader, read by `leader`) is a running node
    /// other than `gone`; returns it.
    pub async fn new_leader<F, Fut>(&self, what: &str, gone: &str, leader: F) -> String
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<String, String>>,
    {
        eventually_ok(&format!("a leader of {what} other than {gone}"), STEP, || async {
            let now = leader().await?;
            if now == gone || !self.is_running(&now) { Err(format!("{now} is reported")) } else { Ok(now) }
        })
        .await
    }

    /// Waits until JetStream's meta leader and every stream and consumer of the test have a
    /// leader among the running nodes (the cluster works without the nodes that are down).
    pub async fn wait_leaders(&self) {
        eventually_ok("a leader of the cluster and of every stream and consumer", STEP, || async {
            let meta = self.cluster().meta_leader().await.map_err(|e| e.to_string())?;
            let running = |leader: Option<String>, what: &str| match leader {
                Some(l) if self.is_running(&l) => Ok(()),
                other => Err(format!("{what}: leader {other:?}")),
            };
            running(Some(meta), "the meta group")?;
            for stream in self.streams() {
                let s = self.stream(&stream).await?;
                running(leader_of(s.cached_info().cluster.as_ref()), stream.as_str())?;
                for info in consumers(&s).await? {
                    running(leader_of(info.cluster.as_ref()), info.name.as_str())?;
                }
            }
            Ok(())
        })
        .await
    }

    /// Waits until every stream and consumer of the test has a leader and both its other
    /// replicas are current: `restarted`, the node that came back, has caught up, and the next
    /// one may go.
    ///
    /// A node that has not caught up within [`STEP`] is restarted once more (SIGTERM, then
    /// started), as the "NATS node lost" runbook says, and reported on stderr: on 2.10.26, a node
    /// restarted after SIGKILL on a loaded machine now and then rejoins the meta group but never
    /// starts its stream replicas (no contact with their leader for minutes, nothing in its log),
    /// which is the server's to fix, not the system's under test.
    pub async fn wait_replicated(&mut self, restarted: &str) {
        let Err(why) = within_deadline(STEP, || self.replicated()).await else { return };
        eprintln!("{restarted} did not catch up within {STEP:?} ({why}): restarting it once more");
        self.cluster_mut().stop(restarted).await;
        self.cluster_mut().restart(restarted).await.expect("restarting the node once more");
        eventually_ok("every stream and consumer with a leader and two current replicas", STEP, || self.replicated())
            .await
    }

    async fn replicated(&self) -> Result<(), String> {
        for stream in self.streams() {
            let s = self.stream(&stream).await?;
            replicated(&stream, s.cached_info().cluster.as_ref())?;
            for info in consumers(&s).await? {
                replicated(&info.name, info.cluster.as_ref())?;
            }
        }
        Ok(())
    }

    /// Waits until every outbox row committed by now is published: the relay publishes (and
    /// JetStream acknowledges) through whatever the cluster is now.
    pub async fn published_through_now(&self) {
        let newest: i64 = self.scalar("SELECT coalesce(max(seq), 0) FROM ops.outbox").await;
        eventually_ok(&format!("the outbox rows up to seq {newest} to be published"), STEP, || async {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM ops.outbox WHERE published_at IS NULL AND seq <= $1")
                    .bind(newest)
                    .fetch_one(&self.db.pool)
                    .await
                    .map_err(|e| e.to_string())?;
            if left == 0 { Ok(()) } else { Err(format!("{left} unpublished")) }
        })
        .await
    }

    /// Waits until `consumer` of the events stream has delivered a message stored after now
    /// and its ack floor has reached it: its worker consumes (and acknowledges) through the
    /// consumer's current leader.
    pub async fn consumes_past_now(&self, consumer: &str) {
        let events = self.events();
        let now = eventually_ok("the events stream's last sequence", STEP, || async {
            Ok(self.stream(&events).await?.cached_info().state.last_sequence)
        })
        .await;
        eventually_ok(&format!("{consumer} to acknowledge a message stored after sequence {now}"), STEP, || async {
            let info = self.consumer_info(&events, consumer).await?;
            let (delivered, floor) = (info.delivered.stream_sequence, info.ack_floor.stream_sequence);
            if delivered > now && floor >= delivered {
                Ok(())
            } else {
                Err(format!("delivered up to {delivered}, ack floor {floor}"))
            }
        })
        .await
    }

    /// The API's admin `/readyz` once its `status` is `want` (answered with 200).
    pub async fn api_readiness(&self, want: &str) -> Value {
        eventually_ok(&format!("the API's /readyz to say {want}"), STEP, || async {
            let (status, body) = self.api.process.readyz_checks().await.ok_or("/readyz does not answer")?;
            if status == 200 && body["status"] == want { Ok(body) } else { Err(format!("{status} {body}")) }
        })
        .await
    }

    /// Waits until the API's `/readyz` says `degraded` for its `jetstream` check, its
    /// `database` check passing: NATS is away, writes still commit.
    pub async fn wait_degraded_by_jetstream(&self) {
        let report = self.api_readiness("degraded").await;
        let check = |name: &str| {
            let checks = report["checks"].as_array().expect("the checks");
            checks.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no {name} check: {report}")).clone()
        };
        assert_eq!(check("jetstream")["ok"], false, "{report}");
        assert_eq!(check("database")["ok"], true, "{report}");
    }

    /// The consumers worker `i` (of [`WORKERS`]) consumes the events stream with: the dispute
    /// processor's four priority groups, the others' one.
    pub fn consumers_of(&self, i: usize) -> Vec<String> {
        match WORKERS[i].0 {
            "dispute-processor" => (0..4).map(|p| self.topology.name(&format!("dispute-processor-p{p}"))).collect(),
            name => vec![self.topology.name(name)],
        }
    }

    /// Deliveries of worker `i`'s consumers it has not acknowledged yet.
    async fn unacknowledged(&self, i: usize) -> Result<u64, String> {
        let mut total = 0;
        for consumer in self.consumers_of(i) {
            total += self.consumer_info(&self.events(), &consumer).await?.num_ack_pending as u64;
        }
        Ok(total)
    }

    /// Kills worker `i` with SIGKILL mid-batch: when its consumers have deliveries it has not
    /// acknowledged, and still have them once it is dead (a batch that ended between the look
    /// and the kill does not count: the worker is started again and the next batch waited for).
    pub async fn kill_worker_mid_batch(&mut self, i: usize) {
        let deadline = Instant::now() + ACKNOWLEDGED_WITHIN;
        loop {
            assert!(Instant::now() < deadline, "{} was never killed mid-batch", WORKERS[i].0);
            if self.unacknowledged(i).await.unwrap_or(0) == 0 {
                tokio::time::sleep(trellis_testkit::wait::PACE).await;
                continue;
            }
            self.kill_worker(i).await;
            if self.unacknowledged(i).await.expect("reading the consumers") > 0 {
                return;
            }
            self.restart_worker(i).await;
        }
    }

    /// Kills `trellis-api` with SIGKILL mid-batch: when the outbox has committed rows its relay
    /// has not published yet (and still are once it is dead).
    pub async fn kill_api_mid_batch(&mut self) {
        let deadline = Instant::now() + ACKNOWLEDGED_WITHIN;
        loop {
            assert!(Instant::now() < deadline, "trellis-api was never killed mid-batch");
            if self.unpublished().await.is_empty() {
                tokio::time::sleep(trellis_testkit::wait::PACE).await;
                continue;
            }
            self.kill_api().await;
            if !self.unpublished().await.is_empty() {
                return;
            }
            self.restart_api().await;
        }
    }

    /// Ends every database backend of the system's processes (`pg_terminate_backend`): the API's
    /// pools and the workers'; returns the `application_name` of each one ended.
    pub async fn terminate_backends(&self) -> Vec<String> {
        sqlx::query_scalar(
            "WITH victims AS MATERIALIZED (
                 SELECT pid, application_name FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid()
                   AND (application_name LIKE 'trellis-api%'
                        OR application_name IN ('search-projector', 'dispute-processor', 'score-orchestrator')))
             SELECT application_name FROM victims WHERE pg_terminate_backend(pid)",
        )
        .bind(&self.db.name)
        .fetch_all(&self.db.pool)
        .await
        .expect("terminating the system's backends")
    }

    /// Sets cutover flag `flag` to `value` through the API as the admin (`force`: past the
    /// promotion gate, as an operator rolling forward during an incident may).
    pub async fn set_flag(&self, flag: &str, value: &str) {
        let body = json!({"value": value, "reason": "fault scenario: flag flips under load", "force": true});
        let path = format!("/v1/admin/flags/{flag}");
        let answer = self.api.request(Method::PUT, &path, Some(&self.people.admin.token), Some(body)).await;
        assert_eq!(answer.status, 200, "setting {flag} to {value}: {}", answer.body);
    }

    /// The outbox rows not published yet, `(seq, event id)` in outbox order.
    pub async fn unpublished(&self) -> Vec<(i64, Uuid)> {
        sqlx::query_as("SELECT seq, id FROM ops.outbox WHERE published_at IS NULL ORDER BY seq")
            .fetch_all(&self.db.pool)
            .await
            .expect("reading ops.outbox")
    }

    async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.db.pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Waits until the system has settled after `written`: the last score run asked for has
    /// succeeded, no dispute is pending, every outbox row is published, and no consumer of the
    /// test's streams has anything pending or unacknowledged.
    pub async fn settle(&mut self, written: &Written) {
        self.settle_within(written).await;
        self.report.settled = Some(written.stopped_at.elapsed());
    }

    async fn settle_within(&self, written: &Written) {
        eventually_ok("the system to settle", SETTLE, || async {
            let sql = |e: sqlx::Error| e.to_string();
            if let Some(at) = written.last_score_request {
                let served = trellis_store::scores::succeeded_since(&self.db.pool, at).await.map_err(sql)?;
                if !served {
                    return Err(format!("no score run started after {at} has succeeded"));
                }
            }
            let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM security.disputes WHERE status = 'pending'")
                .fetch_one(&self.db.pool)
                .await
                .map_err(sql)?;
            let unpublished: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.outbox WHERE published_at IS NULL")
                .fetch_one(&self.db.pool)
                .await
                .map_err(sql)?;
            if pending > 0 || unpublished > 0 {
                return Err(format!("{pending} disputes pending, {unpublished} outbox rows unpublished"));
            }
            for stream in self.streams() {
                for info in consumers(&self.stream(&stream).await?).await? {
                    if info.num_pending > 0 || info.num_ack_pending > 0 {
                        return Err(format!(
                            "consumer {}: {} pending, {} unacknowledged",
                            info.name, info.num_pending, info.num_ack_pending
                        ));
                    }
                }
            }
            Ok(())
        })
        .await
    }

    /// The invariants every scenario ends with, once the system has settled ([`Self::settle`]);
    /// returns the events stream's messages, in stream order.
    ///
    /// - Every outbox row is published, exactly once: the stream holds as many messages as the
    ///   outbox has rows, their `Nats-Msg-Id`s are distinct and are the outbox's event ids.
    /// - Every consumer of the test's streams has nothing pending or unacknowledged, and its ack
    ///   floor is at the last message on its filter (the stream's last sequence for the search
    ///   projector's `events.>`).
    /// - Every DLQ is empty: nothing was dead-lettered.
    /// - Every dispute is decided exactly once: none is pending, each has one decision record.
    /// - The search read model equals a rebuild from the base tables.
    /// - Every acknowledged write is there, and nothing else: the registered users, the last
    ///   label of each contact, the filed disputes, and a successful score run that started
    ///   after the last run request (and no run failed, but one abandoned by a killed process).
    pub async fn assert_invariants(&mut self, written: &Written) -> Vec<StoredMessage> {
        assert!(self.api.process.alive(), "trellis-api exited; its log: {}", self.api.process.log.display());
        for worker in &mut self.workers {
            assert!(worker.alive(), "{} exited; its log: {}", worker.name, worker.log.display());
        }
        assert!(written.score_requests > 0 && written.writes > written.disputes.len(), "{written:?}");
        self.report.written(written);

        // The outbox and the events stream.
        let outbox: Vec<(i64, Uuid, bool)> =
            sqlx::query_as("SELECT seq, id, published_at IS NOT NULL FROM ops.outbox ORDER BY seq")
                .fetch_all(&self.db.pool)
                .await
                .expect("reading ops.outbox");
        let unpublished: Vec<i64> = outbox.iter().filter(|(_, _, p)| !p).map(|(seq, _, _)| *seq).collect();
        assert!(unpublished.is_empty(), "outbox rows never published: {unpublished:?}");
        let events = self.events();
        let stream = self.stream(&events).await.expect("the events stream");
        let (stored, last) = (stream.cached_info().state.messages, stream.cached_info().state.last_sequence);
        assert_eq!(stored, outbox.len() as u64, "the events stream holds one message per outbox row");
        let reader = StreamReader { js: self.js.clone(), stream: events.clone() };
        let messages = reader
            .wait_for(&self.topology.subject("events.>"), outbox.len(), STEP)
            .await
            .expect("reading the events stream");
        let ids: Vec<String> = messages.iter().map(|m| m.msg_id.clone().expect("a Nats-Msg-Id")).collect();
        let distinct: HashSet<String> = ids.iter().cloned().collect();
        assert_eq!(distinct.len(), ids.len(), "a message id is in the events stream twice");
        let expected: HashSet<String> = outbox.iter().map(|(_, id, _)| id.to_string()).collect();
        assert!(distinct == expected, "the stream's message ids are not the outbox's event ids");

        // The consumers: caught up to the last message on their filter.
        let mut names = BTreeSet::new();
        for stream in self.streams() {
            let s = self.stream(&stream).await.expect("a stream of the test");
            for info in consumers(&s).await.expect("listing consumers") {
                let end = self.last_on(&s, &info.config.filter_subject).await;
                let (name, floor) = (&info.name, info.ack_floor.stream_sequence);
                assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "consumer {name}: pending, unacked");
                assert!(floor >= end, "consumer {name}: ack floor {floor} below the last message on its filter {end}");
                names.insert(info.name.clone());
            }
        }
        let projector = self.consumer_info(&events, &self.topology.name("search-projector")).await.unwrap();
        assert_eq!(projector.ack_floor.stream_sequence, last, "the projector's ack floor");
        for consumer in ["search-projector", "score-orchestrator"]
            .into_iter()
            .map(str::to_owned)
            .chain((0..4).map(|p| format!("dispute-processor-p{p}")))
        {
            assert!(names.contains(&self.topology.name(&consumer)), "no consumer {consumer} among {names:?}");
        }

        // Dead letters: none.
        let dlq = self.stream(&self.topology.dlq_stream()).await.expect("the DLQ stream");
        assert_eq!(dlq.cached_info().state.messages, 0, "dead letters in the DLQ");

        // Disputes: each decided exactly once.
        let disputes: Vec<(Uuid, String, i64)> = sqlx::query_as(
            "SELECT d.id, d.status, (SELECT count(*) FROM security.dispute_decisions x WHERE x.dispute_id = d.id)
             FROM security.disputes d",
        )
        .fetch_all(&self.db.pool)
        .await
        .expect("reading security.disputes");
        for (id, status, decisions) in &disputes {
            assert!(status != "pending" && *decisions == 1, "dispute {id}: {status}, {decisions} decision(s)");
        }
        let decisions = self.scalar("SELECT count(*) FROM security.dispute_decisions").await;
        assert_eq!(decisions, disputes.len() as i64, "a decision of no dispute of the test");
        let filed: BTreeSet<Uuid> = disputes.iter().map(|(id, _, _)| *id).collect();
        assert_eq!(filed, written.disputes.iter().copied().collect(), "the disputes are the acknowledged filings");

        // The search read model.
        let projected = model(&self.db).await;
        assert_eq!(projected, rebuilt_model(&self.db).await, "the projected search model equals a rebuild");

        // Every acknowledged write, and nothing else.
        let users: Vec<String> =
            sqlx::query_scalar("SELECT handle FROM identity.users").fetch_all(&self.db.pool).await.expect("users");
        let users: BTreeSet<String> = users.into_iter().collect();
        let people = &self.people;
        let mut expected: BTreeSet<String> = written.registered.iter().cloned().collect();
        expected.extend(
            std::iter::once(&people.admin).chain(&people.writers).chain(&people.targets).map(|u| u.handle.clone()),
        );
        assert_eq!(users, expected, "the users are the registered ones");
        let contacts: Vec<(Uuid, Uuid, String)> =
            sqlx::query_as("SELECT owner_id, contact_id, label FROM contacts.contacts")
                .fetch_all(&self.db.pool)
                .await
                .expect("contacts");
        let contacts: BTreeMap<(Uuid, Uuid), String> = contacts.into_iter().map(|(o, c, l)| ((o, c), l)).collect();
        assert_eq!(contacts, written.contacts, "each contact has the label of its last acknowledged write");
        // A run whose process was killed is recorded failed (abandoned) by the next lease holder,
        // which serves its request again; no run fails otherwise.
        let failed: Vec<String> =
            sqlx::query_scalar("SELECT coalesce(error, '') FROM score.runs WHERE status = 'failed'")
                .fetch_all(&self.db.pool)
                .await
                .expect("score.runs");
        let abandoned = |e: &String| self.killed_runner && e.starts_with("abandoned:");
        assert!(failed.iter().all(abandoned), "failed score runs: {failed:?}");
        if let Some(at) = written.last_score_request {
            let served = trellis_store::scores::succeeded_since(&self.db.pool, at).await.expect("score.runs");
            assert!(served, "no run started after the last score-run request ({at}) succeeded");
        }
        self.report.events = Some(messages.len());
        self.report.held = true;
        messages
    }

    /// The sequence of the last message of stream `s` on `filter` (0 when there is none).
    async fn last_on(&self, s: &jetstream::stream::Stream, filter: &str) -> u64 {
        let info = s.cached_info();
        if filter.is_empty() || info.config.subjects == [filter] || info.state.messages == 0 {
            return info.state.last_sequence;
        }
        let config = consumer::pull::OrderedConfig {
            filter_subject: filter.to_owned(),
            deliver_policy: consumer::DeliverPolicy::Last,
            ..Default::default()
        };
        let mut last = s.create_consumer(config).await.unwrap_or_else(|e| panic!("reading {filter}: {e}"));
        if last.info().await.unwrap_or_else(|e| panic!("reading {filter}: {e}")).num_pending == 0 {
            return 0;
        }
        let mut messages = last.messages().await.unwrap_or_else(|e| panic!("reading {filter}: {e}"));
        let message = tokio::time::timeout(STEP, messages.next())
            .await
            .unwrap_or_else(|_| panic!("the last message on {filter} did not come"))
            .expect("a message")
            .unwrap_or_else(|e| panic!("reading {filter}: {e}"));
        message.info().expect("a JetStream message").stream_sequence
    }
}

/// Every consumer of stream `s`, with its state.
async fn consumers(s: &jetstream::stream::Stream) -> Result<Vec<consumer::Info>, String> {
    let mut list = s.consumers();
    let mut all = Vec::new();
    while let Some(info) = list.next().await {
        all.push(info.map_err(|e| format!("listing the consumers: {e}"))?);
    }
    Ok(all)
}

fn leader_of(cluster: Option<&ClusterInfo>) -> Option<String> {
    cluster?.leader.clone().filter(|l| !l.is_empty())
}

/// Whether a stream's or consumer's Raft group has a leader and two current replicas.
fn replicated(what: &str, cluster: Option<&ClusterInfo>) -> Result<(), String> {
    let Some(cluster) = cluster else { return Err(format!("{what}: no cluster information")) };
    if leader_of(Some(cluster)).is_none() {
        return Err(format!("{what} has no leader"));
    }
    let current = cluster.replicas.iter().filter(|r| r.current && !r.offline).count();
    if current == 2 { Ok(()) } else { Err(format!("{what}: replicas {:?}", cluster.replicas)) }
}

impl People {
    async fn register(api: &Api, db: &TestDb) -> People {
        let tag = &Uuid::new_v4().simple().to_string()[..6];
        let handles: Vec<String> = std::iter::once(format!("a{tag}"))
            .chain((0..6).map(|i| format!("w{tag}{i}")))
            .chain((0..3).map(|i| format!("m{tag}{i}")))
            .collect();
        let mut users = futures::future::join_all(handles.iter().map(|h| api.register(h))).await.into_iter();
        let admin = users.next().expect("the admin");
        let writers: Vec<User> = users.by_ref().take(6).collect();
        let targets: Vec<User> = users.collect();
        let role = |user: Uuid, role: &'static str| {
            sqlx::query("UPDATE identity.users SET role = $2 WHERE id = $1").bind(user).bind(role).execute(&db.pool)
        };
        role(admin.id, "admin").await.expect("making the admin");
        for target in &targets {
            role(target.id, "moderator").await.expect("making a moderator");
        }
        People { admin, writers, targets }
    }
}

/// Every write the API acknowledged (answered 2xx), and what it took.
#[derive(Debug)]
pub struct Written {
    /// Writes sent.
    pub sent: usize,
    /// Writes acknowledged (each is sent until it is: all but one the writer stopped on).
    pub writes: usize,
    /// Attempts beyond each write's first: the API down, its database connection ended, a
    /// server error.
    pub retries: usize,
    /// The handles registered.
    pub registered: Vec<String>,
    /// Each contact `(owner, contact)` and the label of its last write.
    pub contacts: BTreeMap<(Uuid, Uuid), String>,
    pub disputes: Vec<Uuid>,
    pub score_requests: usize,
    /// When the last score-run request was sent.
    pub last_score_request: Option<OffsetDateTime>,
    /// When the writer stopped.
    pub stopped_at: Instant,
}

impl Default for Written {
    fn default() -> Self {
        Written {
            sent: 0,
            writes: 0,
            retries: 0,
            registered: Vec::new(),
            contacts: BTreeMap::new(),
            disputes: Vec::new(),
            score_requests: 0,
            last_score_request: None,
            stopped_at: Instant::now(),
        }
    }
}

/// A task that writes through the API at a steady pace until stopped: of every 50 writes, 5
/// registrations, 10 dispute filings (the four kinds in turn, so every priority's consumer has
/// work), one score-run request and 34 contact upserts.
///
/// Each write is sent until the API acknowledges it, as a careful client does: again after a
/// failed connection, a 5xx or a 429, with the same `Idempotency-Key` (the signed-in writes),
/// so that a write the API committed but could not answer is answered from its key, not made
/// twice; a registration answered `handle-taken` on a later attempt was made by an earlier one.
/// Any other refusal, or no acknowledgement within [`ACKNOWLEDGED_WITHIN`], stops the writer,
/// and the test fails with it.
pub struct Writer {
    stop: Arc<AtomicBool>,
    acknowledged: Arc<AtomicUsize>,
    failure: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<Written>,
}

impl Writer {
    pub fn start(system: &System) -> Writer {
        let (stop, acknowledged, failure) = (Arc::default(), Arc::default(), Arc::default());
        let task = tokio::spawn(write(
            Arc::clone(&system.client),
            system.people.clone(),
            Arc::clone(&stop),
            Arc::clone(&acknowledged),
            Arc::clone(&failure),
        ));
        Writer { stop, acknowledged, failure, task }
    }

    fn failed(&self) -> Option<String> {
        self.failure.lock().expect("the writer's failure").clone()
    }

    /// Waits until the API has acknowledged `more` writes more than now; panics with the
    /// writer's failure if it stopped on one.
    pub async fn wait_writes(&self, more: usize) {
        let target = self.acknowledged.load(Ordering::Acquire) + more;
        eventually_ok(&format!("{more} more acknowledged writes"), ACKNOWLEDGED_WITHIN, || async {
            if let Some(failure) = self.failed() {
                panic!("the writer stopped: {failure}");
            }
            let now = self.acknowledged.load(Ordering::Acquire);
            if now >= target { Ok(()) } else { Err(format!("{now} of {target}")) }
        })
        .await
    }

    /// Stops writing; returns what the API acknowledged.
    pub async fn stop(self) -> Written {
        self.stop.store(true, Ordering::Release);
        let failure = Arc::clone(&self.failure);
        let mut written = self.task.await.expect("the writer task");
        if let Some(failure) = failure.lock().expect("the writer's failure").take() {
            panic!("the writer stopped: {failure}");
        }
        written.stopped_at = Instant::now();
        written
    }
}

/// One write: what to send, and the statuses that acknowledge it.
struct Write {
    method: Method,
    path: String,
    token: Option<String>,
    body: Option<Value>,
    ok: &'static [u16],
}

async fn write(
    api: Arc<RwLock<Client>>,
    people: People,
    stop: Arc<AtomicBool>,
    acknowledged: Arc<AtomicUsize>,
    failure: Arc<Mutex<Option<String>>>,
) -> Written {
    const KINDS: [&str; 4] = ["harassment", "spam", "incorrect_info", "impersonation"];
    let tag = Uuid::new_v4().simple().to_string()[..6].to_owned();
    let mut written = Written::default();
    let mut pace = tokio::time::interval(WRITE_EVERY);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let writers = &people.writers;
    let mut filed = 0usize;
    for i in 0usize.. {
        pace.tick().await;
        if stop.load(Ordering::Acquire) {
            break;
        }
        written.sent += 1;
        let o = i % writers.len();
        let owner = &writers[o];
        let signed_in = |method, path: String, token: &str, body, ok| Write {
            method,
            path,
            token: Some(token.to_owned()),
            body,
            ok,
        };
        let done = match i % 10 {
            0 => {
                let handle = format!("r{tag}{i}");
                let body = json!({"handle": handle, "display_name": format!("Registered {i}"),
                    "email": format!("{handle}@example.com"), "password": PASSWORD});
                let write =
                    Write { method: Method::POST, path: "/v1/users".into(), token: None, body: Some(body), ok: &[201] };
                send(&api, &write, &mut written).await.map(|_| written.registered.push(handle))
            }
            3 | 7 => {
                let (kind, target) = (KINDS[filed % 4], &people.targets[(filed / 4) % people.targets.len()]);
                filed += 1;
                let body =
                    json!({"target_id": target.id, "kind": kind, "description": format!("{kind} number {filed}")});
                let write = signed_in(Method::POST, "/v1/disputes".into(), &owner.token, Some(body), &[201]);
                send(&api, &write, &mut written).await.map(|body| {
                    written.disputes.push(body["id"].as_str().and_then(|id| id.parse().ok()).expect("a dispute id"));
                })
            }
            5 if (i / 10) % 5 == 0 => {
                let sent = OffsetDateTime::now_utc();
                let write = signed_in(Method::POST, "/v1/admin/score-runs".into(), &people.admin.token, None, &[202]);
                send(&api, &write, &mut written).await.map(|_| {
                    written.score_requests += 1;
                    written.last_score_request = Some(sent);
                })
            }
            _ => {
                let contact = &writers[(o + 1 + (i / 10) % (writers.len() - 1)) % writers.len()];
                let label = format!("l{i}");
                let path = format!("/v1/me/contacts/{}", contact.id);
                let write = signed_in(Method::PUT, path, &owner.token, Some(json!({"label": label})), &[200, 201]);
                send(&api, &write, &mut written).await.map(|_| {
                    written.contacts.insert((owner.id, contact.id), label);
                })
            }
        };
        match done {
            Ok(()) => {
                written.writes += 1;
                acknowledged.fetch_add(1, Ordering::AcqRel);
            }
            Err(e) => {
                *failure.lock().expect("the writer's failure") = Some(format!("write {i}: {e}"));
                break;
            }
        }
    }
    written
}

/// Sends `write` until the API acknowledges it (see [`Writer`]); the acknowledging answer's
/// body (`Null` for a registration an earlier attempt made), or why it was not acknowledged.
async fn send(api: &RwLock<Client>, write: &Write, written: &mut Written) -> Result<Value, String> {
    let key = Uuid::new_v4().to_string();
    let what = format!("{} {}", write.method, write.path);
    let deadline = Instant::now() + ACKNOWLEDGED_WITHIN;
    for attempt in 0usize.. {
        if attempt > 0 {
            written.retries += 1;
            tokio::time::sleep(RETRY_EVERY).await;
        }
        let client = api.read().expect("the writer's client").clone();
        let mut request = client.build(write.method.clone(), &write.path, write.token.as_deref(), write.body.clone());
        if write.token.is_some() {
            request = request.header("Idempotency-Key", &key);
        }
        let why = match client.try_send(request).await {
            Ok(answer) if write.ok.contains(&answer.status) => return Ok(answer.body),
            Ok(answer) if attempt > 0 && answer.problem() == "handle-taken" && write.token.is_none() => {
                return Ok(Value::Null);
            }
            Ok(answer)
                if answer.status >= 500
                    || answer.status == 429
                    || answer.problem() == "idempotency-request-in-progress" =>
            {
                format!("answered {}: {}", answer.status, answer.body)
            }
            Ok(answer) => return Err(format!("{what} answered {}: {}", answer.status, answer.body)),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!("{what} not acknowledged within {ACKNOWLEDGED_WITHIN:?}; the last attempt: {why}"));
        }
    }
    unreachable!("the attempts are unbounded")
}

/// Asserts that `backlog` (outbox rows left unpublished while NATS was away, `(seq, event id)`
/// in outbox order) is in the events stream (`messages`) in the same order: oldest first.
pub fn assert_in_outbox_order(messages: &[StoredMessage], backlog: &[(i64, Uuid)]) {
    let position: std::collections::HashMap<String, u64> =
        messages.iter().map(|m| (m.msg_id.clone().expect("a Nats-Msg-Id"), m.sequence)).collect();
    let sequences: Vec<(i64, u64)> = backlog.iter().map(|(seq, id)| (*seq, position[&id.to_string()])).collect();
    assert!(
        sequences.windows(2).all(|w| w[0].1 < w[1].1),
        "the backlog (outbox seq, stream sequence) is out of order: {sequences:?}"
    );
}

/// A scenario's line of the fault report: what the writer sent and the API acknowledged, the
/// events, the time to settle and whether the invariants held. Appended as one JSON line to the
/// file `TRELLIS_CHAOS_REPORT` names (nothing without it) when the system is dropped, so that a
/// scenario that failed is reported too; `cargo xtask chaos` prints the lines as a table.
#[derive(Debug, Default)]
pub struct Report {
    nats: &'static str,
    sent: Option<usize>,
    writes: Option<usize>,
    retries: Option<usize>,
    events: Option<usize>,
    settled: Option<Duration>,
    held: bool,
}

impl Report {
    fn new(nats: &'static str) -> Report {
        Report { nats, ..Report::default() }
    }

    fn written(&mut self, written: &Written) {
        self.sent = Some(written.sent);
        self.writes = Some(written.writes);
        self.retries = Some(written.retries);
    }
}

impl Drop for System {
    fn drop(&mut self) {
        let Some(path) = std::env::var_os("TRELLIS_CHAOS_REPORT") else { return };
        // The test's thread is named after the test.
        let scenario = std::thread::current().name().unwrap_or("unnamed").to_owned();
        let r = &self.report;
        let line = json!({
            "scenario": scenario,
            "nats": r.nats,
            "sent": r.sent,
            "acknowledged": r.writes,
            "retries": r.retries,
            "events": r.events,
            "settle_ms": r.settled.map(|d| d.as_millis() as u64),
            "held": r.held && !std::thread::panicking(),
        });
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| writeln!(file, "{line}"));
        if let Err(e) = appended {
            eprintln!("writing the fault report to {}: {e}", std::path::Path::new(&path).display());
        }
    }
}
