//! Loyalty and retention engine: points, gifts and repeat-purchase status for a merchant's
//! customers, served over gRPC.
//!
//! The code is laid out by feature: one folder per feature (`points/`, `members/`,
//! `programs/`, `access/`, ...), each with the same rooms (`mod.rs` declares its service,
//! `rules` are pure, `store.rs` holds its SQL, `use_cases.rs` what each RPC does, `grpc.rs` the
//! thin handlers), on top of `platform/` (store, cache, layers, what every feature shares).
//! `app.rs` registers every feature's service from its declaration. See `README.md`.
//!
//! The public surface used by the benchmark and the test kit is the re-exports below, plus
//! `pb` (the generated API) and the modules they name.

pub mod access;
pub mod app;
pub mod cli;
pub mod config;
pub mod engagement;
pub mod error;
pub mod events;
pub mod gifts;
pub mod greetings;
pub mod jobs;
pub mod members;
pub mod pb;
pub mod platform;
pub mod points;
pub mod programs;
pub mod shutdown;
pub mod status;
pub mod telemetry;
pub mod tiers;

pub use access::{NewKey, create_key, create_merchant, revoke_key};
pub use app::Application;
pub use config::ServerConfig;
pub use error::Error;
pub use platform::account::AccountState;
pub use platform::cache::{
    Cache, CacheConfig, CacheRead, CacheWrite, server_name as redis_server_name,
};
pub use platform::cache_repair::Publisher;
pub use platform::caller::{MerchantId, Scope};
pub use platform::rate_limit::RateLimit;
pub use platform::service::{Access, Declaration, Method, Service};
pub use platform::store::{DatabaseConfig, MIGRATOR, Store};
pub use platform::tls::ServerTls;
pub use telemetry::{Metrics, code_name};
