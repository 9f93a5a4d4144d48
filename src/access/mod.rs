//! Access: merchants, API keys and who may call what. No gRPC service of its own: operators
//! manage merchants and keys from the command line (`use_cases.rs`), and every request is
//! checked by the [`Authenticator`] from the authentication layer (`platform::layers::auth`).

mod authenticator;
pub mod rules;
mod store;
mod use_cases;

pub use authenticator::Authenticator;
pub use use_cases::{NewKey, create_key, create_merchant, revoke_key};
