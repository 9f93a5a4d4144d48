//! The Redis side of the bench: warming the cache before `balance` (through the library's own
//! `Cache`, so keys and encoding are exactly the server's) and removing the run's keys after.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use loyalty::AccountState;
use loyalty::Metrics;
use loyalty::{Cache, CacheConfig, CacheWrite};
use loyalty::{MerchantId, Store};

/// The servers' cache TTL: long enough that nothing expires during a run.
pub const TTL: Duration = Duration::from_secs(3600);

/// Customers read from Postgres per query while warming.
const PAGE: i64 = 20_000;
/// Cache writes in flight while warming (one multiplexed Redis connection).
const IN_FLIGHT: usize = 256;

#[derive(sqlx::FromRow)]
struct Cached {
    id: i64,
    external_id: String,
    available: i64,
    pending: i64,
    lifetime_earned: i64,
    lifetime_redeemed: i64,
    purchase_count: i64,
    version: i64,
}

pub struct Warmed {
    pub stored: u64,
    pub failed: u64,
    pub took: Duration,
}

/// Puts every customer's committed state of `merchant` into the cache under `prefix`.
pub async fn warm(
    store: &Store,
    redis_url: &str,
    prefix: &str,
    merchant: MerchantId,
) -> Result<Warmed> {
    let cache = Cache::new(
        CacheConfig {
            url: Some(redis_url.to_string()),
            ca_cert_pem: None,
            key_prefix: prefix.to_string(),
            ttl: TTL,
            // Generous: a bulk load queues behind itself; the server's 100 ms is for RPCs.
            timeout: Duration::from_secs(5),
            cool_down: Duration::from_millis(100),
        },
        Metrics::new(),
    )
    .context("cannot set up the Redis cache")?;
    // The cache checks which Redis server it reaches once, and skips (rather than waits)
    // while it does: check before the concurrent writes.
    if !cache.is_reachable().await {
        anyhow::bail!("the Redis at {redis_url} does not answer");
    }
    let started = Instant::now();
    let (mut stored, mut failed) = (0u64, 0u64);
    let mut after: i64 = 0;
    loop {
        let page: Vec<Cached> = sqlx::query_as(
            "SELECT c.id, c.external_id, a.available, a.pending, a.lifetime_earned,
                    a.lifetime_redeemed, a.purchase_count, a.version
               FROM customers c
               JOIN accounts a ON a.merchant_id = c.merchant_id AND a.customer_id = c.id
              WHERE c.merchant_id = $1 AND c.id > $2
              ORDER BY c.id
              LIMIT $3",
        )
        .bind(merchant.0)
        .bind(after)
        .bind(PAGE)
        .fetch_all(store.pool())
        .await
        .context("reading accounts to warm the cache")?;
        let Some(last) = page.last() else { break };
        after = last.id;
        let outcomes: Vec<CacheWrite> = futures::stream::iter(page)
            .map(|row| {
                let cache = cache.clone();
                async move {
                    let state = AccountState {
                        available: row.available,
                        pending: row.pending,
                        lifetime_earned: row.lifetime_earned,
                        lifetime_redeemed: row.lifetime_redeemed,
                        purchase_count: row.purchase_count,
                        version: row.version,
                        next_expiry: None,
                        standing: None,
                    };
                    cache.put(merchant, &row.external_id, &state).await
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        for outcome in outcomes {
            match outcome {
                // An equal or newer version is already there: warm all the same.
                CacheWrite::Stored | CacheWrite::RejectedOlder => stored += 1,
                CacheWrite::Failed => failed += 1,
            }
        }
    }
    Ok(Warmed {
        stored,
        failed,
        took: started.elapsed(),
    })
}

/// Removes every key of this run (`<prefix>:*`); returns how many. Best effort for the caller.
pub async fn clean(redis_url: &str, prefix: &str) -> Result<u64> {
    let client = redis::Client::open(redis_url).context("invalid --redis-url")?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .context("cannot connect to Redis")?;
    let pattern = format!("{prefix}:*");
    let mut cursor: u64 = 0;
    let mut removed = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(5000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut conn)
                .await?;
            removed += n;
        }
        if next == 0 {
            return Ok(removed);
        }
        cursor = next;
    }
}
