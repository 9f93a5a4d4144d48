//! Keeping the cache honest after failures. A state is published to the cache after every
//! commit; when that fails, the customer is marked suspect in this replica's memory (its reads
//! skip the cache) and noted in Postgres, and the repair job of any replica later puts the
//! committed state back (then the mark and the note are cleared).

use sqlx::Connection;

use crate::domain::account::AccountState;
use crate::service::Loyalty;
use crate::storage::cache::CacheWrite;
use crate::storage::{MerchantId, cache_repairs, customers, db_error};

/// Durable repairs claimed per pass.
const REPAIR_BATCH: i64 = 100;

impl Loyalty {
    /// Publishes a committed state to the cache; on failure makes sure it gets repaired.
    ///
    /// Runs in a task of its own: a request abandoned at this point (its deadline passed, or
    /// its client went away while Redis was slow) drops its future, and a cache write cut off
    /// halfway would leave a stale entry that nobody knows about, neither marked here nor
    /// noted for repair.
    pub(crate) async fn publish(
        &self,
        merchant: MerchantId,
        external_id: &str,
        state: &AccountState,
    ) {
        let cache = self.cache.clone();
        let store = self.store.clone();
        let external_id = external_id.to_string();
        let state = *state;
        let publishing = tokio::spawn(async move {
            if cache.put_after_commit(merchant, &external_id, &state).await != CacheWrite::Failed {
                return;
            }
            if let Err(error) = cache_repairs::note(store.pool(), merchant, &external_id).await {
                // This replica still skips the entry and repairs it from memory.
                tracing::warn!(%error, %merchant, "could not note a cache repair in postgres");
            }
        });
        if let Err(error) = publishing.await {
            tracing::error!(%error, %merchant, "publishing a committed state failed");
        }
    }

    /// One repair pass: this replica's suspects first, then the repairs noted by any replica.
    /// Returns how many repairs are still waiting (known to this replica).
    pub async fn repair_cache(&self) -> usize {
        if !self.cache.is_enabled() {
            return 0;
        }
        let mut waiting = 0;
        for (key, generation) in self.cache.suspects() {
            if self.repair_one(key.merchant, &key.external_id).await {
                self.cache.clear_suspect(&key, generation);
            } else {
                waiting += 1;
            }
        }
        match self.repair_noted().await {
            Ok(left) => waiting + left,
            Err(error) => {
                tracing::debug!(%error, "cache repair pass could not reach postgres");
                waiting
            }
        }
    }

    /// Claims noted repairs (skipping those another replica holds) and works them off.
    async fn repair_noted(&self) -> Result<usize, crate::Error> {
        let mut conn = self.store.acquire().await?;
        let mut tx = conn.begin().await.map_err(db_error)?;
        let claimed = cache_repairs::claim(&mut tx, REPAIR_BATCH).await?;
        let mut left = 0;
        for repair in &claimed {
            if self.repair_one(repair.merchant, &repair.external_id).await {
                cache_repairs::done(&mut tx, repair).await?;
            } else {
                left += 1;
            }
        }
        tx.commit().await.map_err(db_error)?;
        Ok(left)
    }

    /// Puts the committed state of one customer into the cache. True when the cache now holds
    /// it (or something newer), or the customer does not exist.
    async fn repair_one(&self, merchant: MerchantId, external_id: &str) -> bool {
        match customers::account(self.store.pool(), merchant, external_id).await {
            Ok(Some(state)) => matches!(
                self.cache.put(merchant, external_id, &state).await,
                CacheWrite::Stored | CacheWrite::RejectedOlder
            ),
            Ok(None) => true,
            Err(_) => false,
        }
    }
}
