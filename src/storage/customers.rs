//! Customers and their accounts.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use sqlx::{PgConnection, PgPool};

use crate::domain::account::AccountState;
use crate::domain::customer::{Birthday, Customer, Enrollment, Profile};
use crate::error::Error;
use crate::storage::{MerchantId, db_error, sql};

#[derive(sqlx::FromRow)]
struct CustomerRow {
    external_id: String,
    display_name: String,
    birth_month: Option<i16>,
    birth_day: Option<i16>,
    birth_year: Option<i16>,
    time_zone: String,
    email: Option<String>,
    phone: Option<String>,
    marketing_consent: bool,
    enrolled_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl CustomerRow {
    fn into_customer(self) -> Result<Customer, Error> {
        let time_zone: Tz = self.time_zone.parse().map_err(|_| {
            Error::internal(format!("stored time zone {:?} is invalid", self.time_zone))
        })?;
        let birthday = match (self.birth_month, self.birth_day) {
            (Some(month), Some(day)) => Some(Birthday {
                month: month as u32,
                day: day as u32,
                year: self.birth_year.map(i32::from),
            }),
            _ => None,
        };
        Ok(Customer {
            external_id: self.external_id,
            profile: Profile {
                display_name: self.display_name,
                birthday,
                time_zone,
                email: self.email,
                phone: self.phone,
                marketing_consent: self.marketing_consent,
            },
            enrolled_at: self.enrolled_at,
            updated_at: self.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct AccountRow {
    available: i64,
    pending: i64,
    lifetime_earned: i64,
    lifetime_redeemed: i64,
    purchase_count: i64,
    version: i64,
}

impl From<AccountRow> for AccountState {
    fn from(row: AccountRow) -> Self {
        AccountState {
            available: row.available,
            pending: row.pending,
            lifetime_earned: row.lifetime_earned,
            lifetime_redeemed: row.lifetime_redeemed,
            purchase_count: row.purchase_count,
            version: row.version,
        }
    }
}

/// What checkout needs before it can write: the program version (to know whether the
/// in-memory program is current) and the customer's id, `None` if not enrolled yet.
/// `None` overall when the merchant has no program (it does not exist).
pub async fn checkout_context(
    conn: &mut PgConnection,
    merchant: MerchantId,
    external_id: &str,
) -> Result<Option<(i64, Option<i64>)>, Error> {
    sqlx::query_as::<_, (i64, Option<i64>)>(sql::CHECKOUT_CONTEXT)
        .bind(merchant.0)
        .bind(external_id)
        .fetch_optional(conn)
        .await
        .map_err(db_error)
}

/// The customer's id, enrolling them with an empty profile if they are new.
pub async fn enroll_on_purchase(
    conn: &mut PgConnection,
    merchant: MerchantId,
    external_id: &str,
) -> Result<i64, Error> {
    let created: Option<i64> = sqlx::query_scalar(sql::ENROLL_ON_PURCHASE)
        .bind(merchant.0)
        .bind(external_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_error)?;
    if let Some(id) = created {
        return Ok(id);
    }
    // A concurrent request enrolled them first; it has committed (ON CONFLICT waited for it).
    sqlx::query_scalar("SELECT id FROM customers WHERE merchant_id = $1 AND external_id = $2")
        .bind(merchant.0)
        .bind(external_id)
        .fetch_one(conn)
        .await
        .map_err(db_error)
}

/// Creates or replaces a profile. Returns the stored customer and whether it was created.
pub async fn enroll(
    pool: &PgPool,
    merchant: MerchantId,
    enrollment: &Enrollment,
) -> Result<(Customer, bool), Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        customer: CustomerRow,
        created: bool,
    }
    let profile = &enrollment.profile;
    let birthday = profile.birthday;
    let row: Row = sqlx::query_as(sql::ENROLL_CUSTOMER)
        .bind(merchant.0)
        .bind(&enrollment.external_id)
        .bind(&profile.display_name)
        .bind(birthday.map(|b| b.month as i16))
        .bind(birthday.map(|b| b.day as i16))
        .bind(birthday.and_then(|b| b.year).map(|y| y as i16))
        .bind(profile.time_zone.name())
        .bind(&profile.email)
        .bind(&profile.phone)
        .bind(profile.marketing_consent)
        .fetch_one(pool)
        .await
        .map_err(db_error)?;
    Ok((row.customer.into_customer()?, row.created))
}

pub async fn get(
    pool: &PgPool,
    merchant: MerchantId,
    external_id: &str,
) -> Result<Option<Customer>, Error> {
    let row: Option<CustomerRow> = sqlx::query_as(
        "SELECT external_id, display_name, birth_month, birth_day, birth_year, time_zone, email,
                phone, marketing_consent, enrolled_at, updated_at
           FROM customers
          WHERE merchant_id = $1 AND external_id = $2",
    )
    .bind(merchant.0)
    .bind(external_id)
    .fetch_optional(pool)
    .await
    .map_err(db_error)?;
    row.map(CustomerRow::into_customer).transpose()
}

/// The customer's internal id.
pub async fn id_of(
    pool: &PgPool,
    merchant: MerchantId,
    external_id: &str,
) -> Result<Option<i64>, Error> {
    sqlx::query_scalar("SELECT id FROM customers WHERE merchant_id = $1 AND external_id = $2")
        .bind(merchant.0)
        .bind(external_id)
        .fetch_optional(pool)
        .await
        .map_err(db_error)
}

/// The customer's account as committed now.
pub async fn account(
    pool: &PgPool,
    merchant: MerchantId,
    external_id: &str,
) -> Result<Option<AccountState>, Error> {
    let row: Option<AccountRow> = sqlx::query_as(sql::ACCOUNT_BY_EXTERNAL_ID)
        .bind(merchant.0)
        .bind(external_id)
        .fetch_optional(pool)
        .await
        .map_err(db_error)?;
    Ok(row.map(AccountState::from))
}
