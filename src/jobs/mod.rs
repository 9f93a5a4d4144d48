//! Background work. Each job is safe to run on many replicas at once: it only acts on state it
//! owns (this replica's cache repairs, this replica's health status) or claims work in
//! Postgres.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::platform::cache_repair::Publisher;

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
