//! Redemptions, holds and returns: each stored once, with the ledger entries of its kind and
//! the answer its client was told; nothing stored that no client was told about.

use std::collections::HashSet;
use std::time::Duration;

use loyalty::{MerchantId, pb};
use sqlx::PgConnection;

use super::super::*;
use super::DatabaseAudit;

pub(super) async fn check(
    conn: &mut PgConnection,
    merchant: MerchantId,
    record: &Record,
    hold_release_slack: Duration,
    found: &mut DatabaseAudit,
) {
    check_redemptions(conn, merchant, record, found).await;
    check_holds(conn, merchant, record, hold_release_slack, found).await;
    check_returns(conn, merchant, record, found).await;
}

#[derive(sqlx::FromRow)]
struct RedemptionRow {
    redemption_id: String,
    external_id: String,
    points: i64,
    discount_minor: i64,
    version: i64,
    entries: i64,
    matching_entries: i64,
}

async fn check_redemptions(
    conn: &mut PgConnection,
    merchant: MerchantId,
    record: &Record,
    found: &mut DatabaseAudit,
) {
    let rows: Vec<RedemptionRow> = sqlx::query_as(
        "SELECT r.redemption_id, c.external_id, r.points, r.discount_minor,
                (r.answer->'account'->>'version')::bigint AS version,
                (SELECT count(*) FROM ledger_entries e
                  WHERE e.merchant_id = r.merchant_id AND e.customer_id = r.customer_id
                    AND e.kind = 'redeem' AND e.reference = r.redemption_id) AS entries,
                (SELECT count(*) FROM ledger_entries e
                  WHERE e.merchant_id = r.merchant_id AND e.customer_id = r.customer_id
                    AND e.kind = 'redeem' AND e.reference = r.redemption_id
                    AND e.points = -r.points
                    AND e.seq = (r.answer->'account'->>'version')::bigint) AS matching_entries
           FROM redemptions r
           JOIN customers c ON c.merchant_id = r.merchant_id AND c.id = r.customer_id
          WHERE r.merchant_id = $1",
    )
    .bind(merchant.0)
    .fetch_all(&mut *conn)
    .await
    .expect("audit: redemptions");
    found.redemptions = rows.len();
    let v = &mut found.violations;
    let mut stored = HashSet::new();
    for r in &rows {
        let id = &r.redemption_id;
        stored.insert(id.as_str());
        if r.entries != 1 || r.matching_entries != 1 {
            v.push(format!(
                "redemption {id} of {} points: {} REDEEM entries, {} of them of its points at \
                 its version {}",
                r.points, r.entries, r.matching_entries, r.version
            ));
        }
        match record.redemptions.get(id) {
            Some(ack) => {
                let told = &ack.response;
                let version = told.balance.map_or(0, |b| b.version);
                if ack.request.external_id != r.external_id
                    || told.points != r.points
                    || told.discount_minor != r.discount_minor
                    || version != r.version
                {
                    v.push(format!(
                        "redemption {id}: told {} points for {} off at v{version} to {}, stored \
                         {} for {} at v{} of {}",
                        told.points,
                        told.discount_minor,
                        ack.request.external_id,
                        r.points,
                        r.discount_minor,
                        r.version,
                        r.external_id
                    ));
                }
            }
            None => v.extend(super::unacknowledged(record, WriteKind::Redemption, id)),
        }
    }
    for id in record.redemptions.keys() {
        if !stored.contains(id.as_str()) {
            v.push(format!("redemption {id}: acknowledged, but lost"));
        }
    }
}

#[derive(sqlx::FromRow)]
struct HoldRow {
    reservation_id: String,
    external_id: String,
    points: i64,
    discount_minor: i64,
    status: String,
    hold_seq: i64,
    expires_at_seconds: i64,
    held_version: i64,
    settled_status: Option<String>,
    settled_version: Option<i64>,
    settled_after_expiry_ms: Option<i64>,
    overdue: bool,
    reserve_entries: i64,
    matching_reserve: i64,
    release_entries: i64,
    matching_release: i64,
    redeem_entries: i64,
    commit_entries: i64,
}

const HOLDS: &str = "
SELECT r.reservation_id, c.external_id, r.points, r.discount_minor, r.status, r.hold_seq,
       floor(extract(epoch FROM r.expires_at))::bigint AS expires_at_seconds,
       (r.answer->'account'->>'version')::bigint AS held_version,
       r.settled_answer->>'status' AS settled_status,
       (r.settled_answer->'account'->>'version')::bigint AS settled_version,
       (extract(epoch FROM r.settled_at - r.expires_at) * 1000)::bigint
           AS settled_after_expiry_ms,
       (r.status = 'held' AND r.expires_at < now() - make_interval(secs => $2)) AS overdue,
       (SELECT count(*) FROM ledger_entries e
         WHERE e.merchant_id = r.merchant_id AND e.customer_id = r.customer_id
           AND e.kind = 'reserve' AND e.reference = r.reservation_id) AS reserve_entries,
       (SELECT count(*) FROM ledger_entries e
         WHERE e.merchant_id = r.merchant_id AND e.customer_id = r.customer_id
           AND e.kind = 'reserve' AND e.reference = r.reservation_id
           AND e.points = -r.points AND e.seq = r.hold_seq) AS matching_reserve,
       (SELECT count(*) FROM ledger_entries e
         WHERE e.merchant_id = r.merchant_id AND e.customer_id = r.customer_id
           AND e.kind = 'release' AND e.reference = r.reservation_id) AS release_entries,
       (SELECT count(*) FROM ledger_entries e
         WHERE e.merchant_id = r.merchant_id AND e.customer_id = r.customer_id
           AND e.kind = 'release' AND e.reference = r.reservation_id
           AND e.points = r.points) AS matching_release,
       (SELECT count(*) FROM ledger_entries e
         WHERE e.merchant_id = r.merchant_id AND e.customer_id = r.customer_id
           AND e.kind = 'redeem' AND e.reference = r.reservation_id) AS redeem_entries,
       -- A commit is a RELEASE followed at once (the next seq) by a REDEEM of the hold.
       (SELECT count(*) FROM ledger_entries e
          JOIN ledger_entries x ON x.merchant_id = e.merchant_id
                               AND x.customer_id = e.customer_id AND x.seq = e.seq + 1
                               AND x.kind = 'redeem' AND x.reference = e.reference
                               AND x.points = -r.points
         WHERE e.merchant_id = r.merchant_id AND e.customer_id = r.customer_id
           AND e.kind = 'release' AND e.reference = r.reservation_id) AS commit_entries
  FROM reservations r
  JOIN customers c ON c.merchant_id = r.merchant_id AND c.id = r.customer_id
 WHERE r.merchant_id = $1";

/// The status a settlement answer names, as stored.
fn status_name(status: pb::ReservationStatus) -> &'static str {
    match status {
        pb::ReservationStatus::Held => "held",
        pb::ReservationStatus::Committed => "committed",
        pb::ReservationStatus::Released => "released",
        pb::ReservationStatus::Expired => "expired",
        pb::ReservationStatus::Unspecified => "unspecified",
    }
}

/// Rule 4: every hold committed XOR released (or expired), once, its ledger entries saying
/// the same, what its clients were told, and none left held past its ttl and the slack.
async fn check_holds(
    conn: &mut PgConnection,
    merchant: MerchantId,
    record: &Record,
    slack: Duration,
    found: &mut DatabaseAudit,
) {
    let rows: Vec<HoldRow> = sqlx::query_as(HOLDS)
        .bind(merchant.0)
        .bind(slack.as_secs_f64())
        .fetch_all(&mut *conn)
        .await
        .expect("audit: holds");
    let v = &mut found.violations;
    let mut stored = HashSet::new();
    for h in &rows {
        let id = &h.reservation_id;
        stored.insert(id.as_str());
        *found.holds.entry(h.status.clone()).or_default() += 1;
        if h.reserve_entries != 1 || h.matching_reserve != 1 {
            v.push(format!(
                "hold {id} of {} points: {} RESERVE entries, {} of its points at seq {}",
                h.points, h.reserve_entries, h.matching_reserve, h.hold_seq
            ));
        }
        // What the ledger must say for each status: (RELEASE entries, REDEEM entries).
        let expected = match h.status.as_str() {
            "held" => (0, 0),
            "committed" => (1, 1),
            _ => (1, 0),
        };
        let entries = (h.release_entries, h.redeem_entries);
        if entries != expected
            || h.matching_release != h.release_entries
            || h.commit_entries != h.redeem_entries
        {
            v.push(format!(
                "hold {id} is {}, but has {} RELEASE entries ({} of its points) and {} REDEEM \
                 entries ({} right after its release): settled {} times",
                h.status,
                h.release_entries,
                h.matching_release,
                h.redeem_entries,
                h.commit_entries,
                h.release_entries.max(h.redeem_entries)
            ));
        }
        let settled_as = h.settled_status.as_deref();
        if (h.status == "held") != settled_as.is_none() || settled_as.is_some_and(|s| s != h.status)
        {
            v.push(format!(
                "hold {id} is {} but its stored settlement says {settled_as:?}",
                h.status
            ));
        }
        if h.overdue {
            v.push(format!(
                "hold {id} is still held more than {slack:?} after its expiry"
            ));
        }
        if h.status == "expired"
            && let Some(ms) = h.settled_after_expiry_ms
        {
            let delay = Duration::from_millis(ms.max(0) as u64);
            found.max_hold_release_delay = found.max_hold_release_delay.max(Some(delay));
            if delay > slack {
                v.push(format!(
                    "hold {id} was released by the sweep {delay:?} after its expiry (slack \
                     {slack:?})"
                ));
            }
        }
        let Some(ack) = record.holds.get(id) else {
            v.extend(super::unacknowledged(record, WriteKind::Hold, id));
            continue;
        };
        let told = &ack.response;
        let version = told.balance.map_or(0, |b| b.version);
        let expires = told.expires_at.map_or(0, |t| t.seconds);
        if ack.request.external_id != h.external_id
            || told.points != h.points
            || told.discount_minor != h.discount_minor
            || version != h.held_version
            || expires != h.expires_at_seconds
        {
            v.push(format!(
                "hold {id}: told {} points for {} off at v{version} until {expires}, stored {} \
                 for {} at v{} until {}",
                told.points,
                told.discount_minor,
                h.points,
                h.discount_minor,
                h.held_version,
                h.expires_at_seconds
            ));
        }
        for (what, settled) in [("commit", &ack.commit), ("release", &ack.release)] {
            let Some(settled) = settled else { continue };
            let told_status = status_name(settled.status());
            let told_version = settled.balance.map_or(0, |b| b.version);
            if told_status != h.status || Some(told_version) != h.settled_version {
                v.push(format!(
                    "hold {id}: its {what} was told {told_status} at v{told_version}, stored \
                     {} at v{:?}",
                    h.status, h.settled_version
                ));
            }
        }
        if let Some(code) = record.refusal(WriteKind::Commit, id)
            && h.status == "committed"
        {
            v.push(format!(
                "hold {id}: committed, although a commit was refused ({code:?})"
            ));
        }
        if let Some(code) = record.refusal(WriteKind::Release, id)
            && h.status != "committed"
        {
            v.push(format!(
                "hold {id}: a release was refused ({code:?}), but it is {}",
                h.status
            ));
        }
    }
    for id in record.holds.keys() {
        if !stored.contains(id.as_str()) {
            v.push(format!("hold {id}: acknowledged, but lost"));
        }
    }
}

#[derive(sqlx::FromRow)]
struct ReturnRow {
    return_id: String,
    purchase_id: String,
    external_id: String,
    returned_minor: i64,
    clawed_back: i64,
    written_off: i64,
    refunded: i64,
    version: i64,
    left_debt: bool,
    clawback_entries: i64,
    clawback_points: i64,
    refund_entries: i64,
    refund_points: i64,
}

async fn check_returns(
    conn: &mut PgConnection,
    merchant: MerchantId,
    record: &Record,
    found: &mut DatabaseAudit,
) {
    let rows: Vec<ReturnRow> = sqlx::query_as(
        "SELECT r.return_id, r.purchase_id, c.external_id, r.returned_minor,
                (r.answer->>'points_clawed_back')::bigint AS clawed_back,
                (r.answer->>'points_written_off')::bigint AS written_off,
                (r.answer->>'points_refunded')::bigint AS refunded,
                (r.answer->'account'->>'version')::bigint AS version,
                (r.answer->'account'->>'available')::bigint < 0 AS left_debt,
                count(e.*) FILTER (WHERE e.kind = 'return_clawback') AS clawback_entries,
                COALESCE(sum(e.points) FILTER (WHERE e.kind = 'return_clawback'), 0)::bigint
                    AS clawback_points,
                count(e.*) FILTER (WHERE e.kind = 'redeem_refund') AS refund_entries,
                COALESCE(sum(e.points) FILTER (WHERE e.kind = 'redeem_refund'), 0)::bigint
                    AS refund_points
           FROM purchase_returns r
           JOIN customers c ON c.merchant_id = r.merchant_id AND c.id = r.customer_id
           LEFT JOIN ledger_entries e ON e.merchant_id = r.merchant_id
                                     AND e.customer_id = r.customer_id
                                     AND e.reference = r.return_id
                                     AND e.kind IN ('return_clawback', 'redeem_refund')
          WHERE r.merchant_id = $1
          GROUP BY r.merchant_id, r.return_id, c.external_id",
    )
    .bind(merchant.0)
    .fetch_all(&mut *conn)
    .await
    .expect("audit: returns");
    found.returns = rows.len();
    let v = &mut found.violations;
    let mut stored = HashSet::new();
    for r in &rows {
        let id = &r.return_id;
        stored.insert(id.as_str());
        found.returns_leaving_debt += usize::from(r.left_debt);
        if r.clawback_entries != i64::from(r.clawed_back > 0)
            || r.clawback_points != -r.clawed_back
            || r.refund_entries != i64::from(r.refunded > 0)
            || r.refund_points != r.refunded
        {
            v.push(format!(
                "return {id}: took back {} and refunded {}, but its entries take back {} ({}) \
                 and refund {} ({})",
                r.clawed_back,
                r.refunded,
                -r.clawback_points,
                r.clawback_entries,
                r.refund_points,
                r.refund_entries
            ));
        }
        match record.returns.get(id) {
            Some(ack) => {
                let told = &ack.response;
                let version = told.balance.map_or(0, |b| b.version);
                if told.purchase_id != r.purchase_id
                    || told.external_id != r.external_id
                    || told.returned_minor != r.returned_minor
                    || told.points_clawed_back != r.clawed_back
                    || told.points_written_off != r.written_off
                    || told.points_refunded != r.refunded
                    || version != r.version
                {
                    v.push(format!(
                        "return {id}: told {told:?}, stored {} of {} back, {} taken back, {} \
                         written off, {} refunded at v{}",
                        r.returned_minor,
                        r.purchase_id,
                        r.clawed_back,
                        r.written_off,
                        r.refunded,
                        r.version
                    ));
                }
            }
            None => v.extend(super::unacknowledged(record, WriteKind::Return, id)),
        }
    }
    for id in record.returns.keys() {
        if !stored.contains(id.as_str()) {
            v.push(format!("return {id}: acknowledged, but lost"));
        }
    }
}
