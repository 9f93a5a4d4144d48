//! The shared reader of one process: it follows the stream (every merchant's events, in
//! position order) and fans each event out to every watcher of this process through a
//! broadcast channel, so a thousand watchers cost one query per batch, not a thousand.
//!
//! It wakes up when the sequencer of this process has numbered a batch, when a NOTIFY says
//! another replica's has (LISTEN on [`store::CHANNEL`], in a task of its own), and at the
//! latest every [`FALLBACK_POLL`] (a lost notification, a listener reconnecting). Since
//! positions appear as an in-order prefix (see `store::sequence`), reading on from the last
//! position delivered never skips one: the broadcast is gapless and in order. A watcher that
//! falls behind the channel's capacity is told so (`Lagged`) and reads the database from its
//! own cursor instead (`use_cases::watch`).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::{Notify, broadcast, watch};
use tokio::task::JoinHandle;

use crate::events::store::{self, StoredEvent};
use crate::platform::store::Store;
use crate::telemetry::throttle::LogThrottle;

/// Events the broadcast holds for its slowest watcher before that watcher lags.
pub const CAPACITY: usize = 4096;

/// Rows one read of the shared reader takes.
const READ_BATCH: i64 = 1000;

/// The longest the reader sleeps without a wake-up.
pub const FALLBACK_POLL: Duration = Duration::from_millis(500);

static READ_FAILURES: LogThrottle = LogThrottle::per_minute(6);
static LISTEN_FAILURES: LogThrottle = LogThrottle::per_minute(6);

/// Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    sender: broadcast::Sender<Arc<StoredEvent>>,
    wake: Notify,
    /// The highest position announced as committed (by our sequencer or a NOTIFY).
    announced: AtomicI64,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

impl Hub {
    pub fn new() -> Hub {
        let (sender, _) = broadcast::channel(CAPACITY);
        Hub {
            inner: Arc::new(Inner {
                sender,
                wake: Notify::new(),
                announced: AtomicI64::new(0),
            }),
        }
    }

    /// Every event the reader delivers from now on, in order.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StoredEvent>> {
        self.inner.sender.subscribe()
    }

    /// Positions up to `highest` are committed: read them.
    pub fn announce(&self, highest: i64) {
        self.inner.announced.fetch_max(highest, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }

    /// The reader and its listener, until `stop`.
    pub fn start(&self, store: Store, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        vec![
            tokio::spawn(self.clone().listen(store.clone(), stop.clone())),
            tokio::spawn(self.clone().read(store, stop)),
        ]
    }

    async fn read(self, store: Store, mut stop: watch::Receiver<bool>) {
        // Start at the top: a watcher replays what came before from the database.
        let mut last = loop {
            let start = async {
                let mut conn = store.acquire().await?;
                store::last_position(&mut conn).await
            };
            match start.await {
                Ok(position) => break position,
                Err(error) => {
                    if let Some(suppressed) = READ_FAILURES.admit() {
                        tracing::warn!(%error, suppressed, "event reader cannot start yet");
                    }
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        _ = tokio::time::sleep(FALLBACK_POLL) => continue,
                    }
                }
            }
        };
        loop {
            if self.inner.sender.receiver_count() == 0 {
                // No watcher: nothing to read (and no query: an idle replica sends Postgres
                // nothing but the sequencer's check). Skip to what is announced, loaded
                // BEFORE looking at the watchers again: announced positions are committed, so
                // a watcher that subscribes after that look replays at least up to them from
                // the database, and only takes from the broadcast what comes after. (A lost
                // notification leaves `last` behind: the next watcher's first read is longer,
                // and drops what it replayed already.)
                let top = self.inner.announced.load(Ordering::SeqCst);
                if self.inner.sender.receiver_count() == 0 {
                    last = last.max(top);
                } else {
                    last = self.catch_up(&store, last).await;
                }
            } else {
                last = self.catch_up(&store, last).await;
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(FALLBACK_POLL) => {}
            }
        }
    }

    /// Reads and broadcasts everything after `last`; returns the new last position.
    async fn catch_up(&self, store: &Store, mut last: i64) -> i64 {
        loop {
            let read = async {
                let mut conn = store.acquire().await?;
                store::following(&mut conn, last, READ_BATCH).await
            };
            match read.await {
                Ok(events) => {
                    let full = events.len() as i64 == READ_BATCH;
                    for event in events {
                        last = event.position;
                        // No receiver left: fine, the next one replays from the database.
                        let _ = self.inner.sender.send(Arc::new(event));
                    }
                    if !full {
                        return last;
                    }
                }
                Err(error) => {
                    if let Some(suppressed) = READ_FAILURES.admit() {
                        tracing::warn!(%error, suppressed, "event reader failed; retrying");
                    }
                    return last;
                }
            }
        }
    }

    /// LISTENs for the batches other replicas number. Its own task: a notification half read
    /// must never be cancelled by another wake-up.
    async fn listen(self, store: Store, mut stop: watch::Receiver<bool>) {
        let run = async {
            loop {
                let mut listener = match PgListener::connect_with(store.pool()).await {
                    Ok(listener) => listener,
                    Err(error) => {
                        if let Some(suppressed) = LISTEN_FAILURES.admit() {
                            tracing::warn!(%error, suppressed, "event listener cannot connect");
                        }
                        tokio::time::sleep(FALLBACK_POLL).await;
                        continue;
                    }
                };
                if let Err(error) = listener.listen(store::CHANNEL).await {
                    if let Some(suppressed) = LISTEN_FAILURES.admit() {
                        tracing::warn!(%error, suppressed, "event listener cannot LISTEN");
                    }
                    tokio::time::sleep(FALLBACK_POLL).await;
                    continue;
                }
                loop {
                    match listener.recv().await {
                        Ok(notification) => match notification.payload().parse::<i64>() {
                            Ok(highest) => self.announce(highest),
                            Err(_) => self.inner.wake.notify_one(),
                        },
                        Err(error) => {
                            if let Some(suppressed) = LISTEN_FAILURES.admit() {
                                tracing::warn!(%error, suppressed, "event listener lost");
                            }
                            tokio::time::sleep(FALLBACK_POLL).await;
                            break;
                        }
                    }
                }
            }
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => {}
            _ = run => {}
        }
    }
}
