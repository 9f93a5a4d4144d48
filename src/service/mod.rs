//! Use cases: one per RPC. Each runs its writes in one Postgres transaction (or one atomic
//! statement), makes retries safe through the client's key, and updates the cache only after
//! the commit.

pub mod admin;
pub mod auth;
mod cache_repair;
mod checkout;
mod members;
mod programs;

use std::sync::Arc;

use crate::domain::Clock;
use crate::domain::api_key::Scope;
use crate::storage::cache::Cache;
use crate::storage::{MerchantId, Store};

pub use members::LedgerPage;
pub use programs::ProgramCache;

/// Who is calling: resolved from the API key by [`auth::Authenticator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub merchant: MerchantId,
    pub key_id: i64,
    pub scope: Scope,
}

impl Caller {
    /// How the audit log names this caller.
    pub fn actor(&self) -> String {
        format!("key:{}", self.key_id)
    }
}

/// The service's use cases, shared by every handler. Cheap to clone.
#[derive(Clone)]
pub struct Loyalty {
    store: Store,
    cache: Cache,
    clock: Arc<dyn Clock>,
    programs: ProgramCache,
}

impl Loyalty {
    pub fn new(store: Store, cache: Cache, clock: Arc<dyn Clock>) -> Loyalty {
        Loyalty {
            store,
            cache,
            clock,
            programs: ProgramCache::default(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The service clock's "now", for validating requests.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }
}
