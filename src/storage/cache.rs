//! The Redis cache of hot customer state. Redis is never the truth: every caller has a
//! Postgres path, and this module never returns an error, only "no answer".
//!
//! * Keys carry a hash tag per customer, `<prefix>:{m<merchant>:c<external id>}:state`, so they
//!   work unchanged on Redis Cluster. The external id (not our internal id) is in the key so a
//!   warm read needs no database round trip at all.
//! * Writes are compare-and-set on the account version (a Lua script): a slow writer holding an
//!   older version can never overwrite a newer one.
//! * A write that fails after its Postgres commit leaves a possibly stale copy behind. The key
//!   is then remembered as *suspect*: reads skip the cache for it until the repair job
//!   (`service::CacheRepair`) has put the committed state back.
//! * After an error the cache is skipped for a short cool-down (a circuit breaker), so a dead or
//!   slow Redis costs one timeout, not one per RPC, and the connection is rebuilt: redis-rs's
//!   manager reconnects after most failures but can stay stuck on a broken pipe.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::domain::account::AccountState;
use crate::error::Error;
use crate::storage::MerchantId;
use crate::telemetry::Metrics;

/// Keeps the suspect set bounded while Redis is down for long; beyond it the whole cache is
/// distrusted until every entry written before has expired.
const MAX_SUSPECTS: usize = 100_000;

const STORE_IF_NEWER: &str = r"
local current = redis.call('HGET', KEYS[1], 'v')
if current and tonumber(current) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'a', ARGV[2], 'p', ARGV[3], 'le', ARGV[4],
           'lr', ARGV[5], 'pc', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return 1
";

#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// `None` disables the cache: every read goes to Postgres.
    pub url: Option<String>,
    /// First segment of every key, to share one Redis between deployments (or test runs).
    pub key_prefix: String,
    pub ttl: Duration,
    /// Per operation; a slower Redis counts as down.
    pub timeout: Duration,
    /// How long the cache is skipped after an error.
    pub cool_down: Duration,
}

/// A customer whose cached copy may be stale.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CustomerKey {
    pub merchant: MerchantId,
    pub external_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheRead {
    Hit(AccountState),
    Miss,
    /// Not asked: disabled, cooling down, the key is suspect, or Redis failed.
    Skipped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheWrite {
    Stored,
    /// The cache already held this version or a newer one.
    RejectedOlder,
    Failed,
}

#[derive(Clone)]
pub struct Cache {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    client: redis::Client,
    manager_config: ConnectionManagerConfig,
    /// Replaced by a fresh lazy manager after a failure.
    conn: RwLock<ConnectionManager>,
    /// Whether the last operation failed (to log the transitions only).
    down: AtomicBool,
    script: redis::Script,
    config: CacheConfig,
    metrics: Metrics,
    /// Until when the cache is skipped after an error.
    cool_down_until: Mutex<Option<Instant>>,
    suspects: Mutex<Suspects>,
}

#[derive(Default)]
struct Suspects {
    /// Key → generation, bumped on every new failure, so that a repair only clears the mark
    /// if no newer failure happened while it ran.
    keys: HashMap<CustomerKey, u64>,
    next_generation: u64,
    /// Set when the set overflowed: nothing cached before this instant + TTL is trusted.
    distrust_until: Option<Instant>,
}

impl Cache {
    pub fn disabled() -> Cache {
        Cache { inner: None }
    }

    /// Does not connect: the connection is made on first use and re-made after failures, so
    /// the service starts and runs with Redis down.
    pub fn new(config: CacheConfig, metrics: Metrics) -> Result<Cache, Error> {
        let Some(url) = config.url.as_deref().filter(|u| !u.is_empty()) else {
            return Ok(Cache::disabled());
        };
        let client = redis::Client::open(url)
            .map_err(|e| Error::internal(format!("invalid REDIS_URL: {e}")))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout.max(Duration::from_millis(100))))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
            .map_err(|e| Error::internal(format!("redis connection manager: {e}")))?;
        Ok(Cache {
            inner: Some(Arc::new(Inner {
                client,
                manager_config,
                conn: RwLock::new(conn),
                down: AtomicBool::new(false),
                script: redis::Script::new(STORE_IF_NEWER),
                config,
                metrics,
                cool_down_until: Mutex::new(None),
                suspects: Mutex::new(Suspects::default()),
            })),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The cached state of a customer, if Redis has a trustworthy one.
    pub async fn get(&self, merchant: MerchantId, external_id: &str) -> CacheRead {
        let Some(inner) = &self.inner else {
            return CacheRead::Skipped;
        };
        if inner.cooling_down() || inner.is_suspect(merchant, external_id) {
            inner.metrics.cache_op("get", "skipped");
            return CacheRead::Skipped;
        }
        let key = inner.key(merchant, external_id);
        let mut conn = inner.connection();
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(&key).arg(&["v", "a", "p", "le", "lr", "pc"]);
        let reply = tokio::time::timeout(
            inner.config.timeout,
            cmd.query_async::<Vec<Option<i64>>>(&mut conn),
        )
        .await;
        match reply {
            Ok(Ok(fields)) => match inner.succeeded(fields)[..] {
                [
                    Some(version),
                    Some(available),
                    Some(pending),
                    Some(le),
                    Some(lr),
                    Some(pc),
                ] => {
                    inner.metrics.cache_op("get", "hit");
                    CacheRead::Hit(AccountState {
                        available,
                        pending,
                        lifetime_earned: le,
                        lifetime_redeemed: lr,
                        purchase_count: pc,
                        version,
                    })
                }
                _ => {
                    inner.metrics.cache_op("get", "miss");
                    CacheRead::Miss
                }
            },
            Ok(Err(error)) => {
                inner.failed("get", &error.to_string());
                CacheRead::Skipped
            }
            Err(_) => {
                inner.failed("get", "timed out");
                CacheRead::Skipped
            }
        }
    }

    /// Stores `state` unless the cache holds the same or a newer version.
    pub async fn put(
        &self,
        merchant: MerchantId,
        external_id: &str,
        state: &AccountState,
    ) -> CacheWrite {
        let Some(inner) = &self.inner else {
            return CacheWrite::Failed;
        };
        if inner.cooling_down() {
            inner.metrics.cache_op("put", "skipped");
            return CacheWrite::Failed;
        }
        let key = inner.key(merchant, external_id);
        let mut conn = inner.connection();
        let mut invocation = inner.script.key(&key);
        invocation
            .arg(state.version)
            .arg(state.available)
            .arg(state.pending)
            .arg(state.lifetime_earned)
            .arg(state.lifetime_redeemed)
            .arg(state.purchase_count)
            .arg(inner.config.ttl.as_millis() as u64);
        let reply = tokio::time::timeout(
            inner.config.timeout,
            invocation.invoke_async::<i64>(&mut conn),
        )
        .await;
        match reply {
            Ok(Ok(stored)) if inner.succeeded(stored) == 1 => {
                inner.metrics.cache_op("put", "stored");
                CacheWrite::Stored
            }
            Ok(Ok(_)) => {
                inner.metrics.cache_op("put", "older");
                CacheWrite::RejectedOlder
            }
            Ok(Err(error)) => {
                inner.failed("put", &error.to_string());
                CacheWrite::Failed
            }
            Err(_) => {
                inner.failed("put", "timed out");
                CacheWrite::Failed
            }
        }
    }

    /// After a Postgres commit: publish the new state, or remember that the cached copy may
    /// now be stale.
    pub async fn put_after_commit(
        &self,
        merchant: MerchantId,
        external_id: &str,
        state: &AccountState,
    ) {
        if self.inner.is_none() {
            return;
        }
        if self.put(merchant, external_id, state).await == CacheWrite::Failed {
            self.mark_suspect(merchant, external_id);
        }
    }

    pub fn mark_suspect(&self, merchant: MerchantId, external_id: &str) {
        let Some(inner) = &self.inner else { return };
        let mut suspects = inner.suspects.lock().unwrap_or_else(|e| e.into_inner());
        if suspects.keys.len() >= MAX_SUSPECTS {
            tracing::warn!(
                "too many possibly stale cache entries; distrusting the cache for one TTL"
            );
            suspects.keys.clear();
            suspects.distrust_until = Some(Instant::now() + inner.config.ttl);
            return;
        }
        suspects.next_generation += 1;
        let generation = suspects.next_generation;
        suspects.keys.insert(
            CustomerKey {
                merchant,
                external_id: external_id.to_string(),
            },
            generation,
        );
    }

    /// The suspect keys with their generations, for the repair job.
    pub fn suspects(&self) -> Vec<(CustomerKey, u64)> {
        let Some(inner) = &self.inner else {
            return Vec::new();
        };
        let suspects = inner.suspects.lock().unwrap_or_else(|e| e.into_inner());
        suspects.keys.iter().map(|(k, g)| (k.clone(), *g)).collect()
    }

    /// Clears a suspect mark once the committed state is in the cache again, unless a newer
    /// failure marked it meanwhile.
    pub fn clear_suspect(&self, key: &CustomerKey, generation: u64) {
        let Some(inner) = &self.inner else { return };
        let mut suspects = inner.suspects.lock().unwrap_or_else(|e| e.into_inner());
        if suspects.keys.get(key) == Some(&generation) {
            suspects.keys.remove(key);
        }
    }

    /// Removes a customer's cached state (used by tests and tools).
    pub async fn evict(&self, merchant: MerchantId, external_id: &str) -> Result<(), Error> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        let mut conn = inner.connection();
        redis::cmd("DEL")
            .arg(inner.key(merchant, external_id))
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| Error::Unavailable(format!("redis: {e}")))
    }
}

impl Inner {
    fn key(&self, merchant: MerchantId, external_id: &str) -> String {
        format!(
            "{}:{{m{}:c{}}}:state",
            self.config.key_prefix,
            merchant.0,
            escape(external_id)
        )
    }

    fn cooling_down(&self) -> bool {
        let until = *self
            .cool_down_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|t| Instant::now() < t)
    }

    fn is_suspect(&self, merchant: MerchantId, external_id: &str) -> bool {
        let mut suspects = self.suspects.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(until) = suspects.distrust_until {
            if Instant::now() < until {
                return true;
            }
            suspects.distrust_until = None;
        }
        !suspects.keys.is_empty()
            && suspects.keys.contains_key(&CustomerKey {
                merchant,
                external_id: external_id.to_string(),
            })
    }

    fn connection(&self) -> ConnectionManager {
        self.conn.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn succeeded<T>(&self, value: T) -> T {
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!("redis reachable again; cache in use");
        }
        value
    }

    fn failed(&self, op: &'static str, error: &str) {
        self.metrics.cache_op(op, "error");
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(op, error, "redis unavailable; serving from postgres");
        }
        let mut until = self
            .cool_down_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let first_in_cool_down = until.is_none_or(|t| Instant::now() >= t);
        *until = Some(Instant::now() + self.config.cool_down);
        drop(until);
        if first_in_cool_down
            && let Ok(fresh) = ConnectionManager::new_lazy_with_config(
                self.client.clone(),
                self.manager_config.clone(),
            )
        {
            *self.conn.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        }
    }
}

/// Keeps `{`, `}` (the hash-tag delimiters) and `%` out of the key, reversibly.
fn escape(external_id: &str) -> String {
    if !external_id.contains(['{', '}', '%']) {
        return external_id.to_string();
    }
    external_id
        .replace('%', "%25")
        .replace('{', "%7B")
        .replace('}', "%7D")
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn external_ids_cannot_break_the_hash_tag() {
        assert_eq!(escape("card-1"), "card-1");
        assert_eq!(escape("a}b{c%"), "a%7Db%7Bc%25");
        assert_ne!(escape("%7D"), escape("}"));
    }
}
