//! Points: earning at checkout, balances and the ledger (`CheckoutService`; the balance and
//! ledger reads of `MemberService` are use cases of this feature too).
//!
//! A feature folder has the same rooms everywhere: `mod.rs` declares the service and builds
//! the use cases, `rules/` (or `rules.rs`) holds the pure rules, `store.rs` its SQL (long
//! statements in `sql/`), `use_cases.rs` what each RPC does, `grpc.rs` the thin handlers.
//! Data flows one way: grpc → use cases → (rules, store).

mod grpc;
pub mod lifecycle;
pub mod rules;
pub mod sql;
pub(crate) mod store;
pub mod use_cases;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

pub use grpc::{balance_message, expiry_message, ledger_page_message};
pub use use_cases::LedgerPage;

use crate::pb::checkout_service_server::{CheckoutServiceServer, SERVICE_NAME};
use crate::platform::Parts;
use crate::platform::cache_repair::Publisher;
use crate::platform::caller::MerchantId;
use crate::platform::clock::Clock;
use crate::platform::service::{Declaration, Method, POS, Service};
use crate::platform::store::Store;
use crate::programs::ProgramCache;

pub const DECLARATION: Declaration = Declaration {
    name: SERVICE_NAME,
    methods: &[
        Method::unary("QuotePurchase", POS),
        Method::unary("RecordPurchase", POS),
        Method::unary("RedeemPoints", POS),
        Method::unary("ReservePoints", POS),
        Method::unary("CommitReservation", POS),
        Method::unary("ReleaseReservation", POS),
        Method::unary("ReturnPurchase", POS),
        Method::unary("RedeemGift", POS),
    ],
};

/// The use cases of points. Cheap to clone.
#[derive(Clone)]
pub struct Points {
    // The status feature's use cases (status::use_cases) work on the same accounts.
    pub(crate) store: Store,
    pub(crate) publisher: Publisher,
    pub(crate) programs: ProgramCache,
    pub(crate) clock: Arc<dyn Clock>,
    /// One large basket earned at a time per merchant (`use_cases::earn_off_workers`).
    large_baskets: LargeBaskets,
}

impl Points {
    pub fn new(parts: &Parts, programs: &ProgramCache) -> Points {
        Points {
            store: parts.store.clone(),
            publisher: parts.publisher.clone(),
            programs: programs.clone(),
            clock: parts.clock.clone(),
            large_baskets: LargeBaskets::default(),
        }
    }

    /// The service clock's "now", for validating requests.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }
}

/// A turn per merchant for earning large baskets: a merchant whose tills send many of the
/// largest baskets at once waits for its own turns, and never takes more than one core from
/// everyone else. Cheap to clone.
#[derive(Clone, Default)]
struct LargeBaskets {
    turns: Arc<Mutex<HashMap<MerchantId, Arc<Semaphore>>>>,
}

impl LargeBaskets {
    fn of(&self, merchant: MerchantId) -> Arc<Semaphore> {
        let mut turns = self.turns.lock().unwrap_or_else(|e| e.into_inner());
        turns
            .entry(merchant)
            .or_insert_with(|| Arc::new(Semaphore::new(1)))
            .clone()
    }
}

/// `CheckoutService`, ready to register.
pub fn service(parts: &Parts, programs: &ProgramCache) -> Service {
    let api = grpc::CheckoutApi {
        points: Points::new(parts, programs),
        gifts: crate::gifts::Gifts::new(parts),
    };
    Service::new(
        DECLARATION,
        CheckoutServiceServer::new(api).max_decoding_message_size(parts.max_message_bytes),
    )
}
