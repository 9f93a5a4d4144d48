//! The integration tests of the service, as one test binary (one link instead of one per file):
//! each module talks to a real server through the generated gRPC client, with its own
//! database and Redis key prefix (see the test kit, `crates/loyalty-testkit`). The fault
//! scenarios with their private clusters run apart, in `tests/reliability.rs`.

mod auth;
mod binary;
mod cache;
mod checkout;
mod customer_tokens;
mod events;
mod exhaustion;
mod gifts;
mod greetings;
mod lifecycle;
mod members;
mod program;
mod reliability_bad_input;
mod reliability_limits;
mod reliability_tenancy;
mod request_ids;
mod server;
mod standing;
mod streams;
mod tls;
mod validation;
