//! Points: earning at checkout, balances and the ledger (`CheckoutService`; the balance and
//! ledger reads of `MemberService` are use cases of this feature too).
//!
//! A feature folder has the same rooms everywhere: `mod.rs` declares the service and builds
//! the use cases, `rules/` (or `rules.rs`) holds the pure rules, `store.rs` its SQL (long
//! statements in `sql/`), `use_cases.rs` what each RPC does, `grpc.rs` the thin handlers.
//! Data flows one way: grpc → use cases → (rules, store).

mod grpc;
pub mod rules;
pub mod sql;
mod store;
mod use_cases;

use std::sync::Arc;

pub use grpc::{balance_message, ledger_page_message};
pub use use_cases::LedgerPage;

use crate::pb::checkout_service_server::{CheckoutServiceServer, SERVICE_NAME};
use crate::platform::Parts;
use crate::platform::cache_repair::Publisher;
use crate::platform::clock::Clock;
use crate::platform::service::{Declaration, Method, POS, Service};
use crate::platform::store::Store;
use crate::programs::ProgramCache;

pub const DECLARATION: Declaration = Declaration {
    name: SERVICE_NAME,
    methods: &[
        Method::unary("QuotePurchase", POS),
        Method::unary("RecordPurchase", POS),
    ],
};

/// The use cases of points. Cheap to clone.
#[derive(Clone)]
pub struct Points {
    store: Store,
    publisher: Publisher,
    programs: ProgramCache,
    clock: Arc<dyn Clock>,
}

impl Points {
    pub fn new(parts: &Parts, programs: &ProgramCache) -> Points {
        Points {
            store: parts.store.clone(),
            publisher: parts.publisher.clone(),
            programs: programs.clone(),
            clock: parts.clock.clone(),
        }
    }

    /// The service clock's "now", for validating requests.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }
}

/// `CheckoutService`, ready to register.
pub fn service(parts: &Parts, programs: &ProgramCache) -> Service {
    let api = grpc::CheckoutApi {
        points: Points::new(parts, programs),
    };
    Service::new(
        DECLARATION,
        CheckoutServiceServer::new(api).max_decoding_message_size(parts.max_message_bytes),
    )
}
