//! Background work. Each job is safe to run on many replicas at once: it only acts on state it
//! owns (this replica's cache repairs, this replica's health status) or claims work in
//! Postgres.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::events::Events;
use crate::greetings::Greetings;
use crate::platform::cache_repair::Publisher;
use crate::points::Points;
use crate::telemetry::throttle::LogThrottle;

/// Customers (and, apart, holds) one sweep pass takes at most.
pub const SWEEP_BATCH: i64 = 500;

/// While Postgres is down every pass fails the same way.
static SWEEP_FAILURES: LogThrottle = LogThrottle::per_minute(6);
static SEQUENCER_FAILURES: LogThrottle = LogThrottle::per_minute(6);
static PRUNE_FAILURES: LogThrottle = LogThrottle::per_minute(6);
static WARNING_FAILURES: LogThrottle = LogThrottle::per_minute(6);

/// Events the sequencer numbers in one transaction at most.
pub const SEQUENCE_BATCH: i64 = 1000;

/// Events one pruning statement deletes at most.
pub const PRUNE_BATCH: i64 = 1000;

/// Expiry warnings one statement writes at most.
pub const WARNING_BATCH: i64 = 500;

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

/// While Postgres is down every greeting pass fails the same way.
static GREETING_FAILURES: LogThrottle = LogThrottle::per_minute(6);

/// The greeting job: makes the greetings due on each consenting customer's local day (with a
/// birthday's gift and bonus, and the `greeting_due` event, in the greeting's transaction).
/// Safe on every replica at once: a greeting's unique key (customer, occasion, year) makes it
/// once, and each customer's greetings are made under their account lock.
pub fn greetings(
    greetings: Greetings,
    interval: Duration,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    every(interval, stop, move || {
        let greetings = greetings.clone();
        async move {
            match greetings.run_due().await {
                Ok(report) => {
                    if report.greetings > 0 {
                        tracing::info!(
                            greetings = report.greetings,
                            gifts = report.gifts,
                            bonuses = report.bonuses,
                            "greetings made"
                        );
                    }
                }
                Err(error) => {
                    if let Some(suppressed) = GREETING_FAILURES.admit() {
                        tracing::warn!(%error, suppressed, "greeting job failed");
                    }
                }
            }
        }
    })
}

/// The sequencer of this replica: every `interval` it numbers the committed events that
/// have no position yet (batch after batch while batches come full), under an advisory lock
/// that only one replica holds at a time (see `events::store::sequence`). Every replica runs
/// one, so the stream goes on when any replica stops; a replica that finds the lock taken
/// leaves the turn to the holder. The delay from a commit to its position is at most about
/// `interval` (plus the batch's own statement). It polls rather than waiting for a NOTIFY
/// from the writers: a NOTIFY takes a database-wide lock at commit, which would queue every
/// checkout's commit behind the others'; an idle poll costs one index probe of the partial
/// `events_unsequenced_idx`.
pub fn event_sequencer(
    events: Events,
    interval: Duration,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    every(interval, stop, move || {
        let events = events.clone();
        async move {
            loop {
                match events.sequence(SEQUENCE_BATCH).await {
                    Ok(numbered) if numbered as i64 == SEQUENCE_BATCH => continue,
                    Ok(_) => return,
                    Err(error) => {
                        if let Some(suppressed) = SEQUENCER_FAILURES.admit() {
                            tracing::warn!(%error, suppressed, "event sequencer failed");
                        }
                        return;
                    }
                }
            }
        }
    })
}

/// Deletes the events past the retention, in batches; replicas take turns.
pub fn event_pruning(
    events: Events,
    interval: Duration,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    every(interval, stop, move || {
        let events = events.clone();
        async move {
            match events.prune(PRUNE_BATCH).await {
                Ok(pruned) if pruned.deleted > 0 => tracing::info!(
                    deleted = pruned.deleted,
                    pruned_through = pruned.pruned_through,
                    "events pruned"
                ),
                Ok(_) => {}
                Err(error) => {
                    if let Some(suppressed) = PRUNE_FAILURES.admit() {
                        tracing::warn!(%error, suppressed, "event pruning failed");
                    }
                }
            }
        }
    })
}

/// Writes a points_expiring event for every lot due for one (once per lot and expiry;
/// replicas split the lots with SKIP LOCKED).
pub fn expiry_warnings(
    events: Events,
    interval: Duration,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    every(interval, stop, move || {
        let events = events.clone();
        async move {
            match events.warn_expiring(WARNING_BATCH).await {
                Ok(written) if written > 0 => {
                    tracing::info!(written, "points expiry warnings written");
                }
                Ok(_) => {}
                Err(error) => {
                    if let Some(suppressed) = WARNING_FAILURES.admit() {
                        tracing::warn!(%error, suppressed, "expiry warnings failed");
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
