//! Pure rules: no I/O, no system clock. Time comes in as a parameter; every rule is unit-tested
//! inline.

pub mod account;
pub mod api_key;
pub mod customer;
pub mod earn;
pub mod ledger;
pub mod money;
pub mod program;
pub mod purchase;
pub mod rate_limit;
pub mod validation;

use chrono::{DateTime, Utc};

/// Where "now" comes from. Services hold one; rules receive the instant as a plain argument.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}
