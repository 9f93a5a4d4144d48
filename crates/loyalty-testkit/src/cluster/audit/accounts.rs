//! Each account against its ledger, its lots and the operations that moved its points, and
//! each purchase against its EARN entry, its lines and its returns.

use std::collections::HashSet;

use loyalty::MerchantId;
use sqlx::PgConnection;

use super::super::*;
use super::DatabaseAudit;

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

#[derive(sqlx::FromRow, Debug)]
struct AccountRow {
    external_id: String,
    has_account: bool,
    available: i64,
    pending: i64,
    debt: i64,
    lifetime_earned: i64,
    lifetime_redeemed: i64,
    purchase_count: i64,
    version: i64,
    ledger_total: i64,
    ledger_earned: i64,
    ledger_entries: i64,
    last_seq: i64,
    /// Σ REDEEM entries (negative) and Σ REDEEM_REFUND entries.
    ledger_redeemed: i64,
    ledger_refunded: i64,
    /// Σ RESERVE + Σ RELEASE: minus the points still held.
    ledger_held: i64,
    clawbacks: i64,
    purchases: i64,
    purchased_points: i64,
    /// Σ remaining of spendable (matured) lots, and of pending ones.
    spendable_lots: i64,
    pending_lots: i64,
    /// Points spent by operation: redemptions, committed holds, gift claims; and still held.
    redeemed: i64,
    committed_holds: i64,
    claimed: i64,
    held: i64,
}

const ACCOUNTS: &str = "
SELECT c.external_id, a.customer_id IS NOT NULL AS has_account,
       COALESCE(a.available, 0) AS available, COALESCE(a.pending, 0) AS pending,
       COALESCE(a.debt, 0) AS debt,
       COALESCE(a.lifetime_earned, 0) AS lifetime_earned,
       COALESCE(a.lifetime_redeemed, 0) AS lifetime_redeemed,
       COALESCE(a.purchase_count, 0) AS purchase_count,
       COALESCE(a.version, 0) AS version,
       COALESCE(l.total, 0)::bigint AS ledger_total,
       COALESCE(l.earned, 0)::bigint AS ledger_earned,
       COALESCE(l.entries, 0)::bigint AS ledger_entries,
       COALESCE(l.last_seq, 0)::bigint AS last_seq,
       COALESCE(l.redeemed, 0)::bigint AS ledger_redeemed,
       COALESCE(l.refunded, 0)::bigint AS ledger_refunded,
       COALESCE(l.held, 0)::bigint AS ledger_held,
       COALESCE(l.clawbacks, 0)::bigint AS clawbacks,
       COALESCE(p.n, 0)::bigint AS purchases,
       COALESCE(p.points, 0)::bigint AS purchased_points,
       COALESCE(lots.spendable, 0)::bigint AS spendable_lots,
       COALESCE(lots.pending, 0)::bigint AS pending_lots,
       COALESCE(r.points, 0)::bigint AS redeemed,
       COALESCE(h.committed, 0)::bigint AS committed_holds,
       COALESCE(h.held, 0)::bigint AS held,
       COALESCE(g.points, 0)::bigint AS claimed
  FROM customers c
  LEFT JOIN accounts a ON a.merchant_id = c.merchant_id AND a.customer_id = c.id
  LEFT JOIN (SELECT customer_id, sum(points) AS total,
                    sum(points) FILTER (WHERE kind = 'earn') AS earned,
                    sum(points) FILTER (WHERE kind = 'redeem') AS redeemed,
                    sum(points) FILTER (WHERE kind = 'redeem_refund') AS refunded,
                    sum(points) FILTER (WHERE kind IN ('reserve', 'release')) AS held,
                    count(*) FILTER (WHERE kind = 'return_clawback') AS clawbacks,
                    count(*) AS entries, max(seq) AS last_seq
               FROM ledger_entries WHERE merchant_id = $1 GROUP BY customer_id) l
         ON l.customer_id = c.id
  LEFT JOIN (SELECT customer_id, count(*) AS n, sum(points_earned) AS points
               FROM purchases WHERE merchant_id = $1 GROUP BY customer_id) p
         ON p.customer_id = c.id
  LEFT JOIN (SELECT customer_id, sum(remaining) FILTER (WHERE matured) AS spendable,
                    sum(remaining) FILTER (WHERE NOT matured) AS pending
               FROM point_lots WHERE merchant_id = $1 GROUP BY customer_id) lots
         ON lots.customer_id = c.id
  LEFT JOIN (SELECT customer_id, sum(points) AS points
               FROM redemptions WHERE merchant_id = $1 GROUP BY customer_id) r
         ON r.customer_id = c.id
  LEFT JOIN (SELECT customer_id, sum(points) FILTER (WHERE status = 'committed') AS committed,
                    sum(points) FILTER (WHERE status = 'held') AS held
               FROM reservations WHERE merchant_id = $1 GROUP BY customer_id) h
         ON h.customer_id = c.id
  LEFT JOIN (SELECT customer_id, sum(points) AS points
               FROM gift_claims WHERE merchant_id = $1 GROUP BY customer_id) g
         ON g.customer_id = c.id
 WHERE c.merchant_id = $1
 ORDER BY c.external_id";

/// Accounts against their ledger, lots and spending; then the purchases.
pub(super) async fn check(
    conn: &mut PgConnection,
    merchant: MerchantId,
    record: &Record,
    found: &mut DatabaseAudit,
) {
    let accounts: Vec<AccountRow> = sqlx::query_as(ACCOUNTS)
        .bind(merchant.0)
        .fetch_all(&mut *conn)
        .await
        .expect("audit: accounts");
    found.customers = accounts.len();
    let v = &mut found.violations;
    for a in &accounts {
        let who = &a.external_id;
        found.ledger_entries += a.ledger_entries;
        if !a.has_account {
            v.push(format!("{who}: a customer without an account"));
            continue;
        }
        // Rule 1.
        if a.available + a.pending != a.ledger_total {
            v.push(format!(
                "{who}: available {} + pending {} != Σ ledger {}",
                a.available, a.pending, a.ledger_total
            ));
        }
        // Rule 2: only a return's clawback may take available below zero, and what it took
        // beyond the balance is the debt, exactly.
        if a.available + a.debt < 0 || a.debt != (-a.available).max(0) || a.pending < 0 {
            v.push(format!(
                "{who}: overdraft: available {}, debt {}, pending {}",
                a.available, a.debt, a.pending
            ));
        }
        if a.available < 0 && a.clawbacks == 0 {
            v.push(format!(
                "{who}: available {} below zero without any return's clawback",
                a.available
            ));
        }
        if a.debt > 0 {
            found.accounts_in_debt += 1;
            found.debt_total += a.debt;
        }
        // The lots: held points have left them, so they hold what is available (none while
        // in debt) and what is pending.
        if a.spendable_lots != a.available.max(0) || a.pending_lots != a.pending {
            v.push(format!(
                "{who}: lots hold {} spendable and {} pending points, the account {} available \
                 and {} pending",
                a.spendable_lots, a.pending_lots, a.available, a.pending
            ));
        }
        // Spending: every REDEEM entry is a redemption, a committed hold or a gift claim;
        // what is reserved and not released is exactly what is still held.
        let spent = a.redeemed + a.committed_holds + a.claimed;
        if -a.ledger_redeemed != spent {
            v.push(format!(
                "{who}: REDEEM entries take {} points; redemptions {}, committed holds {} and \
                 gift claims {} took {spent}",
                -a.ledger_redeemed, a.redeemed, a.committed_holds, a.claimed
            ));
        }
        if -a.ledger_held != a.held {
            v.push(format!(
                "{who}: RESERVE and RELEASE entries hold {} points, the open holds {}",
                -a.ledger_held, a.held
            ));
        }
        if a.lifetime_redeemed != -a.ledger_redeemed - a.ledger_refunded {
            v.push(format!(
                "{who}: lifetime_redeemed {} is not Σ REDEEM {} less Σ REDEEM_REFUND {}",
                a.lifetime_redeemed, -a.ledger_redeemed, a.ledger_refunded
            ));
        }
        if a.purchase_count != a.purchases
            || a.lifetime_earned != a.ledger_earned
            || a.lifetime_earned != a.purchased_points
            || a.version < a.last_seq
        {
            v.push(format!(
                "{who}: the account is not the projection of its purchases: {a:?}"
            ));
        }
        found.committed.insert(
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
        if !found.committed.contains_key(customer) {
            found
                .violations
                .push(format!("{customer}: acknowledged, but not stored"));
        }
    }
    let kinds: Vec<(String, i64)> = sqlx::query_as(
        "SELECT kind, count(*) FROM ledger_entries WHERE merchant_id = $1 GROUP BY kind",
    )
    .bind(merchant.0)
    .fetch_all(&mut *conn)
    .await
    .expect("audit: entry kinds");
    found.ledger_entries_by_kind = kinds.into_iter().collect();
    check_purchases(conn, merchant, record, found).await;
}

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
    returned_minor: i64,
    points_clawed_back: i64,
    redeemed_refunded: i64,
    lines_returned: i64,
    returns_returned: i64,
    /// Σ over its returns of what each answered as taken back (clawed back + written off).
    returns_taken_back: i64,
    refund_entries: i64,
    /// Points spent on it: redemptions and committed holds that named it.
    spent_on_it: i64,
}

// The earn entries are matched to purchases in one hash join: they have no index by
// reference (the purchase's primary key is what keeps them unique, see record_purchase.sql).
const PURCHASES: &str = "
WITH earn AS (
    SELECT p.purchase_id, count(*) AS entries, sum(e.points)::bigint AS points,
           count(*) FILTER (WHERE e.customer_id <> p.customer_id) AS other_customer
      FROM ledger_entries e
      JOIN purchases p ON p.merchant_id = e.merchant_id AND p.purchase_id = e.reference
     WHERE e.merchant_id = $1 AND e.kind = 'earn'
     GROUP BY p.purchase_id
)
SELECT p.purchase_id, c.external_id, p.points_earned, p.version_after, p.total_minor,
       p.returned_minor, p.points_clawed_back, p.redeemed_refunded,
       COALESCE(earn.entries, 0)::bigint AS earn_entries,
       COALESCE(earn.points, 0)::bigint AS earn_points,
       COALESCE(earn.other_customer, 0)::bigint AS earn_other_customer,
       (SELECT count(*) FROM purchase_lines l WHERE l.merchant_id = p.merchant_id
           AND l.purchase_id = p.purchase_id) AS lines,
       (SELECT COALESCE(sum(l.amount_minor), 0)::bigint FROM purchase_lines l
         WHERE l.merchant_id = p.merchant_id AND l.purchase_id = p.purchase_id) AS lines_total,
       (SELECT COALESCE(sum(l.returned_minor), 0)::bigint FROM purchase_lines l
         WHERE l.merchant_id = p.merchant_id AND l.purchase_id = p.purchase_id)
           AS lines_returned,
       (SELECT COALESCE(sum(r.returned_minor), 0)::bigint FROM purchase_returns r
         WHERE r.merchant_id = p.merchant_id AND r.purchase_id = p.purchase_id)
           AS returns_returned,
       (SELECT COALESCE(sum((r.answer->>'points_clawed_back')::bigint
                            + (r.answer->>'points_written_off')::bigint), 0)::bigint
          FROM purchase_returns r
         WHERE r.merchant_id = p.merchant_id AND r.purchase_id = p.purchase_id)
           AS returns_taken_back,
       (SELECT COALESCE(sum(e.points), 0)::bigint
          FROM purchase_returns r
          JOIN ledger_entries e ON e.merchant_id = r.merchant_id
                               AND e.customer_id = r.customer_id
                               AND e.kind = 'redeem_refund' AND e.reference = r.return_id
         WHERE r.merchant_id = p.merchant_id AND r.purchase_id = p.purchase_id)
           AS refund_entries,
       ((SELECT COALESCE(sum(x.points), 0) FROM redemptions x
          WHERE x.merchant_id = p.merchant_id AND x.purchase_id = p.purchase_id)
        + (SELECT COALESCE(sum(x.points), 0) FROM reservations x
            WHERE x.merchant_id = p.merchant_id AND x.purchase_id = p.purchase_id
              AND x.status = 'committed'))::bigint AS spent_on_it
  FROM purchases p
  JOIN customers c ON c.merchant_id = p.merchant_id AND c.id = p.customer_id
  LEFT JOIN earn ON earn.purchase_id = p.purchase_id
 WHERE p.merchant_id = $1";

/// Purchases against their EARN entries, lines, returns and what the clients were told.
async fn check_purchases(
    conn: &mut PgConnection,
    merchant: MerchantId,
    record: &Record,
    found: &mut DatabaseAudit,
) {
    let purchases: Vec<PurchaseRow> = sqlx::query_as(PURCHASES)
        .bind(merchant.0)
        .fetch_all(&mut *conn)
        .await
        .expect("audit: purchases");
    found.purchases = purchases.len();
    let v = &mut found.violations;
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
        // Its returns: what they returned adds up on the purchase and its lines, never more
        // than was bought, and what they took back never more than it earned (exactly that
        // once all of it is back). Refunds of points spent on it: never more than was spent.
        if p.returned_minor != p.returns_returned
            || (p.lines > 0 && p.returned_minor != p.lines_returned)
            || p.returned_minor > p.total_minor
        {
            v.push(format!(
                "{id}: returned {} of {}, its returns say {}, its lines {}",
                p.returned_minor, p.total_minor, p.returns_returned, p.lines_returned
            ));
        }
        let fully_returned = p.returned_minor == p.total_minor;
        if fully_returned {
            found.purchases_fully_returned += 1;
        }
        if p.points_clawed_back != p.returns_taken_back
            || p.points_clawed_back > p.points_earned
            || (fully_returned && p.points_clawed_back != p.points_earned)
        {
            v.push(format!(
                "{id}: earned {}, took back {} ({} returned of {}), its returns answered {}",
                p.points_earned,
                p.points_clawed_back,
                p.returned_minor,
                p.total_minor,
                p.returns_taken_back
            ));
        }
        if p.redeemed_refunded != p.refund_entries || p.redeemed_refunded > p.spent_on_it {
            v.push(format!(
                "{id}: refunded {} of the {} points spent on it; REDEEM_REFUND entries {}",
                p.redeemed_refunded, p.spent_on_it, p.refund_entries
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
            None if record.gave_up_on(WriteKind::Purchase, id) => {
                found.unacknowledged_purchases += 1
            }
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
    .bind(merchant.0)
    .fetch_one(&mut *conn)
    .await
    .expect("audit: orphans");
    if orphans != 0 {
        v.push(format!("{orphans} earn entries without a purchase"));
    }
}
