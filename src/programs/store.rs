//! Programs: read on checkout (version first, the full rules only when they changed) and
//! replaced by admins.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use sqlx::types::Json;

use crate::error::Error;
use crate::greetings::rules::OccasionProgram;
use crate::platform::caller::MerchantId;
use crate::platform::money::Currency;
use crate::platform::store::db_error;
use crate::programs::lifecycle::Lifecycle;
use crate::programs::rules::{
    EarnRate, OldReceipts, Program, ProgramRules, Promotion, PromotionIndex, ReceiptAge,
};
use crate::status::rules::StatusThresholds;
use crate::tiers::rules::TierProgram;

#[derive(sqlx::FromRow)]
struct ProgramRow {
    currency: String,
    earn_points: i32,
    earn_currency_units: i32,
    minimum_purchase_minor: i64,
    category_multipliers: Json<BTreeMap<String, u32>>,
    promotions: Json<Vec<Promotion>>,
    max_receipt_age_days: i32,
    old_receipts: String,
    lifecycle: Json<Lifecycle>,
    occasions: Json<OccasionProgram>,
    status: Json<StatusThresholds>,
    tiers: Json<TierProgram>,
    version: i64,
    updated_at: DateTime<Utc>,
}

impl ProgramRow {
    fn into_program(self) -> Result<Program, Error> {
        let currency = Currency::parse("currency", &self.currency).map_err(|_| {
            Error::internal(format!("stored currency {:?} is invalid", self.currency))
        })?;
        let promotion_index = PromotionIndex::new(&self.promotions.0);
        let older = OldReceipts::parse(&self.old_receipts).ok_or_else(|| {
            Error::internal(format!(
                "stored old_receipts {:?} is invalid",
                self.old_receipts
            ))
        })?;
        Ok(Program {
            promotion_index,
            rules: ProgramRules {
                currency,
                earn_rate: EarnRate {
                    points: self.earn_points as u32,
                    currency_units: self.earn_currency_units as u32,
                },
                minimum_purchase_minor: self.minimum_purchase_minor,
                category_multipliers: self.category_multipliers.0,
                promotions: self.promotions.0,
                receipt_age: ReceiptAge {
                    max_days: self.max_receipt_age_days as u32,
                    older,
                },
                lifecycle: self.lifecycle.0,
                occasions: self.occasions.0,
                status: self.status.0,
                tiers: self.tiers.0,
            },
            version: self.version,
            updated_at: self.updated_at,
        })
    }
}

const SELECT_PROGRAM: &str =
    "SELECT currency, earn_points, earn_currency_units, minimum_purchase_minor,
        category_multipliers, promotions, max_receipt_age_days, old_receipts, lifecycle,
        occasions, status, tiers, version, updated_at
   FROM programs
  WHERE merchant_id = $1";

pub async fn load(conn: &mut PgConnection, merchant: MerchantId) -> Result<Option<Program>, Error> {
    let row: Option<ProgramRow> = sqlx::query_as(SELECT_PROGRAM)
        .bind(merchant.0)
        .fetch_optional(conn)
        .await
        .map_err(db_error)?;
    row.map(ProgramRow::into_program).transpose()
}

/// The program's version, to check the cached rules against (`points::sql::PROGRAM_VERSION`
/// names it for the benchmark's ceiling). `$1` merchant_id.
pub const VERSION: &str = "SELECT version FROM programs WHERE merchant_id = $1";

pub async fn version(conn: &mut PgConnection, merchant: MerchantId) -> Result<Option<i64>, Error> {
    sqlx::query_scalar(VERSION)
        .bind(merchant.0)
        .fetch_optional(conn)
        .await
        .map_err(db_error)
}

/// Inserts the first program of a new merchant.
pub async fn insert(
    conn: &mut PgConnection,
    merchant: MerchantId,
    rules: &ProgramRules,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO programs (merchant_id, currency, earn_points, earn_currency_units,
                               minimum_purchase_minor, category_multipliers, promotions,
                               max_receipt_age_days, old_receipts, lifecycle, occasions, status,
                               tiers, look_back_days)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(merchant.0)
    .bind(rules.currency.code())
    .bind(rules.earn_rate.points as i32)
    .bind(rules.earn_rate.currency_units as i32)
    .bind(rules.minimum_purchase_minor)
    .bind(Json(&rules.category_multipliers))
    .bind(Json(&rules.promotions))
    .bind(rules.receipt_age.max_days as i32)
    .bind(rules.receipt_age.older.as_str())
    .bind(Json(&rules.lifecycle))
    .bind(Json(&rules.occasions))
    .bind(Json(&rules.status))
    .bind(Json(&rules.tiers))
    .bind(rules.look_back_days() as i32)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// The program's currency and version, locked until the end of the caller's transaction.
pub async fn lock(
    conn: &mut PgConnection,
    merchant: MerchantId,
) -> Result<Option<(String, i64)>, Error> {
    sqlx::query_as("SELECT currency, version FROM programs WHERE merchant_id = $1 FOR UPDATE")
        .bind(merchant.0)
        .fetch_optional(conn)
        .await
        .map_err(db_error)
}

/// The program's currency now (a purchase that lost the race with a currency change says it).
pub async fn currency(
    conn: &mut PgConnection,
    merchant: MerchantId,
) -> Result<Option<String>, Error> {
    sqlx::query_scalar("SELECT currency FROM programs WHERE merchant_id = $1")
        .bind(merchant.0)
        .fetch_optional(conn)
        .await
        .map_err(db_error)
}

/// Whether the merchant has recorded any purchase (its currency is then fixed).
pub async fn has_purchases(conn: &mut PgConnection, merchant: MerchantId) -> Result<bool, Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM purchases WHERE merchant_id = $1)")
        .bind(merchant.0)
        .fetch_one(conn)
        .await
        .map_err(db_error)
}

/// Replaces the rules and bumps the version.
pub async fn replace(
    conn: &mut PgConnection,
    merchant: MerchantId,
    rules: &ProgramRules,
) -> Result<Program, Error> {
    let row: ProgramRow = sqlx::query_as(
        "UPDATE programs
            SET currency = $2, earn_points = $3, earn_currency_units = $4,
                minimum_purchase_minor = $5, category_multipliers = $6, promotions = $7,
                max_receipt_age_days = $8, old_receipts = $9, lifecycle = $10,
                occasions = $11, status = $12, tiers = $13, look_back_days = $14,
                version = version + 1, updated_at = now()
          WHERE merchant_id = $1
      RETURNING currency, earn_points, earn_currency_units, minimum_purchase_minor,
                category_multipliers, promotions, max_receipt_age_days, old_receipts,
                lifecycle, occasions, status, tiers, version, updated_at",
    )
    .bind(merchant.0)
    .bind(rules.currency.code())
    .bind(rules.earn_rate.points as i32)
    .bind(rules.earn_rate.currency_units as i32)
    .bind(rules.minimum_purchase_minor)
    .bind(Json(&rules.category_multipliers))
    .bind(Json(&rules.promotions))
    .bind(rules.receipt_age.max_days as i32)
    .bind(rules.receipt_age.older.as_str())
    .bind(Json(&rules.lifecycle))
    .bind(Json(&rules.occasions))
    .bind(Json(&rules.status))
    .bind(Json(&rules.tiers))
    .bind(rules.look_back_days() as i32)
    .fetch_one(conn)
    .await
    .map_err(db_error)?;
    row.into_program()
}
