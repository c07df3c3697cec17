//! The fault scenarios: the whole system under a steady write load through the API, with a
//! fault in the middle — `trellis-api`, the search projector, the dispute processor and the
//! score orchestrator as real processes, on a three-node JetStream cluster (`cluster`: R3
//! streams, `trellis_testkit::cluster`) or on one nats-server (`single`: R1). Each scenario ends
//! with the same exact invariants (`harness::System::assert_invariants`) and reports a line of
//! the fault table (`cargo xtask chaos`); the scenarios and what they prove are in
//! docs/ARCHITECTURE.md ("Faults").

mod cluster;
mod harness;
mod single;
