//! Keeping the cache honest after failures. A state is published to the cache after every
//! commit; when that fails, the customer is marked suspect in this replica's memory (its reads
//! skip the cache) and noted in Postgres, and the repair job of any replica later puts the
//! committed state back (then the mark and the note are cleared).

mod store;

use tracing::Instrument;

use crate::platform::account::{self, AccountState};
use crate::platform::cache::{Cache, CacheWrite};
use crate::platform::caller::MerchantId;
use crate::platform::store::{Store, commit};

/// Durable repairs claimed per pass.
const REPAIR_BATCH: i64 = 100;

/// Publishes committed states to the cache and repairs the ones that could not be published.
/// Every feature that changes an account publishes through it. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    store: Store,
    cache: Cache,
}

impl Publisher {
    pub fn new(store: Store, cache: Cache) -> Publisher {
        Publisher { store, cache }
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Publishes a committed state to the cache; on failure makes sure it gets repaired.
    ///
    /// Runs in a task of its own: a request abandoned at this point (its deadline passed, or
    /// its client went away while Redis was slow) drops its future, and a cache write cut off
    /// halfway would leave a stale entry that nobody knows about, neither marked here nor
    /// noted for repair.
    pub async fn publish(&self, merchant: MerchantId, external_id: &str, state: &AccountState) {
        let cache = self.cache.clone();
        let store = self.store.clone();
        let external_id = external_id.to_string();
        let state = *state;
        // The task keeps the request's span, so its log lines still carry the request id.
        let publishing = tokio::spawn(
            async move {
                if cache.put_after_commit(merchant, &external_id, &state).await
                    != CacheWrite::Failed
                {
                    return;
                }
                let noted = async {
                    let mut conn = store.acquire().await?;
                    store::note(&mut conn, merchant, &external_id).await
                };
                if let Err(error) = noted.await {
                    // This replica still skips the entry and repairs it from memory.
                    tracing::warn!(%error, %merchant, "could not note a cache repair in postgres");
                }
            }
            .in_current_span(),
        );
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
        let mut tx = self.store.begin().await?;
        let claimed = store::claim(&mut tx, REPAIR_BATCH).await?;
        let mut left = 0;
        for repair in &claimed {
            if self.repair_one(repair.merchant, &repair.external_id).await {
                store::done(&mut tx, repair).await?;
            } else {
                left += 1;
            }
        }
        commit(tx).await?;
        Ok(left)
    }

    /// Puts the committed state of one customer into the cache. True when the cache now holds
    /// it (or something newer), or the customer does not exist.
    async fn repair_one(&self, merchant: MerchantId, external_id: &str) -> bool {
        let committed = async {
            let mut conn = self.store.acquire().await?;
            account::load(&mut conn, merchant, external_id).await
        };
        match committed.await {
            Ok(Some(state)) => matches!(
                self.cache.put(merchant, external_id, &state).await,
                CacheWrite::Stored | CacheWrite::RejectedOlder
            ),
            Ok(None) => true,
            Err(_) => false,
        }
    }
}
