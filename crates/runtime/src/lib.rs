//! The process runtime shared by every Trellis binary: configuration, telemetry, the admin
//! listener (health and metrics), shutdown, the JetStream topology and the outbox relay.

pub mod admin;
pub mod config;
pub mod consumer;
pub mod dlq;
pub mod flags;
pub mod health;
pub mod nats;
pub mod relay;
pub mod shadow;
pub mod shutdown;
pub mod telemetry;
pub mod worker;
