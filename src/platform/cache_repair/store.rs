//! The durable list of customers whose cached state may be stale (`cache_repairs`).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::error::Error;
use crate::platform::caller::MerchantId;
use crate::platform::store::db_error;

/// Records that `external_id`'s cache entry may be stale.
pub async fn note(
    conn: &mut PgConnection,
    merchant: MerchantId,
    external_id: &str,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO cache_repairs (merchant_id, external_id) VALUES ($1, $2)
         ON CONFLICT (merchant_id, external_id) DO UPDATE SET noted_at = now()",
    )
    .bind(merchant.0)
    .bind(external_id)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// A noted repair, claimed by the caller's transaction.
pub struct Claimed {
    pub merchant: MerchantId,
    pub external_id: String,
    pub noted_at: DateTime<Utc>,
}

/// Claims up to `limit` repairs no other replica is working on; they stay claimed until the
/// transaction of `conn` ends.
pub async fn claim(conn: &mut PgConnection, limit: i64) -> Result<Vec<Claimed>, Error> {
    let rows: Vec<(i64, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT merchant_id, external_id, noted_at FROM cache_repairs
          ORDER BY noted_at LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    Ok(rows
        .into_iter()
        .map(|(merchant, external_id, noted_at)| Claimed {
            merchant: MerchantId(merchant),
            external_id,
            noted_at,
        })
        .collect())
}

/// Removes a repair that is done.
pub async fn done(conn: &mut PgConnection, repair: &Claimed) -> Result<(), Error> {
    sqlx::query(
        "DELETE FROM cache_repairs WHERE merchant_id = $1 AND external_id = $2 AND noted_at = $3",
    )
    .bind(repair.merchant.0)
    .bind(&repair.external_id)
    .bind(repair.noted_at)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}
