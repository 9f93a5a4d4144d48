//! The audit every scenario ends with: the committed state against what the clients were
//! told, the ledger and lot identities, the rules of spending, holds, returns and gifts, and
//! the cache against the truth.
//!
//! Split by what is checked: `accounts` (each account against its ledger, lots and
//! purchases), `spending` (redemptions, holds, returns), `gifts` (stock, claims, codes),
//! `cache`, and `engagement` (the event watcher against the outbox, the greeting workers
//! against the greetings). The database checks read one snapshot ([`check_database`]), so the sweep that
//! keeps running cannot make two queries disagree.

mod accounts;
mod cache;
mod engagement;
mod gifts;
mod spending;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use loyalty::MerchantId;
use sqlx::PgConnection;

use super::*;

pub use accounts::Committed;
pub use engagement::{
    EngagementAudit, StoredEvent, StoredGreeting, check_events, check_greetings, greetings_settled,
    read_engagement, stream_end,
};

/// A hold past its ttl must be released by the sweep (LOYALTY_SWEEP_INTERVAL_MS, 1 s in the
/// rig) within this long: the interval, the pass's wait behind the tills' transactions on a
/// hot account, and a margin for a loaded 2-core machine. A fault that stops the sweep
/// (PostgreSQL or the server down) adds its length: see [`audit_after_outage`].
pub const HOLD_RELEASE_SLACK: Duration = Duration::from_secs(5);

/// The audit waits this long at most for the holds of walk-away tills to pass their ttl.
const HOLD_WAIT_LIMIT: Duration = Duration::from_secs(10);

/// What the database part of the audit found (see [`check_database`]).
#[derive(Debug, Default)]
pub struct DatabaseAudit {
    /// Each customer's committed state (for the cache checks).
    pub committed: HashMap<String, Committed>,
    pub customers: usize,
    pub purchases: usize,
    pub ledger_entries: i64,
    pub ledger_entries_by_kind: BTreeMap<String, i64>,
    /// Purchases stored although no client was told they were (given up); 0 or 1 effect each.
    pub unacknowledged_purchases: usize,
    pub accounts_in_debt: usize,
    pub debt_total: i64,
    pub redemptions: usize,
    /// Holds by status (held, committed, released, expired).
    pub holds: BTreeMap<String, i64>,
    /// The longest a hold past its ttl waited for the sweep to release it.
    pub max_hold_release_delay: Option<Duration>,
    pub returns: usize,
    /// Returns whose clawback took the balance below zero (a debt).
    pub returns_leaving_debt: usize,
    pub purchases_fully_returned: usize,
    pub gift_claims: usize,
    pub gift_codes_redeemed: usize,
    /// gift_id → stock left.
    pub gift_stock_left: BTreeMap<String, Option<i64>>,
    pub violations: Vec<String>,
}

/// What the audit found.
#[derive(Debug, Default)]
pub struct Audit {
    pub database: DatabaseAudit,
    pub customers: usize,
    pub purchases: usize,
    pub ledger_entries: i64,
    pub unacknowledged_purchases: usize,
    /// How long the audit waited for the holds of walk-away tills to expire and be released.
    pub waited_for_holds: Duration,
    /// How long the cache took to hold only committed states (or nothing) per customer.
    pub cache_converged_after: Option<Duration>,
    pub cache_entries: usize,
    pub violations: Vec<String>,
}

/// The audit every scenario ends with, once the load has stopped. It waits (up to 10 s) for
/// holds left to their ttl to expire and be swept, then checks the database in one snapshot
/// ([`check_database`]: rules 1–5 against what every client was told), then the cache: within
/// `cache_within` it holds either nothing or exactly the committed state of each customer
/// (rules 7 and 9), and a fresh `GetBalance` shows the committed state.
pub async fn audit(cluster: &Cluster, record: &Record, cache_within: Duration) -> Audit {
    audit_after_outage(cluster, record, cache_within, Duration::ZERO).await
}

/// [`audit`] after a fault that kept the sweep from running for `outage` (PostgreSQL or the
/// server down): a hold that expired meanwhile may wait that much longer for its release.
pub async fn audit_after_outage(
    cluster: &Cluster,
    record: &Record,
    cache_within: Duration,
    outage: Duration,
) -> Audit {
    let pool = cluster.pool().await;
    let merchant = cluster.merchant;
    let hold_release_slack = HOLD_RELEASE_SLACK + outage;
    let waited_for_holds = wait_for_due_holds(&pool, merchant, hold_release_slack).await;
    let mut tx = pool.begin().await.expect("audit: begin");
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await
        .expect("audit: snapshot");
    let database = check_database(&mut tx, merchant, record, hold_release_slack).await;
    drop(tx);
    pool.close().await;

    let mut audit = Audit {
        customers: database.customers,
        purchases: database.purchases,
        ledger_entries: database.ledger_entries,
        unacknowledged_purchases: database.unacknowledged_purchases,
        waited_for_holds,
        violations: database.violations.clone(),
        ..Audit::default()
    };
    let (converged_after, mut stale, entries) =
        cache::check(cluster, &database.committed, cache_within).await;
    audit.cache_converged_after = converged_after;
    audit.cache_entries = entries;
    audit.violations.append(&mut stale);
    audit.database = database;
    audit
}

/// Everything the audit checks in PostgreSQL, on `conn` (the caller's snapshot: a
/// REPEATABLE READ transaction, or one that broke the state on purpose), for the merchant's
/// customers against `record`. Besides the record's own violations:
///
/// * accounts ([`accounts`]): `available + pending == Σ ledger` (rule 1); no overdraft:
///   `available + debt >= 0`, the debt is exactly what `available` is below zero, and
///   `available < 0` only with a return's clawback (rule 2); the spendable lots hold
///   `max(available, 0)` and the pending lots `pending` (held points are out of both);
///   the redeem entries are exactly the redemptions, committed holds and gift claims, the
///   reserve and release entries exactly the points still held; every acknowledged purchase
///   stored once with one EARN entry and the points the client was told (rule 3); a
///   purchase's returns add up, and one returned in full gave back exactly what it earned;
/// * spending ([`spending`]): every acknowledged redemption, hold, settlement and return is
///   stored once with one ledger entry of its kind and what the client was told; nothing is
///   stored that no client was told about (or still tried), nothing for a refused key; every
///   hold committed XOR released, its entries saying the same, none released by the sweep
///   (or still held) later than `hold_release_slack` after its expiry (rule 4);
/// * gifts ([`gifts`]): stock never negative and stock + live grants == the stock created;
///   every acknowledged claim stored with its grant and one REDEEM entry; each code redeemed
///   at most once, with the key its till was told (rule 5).
///
/// The workload's client keys of different kinds never collide (their suffixes differ), so
/// a REDEEM entry is found by its reference without asking which kind of key it is.
pub async fn check_database(
    conn: &mut PgConnection,
    merchant: MerchantId,
    record: &Record,
    hold_release_slack: Duration,
) -> DatabaseAudit {
    let mut found = DatabaseAudit {
        violations: record.violations.clone(),
        ..DatabaseAudit::default()
    };
    if !record.gave_up.is_empty() {
        found.violations.push(format!(
            "{} requests never completed (retries gave up): {:?}",
            record.gave_up.len(),
            &record.gave_up[..record.gave_up.len().min(10)]
        ));
    }
    accounts::check(conn, merchant, record, &mut found).await;
    spending::check(conn, merchant, record, hold_release_slack, &mut found).await;
    gifts::check(conn, merchant, record, &mut found).await;
    found
}

/// Waits until no hold of the merchant is held past its ttl, and none will be within
/// [`HOLD_WAIT_LIMIT`] (a walk-away till's hold), at most that limit plus the slack. Returns
/// how long it waited.
async fn wait_for_due_holds(
    pool: &sqlx::PgPool,
    merchant: MerchantId,
    slack: Duration,
) -> Duration {
    let started = Instant::now();
    let deadline = started + HOLD_WAIT_LIMIT + slack;
    loop {
        let (due, soon): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE expires_at <= now()),
                    count(*) FILTER (WHERE expires_at > now()
                                       AND expires_at <= now() + make_interval(secs => $2))
               FROM reservations WHERE merchant_id = $1 AND status = 'held'",
        )
        .bind(merchant.0)
        .bind(HOLD_WAIT_LIMIT.as_secs_f64())
        .fetch_one(pool)
        .await
        .expect("audit: holds due");
        if (due == 0 && soon == 0) || Instant::now() > deadline {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A stored row that no acknowledgement explains: fine if its client gave up (it may or may
/// not have committed), a violation otherwise, worse if its client was refused.
fn unacknowledged(record: &Record, kind: WriteKind, key: &str) -> Option<String> {
    if record.gave_up_on(kind, key) {
        return None;
    }
    Some(match record.refusal(kind, key) {
        Some(code) => format!(
            "{} {key}: stored, although its client was refused ({code:?})",
            kind.as_str()
        ),
        None => format!(
            "{} {key}: stored, but no client was ever told",
            kind.as_str()
        ),
    })
}

/// A gift code as stored (upper case, without dashes), from any way a till shows it.
pub(crate) fn normalized_code(code: &str) -> String {
    code.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

/// The figures every scenario reports, plus its own.
pub fn figures(
    record: &Record,
    audit: &Audit,
    ran: Duration,
    extra: serde_json::Value,
) -> serde_json::Value {
    let acknowledged = record.acknowledged.len();
    let db = &audit.database;
    let mut value = serde_json::json!({
        "load_seconds": (ran.as_secs_f64() * 10.0).round() / 10.0,
        "requests": record.attempts,
        "retries": record.retries,
        "replays": record.replays,
        "reads": record.reads,
        "failed_attempts": record.failed_attempts(),
        "failed_attempts_by_code": record.failures,
        "failed_attempts_by_operation": record.failures_by_operation,
        "max_failed_call_ms": record.max_failed_latency.as_millis() as u64,
        "max_call_ms": record.max_latency.as_millis() as u64,
        "acknowledged_purchases": acknowledged,
        "acknowledged_writes": record.write_acks.len(),
        "acknowledged_writes_per_second": (record.write_acks.len() as f64 / ran.as_secs_f64().max(0.001)).round(),
        "acknowledged_by_kind": record.acknowledged_by_kind(),
        "answers_by_kind": record.outcomes,
        "gave_up": record.gave_up.len(),
        "customers": audit.customers,
        "purchases_stored": audit.purchases,
        "ledger_entries": audit.ledger_entries,
        "ledger_entries_by_kind": db.ledger_entries_by_kind,
        "accounts_in_debt": db.accounts_in_debt,
        "debt_total": db.debt_total,
        "redemptions_stored": db.redemptions,
        "holds_by_status": db.holds,
        "max_hold_release_delay_ms": db.max_hold_release_delay.map(|d| d.as_millis() as u64),
        "audit_waited_for_holds_ms": audit.waited_for_holds.as_millis() as u64,
        "returns_stored": db.returns,
        "returns_leaving_debt": db.returns_leaving_debt,
        "purchases_fully_returned": db.purchases_fully_returned,
        "gift_claims_stored": db.gift_claims,
        "gift_codes_redeemed": db.gift_codes_redeemed,
        "gift_stock_created": record.gift_stock,
        "gift_stock_left": db.gift_stock_left,
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
