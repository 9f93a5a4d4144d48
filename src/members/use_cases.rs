//! The use cases of members: enrolment, profile reads and customer tokens.

use std::time::Duration;

use crate::access::{self, CustomerToken};
use crate::error::Error;
use crate::members::Members;
use crate::members::rules::{Customer, Enrollment};
use crate::members::store;
use crate::platform::caller::Caller;

impl Members {
    /// Creates the customer or replaces their profile. Returns whether it was created.
    pub async fn enroll_customer(
        &self,
        caller: &Caller,
        enrollment: &Enrollment,
    ) -> Result<(Customer, bool), Error> {
        let mut conn = self.store.acquire().await?;
        store::enroll(&mut conn, caller.merchant, enrollment).await
    }

    pub async fn get_customer(
        &self,
        caller: &Caller,
        external_id: &str,
    ) -> Result<Customer, Error> {
        caller.may_read(external_id)?;
        let mut conn = self.store.acquire().await?;
        store::get(&mut conn, caller.merchant, external_id)
            .await?
            .ok_or(Error::NotFound("customer"))
    }
}

impl Members {
    /// A token for the app of `external_id`, valid for `ttl` from now.
    pub async fn issue_customer_token(
        &self,
        caller: &Caller,
        external_id: &str,
        ttl: Duration,
    ) -> Result<CustomerToken, Error> {
        access::issue_customer_token(&self.store, caller, external_id, ttl, self.clock.now()).await
    }
}
