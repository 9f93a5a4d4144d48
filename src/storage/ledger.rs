//! Reading a customer's ledger, newest first.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::domain::ledger::{EntryKind, LedgerEntry, PageRequest};
use crate::error::Error;
use crate::storage::{MerchantId, db_error};

/// Up to `page.size + 1` entries older than the page's cursor (the extra one tells the caller
/// whether another page follows).
pub async fn page(
    pool: &PgPool,
    merchant: MerchantId,
    customer_id: i64,
    page: PageRequest,
) -> Result<Vec<LedgerEntry>, Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        id: i64,
        kind: String,
        points: i64,
        reference: String,
        occurred_at: DateTime<Utc>,
        created_at: DateTime<Utc>,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, kind, points, reference, occurred_at, created_at
           FROM ledger_entries
          WHERE merchant_id = $1 AND customer_id = $2 AND ($3::bigint IS NULL OR id < $3)
          ORDER BY id DESC
          LIMIT $4",
    )
    .bind(merchant.0)
    .bind(customer_id)
    .bind(page.before_entry_id)
    .bind(page.size as i64 + 1)
    .fetch_all(pool)
    .await
    .map_err(db_error)?;
    rows.into_iter()
        .map(|row| {
            let kind = EntryKind::parse(&row.kind).ok_or_else(|| {
                Error::internal(format!("unknown ledger entry kind {:?}", row.kind))
            })?;
            Ok(LedgerEntry {
                entry_id: row.id,
                kind,
                points: row.points,
                reference: row.reference,
                occurred_at: row.occurred_at,
                created_at: row.created_at,
            })
        })
        .collect()
}
