//! Access: merchants, API keys, customer tokens and who may call what. No gRPC service of its
//! own: operators manage merchants and keys from the command line (`use_cases.rs`), apps get
//! customer tokens from `MemberService.IssueCustomerToken` (`tokens.rs`), and every request is
//! checked by the [`Authenticator`] from the authentication layer (`platform::layers::auth`).

mod authenticator;
pub mod rules;
mod store;
pub mod tokens;
mod use_cases;

pub use authenticator::Authenticator;
pub use use_cases::{
    CustomerToken, NewKey, create_key, create_merchant, issue_customer_token, revoke_key,
};
