//! Who is calling, and may they: API key verification with a short-lived in-memory cache (no
//! database round trip per RPC; a revocation takes effect within the cache TTL), and a
//! per-key rate limit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::domain::api_key::{KeyHash, SecretKey};
use crate::domain::rate_limit::{RateLimit, TokenBucket};
use crate::error::Error;
use crate::service::Caller;
use crate::storage::{Store, merchants};

/// Bounds memory when callers send many distinct (mostly bogus) keys.
const MAX_CACHED_KEYS: usize = 10_000;
/// Longer than any key we issue; anything longer is not worth hashing.
const MAX_KEY_CHARS: usize = 256;

pub struct Authenticator {
    store: Store,
    ttl: Duration,
    /// Verified keys and known-bad keys, with the time they were looked up.
    keys: Mutex<HashMap<KeyHash, (Option<Caller>, Instant)>>,
    rate_limit: Option<RateLimit>,
    buckets: Mutex<HashMap<i64, TokenBucket>>,
}

impl Authenticator {
    /// `rate_limit: None` disables the per-key limit.
    pub fn new(store: Store, ttl: Duration, rate_limit: Option<RateLimit>) -> Authenticator {
        Authenticator {
            store,
            ttl,
            keys: Mutex::new(HashMap::new()),
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
            .get(&hash)
            .copied();
        let caller = match cached {
            Some((caller, checked_at)) if now.duration_since(checked_at) < self.ttl => caller,
            _ => {
                let caller = merchants::find_key(self.store.pool(), hash)
                    .await?
                    .map(|record| Caller {
                        merchant: record.merchant,
                        key_id: record.key_id,
                        scope: record.scope,
                    });
                self.remember(hash, caller, now);
                caller
            }
        };
        caller.ok_or(Error::Unauthenticated("unknown or revoked API key"))
    }

    fn remember(&self, hash: KeyHash, caller: Option<Caller>, now: Instant) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if keys.len() >= MAX_CACHED_KEYS {
            keys.retain(|_, (_, checked_at)| now.duration_since(*checked_at) < self.ttl);
            if keys.len() >= MAX_CACHED_KEYS {
                keys.clear();
            }
        }
        keys.insert(hash, (caller, now));
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
