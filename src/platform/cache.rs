//! The Redis cache of hot customer state. Redis is never the truth: every caller has a
//! Postgres path, and this module never returns an error, only "no answer".
//!
//! * Keys carry a hash tag per customer, `<prefix>:<instance>:{m<merchant>:c<external id>}:state`,
//!   so they work unchanged on Redis Cluster. The external id (not our internal id) is in the
//!   key so a warm read needs no database round trip at all.
//! * `<instance>` names the Redis server and its history: its run id (new on every restart)
//!   and its replication id (new when a replica is promoted). A Redis that lost its newest
//!   writes (restarted from an older snapshot, or a lagging replica promoted on failover) has
//!   a new name, so every entry it kept is invisible and the cache starts cold instead of
//!   going back in time. The name is read when a connection is (re)made; every operation asks,
//!   in the same round trip, for the name we gave our connection (`CLIENT GETNAME`), so an
//!   operation that reaches a connection we have not checked is not trusted.
//! * Writes are compare-and-set on the account version (a Lua script): a slow writer holding an
//!   older version can never overwrite a newer one.
//! * A write that fails after its Postgres commit leaves a possibly stale copy behind. The key
//!   is then remembered as *suspect*: reads on this replica skip the cache for it, and the key
//!   is also noted in Postgres (`cache_repairs`), so the repair job of any replica puts the
//!   committed state back even if this one dies first (`platform::cache_repair`).
//! * A failed operation falls back to Postgres for that request only. After a few failures in a
//!   row the cache is skipped for a short cool-down (a circuit breaker), so a dead or slow Redis
//!   costs a few timeouts, not one per RPC, while a single slow reply under load does not send
//!   every read to Postgres at once. When the breaker trips the connection is rebuilt:
//!   redis-rs's manager reconnects after most failures but can stay stuck on a broken pipe.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rand::RngCore;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::error::Error;
use crate::platform::account::{AccountState, PointsExpiry};
use crate::platform::caller::MerchantId;
use crate::status::cached;
use crate::status::standing::Standing;
use crate::telemetry::Metrics;

/// Keeps the suspect set bounded while Redis is down for long; beyond it the whole cache is
/// distrusted until every entry written before has expired.
const MAX_SUSPECTS: usize = 100_000;

/// Failures in a row that open the breaker.
const TRIP_AFTER_FAILURES: u32 = 3;

// A copy of the same version is replaced only to add the standing it lacks (a copy written
// without one: before standings existed, or for a customer not assessed yet). Otherwise such
// a customer's every read would find it, refuse it and go to Postgres until their next write.
const STORE_IF_NEWER: &str = r"
local current = redis.call('HGET', KEYS[1], 'v')
if current and tonumber(current) >= tonumber(ARGV[1]) then
  local cached = redis.call('HGET', KEYS[1], 'st')
  if tonumber(current) > tonumber(ARGV[1]) or ARGV[10] == '' or (cached and cached ~= '') then
    return 0
  end
end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'a', ARGV[2], 'p', ARGV[3], 'le', ARGV[4],
           'lr', ARGV[5], 'pc', ARGV[6], 'xp', ARGV[8], 'xa', ARGV[9], 'st', ARGV[10])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return 1
";

/// The next expiry as cached: 0 points stands for none.
fn next_expiry_of(points: i64, at_micros: i64) -> Option<PointsExpiry> {
    let at = chrono::DateTime::from_timestamp_micros(at_micros)?;
    (points > 0).then_some(PointsExpiry { points, at })
}

/// The standing as cached: its binary form (`status::cached`), or "" for none.
fn standing_field(standing: Option<&Standing>) -> Vec<u8> {
    standing.map(cached::encode).unwrap_or_default()
}

/// The cached standing: `None` when the entry has no field (a miss), `Some(None)` for "".
/// The binary form, or the JSON that servers before it wrote into the same field (during a
/// rolling upgrade an older replica's write replaces the whole entry, standing included, so
/// the field always belongs to the entry's version). An unreadable one is a miss too.
fn standing_of(field: Option<Vec<u8>>) -> Option<Option<Box<Standing>>> {
    let field = field?;
    if field.is_empty() {
        return Some(None);
    }
    let standing = match field.first() {
        Some(b'{') => serde_json::from_slice(&field).ok(),
        _ => cached::decode(&field),
    };
    standing.map(|s| Some(Box::new(s)))
}

/// The state in a cache entry's fields (`v a p le lr pc xp xa st`, as `get` asks for them);
/// `None` is a miss: no entry, a field missing (an entry written before expiry or standings
/// existed) or unreadable.
fn cached_state(fields: Vec<Option<Vec<u8>>>) -> Option<AccountState> {
    let [v, a, p, le, lr, pc, xp, xa, st]: [Option<Vec<u8>>; 9] = fields.try_into().ok()?;
    let number = |field: Option<Vec<u8>>| std::str::from_utf8(&field?).ok()?.parse::<i64>().ok();
    Some(AccountState {
        version: number(v)?,
        available: number(a)?,
        pending: number(p)?,
        lifetime_earned: number(le)?,
        lifetime_redeemed: number(lr)?,
        purchase_count: number(pc)?,
        next_expiry: next_expiry_of(number(xp)?, number(xa)?),
        standing: standing_of(st)?,
    })
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// `None` disables the cache: every read goes to Postgres. `rediss://` speaks TLS.
    pub url: Option<String>,
    /// PEM CA certificate(s) trusted for a `rediss://` Redis instead of the system's roots.
    pub ca_cert_pem: Option<Vec<u8>>,
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

#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Whether the breaker is open or was last opened (to log the transitions only).
    down: AtomicBool,
    breaker: Breaker,
    epoch: Instant,
    /// Whether any key is suspect (or the whole cache distrusted): lets reads skip the lock.
    any_suspect: AtomicBool,
    script: redis::Script,
    config: CacheConfig,
    metrics: Metrics,
    suspects: Mutex<Suspects>,
    /// The server our connection was checked against; `None` until (re)checked.
    instance: RwLock<Option<Arc<Instance>>>,
    /// One check at a time; operations meanwhile skip the cache.
    checking: tokio::sync::Mutex<()>,
}

/// The Redis server the cache trusts, as checked on the current connection.
struct Instance {
    /// The name we gave the checked connection (`CLIENT SETNAME`): a reply on a connection
    /// with another name comes from one we have not checked.
    connection_name: String,
    /// `<key prefix>:<server name>`: the first segments of every key.
    key_prefix: String,
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
        let client = match &config.ca_cert_pem {
            Some(ca) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            ),
            None => redis::Client::open(url),
        }
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
                breaker: Breaker::new(config.cool_down),
                epoch: Instant::now(),
                any_suspect: AtomicBool::new(false),
                script: redis::Script::new(STORE_IF_NEWER),
                config,
                metrics,
                suspects: Mutex::new(Suspects::default()),
                instance: RwLock::new(None),
                checking: tokio::sync::Mutex::new(()),
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
        let Some(instance) = inner.instance().await else {
            inner.metrics.cache_op("get", "skipped");
            return CacheRead::Skipped;
        };
        let key = instance.key(merchant, external_id);
        let mut conn = inner.connection();
        let mut pipe = redis::pipe();
        pipe.cmd("CLIENT").arg("GETNAME");
        // One command for every field, the standing's JSON last (Redis runs one command per
        // read instead of two: it shares the machine's cores with the server).
        pipe.cmd("HMGET")
            .arg(&key)
            .arg(&["v", "a", "p", "le", "lr", "pc", "xp", "xa", "st"]);
        let reply = tokio::time::timeout(
            inner.config.timeout,
            pipe.query_async::<(Option<String>, Vec<Option<Vec<u8>>>)>(&mut conn),
        )
        .await;
        match reply {
            Ok(Ok((name, _))) if !instance.answered_on(name.as_deref()) => {
                inner.forget_instance(&instance);
                inner.metrics.cache_op("get", "skipped");
                CacheRead::Skipped
            }
            Ok(Ok((_, fields))) => match cached_state(inner.succeeded(fields)) {
                Some(state) => {
                    // A copy without a standing (written by a writer that had none) does
                    // not answer a balance read, which then goes to Postgres: counted apart,
                    // so that a hit ratio counts only the reads the cache answered.
                    let outcome = if state.standing.is_some() {
                        "hit"
                    } else {
                        "partial"
                    };
                    inner.metrics.cache_op("get", outcome);
                    CacheRead::Hit(state)
                }
                None => {
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
        let Some(instance) = inner.instance().await else {
            inner.metrics.cache_op("put", "skipped");
            return CacheWrite::Failed;
        };
        let mut conn = inner.connection();
        let mut pipe = redis::pipe();
        pipe.cmd("CLIENT").arg("GETNAME");
        // The script was loaded when the connection was checked.
        pipe.cmd("EVALSHA")
            .arg(inner.script.get_hash())
            .arg(1)
            .arg(instance.key(merchant, external_id))
            .arg(state.version)
            .arg(state.available)
            .arg(state.pending)
            .arg(state.lifetime_earned)
            .arg(state.lifetime_redeemed)
            .arg(state.purchase_count)
            .arg(inner.config.ttl.as_millis() as u64)
            .arg(state.next_expiry.map_or(0, |e| e.points))
            .arg(state.next_expiry.map_or(0, |e| e.at.timestamp_micros()))
            .arg(standing_field(state.standing.as_deref()));
        let reply = tokio::time::timeout(
            inner.config.timeout,
            pipe.query_async::<(Option<String>, i64)>(&mut conn),
        )
        .await;
        match reply {
            Ok(Ok((name, _))) if !instance.answered_on(name.as_deref()) => {
                inner.forget_instance(&instance);
                inner.metrics.cache_op("put", "skipped");
                CacheWrite::Failed
            }
            Ok(Ok((_, stored))) if inner.succeeded(stored) == 1 => {
                inner.metrics.cache_op("put", "stored");
                CacheWrite::Stored
            }
            Ok(Ok(_)) => {
                inner.metrics.cache_op("put", "older");
                CacheWrite::RejectedOlder
            }
            Ok(Err(error))
                if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                // Someone flushed the scripts: check the connection again (that reloads it).
                inner.forget_instance(&instance);
                inner.metrics.cache_op("put", "skipped");
                CacheWrite::Failed
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

    /// Whether Redis answers now (a PING, unless the breaker is open): the repair job asks
    /// before it reads anything from Postgres.
    pub async fn is_reachable(&self) -> bool {
        let Some(inner) = &self.inner else {
            return false;
        };
        if inner.cooling_down() || inner.instance().await.is_none() {
            return false;
        }
        let mut conn = inner.connection();
        let reply = tokio::time::timeout(
            inner.config.timeout,
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        match reply {
            Ok(Ok(_)) => inner.succeeded(true),
            Ok(Err(error)) => {
                inner.failed("ping", &error.to_string());
                false
            }
            Err(_) => {
                inner.failed("ping", "timed out");
                false
            }
        }
    }

    /// The key of a customer's state on the Redis server now in use, once checked (for tests
    /// and tools).
    pub async fn key_of(&self, merchant: MerchantId, external_id: &str) -> Option<String> {
        let instance = self.inner.as_ref()?.instance().await?;
        Some(instance.key(merchant, external_id))
    }

    /// After a Postgres commit: publish the new state, or remember (in this replica's memory)
    /// that the cached copy may now be stale. A disabled cache counts as stored.
    pub async fn put_after_commit(
        &self,
        merchant: MerchantId,
        external_id: &str,
        state: &AccountState,
    ) -> CacheWrite {
        if self.inner.is_none() {
            return CacheWrite::Stored;
        }
        let written = self.put(merchant, external_id, state).await;
        if written == CacheWrite::Failed {
            self.mark_suspect(merchant, external_id);
        }
        written
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
            inner.any_suspect.store(true, Ordering::Release);
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
        inner.any_suspect.store(true, Ordering::Release);
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
        if suspects.keys.is_empty() && suspects.distrust_until.is_none() {
            inner.any_suspect.store(false, Ordering::Release);
        }
    }

    /// Removes a customer's cached state (used by tests and tools).
    pub async fn evict(&self, merchant: MerchantId, external_id: &str) -> Result<(), Error> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        let Some(instance) = inner.instance().await else {
            return Err(Error::Unavailable("redis: not reachable".into()));
        };
        let mut conn = inner.connection();
        redis::cmd("DEL")
            .arg(instance.key(merchant, external_id))
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| Error::Unavailable(format!("redis: {e}")))
    }
}

impl Instance {
    fn key(&self, merchant: MerchantId, external_id: &str) -> String {
        format!(
            "{}:{{m{}:c{}}}:state",
            self.key_prefix,
            merchant.0,
            escape(external_id)
        )
    }

    fn answered_on(&self, connection_name: Option<&str>) -> bool {
        connection_name == Some(self.connection_name.as_str())
    }
}

impl Inner {
    /// The checked server, checking the connection first if nobody has since it was (re)made.
    /// `None` while Redis is unreachable, serves as a replica, or another task is checking.
    async fn instance(&self) -> Option<Arc<Instance>> {
        if let Some(instance) = self
            .instance
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Some(instance);
        }
        let _checking = self.checking.try_lock().ok()?;
        if let Some(instance) = self
            .instance
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Some(instance);
        }
        match tokio::time::timeout(self.config.timeout, self.check_connection()).await {
            Ok(Ok(instance)) => {
                let instance = Arc::new(instance);
                tracing::info!(server = %instance.key_prefix, "redis connection checked; cache in use");
                *self.instance.write().unwrap_or_else(|e| e.into_inner()) = Some(instance.clone());
                self.succeeded(());
                Some(instance)
            }
            Ok(Err(error)) => {
                self.failed("check", &error);
                None
            }
            Err(_) => {
                self.failed("check", "timed out");
                None
            }
        }
    }

    /// Names our connection, reads which server it reaches and loads the write script, all in
    /// one round trip (so on one connection).
    async fn check_connection(&self) -> Result<Instance, String> {
        let connection_name = format!("loyalty-{:016x}", rand::rng().next_u64());
        let mut conn = self.connection();
        let mut pipe = redis::pipe();
        pipe.cmd("CLIENT")
            .arg("SETNAME")
            .arg(&connection_name)
            .ignore();
        pipe.cmd("INFO").arg("server");
        pipe.cmd("INFO").arg("replication");
        pipe.cmd("SCRIPT").arg("LOAD").arg(STORE_IF_NEWER).ignore();
        let (server, replication): (String, String) = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let server_name = server_name(&server, &replication)?;
        Ok(Instance {
            connection_name,
            key_prefix: format!("{}:{server_name}", self.config.key_prefix),
        })
    }

    /// Stops trusting `stale` (the connection was re-made); the next operation checks again.
    fn forget_instance(&self, stale: &Arc<Instance>) {
        let mut instance = self.instance.write().unwrap_or_else(|e| e.into_inner());
        if instance
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, stale))
        {
            tracing::info!("redis connection re-made; checking which server it reaches");
            *instance = None;
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn cooling_down(&self) -> bool {
        self.breaker.is_open(self.now_ms())
    }

    fn is_suspect(&self, merchant: MerchantId, external_id: &str) -> bool {
        if !self.any_suspect.load(Ordering::Acquire) {
            return false;
        }
        let mut suspects = self.suspects.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(until) = suspects.distrust_until {
            if Instant::now() < until {
                return true;
            }
            suspects.distrust_until = None;
            if suspects.keys.is_empty() {
                self.any_suspect.store(false, Ordering::Release);
            }
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
        self.breaker.record_success();
        if self.down.load(Ordering::Relaxed) && self.down.swap(false, Ordering::Relaxed) {
            tracing::info!("redis reachable again; cache in use");
        }
        value
    }

    /// Counts a failure; after a few in a row, opens the breaker for the cool-down and
    /// rebuilds the connection.
    fn failed(&self, op: &'static str, error: &str) {
        self.metrics.cache_op(op, "error");
        if !self.breaker.record_failure(self.now_ms()) {
            return;
        }
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(op, error, "redis unavailable; serving from postgres");
        }
        if let Ok(fresh) = ConnectionManager::new_lazy_with_config(
            self.client.clone(),
            self.manager_config.clone(),
        ) {
            *self.conn.write().unwrap_or_else(|e| e.into_inner()) = fresh;
            *self.instance.write().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }
}

/// The circuit breaker: opens after [`TRIP_AFTER_FAILURES`] failures in a row, stays open for
/// the cool-down, then lets operations through again (a further failure re-opens it at once).
/// Lock-free, because every cache operation asks it. Time is passed in, in milliseconds.
struct Breaker {
    consecutive_failures: AtomicU32,
    /// When the breaker closes again; 0 while closed.
    open_until_ms: AtomicU64,
    cool_down_ms: u64,
}

impl Breaker {
    fn new(cool_down: Duration) -> Breaker {
        Breaker {
            consecutive_failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            cool_down_ms: cool_down.as_millis() as u64,
        }
    }

    fn is_open(&self, now_ms: u64) -> bool {
        let until = self.open_until_ms.load(Ordering::Acquire);
        until != 0 && now_ms < until
    }

    fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Returns true when this failure opened the breaker.
    fn record_failure(&self, now_ms: u64) -> bool {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < TRIP_AFTER_FAILURES || self.is_open(now_ms) {
            return false;
        }
        self.open_until_ms
            .store((now_ms + self.cool_down_ms).max(1), Ordering::Release);
        true
    }
}

/// The name of a Redis server and its history, from its `INFO server` and `INFO replication`:
/// 8 hex digits of its run id (new on every start) and 8 of its replication id (new when it is
/// promoted). A replica is refused: writes to it fail, and it may lag its primary.
pub fn server_name(info_server: &str, info_replication: &str) -> Result<String, String> {
    let field = |info: &str, name: &str| {
        info.lines()
            .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
            .map(str::to_string)
            .ok_or_else(|| format!("redis INFO has no {name}"))
    };
    let role = field(info_replication, "role")?;
    if role != "master" {
        return Err(format!("redis serves as a {role}, not a primary"));
    }
    let run_id = field(info_server, "run_id")?;
    let replication_id = field(info_replication, "master_replid")?;
    let short = |id: &str| {
        id.get(..8)
            .map(str::to_string)
            .ok_or_else(|| format!("redis id {id:?} too short"))
    };
    Ok(format!("{}{}", short(&run_id)?, short(&replication_id)?))
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
    use super::*;

    fn fields(values: &[Option<&str>]) -> Vec<Option<Vec<u8>>> {
        values
            .iter()
            .map(|v| v.map(|s| s.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn a_cached_entry_reads_back_as_its_state_and_an_incomplete_one_is_a_miss() {
        let at = chrono::DateTime::from_timestamp_micros(1_767_225_600_000_000).unwrap();
        let complete = [
            Some("7"),
            Some("120"),
            Some("30"),
            Some("150"),
            Some("0"),
            Some("2"),
            Some("40"),
            Some("1767225600000000"),
            Some(""),
        ];
        let state = cached_state(fields(&complete)).expect("a complete entry is a hit");
        assert_eq!(
            (
                state.version,
                state.available,
                state.pending,
                state.purchase_count
            ),
            (7, 120, 30, 2)
        );
        assert_eq!((state.lifetime_earned, state.lifetime_redeemed), (150, 0));
        assert_eq!(state.next_expiry, Some(PointsExpiry { points: 40, at }));
        assert_eq!(state.standing, None, "\"\" caches \"no standing\"");

        let mut no_expiry = complete;
        no_expiry[6] = Some("0");
        assert_eq!(cached_state(fields(&no_expiry)).unwrap().next_expiry, None);

        for missing in 0..complete.len() {
            let mut entry = complete;
            entry[missing] = None;
            assert!(
                cached_state(fields(&entry)).is_none(),
                "field {missing} missing"
            );
        }
        let mut garbled = complete;
        garbled[1] = Some("12x");
        assert!(cached_state(fields(&garbled)).is_none());
        let mut bad_standing = complete;
        bad_standing[8] = Some("{not json");
        assert!(cached_state(fields(&bad_standing)).is_none());
        assert!(
            cached_state(fields(&complete[..8])).is_none(),
            "too few fields"
        );

        // The standing in its binary form, and in the JSON older servers wrote.
        let standing = Standing {
            status: crate::status::rules::RepeatStatus::Returning,
            status_since: Some(at),
            hint: None,
            tier: None,
            progress: None,
            as_of: at,
        };
        for form in [
            standing_field(Some(&standing)),
            serde_json::to_vec(&standing).unwrap(),
        ] {
            let mut entry = fields(&complete);
            entry[8] = Some(form);
            let read = cached_state(entry).expect("a standing in either form is a hit");
            assert_eq!(read.standing.as_deref(), Some(&standing));
        }
    }

    #[test]
    fn one_slow_reply_does_not_open_the_breaker_but_a_dead_redis_does() {
        let breaker = Breaker::new(Duration::from_millis(1000));
        assert!(!breaker.record_failure(10));
        breaker.record_success();
        assert!(!breaker.record_failure(20));
        assert!(!breaker.record_failure(30));
        assert!(!breaker.is_open(30));
        assert!(
            breaker.record_failure(40),
            "the third failure in a row opens it"
        );
        assert!(breaker.is_open(41) && breaker.is_open(1039));
        assert!(!breaker.record_failure(500), "already open");
        // After the cool-down one operation goes through; if it fails, it opens again at once.
        assert!(!breaker.is_open(1040));
        assert!(breaker.record_failure(1050));
        assert!(breaker.is_open(1051));
        // A success closes the count.
        breaker.record_success();
        assert!(!breaker.record_failure(3000));
    }

    #[test]
    fn the_server_name_changes_with_a_restart_or_a_promotion_and_refuses_replicas() {
        let server = "# Server\r\nredis_version:7.0.15\r\nrun_id:0123456789abcdef0123\r\n";
        let primary = "# Replication\r\nrole:master\r\nmaster_replid:fedcba9876543210ff\r\n";
        assert_eq!(server_name(server, primary).unwrap(), "01234567fedcba98");
        let restarted = server.replace("0123456789", "aaaaaaaaaa");
        assert_ne!(
            server_name(&restarted, primary),
            server_name(server, primary)
        );
        let promoted = primary.replace("fedcba9876", "1111111111");
        assert_ne!(server_name(server, &promoted), server_name(server, primary));
        let replica = "# Replication\r\nrole:slave\r\nmaster_replid:fedcba9876543210ff\r\n";
        assert!(server_name(server, replica).unwrap_err().contains("slave"));
        assert!(server_name("", primary).is_err());
    }

    #[test]
    fn external_ids_cannot_break_the_hash_tag() {
        assert_eq!(escape("card-1"), "card-1");
        assert_eq!(escape("a}b{c%"), "a%7Db%7Bc%25");
        assert_ne!(escape("%7D"), escape("}"));
    }
}
