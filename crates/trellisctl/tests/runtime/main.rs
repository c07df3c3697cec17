//! The worker runtime against real JetStream and PostgreSQL: consumer groups,
//! retries, dead letters, the MAX_DELIVERIES safety net, shutdown, outages, `trellisctl dlq`,
//! `trellisctl flags`, `trellisctl users` and `trellisctl migrate down`.
//! Each test has its own database and NATS prefix, and drives real `trellis-probe-worker`
//! processes.

mod batching;
mod dlq;
mod flags;
mod helpers;
mod migrate;
mod parity;
mod runbook;
mod runner;
mod search;
mod shadow;
mod users;
