//! The harness: real `trellis-api` and `search-projector` child processes
//! (`trellis_testkit`), each test on its own database and NATS prefix.

use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;
use trellis_domain::events::Envelope;
use trellis_domain::ids::EventId;
use trellis_domain::score::RunStatus;
use trellis_runtime::consumer::Delivery;
pub use trellis_testkit::eventually;
pub use trellis_testkit::http::{PASSWORD, Response, User};
pub use trellis_testkit::search_model::{ContactRow, DirectoryRow, model, rebuilt_model};
use trellis_testkit::{Process, Spawn, TestDb};
use uuid::Uuid;

/// `trellis-api` as a child process (`trellis_testkit::http::Api`, killed when dropped), with
/// this crate's shortcuts.
pub struct Api(pub trellis_testkit::http::Api);

impl std::ops::Deref for Api {
    type Target = trellis_testkit::http::Api;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Api {
    /// Starts the API on the test's database and prefix with `extra` command-line flags (e.g.
    /// `--search-max-lag 1s`), and waits until its `/readyz` answers 200.
    pub async fn start_with(db: &TestDb, prefix: &str, extra: &[&str]) -> Self {
        Api(trellis_testkit::http::Api::start(trellis_testkit::http::Api::spawn(&db.url, prefix).args(extra)).await)
    }
    pub async fn start(db: &TestDb, prefix: &str) -> Self {
        Self::start_with(db, prefix, &[]).await
    }

    /// Starts the API with the score orchestrator in-process (`score.executor` = `monolith`),
    /// so that score runs happen (at start-up, and on request): what [`random_moderated_history`]
    /// needs.
    pub async fn start_scoring(db: &TestDb, prefix: &str) -> Self {
        use trellis_domain::flags::{Executor, Flag};
        let change = trellis_store::cutover::flags::Change {
            flag: Flag::ScoreExecutor,
            value: Executor::Monolith,
            actor: "projector-tests",
            reason: "score runs in the test's API",
            forced: false,
        };
        trellis_store::cutover::flags::set(&db.pool, &change).await.expect("setting score.executor");
        Self::start(db, prefix).await
    }

    /// A search request (`path` with its query string) as `user`: the `x-search-source`
    /// header and the body. The status must be 200, and the body's `source` must match the
    /// header.
    pub async fn search(&self, path: &str, user: &User) -> (String, Value) {
        let answer = self.request(reqwest::Method::GET, path, Some(&user.token), None).await;
        let header = answer.header("x-search-source").unwrap_or_default().to_owned();
        assert_eq!(answer.status, 200, "GET {path}: {:?}", answer.body);
        assert_eq!(answer.body["source"].as_str(), Some(header.as_str()), "GET {path}: header and body agree");
        (header, answer.body)
    }

    /// The value of `trellis_search_fallbacks_total{endpoint="<endpoint>"}` (0 while absent).
    pub async fn fallbacks(&self, endpoint: &str) -> f64 {
        let series = format!("trellis_search_fallbacks_total{{endpoint=\"{endpoint}\"}}");
        trellis_testkit::metrics::series(&self.metrics().await, &series).unwrap_or(0.0)
    }

    /// A request whose status must be one of `ok`; returns the body.
    pub async fn expect(
        &self,
        method: reqwest::Method,
        path: &str,
        user: &User,
        body: Option<Value>,
        ok: &[u16],
    ) -> Value {
        let Response { status, body: answer, .. } = self.request(method.clone(), path, Some(&user.token), body).await;
        assert!(ok.contains(&status), "{} {method} {path}: {status} {answer:?}", user.handle);
        answer
    }

    pub async fn put_contact(&self, owner: &User, contact: Uuid, label: &str) {
        let path = format!("/v1/me/contacts/{contact}");
        self.expect(reqwest::Method::PUT, &path, owner, Some(json!({"label": label})), &[200, 201]).await;
    }

    pub async fn remove_contact(&self, owner: &User, contact: Uuid) {
        self.expect(reqwest::Method::DELETE, &format!("/v1/me/contacts/{contact}"), owner, None, &[204]).await;
    }

    pub async fn create_circle(&self, owner: &User, name: &str) -> Uuid {
        let body =
            self.expect(reqwest::Method::POST, "/v1/me/circles", owner, Some(json!({"name": name})), &[201]).await;
        body["id"].as_str().expect("a circle id").parse().unwrap()
    }

    pub async fn rename_circle(&self, owner: &User, circle: Uuid, name: &str) {
        let path = format!("/v1/me/circles/{circle}");
        self.expect(reqwest::Method::PATCH, &path, owner, Some(json!({"name": name})), &[200]).await;
    }

    pub async fn delete_circle(&self, owner: &User, circle: Uuid) {
        self.expect(reqwest::Method::DELETE, &format!("/v1/me/circles/{circle}"), owner, None, &[204]).await;
    }

    pub async fn add_member(&self, owner: &User, circle: Uuid, user: Uuid) {
        let path = format!("/v1/me/circles/{circle}/members/{user}");
        self.expect(reqwest::Method::PUT, &path, owner, None, &[200, 201]).await;
    }

    pub async fn remove_member(&self, owner: &User, circle: Uuid, user: Uuid) {
        let path = format!("/v1/me/circles/{circle}/members/{user}");
        self.expect(reqwest::Method::DELETE, &path, owner, None, &[204]).await;
    }

    pub async fn rename_me(&self, user: &User, display_name: &str) {
        self.expect(reqwest::Method::PATCH, "/v1/me", user, Some(json!({"display_name": display_name})), &[200]).await;
    }

    /// Signs `user` in again (a suspension revoked their tokens); returns the user with the new
    /// token.
    pub async fn sign_in(&self, user: &User) -> User {
        let body = json!({"login": user.handle, "password": PASSWORD});
        let Response { status, body, .. } = self.request(reqwest::Method::POST, "/v1/sessions", None, Some(body)).await;
        assert_eq!(status, 201, "signing {} in: {body:?}", user.handle);
        User { token: body["token"].as_str().expect("a token").to_owned(), ..user.clone() }
    }

    /// `admin` reinstates the suspended `user`.
    pub async fn reinstate(&self, admin: &User, user: Uuid) {
        let path = format!("/v1/admin/users/{user}/reinstate");
        self.expect(reqwest::Method::POST, &path, admin, Some(json!({"reason": "wrongly suspended"})), &[200]).await;
    }

    /// `admin` requests a score run; waits until a run that started after the request has
    /// succeeded.
    pub async fn score_run(&self, db: &TestDb, admin: &User) {
        let requested_at = OffsetDateTime::now_utc();
        self.expect(reqwest::Method::POST, "/v1/admin/score-runs", admin, None, &[202]).await;
        eventually("a score run to succeed", Duration::from_secs(60), || async {
            let run = trellis_store::scores::first_run_since(&db.pool, requested_at).await.ok()??;
            assert_ne!(run.status, RunStatus::Failed, "the score run failed: {:?}", run.error);
            (run.status == RunStatus::Succeeded).then_some(())
        })
        .await;
    }

    /// Files a dispute of `kind` against `target` and has `moderator` uphold it.
    pub async fn uphold(&self, reporter: &User, moderator: &User, target: Uuid, kind: &str) {
        let body = json!({"target_id": target.to_string(), "kind": kind, "description": "this is a test dispute"});
        let filed = self.expect(reqwest::Method::POST, "/v1/disputes", reporter, Some(body), &[201]).await;
        let id = filed["id"].as_str().expect("a dispute id");
        let path = format!("/v1/moderation/disputes/{id}/decision");
        let decision = json!({"decision": "upheld", "note": "confirmed"});
        self.expect(reqwest::Method::POST, &path, moderator, Some(decision), &[200]).await;
    }
}

pub async fn make_role(db: &TestDb, user: Uuid, role: &str) {
    let done =
        sqlx::query("UPDATE identity.users SET role = $2 WHERE id = $1").bind(user).bind(role).execute(&db.pool).await;
    assert_eq!(done.unwrap().rows_affected(), 1);
}

/// The handles of a search answer's `items`, sorted.
pub fn hit_handles(body: &Value) -> Vec<String> {
    let mut handles: Vec<String> = body["items"]
        .as_array()
        .expect("search items")
        .iter()
        .map(|i| i["handle"].as_str().expect("a handle").to_owned())
        .collect();
    handles.sort();
    handles
}

/// The handles of `users`, sorted.
pub fn handles_of<'a>(users: impl IntoIterator<Item = &'a User>) -> Vec<String> {
    let mut handles: Vec<String> = users.into_iter().map(|u| u.handle.clone()).collect();
    handles.sort();
    handles
}

/// Waits until the checkpoint's `last_event_at` reaches the newest event in the outbox.
pub async fn checkpoint_reaches_newest_event(db: &TestDb) {
    eventually("the checkpoint to reach the newest outbox event", Duration::from_secs(60), || async {
        let reached: Option<bool> = sqlx::query_scalar(
            "SELECT c.last_event_at >= (SELECT max(created_at) FROM ops.outbox) FROM search.checkpoint c WHERE c.id = 1",
        )
        .fetch_one(&db.pool)
        .await
        .ok()?;
        reached.unwrap_or(false).then_some(())
    })
    .await;
}

/// A delivery of an event of `event_type` with `data`, as the runner hands it to a handler.
pub fn delivery(event_type: &str, data: serde_json::Value, sequence: u64) -> Delivery {
    let envelope = Envelope {
        id: EventId::new(),
        event_type: event_type.into(),
        version: 1,
        occurred_at: OffsetDateTime::now_utc(),
        actor_id: None,
        data,
    };
    Delivery::first(format!("events.{event_type}"), envelope, sequence)
}

/// A `search-projector` child process, killed (SIGKILL) when dropped.
pub struct Replica {
    pub process: Process,
}

impl Replica {
    /// Starts a replica and waits until its `/readyz` answers 200.
    pub async fn start(db: &TestDb, prefix: &str, args: &[&str]) -> Self {
        let process = Spawn::new("search-projector")
            .on(&db.url, prefix)
            .env("CHECKPOINT_AGE_EVERY", "200ms")
            .args(args)
            .ready()
            .await;
        Self { process }
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.process.metrics().await
    }
}

pub async fn directory_row(db: &TestDb, user: Uuid) -> Option<DirectoryRow> {
    sqlx::query_as(
        "SELECT user_id, handle, display_name, verified, score, status, hidden FROM search.directory WHERE user_id = $1",
    )
    .bind(user)
    .fetch_optional(&db.pool)
    .await
    .expect("reading search.directory")
}

pub async fn contact_row(db: &TestDb, owner: Uuid, contact: Uuid) -> Option<ContactRow> {
    sqlx::query_as(
        "SELECT owner_id, contact_id, handle, display_name, label, circles, search_text
         FROM search.contacts WHERE owner_id = $1 AND contact_id = $2",
    )
    .bind(owner)
    .bind(contact)
    .fetch_optional(&db.pool)
    .await
    .expect("reading search.contacts")
}

/// Waits until every outbox row is published and the projector's consumer has nothing
/// pending or unacknowledged: the projector has caught up.
pub async fn caught_up(db: &TestDb, prefix: &str) {
    let client = async_nats::connect(trellis_testkit::nats_url()).await.expect("NATS");
    let js = async_nats::jetstream::new(client);
    let stream = format!("{prefix}_EVENTS");
    let consumer = format!("{prefix}_{}", search_projector::CONSUMER);
    eventually("the projector to catch up", Duration::from_secs(60), || {
        let js = js.clone();
        let (stream, consumer) = (stream.clone(), consumer.clone());
        async move {
            let unpublished: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.outbox WHERE published_at IS NULL")
                .fetch_one(&db.pool)
                .await
                .ok()?;
            if unpublished > 0 {
                return None;
            }
            let mut c: async_nats::jetstream::consumer::PullConsumer =
                js.get_stream(&stream).await.ok()?.get_consumer(&consumer).await.ok()?;
            let info = c.info().await.ok()?;
            (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
        }
    })
    .await;
}

/// A random history of API mutations: `users` registrations, then `steps` contact, circle and
/// profile changes chosen by `seed`. Returns the users.
pub async fn random_history(api: &Api, users: usize, steps: usize, seed: u64) -> Vec<User> {
    history(api, None, users, steps, seed).await.users
}

/// What [`random_moderated_history`] did.
#[derive(Debug)]
pub struct History {
    /// Every user it registered: the random ones, then an admin and a moderator.
    pub users: Vec<User>,
    /// Score runs it requested (after the start-up run, and the last step always is one).
    pub score_runs: usize,
    /// Suspensions of users who had a score from an earlier run.
    pub suspended_with_a_score: usize,
    pub reinstated: usize,
    /// Users suspended at the end.
    pub suspended: usize,
}

/// [`random_history`] with moderation and trust scores among its steps: score runs (the API
/// must run the score orchestrator: [`Api::start_scoring`]), suspensions (a harassment dispute
/// upheld by a moderator) and reinstatements (by an admin), between the contact, circle and
/// profile changes; its last step is a score run, which removes the scores of the users
/// suspended then. An admin and a moderator are registered after the `users`.
pub async fn random_moderated_history(api: &Api, db: &TestDb, users: usize, steps: usize, seed: u64) -> History {
    history(api, Some(db), users, steps, seed).await
}

async fn history(api: &Api, scoring: Option<&TestDb>, users: usize, steps: usize, seed: u64) -> History {
    use std::collections::{BTreeMap, BTreeSet};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    struct Circle {
        id: Uuid,
        members: BTreeSet<usize>,
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let tag = Uuid::new_v4().simple().to_string();
    let mut all = Vec::new();
    for i in 0..users {
        all.push(api.register(&format!("h{}{i}", &tag[..6])).await);
    }
    let staff = match scoring {
        Some(db) => {
            let admin = api.register(&format!("a{}", &tag[..6])).await;
            make_role(db, admin.id, "admin").await;
            let moderator = api.register(&format!("m{}", &tag[..6])).await;
            make_role(db, moderator.id, "moderator").await;
            Some((db, admin, moderator))
        }
        None => None,
    };
    let mut done = History { users: Vec::new(), score_runs: 0, suspended_with_a_score: 0, reinstated: 0, suspended: 0 };
    let mut suspended: BTreeSet<usize> = BTreeSet::new();
    let mut scored = false;
    let mut contacts: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    let mut circles: BTreeMap<usize, Vec<Circle>> = BTreeMap::new();
    let mut names = 0u32;
    let labels = ["", "friend", "work", "family", "gym"];
    let kinds = if staff.is_some() { 12 } else { 9 };
    for _ in 0..steps {
        let o = rng.random_range(0..users);
        let kind = rng.random_range(0..kinds);
        if suspended.contains(&o) && kind < 9 {
            continue; // a suspended user cannot sign in
        }
        let owner = &all[o];
        let theirs = contacts.entry(o).or_default();
        let their_circles = circles.entry(o).or_default();
        match kind {
            0..=2 => {
                let c = rng.random_range(0..users);
                if c != o && !suspended.contains(&c) {
                    api.put_contact(owner, all[c].id, labels[rng.random_range(0..labels.len())]).await;
                    theirs.insert(c);
                }
            }
            3 => {
                if let Some(&c) = theirs.iter().nth(rng.random_range(0..theirs.len().max(1))) {
                    api.remove_contact(owner, all[c].id).await;
                    theirs.remove(&c);
                    for circle in their_circles.iter_mut() {
                        circle.members.remove(&c);
                    }
                }
            }
            4 => {
                names += 1;
                let id = api.create_circle(owner, &format!("Circle {names}")).await;
                their_circles.push(Circle { id, members: BTreeSet::new() });
            }
            5 => {
                if !their_circles.is_empty() {
                    names += 1;
                    let k = rng.random_range(0..their_circles.len());
                    api.rename_circle(owner, their_circles[k].id, &format!("Renamed {names}")).await;
                }
            }
            6 => {
                if !their_circles.is_empty() {
                    let k = rng.random_range(0..their_circles.len());
                    api.delete_circle(owner, their_circles.remove(k).id).await;
                }
            }
            7 => {
                if !their_circles.is_empty() && !theirs.is_empty() {
                    let k = rng.random_range(0..their_circles.len());
                    let c = *theirs.iter().nth(rng.random_range(0..theirs.len())).unwrap();
                    if their_circles[k].members.remove(&c) {
                        api.remove_member(owner, their_circles[k].id, all[c].id).await;
                    } else {
                        api.add_member(owner, their_circles[k].id, all[c].id).await;
                        their_circles[k].members.insert(c);
                    }
                }
            }
            8 => {
                names += 1;
                api.rename_me(owner, &format!("Person {names}")).await;
            }
            _ => {
                let Some((db, admin, moderator)) = &staff else { unreachable!("moderation steps need staff") };
                match kind {
                    9 => {
                        api.score_run(db, admin).await;
                        done.score_runs += 1;
                        scored = true;
                    }
                    10 if !suspended.contains(&o) => {
                        // Reported by the admin (never by a user this history suspends), upheld
                        // by the moderator.
                        api.uphold(admin, moderator, all[o].id, "harassment").await;
                        suspended.insert(o);
                        done.suspended_with_a_score += usize::from(scored);
                    }
                    11 if suspended.contains(&o) => {
                        api.reinstate(admin, all[o].id).await;
                        all[o] = api.sign_in(&all[o]).await;
                        suspended.remove(&o);
                        done.reinstated += 1;
                    }
                    _ => {}
                }
            }
        }
    }
    if let Some((db, admin, moderator)) = staff {
        api.score_run(db, &admin).await;
        done.score_runs += 1;
        all.extend([admin, moderator]);
    }
    done.suspended = suspended.len();
    done.users = all;
    done
}
