//! The shared domain of Trellis: identifiers, validated newtypes, the event envelope with its
//! subjects and payloads, the pure rules and the stage-trigger thresholds. Nothing in this
//! crate does I/O or is async.

pub mod adjudication;
pub mod disputes;
pub mod events;
pub mod flags;
pub mod identity;
pub mod ids;
pub mod score;
pub mod shadow;
pub mod social;
pub mod stage;
pub mod validation;

pub use ids::{CircleId, DisputeId, EventId, UserId};
pub use validation::{FieldError, ValidationErrors};
