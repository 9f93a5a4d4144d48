//! The audit log: who changed what, written in the transaction of the change itself.

use sqlx::PgConnection;

use crate::error::Error;
use crate::platform::caller::MerchantId;
use crate::platform::store::db_error;

/// Records `action` by `actor` (`key:<id>` or `cli`) with its details.
pub async fn record(
    conn: &mut PgConnection,
    merchant: MerchantId,
    actor: &str,
    action: &str,
    details: serde_json::Value,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO audit_log (merchant_id, actor, action, details) VALUES ($1, $2, $3, $4)",
    )
    .bind(merchant.0)
    .bind(actor)
    .bind(action)
    .bind(details)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}
