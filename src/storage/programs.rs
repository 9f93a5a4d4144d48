//! Programs: read on checkout (version first, the full rules only when they changed) and
//! replaced by admins.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};

use crate::domain::money::Currency;
use crate::domain::program::{EarnRate, Program, ProgramRules, Promotion};
use crate::error::Error;
use crate::storage::{MerchantId, db_error};

#[derive(sqlx::FromRow)]
struct ProgramRow {
    currency: String,
    earn_points: i32,
    earn_currency_units: i32,
    minimum_purchase_minor: i64,
    category_multipliers: Json<BTreeMap<String, u32>>,
    promotions: Json<Vec<Promotion>>,
    version: i64,
    updated_at: DateTime<Utc>,
}

impl ProgramRow {
    fn into_program(self) -> Result<Program, Error> {
        let currency = Currency::parse("currency", &self.currency).map_err(|_| {
            Error::internal(format!("stored currency {:?} is invalid", self.currency))
        })?;
        Ok(Program {
            rules: ProgramRules {
                currency,
                earn_rate: EarnRate {
                    points: self.earn_points as u32,
                    currency_units: self.earn_currency_units as u32,
                },
                minimum_purchase_minor: self.minimum_purchase_minor,
                category_multipliers: self.category_multipliers.0,
                promotions: self.promotions.0,
            },
            version: self.version,
            updated_at: self.updated_at,
        })
    }
}

const SELECT_PROGRAM: &str =
    "SELECT currency, earn_points, earn_currency_units, minimum_purchase_minor,
        category_multipliers, promotions, version, updated_at
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

pub async fn version(conn: &mut PgConnection, merchant: MerchantId) -> Result<Option<i64>, Error> {
    sqlx::query_scalar("SELECT version FROM programs WHERE merchant_id = $1")
        .bind(merchant.0)
        .fetch_optional(conn)
        .await
        .map_err(db_error)
}

/// Inserts the first program of a new merchant.
pub(crate) async fn insert(
    conn: &mut PgConnection,
    merchant: MerchantId,
    rules: &ProgramRules,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO programs (merchant_id, currency, earn_points, earn_currency_units,
                               minimum_purchase_minor, category_multipliers, promotions)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(merchant.0)
    .bind(rules.currency.code())
    .bind(rules.earn_rate.points as i32)
    .bind(rules.earn_rate.currency_units as i32)
    .bind(rules.minimum_purchase_minor)
    .bind(Json(&rules.category_multipliers))
    .bind(Json(&rules.promotions))
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Replaces the rules, checking the caller's expected version (0: no check), and writes an
/// audit record in the same transaction.
pub async fn update(
    pool: &PgPool,
    merchant: MerchantId,
    rules: &ProgramRules,
    expected_version: i64,
    actor: &str,
) -> Result<Program, Error> {
    let mut tx = pool.begin().await.map_err(db_error)?;
    let current: Option<(String, i64)> =
        sqlx::query_as("SELECT currency, version FROM programs WHERE merchant_id = $1 FOR UPDATE")
            .bind(merchant.0)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;
    let Some((currency, version)) = current else {
        return Err(Error::NotFound("program"));
    };
    if expected_version != 0 && expected_version != version {
        return Err(Error::FailedPrecondition(format!(
            "the program is at version {version}, not {expected_version}; read it again"
        )));
    }
    if currency != rules.currency.code() {
        let has_purchases: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM purchases WHERE merchant_id = $1)")
                .bind(merchant.0)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_error)?;
        if has_purchases {
            return Err(Error::FailedPrecondition(format!(
                "the currency cannot change from {currency}: purchases were recorded in it"
            )));
        }
    }
    let row: ProgramRow = sqlx::query_as(
        "UPDATE programs
            SET currency = $2, earn_points = $3, earn_currency_units = $4,
                minimum_purchase_minor = $5, category_multipliers = $6, promotions = $7,
                version = version + 1, updated_at = now()
          WHERE merchant_id = $1
      RETURNING currency, earn_points, earn_currency_units, minimum_purchase_minor,
                category_multipliers, promotions, version, updated_at",
    )
    .bind(merchant.0)
    .bind(rules.currency.code())
    .bind(rules.earn_rate.points as i32)
    .bind(rules.earn_rate.currency_units as i32)
    .bind(rules.minimum_purchase_minor)
    .bind(Json(&rules.category_multipliers))
    .bind(Json(&rules.promotions))
    .fetch_one(&mut *tx)
    .await
    .map_err(db_error)?;
    let program = row.into_program()?;
    crate::storage::merchants::audit(
        &mut tx,
        merchant,
        actor,
        "program.update",
        serde_json::json!({ "version": program.version }),
    )
    .await?;
    tx.commit().await.map_err(db_error)?;
    Ok(program)
}
