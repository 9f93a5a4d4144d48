//! Background work. Each job is safe to run on many replicas at once: it only acts on state it
//! owns (this replica's cache repairs, this replica's health status) or claims work in
//! Postgres.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::platform::cache_repair::Publisher;
use crate::points::Points;
use crate::telemetry::throttle::LogThrottle;

/// Customers (and, apart, holds) one sweep pass takes at most.
pub const SWEEP_BATCH: i64 = 500;

/// While Postgres is down every pass fails the same way.
static SWEEP_FAILURES: LogThrottle = LogThrottle::per_minute(6);

/// Repeats `tick` every `every` until `stop` turns true.
fn every<F, Fut>(every: Duration, mut stop: watch::Receiver<bool>, mut tick: F) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopped = tokio::select! {
                _ = interval.tick() => false,
                _ = stop.wait_for(|stopped| *stopped) => true,
            };
            if stopped {
                return;
            }
            tick().await;
        }
    })
}

/// Puts committed state back into the cache where a post-commit cache write failed.
pub fn cache_repair(publisher: Publisher, stop: watch::Receiver<bool>) -> JoinHandle<()> {
    every(Duration::from_millis(250), stop, move || {
        let publisher = publisher.clone();
        async move {
            publisher.repair_cache().await;
        }
    })
}

/// The points sweep: holds past their ttl are released, pending lots mature, due lots
/// expire. Safe on every replica at once (it claims customers with `SKIP LOCKED`); a pass
/// that found a full batch is followed at once by another.
pub fn points_sweep(
    points: Points,
    interval: Duration,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    every(interval, stop, move || {
        let points = points.clone();
        async move {
            for _ in 0..10 {
                match points.sweep(SWEEP_BATCH).await {
                    Ok(report) => {
                        if report.lots_expired > 0 || report.holds_released > 0 {
                            tracing::info!(
                                holds_released = report.holds_released,
                                lots_matured = report.lots_matured,
                                lots_expired = report.lots_expired,
                                points_expired = report.points_expired,
                                "points sweep"
                            );
                        }
                        let busy =
                            report.holds_released + report.lots_matured + report.lots_expired;
                        if busy < SWEEP_BATCH as u64 {
                            return;
                        }
                    }
                    Err(error) => {
                        if let Some(suppressed) = SWEEP_FAILURES.admit() {
                            tracing::warn!(%error, suppressed, "points sweep failed");
                        }
                        return;
                    }
                }
            }
        }
    })
}

static STANDING_SWEEP_FAILURES: LogThrottle = LogThrottle::per_minute(6);

/// The standing sweep: AT_RISK, LAPSED and the other time-driven status changes, the tier's
/// downgrade warning and its downgrade after the grace, each customer when their `review_at`
/// comes. Safe on every replica at once (`status::use_cases`); a full batch is followed at
/// once by another.
pub fn standing_sweep(
    points: Points,
    interval: Duration,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    every(interval, stop, move || {
        let points = points.clone();
        async move {
            for _ in 0..10 {
                match points.standing_sweep(SWEEP_BATCH).await {
                    Ok(report) => {
                        if report.status_changes + report.tier_changes + report.warnings > 0 {
                            tracing::info!(
                                looked_at = report.looked_at,
                                status_changes = report.status_changes,
                                tier_changes = report.tier_changes,
                                warnings = report.warnings,
                                "standing sweep"
                            );
                        }
                        if report.looked_at < SWEEP_BATCH as u64 {
                            return;
                        }
                    }
                    Err(error) => {
                        if let Some(suppressed) = STANDING_SWEEP_FAILURES.admit() {
                            tracing::warn!(%error, suppressed, "standing sweep failed");
                        }
                        return;
                    }
                }
            }
        }
    })
}

/// Probes Postgres and publishes the result to the health service and the pool metrics.
pub fn health_probe<F, Fut>(
    interval: Duration,
    stop: watch::Receiver<bool>,
    probe: F,
) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    every(interval, stop, probe)
}
