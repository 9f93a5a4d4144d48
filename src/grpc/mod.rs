//! The gRPC surface: thin handlers (proto ⇄ domain, caller from the auth layer) and the tower
//! layers every request passes through, outermost first:
//! metrics → message size status → deadline → overload shedding → authentication, scope and
//! rate limit → handler.

pub mod auth;
mod checkout;
pub mod convert;
pub mod limits;
mod member;
pub mod metrics;
mod program;

pub use checkout::CheckoutApi;
pub use member::MemberApi;
pub use program::ProgramApi;

use tonic::{Request, Status};

use crate::service::Caller;

/// The caller the auth layer attached to the request.
fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .copied()
        .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <api key>"))
}
