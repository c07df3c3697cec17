//! `trellis-api`: the HTTP API monolith. Commands write their rows and their events in one
//! transaction; the outbox relay, running in the same process, moves the events to JetStream.

pub mod activity;
pub mod app;
pub mod auth;
pub mod client_address;
pub mod config;
pub mod console;
pub mod error;
pub mod idempotency;
pub mod instrument;
pub mod keyed_mutex;
pub mod processors;
pub mod prune;
pub mod ratelimit;
pub mod read_replicas;
pub mod routes;
pub mod serve;
pub mod token_cache;
pub mod unit_of_work;
pub mod views;

pub use app::{Running, start};
pub use config::Config;
