//! Puts the committed state back into the cache for customers whose post-commit cache write
//! failed (see `storage::cache`), so reads can use the cache for them again.

use crate::service::Loyalty;
use crate::storage::cache::CacheWrite;
use crate::storage::customers;

impl Loyalty {
    /// One repair pass. Returns how many suspect entries are still waiting.
    pub async fn repair_cache(&self) -> usize {
        let suspects = self.cache.suspects();
        let mut waiting = 0;
        for (key, generation) in suspects {
            let state =
                match customers::account(self.store.pool(), key.merchant, &key.external_id).await {
                    Ok(state) => state,
                    Err(_) => {
                        waiting += 1;
                        continue;
                    }
                };
            let repaired = match state {
                Some(state) => matches!(
                    self.cache.put(key.merchant, &key.external_id, &state).await,
                    CacheWrite::Stored | CacheWrite::RejectedOlder
                ),
                None => true,
            };
            if repaired {
                self.cache.clear_suspect(&key, generation);
            } else {
                waiting += 1;
            }
        }
        waiting
    }
}
