//! The SQL of access: merchants and their API keys.

use sqlx::PgConnection;

use crate::access::rules::KeyHash;
use crate::access::tokens::SigningSecret;
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

/// A key as the verification of its customer tokens needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignerRecord {
    pub merchant: MerchantId,
    pub scope: Scope,
    /// `None` while the key has never minted a token.
    pub secret: Option<SigningSecret>,
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

/// The live key `key_id` and its token signing secret.
pub async fn find_signer(
    conn: &mut PgConnection,
    key_id: i64,
) -> Result<Option<SignerRecord>, Error> {
    let row: Option<(i64, String, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT merchant_id, scope, token_secret FROM api_keys
          WHERE id = $1 AND revoked_at IS NULL",
    )
    .bind(key_id)
    .fetch_optional(conn)
    .await
    .map_err(db_error)?;
    row.map(|(merchant, scope, secret)| {
        let scope = Scope::parse(&scope)
            .ok_or_else(|| Error::internal(format!("stored scope {scope:?} is invalid")))?;
        let secret = secret
            .map(|bytes| {
                SigningSecret::from_stored(&bytes)
                    .ok_or_else(|| Error::internal("a stored token secret is not 32 bytes"))
            })
            .transpose()?;
        Ok(SignerRecord {
            merchant: MerchantId(merchant),
            scope,
            secret,
        })
    })
    .transpose()
}

/// The token signing secret of the live key `key_id` of `merchant`: the stored one, or
/// `fresh` stored now if the key has none yet. `None` if the key is gone or revoked.
///
/// Read first, so that minting (frequent) does not write the key's row; only a key's first
/// mint writes, and concurrent first mints agree on the secret written first (the UPDATE of
/// the second re-reads the row once the first commits).
pub async fn signing_secret(
    conn: &mut PgConnection,
    merchant: MerchantId,
    key_id: i64,
    fresh: SigningSecret,
) -> Result<Option<SigningSecret>, Error> {
    let current: Option<Option<Vec<u8>>> = sqlx::query_scalar(
        "SELECT token_secret FROM api_keys
          WHERE merchant_id = $1 AND id = $2 AND revoked_at IS NULL",
    )
    .bind(merchant.0)
    .bind(key_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_error)?;
    let stored = match current {
        None => return Ok(None),
        Some(Some(stored)) => Some(stored),
        Some(None) => sqlx::query_scalar(
            "UPDATE api_keys SET token_secret = COALESCE(token_secret, $3)
              WHERE merchant_id = $1 AND id = $2 AND revoked_at IS NULL
          RETURNING token_secret",
        )
        .bind(merchant.0)
        .bind(key_id)
        .bind(&fresh.0[..])
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_error)?,
    };
    stored
        .map(|bytes| {
            SigningSecret::from_stored(&bytes)
                .ok_or_else(|| Error::internal("a stored token secret is not 32 bytes"))
        })
        .transpose()
}
