//! The SQL of points: recording a purchase in one atomic statement, the lookup that answers
//! retries, the checkout context, enrolment on a first purchase and the ledger pages.

pub mod lifecycle;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use sqlx::types::Json;

use crate::error::Error;
use crate::platform::account::{AccountRow, AccountState, PointsExpiry};
use crate::platform::caller::MerchantId;
use crate::platform::store::{db_error, violated_unique_constraint};
use crate::points::rules::earn::Earn;
use crate::points::rules::ledger::{EntryKind, LedgerEntry, PageRequest};
use crate::points::rules::lots::{LotTerms, next_expiry_after_purchase};
use crate::points::rules::purchase::Purchase;
use crate::points::sql;
use crate::status::rules::RepeatStatus;
use crate::status::standing::{Evaluation, Facts, PurchaseFact, Standing, status_details};
use crate::tiers::rules::TierStanding;

pub enum RecordOutcome {
    /// The purchase was stored; the account right after it.
    Recorded(AccountState),
    /// The purchase_id was taken already (by an earlier attempt or a concurrent one).
    AlreadyTaken,
    /// Nothing was written and the purchase_id is free: the account's version was no longer
    /// the one read (a concurrent write to this customer), or the program's currency
    /// changed. The caller tells the two apart.
    NotWritten,
}

/// The standing the purchase writes (`status::standing::evaluate` with the purchase added),
/// if the account is still at `expected_version`.
pub struct StandingWrite<'a> {
    pub expected_version: i64,
    pub evaluation: &'a Evaluation,
    pub at: DateTime<Utc>,
}

/// What the purchase statement returns: the account after it, with the next expiry of the
/// lots before it, and what the purchase added to that (see the statement).
#[derive(sqlx::FromRow)]
struct RecordedRow {
    #[sqlx(flatten)]
    account: AccountRow,
    lot_remaining: Option<i64>,
    lot_matured: Option<bool>,
    lot_expires_at: Option<DateTime<Utc>>,
    moved_points: Option<i64>,
    moved_to: Option<DateTime<Utc>>,
}

impl From<RecordedRow> for AccountState {
    fn from(row: RecordedRow) -> Self {
        let lot = match (row.lot_remaining, row.lot_matured, row.lot_expires_at) {
            (Some(points), Some(true), Some(at)) => Some(PointsExpiry { points, at }),
            _ => None,
        };
        let moved = match (row.moved_points, row.moved_to) {
            (Some(points), Some(at)) => Some(PointsExpiry { points, at }),
            _ => None,
        };
        let mut state = AccountState::from(row.account);
        state.next_expiry = next_expiry_after_purchase(state.next_expiry, lot, moved);
        state
    }
}

/// Writes the purchase, its lines, its EARN ledger entry and the account update in one
/// statement. Nothing is written when the purchase_id is already taken.
pub async fn record(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    purchase: &Purchase,
    earned: &Earn,
    lot: &LotTerms,
    standing: &StandingWrite<'_>,
) -> Result<RecordOutcome, Error> {
    let points = earned.points;
    let e = standing.evaluation;
    let basket = &purchase.basket;
    let count = basket.lines.len();
    let mut line_no = Vec::with_capacity(count);
    let mut sku = Vec::with_capacity(count);
    let mut category = Vec::with_capacity(count);
    let mut quantity = Vec::with_capacity(count);
    let mut amount = Vec::with_capacity(count);
    for (i, line) in basket.lines.iter().enumerate() {
        line_no.push(i as i32 + 1);
        sku.push(line.sku.as_str());
        category.push(line.category.as_str());
        quantity.push(line.quantity as i32);
        amount.push(line.amount_minor);
    }
    let result = sqlx::query_as::<_, RecordedRow>(sql::RECORD_PURCHASE)
        .bind(merchant.0)
        .bind(customer_id)
        .bind(&purchase.purchase_id)
        .bind(&purchase.store_id)
        .bind(basket.occurred_at)
        .bind(basket.currency.code())
        .bind(basket.total_minor)
        .bind(&purchase.fingerprint()[..])
        .bind(points)
        .bind(line_no)
        .bind(sku)
        .bind(category)
        .bind(quantity)
        .bind(amount)
        .bind(&earned.line_points)
        .bind(lot.spendable_now)
        .bind(lot.available_at)
        .bind(lot.expires_at.unwrap_or(basket.occurred_at))
        .bind(lot.expires_at.is_some())
        .bind(lot.extends_open_lots)
        .bind(standing.expected_version)
        .bind(e.status.as_str())
        .bind(e.status_since)
        .bind(e.regular_since)
        .bind(e.tier.tier_id.as_deref())
        .bind(e.tier.since)
        .bind(e.tier.below_since)
        .bind(e.review_at)
        .bind(Json(&e.standing))
        .bind(e.status_change.as_ref().map(|c| Json(status_details(c))))
        .bind(e.tier_change.as_ref().map(|c| Json(c.details())))
        .bind(standing.at)
        .fetch_optional(conn)
        .await;
    match result {
        Ok(Some(row)) => Ok(RecordOutcome::Recorded(row.into())),
        Ok(None) => Ok(RecordOutcome::NotWritten),
        Err(error) => match violated_unique_constraint(&error).as_deref() {
            // The purchase's only unique key (its entry and lot have none, see the statement).
            Some("purchases_pkey") => Ok(RecordOutcome::AlreadyTaken),
            _ => Err(db_error(error)),
        },
    }
}

/// A purchase as stored, enough to answer a retry.
pub struct StoredPurchase {
    pub request_hash: Vec<u8>,
    pub external_id: String,
    pub points_earned: i64,
    pub account_after: AccountState,
}

pub async fn find(
    conn: &mut PgConnection,
    merchant: MerchantId,
    purchase_id: &str,
) -> Result<Option<StoredPurchase>, Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        request_hash: Vec<u8>,
        external_id: String,
        points_earned: i64,
        available_after: i64,
        pending_after: i64,
        lifetime_earned_after: i64,
        lifetime_redeemed_after: i64,
        purchase_count_after: i64,
        version_after: i64,
    }
    let row: Option<Row> = sqlx::query_as(
        "SELECT p.request_hash, c.external_id, p.points_earned, p.available_after,
                p.pending_after, p.lifetime_earned_after, p.lifetime_redeemed_after,
                p.purchase_count_after, p.version_after
           FROM purchases p
           JOIN customers c ON c.merchant_id = p.merchant_id AND c.id = p.customer_id
          WHERE p.merchant_id = $1 AND p.purchase_id = $2",
    )
    .bind(merchant.0)
    .bind(purchase_id)
    .fetch_optional(conn)
    .await
    .map_err(db_error)?;
    Ok(row.map(|r| StoredPurchase {
        request_hash: r.request_hash,
        external_id: r.external_id,
        points_earned: r.points_earned,
        account_after: AccountState {
            available: r.available_after,
            pending: r.pending_after,
            lifetime_earned: r.lifetime_earned_after,
            lifetime_redeemed: r.lifetime_redeemed_after,
            purchase_count: r.purchase_count_after,
            version: r.version_after,
            // Receipts answer with the balance only; GetBalance reads the expiry.
            next_expiry: None,
            standing: None,
        },
    }))
}

/// What checkout needs before it can write.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CheckoutContext {
    /// To know whether the in-memory program is current.
    pub program_version: i64,
    /// `None` if not enrolled yet.
    pub customer_id: Option<i64>,
    /// Whether a purchase may fire gift rules (it then runs in a transaction with them).
    pub has_gift_rules: bool,
    /// The customer's standing as read, `None`s for a customer not enrolled yet.
    #[sqlx(flatten)]
    pub standing: StandingRow,
}

impl CheckoutContext {
    /// The account version the record statement must still find (0: a new account).
    pub fn account_version(&self) -> i64 {
        self.standing.account_version.unwrap_or(0)
    }
}

/// A customer's stored standing and their purchases in the look-back, as the checkout
/// context and the status feature's reads return them.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct StandingRow {
    pub account_version: Option<i64>,
    pub status: Option<String>,
    pub status_since: Option<DateTime<Utc>>,
    pub regular_since: Option<DateTime<Utc>>,
    pub tier_id: Option<String>,
    pub tier_since: Option<DateTime<Utc>>,
    pub tier_below_since: Option<DateTime<Utc>>,
    pub tier_warned_for: Option<DateTime<Utc>>,
    pub standing: Option<Json<Standing>>,
    pub fact_at: Option<Vec<DateTime<Utc>>>,
    pub fact_spend: Option<Vec<i64>>,
    pub fact_points: Option<Vec<i64>>,
    pub fact_counted: Option<Vec<bool>>,
    pub older_counted: Option<i64>,
}

impl StandingRow {
    /// What the rules need; a customer not enrolled (or never assessed) is NEW.
    pub fn facts(&self, now: DateTime<Utc>) -> Result<Facts, Error> {
        let status = match self.status.as_deref() {
            None => RepeatStatus::New,
            Some(stored) => RepeatStatus::parse(stored)
                .ok_or_else(|| Error::internal(format!("stored status {stored:?} is invalid")))?,
        };
        let at = self.fact_at.as_deref().unwrap_or_default();
        let spend = self.fact_spend.as_deref().unwrap_or_default();
        let points = self.fact_points.as_deref().unwrap_or_default();
        let counted = self.fact_counted.as_deref().unwrap_or_default();
        let purchases = at
            .iter()
            .zip(spend)
            .zip(points)
            .zip(counted)
            .map(|(((at, spend), points), counted)| PurchaseFact {
                at: *at,
                spend: *spend,
                points: *points,
                counted: *counted,
            })
            .collect();
        Ok(Facts {
            status,
            status_since: self.status_since,
            regular_since: self.regular_since,
            tier: TierStanding {
                tier_id: self.tier_id.clone(),
                since: self.tier_since.unwrap_or(now),
                below_since: self.tier_below_since,
            },
            tier_warned_for: self.tier_warned_for,
            purchases,
            older_counted: self.older_counted.unwrap_or(0),
        })
    }
}

/// The checkout context; `None` when the merchant has no program (it does not exist). `now`
/// (the clock's) bounds the purchases read to the program's look-back.
pub async fn checkout_context(
    conn: &mut PgConnection,
    merchant: MerchantId,
    external_id: &str,
    now: DateTime<Utc>,
) -> Result<Option<CheckoutContext>, Error> {
    sqlx::query_as::<_, CheckoutContext>(sql::CHECKOUT_CONTEXT)
        .bind(merchant.0)
        .bind(external_id)
        .bind(now)
        .fetch_optional(conn)
        .await
        .map_err(db_error)
}

/// The customer's id, enrolling them with an empty profile if they are new.
pub async fn enroll_on_purchase(
    conn: &mut PgConnection,
    merchant: MerchantId,
    external_id: &str,
) -> Result<i64, Error> {
    let created: Option<i64> = sqlx::query_scalar(sql::ENROLL_ON_PURCHASE)
        .bind(merchant.0)
        .bind(external_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_error)?;
    if let Some(id) = created {
        return Ok(id);
    }
    // A concurrent request enrolled them first; it has committed (ON CONFLICT waited for it).
    customer_id(conn, merchant, external_id)
        .await?
        .ok_or_else(|| Error::internal("a customer enrolled concurrently cannot be found"))
}

/// Up to `page.size + 1` entries older than the page's cursor (by the customer's own entry
/// sequence, never the table-wide id) (the extra one tells the caller
/// whether another page follows).
pub async fn ledger_page(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    page: PageRequest,
) -> Result<Vec<LedgerEntry>, Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        seq: i64,
        kind: String,
        points: i64,
        reference: String,
        occurred_at: DateTime<Utc>,
        created_at: DateTime<Utc>,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT seq, kind, points, reference, occurred_at, created_at
           FROM ledger_entries
          WHERE merchant_id = $1 AND customer_id = $2 AND ($3::bigint IS NULL OR seq < $3)
          ORDER BY seq DESC
          LIMIT $4",
    )
    .bind(merchant.0)
    .bind(customer_id)
    .bind(page.before_entry_id)
    .bind(page.size as i64 + 1)
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    rows.into_iter()
        .map(|row| {
            let kind = EntryKind::parse(&row.kind).ok_or_else(|| {
                Error::internal(format!("unknown ledger entry kind {:?}", row.kind))
            })?;
            Ok(LedgerEntry {
                entry_id: row.seq,
                kind,
                points: row.points,
                reference: row.reference,
                occurred_at: row.occurred_at,
                created_at: row.created_at,
            })
        })
        .collect()
}

/// The customer's internal id.
pub async fn customer_id(
    conn: &mut PgConnection,
    merchant: MerchantId,
    external_id: &str,
) -> Result<Option<i64>, Error> {
    sqlx::query_scalar("SELECT id FROM customers WHERE merchant_id = $1 AND external_id = $2")
        .bind(merchant.0)
        .bind(external_id)
        .fetch_optional(conn)
        .await
        .map_err(db_error)
}
