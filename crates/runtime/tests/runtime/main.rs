//! The worker runtime against real JetStream and PostgreSQL: consumer groups run in this process
//! (pulls, batching, shadow candidates) and in real `trellis-probe-worker` processes (retries,
//! dead letters, the MAX_DELIVERIES safety net, replicas, shutdown, outages). Each test has its
//! own database and NATS prefix, so they run in parallel on one server.

mod batching;
mod harness;
mod nats_auth;
mod pull;
mod runner;
mod shadow;
mod streams;
