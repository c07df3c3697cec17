//! The runtime against real JetStream: consumer groups run in this process, each test on a NATS
//! prefix of its own (so the tests run in parallel on one server).

mod harness;
mod pull;
