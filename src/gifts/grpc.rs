//! The thin handlers of the gift RPCs (called from the services' trait impls in `points`,
//! `members` and `programs`) and the proto conversions of gifts.

use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status};

use crate::gifts::Gifts;
use crate::gifts::rules::{
    self, CatalogPage, Gift, GiftCode, GiftInput, GiftKind, GiftRule, GiftRuleInput, GiftRuleSpec,
    GiftSpec, Grant, GrantSource, GrantStatus, GrantsPage, Trigger, TriggerInput,
};
use crate::pb;
use crate::platform::proto::{caller, timestamp};
use crate::platform::validation::{self, Violations};

fn expected_version(value: i64) -> Result<i64, Status> {
    if value < 0 {
        return Err(Status::from(crate::Error::invalid(
            "expected_version",
            "must not be negative",
        )));
    }
    Ok(value)
}

// ---------------------------------------------------------------------------------------------
// ProgramService

pub(crate) async fn create_gift(
    gifts: &Gifts,
    request: Request<pb::CreateGiftRequest>,
) -> Result<Response<pb::CreateGiftResponse>, Status> {
    let caller = caller(&request)?;
    let spec = GiftSpec::parse(gift_input(request.into_inner().gift)?)?;
    let gift = gifts.create_gift(&caller, spec).await?;
    Ok(Response::new(pb::CreateGiftResponse {
        gift: Some(gift_message(gift)),
    }))
}

pub(crate) async fn update_gift(
    gifts: &Gifts,
    request: Request<pb::UpdateGiftRequest>,
) -> Result<Response<pb::UpdateGiftResponse>, Status> {
    let caller = caller(&request)?;
    let r = request.into_inner();
    let expected = expected_version(r.expected_version)?;
    let spec = GiftSpec::parse(gift_input(r.gift)?)?;
    let gift = gifts.update_gift(&caller, spec, expected).await?;
    Ok(Response::new(pb::UpdateGiftResponse {
        gift: Some(gift_message(gift)),
    }))
}

pub(crate) async fn list_gifts(
    gifts: &Gifts,
    request: Request<pb::ListGiftsRequest>,
) -> Result<Response<pb::ListGiftsResponse>, Status> {
    let caller = caller(&request)?;
    let r = request.into_inner();
    let page = CatalogPage::parse(r.page_size, &r.page_token)?;
    let page = gifts.list_gifts(&caller, false, page).await?;
    Ok(Response::new(pb::ListGiftsResponse {
        gifts: page.items.into_iter().map(gift_message).collect(),
        next_page_token: page.next_page_token.unwrap_or_default(),
    }))
}

pub(crate) async fn issue_gift(
    gifts: &Gifts,
    request: Request<pb::IssueGiftRequest>,
) -> Result<Response<pb::IssueGiftResponse>, Status> {
    let caller = caller(&request)?;
    let r = request.into_inner();
    let mut v = Violations::default();
    v.check(validation::identifier("external_id", &r.external_id));
    v.check(rules::gift_id("gift_id", &r.gift_id));
    v.check(validation::identifier("issue_key", &r.issue_key));
    v.finish()?;
    let grant = gifts
        .issue_gift(&caller, &r.external_id, &r.gift_id, &r.issue_key)
        .await?;
    Ok(Response::new(pb::IssueGiftResponse {
        grant: Some(grant_message(&grant, gifts.now())),
    }))
}

pub(crate) async fn put_gift_rule(
    gifts: &Gifts,
    request: Request<pb::PutGiftRuleRequest>,
) -> Result<Response<pb::PutGiftRuleResponse>, Status> {
    let caller = caller(&request)?;
    let r = request.into_inner();
    let expected = expected_version(r.expected_version)?;
    let spec = GiftRuleSpec::parse(rule_input(r.rule)?)?;
    let rule = gifts.put_rule(&caller, spec, expected).await?;
    Ok(Response::new(pb::PutGiftRuleResponse {
        rule: Some(rule_message(rule)),
    }))
}

pub(crate) async fn list_gift_rules(
    gifts: &Gifts,
    request: Request<pb::ListGiftRulesRequest>,
) -> Result<Response<pb::ListGiftRulesResponse>, Status> {
    let caller = caller(&request)?;
    let rules = gifts.list_rules(&caller).await?;
    Ok(Response::new(pb::ListGiftRulesResponse {
        rules: rules.into_iter().map(rule_message).collect(),
    }))
}

// ---------------------------------------------------------------------------------------------
// MemberService

pub(crate) async fn list_gift_catalog(
    gifts: &Gifts,
    request: Request<pb::ListGiftCatalogRequest>,
) -> Result<Response<pb::ListGiftCatalogResponse>, Status> {
    let caller = caller(&request)?;
    let r = request.into_inner();
    let page = CatalogPage::parse(r.page_size, &r.page_token)?;
    let page = gifts.list_gifts(&caller, true, page).await?;
    Ok(Response::new(pb::ListGiftCatalogResponse {
        gifts: page.items.into_iter().map(gift_message).collect(),
        next_page_token: page.next_page_token.unwrap_or_default(),
    }))
}

pub(crate) async fn list_customer_gifts(
    gifts: &Gifts,
    request: Request<pb::ListCustomerGiftsRequest>,
) -> Result<Response<pb::ListCustomerGiftsResponse>, Status> {
    let caller = caller(&request)?;
    let r = request.into_inner();
    let mut v = Violations::default();
    v.check(validation::identifier("external_id", &r.external_id));
    let page = match GrantsPage::parse(r.page_size, &r.page_token) {
        Ok(page) => Some(page),
        Err(invalid) => {
            for violation in invalid.0 {
                v.add(violation.field, violation.description);
            }
            None
        }
    };
    let Some(page) = page.filter(|_| v.is_empty()) else {
        return Err(v.into_error().into());
    };
    let page = gifts
        .list_customer_gifts(&caller, &r.external_id, page)
        .await?;
    let now = gifts.now();
    Ok(Response::new(pb::ListCustomerGiftsResponse {
        grants: page.items.iter().map(|g| grant_message(g, now)).collect(),
        next_page_token: page.next_page_token.unwrap_or_default(),
    }))
}

// ---------------------------------------------------------------------------------------------
// CheckoutService

pub(crate) async fn redeem_gift(
    gifts: &Gifts,
    request: Request<pb::RedeemGiftRequest>,
) -> Result<Response<pb::RedeemGiftResponse>, Status> {
    let caller = caller(&request)?;
    let r = request.into_inner();
    let mut v = Violations::default();
    let code = v.check(GiftCode::parse("code", &r.code));
    v.check(validation::identifier("redemption_key", &r.redemption_key));
    if !r.store_id.is_empty() {
        v.check(validation::identifier("store_id", &r.store_id));
    }
    let Some(code) = code.filter(|_| v.is_empty()) else {
        return Err(v.into_error().into());
    };
    let store_id = Some(r.store_id.as_str()).filter(|s| !s.is_empty());
    let grant = gifts
        .redeem_gift(&caller, &code, &r.redemption_key, store_id)
        .await?;
    Ok(Response::new(pb::RedeemGiftResponse {
        grant: Some(grant_message(&grant, gifts.now())),
    }))
}

// ---------------------------------------------------------------------------------------------
// Conversions

fn gift_input(gift: Option<pb::Gift>) -> Result<GiftInput, Status> {
    let gift = gift.ok_or_else(|| Status::from(crate::Error::invalid("gift", "is required")))?;
    let kind = match pb::GiftKind::try_from(gift.kind) {
        Ok(pb::GiftKind::Unspecified) => None,
        Ok(pb::GiftKind::Item) => Some(GiftKind::Item),
        Ok(pb::GiftKind::Service) => Some(GiftKind::Service),
        Ok(pb::GiftKind::Discount) => Some(GiftKind::Discount),
        Err(_) => {
            return Err(crate::Error::invalid("gift.kind", "is not a known GiftKind").into());
        }
    };
    Ok(GiftInput {
        gift_id: gift.gift_id,
        name: gift.name,
        description: gift.description,
        kind,
        points_price: gift.points_price,
        stock: gift.stock,
        validity_days: gift.validity_days,
        active: gift.active,
    })
}

fn kind_message(kind: GiftKind) -> pb::GiftKind {
    match kind {
        GiftKind::Item => pb::GiftKind::Item,
        GiftKind::Service => pb::GiftKind::Service,
        GiftKind::Discount => pb::GiftKind::Discount,
    }
}

fn gift_message(gift: Gift) -> pb::Gift {
    let spec = gift.spec;
    pb::Gift {
        gift_id: spec.gift_id,
        name: spec.name,
        description: spec.description,
        kind: kind_message(spec.kind) as i32,
        points_price: spec.points_price,
        stock: spec.stock,
        validity_days: spec.validity_days,
        active: spec.active,
        version: gift.version,
        created_at: Some(timestamp(gift.created_at)),
        updated_at: Some(timestamp(gift.updated_at)),
    }
}

fn rule_input(rule: Option<pb::GiftRule>) -> Result<GiftRuleInput, Status> {
    let rule = rule.ok_or_else(|| Status::from(crate::Error::invalid("rule", "is required")))?;
    let trigger = match pb::GiftTrigger::try_from(rule.trigger) {
        Ok(pb::GiftTrigger::Unspecified) => TriggerInput::Unspecified,
        Ok(pb::GiftTrigger::FirstPurchase) => TriggerInput::FirstPurchase,
        Ok(pb::GiftTrigger::EveryNthPurchase) => TriggerInput::EveryNthPurchase,
        Ok(pb::GiftTrigger::TierUp) => TriggerInput::TierUp,
        Err(_) => {
            return Err(crate::Error::invalid("rule.trigger", "is not a known GiftTrigger").into());
        }
    };
    Ok(GiftRuleInput {
        rule_id: rule.rule_id,
        trigger,
        every_n: rule.every_n,
        tier_id: rule.tier_id,
        gift_id: rule.gift_id,
        delay_hours: rule.delay_hours,
        active: rule.active,
    })
}

fn rule_message(rule: GiftRule) -> pb::GiftRule {
    let spec = rule.spec;
    let trigger = match spec.trigger {
        Trigger::FirstPurchase => pb::GiftTrigger::FirstPurchase,
        Trigger::EveryNthPurchase(_) => pb::GiftTrigger::EveryNthPurchase,
        Trigger::TierUp(_) => pb::GiftTrigger::TierUp,
    };
    pb::GiftRule {
        rule_id: spec.rule_id,
        trigger: trigger as i32,
        every_n: spec.trigger.every_n().unwrap_or(0),
        tier_id: spec.trigger.tier_id().unwrap_or_default().to_string(),
        gift_id: spec.gift_id,
        delay_hours: spec.delay_hours,
        active: spec.active,
        version: rule.version,
        updated_at: Some(timestamp(rule.updated_at)),
    }
}

/// A grant as the API shows it at `now` (an issued grant past its window is EXPIRED), for
/// every response that carries grants (RecordPurchase's `gifts_issued`, ClaimGift, ...).
pub fn grant_message(grant: &Grant, now: DateTime<Utc>) -> pb::GiftGrant {
    let status = match grant.status_at(now) {
        GrantStatus::Issued => pb::GiftGrantStatus::Issued,
        GrantStatus::Redeemed => pb::GiftGrantStatus::Redeemed,
        GrantStatus::Expired => pb::GiftGrantStatus::Expired,
        GrantStatus::Revoked => pb::GiftGrantStatus::Revoked,
    };
    let source = match grant.source {
        GrantSource::Points => pb::GiftSource::Points,
        GrantSource::Rule => pb::GiftSource::Rule,
        GrantSource::Manual => pb::GiftSource::Manual,
        GrantSource::Birthday => pb::GiftSource::Birthday,
    };
    pb::GiftGrant {
        code: grant.code.display(),
        gift_id: grant.gift_id.clone(),
        gift_name: grant.gift_name.clone(),
        gift_kind: kind_message(grant.gift_kind) as i32,
        external_id: grant.external_id.clone(),
        status: status as i32,
        source: source as i32,
        purchase_id: grant.purchase_id.clone().unwrap_or_default(),
        valid_from: Some(timestamp(grant.valid_from)),
        valid_until: Some(timestamp(grant.valid_until)),
        redeemed_at: grant.redeemed_at.map(timestamp),
        redeemed_store_id: grant.redeemed_store_id.clone().unwrap_or_default(),
        created_at: Some(timestamp(grant.created_at)),
    }
}
