//! What every feature shares: the Postgres store and its error mapping, the Redis cache and
//! its repair path, the audit log, callers and ids, shared pure rules (validation, money,
//! rate limits, the clock), the service declarations, the connection limits and the tower
//! layers.
//!
//! Nothing here depends on a feature; features depend on it.

pub mod account;
pub mod audit;
pub mod cache;
pub mod cache_repair;
pub mod caller;
pub mod clock;
pub mod connections;
pub mod detach;
pub mod layers;
pub mod money;
pub mod proto;
pub mod rate_limit;
pub mod service;
pub mod store;
pub mod tls;
pub mod validation;

use std::sync::Arc;

use crate::platform::cache_repair::Publisher;
use crate::platform::clock::Clock;
use crate::platform::store::Store;

/// The shared parts a feature builds its use cases from; each takes only what it uses.
#[derive(Clone)]
pub struct Parts {
    pub store: Store,
    /// Publishes committed account states to the cache (and repairs failed publications).
    pub publisher: Publisher,
    pub clock: Arc<dyn Clock>,
    /// Largest accepted request message, for every service.
    pub max_message_bytes: usize,
}
