//! `deploy/` against the code: the Prometheus rules agree with the stage-trigger constants and
//! have runbooks and unit tests; every metric the rules and the Grafana dashboard query is one a
//! live process exports; `trellisctl triggers` reads real processes, the database and a real
//! Prometheus; the rendered Kubernetes manifests' network policies select every pod and allow
//! only DNS, PostgreSQL and NATS out; each process works with its own database role and no
//! role can do more than its part; no credential of a URL reaches a help text, an error or a
//! log; each binary does its job with its own NATS user of `deploy/nats/auth.conf`; the compose
//! stack's three-node NATS cluster is what the single node is, three times, routed over TLS, and
//! the deployed nats-server forms it. Each test has its own database and NATS prefix.

mod compose_cluster;
mod dashboard;
mod harness;
mod manifests;
mod nats_permissions;
mod rendered;
mod roles;
mod rules;
mod secrets;
mod triggers;
