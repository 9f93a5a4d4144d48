//! The SQL of greetings: the job's candidates and the greetings it makes (with their
//! `greeting_due` event), the hand-out under leases and the acknowledgements.
//!
//! Functions take `&mut PgConnection` and never begin or commit; the use cases hold the
//! transactions. Lock order of the job: the customer's account (`points::lifecycle::
//! lock_account`), then the greeting row, the gift, the lots: the order of every movement.

use std::collections::HashSet;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgConnection;
use sqlx::types::Json;

use crate::error::Error;
use crate::greetings::rules::{GreetingStatus, LeaseState, OccasionProgram, Outcome};
use crate::platform::caller::MerchantId;
use crate::platform::store::db_error;
use crate::programs::lifecycle::Lifecycle;

const CLAIM: &str = include_str!("sql/claim.sql");
const CANDIDATES: &str = include_str!("sql/candidates.sql");

/// A merchant's occasion settings, and its points lifecycle (a bonus lot's expiry).
pub struct MerchantOccasions {
    pub merchant: MerchantId,
    pub occasions: OccasionProgram,
    pub lifecycle: Lifecycle,
}

/// Merchants after `after` (by id), at most `limit`.
pub async fn merchants_page(
    conn: &mut PgConnection,
    after: i64,
    limit: i64,
) -> Result<Vec<MerchantOccasions>, Error> {
    let rows: Vec<(i64, Json<OccasionProgram>, Json<Lifecycle>)> = sqlx::query_as(
        "SELECT merchant_id, occasions, lifecycle FROM programs
          WHERE merchant_id > $1 ORDER BY merchant_id LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    Ok(rows
        .into_iter()
        .map(|(merchant, occasions, lifecycle)| MerchantOccasions {
            merchant: MerchantId(merchant),
            occasions: occasions.0,
            lifecycle: lifecycle.0,
        })
        .collect())
}

/// One merchant's occasion settings; `None` without a program.
pub async fn occasions_of(
    conn: &mut PgConnection,
    merchant: MerchantId,
) -> Result<Option<OccasionProgram>, Error> {
    let row: Option<Json<OccasionProgram>> =
        sqlx::query_scalar("SELECT occasions FROM programs WHERE merchant_id = $1")
            .bind(merchant.0)
            .fetch_optional(conn)
            .await
            .map_err(db_error)?;
    Ok(row.map(|json| json.0))
}

/// A consenting customer, as occasions need them.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Candidate {
    pub id: i64,
    pub external_id: String,
    /// Contact data: never logged.
    pub display_name: String,
    pub birth_month: Option<i16>,
    pub birth_day: Option<i16>,
    pub birth_year: Option<i16>,
    pub time_zone: String,
    pub enrolled_at: DateTime<Utc>,
}

/// Which consenting customers to read: every one, or those whose birthday or enrolment
/// (UTC) falls on one of these months and days.
pub enum Filter<'a> {
    Everyone,
    MonthDays(&'a [(u32, u32)]),
}

pub async fn candidates(
    conn: &mut PgConnection,
    merchant: MerchantId,
    after: i64,
    limit: i64,
    filter: &Filter<'_>,
) -> Result<Vec<Candidate>, Error> {
    let (all, months, days): (bool, Vec<i16>, Vec<i16>) = match filter {
        Filter::Everyone => (true, vec![], vec![]),
        Filter::MonthDays(list) => (
            false,
            list.iter().map(|(m, _)| *m as i16).collect(),
            list.iter().map(|(_, d)| *d as i16).collect(),
        ),
    };
    sqlx::query_as(CANDIDATES)
        .bind(merchant.0)
        .bind(after)
        .bind(limit)
        .bind(months)
        .bind(days)
        .bind(all)
        .fetch_all(conn)
        .await
        .map_err(db_error)
}

/// The greeting keys (customer, occasion, year) made already for these customers in years
/// from `min_year` on.
pub async fn existing_keys(
    conn: &mut PgConnection,
    merchant: MerchantId,
    customers: &[i64],
    min_year: i32,
) -> Result<HashSet<(i64, String, i32)>, Error> {
    let rows: Vec<(i64, String, i32)> = sqlx::query_as(
        "SELECT customer_id, occasion, year FROM greetings
          WHERE merchant_id = $1 AND customer_id = ANY($2) AND year >= $3",
    )
    .bind(merchant.0)
    .bind(customers)
    .bind(min_year)
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    Ok(rows.into_iter().collect())
}

/// A greeting to make.
pub struct NewGreeting<'a> {
    pub customer_id: i64,
    pub occasion: &'a str,
    pub year: i32,
    pub kind: &'a str,
    pub occasion_name: &'a str,
    pub local_date: NaiveDate,
    pub now: DateTime<Utc>,
}

/// Makes the greeting unless its key exists (then `None`: made before, maybe by another
/// replica at this very moment: the unique key waits for that one's commit). Returns its id
/// and public greeting id.
pub async fn insert_greeting(
    conn: &mut PgConnection,
    merchant: MerchantId,
    g: &NewGreeting<'_>,
) -> Result<Option<(i64, String)>, Error> {
    sqlx::query_as(
        "INSERT INTO greetings (merchant_id, customer_id, occasion, year, kind, occasion_name,
                                local_date, offer_at, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $8)
         ON CONFLICT (merchant_id, customer_id, occasion, year) DO NOTHING
         RETURNING id, greeting_id",
    )
    .bind(merchant.0)
    .bind(g.customer_id)
    .bind(g.occasion)
    .bind(g.year)
    .bind(g.kind)
    .bind(g.occasion_name)
    .bind(g.local_date)
    .bind(g.now)
    .fetch_optional(conn)
    .await
    .map_err(db_error)
}

/// Records what the greeting brought: the birthday gift's grant reference, the bonus.
pub async fn set_reward(
    conn: &mut PgConnection,
    merchant: MerchantId,
    id: i64,
    gift_reference: Option<&str>,
    bonus_points: i64,
) -> Result<(), Error> {
    sqlx::query(
        "UPDATE greetings SET gift_reference = $3, bonus_points = $4
          WHERE merchant_id = $1 AND id = $2",
    )
    .bind(merchant.0)
    .bind(id)
    .bind(gift_reference)
    .bind(bonus_points)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// A greeting as handed out (contact data: never logged).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedRow {
    pub id: i64,
    pub greeting_id: String,
    pub kind: String,
    pub occasion: String,
    pub occasion_name: String,
    pub local_date: NaiveDate,
    pub attempts: i32,
    pub lease_token: String,
    pub lease_expires_at: DateTime<Utc>,
    pub bonus_points: i64,
    pub external_id: String,
    pub display_name: String,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub marketing_consent: bool,
    pub gift_code: Option<String>,
}

/// Hands out up to `limit` greetings under a lease of `lease_seconds` (see `sql/claim.sql`).
pub async fn claim(
    conn: &mut PgConnection,
    merchant: MerchantId,
    now: DateTime<Utc>,
    limit: u32,
    lease_seconds: u32,
) -> Result<Vec<ClaimedRow>, Error> {
    sqlx::query_as(CLAIM)
        .bind(merchant.0)
        .bind(now)
        .bind(i64::from(limit))
        .bind(f64::from(lease_seconds))
        .fetch_all(conn)
        .await
        .map_err(db_error)
}

#[derive(sqlx::FromRow)]
struct LeaseRow {
    id: i64,
    status: String,
    lease_token: Option<String>,
    acked_token: Option<String>,
    acked_outcome: Option<String>,
    attempts: i32,
}

/// The greeting's lease state, its row locked until the end of the transaction; `None` when
/// the merchant has no such greeting.
pub async fn lock_greeting(
    conn: &mut PgConnection,
    merchant: MerchantId,
    greeting_id: &str,
) -> Result<Option<(i64, LeaseState)>, Error> {
    let row: Option<LeaseRow> = sqlx::query_as(
        "SELECT id, status, lease_token, acked_token, acked_outcome, attempts
           FROM greetings WHERE merchant_id = $1 AND greeting_id = $2 FOR UPDATE",
    )
    .bind(merchant.0)
    .bind(greeting_id)
    .fetch_optional(conn)
    .await
    .map_err(db_error)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let stored = |what: &str, value: &str| {
        Error::internal(format!("stored greeting {what} {value:?} is invalid"))
    };
    let status = GreetingStatus::parse(&row.status).ok_or_else(|| stored("status", &row.status))?;
    let acked = match (row.acked_token, row.acked_outcome) {
        (Some(token), Some(outcome)) => Some((
            token,
            Outcome::parse(&outcome).ok_or_else(|| stored("outcome", &outcome))?,
        )),
        _ => None,
    };
    Ok(Some((
        row.id,
        LeaseState {
            status,
            lease_token: row.lease_token,
            acked,
            attempts: u32::try_from(row.attempts).unwrap_or(0),
        },
    )))
}

/// Ends the current lease with the sender's outcome: final, or offered again at
/// `next_attempt_at` (RETRY_LATER).
pub async fn settle(
    conn: &mut PgConnection,
    merchant: MerchantId,
    id: i64,
    token: &str,
    outcome: Outcome,
    next_attempt_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<(), Error> {
    sqlx::query(
        "UPDATE greetings
            SET status = $3, offer_at = $4, next_attempt_at = $4, lease_token = NULL,
                lease_expires_at = NULL, acked_token = $5, acked_outcome = $6, updated_at = $7
          WHERE merchant_id = $1 AND id = $2",
    )
    .bind(merchant.0)
    .bind(id)
    .bind(outcome.status().as_str())
    .bind(next_attempt_at)
    .bind(token)
    .bind(outcome.as_str())
    .bind(now)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}
