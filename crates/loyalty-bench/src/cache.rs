//! The Redis side of the bench: warming the cache before `balance` (through the library's own
//! `Cache`, so keys and encoding are exactly the server's) and removing the run's keys after.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::Utc;
use futures::StreamExt;
use loyalty::Metrics;
use loyalty::platform::cache::CustomerKey;
use loyalty::status::standing::Standing;
use loyalty::{Cache, CacheConfig, CacheWrite};
use loyalty::{MerchantId, Store};

/// The servers' cache TTL: long enough that nothing expires during a run.
pub const TTL: Duration = Duration::from_secs(3600);

/// Customers read from Postgres per query while warming.
const PAGE: i64 = 20_000;
/// Cache writes in flight while warming (one multiplexed Redis connection).
const IN_FLIGHT: usize = 256;

pub struct Warmed {
    pub stored: u64,
    pub failed: u64,
    pub took: Duration,
}

/// The library's cache as the bench's servers configure it, under `prefix`.
pub fn bench_cache(redis_url: &str, prefix: &str) -> Result<Cache> {
    Cache::new(
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
    .context("cannot set up the Redis cache")
}

/// Puts every customer's committed state of `merchant` into the cache under `prefix`, as a
/// server's read would cache it.
pub async fn warm(
    store: &Store,
    redis_url: &str,
    prefix: &str,
    merchant: MerchantId,
) -> Result<Warmed> {
    let cache = bench_cache(redis_url, prefix)?;
    // The cache checks which Redis server it reaches once, and skips (rather than waits)
    // while it does: check before the concurrent writes.
    if !cache.is_reachable().await {
        anyhow::bail!("the Redis at {redis_url} does not answer");
    }
    let started = Instant::now();
    let mut conn = store
        .pool()
        .acquire()
        .await
        .context("no database connection")?;
    // The state a server would cache: the one query the cache repair reads accounts with
    // (next expiry and standing included), and the standing a read computes for a customer
    // never assessed. A copy without a standing would send each customer's first read to
    // Postgres (the server counts it as "partial") and make `balance` measure those.
    let program = loyalty::programs::store::load(&mut conn, merchant)
        .await
        .context("reading the bench program")?
        .context("the bench merchant has no program")?;
    let (mut stored, mut failed) = (0u64, 0u64);
    let mut after: i64 = 0;
    loop {
        let page: Vec<(i64, String)> = sqlx::query_as(
            "SELECT id, external_id FROM customers
              WHERE merchant_id = $1 AND id > $2
              ORDER BY id
              LIMIT $3",
        )
        .bind(merchant.0)
        .bind(after)
        .bind(PAGE)
        .fetch_all(&mut *conn)
        .await
        .context("reading customers to warm the cache")?;
        let Some((last, _)) = page.last() else { break };
        after = *last;
        let keys: Vec<CustomerKey> = page
            .into_iter()
            .map(|(_, external_id)| CustomerKey {
                merchant,
                external_id,
            })
            .collect();
        let accounts = loyalty::platform::account::load_many(&mut conn, &keys)
            .await
            .map_err(|e| anyhow::anyhow!("reading accounts to warm the cache: {e}"))?;
        let now = Utc::now();
        let outcomes: Vec<CacheWrite> = futures::stream::iter(accounts)
            .map(|(key, mut state)| {
                let cache = cache.clone();
                if state.standing.is_none() {
                    state.standing = Some(Box::new(Standing::initial(&program.rules, now)));
                }
                async move { cache.put(merchant, &key.external_id, &state).await }
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
