//! The SQL of standings outside checkout (whose statement writes them itself): the facts of a
//! locked customer, writing a standing after a return or a sweep with its history rows and
//! events, and the sweep's work list and claim.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use sqlx::types::Json;

use crate::error::Error;
use crate::platform::account::{AccountRow, AccountState};
use crate::platform::caller::MerchantId;
use crate::platform::store::db_error;
use crate::points::store::StandingRow;
use crate::status::standing::{Evaluation, status_details, warning_details};

/// A locked customer's standing and purchases (`sql/standing_facts.sql`).
pub const STANDING_FACTS: &str = include_str!("sql/standing_facts.sql");

/// Writes a standing with its history rows and events (`sql/write_standing.sql`).
pub const WRITE_STANDING: &str = include_str!("sql/write_standing.sql");

/// The sweep's due accounts (`sql/due_accounts.sql`).
pub const DUE_ACCOUNTS: &str = include_str!("sql/due_accounts.sql");

/// Locks an account that is (still) due for a look, skipping one another transaction holds:
/// two sweeps never look at one customer at once, and the second one to come finds it no
/// longer due. `$1` merchant_id, `$2` customer_id, `$3` now.
pub const CLAIM_DUE_ACCOUNT: &str = "SELECT a.customer_id
  FROM accounts a
 WHERE a.merchant_id = $1 AND a.customer_id = $2 AND a.review_at <= $3
   FOR UPDATE SKIP LOCKED";

/// Only the next look's instant (a sweep that found nothing else to change).
const SET_REVIEW_AT: &str =
    "UPDATE accounts SET review_at = $3 WHERE merchant_id = $1 AND customer_id = $2";

pub async fn facts(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    now: DateTime<Utc>,
) -> Result<Option<StandingRow>, Error> {
    sqlx::query_as(STANDING_FACTS)
        .bind(merchant.0)
        .bind(customer_id)
        .bind(now)
        .fetch_optional(conn)
        .await
        .map_err(db_error)
}

/// Writes `e` to the locked account, adding `versions` to its version; `None` if the account
/// does not exist.
pub async fn write_standing(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    e: &Evaluation,
    versions: i64,
    at: DateTime<Utc>,
) -> Result<Option<AccountState>, Error> {
    let row: Option<AccountRow> = sqlx::query_as(WRITE_STANDING)
        .bind(merchant.0)
        .bind(customer_id)
        .bind(versions)
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
        .bind(e.warning.as_ref().map(|w| Json(warning_details(w))))
        .bind(at)
        .fetch_optional(conn)
        .await
        .map_err(db_error)?;
    Ok(row.map(AccountState::from))
}

pub async fn set_review_at(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    review_at: Option<DateTime<Utc>>,
) -> Result<(), Error> {
    sqlx::query(SET_REVIEW_AT)
        .bind(merchant.0)
        .bind(customer_id)
        .bind(review_at)
        .execute(conn)
        .await
        .map_err(db_error)?;
    Ok(())
}

/// Up to `batch` accounts due for a look at `now`: (merchant, customer id, external id).
pub async fn due_accounts(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    batch: i64,
) -> Result<Vec<(MerchantId, i64, String)>, Error> {
    let rows: Vec<(i64, i64, String)> = sqlx::query_as(DUE_ACCOUNTS)
        .bind(now)
        .bind(batch)
        .fetch_all(conn)
        .await
        .map_err(db_error)?;
    Ok(rows
        .into_iter()
        .map(|(merchant, customer, external_id)| (MerchantId(merchant), customer, external_id))
        .collect())
}

/// Locks the account if it is still due (see [`CLAIM_DUE_ACCOUNT`]).
pub async fn claim_due(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    now: DateTime<Utc>,
) -> Result<bool, Error> {
    let claimed: Option<i64> = sqlx::query_scalar(CLAIM_DUE_ACCOUNT)
        .bind(merchant.0)
        .bind(customer_id)
        .bind(now)
        .fetch_optional(conn)
        .await
        .map_err(db_error)?;
    Ok(claimed.is_some())
}
