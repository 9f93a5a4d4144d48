//! Purchases: the atomic earn statement and the lookup that answers retries.

use sqlx::PgConnection;

use crate::domain::account::AccountState;
use crate::domain::purchase::Purchase;
use crate::error::Error;
use crate::storage::customers::AccountRow;
use crate::storage::{MerchantId, db_error, sql, violated_unique_constraint};

pub enum RecordOutcome {
    /// The purchase was stored; the account right after it.
    Recorded(AccountState),
    /// The purchase_id was taken already (by an earlier attempt or a concurrent one).
    AlreadyTaken,
}

/// Writes the purchase, its lines, its EARN ledger entry and the account update in one
/// statement. Nothing is written when the purchase_id is already taken.
pub async fn record(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    purchase: &Purchase,
    points: i64,
) -> Result<RecordOutcome, Error> {
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
    let result = sqlx::query_as::<_, AccountRow>(sql::RECORD_PURCHASE)
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
        .fetch_optional(conn)
        .await;
    match result {
        Ok(Some(row)) => Ok(RecordOutcome::Recorded(row.into())),
        Ok(None) => Ok(RecordOutcome::AlreadyTaken),
        Err(error) => match violated_unique_constraint(&error).as_deref() {
            Some("purchases_pkey" | "ledger_entries_operation_key") => {
                Ok(RecordOutcome::AlreadyTaken)
            }
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
        },
    }))
}
