//! The SQL of the event stream: the sequencer's numbering, the pages a watcher replays, the
//! shared reader's step, pruning and the expiry warnings (long statements in `sql/`).
//!
//! Writers do not come here: each writes its event row in its own statement (a CTE of the
//! change, see `points::sql::RECORD_PURCHASE`, `points::sql::WRITE_ACCOUNT_EVENT` and the
//! gifts' `grant.sql` / `redeem.sql`).

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection};

use crate::error::Error;
use crate::events::rules::{EventKind, NewEvent};
use crate::platform::account::AccountState;
use crate::platform::caller::MerchantId;
use crate::platform::store::db_error;

const SEQUENCE: &str = include_str!("sql/sequence.sql");
const WATCH_PAGE: &str = include_str!("sql/watch_page.sql");
const FOLLOWING: &str = include_str!("sql/following.sql");
const PRUNE: &str = include_str!("sql/prune.sql");
const WARN_EXPIRING: &str = include_str!("sql/warn_expiring.sql");
/// One event; written only while the outbox is on (`outbox_on()`, as every insert into
/// `events` is: see the test below).
const APPEND: &str = "INSERT INTO events (merchant_id, customer_id, kind, occurred_at, available,
                                          pending, lifetime_earned, lifetime_redeemed, version,
                                          details)
                      SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 WHERE outbox_on()";

/// The advisory lock of the sequencer (one at a time across every replica of a database).
pub const SEQUENCER_LOCK: i64 = 0x6c6f_7961_6c74_7901; // "loyalty" 01

/// Channel of the NOTIFY the sequencer sends after numbering a batch (payload: the highest
/// position given).
pub const CHANNEL: &str = "loyalty_events";

/// An event as stored, numbered.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub position: i64,
    pub merchant: MerchantId,
    pub kind: EventKind,
    /// Empty for an event about no single customer.
    pub external_id: String,
    pub occurred_at: DateTime<Utc>,
    /// The balance right after the change (`None` without a customer).
    pub balance: Option<AccountState>,
    /// The details as a JSON object's text.
    pub details: String,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    position: i64,
    merchant_id: i64,
    kind: String,
    external_id: Option<String>,
    occurred_at: DateTime<Utc>,
    available: Option<i64>,
    pending: Option<i64>,
    lifetime_earned: Option<i64>,
    lifetime_redeemed: Option<i64>,
    version: Option<i64>,
    details: String,
}

impl EventRow {
    fn into_event(self) -> Result<StoredEvent, Error> {
        let kind = EventKind::parse(&self.kind)
            .ok_or_else(|| Error::internal(format!("unknown event kind {:?}", self.kind)))?;
        let balance = match (
            self.available,
            self.pending,
            self.lifetime_earned,
            self.lifetime_redeemed,
            self.version,
        ) {
            (Some(available), Some(pending), Some(earned), Some(redeemed), Some(version)) => {
                Some(AccountState {
                    available,
                    pending,
                    lifetime_earned: earned,
                    lifetime_redeemed: redeemed,
                    version,
                    ..AccountState::default()
                })
            }
            _ => None,
        };
        Ok(StoredEvent {
            position: self.position,
            merchant: MerchantId(self.merchant_id),
            kind,
            external_id: self.external_id.unwrap_or_default(),
            occurred_at: self.occurred_at,
            balance,
            details: self.details,
        })
    }
}

/// Whether any committed event waits for a position (the sequencer's cheap check before it
/// Appends one event to the outbox in the caller's transaction, with the customer's balance
/// right after the change: for a write that runs as a transaction of several statements (a
/// single-statement write inserts its event in a CTE of its own, e.g. record_purchase.sql).
pub async fn append(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    event: &NewEvent,
    occurred_at: DateTime<Utc>,
    state: &AccountState,
) -> Result<(), Error> {
    sqlx::query(APPEND)
        .bind(merchant.0)
        .bind(customer_id)
        .bind(event.kind.as_str())
        .bind(occurred_at)
        .bind(state.available)
        .bind(state.pending)
        .bind(state.lifetime_earned)
        .bind(state.lifetime_redeemed)
        .bind(state.version)
        .bind(sqlx::types::Json(&event.details))
        .execute(conn)
        .await
        .map_err(db_error)?;
    Ok(())
}

/// takes its lock).
pub async fn unsequenced_exist(conn: &mut PgConnection) -> Result<bool, Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM events WHERE position IS NULL)")
        .fetch_one(conn)
        .await
        .map_err(db_error)
}

/// What one batch of the sequencer numbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequenced {
    pub count: usize,
    /// The highest position given (`None`: nothing was waiting).
    pub highest: Option<i64>,
}

/// One batch of the sequencer, in a transaction of its own that holds the advisory lock:
/// `None` when another replica's sequencer holds it. The NOTIFY is sent at the commit.
///
/// Why readers see positions as an in-order prefix: a batch numbers rows and commits before
/// the lock is free (it is a transaction lock, released after the commit is visible), and the
/// next batch takes the lock before its numbering statement takes its snapshot, so it sees
/// the previous batch's rows numbered and its nextval values are all higher. Batches are
/// strictly one after another, each visible at once: whenever position p is visible, so is
/// every smaller position ever given. A transaction that inserted an event but commits late
/// is simply numbered by a later batch, with a higher position than everything readers have
/// seen: it comes after them, never behind a cursor.
pub async fn sequence(conn: &mut PgConnection, batch: i64) -> Result<Option<Sequenced>, Error> {
    let mut tx = conn.begin().await.map_err(db_error)?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(SEQUENCER_LOCK)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
    if !locked {
        tx.rollback().await.map_err(db_error)?;
        return Ok(None);
    }
    let positions: Vec<i64> = sqlx::query_scalar(SEQUENCE)
        .bind(batch)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
    let highest = positions.iter().copied().max();
    if let Some(highest) = highest {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(highest.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
    }
    tx.commit().await.map_err(db_error)?;
    Ok(Some(Sequenced {
        count: positions.len(),
        highest,
    }))
}

/// A page of one merchant's events, and the retention horizon of the same snapshot.
pub struct Page {
    pub pruned_through: i64,
    pub events: Vec<StoredEvent>,
}

/// Up to `limit` of the merchant's events after `after` (`None`: after the horizon), of the
/// kinds wanted (`None`: all), in stream order.
pub async fn watch_page(
    conn: &mut PgConnection,
    merchant: MerchantId,
    after: Option<i64>,
    kinds: Option<&[String]>,
    limit: i64,
) -> Result<Page, Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        pruned_through: i64,
        position: Option<i64>,
        kind: Option<String>,
        external_id: Option<String>,
        occurred_at: Option<DateTime<Utc>>,
        available: Option<i64>,
        pending: Option<i64>,
        lifetime_earned: Option<i64>,
        lifetime_redeemed: Option<i64>,
        version: Option<i64>,
        details: Option<String>,
    }
    let rows: Vec<Row> = sqlx::query_as(WATCH_PAGE)
        .bind(merchant.0)
        .bind(after)
        .bind(kinds)
        .bind(limit)
        .fetch_all(conn)
        .await
        .map_err(db_error)?;
    let pruned_through = rows
        .first()
        .map(|r| r.pruned_through)
        .ok_or_else(|| Error::internal("event_horizon has no row"))?;
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        let (Some(position), Some(kind), Some(occurred_at), Some(details)) =
            (row.position, row.kind, row.occurred_at, row.details)
        else {
            continue;
        };
        events.push(
            EventRow {
                position,
                merchant_id: merchant.0,
                kind,
                external_id: row.external_id,
                occurred_at,
                available: row.available,
                pending: row.pending,
                lifetime_earned: row.lifetime_earned,
                lifetime_redeemed: row.lifetime_redeemed,
                version: row.version,
                details,
            }
            .into_event()?,
        );
    }
    Ok(Page {
        pruned_through,
        events,
    })
}

/// Every merchant's events after `after`, in stream order (the shared reader).
pub async fn following(
    conn: &mut PgConnection,
    after: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, Error> {
    let rows: Vec<EventRow> = sqlx::query_as(FOLLOWING)
        .bind(after)
        .bind(limit)
        .fetch_all(conn)
        .await
        .map_err(db_error)?;
    rows.into_iter().map(EventRow::into_event).collect()
}

/// The highest position given so far that is visible (0 when none): where a new shared
/// reader starts (watchers replay the rest from the database).
pub async fn last_position(conn: &mut PgConnection) -> Result<i64, Error> {
    sqlx::query_scalar("SELECT coalesce(max(position), 0)::bigint FROM events")
        .fetch_one(conn)
        .await
        .map_err(db_error)
}

/// What one pruning batch did: `None` when another replica was pruning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub deleted: i64,
    pub pruned_through: i64,
}

/// Deletes up to `batch` of the oldest events that occurred before `before`.
pub async fn prune(
    conn: &mut PgConnection,
    before: DateTime<Utc>,
    batch: i64,
    now: DateTime<Utc>,
) -> Result<Option<Pruned>, Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(PRUNE)
        .bind(before)
        .bind(batch)
        .bind(now)
        .fetch_optional(conn)
        .await
        .map_err(db_error)?;
    Ok(row.map(|(deleted, pruned_through)| Pruned {
        deleted,
        pruned_through,
    }))
}

/// Writes up to `batch` expiry warnings due at `now`; returns how many.
pub async fn warn_expiring(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    batch: i64,
) -> Result<i64, Error> {
    sqlx::query_scalar(WARN_EXPIRING)
        .bind(now)
        .bind(batch)
        .fetch_one(conn)
        .await
        .map_err(db_error)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::APPEND;

    /// Every statement that writes the outbox, in a `.sql` file under `src/` or `APPEND`.
    fn outbox_writes() -> Vec<(String, String)> {
        fn walk(dir: &Path, found: &mut Vec<(String, String)>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, found);
                } else if path.extension().is_some_and(|e| e == "sql") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    // From the insert to the end of its CTE or statement.
                    for (at, _) in text.match_indices("INSERT INTO events ") {
                        let rest = &text[at..];
                        let end = rest.find("\n)").or(rest.find(';')).unwrap_or(rest.len());
                        found.push((path.display().to_string(), rest[..end].to_string()));
                    }
                }
            }
        }
        let mut found = vec![("APPEND".to_string(), APPEND.to_string())];
        walk(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut found,
        );
        found
    }

    #[test]
    fn every_insert_into_the_outbox_is_guarded_by_the_outbox_switch() {
        let writes = outbox_writes();
        // record_purchase (3), write_account_event, write_standing, grant, redeem, the expiry
        // warnings and APPEND: a new writer adds to these.
        assert!(writes.len() >= 9, "found only {writes:?}");
        for (file, statement) in &writes {
            assert!(
                statement.contains("outbox_on()"),
                "{file}: an insert into events without `outbox_on()`: {statement}"
            );
        }
    }
}
