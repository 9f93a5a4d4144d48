//! The bench database: created if missing and migrated; one bench merchant per scale,
//! preloaded once with customers and history and reused by later runs; fresh API keys per run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use loyalty::Scope;

use loyalty::{DatabaseConfig, MerchantId, Store};
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};

/// Purchases preloaded per customer (each with two lines, one EARN entry and its lot).
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
        outbox: true,
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

/// The merchant's purchases per customer (0 without customers).
pub async fn purchases_per_customer(store: &Store, merchant: &BenchMerchant) -> Result<f64> {
    let purchases: i64 =
        sqlx::query_scalar("SELECT count(*) FROM purchases WHERE merchant_id = $1")
            .bind(merchant.id.0)
            .fetch_one(store.pool())
            .await
            .context("counting the bench merchant's purchases")?;
    Ok(if merchant.customers == 0 {
        0.0
    } else {
        purchases as f64 / merchant.customers as f64
    })
}

/// The merchant `bench-<customers>`, created and preloaded if needed. A preload interrupted
/// earlier is resumed: batches commit one by one and always cover external ids 1..=k. A
/// merchant preloaded by an older bench, whose purchases have no lots, gets them
/// (`fill_missing_lots`).
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
    let filled = fill_missing_lots(store, id, &name).await?;
    if filled > 0 {
        eprintln!(
            "merchant {name} (id {id}) was preloaded by an older loyalty-bench, without lots: \
             gave {filled} customers the lots of their preloaded purchases ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
    }
    if have < customers || filled > 0 {
        let mut first = have + 1;
        if have < customers {
            eprintln!(
                "preloading {} customers x {HISTORY} purchases into merchant {name} (id {id})...",
                customers - have
            );
        }
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

const TABLES: [&str; 9] = [
    "customers",
    "accounts",
    "purchases",
    "purchase_lines",
    "ledger_entries",
    "point_lots",
    "lot_movements",
    "reservations",
    "events",
];

/// Vacuums the bench's tables and refreshes their statistics before measuring. Earlier runs
/// (and a ceiling right before a scenario) left dead row versions: each updated account, each
/// event the sequencer numbered. Where autovacuum is off (as on the CI machine:
/// `conf.d/90-ci.conf`) nothing else would remove them, and every later run would measure an
/// ever more bloated database; with autovacuum on, a production database does not look like
/// that.
pub async fn vacuum(store: &Store) -> Result<()> {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "VACUUM (ANALYZE) {}",
        TABLES.join(", ")
    )))
    .execute(store.pool())
    .await
    .context("VACUUM (ANALYZE)")?;
    Ok(())
}

/// Customers `$2..=$3` of merchant `$1`, each with `$4` purchases (two lines each), their EARN
/// ledger entries, their lots and an account that is exactly the projection of that ledger:
/// available == lifetime_earned == Σ points, version == purchase_count == number of
/// purchases. Every purchase's `*_after` columns hold the running totals, and every purchase
/// has the lot RecordPurchase would have made under the bench's (default) program: spendable
/// at once, never expiring, all of its points remaining.
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
), lot AS (
    INSERT INTO point_lots (merchant_id, customer_id, source_kind, source_reference, points,
                            remaining, earned_at, available_at, matured, expires_at)
    SELECT $1, c.id, 'earn', p.purchase_id, p.points, p.points, p.occurred_at, p.occurred_at,
           true, NULL
      FROM purchase p JOIN customer c ON c.n = p.n
     WHERE p.points > 0
 RETURNING id, source_reference
), purchase_row AS (
    INSERT INTO purchases (merchant_id, purchase_id, customer_id, store_id, occurred_at, currency,
                           total_minor, request_hash, points_earned, available_after,
                           pending_after, lifetime_earned_after, lifetime_redeemed_after,
                           purchase_count_after, version_after, lot_id)
    SELECT $1, p.purchase_id, c.id, 'store-' || (p.n % 20), p.occurred_at, $5, p.total,
           sha256(convert_to(p.purchase_id, 'UTF8')), p.points, p.running, 0, p.running, 0,
           p.k, p.k, l.id
      FROM purchase p JOIN customer c ON c.n = p.n
      LEFT JOIN lot l ON l.source_reference = p.purchase_id
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

/// Per customer of merchant `$1` whose spendable lots hold other than their available points:
/// that gap, and the points of their purchases that have no lot. A bench before lots preloaded
/// purchases without them (and nothing could spend since, spending needs lots), so for each of
/// its customers the two are equal and the purchases' lots close the gap; any other gap is
/// not the bench's doing.
const LOT_GAPS: &str = r"
WITH spendable AS (
    SELECT customer_id, sum(remaining)::bigint AS points
      FROM point_lots
     WHERE merchant_id = $1 AND matured
     GROUP BY customer_id
), gap AS (
    SELECT a.customer_id, greatest(a.available, 0) - COALESCE(s.points, 0) AS points
      FROM accounts a
      LEFT JOIN spendable s ON s.customer_id = a.customer_id
     WHERE a.merchant_id = $1
), missing AS (
    SELECT p.customer_id, sum(p.points_earned)::bigint AS points
      FROM purchases p
     WHERE p.merchant_id = $1 AND p.points_earned > 0 AND p.lot_id IS NULL
     GROUP BY p.customer_id
)
SELECT g.customer_id, g.points AS gap, COALESCE(m.points, 0) AS missing
  FROM gap g
  LEFT JOIN missing m ON m.customer_id = g.customer_id
 WHERE g.points <> 0
";

/// The lots of the purchases of customers `$2` of merchant `$1` that have none, as the
/// preload makes them.
const FILL_LOTS: &str = r"
WITH lot AS (
    INSERT INTO point_lots (merchant_id, customer_id, source_kind, source_reference, points,
                            remaining, earned_at, available_at, matured, expires_at)
    SELECT p.merchant_id, p.customer_id, 'earn', p.purchase_id, p.points_earned,
           p.points_earned, p.occurred_at, p.occurred_at, true, NULL
      FROM purchases p
     WHERE p.merchant_id = $1 AND p.customer_id = ANY($2) AND p.points_earned > 0
       AND p.lot_id IS NULL
 RETURNING id, source_reference
)
UPDATE purchases p
   SET lot_id = lot.id
  FROM lot
 WHERE p.merchant_id = $1 AND p.purchase_id = lot.source_reference
";

/// Gives the customers of a merchant preloaded without lots the lots of their purchases;
/// refuses a merchant whose lots and accounts disagree otherwise. Returns the customers given
/// lots.
async fn fill_missing_lots(store: &Store, merchant: MerchantId, name: &str) -> Result<u64> {
    let mut tx = store.pool().begin().await?;
    let gaps: Vec<(i64, i64, i64)> = sqlx::query_as(LOT_GAPS)
        .bind(merchant.0)
        .fetch_all(&mut *tx)
        .await
        .context("comparing the bench customers' lots with their accounts")?;
    let broken: Vec<&(i64, i64, i64)> = gaps
        .iter()
        .filter(|(_, gap, missing)| gap != missing)
        .collect();
    if let Some((customer, gap, missing)) = broken.first() {
        bail!(
            "merchant {name} (id {merchant}): {} customers' spendable lots do not match their              available points in a way lots of their purchases would explain (customer id              {customer}: {gap} points without a lot, purchases without a lot hold {missing});              the bench cannot spend their points. Drop the bench database (or use another              --database-url) and let the bench preload it again.",
            broken.len()
        );
    }
    if gaps.is_empty() {
        return Ok(0);
    }
    let customers: Vec<i64> = gaps.iter().map(|(customer, _, _)| *customer).collect();
    sqlx::query(FILL_LOTS)
        .bind(merchant.0)
        .bind(&customers)
        .execute(&mut *tx)
        .await
        .context("giving preloaded purchases their lots")?;
    tx.commit().await?;
    Ok(customers.len() as u64)
}

/// What a top-up credited.
pub struct TopUp {
    pub customers: u64,
    pub points: i64,
}

/// Customers topped up per statement.
const TOP_UP_BATCH: i64 = 50_000;

/// Customers of merchant `$1` above id `$3` with fewer than `$2` available points (and no
/// debt) get up to twice `$2`, as an adjustment credits them (an ADJUST ledger entry, `$4`
/// and the customer id as its reference, and a lot of its own, spendable at once and never
/// expiring, as AdjustPoints makes under the bench's program): the account moves by the points
/// and one version. (The adjustment's idempotency row and audit record, which nobody reads
/// here, are not written.) At most `$5` customers, in id order; returns how many, their
/// points and the last id.
const TOP_UP: &str = r"
WITH due AS (
    SELECT customer_id, 2 * $2 - available AS points, version + 1 AS seq
      FROM accounts
     WHERE merchant_id = $1 AND customer_id > $3 AND available >= 0 AND available < $2
     ORDER BY customer_id
     LIMIT $5
       FOR UPDATE
), account AS (
    UPDATE accounts a
       SET available = a.available + d.points, version = d.seq, updated_at = now()
      FROM due d
     WHERE a.merchant_id = $1 AND a.customer_id = d.customer_id
), entry AS (
    INSERT INTO ledger_entries (merchant_id, customer_id, seq, kind, points, reference,
                                occurred_at)
    SELECT $1, customer_id, seq, 'adjust', points, $4 || '-' || customer_id, now()
      FROM due
), lot AS (
    INSERT INTO point_lots (merchant_id, customer_id, source_kind, source_reference, points,
                            remaining, earned_at, available_at, matured, expires_at)
    SELECT $1, customer_id, 'adjust', $4 || '-' || customer_id, points, points, now(), now(),
           true, NULL
      FROM due
)
SELECT count(*), COALESCE(sum(points), 0)::bigint, max(customer_id) FROM due
";

/// Makes sure every customer of the merchant has at least `floor` available points, crediting
/// those below it up to twice as many (`TOP_UP`); `run_id` makes the credits' references
/// unique. A top-up that changed rows is vacuumed, as the preload is.
pub async fn top_up(
    store: &Store,
    merchant: MerchantId,
    floor: i64,
    run_id: &str,
) -> Result<TopUp> {
    let reference = format!("loyalty-bench-top-up-{run_id}");
    let mut done = TopUp {
        customers: 0,
        points: 0,
    };
    let mut after = 0_i64;
    loop {
        let (count, points, last): (i64, i64, Option<i64>) = sqlx::query_as(TOP_UP)
            .bind(merchant.0)
            .bind(floor)
            .bind(after)
            .bind(&reference)
            .bind(TOP_UP_BATCH)
            .fetch_one(store.pool())
            .await
            .context("topping up the bench customers")?;
        done.customers += count as u64;
        done.points += points;
        match last {
            Some(last) if count == TOP_UP_BATCH => after = last,
            _ => break,
        }
    }
    if done.customers > 0 {
        for table in ["accounts", "ledger_entries", "point_lots"] {
            sqlx::raw_sql(AssertSqlSafe(format!("VACUUM (ANALYZE) {table}")))
                .execute(store.pool())
                .await
                .with_context(|| format!("VACUUM {table}"))?;
        }
    }
    Ok(done)
}

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

/// The per-run API keys: `pos` for checkout, `app` for balance reads, `scheduler` for the
/// event stream (what real callers use). The bench's servers run without TLS, so the
/// scheduler key needs no client certificate there.
#[derive(Clone)]
pub struct Keys {
    pub pos: String,
    pub app: String,
    pub scheduler: String,
    ids: Vec<i64>,
}

pub async fn create_keys(store: &Store, merchant: MerchantId) -> Result<Keys> {
    let pos = loyalty::create_key(store, merchant, Scope::Pos)
        .await
        .context("cannot create a pos key")?;
    let app = loyalty::create_key(store, merchant, Scope::App)
        .await
        .context("cannot create an app key")?;
    let scheduler = loyalty::create_key(store, merchant, Scope::Scheduler)
        .await
        .context("cannot create a scheduler key")?;
    Ok(Keys {
        ids: vec![pos.key_id, app.key_id, scheduler.key_id],
        pos: pos.secret.expose().to_string(),
        app: app.secret.expose().to_string(),
        scheduler: scheduler.secret.expose().to_string(),
    })
}

/// How long [`stream_end`] waits for the sequencer to number the merchant's committed events.
const SEQUENCED_WITHIN: Duration = Duration::from_secs(10);

/// The cursor of the merchant's newest event, once every committed event of the merchant has
/// its position (the tail of an earlier scenario may still be waiting for the sequencer);
/// empty when the merchant has no event yet. A watcher that starts after it sees only what
/// is written from now on, instead of replaying every earlier run. The service's cursor is
/// the event's position in decimal (`events::rules::Cursor`); the bench reads it from the
/// database only to skip the history, the watchers treat what they receive as opaque.
pub async fn stream_end(store: &Store, merchant: MerchantId) -> Result<String> {
    let started = Instant::now();
    loop {
        let (unsequenced, newest): (i64, Option<i64>) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE position IS NULL), max(position)
               FROM events WHERE merchant_id = $1",
        )
        .bind(merchant.0)
        .fetch_one(store.pool())
        .await
        .context("cannot read the end of the event stream")?;
        if unsequenced == 0 {
            return Ok(newest.map(|p| p.to_string()).unwrap_or_default());
        }
        if started.elapsed() > SEQUENCED_WITHIN {
            bail!(
                "{unsequenced} committed events of the bench merchant have no position after \
                 {SEQUENCED_WITHIN:?}: is the server's sequencer running?"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

    /// A throwaway bench database, dropped by `drop_database`. Needs PostgreSQL
    /// (`LOYALTY_BENCH_TEST_DATABASE_URL`, a maintenance database URL); `None` (the test is
    /// skipped) without it.
    async fn throwaway(tag: &str) -> Option<(Store, PgConnectOptions, String)> {
        let Ok(admin_url) = std::env::var("LOYALTY_BENCH_TEST_DATABASE_URL") else {
            eprintln!("skipped: LOYALTY_BENCH_TEST_DATABASE_URL is not set");
            return None;
        };
        let name = format!("loyalty_bench_t_{}_{tag}", std::process::id());
        let options: PgConnectOptions = admin_url.parse().unwrap();
        let url = options.clone().database(&name).to_url_lossy().to_string();
        let store = prepare_database(&url).await.unwrap();
        Some((store, options, name))
    }

    async fn drop_database(store: Store, options: PgConnectOptions, name: &str) {
        store.close().await;
        let mut admin = options.connect().await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(name)
        )))
        .execute(&mut admin)
        .await
        .unwrap();
    }

    async fn count(store: &Store, sql: &'static str, merchant: MerchantId) -> i64 {
        sqlx::query_scalar(sql)
            .bind(merchant.0)
            .fetch_one(store.pool())
            .await
            .unwrap()
    }

    /// Customers whose spendable lots do not hold exactly their available points.
    const LOT_MISMATCHES: &str = r"
    SELECT count(*) FROM accounts a
     WHERE a.merchant_id = $1
       AND greatest(a.available, 0) <> (SELECT COALESCE(sum(remaining), 0) FROM point_lots l
                                          WHERE l.merchant_id = a.merchant_id
                                            AND l.customer_id = a.customer_id AND l.matured)
    ";

    /// Customers whose account is not the projection of their ledger (whatever wrote it):
    /// available + pending == Σ points, version == the last entry's seq.
    const PROJECTION_MISMATCHES: &str = r"
    SELECT count(*) FROM accounts a
      JOIN LATERAL (SELECT COALESCE(sum(points), 0) AS points, COALESCE(max(seq), 0) AS seq
                      FROM ledger_entries e
                     WHERE e.merchant_id = a.merchant_id AND e.customer_id = a.customer_id) l
        ON true
     WHERE a.merchant_id = $1
       AND (a.available + a.pending <> l.points OR a.version <> l.seq)
    ";

    /// The history a scale's figures hold for: the preload's purchases, then every later one.
    #[tokio::test]
    async fn the_history_counts_the_merchants_purchases_per_customer() {
        let Some((store, options, name)) = throwaway("history").await else {
            return;
        };
        let merchant = bench_merchant(&store, 40, 40).await.unwrap();
        let preloaded = purchases_per_customer(&store, &merchant).await.unwrap();
        assert_eq!(preloaded, HISTORY as f64);
        // Twenty more purchases, copies of preloaded ones under new ids.
        sqlx::query(
            "INSERT INTO purchases (merchant_id, purchase_id, customer_id, store_id, occurred_at,
                                    currency, total_minor, request_hash, points_earned,
                                    available_after, pending_after, lifetime_earned_after,
                                    lifetime_redeemed_after, purchase_count_after, version_after)
             SELECT merchant_id, 'more-' || purchase_id, customer_id, store_id, occurred_at,
                    currency, total_minor, request_hash, points_earned, available_after,
                    pending_after, lifetime_earned_after, lifetime_redeemed_after,
                    purchase_count_after, version_after
               FROM purchases WHERE merchant_id = $1 ORDER BY purchase_id LIMIT 20",
        )
        .bind(merchant.id.0)
        .execute(store.pool())
        .await
        .unwrap();
        let grown = purchases_per_customer(&store, &merchant).await.unwrap();
        assert_eq!(grown, HISTORY as f64 + 0.5);
        drop_database(store, options, &name).await;
    }

    /// `balance` measures cached reads only if the warmed copies are what a server caches:
    /// every customer's committed state with a standing (a never-assessed customer's initial
    /// one). A copy without one sends that customer's first read to Postgres.
    #[tokio::test]
    async fn the_warmed_cache_answers_every_customers_read_as_a_server_would() {
        let Ok(redis_url) = std::env::var("TEST_REDIS_URL") else {
            eprintln!("skipped: TEST_REDIS_URL is not set");
            return;
        };
        let Some((store, options, name)) = throwaway("warm").await else {
            return;
        };
        let merchant = bench_merchant(&store, 30, 30).await.unwrap();
        let prefix = format!("loyalty-bench-t-{}", std::process::id());
        let warmed = crate::cache::warm(&store, &redis_url, &prefix, merchant.id)
            .await
            .unwrap();
        assert_eq!((warmed.stored, warmed.failed), (30, 0));
        let accounts: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT c.external_id, a.version, a.available
               FROM customers c JOIN accounts a
                 ON a.merchant_id = c.merchant_id AND a.customer_id = c.id
              WHERE c.merchant_id = $1",
        )
        .bind(merchant.id.0)
        .fetch_all(store.pool())
        .await
        .unwrap();
        assert_eq!(accounts.len(), 30);
        let cache = crate::cache::bench_cache(&redis_url, &prefix).unwrap();
        for (external_id, version, available) in accounts {
            match cache.get(merchant.id, &external_id).await {
                loyalty::CacheRead::Hit(state) => {
                    assert_eq!((state.version, state.available), (version, available));
                    assert!(state.standing.is_some(), "{external_id} has no standing");
                }
                other => panic!("{external_id}: {other:?}"),
            }
        }
        crate::cache::clean(&redis_url, &prefix).await.unwrap();
        drop_database(store, options, &name).await;
    }

    /// The vacuum before a measurement names only tables the migrations make, and vacuums
    /// each of them.
    #[tokio::test]
    async fn the_vacuum_before_measuring_vacuums_every_bench_table() {
        let Some((store, options, name)) = throwaway("vacuum").await else {
            return;
        };
        bench_merchant(&store, 50, 50).await.unwrap();
        vacuum(&store).await.unwrap();
        let vacuumed: Vec<String> = sqlx::query_scalar(
            "SELECT relname::text FROM pg_stat_user_tables WHERE last_vacuum IS NOT NULL",
        )
        .fetch_all(store.pool())
        .await
        .unwrap();
        for table in TABLES {
            assert!(vacuumed.iter().any(|t| t == table), "{table} not vacuumed");
        }
        drop_database(store, options, &name).await;
    }

    /// Preloads into a throwaway database and checks rule 1 and the lots.
    #[tokio::test]
    async fn preload_keeps_accounts_consistent_with_their_ledger() {
        let Some((store, options, name)) = throwaway("preload").await else {
            return;
        };
        let merchant = bench_merchant(&store, 250, 100).await.unwrap();
        assert_eq!(merchant.preloaded, 250);
        let again = bench_merchant(&store, 250, 100).await.unwrap();
        assert_eq!((again.id, again.preloaded), (merchant.id, 0));
        assert_eq!(count(&store, LEDGER_MISMATCHES, merchant.id).await, 0);
        assert_eq!(count(&store, PROJECTION_MISMATCHES, merchant.id).await, 0);
        let purchases = count(
            &store,
            "SELECT count(*) FROM purchases WHERE merchant_id = $1",
            merchant.id,
        )
        .await;
        assert_eq!(purchases, 250 * i64::from(HISTORY));
        // One lot per purchase, as RecordPurchase makes it under the bench's program.
        let lots = count(
            &store,
            "SELECT count(*) FROM point_lots l JOIN purchases p
                 ON p.merchant_id = l.merchant_id AND p.purchase_id = l.source_reference
              WHERE l.merchant_id = $1 AND l.source_kind = 'earn' AND l.matured
                AND l.expires_at IS NULL AND l.remaining = p.points_earned
                AND l.points = p.points_earned AND l.customer_id = p.customer_id",
            merchant.id,
        )
        .await;
        assert_eq!(lots, purchases);
        assert_eq!(count(&store, LOT_MISMATCHES, merchant.id).await, 0);
        drop_database(store, options, &name).await;
    }

    /// A merchant an older bench preloaded (purchases without lots) gets its lots; one whose
    /// lots disagree with its accounts otherwise is refused, saying what to do.
    #[tokio::test]
    async fn purchases_preloaded_without_lots_get_them_and_other_gaps_are_refused() {
        let Some((store, options, name)) = throwaway("lots").await else {
            return;
        };
        let merchant = bench_merchant(&store, 120, 100).await.unwrap();
        // What an older preload left: the first 50 customers' purchases without lots (and,
        // from before purchases named their lot, without a lot_id).
        sqlx::query(
            "DELETE FROM point_lots l USING customers c
              WHERE l.merchant_id = $1 AND c.merchant_id = l.merchant_id
                AND c.id = l.customer_id AND c.external_id::bigint <= 50",
        )
        .bind(merchant.id.0)
        .execute(store.pool())
        .await
        .unwrap();
        sqlx::query(
            "UPDATE purchases p SET lot_id = NULL FROM customers c
              WHERE p.merchant_id = $1 AND c.merchant_id = p.merchant_id
                AND c.id = p.customer_id AND c.external_id::bigint <= 50",
        )
        .bind(merchant.id.0)
        .execute(store.pool())
        .await
        .unwrap();
        assert_eq!(count(&store, LOT_MISMATCHES, merchant.id).await, 50);
        let filled = fill_missing_lots(&store, merchant.id, "bench-120")
            .await
            .unwrap();
        assert_eq!(filled, 50);
        assert_eq!(count(&store, LOT_MISMATCHES, merchant.id).await, 0);
        assert_eq!(
            fill_missing_lots(&store, merchant.id, "bench-120")
                .await
                .unwrap(),
            0
        );
        // A gap that no purchase's lot explains.
        sqlx::query(
            "UPDATE point_lots SET remaining = remaining - 1
              WHERE merchant_id = $1 AND id = (SELECT min(id) FROM point_lots WHERE merchant_id = $1)",
        )
        .bind(merchant.id.0)
        .execute(store.pool())
        .await
        .unwrap();
        let refused = bench_merchant(&store, 120, 100).await.err().unwrap();
        let message = format!("{refused:#}");
        assert!(message.contains("Drop the bench database"), "{message}");
        drop_database(store, options, &name).await;
    }

    /// The top-up credits as an adjustment does, and the redeem ceiling (pgbench, if it is
    /// installed) spends as the service does: afterwards every account is still the
    /// projection of its ledger and its lots hold its available points.
    #[tokio::test]
    async fn top_up_and_the_redeem_ceiling_keep_every_invariant() {
        let Some((store, options, name)) = throwaway("redeem").await else {
            return;
        };
        let merchant = bench_merchant(&store, 40, 100).await.unwrap();
        let topped = top_up(&store, merchant.id, 100, "t1").await.unwrap();
        assert_eq!(
            topped.customers, 40,
            "preloaded customers hold fewer than 100"
        );
        let below = count(
            &store,
            "SELECT count(*) FROM accounts WHERE merchant_id = $1 AND available < 100",
            merchant.id,
        )
        .await;
        assert_eq!(below, 0);
        assert_eq!(count(&store, PROJECTION_MISMATCHES, merchant.id).await, 0);
        assert_eq!(count(&store, LOT_MISMATCHES, merchant.id).await, 0);
        let again = top_up(&store, merchant.id, 100, "t2").await.unwrap();
        assert_eq!((again.customers, again.points), (0, 0));

        let Ok(pgbench) = crate::pgbench::locate(None) else {
            eprintln!("skipped the redeem ceiling: pgbench is not installed");
            drop_database(store, options, &name).await;
            return;
        };
        // pgbench (libpq) takes the test's URL with this database, not sqlx's parameters.
        let admin_url = std::env::var("LOYALTY_BENCH_TEST_DATABASE_URL").unwrap();
        let (base, query) = admin_url.split_once('?').unwrap_or((&admin_url, ""));
        let server = base.rsplit_once('/').map_or(base, |(server, _)| server);
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        let url = format!("{server}/{name}{query}");
        let dir = std::env::temp_dir().join(format!("loyalty-bench-t-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let outcome = crate::pgbench::PgbenchRun {
            ceiling: crate::pgbench::Ceiling::Redeem,
            binary: &pgbench,
            database_url: &url,
            merchant: merchant.id,
            customers: 40,
            concurrency: 4,
            window: crate::load::Window {
                warmup: Duration::ZERO,
                measure: Duration::from_secs(2),
            },
            dir: &dir,
        }
        .run()
        .await
        .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let summary = outcome.recorder.summary(2.0);
        assert!(summary.ok > 0, "{:?}", summary.error_codes);
        assert_eq!(summary.errors, 0, "{:?}", summary.error_codes);
        assert_eq!(count(&store, PROJECTION_MISMATCHES, merchant.id).await, 0);
        assert_eq!(count(&store, LOT_MISMATCHES, merchant.id).await, 0);
        // Every hold was committed, once, with its RESERVE, RELEASE and REDEEM entries.
        let (held, committed): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'held'),
                    count(*) FILTER (WHERE status = 'committed')
               FROM reservations WHERE merchant_id = $1",
        )
        .bind(merchant.id.0)
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert_eq!(held, 0);
        assert!(committed as u64 >= summary.ok);
        for kind in ["reserve", "release", "redeem"] {
            let entries: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM ledger_entries WHERE merchant_id = $1 AND kind = $2",
            )
            .bind(merchant.id.0)
            .bind(kind)
            .fetch_one(store.pool())
            .await
            .unwrap();
            assert_eq!(entries, committed, "{kind} entries");
        }
        let redeemed = count(
            &store,
            "SELECT COALESCE(sum(lifetime_redeemed), 0)::bigint FROM accounts WHERE merchant_id = $1",
            merchant.id,
        )
        .await;
        assert_eq!(redeemed, committed * crate::load::REDEEM_POINTS);
        drop_database(store, options, &name).await;
    }
}
