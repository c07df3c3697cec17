//! The real binaries under `deploy/nats/auth.conf`: each worker, logged in as its own NATS user,
//! binds every consumer it uses (its groups are ready only once bound); `trellis-api` runs as
//! `trellis-api` once every flag says `worker`, and as `trellis-api-monolith` while the flags say
//! `monolith` (its in-process processors bind the workers' consumers).

use trellis_domain::flags::{Executor, Flag};
use trellis_testkit::{DEPLOYED_NATS_PASSWORDS, PrivateNats, TestDb};

use crate::harness::start;

fn password(user: &str) -> String {
    let variable = format!("{}_NATS_PASSWORD", user.to_ascii_uppercase().replace('-', "_"));
    let variable = if variable.starts_with("TRELLIS") { variable } else { format!("TRELLIS_{variable}") };
    let (_, password) = DEPLOYED_NATS_PASSWORDS.iter().find(|(v, _)| *v == variable).expect("a deployed user");
    (*password).to_owned()
}

async fn set_every_flag(db: &TestDb, value: Executor) {
    for flag in Flag::ALL {
        let change = trellis_store::cutover::flags::Change {
            flag,
            value,
            actor: "test",
            reason: "NATS permissions",
            forced: false,
        };
        trellis_store::cutover::flags::set(&db.pool, &change).await.expect("setting the flag");
    }
}

fn as_user(nats: &PrivateNats, user: &str) -> Vec<(&'static str, String)> {
    vec![("NATS_URL", nats.url()), ("NATS_USER", user.to_owned()), ("NATS_PASSWORD", password(user))]
}

#[tokio::test]
async fn every_binary_does_its_job_with_its_own_nats_user() {
    let nats = PrivateNats::deployed().unwrap();
    let db = TestDb::migrated().await.unwrap();

    // Stage B's start: the API runs every processor in-process.
    set_every_flag(&db, Executor::Monolith).await;
    let monolith = start("trellis-api", &db, "", &as_user(&nats, "trellis-api-monolith")).await;
    drop(monolith);

    // Every processor in its worker: each worker binds its own consumers; the API only publishes.
    set_every_flag(&db, Executor::Worker).await;
    let mut running = Vec::new();
    for worker in ["search-projector", "score-orchestrator", "dispute-processor"] {
        running.push(start(worker, &db, "", &as_user(&nats, worker)).await);
    }
    running.push(start("trellis-api", &db, "", &as_user(&nats, "trellis-api")).await);

    let operator = trellis_testkit::probe::connect(&nats.url_as("trellisctl", &password("trellisctl"))).await;
    let events = operator.get_stream("EVENTS").await.expect("the streams are declared");
    let consumers = ["search-projector", "score-orchestrator", "dispute-processor-p0", "dispute-processor-p3"];
    trellis_testkit::eventually("every worker's consumers", std::time::Duration::from_secs(20), || async {
        for consumer in consumers {
            events.get_consumer::<async_nats::jetstream::consumer::pull::Config>(consumer).await.ok()?;
        }
        Some(())
    })
    .await;
}
