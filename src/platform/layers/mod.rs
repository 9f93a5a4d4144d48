//! The tower layers every request passes through, one per file, outermost first:
//!
//! request span → metrics → unreadable-request status → unary deadline → unary body read in
//! full → unary shedding → authentication (scope, rate limit) → stream limits → the service.
//!
//! Which limits apply to a request depends on its method's declared kind (unary or
//! streaming, see `platform::service`): unary calls get the deadline and the unary slot pool,
//! streams a pool of their own and an end on shutdown.

pub mod auth;
pub mod deadline;
pub mod metrics;
pub mod read_body;
pub mod request_span;
pub mod shed;
pub mod streams;
pub mod unreadable;
