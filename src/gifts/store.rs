//! The SQL of gifts: the catalog, the rules, grants and redemptions.
//!
//! Functions take `&mut PgConnection` and never begin or commit (a savepoint aside, see
//! [`grant`]), so other features call them inside their own transactions:
//!
//! - [`grant`]: a gift for a customer (stock and grant in one statement), idempotent on its
//!   source key; [`try_grant`] tells a new grant from a replay and [`find_grant`] finds the
//!   grant of a key (ClaimGift: debit the points only for a new grant).
//! - [`grants_for_purchase_rules`]: the grants of the gift rules a purchase fires, for
//!   RecordPurchase (ask [`has_purchase_rules`] first, or fold [`PURCHASE_RULES_EXIST`] into
//!   a statement checkout runs anyway, to skip it cheaply).
//! - [`grants_of_purchase`]: what a purchase triggered, for the answer to its replay.
//! - [`revoke_for_purchase`]: ReturnPurchase takes back what the purchase triggered.

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection};

use crate::error::Error;
use crate::gifts::rules::{
    CatalogPage, Gift, GiftCode, GiftKind, GiftRule, GiftRuleSpec, GiftSpec, Grant, GrantSource,
    GrantStatus, GrantsPage, Trigger, fired_rules, rule_reference, tier_up_reference,
};
use crate::platform::caller::MerchantId;
use crate::platform::store::{db_error, violated_unique_constraint};

const GRANT: &str = include_str!("sql/grant.sql");
const REDEEM: &str = include_str!("sql/redeem.sql");
const REVOKE_FOR_PURCHASE: &str = include_str!("sql/revoke_for_purchase.sql");

/// A statement that reads grants (`g`) with their gift (`f`) and customer (`c`): the
/// columns of [`GrantRow`], then the rest of the statement.
macro_rules! select_grants {
    ($rest:literal) => {
        concat!(
            "SELECT g.customer_id, g.code, g.gift_id, f.name AS gift_name, f.kind AS gift_kind,
                    c.external_id, g.status, g.source, g.purchase_id, g.valid_from,
                    g.valid_until, g.redeemed_at, g.redemption_hash, g.redeemed_store_id,
                    g.created_at
               FROM gift_grants g
               JOIN gifts f ON f.merchant_id = g.merchant_id AND f.gift_id = g.gift_id
               JOIN customers c ON c.merchant_id = g.merchant_id AND c.id = g.customer_id ",
            $rest
        )
    };
}

/// The columns of [`GiftRow`], between two parts of a statement.
macro_rules! gift_columns {
    ($before:literal, $after:literal) => {
        concat!(
            $before,
            " gift_id, name, description, kind, points_price, stock, validity_days, active,
              version, created_at, updated_at ",
            $after
        )
    };
}

/// The columns of [`RuleRow`], between two parts of a statement.
macro_rules! rule_columns {
    ($before:literal, $after:literal) => {
        concat!(
            $before,
            " rule_id, trigger, every_n, tier_id, gift_id, delay_hours, active, version, updated_at ",
            $after
        )
    };
}

/// How often a new code is drawn when the one drawn is taken (2⁻⁸⁰ per grant: never, in
/// practice; the loop is the proof that it cannot break a grant).
const CODE_ATTEMPTS: usize = 3;

#[derive(sqlx::FromRow)]
pub(crate) struct GrantRow {
    customer_id: i64,
    code: String,
    gift_id: String,
    gift_name: String,
    gift_kind: String,
    external_id: String,
    status: String,
    source: String,
    purchase_id: Option<String>,
    valid_from: DateTime<Utc>,
    valid_until: DateTime<Utc>,
    redeemed_at: Option<DateTime<Utc>>,
    redemption_hash: Option<Vec<u8>>,
    redeemed_store_id: Option<String>,
    created_at: DateTime<Utc>,
}

impl GrantRow {
    fn into_grant(self) -> Result<Grant, Error> {
        let stored = |what: &str, value: &str| {
            Error::internal(format!("stored gift grant {what} {value:?} is invalid"))
        };
        Ok(Grant {
            gift_kind: GiftKind::parse(&self.gift_kind)
                .ok_or_else(|| stored("kind", &self.gift_kind))?,
            status: GrantStatus::parse(&self.status)
                .ok_or_else(|| stored("status", &self.status))?,
            source: GrantSource::parse(&self.source)
                .ok_or_else(|| stored("source", &self.source))?,
            code: GiftCode::from_stored(self.code),
            gift_id: self.gift_id,
            gift_name: self.gift_name,
            external_id: self.external_id,
            purchase_id: self.purchase_id,
            valid_from: self.valid_from,
            valid_until: self.valid_until,
            redeemed_at: self.redeemed_at,
            redeemed_store_id: self.redeemed_store_id,
            created_at: self.created_at,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Grants, for every feature

/// What a grant attempt came to ([`try_grant`]).
#[derive(Debug)]
pub enum Granted {
    /// A new grant.
    Created(Grant),
    /// The source key had made this very grant before (a replay).
    Replayed(Grant),
    /// The gift does not exist for this merchant.
    NoSuchGift,
    Inactive,
    SoldOut,
}

/// Grants `gift_id` to the customer (`customers.id` of this merchant) as `source` with its
/// client key `source_reference`: takes one from a limited stock (conditional update: no
/// overselling under any concurrency) and inserts the grant, valid from `now` for the gift's
/// validity. Idempotent on (source, source_reference): a replay returns the grant made the
/// first time; the same key for another customer or gift is ALREADY_EXISTS. A missing gift
/// is NOT_FOUND; an inactive or sold-out one FAILED_PRECONDITION (nothing written).
///
/// Runs inside the caller's transaction (under a savepoint of its own, so a concurrent
/// replay of the same key is answered instead of aborting the caller's transaction), or
/// alone on a plain connection.
#[allow(clippy::too_many_arguments)]
pub async fn grant(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    gift_id: &str,
    source: GrantSource,
    source_reference: &str,
    purchase_id: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Grant, Error> {
    let request = GrantRequest {
        customer_id,
        gift_id,
        source,
        source_reference,
        purchase_id,
        now,
        delay_hours: 0,
    };
    match try_grant(conn, merchant, &request).await? {
        Granted::Created(grant) | Granted::Replayed(grant) => Ok(grant),
        Granted::NoSuchGift => Err(Error::NotFound("gift")),
        Granted::Inactive => Err(Error::FailedPrecondition(
            "the gift is not active".to_string(),
        )),
        Granted::SoldOut => Err(Error::FailedPrecondition(
            "the gift is out of stock".to_string(),
        )),
    }
}

/// One grant to make ([`try_grant`]).
#[derive(Debug, Clone, Copy)]
pub struct GrantRequest<'a> {
    /// `customers.id` of the merchant's customer.
    pub customer_id: i64,
    pub gift_id: &'a str,
    pub source: GrantSource,
    pub source_reference: &'a str,
    pub purchase_id: Option<&'a str>,
    pub now: DateTime<Utc>,
    /// Hours between `now` and the start of the grant's window.
    pub delay_hours: u32,
}

/// [`grant`], telling a new grant from a replay (ClaimGift debits points only for a new one,
/// or asks [`find_grant`] first) and naming why nothing was granted instead of failing.
pub async fn try_grant(
    conn: &mut PgConnection,
    merchant: MerchantId,
    request: &GrantRequest<'_>,
) -> Result<Granted, Error> {
    for _ in 0..CODE_ATTEMPTS {
        let code = GiftCode::generate();
        let mut savepoint = conn.begin().await.map_err(db_error)?;
        let inserted = sqlx::query_as::<_, GrantRow>(GRANT)
            .bind(merchant.0)
            .bind(request.customer_id)
            .bind(request.gift_id)
            .bind(code.as_str())
            .bind(request.source.as_str())
            .bind(request.source_reference)
            .bind(request.purchase_id)
            .bind(request.now)
            .bind(request.delay_hours as i32)
            .fetch_optional(&mut *savepoint)
            .await;
        match inserted {
            Ok(Some(row)) => {
                savepoint.commit().await.map_err(db_error)?;
                return Ok(Granted::Created(row.into_grant()?));
            }
            Ok(None) => {
                savepoint.commit().await.map_err(db_error)?;
                return why_not_granted(conn, merchant, request).await;
            }
            Err(error) => {
                let constraint = violated_unique_constraint(&error);
                savepoint.rollback().await.map_err(db_error)?;
                match constraint.as_deref() {
                    Some("gift_grants_source_key") => {
                        return why_not_granted(conn, merchant, request).await;
                    }
                    Some("gift_grants_code_key") => continue,
                    _ => return Err(db_error(error)),
                }
            }
        }
    }
    Err(Error::internal("no free gift code after several attempts"))
}

/// Whether the merchant's catalog has `gift_id` (active or not): a program naming a gift is
/// checked with it.
pub async fn gift_exists(
    conn: &mut PgConnection,
    merchant: MerchantId,
    gift_id: &str,
) -> Result<bool, Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM gifts WHERE merchant_id = $1 AND gift_id = $2)",
    )
    .bind(merchant.0)
    .bind(gift_id)
    .fetch_one(conn)
    .await
    .map_err(db_error)
}

/// The grant that `source_reference` made as `source`, if any: how a use case tells a replay
/// before it does anything else (ClaimGift: before it debits the points).
pub async fn find_grant(
    conn: &mut PgConnection,
    merchant: MerchantId,
    source: GrantSource,
    source_reference: &str,
) -> Result<Option<Grant>, Error> {
    let row = grant_by_source(conn, merchant, source, source_reference).await?;
    row.map(GrantRow::into_grant).transpose()
}

async fn grant_by_source(
    conn: &mut PgConnection,
    merchant: MerchantId,
    source: GrantSource,
    source_reference: &str,
) -> Result<Option<GrantRow>, Error> {
    sqlx::query_as(select_grants!(
        "WHERE g.merchant_id = $1 AND g.source = $2 AND g.source_reference = $3"
    ))
    .bind(merchant.0)
    .bind(source.as_str())
    .bind(source_reference)
    .fetch_optional(conn)
    .await
    .map_err(db_error)
}

/// Nothing was inserted: a replay of the source key (or the key taken for something else),
/// or the gift is missing, inactive or sold out.
async fn why_not_granted(
    conn: &mut PgConnection,
    merchant: MerchantId,
    request: &GrantRequest<'_>,
) -> Result<Granted, Error> {
    let earlier = grant_by_source(conn, merchant, request.source, request.source_reference).await?;
    if let Some(earlier) = earlier {
        if earlier.customer_id == request.customer_id && earlier.gift_id == request.gift_id {
            return Ok(Granted::Replayed(earlier.into_grant()?));
        }
        return Err(Error::AlreadyExists(format!(
            "the {} key was used for another grant",
            request.source.as_str()
        )));
    }
    let gift: Option<(bool, Option<i64>)> =
        sqlx::query_as("SELECT active, stock FROM gifts WHERE merchant_id = $1 AND gift_id = $2")
            .bind(merchant.0)
            .bind(request.gift_id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db_error)?;
    Ok(match gift {
        None => Granted::NoSuchGift,
        Some((false, _)) => Granted::Inactive,
        Some((true, _)) => Granted::SoldOut,
    })
}

/// Evaluates the merchant's active purchase rules for a purchase that brought the customer
/// to `purchase_count_after` purchases, and grants the gift of each rule that fires (source
/// 'rule', reference `<rule_id>:<purchase_id>`, the purchase recorded on the grant so that a
/// return revokes it). A gift that is inactive or sold out is skipped, not an error. Each
/// rule grants at most once per purchase, so calling it twice for one purchase grants nothing
/// twice; but rules may have changed in between, so the answer to a replayed purchase comes
/// from [`grants_of_purchase`], not from calling this again. Grants come in the order of
/// [`grants_of_purchase`] (by start, then code), so the two answers match.
///
/// Call it inside RecordPurchase's transaction, after the purchase is written, and only for a
/// purchase recorded now.
pub async fn grants_for_purchase_rules(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    purchase_id: &str,
    purchase_count_after: i64,
    tier_reached: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Vec<Grant>, Error> {
    let rules = purchase_rules(conn, merchant).await?;
    let mut grants = Vec::new();
    let by_count = fired_rules(&rules, purchase_count_after)
        .into_iter()
        .map(|rule| (rule, rule_reference(&rule.rule_id, purchase_id), false));
    // A tier-up rule fires once per customer and tier: its reference names both.
    let by_tier = rules
        .iter()
        .filter(|rule| {
            rule.active && tier_reached.is_some_and(|tier| rule.trigger.fires_on_tier_up(tier))
        })
        .map(|rule| {
            let tier = tier_reached.unwrap_or_default();
            (
                rule,
                tier_up_reference(&rule.rule_id, customer_id, tier),
                true,
            )
        });
    let fired: Vec<(&GiftRuleSpec, String, bool)> = by_count.chain(by_tier).collect();
    for (rule, reference, once_per_customer) in fired {
        let request = GrantRequest {
            customer_id,
            gift_id: &rule.gift_id,
            source: GrantSource::Rule,
            source_reference: &reference,
            purchase_id: Some(purchase_id),
            now,
            delay_hours: rule.delay_hours,
        };
        match try_grant(conn, merchant, &request).await? {
            Granted::Created(grant) => grants.push(grant),
            // A tier reached again after a downgrade: its gift was an earlier purchase's.
            Granted::Replayed(_) if once_per_customer => {}
            Granted::Replayed(grant) => grants.push(grant),
            Granted::NoSuchGift | Granted::Inactive | Granted::SoldOut => {}
        }
    }
    sort_grants(&mut grants);
    Ok(grants)
}

/// One order for the grants of a purchase, whatever the database's collation.
fn sort_grants(grants: &mut [Grant]) {
    grants.sort_by(|a, b| (a.valid_from, a.code.as_str()).cmp(&(b.valid_from, b.code.as_str())));
}

/// The SQL boolean "merchant `$1` has an active purchase rule" (an index-only probe of
/// `gift_rules_purchase_idx`).
macro_rules! purchase_rules_exist {
    () => {
        "EXISTS (SELECT 1 FROM gift_rules
                  WHERE merchant_id = $1 AND active
                    AND trigger IN ('first_purchase', 'every_nth_purchase', 'tier_up'))"
    };
}

/// [`has_purchase_rules`] as a SQL expression of the merchant id `$1`, for a statement that
/// checkout runs anyway (e.g. `SELECT ..., <this> AS has_gift_rules` in its context read), so
/// the question costs no round trip of its own.
pub const PURCHASE_RULES_EXIST: &str = purchase_rules_exist!();

/// Whether the merchant has any active purchase rule (an index-only probe), so checkout can
/// skip [`grants_for_purchase_rules`] (and its transaction) when not.
pub async fn has_purchase_rules(
    conn: &mut PgConnection,
    merchant: MerchantId,
) -> Result<bool, Error> {
    sqlx::query_scalar(concat!("SELECT ", purchase_rules_exist!()))
        .bind(merchant.0)
        .fetch_one(conn)
        .await
        .map_err(db_error)
}

/// The active purchase rules of the merchant.
async fn purchase_rules(
    conn: &mut PgConnection,
    merchant: MerchantId,
) -> Result<Vec<GiftRuleSpec>, Error> {
    let rows: Vec<RuleRow> = sqlx::query_as(rule_columns!(
        "SELECT",
        "FROM gift_rules
          WHERE merchant_id = $1 AND active
            AND trigger IN ('first_purchase', 'every_nth_purchase', 'tier_up')
          ORDER BY rule_id"
    ))
    .bind(merchant.0)
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    rows.into_iter()
        .map(|row| row.into_rule().map(|rule| rule.spec))
        .collect()
}

/// The grants a purchase triggered (in their status now: a grant revoked or redeemed since
/// shows so), in the order [`grants_for_purchase_rules`] returned them: what a replay of the
/// purchase answers.
pub async fn grants_of_purchase(
    conn: &mut PgConnection,
    merchant: MerchantId,
    purchase_id: &str,
) -> Result<Vec<Grant>, Error> {
    let rows: Vec<GrantRow> = sqlx::query_as(select_grants!(
        "WHERE g.merchant_id = $1 AND g.purchase_id = $2
          ORDER BY g.created_at, g.code"
    ))
    .bind(merchant.0)
    .bind(purchase_id)
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    let mut grants = rows
        .into_iter()
        .map(GrantRow::into_grant)
        .collect::<Result<Vec<_>, _>>()?;
    sort_grants(&mut grants);
    Ok(grants)
}

/// Revokes the still-issued grants that `purchase_id` triggered (those redeemed stay
/// redeemed) and puts their gifts back into limited stock. Returns how many it revoked; 0 on
/// a replay. Call it inside ReturnPurchase's transaction.
pub async fn revoke_for_purchase(
    conn: &mut PgConnection,
    merchant: MerchantId,
    purchase_id: &str,
    now: DateTime<Utc>,
) -> Result<u64, Error> {
    let revoked: i64 = sqlx::query_scalar(REVOKE_FOR_PURCHASE)
        .bind(merchant.0)
        .bind(purchase_id)
        .bind(now)
        .fetch_one(conn)
        .await
        .map_err(db_error)?;
    Ok(revoked as u64)
}

// ---------------------------------------------------------------------------------------------
// Redemption

pub(crate) enum Redeemed {
    /// Redeemed now.
    Now(Grant),
    /// The redemption key was used before: that grant and the fingerprint it was used with.
    KeyUsed(Grant, Vec<u8>),
    /// Not redeemed now; the grant as it stands (None: no such code at this merchant).
    Not(Option<Grant>),
}

/// Redeems `code` at most once (see sql/redeem.sql), or says why not.
pub(crate) async fn redeem(
    conn: &mut PgConnection,
    merchant: MerchantId,
    code: &GiftCode,
    redemption_key: &str,
    fingerprint: &[u8],
    store_id: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Redeemed, Error> {
    let redeemed = sqlx::query_as::<_, GrantRow>(REDEEM)
        .bind(merchant.0)
        .bind(code.as_str())
        .bind(now)
        .bind(redemption_key)
        .bind(fingerprint)
        .bind(store_id)
        .fetch_optional(&mut *conn)
        .await;
    match redeemed {
        Ok(Some(row)) => return Ok(Redeemed::Now(row.into_grant()?)),
        Ok(None) => {}
        Err(error) => {
            if violated_unique_constraint(&error).as_deref() != Some("gift_grants_redemption_key") {
                return Err(db_error(error));
            }
        }
    }
    let by_key: Option<GrantRow> = sqlx::query_as(select_grants!(
        "WHERE g.merchant_id = $1 AND g.redemption_key = $2"
    ))
    .bind(merchant.0)
    .bind(redemption_key)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_error)?;
    if let Some(mut row) = by_key {
        let hash = row.redemption_hash.take().unwrap_or_default();
        return Ok(Redeemed::KeyUsed(row.into_grant()?, hash));
    }
    let by_code = grant_by_code(conn, merchant, code).await?;
    Ok(Redeemed::Not(by_code))
}

async fn grant_by_code(
    conn: &mut PgConnection,
    merchant: MerchantId,
    code: &GiftCode,
) -> Result<Option<Grant>, Error> {
    let row: Option<GrantRow> =
        sqlx::query_as(select_grants!("WHERE g.merchant_id = $1 AND g.code = $2"))
            .bind(merchant.0)
            .bind(code.as_str())
            .fetch_optional(conn)
            .await
            .map_err(db_error)?;
    row.map(GrantRow::into_grant).transpose()
}

// ---------------------------------------------------------------------------------------------
// Customers' grants

/// The id of a customer of this merchant.
pub(crate) async fn customer_id(
    conn: &mut PgConnection,
    merchant: MerchantId,
    external_id: &str,
) -> Result<Option<i64>, Error> {
    sqlx::query_scalar("SELECT id FROM customers WHERE merchant_id = $1 AND external_id = $2")
        .bind(merchant.0)
        .bind(external_id)
        .fetch_optional(conn)
        .await
        .map_err(db_error)
}

/// Up to `limit` grants of a customer, newest first, before the page's cursor.
pub(crate) async fn grants_of_customer(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customer_id: i64,
    page: &GrantsPage,
    limit: usize,
) -> Result<Vec<Grant>, Error> {
    let (before_at, before_code) = match &page.before {
        Some((at, code)) => (Some(*at), Some(code.as_str())),
        None => (None, None),
    };
    let rows: Vec<GrantRow> = sqlx::query_as(select_grants!(
        "WHERE g.merchant_id = $1 AND g.customer_id = $2
            AND ($3::timestamptz IS NULL OR (g.created_at, g.code) < ($3, $4::text))
          ORDER BY g.created_at DESC, g.code DESC
          LIMIT $5"
    ))
    .bind(merchant.0)
    .bind(customer_id)
    .bind(before_at)
    .bind(before_code)
    .bind(limit as i64)
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    rows.into_iter().map(GrantRow::into_grant).collect()
}

// ---------------------------------------------------------------------------------------------
// The catalog

#[derive(sqlx::FromRow)]
struct GiftRow {
    gift_id: String,
    name: String,
    description: String,
    kind: String,
    points_price: Option<i64>,
    stock: Option<i64>,
    validity_days: i32,
    active: bool,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl GiftRow {
    fn into_gift(self) -> Result<Gift, Error> {
        let kind = GiftKind::parse(&self.kind).ok_or_else(|| {
            Error::internal(format!("stored gift kind {:?} is invalid", self.kind))
        })?;
        Ok(Gift {
            spec: GiftSpec {
                gift_id: self.gift_id,
                name: self.name,
                description: self.description,
                kind,
                points_price: self.points_price,
                stock: self.stock,
                validity_days: self.validity_days as u32,
                active: self.active,
            },
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// Inserts a new gift; `None` when the gift_id is taken.
pub(crate) async fn insert_gift(
    conn: &mut PgConnection,
    merchant: MerchantId,
    spec: &GiftSpec,
    now: DateTime<Utc>,
) -> Result<Option<Gift>, Error> {
    let row: Option<GiftRow> = sqlx::query_as(gift_columns!(
        "INSERT INTO gifts (merchant_id, gift_id, name, description, kind, points_price, stock,
                            validity_days, active, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10)
         ON CONFLICT ON CONSTRAINT gifts_pkey DO NOTHING
         RETURNING",
        ""
    ))
    .bind(merchant.0)
    .bind(&spec.gift_id)
    .bind(&spec.name)
    .bind(&spec.description)
    .bind(spec.kind.as_str())
    .bind(spec.points_price)
    .bind(spec.stock)
    .bind(spec.validity_days as i32)
    .bind(spec.active)
    .bind(now)
    .fetch_optional(conn)
    .await
    .map_err(db_error)?;
    row.map(GiftRow::into_gift).transpose()
}

pub(crate) async fn load_gift(
    conn: &mut PgConnection,
    merchant: MerchantId,
    gift_id: &str,
) -> Result<Option<Gift>, Error> {
    let row: Option<GiftRow> = sqlx::query_as(gift_columns!(
        "SELECT",
        "FROM gifts WHERE merchant_id = $1 AND gift_id = $2"
    ))
    .bind(merchant.0)
    .bind(gift_id)
    .fetch_optional(conn)
    .await
    .map_err(db_error)?;
    row.map(GiftRow::into_gift).transpose()
}

/// Replaces a gift when its version is `expected_version` (0: any); `None` when it is not
/// (or the gift does not exist).
pub(crate) async fn update_gift(
    conn: &mut PgConnection,
    merchant: MerchantId,
    spec: &GiftSpec,
    expected_version: i64,
    now: DateTime<Utc>,
) -> Result<Option<Gift>, Error> {
    let row: Option<GiftRow> = sqlx::query_as(gift_columns!(
        "UPDATE gifts
            SET name = $3, description = $4, kind = $5, points_price = $6, stock = $7,
                validity_days = $8, active = $9, version = version + 1, updated_at = $10
          WHERE merchant_id = $1 AND gift_id = $2 AND ($11 = 0 OR version = $11)
      RETURNING",
        ""
    ))
    .bind(merchant.0)
    .bind(&spec.gift_id)
    .bind(&spec.name)
    .bind(&spec.description)
    .bind(spec.kind.as_str())
    .bind(spec.points_price)
    .bind(spec.stock)
    .bind(spec.validity_days as i32)
    .bind(spec.active)
    .bind(now)
    .bind(expected_version)
    .fetch_optional(conn)
    .await
    .map_err(db_error)?;
    row.map(GiftRow::into_gift).transpose()
}

/// Up to `limit` gifts by gift_id after the page's cursor; only active ones when asked.
pub(crate) async fn list_gifts(
    conn: &mut PgConnection,
    merchant: MerchantId,
    active_only: bool,
    page: &CatalogPage,
    limit: usize,
) -> Result<Vec<Gift>, Error> {
    let rows: Vec<GiftRow> = sqlx::query_as(gift_columns!(
        "SELECT",
        "FROM gifts
          WHERE merchant_id = $1 AND (NOT $2 OR active) AND ($3::text IS NULL OR gift_id > $3)
          ORDER BY gift_id
          LIMIT $4"
    ))
    .bind(merchant.0)
    .bind(active_only)
    .bind(page.after_gift_id.as_deref())
    .bind(limit as i64)
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    rows.into_iter().map(GiftRow::into_gift).collect()
}

// ---------------------------------------------------------------------------------------------
// Rules

#[derive(sqlx::FromRow)]
struct RuleRow {
    rule_id: String,
    trigger: String,
    every_n: Option<i32>,
    tier_id: Option<String>,
    gift_id: String,
    delay_hours: i32,
    active: bool,
    version: i64,
    updated_at: DateTime<Utc>,
}

impl RuleRow {
    fn into_rule(self) -> Result<GiftRule, Error> {
        let trigger = Trigger::from_stored(&self.trigger, self.every_n, self.tier_id.as_deref())
            .ok_or_else(|| {
                Error::internal(format!(
                    "stored gift rule trigger {:?} is invalid",
                    self.trigger
                ))
            })?;
        Ok(GiftRule {
            spec: GiftRuleSpec {
                rule_id: self.rule_id,
                trigger,
                gift_id: self.gift_id,
                delay_hours: self.delay_hours as u32,
                active: self.active,
            },
            version: self.version,
            updated_at: self.updated_at,
        })
    }
}

/// The rules of a merchant by rule_id (at most 1000).
pub(crate) async fn list_rules(
    conn: &mut PgConnection,
    merchant: MerchantId,
) -> Result<Vec<GiftRule>, Error> {
    let rows: Vec<RuleRow> = sqlx::query_as(rule_columns!(
        "SELECT",
        "FROM gift_rules WHERE merchant_id = $1 ORDER BY rule_id LIMIT 1000"
    ))
    .bind(merchant.0)
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    rows.into_iter().map(RuleRow::into_rule).collect()
}

/// The version of a rule, locked until the end of the transaction, and how many rules the
/// merchant has.
pub(crate) async fn lock_rule(
    conn: &mut PgConnection,
    merchant: MerchantId,
    rule_id: &str,
) -> Result<(Option<i64>, i64), Error> {
    let version: Option<i64> = sqlx::query_scalar(
        "SELECT version FROM gift_rules WHERE merchant_id = $1 AND rule_id = $2 FOR UPDATE",
    )
    .bind(merchant.0)
    .bind(rule_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_error)?;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM gift_rules WHERE merchant_id = $1")
        .bind(merchant.0)
        .fetch_one(conn)
        .await
        .map_err(db_error)?;
    Ok((version, count))
}

/// Creates the rule or replaces it (its version grows).
pub(crate) async fn put_rule(
    conn: &mut PgConnection,
    merchant: MerchantId,
    spec: &GiftRuleSpec,
    now: DateTime<Utc>,
) -> Result<GiftRule, Error> {
    let row: RuleRow = sqlx::query_as(rule_columns!(
        "INSERT INTO gift_rules (merchant_id, rule_id, trigger, every_n, gift_id, delay_hours,
                                 active, created_at, updated_at, tier_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9)
         ON CONFLICT ON CONSTRAINT gift_rules_pkey DO UPDATE
            SET trigger = EXCLUDED.trigger, every_n = EXCLUDED.every_n,
                tier_id = EXCLUDED.tier_id,
                gift_id = EXCLUDED.gift_id, delay_hours = EXCLUDED.delay_hours,
                active = EXCLUDED.active, version = gift_rules.version + 1,
                updated_at = EXCLUDED.updated_at
         RETURNING",
        ""
    ))
    .bind(merchant.0)
    .bind(&spec.rule_id)
    .bind(spec.trigger.as_str())
    .bind(spec.trigger.every_n().map(|n| n as i32))
    .bind(&spec.gift_id)
    .bind(spec.delay_hours as i32)
    .bind(spec.active)
    .bind(now)
    .bind(spec.trigger.tier_id())
    .fetch_one(conn)
    .await
    .map_err(db_error)?;
    row.into_rule()
}
