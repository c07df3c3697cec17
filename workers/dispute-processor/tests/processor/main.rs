//! Integration tests of the dispute processor against real
//! PostgreSQL and JetStream: a real `trellis-api` process (its relay publishes the events), real
//! `dispute-processor` processes, or the library fed directly.

mod harness;

mod cutover;
mod idempotency;
mod moderation;
mod priority;
mod rules;
mod shadow_parity;
mod shadow_replay;
