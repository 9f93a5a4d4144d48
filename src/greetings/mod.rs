//! Greetings: a customer's occasions (birthday, enrolment anniversary, the program's holidays),
//! each on the customer's own local day, and the greeting created once per customer, occasion
//! and year for those who consented, with the birthday's gift and bonus points.
//!
//! - `rules.rs`: the pure rules (local days, 29 February, consent, the greeting key, leases
//!   and acks, paging of upcoming occasions).
//! - `store.rs` (+ `sql/`): the greetings table, the job's candidates, claims and acks.
//! - `use_cases.rs`: ListUpcomingOccasions, ClaimGreetings, AckGreeting and the job's pass
//!   (run by `jobs::greetings` on every replica).
//!
//! The RPCs are served by `EngagementService` (`src/engagement`).

pub mod rules;
pub mod store;
mod use_cases;

use std::sync::Arc;

pub use use_cases::{JobReport, UpcomingPage};

use crate::platform::Parts;
use crate::platform::cache_repair::Publisher;
use crate::platform::clock::Clock;
use crate::platform::store::Store;

/// The use cases of greetings. Cheap to clone.
#[derive(Clone)]
pub struct Greetings {
    store: Store,
    publisher: Publisher,
    clock: Arc<dyn Clock>,
}

impl Greetings {
    pub fn new(parts: &Parts) -> Greetings {
        Greetings {
            store: parts.store.clone(),
            publisher: parts.publisher.clone(),
            clock: parts.clock.clone(),
        }
    }

    /// The service clock's "now".
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }
}
