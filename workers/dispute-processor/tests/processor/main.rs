//! Integration tests of the dispute processor (issue 6 §5) against real PostgreSQL and
//! JetStream: a real `trellis-api` in-process (its relay publishes the events), real
//! `dispute-processor` processes, or the library fed directly.

mod harness;

mod idempotency;
mod priority;
mod rules;
mod shadow_parity;
mod shadow_replay;
