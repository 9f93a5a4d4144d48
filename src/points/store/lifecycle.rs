//! The SQL of the points lifecycle: the account row lock every movement starts with, lots and
//! what each movement took from them, ledger entries, and the rows that make redemptions,
//! reservations, returns and adjustments idempotent.
//!
//! Lock order, everywhere: the account row (`lock_account*`), then its lots, then the
//! operation's own row. Every function takes the caller's transaction.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::PgConnection;
use sqlx::types::Json;

use crate::error::Error;
use crate::events::rules::NewEvent;
use crate::platform::account::{AccountRow, AccountState};
use crate::platform::caller::MerchantId;
use crate::platform::store::{db_error, violated_unique_constraint};
use crate::points::rules::ledger::EntryKind;
use crate::points::rules::lots::{LotTerms, OpenLot};
use crate::points::sql;

/// An account as locked for a movement.
#[derive(Debug, Clone, Copy, sqlx::FromRow)]
pub struct LockedAccount {
    pub customer_id: i64,
    pub available: i64,
    pub version: i64,
    pub last_purchase_at: Option<DateTime<Utc>>,
}

/// Locks the account of a customer by external id; `None` if there is no such customer.
pub async fn lock_account(
    conn: &mut PgConnection,
    merchant: MerchantId,
    external_id: &str,
) -> Result<Option<LockedAccount>, Error> {
    sqlx::query_as(sql::LOCK_ACCOUNT)
        .bind(merchant.0)
        .bind(external_id)
        .fetch_optional(conn)
        .await
        .map_err(db_error)
}

/// Locks the account of a customer by internal id; with `skip_locked`, `None` when another
/// transaction holds it (a sweep then leaves the customer to whoever holds it).
pub async fn lock_account_by_id(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    skip_locked: bool,
) -> Result<Option<LockedAccount>, Error> {
    let statement = if skip_locked {
        sql::LOCK_ACCOUNT_BY_ID_SKIP_LOCKED
    } else {
        sql::LOCK_ACCOUNT_BY_ID
    };
    sqlx::query_as(statement)
        .bind(merchant.0)
        .bind(customer_id)
        .fetch_optional(conn)
        .await
        .map_err(db_error)
}

/// Locks the account of a reservation's customer; `None` if there is no such reservation.
pub async fn lock_reservation_account(
    conn: &mut PgConnection,
    merchant: MerchantId,
    reservation_id: &str,
) -> Result<Option<LockedAccount>, Error> {
    sqlx::query_as(sql::LOCK_RESERVATION_ACCOUNT)
        .bind(merchant.0)
        .bind(reservation_id)
        .fetch_optional(conn)
        .await
        .map_err(db_error)
}

/// The customer's lots with points left: spendable ones (`matured`) or pending ones.
pub async fn open_lots(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    matured: bool,
) -> Result<Vec<OpenLot>, Error> {
    let rows: Vec<(i64, i64, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT id, remaining, expires_at
           FROM point_lots
          WHERE merchant_id = $1 AND customer_id = $2 AND remaining > 0 AND matured = $3
          ORDER BY expires_at NULLS LAST, id",
    )
    .bind(merchant.0)
    .bind(customer_id)
    .bind(matured)
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    Ok(rows
        .into_iter()
        .map(|(id, remaining, expires_at)| OpenLot {
            id,
            remaining,
            expires_at,
        })
        .collect())
}

/// The lot purchase `purchase_id` of `customer_id` earned, if it earned any points.
pub async fn lot_of_purchase(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    purchase_id: &str,
) -> Result<Option<(OpenLot, bool)>, Error> {
    let row: Option<(i64, i64, Option<DateTime<Utc>>, bool)> = sqlx::query_as(
        "SELECT l.id, l.remaining, l.expires_at, l.matured
           FROM purchases p
           JOIN point_lots l
             ON l.merchant_id = p.merchant_id AND l.customer_id = p.customer_id
            AND l.id = p.lot_id
          WHERE p.merchant_id = $1 AND p.purchase_id = $3 AND p.customer_id = $2",
    )
    .bind(merchant.0)
    .bind(customer_id)
    .bind(purchase_id)
    .fetch_optional(conn)
    .await
    .map_err(db_error)?;
    Ok(row.map(|(id, remaining, expires_at, matured)| {
        (
            OpenLot {
                id,
                remaining,
                expires_at,
            },
            matured,
        )
    }))
}

/// Moves points out of lots (`points > 0`) or back into them (`points < 0`), and records
/// which lots the movement of ledger entry `entry_seq` touched.
pub async fn move_lot_points(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    entry_seq: Option<i64>,
    moves: &[(i64, i64)],
) -> Result<(), Error> {
    let moves: Vec<(i64, i64)> = moves.iter().copied().filter(|(_, p)| *p != 0).collect();
    if moves.is_empty() {
        return Ok(());
    }
    let lot_ids: Vec<i64> = moves.iter().map(|(id, _)| *id).collect();
    let points: Vec<i64> = moves.iter().map(|(_, p)| *p).collect();
    // `remaining` has CHECKs (0..points): a plan that took more than a lot holds fails here.
    sqlx::query(
        "WITH m AS (
            SELECT * FROM unnest($3::bigint[], $4::bigint[]) AS m(lot_id, points)
         ), updated AS (
            UPDATE point_lots l
               SET remaining = l.remaining - m.points
              FROM m
             WHERE l.merchant_id = $1 AND l.customer_id = $2 AND l.id = m.lot_id
         )
         INSERT INTO lot_movements (merchant_id, customer_id, lot_id, entry_seq, points)
         SELECT $1, $2, m.lot_id, $5, m.points FROM m",
    )
    .bind(merchant.0)
    .bind(customer_id)
    .bind(lot_ids)
    .bind(points)
    .bind(entry_seq)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Writes the debit `entry` (`points < 0`) and takes its points from the customer's spendable
/// lots, soonest-expiring first, recording what each lot gave (`sql/take_points.sql`).
/// Returns the points the lots gave: the caller refuses fewer than the entry spends.
pub async fn take_points(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    entry: &Entry<'_>,
) -> Result<i64, Error> {
    sqlx::query_scalar(sql::TAKE_POINTS)
        .bind(merchant.0)
        .bind(customer_id)
        .bind(entry.points)
        .bind(entry.seq)
        .bind(entry.kind.as_str())
        .bind(entry.reference)
        .bind(entry.occurred_at)
        .fetch_one(conn)
        .await
        .map_err(db_error)
}

/// What ledger entry `entry_seq` took from each lot (a hold's lots, for its release).
pub async fn movements_of(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    entry_seq: i64,
) -> Result<Vec<(i64, i64)>, Error> {
    sqlx::query_as(
        "SELECT lot_id, points FROM lot_movements
          WHERE merchant_id = $1 AND customer_id = $2 AND entry_seq = $3 AND points > 0
          ORDER BY id",
    )
    .bind(merchant.0)
    .bind(customer_id)
    .bind(entry_seq)
    .fetch_all(conn)
    .await
    .map_err(db_error)
}

/// A new lot of `points`, of which `remaining` are left (less when they repaid a debt).
#[allow(clippy::too_many_arguments)]
pub async fn insert_lot(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    source_kind: &str,
    source_reference: &str,
    points: i64,
    remaining: i64,
    earned_at: DateTime<Utc>,
    terms: &LotTerms,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO point_lots (merchant_id, customer_id, source_kind, source_reference, points,
                                 remaining, earned_at, available_at, matured, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(merchant.0)
    .bind(customer_id)
    .bind(source_kind)
    .bind(source_reference)
    .bind(points)
    .bind(remaining)
    .bind(earned_at)
    .bind(terms.available_at)
    .bind(terms.spendable_now)
    .bind(terms.expires_at)
    .execute(conn)
    .await
    // The lot's source is the operation's client key: another customer's request took it.
    .map_err(|e| {
        let field = match source_kind {
            "adjust" => "adjustment_key",
            "redeem_refund" => "return_id",
            other => other,
        };
        key_taken(e, field, source_reference)
    })?;
    Ok(())
}

/// One ledger entry; `seq` is the account version it produces.
pub struct Entry<'a> {
    pub seq: i64,
    pub kind: EntryKind,
    pub points: i64,
    pub reference: &'a str,
    pub occurred_at: DateTime<Utc>,
}

pub async fn insert_entry(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    entry: &Entry<'_>,
) -> Result<(), Error> {
    sqlx::query(sql::INSERT_ENTRY)
        .bind(merchant.0)
        .bind(customer_id)
        .bind(entry.seq)
        .bind(entry.kind.as_str())
        .bind(entry.points)
        .bind(entry.reference)
        .bind(entry.occurred_at)
        .execute(conn)
        .await
        .map_err(db_error)?;
    Ok(())
}

/// A change of an account's columns.
#[derive(Debug, Clone, Copy, Default)]
pub struct AccountChange {
    pub available: i64,
    pub pending: i64,
    pub lifetime_earned: i64,
    pub lifetime_redeemed: i64,
    /// How far the version moves: one per ledger entry written (at least one).
    pub versions: i64,
    /// A debit (spending, expiry, a removal): it must find `available` points and never
    /// touches the debt, so the `accounts_no_overdraft` CHECK refuses any overdraft. Credits
    /// and clawbacks set the debt to what `available` is below zero.
    pub debit: bool,
}

/// Applies `change` to a locked account and returns it as committed, with its next expiry
/// (from the lots as this transaction left them: write the lots first). `None` when a debit
/// found fewer points than it takes (the lock makes that a defect, never a race).
///
/// With an `event`, the change's event is written by the same statement
/// (`sql::WRITE_ACCOUNT_EVENT`), carrying the account as the change left it.
pub async fn write_account(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    change: AccountChange,
    event: Option<&NewEvent>,
) -> Result<Option<AccountState>, Error> {
    let statement = match event {
        Some(_) => sql::WRITE_ACCOUNT_EVENT,
        None => sql::WRITE_ACCOUNT,
    };
    let mut query = sqlx::query_as(statement)
        .bind(merchant.0)
        .bind(customer_id)
        .bind(change.available)
        .bind(change.pending)
        .bind(change.lifetime_earned)
        .bind(change.lifetime_redeemed)
        .bind(change.versions.max(1))
        .bind(change.debit);
    if let Some(event) = event {
        query = query.bind(event.kind.as_str()).bind(Json(&event.details));
    }
    let row: Option<AccountRow> = query.fetch_optional(conn).await.map_err(db_error)?;
    Ok(row.map(AccountState::from))
}

/// A stored operation: the hash of its request and the answer a replay gets.
pub struct Stored<T> {
    pub request_hash: Vec<u8>,
    pub answer: T,
}

/// The stored operation of a client key in one of the idempotency tables.
pub async fn find_operation<T: DeserializeOwned + Send + Unpin + 'static>(
    conn: &mut PgConnection,
    table: OperationTable,
    merchant: MerchantId,
    key: &str,
) -> Result<Option<Stored<T>>, Error> {
    let row: Option<(Vec<u8>, Json<T>)> = sqlx::query_as(table.lookup())
        .bind(merchant.0)
        .bind(key)
        .fetch_optional(conn)
        .await
        .map_err(db_error)?;
    Ok(row.map(|(request_hash, answer)| Stored {
        request_hash,
        answer: answer.0,
    }))
}

/// The tables whose rows make a client key's operation idempotent.
#[derive(Debug, Clone, Copy)]
pub enum OperationTable {
    Redemptions,
    Reservations,
    Returns,
    Adjustments,
    GiftClaims,
}

impl OperationTable {
    /// The stored request hash and answer of a key: `$1` merchant_id, `$2` the key.
    fn lookup(self) -> &'static str {
        match self {
            OperationTable::Redemptions => {
                "SELECT request_hash, answer FROM redemptions WHERE merchant_id = $1 AND redemption_id = $2"
            }
            OperationTable::Reservations => sql::RESERVATION_ANSWER,
            OperationTable::Returns => {
                "SELECT request_hash, answer FROM purchase_returns WHERE merchant_id = $1 AND return_id = $2"
            }
            OperationTable::Adjustments => {
                "SELECT request_hash, answer FROM adjustments WHERE merchant_id = $1 AND adjustment_key = $2"
            }
            OperationTable::GiftClaims => {
                "SELECT request_hash, answer FROM gift_claims WHERE merchant_id = $1 AND claim_key = $2"
            }
        }
    }
}

/// An insert of an operation's row that lost a race for its client key to another customer's
/// request (the same customer's copies are serialised by the account lock).
fn key_taken(error: sqlx::Error, key_field: &str, key: &str) -> Error {
    if violated_unique_constraint(&error).is_some() {
        return Error::AlreadyExists(format!(
            "{key_field} {key:?} was already used with different content"
        ));
    }
    db_error(error)
}

/// The row of a redemption.
pub struct RedemptionRow<'a, T> {
    pub redemption_id: &'a str,
    pub customer_id: i64,
    pub points: i64,
    pub discount_minor: i64,
    pub purchase_id: Option<&'a str>,
    pub request_hash: &'a [u8],
    pub answer: &'a T,
}

pub async fn insert_redemption<T: Serialize + Sync>(
    conn: &mut PgConnection,
    merchant: MerchantId,
    row: &RedemptionRow<'_, T>,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO redemptions (merchant_id, redemption_id, customer_id, points,
                                  discount_minor, purchase_id, request_hash, answer)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(merchant.0)
    .bind(row.redemption_id)
    .bind(row.customer_id)
    .bind(row.points)
    .bind(row.discount_minor)
    .bind(row.purchase_id)
    .bind(row.request_hash)
    .bind(Json(row.answer))
    .execute(conn)
    .await
    .map_err(|e| key_taken(e, "redemption_id", row.redemption_id))?;
    Ok(())
}

/// A reservation as settling it needs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReservationRow {
    pub external_id: String,
    pub points: i64,
    pub discount_minor: i64,
    pub expires_at: DateTime<Utc>,
    pub status: String,
    pub hold_seq: i64,
    pub settled_answer: Option<Json<serde_json::Value>>,
}

/// The reservation, locked (after its account).
pub async fn lock_reservation(
    conn: &mut PgConnection,
    merchant: MerchantId,
    reservation_id: &str,
) -> Result<Option<ReservationRow>, Error> {
    sqlx::query_as(sql::LOCK_RESERVATION)
        .bind(merchant.0)
        .bind(reservation_id)
        .fetch_optional(conn)
        .await
        .map_err(db_error)
}

/// The row of a new hold.
pub struct HoldRow<'a, T> {
    pub reservation_id: &'a str,
    pub customer_id: i64,
    pub points: i64,
    pub discount_minor: i64,
    pub purchase_id: Option<&'a str>,
    pub request_hash: &'a [u8],
    pub expires_at: DateTime<Utc>,
    pub hold_seq: i64,
    pub answer: &'a T,
}

pub async fn insert_reservation<T: Serialize + Sync>(
    conn: &mut PgConnection,
    merchant: MerchantId,
    row: &HoldRow<'_, T>,
) -> Result<(), Error> {
    sqlx::query(sql::INSERT_RESERVATION)
        .bind(merchant.0)
        .bind(row.reservation_id)
        .bind(row.customer_id)
        .bind(row.points)
        .bind(row.discount_minor)
        .bind(row.purchase_id)
        .bind(row.request_hash)
        .bind(row.expires_at)
        .bind(row.hold_seq)
        .bind(Json(row.answer))
        .execute(conn)
        .await
        .map_err(|e| key_taken(e, "reservation_id", row.reservation_id))?;
    Ok(())
}

/// Settles a held reservation once: `false` if it was not held any more.
pub async fn settle_reservation<T: Serialize + Sync>(
    conn: &mut PgConnection,
    merchant: MerchantId,
    reservation_id: &str,
    status: &str,
    answer: &T,
    now: DateTime<Utc>,
) -> Result<bool, Error> {
    let done = sqlx::query(sql::SETTLE_RESERVATION)
        .bind(merchant.0)
        .bind(reservation_id)
        .bind(status)
        .bind(Json(answer))
        .bind(now)
        .execute(conn)
        .await
        .map_err(db_error)?;
    Ok(done.rows_affected() == 1)
}

/// A purchase as a return needs it, locked.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReturnablePurchase {
    pub external_id: String,
    pub total_minor: i64,
    pub points_earned: i64,
    pub returned_minor: i64,
    pub points_clawed_back: i64,
    pub redeemed_refunded: i64,
}

/// The purchase's customer, unlocked (to lock their account first).
pub async fn purchase_customer(
    conn: &mut PgConnection,
    merchant: MerchantId,
    purchase_id: &str,
) -> Result<Option<i64>, Error> {
    sqlx::query_scalar(
        "SELECT customer_id FROM purchases WHERE merchant_id = $1 AND purchase_id = $2",
    )
    .bind(merchant.0)
    .bind(purchase_id)
    .fetch_optional(conn)
    .await
    .map_err(db_error)
}

pub async fn lock_purchase(
    conn: &mut PgConnection,
    merchant: MerchantId,
    purchase_id: &str,
) -> Result<Option<ReturnablePurchase>, Error> {
    sqlx::query_as(
        "SELECT c.external_id, p.total_minor, p.points_earned, p.returned_minor,
                p.points_clawed_back, p.redeemed_refunded
           FROM purchases p
           JOIN customers c ON c.merchant_id = p.merchant_id AND c.id = p.customer_id
          WHERE p.merchant_id = $1 AND p.purchase_id = $2
            FOR UPDATE OF p",
    )
    .bind(merchant.0)
    .bind(purchase_id)
    .fetch_optional(conn)
    .await
    .map_err(db_error)
}

/// The lines of a purchase in order: (amount, points, returned). `points` is NULL for lines
/// recorded before lines kept their share.
pub async fn purchase_lines(
    conn: &mut PgConnection,
    merchant: MerchantId,
    purchase_id: &str,
) -> Result<Vec<(i64, Option<i64>, i64)>, Error> {
    sqlx::query_as(
        "SELECT amount_minor, points, returned_minor FROM purchase_lines
          WHERE merchant_id = $1 AND purchase_id = $2
          ORDER BY line_no",
    )
    .bind(merchant.0)
    .bind(purchase_id)
    .fetch_all(conn)
    .await
    .map_err(db_error)
}

/// Points spent on a purchase: redemptions that named it and committed holds that did.
pub async fn redeemed_for_purchase(
    conn: &mut PgConnection,
    merchant: MerchantId,
    purchase_id: &str,
) -> Result<i64, Error> {
    sqlx::query_scalar(
        "SELECT ((SELECT COALESCE(sum(points), 0) FROM redemptions
                   WHERE merchant_id = $1 AND purchase_id = $2)
               + (SELECT COALESCE(sum(points), 0) FROM reservations
                   WHERE merchant_id = $1 AND purchase_id = $2 AND status = 'committed'))::bigint",
    )
    .bind(merchant.0)
    .bind(purchase_id)
    .fetch_one(conn)
    .await
    .map_err(db_error)
}

/// What a return leaves on its purchase.
pub struct ReturnRecord<'a, T> {
    pub return_id: &'a str,
    pub purchase_id: &'a str,
    pub customer_id: i64,
    /// Per line (in line order; empty for a purchase without lines), returned now.
    pub line_returns: &'a [i64],
    pub returned_minor: i64,
    pub clawed_back: i64,
    pub refunded: i64,
    pub request_hash: &'a [u8],
    pub answer: &'a T,
}

pub async fn record_return<T: Serialize + Sync>(
    conn: &mut PgConnection,
    merchant: MerchantId,
    r: &ReturnRecord<'_, T>,
) -> Result<(), Error> {
    let line_nos: Vec<i32> = (1..=r.line_returns.len() as i32).collect();
    sqlx::query(
        "WITH lines AS (
            UPDATE purchase_lines l
               SET returned_minor = l.returned_minor + x.amount
              FROM unnest($4::int[], $5::bigint[]) AS x(line_no, amount)
             WHERE l.merchant_id = $1 AND l.purchase_id = $2 AND l.line_no = x.line_no
               AND x.amount > 0
         ), purchase AS (
            UPDATE purchases
               SET returned_minor = returned_minor + $6,
                   points_clawed_back = points_clawed_back + $7,
                   redeemed_refunded = redeemed_refunded + $8
             WHERE merchant_id = $1 AND purchase_id = $2
         )
         INSERT INTO purchase_returns (merchant_id, return_id, purchase_id, customer_id,
                                       returned_minor, request_hash, answer)
         VALUES ($1, $3, $2, $9, $6, $10, $11)",
    )
    .bind(merchant.0)
    .bind(r.purchase_id)
    .bind(r.return_id)
    .bind(line_nos)
    .bind(r.line_returns)
    .bind(r.returned_minor)
    .bind(r.clawed_back)
    .bind(r.refunded)
    .bind(r.customer_id)
    .bind(r.request_hash)
    .bind(Json(r.answer))
    .execute(conn)
    .await
    .map_err(|e| key_taken(e, "return_id", r.return_id))?;
    Ok(())
}

/// The row of an adjustment.
pub struct AdjustmentRow<'a, T> {
    pub adjustment_key: &'a str,
    pub customer_id: i64,
    pub points: i64,
    pub reason: &'a str,
    pub actor: &'a str,
    pub request_hash: &'a [u8],
    pub answer: &'a T,
}

pub async fn insert_adjustment<T: Serialize + Sync>(
    conn: &mut PgConnection,
    merchant: MerchantId,
    row: &AdjustmentRow<'_, T>,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO adjustments (merchant_id, adjustment_key, customer_id, points, reason, actor,
                                  request_hash, answer)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(merchant.0)
    .bind(row.adjustment_key)
    .bind(row.customer_id)
    .bind(row.points)
    .bind(row.reason)
    .bind(row.actor)
    .bind(row.request_hash)
    .bind(Json(row.answer))
    .execute(conn)
    .await
    .map_err(|e| key_taken(e, "adjustment_key", row.adjustment_key))?;
    Ok(())
}

/// Holds past their ttl, oldest first (the sweep releases them).
pub async fn due_holds(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    batch: i64,
) -> Result<Vec<(MerchantId, String)>, Error> {
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT merchant_id, reservation_id FROM reservations
          WHERE status = 'held' AND expires_at <= $1
          ORDER BY expires_at
          LIMIT $2",
    )
    .bind(now)
    .bind(batch)
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    Ok(rows.into_iter().map(|(m, r)| (MerchantId(m), r)).collect())
}

pub async fn due_customers(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    batch: i64,
) -> Result<Vec<(MerchantId, i64, String)>, Error> {
    let rows: Vec<(i64, i64, String)> = sqlx::query_as(include_str!("../sql/due_customers.sql"))
        .bind(now)
        .bind(batch)
        .fetch_all(conn)
        .await
        .map_err(db_error)?;
    Ok(rows
        .into_iter()
        .map(|(m, c, e)| (MerchantId(m), c, e))
        .collect())
}

/// The customer's lots whose pending period is over: (lot id, points left).
pub async fn maturing_lots(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    now: DateTime<Utc>,
) -> Result<Vec<(i64, i64)>, Error> {
    sqlx::query_as(
        "SELECT id, remaining FROM point_lots
          WHERE merchant_id = $1 AND customer_id = $2 AND NOT matured AND available_at <= $3
          ORDER BY available_at, id",
    )
    .bind(merchant.0)
    .bind(customer_id)
    .bind(now)
    .fetch_all(conn)
    .await
    .map_err(db_error)
}

/// Makes a lot spendable; `repaid` of its points went to a return's debt (recorded as a
/// movement without a ledger entry: the ledger moved them when the debt was made).
pub async fn mature_lot(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    lot_id: i64,
    repaid: i64,
) -> Result<(), Error> {
    sqlx::query(
        "UPDATE point_lots SET matured = true
          WHERE merchant_id = $1 AND customer_id = $2 AND id = $3",
    )
    .bind(merchant.0)
    .bind(customer_id)
    .bind(lot_id)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    move_lot_points(conn, merchant, customer_id, None, &[(lot_id, repaid)]).await
}

/// A spendable lot past its expiry.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ExpiringLot {
    pub id: i64,
    pub remaining: i64,
    pub source_kind: String,
    pub source_reference: String,
    pub expirations: i32,
}

impl ExpiringLot {
    /// The reference of its EXPIRE entry: the credit it came from (`earn:<purchase id>`),
    /// numbered from the second time on (points a released hold gave back to it).
    pub fn expiry_reference(&self) -> String {
        match self.expirations {
            0 => format!("{}:{}", self.source_kind, self.source_reference),
            n => format!("{}:{}#{}", self.source_kind, self.source_reference, n + 1),
        }
    }
}

pub async fn expiring_lots(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    now: DateTime<Utc>,
) -> Result<Vec<ExpiringLot>, Error> {
    sqlx::query_as(
        "SELECT id, remaining, source_kind, source_reference, expirations FROM point_lots
          WHERE merchant_id = $1 AND customer_id = $2 AND matured AND remaining > 0
            AND expires_at <= $3
          ORDER BY expires_at, id",
    )
    .bind(merchant.0)
    .bind(customer_id)
    .bind(now)
    .fetch_all(conn)
    .await
    .map_err(db_error)
}

/// Counts an expiry of the lot (its points were moved out by `move_lot_points`).
pub async fn count_expiry(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    lot_id: i64,
) -> Result<(), Error> {
    sqlx::query(
        "UPDATE point_lots SET expirations = expirations + 1
          WHERE merchant_id = $1 AND customer_id = $2 AND id = $3",
    )
    .bind(merchant.0)
    .bind(customer_id)
    .bind(lot_id)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// The row of a gift claimed with points.
pub struct ClaimRow<'a, T> {
    pub claim_key: &'a str,
    pub customer_id: i64,
    pub gift_id: &'a str,
    pub points: i64,
    pub request_hash: &'a [u8],
    pub answer: &'a T,
}

pub async fn insert_claim<T: Serialize + Sync>(
    conn: &mut PgConnection,
    merchant: MerchantId,
    row: &ClaimRow<'_, T>,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO gift_claims (merchant_id, claim_key, customer_id, gift_id, points,
                                  request_hash, answer)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(merchant.0)
    .bind(row.claim_key)
    .bind(row.customer_id)
    .bind(row.gift_id)
    .bind(row.points)
    .bind(row.request_hash)
    .bind(Json(row.answer))
    .execute(conn)
    .await
    .map_err(|e| key_taken(e, "claim_key", row.claim_key))?;
    Ok(())
}
