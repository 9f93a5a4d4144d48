//! What each gift RPC does: the catalog and rules (admins, audited), grants by hand, the
//! customer's gifts and the redemption at the till.

use crate::error::Error;
use crate::gifts::Gifts;
use crate::gifts::rules::{
    CatalogPage, Gift, GiftCode, GiftRule, GiftRuleSpec, GiftSpec, Grant, GrantSource, GrantsPage,
    redemption_fingerprint,
};
use crate::gifts::store::{self, GrantRequest, Granted, Redeemed};
use crate::platform::audit;
use crate::platform::caller::Caller;
use crate::platform::store::commit;
use crate::programs;

/// A merchant has at most this many gift rules (each purchase evaluates the active ones).
pub const MAX_RULES: i64 = 100;

/// A page of a list and the token of the next one.
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_page_token: Option<String>,
}

impl Gifts {
    /// Adds a gift to the catalog. Idempotent on gift_id: the same gift again returns the
    /// stored one; other content under a taken gift_id is ALREADY_EXISTS.
    pub async fn create_gift(&self, caller: &Caller, spec: GiftSpec) -> Result<Gift, Error> {
        let merchant = caller.merchant;
        let mut tx = self.store.begin().await?;
        let Some(gift) = store::insert_gift(&mut tx, merchant, &spec, self.clock.now()).await?
        else {
            let existing = store::load_gift(&mut tx, merchant, &spec.gift_id)
                .await?
                .ok_or_else(|| Error::internal("a taken gift_id has no gift"))?;
            if existing.spec == spec {
                return Ok(existing);
            }
            return Err(Error::AlreadyExists(format!(
                "gift_id {:?} is taken by another gift; use UpdateGift to change it",
                spec.gift_id
            )));
        };
        audit::record(
            &mut tx,
            merchant,
            &caller.actor(),
            "gift.create",
            serde_json::json!({ "gift_id": gift.spec.gift_id }),
        )
        .await?;
        commit(tx).await?;
        tracing::info!(%merchant, gift_id = %gift.spec.gift_id, "gift created");
        Ok(gift)
    }

    /// Replaces a gift, checking the caller's expected version (0: no check).
    pub async fn update_gift(
        &self,
        caller: &Caller,
        spec: GiftSpec,
        expected_version: i64,
    ) -> Result<Gift, Error> {
        let merchant = caller.merchant;
        let mut tx = self.store.begin().await?;
        let now = self.clock.now();
        let Some(gift) =
            store::update_gift(&mut tx, merchant, &spec, expected_version, now).await?
        else {
            return match store::load_gift(&mut tx, merchant, &spec.gift_id).await? {
                None => Err(Error::NotFound("gift")),
                Some(gift) => Err(Error::FailedPrecondition(format!(
                    "the gift is at version {}, not {expected_version}; read it again",
                    gift.version
                ))),
            };
        };
        audit::record(
            &mut tx,
            merchant,
            &caller.actor(),
            "gift.update",
            serde_json::json!({ "gift_id": gift.spec.gift_id, "version": gift.version }),
        )
        .await?;
        commit(tx).await?;
        tracing::info!(%merchant, gift_id = %gift.spec.gift_id, version = gift.version, "gift updated");
        Ok(gift)
    }

    /// The catalog by gift_id: every gift (admins) or the active ones (apps).
    pub async fn list_gifts(
        &self,
        caller: &Caller,
        active_only: bool,
        page: CatalogPage,
    ) -> Result<Page<Gift>, Error> {
        let mut conn = self.store.acquire().await?;
        let mut gifts = store::list_gifts(
            &mut conn,
            caller.merchant,
            active_only,
            &page,
            page.size + 1,
        )
        .await?;
        let next_page_token = if gifts.len() > page.size {
            gifts.truncate(page.size);
            gifts
                .last()
                .map(|g| CatalogPage::token_after(&g.spec.gift_id))
        } else {
            None
        };
        Ok(Page {
            items: gifts,
            next_page_token,
        })
    }

    /// Gives a gift by hand, at most once per issue key.
    pub async fn issue_gift(
        &self,
        caller: &Caller,
        external_id: &str,
        gift_id: &str,
        issue_key: &str,
    ) -> Result<Grant, Error> {
        let merchant = caller.merchant;
        let mut tx = self.store.begin().await?;
        let customer_id = store::customer_id(&mut tx, merchant, external_id)
            .await?
            .ok_or(Error::NotFound("customer"))?;
        let request = GrantRequest {
            customer_id,
            gift_id,
            source: GrantSource::Manual,
            source_reference: issue_key,
            purchase_id: None,
            now: self.clock.now(),
            delay_hours: 0,
        };
        let grant = match store::try_grant(&mut tx, merchant, &request).await? {
            Granted::Replayed(grant) => return Ok(grant),
            Granted::Created(grant) => grant,
            Granted::NoSuchGift => return Err(Error::NotFound("gift")),
            Granted::Inactive => {
                return Err(Error::FailedPrecondition("the gift is not active".into()));
            }
            Granted::SoldOut => {
                return Err(Error::FailedPrecondition("the gift is out of stock".into()));
            }
        };
        audit::record(
            &mut tx,
            merchant,
            &caller.actor(),
            "gift.issue",
            serde_json::json!({
                "gift_id": gift_id, "external_id": external_id, "issue_key": issue_key,
            }),
        )
        .await?;
        commit(tx).await?;
        tracing::info!(%merchant, %gift_id, "gift issued");
        Ok(grant)
    }

    /// Creates or replaces a gift rule, checking the caller's expected version (0: no check).
    pub async fn put_rule(
        &self,
        caller: &Caller,
        spec: GiftRuleSpec,
        expected_version: i64,
    ) -> Result<GiftRule, Error> {
        let merchant = caller.merchant;
        let mut tx = self.store.begin().await?;
        // One admin change of the merchant's rules at a time (the count below stays true).
        programs::store::lock(&mut tx, merchant)
            .await?
            .ok_or(Error::NotFound("program"))?;
        if store::load_gift(&mut tx, merchant, &spec.gift_id)
            .await?
            .is_none()
        {
            return Err(Error::NotFound("gift"));
        }
        let (version, count) = store::lock_rule(&mut tx, merchant, &spec.rule_id).await?;
        match version {
            Some(version) if expected_version != 0 && expected_version != version => {
                return Err(Error::FailedPrecondition(format!(
                    "the rule is at version {version}, not {expected_version}; read it again"
                )));
            }
            None if expected_version != 0 => {
                return Err(Error::FailedPrecondition(
                    "the rule does not exist; create it with expected_version 0".into(),
                ));
            }
            None if count >= MAX_RULES => {
                return Err(Error::FailedPrecondition(format!(
                    "a merchant has at most {MAX_RULES} gift rules"
                )));
            }
            _ => {}
        }
        let rule = store::put_rule(&mut tx, merchant, &spec, self.clock.now()).await?;
        audit::record(
            &mut tx,
            merchant,
            &caller.actor(),
            "gift_rule.put",
            serde_json::json!({ "rule_id": rule.spec.rule_id, "version": rule.version }),
        )
        .await?;
        commit(tx).await?;
        tracing::info!(%merchant, rule_id = %rule.spec.rule_id, version = rule.version, "gift rule stored");
        Ok(rule)
    }

    pub async fn list_rules(&self, caller: &Caller) -> Result<Vec<GiftRule>, Error> {
        let mut conn = self.store.acquire().await?;
        store::list_rules(&mut conn, caller.merchant).await
    }

    /// A customer's grants, newest first. A customer token reads only its own customer's
    /// (asked before anything is looked up).
    pub async fn list_customer_gifts(
        &self,
        caller: &Caller,
        external_id: &str,
        page: GrantsPage,
    ) -> Result<Page<Grant>, Error> {
        caller.may_read(external_id)?;
        let mut conn = self.store.acquire().await?;
        let customer_id = store::customer_id(&mut conn, caller.merchant, external_id)
            .await?
            .ok_or(Error::NotFound("customer"))?;
        let mut grants = store::grants_of_customer(
            &mut conn,
            caller.merchant,
            customer_id,
            &page,
            page.size + 1,
        )
        .await?;
        let next_page_token = if grants.len() > page.size {
            grants.truncate(page.size);
            grants.last().map(GrantsPage::token_after)
        } else {
            None
        };
        Ok(Page {
            items: grants,
            next_page_token,
        })
    }

    /// Redeems a code at the till: at most once, only at its own merchant, only inside its
    /// window. A replay with the same redemption key gets the same answer; the key with
    /// another code or store is ALREADY_EXISTS. The code is never logged.
    pub async fn redeem_gift(
        &self,
        caller: &Caller,
        code: &GiftCode,
        redemption_key: &str,
        store_id: Option<&str>,
    ) -> Result<Grant, Error> {
        let merchant = caller.merchant;
        let now = self.clock.now();
        let fingerprint = redemption_fingerprint(code, store_id.unwrap_or_default());
        let mut conn = self.store.acquire().await?;
        let redeemed = store::redeem(
            &mut conn,
            merchant,
            code,
            redemption_key,
            &fingerprint,
            store_id,
            now,
        )
        .await?;
        match redeemed {
            Redeemed::Now(grant) => {
                tracing::info!(%merchant, gift_id = %grant.gift_id, "gift redeemed");
                Ok(grant)
            }
            Redeemed::KeyUsed(grant, hash) if hash[..] == fingerprint[..] => Ok(grant),
            Redeemed::KeyUsed(..) => Err(Error::AlreadyExists(
                "the redemption_key was used for another redemption".into(),
            )),
            Redeemed::Not(None) => Err(Error::NotFound("gift code")),
            Redeemed::Not(Some(grant)) => match grant.refusal_at(now) {
                Some(why) => Err(Error::FailedPrecondition(why)),
                // It became redeemable between the two statements (a clock step): retrying
                // is safe with the same key.
                None => Err(Error::Unavailable(
                    "the gift changed while it was redeemed; retry with the same key".into(),
                )),
            },
        }
    }
}
