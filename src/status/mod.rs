//! Repeat-purchase status: NEW → RETURNING → REGULAR → LOYAL as a customer comes back, AT_RISK
//! and LAPSED when they stop, with the program's thresholds. Only the pure rules exist so far
//! (`rules.rs`): the status at an instant from a summary of the customer's purchases, the
//! reason of a change, when to look again, and what the customer needs for the next status.

pub mod rules;
pub mod standing;
