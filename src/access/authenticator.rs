//! Who is calling, and may they: API key verification with a short-lived in-memory cache (no
//! database round trip per RPC; a revocation takes effect within the cache TTL), and a
//! per-key rate limit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::access::rules::{KeyHash, SecretKey};
use crate::access::store;
use crate::error::Error;
use crate::platform::caller::Caller;
use crate::platform::layers::auth::Authenticate;
use crate::platform::rate_limit::{RateLimit, TokenBucket};
use crate::platform::store::Store;

/// Bounds the memory of each half of the key cache.
const MAX_CACHED_KEYS: usize = 10_000;
/// Longer than any key we issue; anything longer is not worth hashing.
const MAX_KEY_CHARS: usize = 256;

pub struct Authenticator {
    store: Store,
    keys: Mutex<KeyCache>,
    rate_limit: Option<RateLimit>,
    buckets: Mutex<HashMap<i64, TokenBucket>>,
}

impl Authenticator {
    /// `rate_limit: None` disables the per-key limit.
    pub fn new(store: Store, ttl: Duration, rate_limit: Option<RateLimit>) -> Authenticator {
        Authenticator {
            store,
            keys: Mutex::new(KeyCache::new(ttl)),
            rate_limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Resolves the value of an `authorization` header (`Bearer <key>`) to the caller.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, Error> {
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
        if key.is_empty() || key.len() > MAX_KEY_CHARS {
            return Err(Error::Unauthenticated("unknown or revoked API key"));
        }
        let hash = SecretKey::from_header(key).hash();
        let now = Instant::now();
        let cached = self
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&hash, now);
        let caller = match cached {
            Some(caller) => caller,
            None => {
                let mut conn = self.store.acquire().await?;
                let caller = store::find_key(&mut conn, hash)
                    .await?
                    .map(|record| Caller {
                        merchant: record.merchant,
                        key_id: record.key_id,
                        scope: record.scope,
                    });
                // Stamped with the time the lookup started, so a slow lookup cannot stretch
                // the window in which a revoked key still works.
                self.keys
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remember(hash, caller, now);
                caller
            }
        };
        caller.ok_or(Error::Unauthenticated("unknown or revoked API key"))
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

impl Authenticate for Authenticator {
    fn authenticate(
        &self,
        authorization: Option<&str>,
    ) -> impl Future<Output = Result<Caller, Error>> + Send {
        Authenticator::authenticate(self, authorization)
    }

    fn check_rate(&self, caller: &Caller) -> Result<(), Error> {
        Authenticator::check_rate(self, caller)
    }
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

    /// `Some(Some(caller))`: a verified key; `Some(None)`: a known unknown key; `None`: not
    /// looked up within the TTL.
    fn get(&self, hash: &KeyHash, now: Instant) -> Option<Option<Caller>> {
        if let Some(caller) = self.verified.get(hash, now) {
            return Some(Some(caller));
        }
        self.unknown.get(hash, now).map(|()| None)
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
        assert_eq!(cache.get(&hash_of("real"), later), Some(Some(caller(1))));
        assert_eq!(cache.get(&hash_of("bogus"), later), Some(None));
        assert_eq!(cache.get(&hash_of("never seen"), later), None);
        let expired = start + ttl;
        assert_eq!(cache.get(&hash_of("real"), expired), None);
        assert_eq!(cache.get(&hash_of("bogus"), expired), None);
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
        assert_eq!(cache.get(&hash_of("real"), now), Some(Some(caller(1))));
    }

    #[test]
    fn a_revoked_key_stops_being_verified_on_its_next_lookup() {
        let now = Instant::now();
        let mut cache = KeyCache::new(Duration::from_secs(5));
        cache.remember(hash_of("k"), Some(caller(1)), now);
        cache.remember(hash_of("k"), None, now);
        assert_eq!(cache.get(&hash_of("k"), now), Some(None));
        cache.remember(hash_of("k"), Some(caller(1)), now);
        assert_eq!(cache.get(&hash_of("k"), now), Some(Some(caller(1))));
    }
}
