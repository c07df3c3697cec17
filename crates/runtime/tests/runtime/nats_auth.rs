//! Logging in to NATS (user and password, token, NKey, `.creds`), TLS (CA, client certificate,
//! server name) and the permissions of `deploy/nats/auth.conf`, each against a nats-server of
//! the test's own. The binaries take the options from the environment, as they are deployed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream;
use base64::Engine as _;
use trellis_runtime::nats::{self, Topology};
use trellis_runtime::nats_options::NatsOptions;
use trellis_testkit::probe::{self, Env};
use trellis_testkit::{PrivateNats, eventually};

/// `trellisctl dlq stats` on `url` with the NATS environment `env`: success, and what it printed.
async fn dlq_stats(url: &str, env: &[(&str, &str)]) -> (bool, String) {
    // A database of its own: the dead letters' parked set is read there.
    let db = trellis_testkit::TestDb::migrated().await.expect("a test database");
    let out = tokio::process::Command::new(trellis_testkit::process::binary("trellisctl"))
        .args(["--nats-prefix", "", "dlq", "stats"])
        .env("DATABASE_URL", &db.url)
        .env("NATS_URL", url)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("running trellisctl");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Declares the streams (no prefix) with `options`, as a process's host does.
async fn declare(options: &NatsOptions) -> jetstream::Context {
    let client = nats::connect_once(options, "tests", Duration::from_secs(5)).await.expect("connecting");
    let js = nats::jetstream(client, Duration::from_secs(5));
    nats::ensure_streams(&js, &Topology::new("").unwrap()).await.expect("declaring the streams");
    js
}

fn options(url: &str, set: impl FnOnce(&mut NatsOptions)) -> NatsOptions {
    let mut options = NatsOptions::from_url(url);
    set(&mut options);
    options
}

#[tokio::test]
async fn a_user_and_password_or_an_nkey_logs_in_and_a_wrong_password_is_refused_unquoted() {
    let user = nkeys::KeyPair::new_user();
    let config = format!(
        "authorization {{ users = [ {{ user: alice, password: $ALICE_PASSWORD }}, {{ nkey: {} }} ] }}",
        user.public_key()
    );
    let server = PrivateNats::configured(&config, &[("ALICE_PASSWORD", "alice-pw-31")], |_| Ok(())).unwrap();
    let url = format!("nats://127.0.0.1:{}", server.port);
    declare(&options(&url, |o| {
        o.user = Some("alice".into());
        o.password = Some("alice-pw-31".parse().unwrap());
    }))
    .await;

    let (ok, out) = dlq_stats(&url, &[("NATS_USER", "alice"), ("NATS_PASSWORD", "alice-pw-31")]).await;
    assert!(ok, "{out}");
    let (ok, out) = dlq_stats(&url, &[("NATS_USER", "alice"), ("NATS_PASSWORD", "wrong-pw-77")]).await;
    assert!(!ok && out.contains("authorization violation") && !out.contains("wrong-pw-77"), "{out}");
    // The URL's credentials keep working.
    let (ok, out) = dlq_stats(&server.url_as("alice", "alice-pw-31"), &[]).await;
    assert!(ok, "{out}");
    // Two ways at once is a clear error, before any connection.
    let (ok, out) = dlq_stats(&server.url_as("alice", "alice-pw-31"), &[("NATS_TOKEN", "tok-5")]).await;
    assert!(!ok && out.contains("conflicting NATS credentials") && !out.contains("tok-5"), "{out}");

    let seed_file = server.dir().join("user.nk");
    std::fs::write(&seed_file, format!("{}\n", user.seed().unwrap())).unwrap();
    let (ok, out) = dlq_stats(&url, &[("NATS_NKEY", seed_file.to_str().unwrap())]).await;
    assert!(ok, "{out}");
    let other = server.dir().join("other.nk");
    std::fs::write(&other, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let (ok, out) = dlq_stats(&url, &[("NATS_NKEY", other.to_str().unwrap())]).await;
    assert!(!ok && out.contains("authorization violation"), "{out}");
    let (ok, out) = dlq_stats(&url, &[("NATS_NKEY", "/nonexistent/user.nk")]).await;
    assert!(!ok && out.contains("cannot read NATS_NKEY /nonexistent/user.nk"), "{out}");
}

#[tokio::test]
async fn a_token_logs_in() {
    let server =
        PrivateNats::configured("authorization { token: $TOKEN }", &[("TOKEN", "s3cret-token-42")], |_| Ok(()))
            .unwrap();
    let url = format!("nats://127.0.0.1:{}", server.port);
    declare(&options(&url, |o| o.token = Some("s3cret-token-42".parse().unwrap()))).await;
    let (ok, out) = dlq_stats(&url, &[("NATS_TOKEN", "s3cret-token-42")]).await;
    assert!(ok, "{out}");
    let (ok, out) = dlq_stats(&url, &[("NATS_TOKEN", "not-the-token")]).await;
    assert!(!ok && out.contains("authorization violation") && !out.contains("not-the-token"), "{out}");
}

/// A JWT (`ed25519-nkey`) of `claims`, signed by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
        "iat": time::OffsetDateTime::now_utc().unix_timestamp(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let payload = b64.encode(serde_json::to_vec(&claims).unwrap());
    let signature = issuer.sign(format!("{header}.{payload}").as_bytes()).unwrap();
    format!("{header}.{payload}.{}", b64.encode(signature))
}

#[tokio::test]
async fn a_creds_file_logs_in_with_decentralised_authentication() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt =
        jwt(&operator, &operator.public_key(), "trellis-tests", serde_json::json!({"type": "operator", "version": 2}));
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true, "conn": -1,
        "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "TRELLIS",
        serde_json::json!({"limits": unlimited, "type": "account", "version": 2}),
    );
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        "trellisctl",
        serde_json::json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}),
    );
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(&operator, &system.public_key(), "SYS", serde_json::json!({"type": "account", "version": 2}));
    let config = format!(
        "operator: {operator_jwt}\nsystem_account: {sys}\nresolver: MEMORY\n\
         resolver_preload: {{ {sys}: {system_jwt}, {}: {account_jwt} }}\n",
        account.public_key(),
        sys = system.public_key(),
    );
    let server = PrivateNats::configured(&config, &[], |_| Ok(())).unwrap();
    let url = format!("nats://127.0.0.1:{}", server.port);
    let creds = server.dir().join("trellisctl.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    )
    .unwrap();
    declare(&options(&url, |o| o.creds = Some(creds.clone()))).await;
    let (ok, out) = dlq_stats(&url, &[("NATS_CREDS", creds.to_str().unwrap())]).await;
    assert!(ok, "{out}");
    let (ok, out) = dlq_stats(&url, &[]).await;
    assert!(!ok && out.contains("authorization violation"), "without credentials: {out}");
    let not_creds = server.dir().join("not.creds");
    std::fs::write(&not_creds, "just some text\n").unwrap();
    let (ok, out) = dlq_stats(&url, &[("NATS_CREDS", not_creds.to_str().unwrap())]).await;
    assert!(!ok && out.contains("NATS_CREDS") && out.contains("not a NATS credentials file"), "{out}");
}

/// A CA, a server certificate for `nats.test` and client certificates, by the script the
/// compose stack's certificates are made with.
fn certificates(dir: &Path) -> anyhow::Result<()> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nats/gen-certs.sh");
    let out = std::process::Command::new("sh").arg(script).arg(dir).arg("nats.test").output()?;
    anyhow::ensure!(out.status.success(), "gen-certs.sh: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[tokio::test]
async fn tls_needs_the_ca_a_client_certificate_and_the_servers_name() {
    let config = "tls { cert_file: \"server.pem\", key_file: \"server-key.pem\", ca_file: \"ca.pem\", verify: true }";
    let server = PrivateNats::configured(config, &[], certificates).unwrap();
    let url = format!("nats://127.0.0.1:{}", server.port);
    let file = |name: &str| server.dir().join(name).to_str().unwrap().to_owned();
    let (ca, cert, key) = (file("ca.pem"), file("trellisctl.pem"), file("trellisctl-key.pem"));
    let full =
        [("NATS_CA", ca.as_str()), ("NATS_CERT", &cert), ("NATS_KEY", &key), ("NATS_TLS_SERVER_NAME", "nats.test")];
    let js = declare(&options(&url, |o| {
        o.ca = Some(ca.clone().into());
        o.cert = Some(cert.clone().into());
        o.key = Some(key.clone().into());
        o.tls_server_name = Some("nats.test".into());
    }))
    .await;

    let (ok, out) = dlq_stats(&url, &full).await;
    assert!(ok, "{out}");
    let (ok, out) = dlq_stats(&url, &full[1..]).await;
    assert!(!ok && out.contains("invalid peer certificate: UnknownIssuer"), "without NATS_CA: {out}");
    let (ok, out) = dlq_stats(&url, &[full[0], full[3]]).await;
    assert!(!ok && out.contains("connecting to NATS"), "without a client certificate: {out}");
    let (ok, out) = dlq_stats(&url, &full[..3]).await;
    assert!(!ok && out.contains("certificate not valid for name"), "without the server name: {out}");
    let (ok, out) = dlq_stats(&url, &[full[0], full[1], full[3]]).await;
    assert!(!ok && out.contains("NATS_CERT") && out.contains("without NATS_KEY"), "{out}");
    let (ok, out) = dlq_stats(&url, &[("NATS_CA", "/nonexistent/ca.pem")]).await;
    assert!(!ok && out.contains("cannot read NATS_CA /nonexistent/ca.pem"), "{out}");

    // A worker connects with the same options and does its job.
    let db = trellis_testkit::TestDb::migrated().await.unwrap();
    let (worker_cert, worker_key) = (file("search-projector.pem"), file("search-projector-key.pem"));
    let _worker = probe::worker(&db.url, &url, "", &[])
        .envs([full[0], ("NATS_CERT", &worker_cert), ("NATS_KEY", &worker_key), full[3]])
        .ready()
        .await;
    let (id, _) = probe::publish(&js, "", "ok").await;
    eventually("the worker to handle the event", Duration::from_secs(10), || async {
        probe::records_in(&db, probe::RECORDS).await.iter().any(|r| r.event_id == id).then_some(())
    })
    .await;
}

#[tokio::test]
async fn each_process_may_do_its_job_and_nothing_else() {
    let server = PrivateNats::deployed().unwrap();
    let url = format!("nats://127.0.0.1:{}", server.port);
    // trellisctl, the operator, declares the streams and reads everything.
    let env = Env::on_prefixed(&server.url_as("trellisctl", "ctl-nats-pw"), "").await;
    let as_user = |user: &str, password: &str| {
        options(&url, |o| {
            o.user = Some(user.into());
            o.password = Some(password.parse().unwrap());
        })
    };
    let short = Duration::from_secs(1);

    // The API declares and verifies the streams, and its relay publishes events.
    let api = declare(&as_user("trellis-api", "api-nats-pw")).await;
    let (subject, headers, payload) = probe::event("", uuid::Uuid::now_v7(), "ok");
    let ack = api.publish_with_headers(subject, headers, payload).await.unwrap().await.expect("the API publishes");
    assert_eq!(ack.stream, "EVENTS");

    // A worker binds its own consumer, consumes and acks, with its own credentials.
    let worker = probe::worker(&env.db.url, &url, "", &[])
        .env("NATS_USER", "search-projector")
        .env("NATS_PASSWORD", "projector-nats-pw")
        .env("PROBE_CONSUMER", "search-projector")
        .ready()
        .await;
    let (id, _) = env.publish("ok").await;
    env.wait_for_record(id, Duration::from_secs(10)).await;
    env.wait_until_settled("EVENTS", "search-projector", Duration::from_secs(10)).await;

    // The API may look at a consumer group (the console's overview), but neither pull from one
    // nor make one.
    let api_client = nats::connect_once(&as_user("trellis-api", "api-nats-pw"), "api", short).await.unwrap();
    let api = nats::jetstream(api_client.clone(), short);
    let events = api.get_stream("EVENTS").await.expect("the API may look at the stream");
    assert!(events.get_consumer::<jetstream::consumer::pull::Config>("search-projector").await.is_ok());
    let consumer = jetstream::consumer::pull::Config { durable_name: Some("api-reader".into()), ..Default::default() };
    assert!(events.create_consumer(consumer).await.is_err(), "the API made a consumer");
    // A pull that may be made is answered at once (`no_wait`), with a message or "no messages".
    let next = async_nats::Request::new().payload(r#"{"batch":1,"no_wait":true}"#.into()).timeout(Some(short));
    let pulled = api_client.send_request("$JS.API.CONSUMER.MSG.NEXT.EVENTS.search-projector", next).await;
    assert!(pulled.is_err(), "the API pulled from a worker's consumer: {pulled:?}");

    // The console's dead-letter work, as the API: read the DLQ, replay one, purge another.
    let topology = Topology::new("").unwrap();
    let now = time::OffsetDateTime::now_utc();
    for seq in [1, 2] {
        let letter = trellis_runtime::dlq::DeadLetter {
            consumer: "search-projector",
            original_subject: "events.probe.synthetic",
            stream: "EVENTS",
            stream_sequence: seq,
            deliveries: 1,
            kind: trellis_runtime::dlq::ErrorKind::Permanent,
            error: "bad",
            first_failure: now,
            host: "test",
            version: "test",
            now,
            trace: None,
        };
        trellis_runtime::dlq::publish(&env.js, &topology, &letter, None, "{}".into()).await.unwrap();
    }
    let letters = trellis_runtime::dlq::read(&api, &topology, None, 1).await.expect("the API reads the DLQ");
    assert_eq!(letters.len(), 2);
    let replayed = trellis_runtime::dlq::publish_replays(&api, &topology, &letters[..1], "audit").await;
    assert!(replayed[0].is_ok(), "the API replays: {replayed:?}");
    assert!(trellis_runtime::dlq::get(&api, &topology, letters[1].sequence).await.is_ok());
    for removed in trellis_runtime::dlq::remove(&api, &topology, &[letters[0].sequence]).await {
        removed.expect("the API removes a replayed dead letter");
    }
    trellis_runtime::dlq::remove_through(&api, &topology, "search-projector", letters[1].sequence)
        .await
        .expect("the API purges through a sequence");
    // Both are gone (the worker, given the replay it cannot handle, may dead-letter it anew).
    let left = trellis_runtime::dlq::read(&api, &topology, None, 1).await.unwrap();
    assert!(
        left.iter().all(|e| e.sequence > letters[1].sequence),
        "{:?}",
        left.iter().map(|e| e.sequence).collect::<Vec<_>>()
    );

    // A worker cannot publish an event, nor delete a stream, nor read another worker's consumer.
    let worker_client =
        nats::connect_once(&as_user("search-projector", "projector-nats-pw"), "w", short).await.unwrap();
    let worker_js = nats::jetstream(worker_client, short);
    let before = env.js.get_stream("EVENTS").await.unwrap().info().await.unwrap().state.messages;
    let (subject, headers, payload) = probe::event("", uuid::Uuid::now_v7(), "ok");
    let published = match worker_js.publish_with_headers(subject, headers, payload).await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    assert!(!published, "a worker published an event");
    assert!(worker_js.delete_stream("EVENTS").await.is_err(), "a worker deleted a stream");
    let events = worker_js.get_stream("EVENTS").await.unwrap();
    assert!(events.get_consumer::<jetstream::consumer::pull::Config>("score-orchestrator").await.is_err());
    let after =
        env.js.get_stream("EVENTS").await.expect("the stream is still there").info().await.unwrap().state.messages;
    assert_eq!(before, after, "the stream holds what it held");
    drop(worker);
}

#[tokio::test]
async fn a_worker_with_a_missing_creds_file_or_two_ways_of_logging_in_exits_naming_the_option() {
    let db = trellis_testkit::TestDb::migrated().await.unwrap();
    let url = trellis_testkit::nats_url();
    let mut missing = probe::worker(&db.url, &url, "", &[]).env("NATS_CREDS", "/nonexistent/worker.creds").spawn();
    assert_eq!(missing.wait_exit(Duration::from_secs(10)).await, Some(1), "{}", missing.log_text());
    assert!(missing.log_text().contains("cannot read NATS_CREDS /nonexistent/worker.creds"), "{}", missing.log_text());

    let with_password = url.replace("nats://", "nats://someone:url-pw-93@");
    let mut both = probe::worker(&db.url, &with_password, "", &[]).env("NATS_TOKEN", "token-pw-94").spawn();
    assert_eq!(both.wait_exit(Duration::from_secs(10)).await, Some(1), "{}", both.log_text());
    let log = both.log_text();
    assert!(log.contains("conflicting NATS credentials"), "{log}");
    assert!(!log.contains("url-pw-93") && !log.contains("token-pw-94"), "{log}");
}
