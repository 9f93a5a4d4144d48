//! Repeat-purchase status: NEW → RETURNING → REGULAR → LOYAL as a customer comes back, AT_RISK
//! and LAPSED when they stop, with the program's thresholds. `rules.rs`: the status at an
//! instant, its reason, when to look again, the hint for the next status; `standing.rs`: status
//! and tier assessed together, as checkout, returns and the sweep write them; `store.rs`: the
//! SQL outside checkout's statement; `use_cases.rs`: a return's reassessment and the sweep.

pub mod cached;
pub mod grpc;
pub mod rules;
pub mod standing;
pub mod store;
pub mod use_cases;
