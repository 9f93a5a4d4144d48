//! The use cases of the event stream: watching (replay, then live), and the passes of its
//! background jobs (sequencing, pruning, expiry warnings).

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};

use crate::error::Error;
use crate::events::Events;
use crate::events::rules::{Cursor, Watch, pruned_message};
use crate::events::store::{self, Pruned, Sequenced, StoredEvent};
use crate::platform::caller::{Caller, MerchantId};

/// Events one replay read takes.
const PAGE: i64 = 500;

/// Events queued for one watcher's connection before its task waits for the client.
const WATCHER_QUEUE: usize = 256;

/// What a watcher receives: events in stream order, and at most one error, last.
pub type EventFeed = mpsc::Receiver<Result<Arc<StoredEvent>, Error>>;

impl Events {
    /// Replays the merchant's events after the cursor, then follows new ones live.
    ///
    /// The first page is read before this returns, so a pruned cursor (OUT_OF_RANGE) or a
    /// database that is down (UNAVAILABLE) is the call's own status. Then a task of the
    /// watcher's feeds the channel until the client goes away.
    ///
    /// No gap, no repeat: the watcher subscribes to the shared reader BEFORE it replays, so
    /// everything the reader broadcasts from then on is either in the replay (its position is
    /// at or below the watcher's cursor: dropped) or after it. The broadcast is gapless and in
    /// position order, so taking from it only what is above the cursor is exactly the rest.
    /// A watcher that lags behind the broadcast subscribes again and replays from its cursor.
    pub async fn watch(&self, caller: &Caller, watch: Watch) -> Result<EventFeed, Error> {
        if !self.outbox {
            return Err(Error::FailedPrecondition(
                "the event stream is off on this deployment (LOYALTY_EVENTS_OUTBOX=off): no \
                 event is written"
                    .into(),
            ));
        }
        let merchant = caller.merchant;
        let subscription = self.hub.subscribe();
        let mut cursor = match watch.after {
            Cursor::Oldest => None,
            Cursor::After(position) => Some(position),
        };
        let first = self.page(merchant, &watch, cursor).await?;
        cursor = Some(first.last.or(cursor).unwrap_or(first.pruned_through));
        let (sender, feed) = mpsc::channel(WATCHER_QUEUE);
        let events = self.clone();
        tokio::spawn(async move {
            let cursor = cursor.unwrap_or(0);
            events
                .follow(merchant, watch, first, cursor, subscription, sender)
                .await;
        });
        Ok(feed)
    }

    /// One replay page after `cursor`, refused when the merchant's events after the cursor
    /// are (partly) pruned.
    async fn page(
        &self,
        merchant: MerchantId,
        watch: &Watch,
        cursor: Option<i64>,
    ) -> Result<Replayed, Error> {
        let kinds = watch.kind_names();
        let mut conn = self.store.acquire().await?;
        let page = store::watch_page(&mut conn, merchant, cursor, kinds.as_deref(), PAGE).await?;
        if let Some(cursor) = cursor
            && page.pruned_through > cursor
        {
            return Err(Error::OutOfRange(pruned_message(
                cursor,
                page.pruned_through,
            )));
        }
        Ok(Replayed {
            last: page.events.last().map(|e| e.position),
            full: page.events.len() as i64 == PAGE,
            pruned_through: page.pruned_through,
            events: page.events,
        })
    }

    /// The watcher's task: the first page, the rest of the replay, then live.
    async fn follow(
        &self,
        merchant: MerchantId,
        watch: Watch,
        first: Replayed,
        mut cursor: i64,
        mut subscription: broadcast::Receiver<Arc<StoredEvent>>,
        sender: mpsc::Sender<Result<Arc<StoredEvent>, Error>>,
    ) {
        let mut full = first.full;
        for event in first.events {
            if sender.send(Ok(Arc::new(event))).await.is_err() {
                return;
            }
        }
        loop {
            // The rest of the replay, page by page.
            while full {
                match self.page(merchant, &watch, Some(cursor)).await {
                    Ok(page) => {
                        full = page.full;
                        for event in page.events {
                            cursor = event.position;
                            if sender.send(Ok(Arc::new(event))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(error) => {
                        let _ = sender.send(Err(error)).await;
                        return;
                    }
                }
            }
            // Live, until the watcher lags.
            loop {
                let received = tokio::select! {
                    _ = sender.closed() => return,
                    received = subscription.recv() => received,
                };
                match received {
                    Ok(event) => {
                        if event.position <= cursor
                            || event.merchant != merchant
                            || !watch.wants(event.kind)
                        {
                            continue;
                        }
                        cursor = event.position;
                        if sender.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "event watcher lagged; replaying from its cursor");
                        // Subscribe again first, then replay: the same order as at the start.
                        subscription = self.hub.subscribe();
                        full = true;
                        break;
                    }
                    // The reader is gone: the server is stopping.
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = sender
                            .send(Err(Error::Unavailable(
                                "the server is shutting down; resume from the last cursor".into(),
                            )))
                            .await;
                        return;
                    }
                }
            }
        }
    }

    /// One pass of the sequencer: numbers up to `batch` committed events. Returns how many
    /// it numbered (0 also when another replica's sequencer holds the lock).
    pub async fn sequence(&self, batch: i64) -> Result<usize, Error> {
        let mut conn = self.store.acquire().await?;
        if !store::unsequenced_exist(&mut conn).await? {
            return Ok(0);
        }
        match store::sequence(&mut conn, batch).await? {
            Some(Sequenced {
                count,
                highest: Some(highest),
            }) => {
                self.hub.announce(highest);
                Ok(count)
            }
            _ => Ok(0),
        }
    }

    /// One pass of pruning: deletes the events older than the retention, in batches, and
    /// records the horizon. Safe on many replicas (they take turns on the horizon row).
    pub async fn prune(&self, batch: i64) -> Result<Pruned, Error> {
        let now = self.clock.now();
        let before = now
            - chrono::Duration::from_std(self.retention)
                .map_err(|_| Error::internal("the event retention is out of range"))?;
        let mut total = Pruned {
            deleted: 0,
            pruned_through: 0,
        };
        loop {
            let mut conn = self.store.acquire().await?;
            match store::prune(&mut conn, before, batch, now).await? {
                Some(pruned) => {
                    total.deleted += pruned.deleted;
                    total.pruned_through = pruned.pruned_through;
                    if pruned.deleted < batch {
                        return Ok(total);
                    }
                }
                None => return Ok(total),
            }
        }
    }

    /// One pass of the expiry warnings: one points_expiring event per lot due for one.
    /// Returns how many were written.
    pub async fn warn_expiring(&self, batch: i64) -> Result<i64, Error> {
        let now = self.clock.now();
        let mut total = 0;
        loop {
            let mut conn = self.store.acquire().await?;
            let written = store::warn_expiring(&mut conn, now, batch).await?;
            total += written;
            if written < batch {
                return Ok(total);
            }
        }
    }
}

/// A replay page.
struct Replayed {
    events: Vec<StoredEvent>,
    last: Option<i64>,
    /// The page was full: more may follow.
    full: bool,
    pruned_through: i64,
}
