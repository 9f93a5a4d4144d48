//! Operator use cases behind the command line: merchants and API keys.

use crate::domain::api_key::{Scope, SecretKey};
use crate::domain::money::Currency;
use crate::domain::program::ProgramRules;
use crate::domain::validation::{self, Violations};
use crate::error::Error;
use crate::storage::{MerchantId, Store, merchants};

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
        return Err(v.into_error());
    };
    v.finish()?;
    let secret = SecretKey::generate();
    let (merchant, key_id) = merchants::create(
        store.pool(),
        &name,
        &ProgramRules::default_for(currency),
        secret.hash(),
        &secret.display_prefix(),
    )
    .await?;
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
    if !merchants::exists(store.pool(), merchant).await? {
        return Err(Error::NotFound("merchant"));
    }
    let secret = SecretKey::generate();
    let key_id = merchants::create_key(
        store.pool(),
        merchant,
        scope,
        secret.hash(),
        &secret.display_prefix(),
        "cli",
    )
    .await?;
    tracing::info!(%merchant, key_id, %scope, "api key created");
    Ok(NewKey {
        key_id,
        scope,
        secret,
    })
}

/// Revokes a key; running servers stop accepting it within their key cache TTL.
pub async fn revoke_key(store: &Store, key_id: i64) -> Result<MerchantId, Error> {
    let merchant = merchants::revoke_key(store.pool(), key_id, "cli")
        .await?
        .ok_or(Error::NotFound("api key"))?;
    tracing::info!(%merchant, key_id, "api key revoked");
    Ok(merchant)
}
