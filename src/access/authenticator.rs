//! Who is calling, and may they: API key verification with a short-lived in-memory cache (no
//! database round trip per RPC; a revocation takes effect within the cache TTL), and a
//! per-key rate limit.
//!
//! Customer tokens (`lct_...`, see `tokens.rs`) are verified here too: the expiry against the
//! service clock, then the MAC under the secret of the key that minted them, cached by key id
//! for the same TTL, so a revoked key's tokens stop working within it as well. A token's
//! caller has the scope `customer` and the one external_id it may read.
//!
//! Failed authentication is cheap and bounded too: a credential not shaped like ours is
//! refused without a lookup; an unknown key is remembered for the TTL (a repeated bogus key
//! costs no lookup); and each peer address has a budget of lookups that find nothing. A peer
//! past its budget gets RESOURCE_EXHAUSTED for keys this server has never verified, without a
//! lookup, while keys it has verified before keep working from every address, that one
//! included: a flood cannot lock out a real key.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::access::rules::{KeyHash, SecretKey};
use crate::access::store::{self, KeyRecord, SignerRecord};
use crate::access::tokens::{TOKEN_PREFIX, Unverified};
use crate::error::Error;
use crate::platform::caller::{Caller, Scope};
use crate::platform::clock::Clock;
use crate::platform::layers::auth::Authenticate;
use crate::platform::rate_limit::{RateLimit, TokenBucket};
use crate::platform::store::Store;
use crate::telemetry::Metrics;

/// Bounds the memory of each half of the key cache.
const MAX_CACHED_KEYS: usize = 10_000;
/// Bounds the memory of the per-peer failure budgets.
const MAX_TRACKED_PEERS: usize = 10_000;
/// Bounds the memory of the rate limit buckets (one per key, and one per customer of a key
/// whose tokens are in use).
const MAX_BUCKETS: usize = 100_000;
/// Stands for the peer of a request that carries no address (not over TCP).
const UNKNOWN_PEER: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

const UNKNOWN_KEY: Error = Error::Unauthenticated("unknown or revoked API key");
const BAD_TOKEN: Error = Error::Unauthenticated("invalid, expired or revoked customer token");

/// The scopes whose keys may mint customer tokens (those that read customers).
const MINTING_SCOPES: [Scope; 3] = [Scope::App, Scope::Pos, Scope::Admin];

/// Whose rate limit bucket a request takes from: the key's, or for a customer token the
/// bucket of that customer under the minting key (so one app user cannot spend the budget
/// of all the others).
type BucketKey = (i64, Option<Arc<str>>);

pub struct Authenticator {
    store: Store,
    metrics: Metrics,
    clock: Arc<dyn Clock>,
    /// API keys by hash.
    keys: Mutex<LookupCache<KeyHash, KeyRecord>>,
    /// The keys that sign customer tokens, by key id.
    signers: Mutex<LookupCache<i64, SignerRecord>>,
    rate_limit: Option<RateLimit>,
    buckets: Mutex<HashMap<BucketKey, TokenBucket>>,
    failures: FailureBudget,
}

impl Authenticator {
    /// `rate_limit: None` disables the per-key limit; `failed_lookups` is the budget of each
    /// peer address for lookups that find no key. `ttl` bounds how long a revoked key (and
    /// every customer token it minted) keeps working.
    pub fn new(
        store: Store,
        metrics: Metrics,
        clock: Arc<dyn Clock>,
        ttl: Duration,
        rate_limit: Option<RateLimit>,
        failed_lookups: RateLimit,
    ) -> Authenticator {
        Authenticator {
            store,
            metrics,
            clock,
            keys: Mutex::new(LookupCache::new(ttl)),
            signers: Mutex::new(LookupCache::new(ttl)),
            rate_limit,
            buckets: Mutex::new(HashMap::new()),
            failures: FailureBudget::new(failed_lookups),
        }
    }

    /// Resolves the value of an `authorization` header (`Bearer <key or customer token>`)
    /// from `peer` to the caller.
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
        let credential = match header.split_once(' ') {
            Some((scheme, credential)) if scheme.eq_ignore_ascii_case("bearer") => {
                credential.trim()
            }
            _ => {
                return Err(Error::Unauthenticated(
                    "authorization must be: Bearer <api key>",
                ));
            }
        };
        let peer = peer.unwrap_or(UNKNOWN_PEER);
        if credential.starts_with(TOKEN_PREFIX) {
            return self.authenticate_token(credential, peer).await;
        }
        if !SecretKey::is_well_formed(credential) {
            return Err(UNKNOWN_KEY);
        }
        let hash = SecretKey::from_header(credential).hash();
        let record = self
            .cached_or_looked_up(&self.keys, hash, peer, |conn| {
                Box::pin(store::find_key(conn, hash))
            })
            .await?
            .ok_or(UNKNOWN_KEY)?;
        Ok(Caller::with_key(
            record.merchant,
            record.key_id,
            record.scope,
        ))
    }

    /// A customer token: expiry first (no lookup for an expired one), then the MAC under the
    /// secret of the key that minted it, which must still be live.
    async fn authenticate_token(&self, token: &str, peer: IpAddr) -> Result<Caller, Error> {
        let unverified = Unverified::parse(token).ok_or(BAD_TOKEN)?;
        if !unverified.is_live(self.clock.now()) {
            return Err(BAD_TOKEN);
        }
        let key_id = unverified.claims.key_id;
        let signer = self
            .cached_or_looked_up(&self.signers, key_id, peer, |conn| {
                Box::pin(store::find_signer(conn, key_id))
            })
            .await?
            .ok_or(BAD_TOKEN)?;
        let secret = signer.secret.ok_or(BAD_TOKEN)?;
        let claims = unverified.verify(&secret).ok_or(BAD_TOKEN)?;
        if claims.merchant != signer.merchant || !MINTING_SCOPES.contains(&signer.scope) {
            return Err(BAD_TOKEN);
        }
        Ok(Caller {
            merchant: signer.merchant,
            key_id,
            scope: Scope::Customer,
            customer: Some(claims.external_id.into()),
        })
    }

    /// The cached answer for `id`, or a lookup. A lookup of an id never verified before is
    /// charged to the peer's failure budget up front and given back if it found something.
    async fn cached_or_looked_up<K, V>(
        &self,
        cache: &Mutex<LookupCache<K, V>>,
        id: K,
        peer: IpAddr,
        look_up: impl for<'c> FnOnce(
            &'c mut sqlx::PgConnection,
        )
            -> futures::future::BoxFuture<'c, Result<Option<V>, Error>>,
    ) -> Result<Option<V>, Error>
    where
        K: Hash + Eq + Copy,
        V: Clone,
    {
        let now = Instant::now();
        let cached = cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id, now);
        let charged = match cached {
            Cached::Verified(value) => return Ok(Some(value)),
            Cached::Unknown => return Ok(None),
            Cached::Stale => false,
            Cached::Absent => {
                self.failures.take(peer, now)?;
                true
            }
        };
        let found = match self.store.acquire().await {
            Ok(mut conn) => look_up(&mut conn).await,
            Err(error) => Err(error),
        };
        // Only a lookup that found nothing counts against the peer; one that found a
        // credential, or could not ask (PostgreSQL down), is given back.
        if charged && !matches!(found, Ok(None)) {
            self.failures.give_back(peer, now);
        }
        let found = found?;
        self.metrics.credential_lookup(match found {
            Some(_) => "found",
            None => "unknown",
        });
        // Stamped with the time the lookup started, so a slow lookup cannot stretch the window
        // in which a revoked key still works.
        cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remember(id, found.clone(), now);
        Ok(found)
    }

    /// Takes one request from the caller's budget: its key's, or for a customer token that
    /// customer's under the minting key.
    pub fn check_rate(&self, caller: &Caller) -> Result<(), Error> {
        let Some(limit) = self.rate_limit else {
            return Ok(());
        };
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket_key = (caller.key_id, caller.customer.clone());
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&bucket_key) {
            // Forgetting every bucket at worst hands each caller a fresh burst.
            buckets.clear();
        }
        let bucket = buckets
            .entry(bucket_key)
            .or_insert_with(|| TokenBucket::full(limit, now));
        bucket
            .try_take(limit, now)
            .map_err(|wait| Error::ResourceExhausted {
                message: format!(
                    "rate limit of {} requests per second for this {}",
                    limit.per_second,
                    match caller.customer {
                        None => "API key",
                        Some(_) => "customer",
                    }
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

/// What the cache knows of a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cached<V> {
    /// Verified within the TTL.
    Verified(V),
    /// Looked up within the TTL and not found.
    Unknown,
    /// Verified before, longer ago than the TTL: it must be looked up again, but it is a real
    /// credential (or was), so its lookup is not charged to the peer.
    Stale,
    /// Never looked up (or forgotten).
    Absent,
}

/// Looked-up credentials, verified and unknown ones apart. A flood of bogus ones fills (and,
/// when full, clears) only its own half, never pushing out those of real callers.
struct LookupCache<K, V> {
    verified: Lookups<K, V>,
    unknown: Lookups<K, ()>,
}

impl<K: Hash + Eq + Copy, V: Clone> LookupCache<K, V> {
    fn new(ttl: Duration) -> LookupCache<K, V> {
        LookupCache {
            verified: Lookups::new(ttl),
            unknown: Lookups::new(ttl),
        }
    }

    fn get(&self, id: &K, now: Instant) -> Cached<V> {
        if let Some(value) = self.verified.get(id, now) {
            return Cached::Verified(value);
        }
        if self.unknown.get(id, now).is_some() {
            return Cached::Unknown;
        }
        if self.verified.holds(id) {
            return Cached::Stale;
        }
        Cached::Absent
    }

    fn remember(&mut self, id: K, value: Option<V>, now: Instant) {
        match value {
            Some(value) => {
                self.unknown.remove(&id);
                self.verified.insert(id, value, now);
            }
            None => {
                self.verified.remove(&id);
                self.unknown.insert(id, (), now);
            }
        }
    }
}

/// Lookup results with the time of their lookup, valid for the TTL, at most
/// [`MAX_CACHED_KEYS`] of them.
struct Lookups<K, V> {
    ttl: Duration,
    entries: HashMap<K, (V, Instant)>,
}

impl<K: Hash + Eq, V: Clone> Lookups<K, V> {
    fn new(ttl: Duration) -> Lookups<K, V> {
        Lookups {
            ttl,
            entries: HashMap::new(),
        }
    }

    fn get(&self, id: &K, now: Instant) -> Option<V> {
        match self.entries.get(id) {
            Some((value, checked_at)) if is_fresh(*checked_at, now, self.ttl) => {
                Some(value.clone())
            }
            _ => None,
        }
    }

    /// Whether the id has an entry, fresh or not.
    fn holds(&self, id: &K) -> bool {
        self.entries.contains_key(id)
    }

    fn remove(&mut self, id: &K) {
        self.entries.remove(id);
    }

    /// Makes room by dropping expired entries first, everything if that is not enough.
    fn insert(&mut self, id: K, value: V, now: Instant) {
        if self.entries.len() >= MAX_CACHED_KEYS {
            let ttl = self.ttl;
            self.entries
                .retain(|_, (_, checked_at)| is_fresh(*checked_at, now, ttl));
            if self.entries.len() >= MAX_CACHED_KEYS {
                self.entries.clear();
            }
        }
        self.entries.insert(id, (value, now));
    }
}

fn is_fresh(checked_at: Instant, now: Instant, ttl: Duration) -> bool {
    now.saturating_duration_since(checked_at) < ttl
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::caller::MerchantId;

    fn hash_of(key: &str) -> KeyHash {
        SecretKey::from_header(key).hash()
    }

    fn caller(key_id: i64) -> KeyRecord {
        KeyRecord {
            merchant: MerchantId(7),
            key_id,
            scope: Scope::Pos,
        }
    }

    #[test]
    fn entries_live_for_the_ttl_only() {
        let start = Instant::now();
        let ttl = Duration::from_secs(5);
        let mut cache: LookupCache<KeyHash, KeyRecord> = LookupCache::new(ttl);
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
        let mut cache: LookupCache<KeyHash, KeyRecord> = LookupCache::new(Duration::from_secs(5));
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
        let mut cache: LookupCache<KeyHash, KeyRecord> = LookupCache::new(Duration::from_secs(5));
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
