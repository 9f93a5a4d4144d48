//! A customer's account: the projection of their ledger that checkout, apps and the cache
//! read. Every feature that changes a balance returns the state after its change, and that
//! state is what the cache holds (`platform::cache`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use sqlx::types::Json;

use crate::error::Error;
use crate::platform::cache::CustomerKey;
use crate::platform::caller::MerchantId;
use crate::platform::store::db_error;
use crate::status::standing::Standing;

/// The account of a customer by external id (the cold balance read).
pub const ACCOUNT_BY_EXTERNAL_ID: &str = include_str!("sql/account_by_external_id.sql");

/// The accounts of many customers at once (the cache repair's batch read).
const ACCOUNTS_BY_EXTERNAL_IDS: &str = include_str!("sql/accounts_by_external_ids.sql");

/// The hot state of one customer, as stored in Postgres and cached in Redis.
/// `version` grows on every change, so two copies can always be ordered.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AccountState {
    pub available: i64,
    pub pending: i64,
    pub lifetime_earned: i64,
    pub lifetime_redeemed: i64,
    pub purchase_count: i64,
    pub version: i64,
    /// The soonest expiry of available points (`None`: none of them expire). Derived from the
    /// lots, so every statement that returns an account computes it (`sql/next_expiry.sql`).
    #[serde(default)]
    pub next_expiry: Option<PointsExpiry>,
    /// Status and tier as reads show them (`accounts.standing`); `None` for an answer stored
    /// before standings existed (a replay's) or an account never assessed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standing: Option<Box<Standing>>,
}

/// Points that expire together: spendable strictly before `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointsExpiry {
    pub points: i64,
    pub at: DateTime<Utc>,
}

/// The columns of `accounts` as a statement returns them, with the next expiry.
#[derive(sqlx::FromRow)]
pub(crate) struct AccountRow {
    available: i64,
    pending: i64,
    lifetime_earned: i64,
    lifetime_redeemed: i64,
    purchase_count: i64,
    version: i64,
    next_expiry_points: Option<i64>,
    next_expiry_at: Option<DateTime<Utc>>,
    standing: Option<Json<Standing>>,
}

impl From<AccountRow> for AccountState {
    fn from(row: AccountRow) -> Self {
        AccountState {
            available: row.available,
            pending: row.pending,
            lifetime_earned: row.lifetime_earned,
            lifetime_redeemed: row.lifetime_redeemed,
            purchase_count: row.purchase_count,
            version: row.version,
            next_expiry: match (row.next_expiry_points, row.next_expiry_at) {
                (Some(points), Some(at)) if points > 0 => Some(PointsExpiry { points, at }),
                _ => None,
            },
            standing: row.standing.map(|s| Box::new(s.0)),
        }
    }
}

/// The customer's account as committed now; `None` when the customer does not exist.
pub async fn load(
    conn: &mut PgConnection,
    merchant: MerchantId,
    external_id: &str,
) -> Result<Option<AccountState>, Error> {
    let row: Option<AccountRow> = sqlx::query_as(ACCOUNT_BY_EXTERNAL_ID)
        .bind(merchant.0)
        .bind(external_id)
        .fetch_optional(conn)
        .await
        .map_err(db_error)?;
    Ok(row.map(AccountState::from))
}

#[derive(sqlx::FromRow)]
struct KeyedAccountRow {
    merchant_id: i64,
    external_id: String,
    #[sqlx(flatten)]
    account: AccountRow,
}

/// The committed accounts of `customers`, in one query; customers that do not exist are left
/// out.
pub async fn load_many(
    conn: &mut PgConnection,
    customers: &[CustomerKey],
) -> Result<Vec<(CustomerKey, AccountState)>, Error> {
    let merchants: Vec<i64> = customers.iter().map(|c| c.merchant.0).collect();
    let external_ids: Vec<&str> = customers.iter().map(|c| c.external_id.as_str()).collect();
    let rows: Vec<KeyedAccountRow> = sqlx::query_as(ACCOUNTS_BY_EXTERNAL_IDS)
        .bind(merchants)
        .bind(external_ids)
        .fetch_all(conn)
        .await
        .map_err(db_error)?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let key = CustomerKey {
                merchant: MerchantId(row.merchant_id),
                external_id: row.external_id,
            };
            (key, row.account.into())
        })
        .collect())
}
