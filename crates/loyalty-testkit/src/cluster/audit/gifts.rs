//! Gifts: stock never negative and never oversold, every acknowledged claim stored with its
//! grant and its points, each code redeemed at most once (rule 5) with the key its till was
//! told.

use std::collections::{HashMap, HashSet};

use loyalty::MerchantId;
use sqlx::PgConnection;

use super::super::*;
use super::{DatabaseAudit, normalized_code};

/// A code in a violation: its first characters only (a code is a bearer secret).
fn masked(code: &str) -> String {
    format!("{}…", code.chars().take(4).collect::<String>())
}

pub(super) async fn check(
    conn: &mut PgConnection,
    merchant: MerchantId,
    record: &Record,
    found: &mut DatabaseAudit,
) {
    check_stock(conn, merchant, record, found).await;
    check_claims(conn, merchant, record, found).await;
    check_codes(conn, merchant, record, found).await;
}

async fn check_stock(
    conn: &mut PgConnection,
    merchant: MerchantId,
    record: &Record,
    found: &mut DatabaseAudit,
) {
    let gifts: Vec<(String, Option<i64>, i64)> = sqlx::query_as(
        "SELECT g.gift_id, g.stock, count(x.*) FILTER (WHERE x.status <> 'revoked') AS live
           FROM gifts g
           LEFT JOIN gift_grants x ON x.merchant_id = g.merchant_id AND x.gift_id = g.gift_id
          WHERE g.merchant_id = $1
          GROUP BY g.merchant_id, g.gift_id",
    )
    .bind(merchant.0)
    .fetch_all(&mut *conn)
    .await
    .expect("audit: gift stock");
    for (gift_id, stock, live) in gifts {
        found.gift_stock_left.insert(gift_id.clone(), stock);
        if stock.is_some_and(|s| s < 0) {
            found
                .violations
                .push(format!("gift {gift_id}: stock {stock:?} is below zero"));
        }
        // Every grant takes one from the stock (a revocation gives it back), so what is left
        // and what is out add up to what the catalog started with.
        if let (Some(&created), Some(left)) = (record.gift_stock.get(&gift_id), stock)
            && (left + live != created || live > created)
        {
            found.violations.push(format!(
                "gift {gift_id}: created with a stock of {created}, {live} granted and {left} left"
            ));
        }
    }
}

#[derive(sqlx::FromRow)]
struct ClaimRow {
    claim_key: String,
    external_id: String,
    gift_id: String,
    points: i64,
    version: i64,
    code: Option<String>,
    grants: i64,
    entries: i64,
    matching_entries: i64,
}

async fn check_claims(
    conn: &mut PgConnection,
    merchant: MerchantId,
    record: &Record,
    found: &mut DatabaseAudit,
) {
    let rows: Vec<ClaimRow> = sqlx::query_as(
        "SELECT k.claim_key, c.external_id, k.gift_id, k.points,
                (k.answer->'account'->>'version')::bigint AS version,
                (SELECT min(x.code) FROM gift_grants x
                  WHERE x.merchant_id = k.merchant_id AND x.source = 'points'
                    AND x.source_reference = k.claim_key) AS code,
                (SELECT count(*) FROM gift_grants x
                  WHERE x.merchant_id = k.merchant_id AND x.source = 'points'
                    AND x.source_reference = k.claim_key) AS grants,
                (SELECT count(*) FROM ledger_entries e
                  WHERE e.merchant_id = k.merchant_id AND e.customer_id = k.customer_id
                    AND e.kind = 'redeem' AND e.reference = k.claim_key) AS entries,
                (SELECT count(*) FROM ledger_entries e
                  WHERE e.merchant_id = k.merchant_id AND e.customer_id = k.customer_id
                    AND e.kind = 'redeem' AND e.reference = k.claim_key
                    AND e.points = -k.points
                    AND e.seq = (k.answer->'account'->>'version')::bigint) AS matching_entries
           FROM gift_claims k
           JOIN customers c ON c.merchant_id = k.merchant_id AND c.id = k.customer_id
          WHERE k.merchant_id = $1",
    )
    .bind(merchant.0)
    .fetch_all(&mut *conn)
    .await
    .expect("audit: gift claims");
    found.gift_claims = rows.len();
    let v = &mut found.violations;
    let mut stored = HashSet::new();
    for k in &rows {
        let key = &k.claim_key;
        stored.insert(key.as_str());
        if k.grants != 1 || k.entries != 1 || k.matching_entries != 1 {
            v.push(format!(
                "gift claim {key} of {} points: {} grants, {} REDEEM entries ({} of its points \
                 at its version {})",
                k.points, k.grants, k.entries, k.matching_entries, k.version
            ));
        }
        match record.claims.get(key) {
            Some(ack) => {
                let grant = ack.response.grant.clone().unwrap_or_default();
                let version = ack.response.balance.map_or(0, |b| b.version);
                if ack.request.external_id != k.external_id
                    || grant.gift_id != k.gift_id
                    || Some(normalized_code(&grant.code)) != k.code
                    || version != k.version
                {
                    v.push(format!(
                        "gift claim {key}: told {} for {} at v{version}, stored {} for {} at v{}, \
                         or another code",
                        grant.gift_id, ack.request.external_id, k.gift_id, k.external_id, k.version
                    ));
                }
            }
            None => v.extend(super::unacknowledged(record, WriteKind::Claim, key)),
        }
    }
    for key in record.claims.keys() {
        if !stored.contains(key.as_str()) {
            v.push(format!("gift claim {key}: acknowledged, but lost"));
        }
    }
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM gift_grants x
          WHERE x.merchant_id = $1 AND x.source = 'points'
            AND NOT EXISTS (SELECT 1 FROM gift_claims k
                             WHERE k.merchant_id = x.merchant_id
                               AND k.claim_key = x.source_reference)",
    )
    .bind(merchant.0)
    .fetch_one(&mut *conn)
    .await
    .expect("audit: grants without a claim");
    if orphans != 0 {
        v.push(format!(
            "{orphans} gifts granted for points without a claim"
        ));
    }
}

/// Rule 5: a code is redeemed at most once, by the key its till was told.
async fn check_codes(
    conn: &mut PgConnection,
    merchant: MerchantId,
    record: &Record,
    found: &mut DatabaseAudit,
) {
    let codes: Vec<(String, i64, Vec<String>)> = sqlx::query_as(
        "SELECT code, count(*) FILTER (WHERE status = 'redeemed'),
                COALESCE(array_agg(redemption_key) FILTER (WHERE redemption_key IS NOT NULL),
                         '{}')
           FROM gift_grants WHERE merchant_id = $1 GROUP BY code",
    )
    .bind(merchant.0)
    .fetch_all(&mut *conn)
    .await
    .expect("audit: gift codes");
    let v = &mut found.violations;
    let mut redeemed_with: HashMap<String, Vec<String>> = HashMap::new();
    for (code, redeemed, keys) in codes {
        found.gift_codes_redeemed += redeemed as usize;
        if redeemed > 1 || keys.len() > 1 {
            v.push(format!(
                "gift code {}: redeemed {redeemed} times, with keys {keys:?}",
                masked(&code)
            ));
        }
        for key in &keys {
            if !record.gift_redemptions.contains_key(key) {
                v.extend(super::unacknowledged(
                    record,
                    WriteKind::GiftRedemption,
                    key,
                ));
            }
        }
        redeemed_with.insert(code, keys);
    }
    let mut told_per_code: HashMap<String, Vec<&String>> = HashMap::new();
    for (key, ack) in &record.gift_redemptions {
        let code = normalized_code(&ack.request.code);
        match redeemed_with.get(&code) {
            Some(keys) if keys.contains(key) => {}
            other => v.push(format!(
                "gift redemption {key}: acknowledged, but the code {} is redeemed with {other:?}",
                masked(&code)
            )),
        }
        told_per_code.entry(code).or_default().push(key);
    }
    for (code, keys) in told_per_code {
        if keys.len() > 1 {
            v.push(format!(
                "gift code {}: {} tills were told they redeemed it: {keys:?}",
                masked(&code),
                keys.len()
            ));
        }
    }
}
