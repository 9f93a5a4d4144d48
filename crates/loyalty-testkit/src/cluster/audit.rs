//! The audit every scenario ends with: committed state against acknowledged writes, the
//! ledger identity, and the cache against the truth.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use loyalty::pb;

use super::*;

// ---------------------------------------------------------------------------------------------
// The audit.

/// The committed state of one customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub available: i64,
    pub pending: i64,
    pub lifetime_earned: i64,
    pub lifetime_redeemed: i64,
    pub purchase_count: i64,
    pub version: i64,
}

/// What the audit found.
#[derive(Debug, Default)]
pub struct Audit {
    pub customers: usize,
    pub purchases: usize,
    pub ledger_entries: i64,
    /// Purchases stored although no client was told they were (given up); 0 or 1 effect each.
    pub unacknowledged_purchases: usize,
    /// How long the cache took to hold only committed states (or nothing) per customer.
    pub cache_converged_after: Option<Duration>,
    pub cache_entries: usize,
    pub violations: Vec<String>,
}

/// The audit every scenario ends with, once the load has stopped. For every customer of the
/// merchant:
///
/// * `available + pending == Σ ledger points` (rule 1), `available >= 0` and `pending >= 0`
///   (rule 2: no clawbacks exist yet, so nothing may be negative);
/// * every acknowledged purchase has exactly one purchase row (for the acknowledged customer,
///   points and version) and exactly one `earn` entry with the acknowledged points (rule 3); no
///   `earn` entry lacks its purchase; no purchase was stored that no client was told about
///   (unless its client gave up); each purchase's lines add up to its total;
/// * the account is the projection of exactly its purchases: purchase_count and
///   lifetime_earned match them (one effect each);
/// * the cache holds, within `cache_within`, either nothing or exactly the committed state
///   (rules 7 and 9), and a fresh `GetBalance` shows the committed state.
pub async fn audit(cluster: &Cluster, record: &Record, cache_within: Duration) -> Audit {
    let pool = cluster.pool().await;
    let merchant = cluster.merchant.0;
    let mut audit = Audit {
        violations: record.violations.clone(),
        ..Audit::default()
    };
    let v = &mut audit.violations;
    if !record.gave_up.is_empty() {
        v.push(format!(
            "{} requests never completed (retries gave up): {:?}",
            record.gave_up.len(),
            &record.gave_up[..record.gave_up.len().min(10)]
        ));
    }

    // Accounts against their ledger and purchases.
    #[derive(sqlx::FromRow, Debug)]
    struct AccountRow {
        external_id: String,
        has_account: bool,
        available: i64,
        pending: i64,
        lifetime_earned: i64,
        lifetime_redeemed: i64,
        purchase_count: i64,
        version: i64,
        ledger_total: i64,
        ledger_earned: i64,
        ledger_entries: i64,
        other_entries: i64,
        purchases: i64,
        purchased_points: i64,
    }
    let accounts: Vec<AccountRow> = sqlx::query_as(
        "SELECT c.external_id, a.customer_id IS NOT NULL AS has_account,
                COALESCE(a.available, 0) AS available, COALESCE(a.pending, 0) AS pending,
                COALESCE(a.lifetime_earned, 0) AS lifetime_earned,
                COALESCE(a.lifetime_redeemed, 0) AS lifetime_redeemed,
                COALESCE(a.purchase_count, 0) AS purchase_count,
                COALESCE(a.version, 0) AS version,
                COALESCE(l.total, 0)::bigint AS ledger_total,
                COALESCE(l.earned, 0)::bigint AS ledger_earned,
                COALESCE(l.entries, 0)::bigint AS ledger_entries,
                COALESCE(l.other, 0)::bigint AS other_entries,
                COALESCE(p.n, 0)::bigint AS purchases,
                COALESCE(p.points, 0)::bigint AS purchased_points
           FROM customers c
           LEFT JOIN accounts a ON a.merchant_id = c.merchant_id AND a.customer_id = c.id
           LEFT JOIN (SELECT customer_id, sum(points) AS total,
                             sum(points) FILTER (WHERE kind = 'earn') AS earned,
                             count(*) AS entries,
                             count(*) FILTER (WHERE kind <> 'earn') AS other
                        FROM ledger_entries WHERE merchant_id = $1 GROUP BY customer_id) l
                  ON l.customer_id = c.id
           LEFT JOIN (SELECT customer_id, count(*) AS n, sum(points_earned) AS points
                        FROM purchases WHERE merchant_id = $1 GROUP BY customer_id) p
                  ON p.customer_id = c.id
          WHERE c.merchant_id = $1
          ORDER BY c.external_id",
    )
    .bind(merchant)
    .fetch_all(&pool)
    .await
    .expect("audit: accounts");
    audit.customers = accounts.len();
    let mut committed: HashMap<String, Committed> = HashMap::new();
    for a in &accounts {
        let who = &a.external_id;
        audit.ledger_entries += a.ledger_entries;
        if !a.has_account {
            v.push(format!("{who}: a customer without an account"));
            continue;
        }
        if a.available + a.pending != a.ledger_total {
            v.push(format!(
                "{who}: available {} + pending {} != Σ ledger {}",
                a.available, a.pending, a.ledger_total
            ));
        }
        // Rule 2. When returns exist: negative only with a return_clawback entry.
        if a.available < 0 || a.pending < 0 {
            v.push(format!(
                "{who}: overdraft: available {}, pending {}",
                a.available, a.pending
            ));
        }
        // Only earning exists today. Redeem, Return and Reserve add their entry kinds here:
        // one entry per client key, lifetime_redeemed == -Σ redeem entries, and every
        // reservation either committed or released exactly once (rule 4).
        if a.other_entries != 0 {
            v.push(format!(
                "{who}: {} ledger entries of kinds no RPC writes yet",
                a.other_entries
            ));
        }
        if a.purchase_count != a.purchases
            || a.lifetime_earned != a.ledger_earned
            || a.lifetime_earned != a.purchased_points
            || a.lifetime_redeemed != 0
            || a.version < a.purchase_count
        {
            v.push(format!(
                "{who}: the account is not the projection of its purchases: {a:?}"
            ));
        }
        committed.insert(
            who.clone(),
            Committed {
                available: a.available,
                pending: a.pending,
                lifetime_earned: a.lifetime_earned,
                lifetime_redeemed: a.lifetime_redeemed,
                purchase_count: a.purchase_count,
                version: a.version,
            },
        );
    }
    for customer in &record.customers {
        if !committed.contains_key(customer) {
            v.push(format!("{customer}: acknowledged, but not stored"));
        }
    }

    // Purchases against their earn entries and lines.
    #[derive(sqlx::FromRow)]
    struct PurchaseRow {
        purchase_id: String,
        external_id: String,
        points_earned: i64,
        version_after: i64,
        total_minor: i64,
        earn_entries: i64,
        earn_points: i64,
        earn_other_customer: i64,
        lines: i64,
        lines_total: i64,
    }
    let purchases: Vec<PurchaseRow> = sqlx::query_as(
        "SELECT p.purchase_id, c.external_id, p.points_earned, p.version_after, p.total_minor,
                (SELECT count(*) FROM ledger_entries e WHERE e.merchant_id = p.merchant_id
                    AND e.kind = 'earn' AND e.reference = p.purchase_id) AS earn_entries,
                (SELECT COALESCE(sum(e.points), 0)::bigint FROM ledger_entries e
                  WHERE e.merchant_id = p.merchant_id AND e.kind = 'earn'
                    AND e.reference = p.purchase_id) AS earn_points,
                (SELECT count(*) FROM ledger_entries e WHERE e.merchant_id = p.merchant_id
                    AND e.kind = 'earn' AND e.reference = p.purchase_id
                    AND e.customer_id <> p.customer_id) AS earn_other_customer,
                (SELECT count(*) FROM purchase_lines l WHERE l.merchant_id = p.merchant_id
                    AND l.purchase_id = p.purchase_id) AS lines,
                (SELECT COALESCE(sum(l.amount_minor), 0)::bigint FROM purchase_lines l
                  WHERE l.merchant_id = p.merchant_id AND l.purchase_id = p.purchase_id)
                    AS lines_total
           FROM purchases p
           JOIN customers c ON c.merchant_id = p.merchant_id AND c.id = p.customer_id
          WHERE p.merchant_id = $1",
    )
    .bind(merchant)
    .fetch_all(&pool)
    .await
    .expect("audit: purchases");
    audit.purchases = purchases.len();
    let gave_up: HashSet<&String> = record.gave_up.iter().collect();
    let mut stored = HashSet::new();
    for p in &purchases {
        let id = &p.purchase_id;
        stored.insert(id.clone());
        if p.earn_entries != 1 || p.earn_points != p.points_earned || p.earn_other_customer != 0 {
            v.push(format!(
                "{id}: {} earn entries worth {} (other customer: {}) for {} points",
                p.earn_entries, p.earn_points, p.earn_other_customer, p.points_earned
            ));
        }
        if p.lines == 0 || p.lines_total != p.total_minor {
            v.push(format!(
                "{id}: half written: {} lines worth {} of {}",
                p.lines, p.lines_total, p.total_minor
            ));
        }
        match record.acknowledged.get(id) {
            Some(ack) => {
                let balance = ack.response.balance.unwrap_or_default();
                if ack.external_id != p.external_id
                    || ack.response.points_earned != p.points_earned
                    || balance.version != p.version_after
                {
                    v.push(format!(
                        "{id}: acknowledged ({}, {} points, v{}), stored ({}, {} points, v{})",
                        ack.external_id,
                        ack.response.points_earned,
                        balance.version,
                        p.external_id,
                        p.points_earned,
                        p.version_after
                    ));
                }
            }
            None if gave_up.contains(id) => audit.unacknowledged_purchases += 1,
            None => v.push(format!("{id}: stored, but no client was ever told")),
        }
    }
    for id in record.acknowledged.keys() {
        if !stored.contains(id) {
            v.push(format!("{id}: acknowledged, but lost"));
        }
    }
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_entries e
          WHERE e.merchant_id = $1 AND e.kind = 'earn'
            AND NOT EXISTS (SELECT 1 FROM purchases p
                             WHERE p.merchant_id = e.merchant_id AND p.purchase_id = e.reference)",
    )
    .bind(merchant)
    .fetch_one(&pool)
    .await
    .expect("audit: orphans");
    if orphans != 0 {
        v.push(format!("{orphans} earn entries without a purchase"));
    }
    pool.close().await;

    // The cache converges: every entry absent or exactly the committed state.
    let mut redis = cluster.redis.connection().await;
    let started = Instant::now();
    let mut stale = loop {
        let stale = stale_cache_entries(cluster, &mut redis, &committed).await;
        if stale.is_empty() {
            audit.cache_converged_after = Some(started.elapsed());
            break stale;
        }
        if started.elapsed() > cache_within {
            break stale;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    v.append(&mut stale);

    // What customers are shown: a fresh GetBalance equals Postgres. Then the cache, which
    // those reads refilled, must hold exactly the committed state.
    let mut client = cluster.client(&Record::shared(), Duration::from_secs(5));
    for (customer, state) in &committed {
        let call = Call::Balance(pb::GetBalanceRequest {
            external_id: customer.clone(),
            min_version: 0,
        });
        match client
            .call(&call, Instant::now() + Duration::from_secs(10))
            .await
        {
            Ok(Reply::Balance(reply)) => {
                let b = reply.balance.unwrap_or_default();
                let shown = Committed {
                    available: b.available,
                    pending: b.pending,
                    lifetime_earned: b.lifetime_earned,
                    lifetime_redeemed: b.lifetime_redeemed,
                    purchase_count: reply.purchase_count,
                    version: b.version,
                };
                if shown != *state {
                    v.push(format!(
                        "{customer}: GetBalance shows {shown:?}, committed {state:?}"
                    ));
                }
            }
            other => v.push(format!("{customer}: GetBalance failed: {other:?}")),
        }
    }
    let mut stale = stale_cache_entries(cluster, &mut redis, &committed).await;
    v.append(&mut stale);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", cluster.key_prefix))
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    audit.cache_entries = keys.len();
    audit
}

/// Customers whose cache entry exists and differs from the committed state.
async fn stale_cache_entries(
    cluster: &Cluster,
    redis: &mut redis::aio::MultiplexedConnection,
    committed: &HashMap<String, Committed>,
) -> Vec<String> {
    let mut stale = Vec::new();
    for (customer, state) in committed {
        let key = cluster.cache_key(redis, customer).await;
        let fields: HashMap<String, i64> =
            match redis::cmd("HGETALL").arg(key).query_async(redis).await {
                Ok(fields) => fields,
                Err(e) => {
                    stale.push(format!("{customer}: cache unreadable: {e}"));
                    continue;
                }
            };
        if fields.is_empty() {
            continue;
        }
        let field = |name: &str| fields.get(name).copied();
        let cached = (
            field("v"),
            field("a"),
            field("p"),
            field("le"),
            field("lr"),
            field("pc"),
        );
        let expected = (
            Some(state.version),
            Some(state.available),
            Some(state.pending),
            Some(state.lifetime_earned),
            Some(state.lifetime_redeemed),
            Some(state.purchase_count),
        );
        if cached != expected {
            stale.push(format!(
                "{customer}: cache holds (v, a, p, le, lr, pc) = {cached:?}, committed {expected:?}"
            ));
        }
    }
    stale.sort();
    stale
}

/// The figures every scenario reports, plus its own.
pub fn figures(
    record: &Record,
    audit: &Audit,
    ran: Duration,
    extra: serde_json::Value,
) -> serde_json::Value {
    let acknowledged = record.acknowledged.len();
    let mut value = serde_json::json!({
        "load_seconds": (ran.as_secs_f64() * 10.0).round() / 10.0,
        "requests": record.attempts,
        "retries": record.retries,
        "replays": record.replays,
        "reads": record.reads,
        "failed_attempts": record.failed_attempts(),
        "failed_attempts_by_code": record.failures,
        "max_failed_call_ms": record.max_failed_latency.as_millis() as u64,
        "max_call_ms": record.max_latency.as_millis() as u64,
        "acknowledged_purchases": acknowledged,
        "acknowledged_writes": record.write_acks.len(),
        "acknowledged_writes_per_second": (record.write_acks.len() as f64 / ran.as_secs_f64().max(0.001)).round(),
        "gave_up": record.gave_up.len(),
        "customers": audit.customers,
        "purchases_stored": audit.purchases,
        "ledger_entries": audit.ledger_entries,
        "cache_entries": audit.cache_entries,
        "cache_converged_ms": audit.cache_converged_after.map(|d| d.as_millis() as u64),
        "violations": audit.violations.len(),
        "violation_samples": &audit.violations[..audit.violations.len().min(5)],
    });
    if let (Some(map), Some(more)) = (value.as_object_mut(), extra.as_object()) {
        for (k, v) in more {
            map.insert(k.clone(), v.clone());
        }
    }
    value
}
