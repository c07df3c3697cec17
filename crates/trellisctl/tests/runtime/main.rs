//! `trellisctl` against real PostgreSQL and JetStream: `dlq`, `flags`, `parity`, `users`,
//! `migrate down`, `search rebuild` and the cutover runbook's commands. Each test has its own
//! database and NATS prefix; the dead-letter tests drive real `trellis-probe-worker` processes.
//! The worker runtime's own tests are in `crates/runtime/tests/`.

mod dlq;
mod flags;
mod helpers;
mod migrate;
mod parity;
mod runbook;
mod search;
mod users;
