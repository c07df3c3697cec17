//! The on-call operations that `trellisctl` and the on-call console share, so that both act
//! through the same code, with the same rules and the same audit: dead letters ([`dlq`]:
//! reading and filtering them, grouping by fingerprint, replaying with canaries and a rate,
//! parking, purging) and the stage triggers' live readings ([`triggers`]).

pub mod dlq;
pub mod triggers;
