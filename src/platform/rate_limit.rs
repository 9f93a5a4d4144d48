//! A token bucket: `rate` requests per second on average, bursts up to `burst`.
//! Pure: the caller passes the current instant.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn full(limit: RateLimit, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: f64::from(limit.burst.max(1)),
            last: now,
        }
    }

    /// Takes one token, or says how long until one is available.
    pub fn try_take(&mut self, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        let rate = f64::from(limit.per_second.max(1));
        self.refill(limit, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }

    /// Returns a token taken for something that turned out not to count.
    pub fn give_back(&mut self, limit: RateLimit, now: Instant) {
        self.refill(limit, now);
        self.tokens = (self.tokens + 1.0).min(f64::from(limit.burst.max(1)));
    }

    fn refill(&mut self, limit: RateLimit, now: Instant) {
        let rate = f64::from(limit.per_second.max(1));
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(limit.burst.max(1)));
        self.last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let limit = RateLimit {
            per_second: 10,
            burst: 3,
        };
        let start = Instant::now();
        let mut bucket = TokenBucket::full(limit, start);
        for _ in 0..3 {
            assert!(bucket.try_take(limit, start).is_ok());
        }
        let wait = bucket.try_take(limit, start).unwrap_err();
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        assert!(
            bucket
                .try_take(limit, start + Duration::from_millis(100))
                .is_ok()
        );
        assert!(
            bucket
                .try_take(limit, start + Duration::from_millis(100))
                .is_err()
        );
        // A long pause refills only up to the burst.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(bucket.try_take(limit, later).is_ok());
        }
        assert!(bucket.try_take(limit, later).is_err());
    }
}
