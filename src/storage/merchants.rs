//! Merchants, their API keys and the audit log.

use sqlx::{PgConnection, PgPool};

use crate::domain::api_key::{KeyHash, Scope};
use crate::domain::program::ProgramRules;
use crate::error::Error;
use crate::storage::{MerchantId, db_error, programs};

/// A key as the authenticator needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: i64,
    pub merchant: MerchantId,
    pub scope: Scope,
}

/// Creates a merchant with its program and a first admin key, atomically.
pub async fn create(
    pool: &PgPool,
    name: &str,
    rules: &ProgramRules,
    admin_key: KeyHash,
    admin_key_prefix: &str,
) -> Result<(MerchantId, i64), Error> {
    let mut tx = pool.begin().await.map_err(db_error)?;
    let merchant = MerchantId(
        sqlx::query_scalar("INSERT INTO merchants (name) VALUES ($1) RETURNING id")
            .bind(name)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?,
    );
    programs::insert(&mut tx, merchant, rules).await?;
    let key_id = insert_key(&mut tx, merchant, Scope::Admin, admin_key, admin_key_prefix).await?;
    audit(
        &mut tx,
        merchant,
        "cli",
        "merchant.create",
        serde_json::json!({ "admin_key_id": key_id }),
    )
    .await?;
    tx.commit().await.map_err(db_error)?;
    Ok((merchant, key_id))
}

pub async fn exists(pool: &PgPool, merchant: MerchantId) -> Result<bool, Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM merchants WHERE id = $1)")
        .bind(merchant.0)
        .fetch_one(pool)
        .await
        .map_err(db_error)
}

pub async fn create_key(
    pool: &PgPool,
    merchant: MerchantId,
    scope: Scope,
    hash: KeyHash,
    prefix: &str,
    actor: &str,
) -> Result<i64, Error> {
    let mut tx = pool.begin().await.map_err(db_error)?;
    let key_id = insert_key(&mut tx, merchant, scope, hash, prefix).await?;
    audit(
        &mut tx,
        merchant,
        actor,
        "key.create",
        serde_json::json!({ "key_id": key_id, "scope": scope.as_str() }),
    )
    .await?;
    tx.commit().await.map_err(db_error)?;
    Ok(key_id)
}

async fn insert_key(
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
pub async fn revoke_key(
    pool: &PgPool,
    key_id: i64,
    actor: &str,
) -> Result<Option<MerchantId>, Error> {
    let mut tx = pool.begin().await.map_err(db_error)?;
    let merchant: Option<i64> = sqlx::query_scalar(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1 RETURNING merchant_id",
    )
    .bind(key_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db_error)?;
    let Some(merchant) = merchant.map(MerchantId) else {
        return Ok(None);
    };
    audit(
        &mut tx,
        merchant,
        actor,
        "key.revoke",
        serde_json::json!({ "key_id": key_id }),
    )
    .await?;
    tx.commit().await.map_err(db_error)?;
    Ok(Some(merchant))
}

/// The live (not revoked) key with this hash.
pub async fn find_key(pool: &PgPool, hash: KeyHash) -> Result<Option<KeyRecord>, Error> {
    let row: Option<(i64, i64, String)> = sqlx::query_as(
        "SELECT id, merchant_id, scope FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
    )
    .bind(&hash.0[..])
    .fetch_optional(pool)
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

pub(crate) async fn audit(
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
