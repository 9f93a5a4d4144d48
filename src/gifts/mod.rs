//! Gifts: the merchant's catalog, grants (one gift given to one customer, with an unguessable
//! code and a validity window) and the gift rules that grant them on purchases.
//!
//! Gifts has no service of its own: its RPCs live on the services of their callers, whose
//! handlers call the thin handlers of `grpc.rs` here (admins on `ProgramService`, apps on
//! `MemberService`, tills on `CheckoutService`). Other features grant and revoke gifts inside
//! their own transactions through [`store`]'s public functions.

pub(crate) mod grpc;
pub mod rules;
pub mod store;
mod use_cases;

use std::sync::Arc;

pub use grpc::grant_message;

use crate::platform::Parts;
use crate::platform::clock::Clock;
use crate::platform::store::Store;

/// The use cases of gifts. Cheap to clone.
#[derive(Clone)]
pub struct Gifts {
    store: Store,
    clock: Arc<dyn Clock>,
}

impl Gifts {
    pub fn new(parts: &Parts) -> Gifts {
        Gifts {
            store: parts.store.clone(),
            clock: parts.clock.clone(),
        }
    }

    /// The service clock's "now".
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }
}
