//! The `watch` scenario's watchers: WatchEvents streams, each on a connection of its own with
//! the run's scheduler key, that follow the bench merchant's events while checkout's load
//! runs, and the judgement of what they received against what checkout was told.
//!
//! A watcher starts after the stream's end as it was before the load (`setup::stream_end`),
//! so it sees this run's events only; after any error it reconnects with the last cursor it
//! received (counted, and reported: on the bench's quiet server there should be none). For
//! every event it notes the delay from the event's `occurred_at` to its arrival, and for every
//! purchase_recorded event of this run (its `purchase_id` carries the run's tag) how many times
//! it came.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use loyalty::code_name;
use loyalty::pb;
use loyalty::pb::engagement_service_client::EngagementServiceClient;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Endpoint;

use crate::load::PurchaseLog;
use crate::stats::{Recorder, rate, round3};

/// After the load, how long the watchers get to receive every acknowledged purchase.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Once every watcher has every acknowledged purchase, how much longer they listen, so that a
/// duplicate (or the event of a checkout whose answer was lost) shows in the figures.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// Wait before a reconnect.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(50);

/// The wall-clock window the figures count (the checkout load's measured window).
#[derive(Debug, Clone, Copy)]
pub struct WallWindow {
    pub from: SystemTime,
    pub until: SystemTime,
}

impl WallWindow {
    fn contains(&self, at: SystemTime) -> bool {
        at >= self.from && at < self.until
    }

    fn seconds(&self) -> f64 {
        self.until
            .duration_since(self.from)
            .unwrap_or_default()
            .as_secs_f64()
    }
}

/// What one watcher received.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// This run's purchase ids and how many purchase_recorded events named each.
    pub purchases: HashMap<String, u32>,
    /// Events of any type that arrived within the measured window.
    pub events_in_window: u64,
    /// Delay from `occurred_at` to arrival, of the events that occurred in the window.
    pub delays: Recorder,
    /// Streams that ended with an error (each followed by a reconnect), by code.
    pub errors: BTreeMap<String, u64>,
    /// Cursors that were not above the one before (as numbers; the service's cursors are).
    pub cursors_out_of_order: u64,
}

impl Tally {
    fn note(&mut self, event: &pb::Event, tag: &str, window: &WallWindow, arrived: SystemTime) {
        if window.contains(arrived) {
            self.events_in_window += 1;
        }
        if let Some(occurred) = event.occurred_at.as_ref().and_then(system_time)
            && window.contains(occurred)
        {
            self.delays
                .ok(arrived.duration_since(occurred).unwrap_or_default());
        }
        if event.r#type == pb::EventType::PurchaseRecorded as i32
            && let Some(purchase_id) = purchase_id_of(&event.details_json)
            && purchase_id.starts_with(tag)
        {
            *self.purchases.entry(purchase_id).or_default() += 1;
        }
    }
}

/// The `purchase_id` of a purchase_recorded event's details.
pub fn purchase_id_of(details_json: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(details_json).ok()?;
    Some(value.get("purchase_id")?.as_str()?.to_string())
}

/// Whether `next` comes after `previous` in the stream (cursors compared as numbers; an
/// unparsable one counts as out of order).
pub fn in_order(previous: &str, next: &str) -> bool {
    if previous.is_empty() {
        return true;
    }
    match (previous.parse::<u64>(), next.parse::<u64>()) {
        (Ok(p), Ok(n)) => n > p,
        _ => false,
    }
}

fn system_time(ts: &prost_types::Timestamp) -> Option<SystemTime> {
    let seconds = u64::try_from(ts.seconds).ok()?;
    let nanos = u32::try_from(ts.nanos).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))
}

/// The watchers of one measurement, running.
pub struct Watchers {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Tally>>,
    /// Per watcher: distinct purchases of this run received so far.
    progress: Vec<Arc<AtomicU64>>,
}

impl Watchers {
    /// Starts `count` watchers after `cursor`, counting the purchases whose id starts with `tag`.
    pub async fn start(
        endpoint: &str,
        scheduler_key: &str,
        count: u32,
        cursor: String,
        tag: String,
        window: WallWindow,
    ) -> Result<Watchers> {
        let auth: MetadataValue<Ascii> = format!("Bearer {scheduler_key}")
            .parse()
            .context("the scheduler key is not ASCII")?;
        let endpoint = Endpoint::from_shared(endpoint.to_string())?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5));
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut progress = Vec::new();
        for _ in 0..count {
            // Its own HTTP/2 connection, as a separate consumer would have.
            let channel = endpoint
                .connect()
                .await
                .with_context(|| format!("cannot connect to {}", endpoint.uri()))?;
            let seen = Arc::new(AtomicU64::new(0));
            progress.push(seen.clone());
            let watcher = Watcher {
                client: EngagementServiceClient::new(channel),
                auth: auth.clone(),
                cursor: cursor.clone(),
                tag: tag.clone(),
                window,
                seen,
            };
            tasks.push(tokio::spawn(watcher.run(stopped.clone())));
        }
        Ok(Watchers {
            stop,
            tasks,
            progress,
        })
    }

    /// Waits until every watcher has received `expected` distinct purchases of this run (then
    /// a short grace), or [`DRAIN_LIMIT`]; stops them and returns what each received and how
    /// long the drain took.
    pub async fn finish(self, expected: usize) -> Result<(Vec<Tally>, Duration)> {
        let started = Instant::now();
        loop {
            let done = self
                .progress
                .iter()
                .all(|seen| seen.load(Ordering::Relaxed) >= expected as u64);
            if done || started.elapsed() > DRAIN_LIMIT {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let drained = started.elapsed();
        tokio::time::sleep(DRAIN_GRACE).await;
        let _ = self.stop.send(true);
        let mut tallies = Vec::new();
        for task in self.tasks {
            tallies.push(task.await.context("a watcher panicked")?);
        }
        Ok((tallies, drained))
    }
}

struct Watcher {
    client: EngagementServiceClient<tonic::transport::Channel>,
    auth: MetadataValue<Ascii>,
    cursor: String,
    tag: String,
    window: WallWindow,
    seen: Arc<AtomicU64>,
}

impl Watcher {
    async fn run(mut self, mut stopped: watch::Receiver<bool>) -> Tally {
        let mut tally = Tally::default();
        while !*stopped.borrow_and_update() {
            let mut request = tonic::Request::new(pb::WatchEventsRequest {
                after_cursor: self.cursor.clone(),
                types: Vec::new(),
            });
            request
                .metadata_mut()
                .insert("authorization", self.auth.clone());
            let opened = tokio::select! {
                opened = self.client.watch_events(request) => opened,
                _ = stopped.changed() => break,
            };
            let mut stream = match opened {
                Ok(stream) => stream.into_inner(),
                Err(status) => {
                    *tally
                        .errors
                        .entry(code_name(status.code()).into())
                        .or_default() += 1;
                    tokio::time::sleep(RECONNECT_BACKOFF).await;
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    next = stream.message() => next,
                    _ = stopped.changed() => return tally,
                };
                match next {
                    Ok(Some(pb::WatchEventsResponse { event: Some(event) })) => {
                        let arrived = SystemTime::now();
                        if !in_order(&self.cursor, &event.cursor) {
                            tally.cursors_out_of_order += 1;
                        }
                        self.cursor = event.cursor.clone();
                        tally.note(&event, &self.tag, &self.window, arrived);
                        self.seen
                            .store(tally.purchases.len() as u64, Ordering::Relaxed);
                    }
                    Ok(Some(pb::WatchEventsResponse { event: None })) => {}
                    Ok(None) => {
                        *tally.errors.entry("STREAM_ENDED".into()).or_default() += 1;
                        break;
                    }
                    Err(status) => {
                        *tally
                            .errors
                            .entry(code_name(status.code()).into())
                            .or_default() += 1;
                        break;
                    }
                }
            }
            tokio::time::sleep(RECONNECT_BACKOFF).await;
        }
        tally
    }
}

/// Every watcher's purchases against checkout's answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exactness {
    /// (watcher, purchase) pairs of an OK checkout whose event never came.
    pub missing: u64,
    /// Events beyond the first of one purchase at one watcher.
    pub duplicated: u64,
    /// Purchases of this run that no checkout was sent for.
    pub unexpected: u64,
    /// Purchases answered with an error whose event came (they committed after all).
    pub committed_unanswered: u64,
}

impl Exactness {
    pub fn exact(&self) -> bool {
        self.missing == 0 && self.duplicated == 0 && self.unexpected == 0
    }
}

/// Judges what every watcher received: each OK checkout's purchase exactly once, a failed one
/// at most once, nothing else.
pub fn judge(log: &PurchaseLog, tallies: &[Tally]) -> Exactness {
    let mut found = Exactness::default();
    for tally in tallies {
        found.missing += log
            .ok
            .iter()
            .filter(|id| !tally.purchases.contains_key(*id))
            .count() as u64;
        for (id, times) in &tally.purchases {
            found.duplicated += u64::from(times.saturating_sub(1));
            if log.failed.contains(id) {
                found.committed_unanswered += 1;
            } else if !log.ok.contains(id) {
                found.unexpected += 1;
            }
        }
    }
    found
}

/// The figures of a `watch` measurement (the report's watch columns).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    pub watchers: u32,
    /// Events delivered in the measured window, summed over the watchers.
    pub events: u64,
    pub events_per_sec: f64,
    pub events_per_sec_per_watcher: f64,
    /// The slowest watcher's rate.
    pub events_per_sec_min_watcher: f64,
    pub delivery_p50_ms: Option<f64>,
    pub delivery_p99_ms: Option<f64>,
    pub delivery_max_ms: Option<f64>,
    pub exactness: Exactness,
    pub stream_errors: BTreeMap<String, u64>,
    pub cursors_out_of_order: u64,
    /// How long after the load the last watcher had every acknowledged purchase.
    pub drain_ms: f64,
}

impl Figures {
    pub fn of(log: &PurchaseLog, tallies: &[Tally], window: &WallWindow, drain: Duration) -> Self {
        let seconds = window.seconds();
        let mut delays = Recorder::new();
        let mut errors = BTreeMap::new();
        for tally in tallies {
            delays.merge(&tally.delays);
            for (code, n) in &tally.errors {
                *errors.entry(code.clone()).or_default() += n;
            }
        }
        let events: u64 = tallies.iter().map(|t| t.events_in_window).sum();
        let per_watcher: Vec<f64> = tallies
            .iter()
            .map(|t| rate(t.events_in_window, seconds))
            .collect();
        let watchers = tallies.len() as u32;
        Figures {
            watchers,
            events,
            events_per_sec: round3(rate(events, seconds)),
            events_per_sec_per_watcher: round3(rate(events, seconds) / f64::from(watchers.max(1))),
            events_per_sec_min_watcher: per_watcher
                .iter()
                .copied()
                .reduce(f64::min)
                .map_or(0.0, round3),
            delivery_p50_ms: delays.quantile_ms(0.50).map(round3),
            delivery_p99_ms: delays.quantile_ms(0.99).map(round3),
            delivery_max_ms: delays.max_ms().map(round3),
            exactness: judge(log, tallies),
            stream_errors: errors,
            cursors_out_of_order: tallies.iter().map(|t| t.cursors_out_of_order).sum(),
            drain_ms: round3(drain.as_secs_f64() * 1000.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(ok: &[&str], failed: &[&str]) -> PurchaseLog {
        PurchaseLog {
            ok: ok.iter().map(|s| s.to_string()).collect(),
            failed: failed.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn tally(purchases: &[(&str, u32)]) -> Tally {
        Tally {
            purchases: purchases
                .iter()
                .map(|(id, n)| (id.to_string(), *n))
                .collect(),
            ..Tally::default()
        }
    }

    #[test]
    fn every_watcher_must_have_every_acknowledged_purchase_once() {
        let log = log(&["t-1", "t-2", "t-3"], &["t-4", "t-5"]);
        let exact = [
            tally(&[("t-1", 1), ("t-2", 1), ("t-3", 1)]),
            tally(&[("t-1", 1), ("t-2", 1), ("t-3", 1), ("t-4", 1)]),
        ];
        let judged = judge(&log, &exact);
        assert!(judged.exact(), "{judged:?}");
        assert_eq!(
            judged.committed_unanswered, 1,
            "a failed checkout may have committed"
        );

        let broken = [
            tally(&[("t-1", 1), ("t-3", 1)]),
            tally(&[("t-1", 2), ("t-2", 1), ("t-3", 1), ("t-4", 3), ("t-9", 1)]),
        ];
        let judged = judge(&log, &broken);
        assert_eq!(
            judged,
            Exactness {
                missing: 1,
                duplicated: 3,
                unexpected: 1,
                committed_unanswered: 1,
            }
        );
        assert!(!judged.exact());
        assert!(
            !judge(&log, &[tally(&[])]).exact(),
            "a silent watcher fails"
        );
    }

    #[test]
    fn events_are_counted_in_the_window_and_by_purchase() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let window = WallWindow {
            from: t0,
            until: t0 + Duration::from_secs(10),
        };
        let event = |purchase: &str, occurred: SystemTime, kind: pb::EventType| {
            let since = occurred.duration_since(SystemTime::UNIX_EPOCH).unwrap();
            pb::Event {
                cursor: "1".into(),
                r#type: kind as i32,
                occurred_at: Some(prost_types::Timestamp {
                    seconds: since.as_secs() as i64,
                    nanos: since.subsec_nanos() as i32,
                }),
                details_json: format!(r#"{{"purchase_id":"{purchase}","points":3}}"#),
                ..pb::Event::default()
            }
        };
        let mut tally = Tally::default();
        let in_window = t0 + Duration::from_secs(1);
        tally.note(
            &event("run-1", in_window, pb::EventType::PurchaseRecorded),
            "run-",
            &window,
            in_window + Duration::from_millis(30),
        );
        // Before the window (warm-up): counted for exactness, not in the figures.
        tally.note(
            &event(
                "run-2",
                t0 - Duration::from_secs(1),
                pb::EventType::PurchaseRecorded,
            ),
            "run-",
            &window,
            t0 - Duration::from_millis(900),
        );
        // Another run's purchase, and another type: not this run's purchases.
        tally.note(
            &event("other-1", in_window, pb::EventType::PurchaseRecorded),
            "run-",
            &window,
            in_window,
        );
        tally.note(
            &event("run-3", in_window, pb::EventType::PointsRedeemed),
            "run-",
            &window,
            in_window,
        );
        assert_eq!(tally.events_in_window, 3);
        assert_eq!(tally.purchases.len(), 2);
        assert_eq!(tally.purchases.get("run-2"), Some(&1));
        assert_eq!(tally.delays.ok, 3);
        let max = tally.delays.max_ms().unwrap();
        assert!((max - 30.0).abs() < 0.1, "{max}");

        let figures = Figures::of(
            &log(&["run-1", "run-2"], &[]),
            &[tally.clone(), tally],
            &window,
            Duration::from_millis(120),
        );
        assert_eq!(figures.watchers, 2);
        assert_eq!(figures.events, 6);
        assert_eq!(figures.events_per_sec, 0.6);
        assert_eq!(figures.events_per_sec_per_watcher, 0.3);
        assert_eq!(figures.events_per_sec_min_watcher, 0.3);
        assert!(figures.exactness.exact());
        assert_eq!(figures.drain_ms, 120.0);
    }

    #[test]
    fn details_and_cursors_are_read() {
        assert_eq!(
            purchase_id_of(r#"{"purchase_id":"b1-c0-1","points":12}"#).as_deref(),
            Some("b1-c0-1")
        );
        assert_eq!(purchase_id_of(r#"{"points":12}"#), None);
        assert_eq!(purchase_id_of("not json"), None);
        assert_eq!(purchase_id_of(r#"{"purchase_id":7}"#), None);
        assert!(in_order("", "5"));
        assert!(in_order("9", "10"), "numbers, not text");
        assert!(!in_order("10", "10"));
        assert!(!in_order("10", "9"));
        assert!(!in_order("10", "x"));
    }
}
