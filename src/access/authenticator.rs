//! Who is calling, and may they: API key verification with a short-lived in-memory cache (no
//! database round trip per RPC; a revocation takes effect within the cache TTL), and a
//! per-key rate limit.
//!
//! Failed authentication is cheap and bounded too: a credential not shaped like ours is
//! refused without a lookup; an unknown key is remembered for the TTL (a repeated bogus key
//! costs no lookup); and each peer address has a budget of lookups that find nothing. A peer
//! past its budget gets RESOURCE_EXHAUSTED for keys this server has never verified, without a
//! lookup, while keys it has verified before keep working from every address, that one
//! included: a flood cannot lock out a real key.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::access::rules::{KeyHash, SecretKey};
use crate::access::store;
use crate::error::Error;
use crate::platform::caller::Caller;
use crate::platform::layers::auth::Authenticate;
use crate::platform::rate_limit::{RateLimit, TokenBucket};
use crate::platform::store::Store;
use crate::telemetry::Metrics;

/// Bounds the memory of each half of the key cache.
const MAX_CACHED_KEYS: usize = 10_000;
/// Bounds the memory of the per-peer failure budgets.
const MAX_TRACKED_PEERS: usize = 10_000;
/// Stands for the peer of a request that carries no address (not over TCP).
const UNKNOWN_PEER: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

const UNKNOWN_KEY: Error = Error::Unauthenticated("unknown or revoked API key");

pub struct Authenticator {
    store: Store,
    metrics: Metrics,
    keys: Mutex<KeyCache>,
    rate_limit: Option<RateLimit>,
    buckets: Mutex<HashMap<i64, TokenBucket>>,
    failures: FailureBudget,
}

impl Authenticator {
    /// `rate_limit: None` disables the per-key limit; `failed_lookups` is the budget of each
    /// peer address for lookups that find no key.
    pub fn new(
        store: Store,
        metrics: Metrics,
        ttl: Duration,
        rate_limit: Option<RateLimit>,
        failed_lookups: RateLimit,
    ) -> Authenticator {
        Authenticator {
            store,
            metrics,
            keys: Mutex::new(KeyCache::new(ttl)),
            rate_limit,
            buckets: Mutex::new(HashMap::new()),
            failures: FailureBudget::new(failed_lookups),
        }
    }

    /// Resolves the value of an `authorization` header (`Bearer <key>`) from `peer` to the
    /// caller.
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Result<Caller, Error> {
        let Some(header) = authorization else {
            return Err(Error::Unauthenticated(
                "missing authorization: Bearer <api key>",
            ));
        };
        let key = match header.split_once(' ') {
            Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => key.trim(),
            _ => {
                return Err(Error::Unauthenticated(
                    "authorization must be: Bearer <api key>",
                ));
            }
        };
        if !SecretKey::is_well_formed(key) {
            return Err(UNKNOWN_KEY);
        }
        let hash = SecretKey::from_header(key).hash();
        let now = Instant::now();
        let cached = self
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&hash, now);
        let caller = match cached {
            Cached::Verified(caller) => Some(caller),
            Cached::Unknown => None,
            Cached::Stale => self.look_up(hash, now).await?,
            Cached::Absent => {
                let peer = peer.unwrap_or(UNKNOWN_PEER);
                self.failures.take(peer, now)?;
                let caller = self.look_up(hash, now).await?;
                if caller.is_some() {
                    self.failures.give_back(peer, now);
                }
                caller
            }
        };
        caller.ok_or(UNKNOWN_KEY)
    }

    async fn look_up(&self, hash: KeyHash, now: Instant) -> Result<Option<Caller>, Error> {
        let mut conn = self.store.acquire().await?;
        let caller = store::find_key(&mut conn, hash)
            .await?
            .map(|record| Caller {
                merchant: record.merchant,
                key_id: record.key_id,
                scope: record.scope,
            });
        drop(conn);
        self.metrics.credential_lookup(match caller {
            Some(_) => "found",
            None => "unknown",
        });
        // Stamped with the time the lookup started, so a slow lookup cannot stretch the window
        // in which a revoked key still works.
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remember(hash, caller, now);
        Ok(caller)
    }

    /// Takes one request from the caller's key budget.
    pub fn check_rate(&self, caller: &Caller) -> Result<(), Error> {
        let Some(limit) = self.rate_limit else {
            return Ok(());
        };
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets
            .entry(caller.key_id)
            .or_insert_with(|| TokenBucket::full(limit, now));
        bucket
            .try_take(limit, now)
            .map_err(|wait| Error::ResourceExhausted {
                message: format!(
                    "rate limit of {} requests per second for this API key",
                    limit.per_second
                ),
                retry_after: Some(wait),
            })
    }
}

/// Each peer's budget of lookups that find nothing. A lookup takes from it up front (so
/// concurrent requests cannot overdraw it) and gives back when it found a key.
struct FailureBudget {
    limit: RateLimit,
    peers: Mutex<HashMap<IpAddr, TokenBucket>>,
}

impl FailureBudget {
    fn new(limit: RateLimit) -> FailureBudget {
        FailureBudget {
            limit,
            peers: Mutex::new(HashMap::new()),
        }
    }

    fn take(&self, peer: IpAddr, now: Instant) -> Result<(), Error> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.len() >= MAX_TRACKED_PEERS && !peers.contains_key(&peer) {
            // Forgetting every peer at worst hands each a fresh budget; a bounded map is worth
            // more than exact accounting across ten thousand addresses.
            peers.clear();
        }
        let limit = self.limit;
        peers
            .entry(peer)
            .or_insert_with(|| TokenBucket::full(limit, now))
            .try_take(limit, now)
            .map_err(|wait| Error::ResourceExhausted {
                message: format!(
                    "too many failed authentications from this address (at most {} per \
                     second); keys already verified still work",
                    limit.per_second
                ),
                retry_after: Some(wait),
            })
    }

    fn give_back(&self, peer: IpAddr, now: Instant) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bucket) = peers.get_mut(&peer) {
            bucket.give_back(self.limit, now);
        }
    }
}

impl Authenticate for Authenticator {
    fn authenticate(
        &self,
        authorization: Option<&str>,
        peer: Option<IpAddr>,
    ) -> impl Future<Output = Result<Caller, Error>> + Send {
        Authenticator::authenticate(self, authorization, peer)
    }

    fn check_rate(&self, caller: &Caller) -> Result<(), Error> {
        Authenticator::check_rate(self, caller)
    }
}

/// What the key cache knows of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cached {
    /// Verified within the TTL.
    Verified(Caller),
    /// Looked up within the TTL and not found.
    Unknown,
    /// Verified before, longer ago than the TTL: it must be looked up again, but it is a real
    /// key (or was), so its lookup is not charged to the peer.
    Stale,
    /// Never looked up (or forgotten).
    Absent,
}

/// Looked-up keys, verified and unknown ones apart. A flood of bogus keys fills (and, when
/// full, clears) only its own half, never pushing out the keys of real callers.
struct KeyCache {
    verified: Lookups<Caller>,
    unknown: Lookups<()>,
}

impl KeyCache {
    fn new(ttl: Duration) -> KeyCache {
        KeyCache {
            verified: Lookups::new(ttl),
            unknown: Lookups::new(ttl),
        }
    }

    fn get(&self, hash: &KeyHash, now: Instant) -> Cached {
        if let Some(caller) = self.verified.get(hash, now) {
            return Cached::Verified(caller);
        }
        if self.unknown.get(hash, now).is_some() {
            return Cached::Unknown;
        }
        if self.verified.holds(hash) {
            return Cached::Stale;
        }
        Cached::Absent
    }

    fn remember(&mut self, hash: KeyHash, caller: Option<Caller>, now: Instant) {
        match caller {
            Some(caller) => {
                self.unknown.remove(&hash);
                self.verified.insert(hash, caller, now);
            }
            None => {
                self.verified.remove(&hash);
                self.unknown.insert(hash, (), now);
            }
        }
    }
}

/// Lookup results with the time of their lookup, valid for the TTL, at most
/// [`MAX_CACHED_KEYS`] of them.
struct Lookups<V> {
    ttl: Duration,
    entries: HashMap<KeyHash, (V, Instant)>,
}

impl<V: Copy> Lookups<V> {
    fn new(ttl: Duration) -> Lookups<V> {
        Lookups {
            ttl,
            entries: HashMap::new(),
        }
    }

    fn get(&self, hash: &KeyHash, now: Instant) -> Option<V> {
        match self.entries.get(hash) {
            Some((value, checked_at)) if is_fresh(*checked_at, now, self.ttl) => Some(*value),
            _ => None,
        }
    }

    /// Whether the hash has an entry, fresh or not.
    fn holds(&self, hash: &KeyHash) -> bool {
        self.entries.contains_key(hash)
    }

    fn remove(&mut self, hash: &KeyHash) {
        self.entries.remove(hash);
    }

    /// Makes room by dropping expired entries first, everything if that is not enough.
    fn insert(&mut self, hash: KeyHash, value: V, now: Instant) {
        if self.entries.len() >= MAX_CACHED_KEYS {
            let ttl = self.ttl;
            self.entries
                .retain(|_, (_, checked_at)| is_fresh(*checked_at, now, ttl));
            if self.entries.len() >= MAX_CACHED_KEYS {
                self.entries.clear();
            }
        }
        self.entries.insert(hash, (value, now));
    }
}

fn is_fresh(checked_at: Instant, now: Instant, ttl: Duration) -> bool {
    now.saturating_duration_since(checked_at) < ttl
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::caller::{MerchantId, Scope};

    fn hash_of(key: &str) -> KeyHash {
        SecretKey::from_header(key).hash()
    }

    fn caller(key_id: i64) -> Caller {
        Caller {
            merchant: MerchantId(7),
            key_id,
            scope: Scope::Pos,
        }
    }

    #[test]
    fn entries_live_for_the_ttl_only() {
        let start = Instant::now();
        let ttl = Duration::from_secs(5);
        let mut cache = KeyCache::new(ttl);
        cache.remember(hash_of("real"), Some(caller(1)), start);
        cache.remember(hash_of("bogus"), None, start);
        let later = start + Duration::from_secs(4);
        assert_eq!(
            cache.get(&hash_of("real"), later),
            Cached::Verified(caller(1))
        );
        assert_eq!(cache.get(&hash_of("bogus"), later), Cached::Unknown);
        assert_eq!(cache.get(&hash_of("never seen"), later), Cached::Absent);
        let expired = start + ttl;
        // A key verified before is looked up again, but known to have been real.
        assert_eq!(cache.get(&hash_of("real"), expired), Cached::Stale);
        assert_eq!(cache.get(&hash_of("bogus"), expired), Cached::Absent);
    }

    #[test]
    fn a_flood_of_bogus_keys_never_pushes_out_a_real_one() {
        let now = Instant::now();
        let mut cache = KeyCache::new(Duration::from_secs(5));
        cache.remember(hash_of("real"), Some(caller(1)), now);
        for i in 0..3 * MAX_CACHED_KEYS {
            cache.remember(hash_of(&format!("bogus-{i}")), None, now);
        }
        assert!(cache.unknown.entries.len() <= MAX_CACHED_KEYS);
        assert_eq!(
            cache.get(&hash_of("real"), now),
            Cached::Verified(caller(1))
        );
    }

    #[test]
    fn a_revoked_key_stops_being_verified_on_its_next_lookup() {
        let now = Instant::now();
        let mut cache = KeyCache::new(Duration::from_secs(5));
        cache.remember(hash_of("k"), Some(caller(1)), now);
        cache.remember(hash_of("k"), None, now);
        assert_eq!(cache.get(&hash_of("k"), now), Cached::Unknown);
        cache.remember(hash_of("k"), Some(caller(1)), now);
        assert_eq!(cache.get(&hash_of("k"), now), Cached::Verified(caller(1)));
    }

    #[test]
    fn each_peer_has_its_own_budget_of_failed_lookups() {
        let budget = FailureBudget::new(RateLimit {
            per_second: 1,
            burst: 2,
        });
        let now = Instant::now();
        let attacker: IpAddr = "203.0.113.7".parse().unwrap();
        let other: IpAddr = "198.51.100.1".parse().unwrap();
        assert!(budget.take(attacker, now).is_ok());
        assert!(budget.take(attacker, now).is_ok());
        let refused = budget.take(attacker, now).unwrap_err();
        assert!(
            matches!(refused, Error::ResourceExhausted { .. }),
            "{refused:?}"
        );
        assert!(budget.take(other, now).is_ok());
        // A lookup that found a key costs nothing.
        budget.give_back(attacker, now);
        assert!(budget.take(attacker, now).is_ok());
        assert!(budget.take(attacker, now + Duration::from_secs(1)).is_ok());
    }
}
