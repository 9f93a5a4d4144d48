//! The SQL of members: customer profiles.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use sqlx::PgConnection;

use crate::error::Error;
use crate::members::rules::{Birthday, Customer, Enrollment, Profile};
use crate::platform::caller::MerchantId;
use crate::platform::store::db_error;

/// Creates or replaces a customer's profile.
const ENROLL_CUSTOMER: &str = include_str!("sql/enroll_customer.sql");

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

/// Creates or replaces a profile. Returns the stored customer and whether it was created.
pub async fn enroll(
    conn: &mut PgConnection,
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
    let row: Row = sqlx::query_as(ENROLL_CUSTOMER)
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
        .fetch_one(conn)
        .await
        .map_err(db_error)?;
    Ok((row.customer.into_customer()?, row.created))
}

pub async fn get(
    conn: &mut PgConnection,
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
    .fetch_optional(conn)
    .await
    .map_err(db_error)?;
    row.map(CustomerRow::into_customer).transpose()
}
