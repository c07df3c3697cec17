//! The whole system on a three-node JetStream cluster (`trellis_testkit::cluster`), under a
//! steady write load through the API, with a fault in the middle: `trellis-api`, the search
//! projector, the dispute processor and the score orchestrator as real processes, connected to
//! the three nodes, their streams R3 (`TRELLIS_STREAM_REPLICAS=3`, declared by the services).
//! Each test ends with the same exact invariants (`harness::System::assert_invariants`); the
//! scenarios and what they prove are in docs/ARCHITECTURE.md ("NATS versions", on a cluster).

mod faults;
mod harness;
