//! Events: the outbox every change worth reacting to is written to (in the same statement or
//! transaction as the change, by the feature that makes it), numbered in commit order by the
//! sequencer, followed by one shared reader per process and streamed to watchers
//! (`EngagementService.WatchEvents`, see `engagement/`), pruned after the retention.
//!
//! Two numbers per event: `id` is insertion order (transactions commit out of order, so it
//! is no order a reader can follow), `position` is commit order, given by the sequencer
//! (`store::sequence`) to committed rows only, batch after batch under one advisory lock: a
//! reader that follows positions never skips one. Its cursor is the position.

pub mod hub;
pub mod rules;
pub mod store;
mod use_cases;

use std::sync::Arc;
use std::time::Duration;

pub use hub::Hub;
pub use use_cases::EventFeed;

use crate::platform::Parts;
use crate::platform::clock::Clock;
use crate::platform::store::Store;

/// The settings of the event stream (`config.rs`: `LOYALTY_EVENT_*`).
#[derive(Debug, Clone, Copy)]
pub struct EventsConfig {
    /// How often the sequencer looks for committed events to number: the stream's delay from
    /// commit to delivery is at most about this (plus one read).
    pub poll_interval: Duration,
    /// Events older than this are pruned.
    pub retention: Duration,
    /// How often pruning runs on this replica; `None`: not here.
    pub prune_interval: Option<Duration>,
    /// How often the expiry warnings are written on this replica; `None`: not here.
    pub warning_interval: Option<Duration>,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            poll_interval: Duration::from_millis(20),
            retention: Duration::from_secs(168 * 3600),
            prune_interval: Some(Duration::from_secs(60)),
            warning_interval: Some(Duration::from_secs(60)),
        }
    }
}

/// The use cases of events. Cheap to clone.
#[derive(Clone)]
pub struct Events {
    store: Store,
    clock: Arc<dyn Clock>,
    hub: Hub,
    retention: Duration,
    /// Whether this process's sessions write the outbox (`Store::writes_outbox`).
    outbox: bool,
}

impl Events {
    /// The use cases on the process's shared reader `hub`.
    pub fn new(parts: &Parts, hub: &Hub, config: &EventsConfig) -> Events {
        Events {
            store: parts.store.clone(),
            clock: parts.clock.clone(),
            hub: hub.clone(),
            retention: config.retention,
            outbox: parts.store.writes_outbox(),
        }
    }
}
