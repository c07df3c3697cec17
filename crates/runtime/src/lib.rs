//! The process runtime shared by every Trellis binary: configuration, telemetry, the admin
//! listener (health and metrics), shutdown, the process skeleton (`host`), the JetStream
//! topology, the consumer-group runner, the outbox relay, and the cutover (`cutover`).

pub mod admin;
pub mod config;
pub mod consumer;
pub mod cutover;
pub mod dlq;
pub mod health;
pub mod host;
pub mod instrument;
pub mod nats;
pub mod nats_options;
pub mod relay;
pub mod shutdown;
pub mod stream_limits;
pub mod telemetry;
pub mod trace;
pub mod worker;
