//! Rate-limited logging: a log site that can fire on every request (a database outage at
//! thousands of requests per second) writes at most N lines a minute and reports how many it
//! held back on its next line.
//!
//! ```text
//! static DB_DOWN: LogThrottle = LogThrottle::per_minute(10);
//! if let Some(suppressed) = DB_DOWN.admit() {
//!     tracing::warn!(%error, suppressed, "database unavailable");
//! }
//! ```

use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);

pub struct LogThrottle {
    max_per_window: u32,
    state: Mutex<State>,
}

struct State {
    window_started: Option<Instant>,
    written: u32,
    suppressed: u64,
}

impl LogThrottle {
    pub const fn per_minute(max: u32) -> LogThrottle {
        LogThrottle {
            max_per_window: max,
            state: Mutex::new(State {
                window_started: None,
                written: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(lines held back since the last written one)` when this line may be written.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let window_over = state
            .window_started
            .is_none_or(|started| now.saturating_duration_since(started) >= WINDOW);
        if window_over {
            state.window_started = Some(now);
            state.written = 0;
        }
        if state.written < self.max_per_window {
            state.written += 1;
            Some(std::mem::take(&mut state.suppressed))
        } else {
            state.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_writes_the_limit_per_minute_and_counts_the_rest() {
        let throttle = LogThrottle::per_minute(3);
        let start = Instant::now();
        let admitted: Vec<_> = (0..10_000)
            .map(|i| throttle.admit_at(start + Duration::from_micros(i)))
            .collect();
        assert_eq!(
            admitted.iter().flatten().copied().collect::<Vec<_>>(),
            [0, 0, 0]
        );
        // The next minute's first line tells how many were held back.
        assert_eq!(throttle.admit_at(start + WINDOW), Some(9_997));
        assert_eq!(throttle.admit_at(start + WINDOW), Some(0));
    }
}
