//! Integration tests of the search projector against real PostgreSQL and
//! JetStream: a real `trellis-api` process (its relay publishes the events) and real
//! `search-projector` processes, or the library's handler fed directly.

mod harness;

mod cluster;
mod cutover;
mod events;
mod fallback;
mod history;
mod moderation;
mod rebuild;
mod shadow;
mod shuffled;
