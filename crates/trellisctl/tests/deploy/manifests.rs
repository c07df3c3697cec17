//! What the validators cannot know about `deploy/k8s` and `deploy/compose.yaml`: scaling on
//! the consumers the workers really use, grace periods longer than the drain, probes, resources,
//! and no secret in the repository. (Schemas: `cargo xtask deploy`.)

use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::harness::{read, repo_root, yaml};

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
        let env_from: Vec<&Value> = container["envFrom"].as_sequence().expect("envFrom").iter().collect();
        assert!(
            env_from.iter().any(|e| e["secretRef"]["name"] == "trellis-secrets"),
            "{name}: the Secret by reference"
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
}

#[test]
fn compose_runs_every_service_health_gated_with_the_drain_grace() {
    let compose = yaml("deploy/compose.yaml");
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
