//! What the validators cannot know about `deploy/k8s` and `deploy/compose.yaml`: scaling on
//! the consumers the workers really use, grace periods longer than the drain, probes, resources,
//! and no secret in the repository. (Schemas: `cargo xtask deploy`.)

use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::harness::{compose_file, read, repo_root};

/// Every document of every YAML file of the kustomize base.
fn base() -> Vec<Value> {
    let mut docs = Vec::new();
    let dir = repo_root().join("deploy/k8s/base");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for file in files.into_iter().filter(|f| f.extension().is_some_and(|e| e == "yaml")) {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if !value.is_null() {
                docs.push(value);
            }
        }
    }
    docs
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/k8s/base"))
}

/// The Secret and key a container's `DATABASE_URL` comes from.
fn database_url_secret(container: &Value) -> (String, String) {
    let env = container["env"].as_sequence().expect("env");
    let url = env.iter().find(|e| e["name"] == "DATABASE_URL").expect("a DATABASE_URL");
    let reference = &url["valueFrom"]["secretKeyRef"];
    (reference["name"].as_str().unwrap().to_owned(), reference["key"].as_str().unwrap().to_owned())
}

/// `compose.yaml` with its `<<` merge keys applied, as docker-compose reads it.
pub fn compose() -> Value {
    compose_file("deploy/compose.yaml")
}

fn shutdown_grace(docs: &[Value]) -> Duration {
    let grace = named(docs, "ConfigMap", "trellis-config")["data"]["SHUTDOWN_GRACE"].as_str().expect("SHUTDOWN_GRACE");
    humantime::parse_duration(grace).unwrap()
}

const WORKERS: [&str; 3] = ["score-orchestrator", "search-projector", "dispute-processor"];

#[test]
fn every_deployment_drains_within_its_grace_period_and_has_probes_and_resources() {
    let docs = base();
    let grace = shutdown_grace(&docs);
    let deployments = of_kind(&docs, "Deployment");
    assert_eq!(deployments.len(), 4, "the API and the three workers");
    for d in deployments {
        let name = d["metadata"]["name"].as_str().unwrap();
        let spec = &d["spec"]["template"]["spec"];
        let termination = spec["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
        assert!(Duration::from_secs(termination) > grace, "{name}: {termination}s is not longer than SHUTDOWN_GRACE");
        let container = &spec["containers"][0];
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz", "{name}");
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz", "{name}");
        for bound in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(!container["resources"][bound][resource].is_null(), "{name}: no {bound}.{resource}");
            }
        }
        assert_eq!(
            database_url_secret(container).0,
            "trellis-secrets",
            "{name}: the database URL from the Secret, by reference"
        );
        assert!(
            of_kind(&docs, "PodDisruptionBudget").iter().any(|p| p["metadata"]["name"] == name),
            "{name} has no PodDisruptionBudget"
        );
    }
}

#[test]
fn each_worker_scales_on_its_own_consumer_and_the_api_on_cpu() {
    let docs = base();
    let consumers = |name: &str| -> Vec<String> {
        let scaled = named(&docs, "ScaledObject", name);
        assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], name);
        scaled["spec"]["triggers"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|t| {
                assert_eq!(t["type"], "nats-jetstream");
                assert!(t["metadata"]["lagThreshold"].as_str().is_some(), "{name}: a lag threshold");
                t["metadata"]["consumer"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    assert_eq!(consumers("search-projector"), [search_projector::CONSUMER]);
    assert_eq!(consumers("score-orchestrator"), [score_orchestrator::CONSUMER]);
    assert_eq!(consumers("dispute-processor"), ["dispute-processor-p0", "dispute-processor-p1"]);
    let orchestrator = &named(&docs, "ScaledObject", "score-orchestrator")["spec"];
    assert_eq!(
        (orchestrator["minReplicaCount"].as_u64(), orchestrator["maxReplicaCount"].as_u64()),
        (Some(1), Some(2))
    );
    for worker in WORKERS {
        assert!(named(&docs, "Deployment", worker)["spec"]["replicas"].is_null(), "{worker}: KEDA owns the replicas");
    }
    let hpa = named(&docs, "HorizontalPodAutoscaler", "trellis-api");
    assert_eq!(hpa["spec"]["metrics"][0]["resource"]["name"], "cpu");
    let job = named(&docs, "Job", "trellis-migrate");
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["command"],
        serde_yaml_ng::to_value(["trellisctl", "migrate", "up"]).unwrap()
    );
}

#[test]
fn only_the_api_port_is_open_beyond_prometheus_scrapes_of_the_admin_port() {
    let docs = base();
    let policies = of_kind(&docs, "NetworkPolicy");
    let deny = named(&docs, "NetworkPolicy", "trellis-default-deny-ingress");
    assert!(deny["spec"]["ingress"].is_null(), "the default policy allows nothing");
    for policy in policies {
        for rule in policy["spec"]["ingress"].as_sequence().into_iter().flatten() {
            let target = &policy["spec"]["podSelector"]["matchLabels"];
            let ports: Vec<&Value> = rule["ports"].as_sequence().expect("every rule names its ports").iter().collect();
            if rule["from"].is_null() {
                assert_eq!(target["app.kubernetes.io/name"], "trellis-api", "only the API is open to all");
                assert_eq!(ports.len(), 1);
                assert_eq!(ports[0]["port"], "http");
            } else {
                assert!(ports.iter().all(|p| p["port"] == 9080), "sources other than all reach only the admin port");
                assert_eq!(rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"], "prometheus");
            }
        }
    }
}

#[test]
fn no_secret_value_is_in_the_repository() {
    let docs = base();
    assert!(of_kind(&docs, "Secret").is_empty(), "Secrets are created in the cluster, not kept here");
    for doc in &docs {
        let text = serde_yaml_ng::to_string(doc).unwrap();
        assert!(
            !text.contains("postgres://"),
            "a connection URL in {}",
            doc["metadata"]["name"].as_str().unwrap_or("?")
        );
    }
    let compose = read("deploy/compose.yaml");
    assert!(compose.contains("${POSTGRES_PASSWORD:?"), "compose requires the password from the environment");
    for url in compose.lines().filter(|l| l.contains("postgres://")) {
        assert!(url.contains(":${"), "a database password in compose.yaml: {url}");
    }
}

#[test]
fn compose_runs_every_service_health_gated_with_the_drain_grace() {
    let compose = compose();
    let services = compose["services"].as_mapping().unwrap();
    for name in ["postgres", "nats", "migrate", "trellis-api", "prometheus", "grafana"].iter().chain(&WORKERS) {
        assert!(services.contains_key(*name), "no {name} service");
    }
    let grace =
        humantime::parse_duration(compose["x-trellis"]["environment"]["SHUTDOWN_GRACE"].as_str().unwrap()).unwrap();
    let stop = humantime::parse_duration(compose["x-trellis"]["stop_grace_period"].as_str().unwrap()).unwrap();
    assert!(stop > grace, "stop_grace_period must exceed SHUTDOWN_GRACE");
    assert_eq!(
        compose["services"]["trellis-api"]["depends_on"]["migrate"]["condition"],
        "service_completed_successfully"
    );
    for worker in WORKERS {
        assert_eq!(
            compose["services"][worker]["depends_on"]["trellis-api"]["condition"], "service_healthy",
            "{worker}"
        );
    }
    let nats = read("deploy/nats/nats.conf");
    assert!(nats.contains("sync_interval: always"), "JetStream fsyncs every acknowledged write");
}

/// The login of a `postgres://user:password@host/db` URL.
fn url_user(url: &str) -> &str {
    let authority = url.split_once("://").unwrap().1.split('/').next().unwrap();
    authority.rsplit_once('@').map(|(userinfo, _)| userinfo.split(':').next().unwrap()).unwrap_or("")
}

#[test]
fn each_process_logs_in_as_its_own_database_role_and_none_as_the_superuser() {
    use trellis_store::roles;
    let expected = [
        ("migrate", roles::OWNER),
        ("trellis-api", roles::API),
        ("score-orchestrator", roles::SCORE_ORCHESTRATOR),
        ("search-projector", roles::SEARCH_PROJECTOR),
        ("dispute-processor", roles::DISPUTE_PROCESSOR),
    ];
    let compose = compose();
    for (service, role) in expected {
        let url = compose["services"][service]["environment"]["DATABASE_URL"].as_str().expect(service);
        assert_eq!(url_user(url), role, "compose {service}");
    }
    let postgres = &compose["services"]["postgres"];
    let init: Vec<&str> = postgres["volumes"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(
        init.iter().any(|v| v.starts_with("../crates/store/sql/roles.sql:/docker-entrypoint-initdb.d/")),
        "compose's PostgreSQL creates the roles with the one roles script: {init:?}"
    );

    let docs = base();
    let key_of = |kind: &str, name: &str| {
        database_url_secret(&named(&docs, kind, name)["spec"]["template"]["spec"]["containers"][0]).1
    };
    let keys = [
        key_of("Job", "trellis-migrate"),
        key_of("Deployment", "trellis-api"),
        key_of("Deployment", "score-orchestrator"),
        key_of("Deployment", "search-projector"),
        key_of("Deployment", "dispute-processor"),
    ];
    let distinct: std::collections::BTreeSet<&String> = keys.iter().collect();
    assert_eq!(distinct.len(), keys.len(), "one database login per process: {keys:?}");
    let kustomization = read("deploy/k8s/base/kustomization.yaml");
    for ((_, role), key) in expected.iter().zip(&keys) {
        assert!(
            kustomization.contains(&format!("{key}='postgres://{role}:")),
            "the kustomization documents {key} as a URL of {role}"
        );
    }
}

#[test]
fn compose_containers_are_read_only_without_capabilities_and_monitoring_listens_on_loopback() {
    let compose = compose();
    for (name, service) in compose["services"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        assert_eq!(service["read_only"], true, "{name}: a read-only root filesystem");
        assert_eq!(service["cap_drop"], serde_yaml_ng::to_value(["ALL"]).unwrap(), "{name}: every capability dropped");
        assert!(
            service["security_opt"].as_sequence().is_some_and(|o| o.iter().any(|o| o == "no-new-privileges:true")),
            "{name}: no-new-privileges"
        );
        assert_ne!(service["user"], "root", "{name}");
        assert_ne!(service["user"], "0", "{name}");
        for port in service["ports"].as_sequence().into_iter().flatten() {
            let port = port.as_str().unwrap();
            if name != "trellis-api" {
                assert!(port.starts_with("127.0.0.1:"), "{name} publishes {port} beyond the host's loopback");
            }
        }
    }
    for name in ["prometheus", "grafana"] {
        assert!(!compose["services"][name]["ports"].as_sequence().unwrap().is_empty(), "{name} is published");
    }
}

/// `image[:tag]@sha256:<64 hex>`.
pub fn pinned_by_digest(image: &str) -> bool {
    image.split_once("@sha256:").is_some_and(|(name, digest)| {
        !name.is_empty()
            && digest.len() == 64
            && digest.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    })
}

#[test]
fn every_third_party_image_is_pinned_by_digest() {
    let dockerfile = read("Dockerfile");
    let mut references: Vec<(String, String)> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .map(|l| ("Dockerfile FROM".to_owned(), l.split_whitespace().next().unwrap().to_owned()))
        .collect();
    assert_eq!(references.len(), 2, "the build and runtime stages");
    let syntax = dockerfile.lines().next().and_then(|l| l.strip_prefix("# syntax=")).expect("a pinned frontend");
    references.push(("Dockerfile syntax".to_owned(), syntax.to_owned()));
    let compose = compose();
    for (name, service) in compose["services"].as_mapping().unwrap() {
        let image = service["image"].as_str().expect("every service names its image");
        // The services built from ../Dockerfile, whose base images are checked above.
        if service["build"].is_null() {
            references.push((format!("compose {}", name.as_str().unwrap()), image.to_owned()));
        }
    }
    assert_eq!(references.len(), 8, "{references:?}");
    for overlay in ["dev", "prod"] {
        for doc in crate::rendered::render(overlay) {
            for container in doc["spec"]["template"]["spec"]["containers"].as_sequence().into_iter().flatten() {
                let image = container["image"].as_str().unwrap();
                // The project's own image: a release sets its digest (deploy/README.md).
                if !image.starts_with("ghcr.io/trellis/trellis") {
                    references.push((format!("k8s {overlay}"), image.to_owned()));
                }
            }
        }
    }
    let unpinned: Vec<&(String, String)> = references.iter().filter(|(_, image)| !pinned_by_digest(image)).collect();
    assert!(unpinned.is_empty(), "images without a digest: {unpinned:?}");
    assert!(!pinned_by_digest("postgres:16.4-bookworm"));
    assert!(!pinned_by_digest("postgres@sha256:abc123"));
}

/// The users `deploy/nats/auth.conf` defines.
fn nats_users() -> Vec<String> {
    read("deploy/nats/auth.conf")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("{ user: "))
        .map(|l| l.split(',').next().unwrap().trim().to_owned())
        .collect()
}

#[test]
fn each_process_logs_in_to_nats_as_its_own_user_over_tls_and_keda_reads_nats_through_its_authentication() {
    let users = nats_users();
    for user in ["trellis-api", "trellis-api-monolith", "trellisctl"].iter().chain(&WORKERS) {
        assert!(users.iter().any(|u| u == user), "{user} is a user of deploy/nats/auth.conf: {users:?}");
    }

    let compose = compose();
    let mut seen = std::collections::BTreeSet::new();
    for service in ["trellis-api"].iter().chain(&WORKERS) {
        let env = &compose["services"][*service]["environment"];
        let user = env["NATS_USER"].as_str().unwrap_or_else(|| panic!("compose {service}: NATS_USER"));
        assert!(users.iter().any(|u| u == user) && seen.insert(user.to_owned()), "compose {service}: {user}");
        assert!(
            env["NATS_PASSWORD"].as_str().unwrap().starts_with("${"),
            "compose {service}: a password from the environment"
        );
        assert_eq!(env["NATS_CERT"].as_str(), Some(format!("/certs/{service}.pem").as_str()), "compose {service}");
        assert_eq!(env["NATS_CA"].as_str(), Some("/certs/ca.pem"), "compose {service}");
    }
    let nats = read("deploy/nats/nats.conf");
    assert!(
        nats.contains("include auth.conf") && nats.contains("verify: true"),
        "compose's NATS: users and client TLS"
    );

    let docs = base();
    let config = &named(&docs, "ConfigMap", "trellis-config")["data"];
    for variable in ["NATS_CA", "NATS_CERT", "NATS_KEY", "NATS_TLS_SERVER_NAME"] {
        assert!(config[variable].as_str().is_some(), "trellis-config has no {variable}");
    }
    let mut keys = std::collections::BTreeSet::new();
    for deployment in ["trellis-api"].iter().chain(&WORKERS) {
        let pod = &named(&docs, "Deployment", deployment)["spec"]["template"]["spec"];
        let env = pod["containers"][0]["env"].as_sequence().unwrap();
        let var = |name: &str| env.iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("{deployment}: {name}"));
        let user = var("NATS_USER")["value"].as_str().unwrap();
        assert!(users.iter().any(|u| u == user), "{deployment}: {user}");
        let key = var("NATS_PASSWORD")["valueFrom"]["secretKeyRef"]["key"].as_str().unwrap().to_owned();
        assert!(keys.insert(key.clone()), "{deployment}: a NATS password of its own, not {key}");
        // The CA, and a client certificate of its own (which files the variables name: `rendered`).
        let secrets: Vec<&str> = pod["volumes"][0]["projected"]["sources"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{deployment}: the NATS TLS volume"))
            .iter()
            .map(|s| s["secret"]["name"].as_str().unwrap())
            .collect();
        let own = format!("{deployment}-nats-client");
        assert_eq!(secrets, ["trellis-nats-tls", own.as_str()], "{deployment}");
    }

    let auth = named(&docs, "TriggerAuthentication", "trellis-nats-monitoring");
    let parameters: Vec<&str> = auth["spec"]["secretTargetRef"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r["parameter"].as_str().unwrap())
        .collect();
    assert_eq!(parameters, ["natsServerMonitoringEndpoint", "account"]);
    for scaled in of_kind(&docs, "ScaledObject") {
        for trigger in scaled["spec"]["triggers"].as_sequence().unwrap() {
            assert_eq!(trigger["authenticationRef"]["name"], "trellis-nats-monitoring");
            assert!(
                trigger["metadata"]["natsServerMonitoringEndpoint"].is_null(),
                "the endpoint comes from the Secret"
            );
        }
    }
}
