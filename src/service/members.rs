//! Members: enrolment, profile, balance and history.

use crate::domain::account::AccountState;
use crate::domain::customer::{Customer, Enrollment};
use crate::domain::ledger::{self, LedgerEntry, PageRequest};
use crate::error::Error;
use crate::service::{Caller, Loyalty};
use crate::storage::cache::CacheRead;
use crate::storage::{customers, ledger as ledger_store};

/// One page of a customer's ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerPage {
    pub entries: Vec<LedgerEntry>,
    pub next_page_token: Option<String>,
}

impl Loyalty {
    /// Creates the customer or replaces their profile. Returns whether it was created.
    pub async fn enroll_customer(
        &self,
        caller: &Caller,
        enrollment: &Enrollment,
    ) -> Result<(Customer, bool), Error> {
        customers::enroll(self.store.pool(), caller.merchant, enrollment).await
    }

    pub async fn get_customer(
        &self,
        caller: &Caller,
        external_id: &str,
    ) -> Result<Customer, Error> {
        customers::get(self.store.pool(), caller.merchant, external_id)
            .await?
            .ok_or(Error::NotFound("customer"))
    }

    /// The balance, from the cache when it holds a copy at least as new as `min_version`,
    /// otherwise from Postgres (and the cache is refreshed).
    pub async fn get_balance(
        &self,
        caller: &Caller,
        external_id: &str,
        min_version: i64,
    ) -> Result<AccountState, Error> {
        if let CacheRead::Hit(state) = self.cache.get(caller.merchant, external_id).await
            && state.version >= min_version
        {
            return Ok(state);
        }
        let state = customers::account(self.store.pool(), caller.merchant, external_id)
            .await?
            .ok_or(Error::NotFound("customer"))?;
        self.cache.put(caller.merchant, external_id, &state).await;
        Ok(state)
    }

    pub async fn list_ledger(
        &self,
        caller: &Caller,
        external_id: &str,
        page: PageRequest,
    ) -> Result<LedgerPage, Error> {
        let pool = self.store.pool();
        let customer_id = customers::id_of(pool, caller.merchant, external_id)
            .await?
            .ok_or(Error::NotFound("customer"))?;
        let mut entries = ledger_store::page(pool, caller.merchant, customer_id, page).await?;
        let next_page_token = if entries.len() > page.size {
            entries.truncate(page.size);
            entries
                .last()
                .map(|last| ledger::encode_token(last.entry_id))
        } else {
            None
        };
        Ok(LedgerPage {
            entries,
            next_page_token,
        })
    }
}
