//! Keeping the cache honest after failures. A state is published to the cache after every
//! commit; when that fails, the customer is marked suspect in this replica's memory (its reads
//! skip the cache) and noted in Postgres, and the repair job of any replica later puts the
//! committed state back (then the mark and the note are cleared).

mod store;

use std::collections::HashSet;

use sqlx::PgConnection;
use tracing::Instrument;

use crate::platform::account::{self, AccountState};
use crate::platform::cache::{Cache, CacheWrite, CustomerKey};
use crate::platform::caller::MerchantId;
use crate::platform::store::{Store, commit};

/// Noted repairs claimed at once, and suspects read from Postgres in one query.
const REPAIR_BATCH: i64 = 500;

/// Batches one pass may work off: a backlog drains fast once Redis is back, and a pass still
/// ends.
const MAX_BATCHES_PER_PASS: usize = 20;

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
        let state = state.clone();
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
    /// Returns how many repairs are still waiting (as far as this pass knows).
    ///
    /// While Redis is away a pass costs one PING (nothing while the breaker is open) and no
    /// query: repairs wait for Redis. Once it is back, they go in batches: one query reads the
    /// committed states of a whole batch.
    pub async fn repair_cache(&self) -> usize {
        if !self.cache.is_enabled() {
            return 0;
        }
        if !self.cache.is_reachable().await {
            return self.cache.suspects().len();
        }
        let waiting = self.repair_suspects().await;
        match self.repair_noted().await {
            Ok(left) => waiting + left,
            Err(error) => {
                tracing::debug!(%error, "cache repair pass could not reach postgres");
                waiting
            }
        }
    }

    /// Repairs the customers this replica marked suspect.
    async fn repair_suspects(&self) -> usize {
        let suspects = self.cache.suspects();
        let mut waiting = 0;
        for batch in suspects.chunks(REPAIR_BATCH as usize) {
            let customers: Vec<CustomerKey> = batch.iter().map(|(key, _)| key.clone()).collect();
            let repaired = async {
                let mut conn = self.store.acquire().await?;
                self.put_committed(&mut conn, &customers).await
            };
            let Ok(repaired) = repaired.await else {
                waiting += batch.len();
                continue;
            };
            for (key, generation) in batch {
                if repaired.contains(key) {
                    self.cache.clear_suspect(key, *generation);
                } else {
                    waiting += 1;
                }
            }
        }
        waiting
    }

    /// Claims noted repairs in batches (skipping those another replica holds) and works them
    /// off, each customer once per batch, until none is left or Redis fails again.
    async fn repair_noted(&self) -> Result<usize, crate::Error> {
        for _ in 0..MAX_BATCHES_PER_PASS {
            let mut tx = self.store.begin().await?;
            let claimed = store::claim(&mut tx, REPAIR_BATCH).await?;
            if claimed.is_empty() {
                return Ok(0);
            }
            let mut customers: Vec<CustomerKey> = claimed
                .iter()
                .map(|repair| CustomerKey {
                    merchant: repair.merchant,
                    external_id: repair.external_id.clone(),
                })
                .collect();
            customers.sort_by(|a, b| {
                (a.merchant.0, &a.external_id).cmp(&(b.merchant.0, &b.external_id))
            });
            customers.dedup();
            let repaired = self.put_committed(&mut tx, &customers).await?;
            let done: Vec<i64> = claimed
                .iter()
                .filter(|repair| {
                    repaired.contains(&CustomerKey {
                        merchant: repair.merchant,
                        external_id: repair.external_id.clone(),
                    })
                })
                .map(|repair| repair.id)
                .collect();
            store::done(&mut tx, &done).await?;
            commit(tx).await?;
            let left = claimed.len() - done.len();
            if left > 0 || claimed.len() < REPAIR_BATCH as usize {
                return Ok(left);
            }
        }
        // A backlog beyond this pass: the next pass goes on with it.
        Ok(REPAIR_BATCH as usize)
    }

    /// Puts the committed states of `customers` into the cache. Returns those repaired: the
    /// cache now holds their state (or a newer one), or they do not exist.
    async fn put_committed(
        &self,
        conn: &mut PgConnection,
        customers: &[CustomerKey],
    ) -> Result<HashSet<CustomerKey>, crate::Error> {
        let committed = account::load_many(conn, customers).await?;
        let mut repaired: HashSet<CustomerKey> = customers.iter().cloned().collect();
        for (key, state) in committed {
            let written = self.cache.put(key.merchant, &key.external_id, &state).await;
            if !matches!(written, CacheWrite::Stored | CacheWrite::RejectedOlder) {
                repaired.remove(&key);
            }
        }
        Ok(repaired)
    }
}
