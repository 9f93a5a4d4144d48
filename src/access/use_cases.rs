//! Operator use cases behind the command line: merchants and API keys. Each change and its
//! audit record commit together.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::access::rules::SecretKey;
use crate::access::store;
use crate::access::tokens::{Claims, SigningSecret};
use crate::error::Error;
use crate::platform::audit;
use crate::platform::caller::{Caller, MerchantId, Scope};
use crate::platform::money::Currency;
use crate::platform::store::{Store, commit};
use crate::platform::validation::{self, Violations};
use crate::programs;
use crate::programs::rules::ProgramRules;

/// A key just created. The secret is shown once and never stored.
#[derive(Debug)]
pub struct NewKey {
    pub key_id: i64,
    pub scope: Scope,
    pub secret: SecretKey,
}

/// Creates a merchant with the default program in `currency` and a first admin key.
pub async fn create_merchant(
    store: &Store,
    name: &str,
    currency: &str,
) -> Result<(MerchantId, NewKey), Error> {
    let mut v = Violations::default();
    let name = v.check(validation::text("name", name, 200));
    if name.as_deref() == Some("") {
        v.add("name", "must not be empty");
    }
    let currency = v.check(Currency::parse("currency", currency));
    let (Some(name), Some(currency)) = (name, currency) else {
        return Err(v.into_error().into());
    };
    v.finish()?;
    let secret = SecretKey::generate();
    let mut tx = store.begin().await?;
    let merchant = store::insert_merchant(&mut tx, &name).await?;
    programs::store::insert(&mut tx, merchant, &ProgramRules::default_for(currency)).await?;
    let key_id = store::insert_key(
        &mut tx,
        merchant,
        Scope::Admin,
        secret.hash(),
        &secret.display_prefix(),
    )
    .await?;
    audit::record(
        &mut tx,
        merchant,
        "cli",
        "merchant.create",
        serde_json::json!({ "admin_key_id": key_id }),
    )
    .await?;
    commit(tx).await?;
    tracing::info!(%merchant, key_id, "merchant created");
    Ok((
        merchant,
        NewKey {
            key_id,
            scope: Scope::Admin,
            secret,
        },
    ))
}

pub async fn create_key(
    store: &Store,
    merchant: MerchantId,
    scope: Scope,
) -> Result<NewKey, Error> {
    let secret = SecretKey::generate();
    let mut tx = store.begin().await?;
    if !store::exists(&mut tx, merchant).await? {
        return Err(Error::NotFound("merchant"));
    }
    let key_id = store::insert_key(
        &mut tx,
        merchant,
        scope,
        secret.hash(),
        &secret.display_prefix(),
    )
    .await?;
    audit::record(
        &mut tx,
        merchant,
        "cli",
        "key.create",
        serde_json::json!({ "key_id": key_id, "scope": scope.as_str() }),
    )
    .await?;
    commit(tx).await?;
    tracing::info!(%merchant, key_id, %scope, "api key created");
    Ok(NewKey {
        key_id,
        scope,
        secret,
    })
}

/// Revokes a key; running servers stop accepting it within their key cache TTL.
pub async fn revoke_key(store: &Store, key_id: i64) -> Result<MerchantId, Error> {
    let mut tx = store.begin().await?;
    let merchant = store::revoke_key(&mut tx, key_id)
        .await?
        .ok_or(Error::NotFound("api key"))?;
    audit::record(
        &mut tx,
        merchant,
        "cli",
        "key.revoke",
        serde_json::json!({ "key_id": key_id }),
    )
    .await?;
    commit(tx).await?;
    tracing::info!(%merchant, key_id, "api key revoked");
    Ok(merchant)
}

/// A customer token just minted. `Debug` never shows the token.
pub struct CustomerToken {
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

impl fmt::Debug for CustomerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustomerToken")
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Mints a token that reads only `external_id` of the caller's merchant until `now + ttl`,
/// signed with the caller's key (its secret created on the key's first mint). Revoking the
/// key revokes the token. Nothing is written but that secret; the customer need not exist
/// yet (its reads then answer NOT_FOUND, for that customer only).
pub async fn issue_customer_token(
    store: &Store,
    caller: &Caller,
    external_id: &str,
    ttl: Duration,
    now: DateTime<Utc>,
) -> Result<CustomerToken, Error> {
    if caller.customer.is_some() {
        return Err(Error::PermissionDenied(
            "a customer token cannot mint tokens".to_string(),
        ));
    }
    let expires_at = i64::try_from(ttl.as_secs())
        .ok()
        .and_then(|ttl| DateTime::from_timestamp(now.timestamp().checked_add(ttl)?, 0))
        .ok_or_else(|| Error::invalid("ttl_seconds", "is out of range"))?;
    let mut conn = store.acquire().await?;
    let secret = store::signing_secret(
        &mut conn,
        caller.merchant,
        caller.key_id,
        SigningSecret::generate(),
    )
    .await?
    .ok_or(Error::Unauthenticated("unknown or revoked API key"))?;
    drop(conn);
    let claims = Claims {
        merchant: caller.merchant,
        key_id: caller.key_id,
        external_id: external_id.to_string(),
        expires_at,
    };
    Ok(CustomerToken {
        token: claims.sign(&secret),
        expires_at,
    })
}
