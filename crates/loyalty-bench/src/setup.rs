//! The bench database: created if missing and migrated; one bench merchant per scale,
//! preloaded once with customers and history and reused by later runs; fresh API keys per run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use loyalty::Scope;

use loyalty::{DatabaseConfig, MerchantId, Store};
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};

/// Purchases preloaded per customer (each with two lines and one EARN entry).
pub const HISTORY: i32 = 3;

/// The currency of bench merchants; the checkout requests and the pgbench script use it too.
pub const CURRENCY: &str = "EUR";

/// Creates the database named in `url` if it does not exist (through the `postgres`
/// maintenance database of the same server) and applies the migrations.
pub async fn prepare_database(url: &str) -> Result<Store> {
    let options: PgConnectOptions = url
        .parse()
        .with_context(|| format!("invalid --database-url {url:?}"))?;
    let Some(name) = options.get_database().map(str::to_string) else {
        bail!("--database-url {url:?} names no database");
    };
    let mut admin = options
        .clone()
        .database("postgres")
        .application_name("loyalty-bench")
        .connect()
        .await
        .with_context(|| format!("cannot connect to the maintenance database next to {name}"))?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        let created = sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE DATABASE {}",
            quote_ident(&name)
        )))
        .execute(&mut admin)
        .await;
        match created {
            Ok(_) => eprintln!("created database {name}"),
            // Another bench run created it meanwhile.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e).with_context(|| format!("cannot create database {name}")),
        }
    }
    let _ = admin.close().await;

    let store = Store::connect_lazy(&DatabaseConfig {
        url: url.to_string(),
        max_connections: 8,
        acquire_timeout: Duration::from_secs(30),
        // Preloading a million customers runs for minutes; 0 disables the timeout.
        statement_timeout: Duration::ZERO,
    })?;
    store
        .migrate()
        .await
        .context("cannot migrate the bench database")?;
    Ok(store)
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The server's `max_connections` and the connections open now, to warn before the bench
/// runs out of them (two servers' pools plus pgbench's clients).
pub async fn connection_budget(store: &Store) -> Result<(i64, i64)> {
    let max: String = sqlx::query_scalar("SHOW max_connections")
        .fetch_one(store.pool())
        .await?;
    let used: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity")
        .fetch_one(store.pool())
        .await?;
    Ok((max.parse().unwrap_or(100), used))
}

pub async fn server_version(store: &Store) -> Result<String> {
    Ok(sqlx::query_scalar("SHOW server_version")
        .fetch_one(store.pool())
        .await?)
}

/// A bench merchant and what it took to get it ready.
pub struct BenchMerchant {
    pub id: MerchantId,
    pub customers: u64,
    /// Customers inserted by this run (0 when an earlier run preloaded them all).
    pub preloaded: u64,
    pub preload_time: Duration,
}

/// The merchant `bench-<customers>`, created and preloaded if needed. A preload interrupted
/// earlier is resumed: batches commit one by one and always cover external ids 1..=k.
pub async fn bench_merchant(store: &Store, customers: u64, batch: u64) -> Result<BenchMerchant> {
    let name = format!("bench-{customers}");
    let existing: Option<i64> =
        sqlx::query_scalar("SELECT id FROM merchants WHERE name = $1 ORDER BY id LIMIT 1")
            .bind(&name)
            .fetch_optional(store.pool())
            .await?;
    let id = match existing {
        Some(id) => MerchantId(id),
        None => {
            // The admin key it comes with is not needed: the bench makes its own keys.
            let (id, _admin_key) = loyalty::create_merchant(store, &name, CURRENCY)
                .await
                .with_context(|| format!("cannot create merchant {name}"))?;
            id
        }
    };
    let have: i64 = sqlx::query_scalar("SELECT count(*) FROM customers WHERE merchant_id = $1")
        .bind(id.0)
        .fetch_one(store.pool())
        .await?;
    let have = have as u64;
    if have > customers {
        bail!(
            "merchant {name} (id {id}) has {have} customers, more than {customers}; \
             was it used for something else?"
        );
    }
    let started = Instant::now();
    if have < customers {
        eprintln!(
            "preloading {} customers x {HISTORY} purchases into merchant {name} (id {id})...",
            customers - have
        );
        let mut first = have + 1;
        while first <= customers {
            let last = (first + batch - 1).min(customers);
            preload_batch(store, id, first, last).await?;
            eprintln!(
                "  {last}/{customers} customers ({:.1} s)",
                started.elapsed().as_secs_f64()
            );
            first = last + 1;
        }
        // Set hint bits and the visibility map now, and flush, so the measurements do not pay
        // for the preload later (first-read hint-bit writes, a checkpoint mid-run).
        for table in TABLES {
            sqlx::raw_sql(AssertSqlSafe(format!("VACUUM (ANALYZE) {table}")))
                .execute(store.pool())
                .await
                .with_context(|| format!("VACUUM {table}"))?;
        }
        if let Err(e) = sqlx::raw_sql("CHECKPOINT").execute(store.pool()).await {
            eprintln!("  (CHECKPOINT skipped: {e})");
        }
    }
    Ok(BenchMerchant {
        id,
        customers,
        preloaded: customers - have,
        preload_time: started.elapsed(),
    })
}

const TABLES: [&str; 5] = [
    "customers",
    "accounts",
    "purchases",
    "purchase_lines",
    "ledger_entries",
];

/// Fresh statistics before measuring (earlier runs added purchases).
pub async fn analyze(store: &Store) -> Result<()> {
    sqlx::raw_sql(AssertSqlSafe(format!("ANALYZE {}", TABLES.join(", "))))
        .execute(store.pool())
        .await
        .context("ANALYZE")?;
    Ok(())
}

/// Customers `$2..=$3` of merchant `$1`, each with `$4` purchases (two lines each), their EARN
/// ledger entries and an account that is exactly the projection of that ledger: available ==
/// lifetime_earned == Σ points, version == purchase_count == number of purchases. Every
/// purchase's `*_after` columns hold the running totals, as RecordPurchase would have written.
/// External ids are the numbers as text, so pgbench and the load generator can pick customers
/// with a random integer. Points follow the default program (1 point per currency unit).
const PRELOAD: &str = r"
WITH spec AS (
    SELECT n, k,
           'pre-' || n || '-' || k AS purchase_id,
           300 + (n * 7 + k * 13) % 500 AS coffee,
           200 + (n * 11 + k * 3) % 400 AS bakery,
           now() - (($4 + 1 - k) * interval '7 days') - (n % 1440) * interval '1 minute'
               AS occurred_at
      FROM generate_series($2::bigint, $3::bigint) AS n,
           generate_series(1, $4::int) AS k
), purchase AS (
    SELECT s.*,
           coffee + bakery AS total,
           (coffee + bakery) / 100 AS points,
           (sum((coffee + bakery) / 100) OVER (PARTITION BY n ORDER BY k))::bigint AS running
      FROM spec s
), customer AS (
    INSERT INTO customers (merchant_id, external_id, display_name, enrolled_at, updated_at)
    SELECT $1, n::text, 'Bench customer ' || n, now() - interval '1 year', now()
      FROM generate_series($2::bigint, $3::bigint) AS n
 RETURNING id, external_id::bigint AS n
), account AS (
    INSERT INTO accounts (merchant_id, customer_id, available, pending, lifetime_earned,
                          lifetime_redeemed, purchase_count, last_purchase_at, version)
    SELECT $1, c.id, t.points, 0, t.points, 0, t.purchases, t.last_at, t.purchases
      FROM customer c
      JOIN (SELECT n, sum(points)::bigint AS points, count(*) AS purchases,
                   max(occurred_at) AS last_at
              FROM purchase GROUP BY n) t ON t.n = c.n
), purchase_row AS (
    INSERT INTO purchases (merchant_id, purchase_id, customer_id, store_id, occurred_at, currency,
                           total_minor, request_hash, points_earned, available_after,
                           pending_after, lifetime_earned_after, lifetime_redeemed_after,
                           purchase_count_after, version_after)
    SELECT $1, p.purchase_id, c.id, 'store-' || (p.n % 20), p.occurred_at, $5, p.total,
           sha256(convert_to(p.purchase_id, 'UTF8')), p.points, p.running, 0, p.running, 0,
           p.k, p.k
      FROM purchase p JOIN customer c ON c.n = p.n
), line AS (
    INSERT INTO purchase_lines (merchant_id, purchase_id, line_no, sku, category, quantity,
                                amount_minor)
    SELECT $1, purchase_id, 1, 'espresso', 'coffee', 1, coffee FROM purchase
    UNION ALL
    SELECT $1, purchase_id, 2, 'croissant', 'bakery', 2, bakery FROM purchase
), entry AS (
    INSERT INTO ledger_entries (merchant_id, customer_id, seq, kind, points, reference,
                                occurred_at)
    SELECT $1, c.id, p.k, 'earn', p.points, p.purchase_id, p.occurred_at
      FROM purchase p JOIN customer c ON c.n = p.n
)
SELECT count(*) FROM customer
";

async fn preload_batch(store: &Store, merchant: MerchantId, first: u64, last: u64) -> Result<()> {
    let mut tx = store.pool().begin().await?;
    // A lost preload batch is simply redone; no need to wait for the WAL flush.
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    let inserted: i64 = sqlx::query_scalar(PRELOAD)
        .bind(merchant.0)
        .bind(first as i64)
        .bind(last as i64)
        .bind(HISTORY)
        .bind(CURRENCY)
        .fetch_one(&mut *tx)
        .await
        .with_context(|| format!("preloading customers {first}..={last}"))?;
    if inserted as u64 != last - first + 1 {
        bail!("preloading customers {first}..={last} inserted {inserted}");
    }
    tx.commit().await?;
    Ok(())
}

/// Customers whose account disagrees with their ledger (rule 1), for the self-check after a
/// preload in tests.
#[cfg(test)]
const LEDGER_MISMATCHES: &str = r"
SELECT count(*) FROM (
    SELECT a.customer_id
      FROM accounts a
      LEFT JOIN ledger_entries e ON e.merchant_id = a.merchant_id AND e.customer_id = a.customer_id
      LEFT JOIN (SELECT customer_id, count(*) AS n, max(version_after) AS v
                   FROM purchases WHERE merchant_id = $1 GROUP BY customer_id) p
             ON p.customer_id = a.customer_id
     WHERE a.merchant_id = $1
     GROUP BY a.customer_id, a.available, a.pending, a.version, a.purchase_count, p.n, p.v
    HAVING a.available + a.pending <> COALESCE(sum(e.points), 0)
        OR a.purchase_count <> COALESCE(p.n, 0)
        OR a.version <> COALESCE(p.v, 0)
) broken
";

/// The per-run API keys: `pos` for checkout, `app` for balance reads (what real callers use).
#[derive(Clone)]
pub struct Keys {
    pub pos: String,
    pub app: String,
    ids: Vec<i64>,
}

pub async fn create_keys(store: &Store, merchant: MerchantId) -> Result<Keys> {
    let pos = loyalty::create_key(store, merchant, Scope::Pos)
        .await
        .context("cannot create a pos key")?;
    let app = loyalty::create_key(store, merchant, Scope::App)
        .await
        .context("cannot create an app key")?;
    Ok(Keys {
        ids: vec![pos.key_id, app.key_id],
        pos: pos.secret.expose().to_string(),
        app: app.secret.expose().to_string(),
    })
}

/// Best effort: keys of finished runs should not stay valid.
pub async fn revoke_keys(store: &Store, keys: &Keys) {
    for id in &keys.ids {
        if let Err(e) = loyalty::revoke_key(store, *id).await {
            eprintln!("warning: could not revoke bench key {id}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("loyalty_bench"), "\"loyalty_bench\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    /// Needs PostgreSQL (`LOYALTY_BENCH_TEST_DATABASE_URL`, a maintenance database URL);
    /// skipped without it. Preloads into a throwaway database and checks rule 1.
    #[tokio::test]
    async fn preload_keeps_accounts_consistent_with_their_ledger() {
        let Ok(admin_url) = std::env::var("LOYALTY_BENCH_TEST_DATABASE_URL") else {
            eprintln!("skipped: LOYALTY_BENCH_TEST_DATABASE_URL is not set");
            return;
        };
        let name = format!("loyalty_bench_t_{}", std::process::id());
        let options: PgConnectOptions = admin_url.parse().unwrap();
        let url = options.clone().database(&name).to_url_lossy().to_string();
        let store = prepare_database(&url).await.unwrap();
        let merchant = bench_merchant(&store, 250, 100).await.unwrap();
        assert_eq!(merchant.preloaded, 250);
        let again = bench_merchant(&store, 250, 100).await.unwrap();
        assert_eq!((again.id, again.preloaded), (merchant.id, 0));
        let broken: i64 = sqlx::query_scalar(LEDGER_MISMATCHES)
            .bind(merchant.id.0)
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(broken, 0);
        let purchases: i64 =
            sqlx::query_scalar("SELECT count(*) FROM purchases WHERE merchant_id = $1")
                .bind(merchant.id.0)
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert_eq!(purchases, 250 * i64::from(HISTORY));
        store.close().await;
        let mut admin = options.connect().await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(&name)
        )))
        .execute(&mut admin)
        .await
        .unwrap();
    }
}
