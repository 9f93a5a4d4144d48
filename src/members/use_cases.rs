//! The use cases of members: enrolment and profile reads.

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
        let mut conn = self.store.acquire().await?;
        store::get(&mut conn, caller.merchant, external_id)
            .await?
            .ok_or(Error::NotFound("customer"))
    }
}
