//! Integration tests of the score orchestrator against real
//! PostgreSQL and JetStream: real `trellis-api` and `score-orchestrator` processes.

mod harness;

mod crash;
mod cutover;
mod manual;
mod records;
mod replicas;
mod scoring_rules;
mod shadow;
mod staleness;
mod startup;
