//! The durable list of customers whose cached state may be stale (`cache_repairs`): an
//! append-only queue, so that noting never waits on anything.

use sqlx::PgConnection;

use crate::error::Error;
use crate::platform::caller::MerchantId;
use crate::platform::store::db_error;

/// Records that `external_id`'s cache entry may be stale. A plain insert: it conflicts with
/// no other note and no claimed row.
pub async fn note(
    conn: &mut PgConnection,
    merchant: MerchantId,
    external_id: &str,
) -> Result<(), Error> {
    sqlx::query("INSERT INTO cache_repairs (merchant_id, external_id) VALUES ($1, $2)")
        .bind(merchant.0)
        .bind(external_id)
        .execute(conn)
        .await
        .map_err(db_error)?;
    Ok(())
}

/// A noted repair, claimed by the caller's transaction.
pub struct Claimed {
    pub id: i64,
    pub merchant: MerchantId,
    pub external_id: String,
}

/// Claims the oldest `limit` notes no other replica is working on; they stay claimed until
/// the transaction of `conn` ends.
pub async fn claim(conn: &mut PgConnection, limit: i64) -> Result<Vec<Claimed>, Error> {
    let rows: Vec<(i64, i64, String)> = sqlx::query_as(
        "SELECT id, merchant_id, external_id FROM cache_repairs
          ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    Ok(rows
        .into_iter()
        .map(|(id, merchant, external_id)| Claimed {
            id,
            merchant: MerchantId(merchant),
            external_id,
        })
        .collect())
}

/// Removes notes whose repair is done.
pub async fn done(conn: &mut PgConnection, ids: &[i64]) -> Result<(), Error> {
    sqlx::query("DELETE FROM cache_repairs WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await
        .map_err(db_error)?;
    Ok(())
}
