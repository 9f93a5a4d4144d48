//! Programs: the merchant's rules (currency, earn rate, multipliers, promotions), read by
//! checkout and replaced by admins (`ProgramService`). The rules are validated in `rules.rs`;
//! checkout keeps an in-memory copy per merchant ([`ProgramCache`]).

pub(crate) mod grpc;
pub mod lifecycle;
pub mod rules;
pub mod store;
mod use_cases;

pub use use_cases::ProgramCache;

use crate::pb::program_service_server::{ProgramServiceServer, SERVICE_NAME};
use crate::platform::Parts;
use crate::platform::service::{ADMIN, Declaration, Method, Service};
use crate::platform::store::Store;

pub const DECLARATION: Declaration = Declaration {
    name: SERVICE_NAME,
    methods: &[
        Method::unary("GetProgram", ADMIN),
        Method::unary("UpdateProgram", ADMIN),
        Method::unary("AdjustPoints", ADMIN),
        Method::unary("CreateGift", ADMIN),
        Method::unary("UpdateGift", ADMIN),
        Method::unary("ListGifts", ADMIN),
        Method::unary("IssueGift", ADMIN),
        Method::unary("PutGiftRule", ADMIN),
        Method::unary("ListGiftRules", ADMIN),
    ],
};

/// The use cases of programs. Cheap to clone.
#[derive(Clone)]
pub struct Programs {
    store: Store,
    programs: ProgramCache,
}

impl Programs {
    pub fn new(parts: &Parts, programs: &ProgramCache) -> Programs {
        Programs {
            store: parts.store.clone(),
            programs: programs.clone(),
        }
    }
}

/// `ProgramService`, ready to register.
pub fn service(parts: &Parts, programs: &ProgramCache) -> Service {
    let api = grpc::ProgramApi {
        programs: Programs::new(parts, programs),
        points: crate::points::Points::new(parts, programs),
        gifts: crate::gifts::Gifts::new(parts),
    };
    Service::new(
        DECLARATION,
        ProgramServiceServer::new(api).max_decoding_message_size(parts.max_message_bytes),
    )
}
