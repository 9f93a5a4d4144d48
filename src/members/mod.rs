//! Members: enrolment and profiles (`MemberService`). Its balance and ledger reads are the
//! points feature's use cases, answered here because apps find them on this service, and so is
//! the minting of customer tokens (an access use case) for the apps of those customers.

mod grpc;
pub mod rules;
mod store;
mod use_cases;

use std::sync::Arc;

use crate::pb::member_service_server::{MemberServiceServer, SERVICE_NAME};
use crate::platform::Parts;
use crate::platform::clock::Clock;
use crate::platform::service::{CUSTOMER_READ, Declaration, Method, POS, READ, Service};
use crate::platform::store::Store;
use crate::points::Points;
use crate::programs::ProgramCache;

pub const DECLARATION: Declaration = Declaration {
    name: SERVICE_NAME,
    methods: &[
        Method::unary("EnrollCustomer", POS),
        Method::unary("GetCustomer", CUSTOMER_READ),
        Method::unary("GetBalance", CUSTOMER_READ),
        Method::unary("ListLedger", CUSTOMER_READ),
        // App backends (and tills) mint tokens for their signed-in customers.
        Method::unary("IssueCustomerToken", READ),
        Method::unary("ListGiftCatalog", CUSTOMER_READ),
        Method::unary("ListCustomerGifts", CUSTOMER_READ),
    ],
};

/// The use cases of members. Cheap to clone.
#[derive(Clone)]
pub struct Members {
    store: Store,
    clock: Arc<dyn Clock>,
}

impl Members {
    pub fn new(parts: &Parts) -> Members {
        Members {
            store: parts.store.clone(),
            clock: parts.clock.clone(),
        }
    }

    /// The service clock's "now", for validating requests.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }
}

/// `MemberService`, ready to register.
pub fn service(parts: &Parts, programs: &ProgramCache) -> Service {
    let api = grpc::MemberApi {
        members: Members::new(parts),
        points: Points::new(parts, programs),
        gifts: crate::gifts::Gifts::new(parts),
    };
    Service::new(
        DECLARATION,
        MemberServiceServer::new(api).max_decoding_message_size(parts.max_message_bytes),
    )
}
