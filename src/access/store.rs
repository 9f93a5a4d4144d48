//! The SQL of access: merchants and their API keys.

use sqlx::PgConnection;

use crate::access::rules::KeyHash;
use crate::error::Error;
use crate::platform::caller::{MerchantId, Scope};
use crate::platform::store::db_error;

/// A key as the authenticator needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: i64,
    pub merchant: MerchantId,
    pub scope: Scope,
}

/// Inserts a merchant; its program and first key are the caller's next statements.
pub async fn insert_merchant(conn: &mut PgConnection, name: &str) -> Result<MerchantId, Error> {
    sqlx::query_scalar("INSERT INTO merchants (name) VALUES ($1) RETURNING id")
        .bind(name)
        .fetch_one(conn)
        .await
        .map(MerchantId)
        .map_err(db_error)
}

pub async fn exists(conn: &mut PgConnection, merchant: MerchantId) -> Result<bool, Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM merchants WHERE id = $1)")
        .bind(merchant.0)
        .fetch_one(conn)
        .await
        .map_err(db_error)
}

/// Inserts a key (stored as its hash only).
pub async fn insert_key(
    conn: &mut PgConnection,
    merchant: MerchantId,
    scope: Scope,
    hash: KeyHash,
    prefix: &str,
) -> Result<i64, Error> {
    sqlx::query_scalar(
        "INSERT INTO api_keys (merchant_id, scope, key_hash, key_prefix)
         VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(merchant.0)
    .bind(scope.as_str())
    .bind(&hash.0[..])
    .bind(prefix)
    .fetch_one(conn)
    .await
    .map_err(db_error)
}

/// Revokes a key. Returns its merchant, or `None` if no such key exists. Revoking twice is
/// harmless and keeps the first revocation time.
pub async fn revoke_key(conn: &mut PgConnection, key_id: i64) -> Result<Option<MerchantId>, Error> {
    sqlx::query_scalar(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1 RETURNING merchant_id",
    )
    .bind(key_id)
    .fetch_optional(conn)
    .await
    .map(|merchant: Option<i64>| merchant.map(MerchantId))
    .map_err(db_error)
}

/// The live (not revoked) key with this hash.
pub async fn find_key(conn: &mut PgConnection, hash: KeyHash) -> Result<Option<KeyRecord>, Error> {
    let row: Option<(i64, i64, String)> = sqlx::query_as(
        "SELECT id, merchant_id, scope FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
    )
    .bind(&hash.0[..])
    .fetch_optional(conn)
    .await
    .map_err(db_error)?;
    row.map(|(key_id, merchant, scope)| {
        let scope = Scope::parse(&scope)
            .ok_or_else(|| Error::internal(format!("stored scope {scope:?} is invalid")))?;
        Ok(KeyRecord {
            key_id,
            merchant: MerchantId(merchant),
            scope,
        })
    })
    .transpose()
}
