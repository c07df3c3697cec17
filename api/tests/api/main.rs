//! Integration tests of `trellis-api` against real PostgreSQL and JetStream. One binary; each
//! test has its own database and NATS prefix, so they run in parallel.

mod abuse;
mod activity;
mod authorization;
mod circles;
mod console;
mod console_browser;
mod contacts;
mod disputes;
mod errors;
mod faults;
mod flags;
mod health;
mod helpers;
mod idempotency;
mod identity;
mod moderation_power;
mod openapi;
mod outbox;
mod read_replicas;
mod scores_search;
mod sessions;
mod token_cache;
mod traces;
