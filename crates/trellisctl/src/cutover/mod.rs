//! The cutover's commands, removable with it: `flags` (who executes each processor, and its
//! audit) and `parity` (a shadow period's comparisons).

pub mod flags;
pub mod parity;
