//! Operator use cases behind the command line: merchants and API keys. Each change and its
//! audit record commit together.

use crate::access::rules::SecretKey;
use crate::access::store;
use crate::error::Error;
use crate::platform::audit;
use crate::platform::caller::{MerchantId, Scope};
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
