//! The statements of the hot paths, kept here (the long ones in `.sql` files, so they read as
//! SQL) so that the benchmark's pgbench ceilings (`loyalty-bench`) run exactly the same text:
//! they generate their scripts from these constants, and `sql/checkout.pgbench` (one
//! RecordPurchase) and `sql/redeem.pgbench` (one ReservePoints and its CommitReservation)
//! beside them are those scripts (tests of the bench keep them equal).

/// Checkout, step 1: the program version, the customer's id (NULL when not enrolled) and
/// whether the merchant has gift rules that a purchase may fire (`gifts::store::
/// PURCHASE_RULES_EXIST`, spelled out in the file; a test keeps the two equal).
/// `$1` merchant_id, `$2` external_id.
pub const CHECKOUT_CONTEXT: &str = include_str!("sql/checkout_context.sql");

/// Checkout, step 2: the whole purchase in one atomic statement. See the file for parameters.
pub const RECORD_PURCHASE: &str = include_str!("sql/record_purchase.sql");

/// Spending, in one statement under the account lock: takes points from the lots
/// soonest-expiring first, writes the ledger entry and what each lot gave. See the file.
pub const TAKE_POINTS: &str = include_str!("sql/take_points.sql");

/// Creates a customer (and their empty account) if the external id is new.
pub const ENROLL_ON_PURCHASE: &str = include_str!("sql/enroll_on_purchase.sql");

// The statements of one ReservePoints (in its transaction, in this order): PROGRAM_VERSION,
// LOCK_ACCOUNT, RESERVATION_ANSWER, TAKE_POINTS, WRITE_ACCOUNT, INSERT_RESERVATION; and of one
// CommitReservation: LOCK_RESERVATION_ACCOUNT, LOCK_RESERVATION, INSERT_ENTRY (RELEASE),
// INSERT_ENTRY (REDEEM), WRITE_ACCOUNT_EVENT (with its points_redeemed event),
// SETTLE_RESERVATION.

/// The program's version, to check the cached rules against (`programs::store::VERSION`).
/// `$1` merchant_id.
pub const PROGRAM_VERSION: &str = crate::programs::store::VERSION;

/// Locks a customer's account by external id, the first lock of every movement; no row when
/// there is no such customer. `$1` merchant_id, `$2` external_id.
pub const LOCK_ACCOUNT: &str = "SELECT a.customer_id, a.available, a.version, a.last_purchase_at
  FROM customers c
  JOIN accounts a ON a.merchant_id = c.merchant_id AND a.customer_id = c.id
 WHERE c.merchant_id = $1 AND c.external_id = $2
   FOR UPDATE OF a";

macro_rules! lock_account_by_id {
    () => {
        "SELECT a.customer_id, a.available, a.version, a.last_purchase_at
  FROM accounts a
 WHERE a.merchant_id = $1 AND a.customer_id = $2
   FOR UPDATE"
    };
}

/// Locks a customer's account by internal id (a return knows the customer from its purchase,
/// the sweep from its work list). `$1` merchant_id, `$2` customer_id.
pub const LOCK_ACCOUNT_BY_ID: &str = lock_account_by_id!();

/// `LOCK_ACCOUNT_BY_ID`, skipping an account another transaction holds (the sweep's).
pub(crate) const LOCK_ACCOUNT_BY_ID_SKIP_LOCKED: &str =
    concat!(lock_account_by_id!(), " SKIP LOCKED");

/// The stored request hash and answer of a reservation id (no row: a new hold), read under
/// the account lock. `$1` merchant_id, `$2` reservation_id.
pub const RESERVATION_ANSWER: &str =
    "SELECT request_hash, answer FROM reservations WHERE merchant_id = $1 AND reservation_id = $2";

/// Applies one change to a locked account and returns it with its next expiry. See the file.
pub const WRITE_ACCOUNT: &str = include_str!("sql/write_account.sql");

/// `WRITE_ACCOUNT` and the change's event in one statement (a test keeps their account
/// updates equal). See the file.
pub const WRITE_ACCOUNT_EVENT: &str = include_str!("sql/write_account_event.sql");

/// A new hold's row. See the file for parameters.
pub const INSERT_RESERVATION: &str = include_str!("sql/insert_reservation.sql");

/// Locks the account of a reservation's customer (no row: no such reservation), the first
/// lock of a settlement. The reservation's customer never changes, so reading it in the same
/// statement is the same as reading it first, a round trip less. Settlements and the sweep's
/// release of an expired hold both start with it.
/// `$1` merchant_id, `$2` reservation_id.
pub const LOCK_RESERVATION_ACCOUNT: &str =
    "SELECT a.customer_id, a.available, a.version, a.last_purchase_at
  FROM accounts a
 WHERE a.merchant_id = $1
   AND a.customer_id = (SELECT r.customer_id FROM reservations r
                         WHERE r.merchant_id = $1 AND r.reservation_id = $2)
   FOR UPDATE";

/// A reservation, locked (after its account). `$1` merchant_id, `$2` reservation_id.
pub const LOCK_RESERVATION: &str = "SELECT c.external_id, r.points, r.discount_minor, r.expires_at,
       r.status, r.hold_seq, r.settled_answer
  FROM reservations r
  JOIN customers c ON c.merchant_id = r.merchant_id AND c.id = r.customer_id
 WHERE r.merchant_id = $1 AND r.reservation_id = $2
   FOR UPDATE OF r";

/// One ledger entry. `$1` merchant_id, `$2` customer_id, `$3` seq (the account version it
/// produces), `$4` kind, `$5` points, `$6` reference, `$7` occurred_at.
pub const INSERT_ENTRY: &str =
    "INSERT INTO ledger_entries (merchant_id, customer_id, seq, kind, points, reference,
                            occurred_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// Settles a held reservation once (no row changed: it was not held any more). `$1`
/// merchant_id, `$2` reservation_id, `$3` status, `$4` settled_answer, `$5` settled_at.
pub const SETTLE_RESERVATION: &str = "UPDATE reservations
   SET status = $3, settled_answer = $4, settled_at = $5
 WHERE merchant_id = $1 AND reservation_id = $2 AND status = 'held'";

#[cfg(test)]
mod tests {
    use super::*;

    fn words(sql: &str) -> String {
        sql.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn the_sweep_locks_accounts_as_settlements_do_but_skips_held_ones() {
        assert_eq!(
            LOCK_ACCOUNT_BY_ID_SKIP_LOCKED,
            format!("{LOCK_ACCOUNT_BY_ID} SKIP LOCKED")
        );
    }

    /// The text from `WITH account AS (` to the end of its RETURNING list.
    fn account_update(sql: &str) -> String {
        let start = sql.find("WITH account AS (").expect("the account CTE");
        let end = start
            + sql[start..]
                .find("purchase_count, version")
                .expect("its RETURNING");
        words(&sql[start..end])
    }

    #[test]
    fn a_movement_with_its_event_updates_the_account_as_one_without() {
        assert_eq!(
            account_update(WRITE_ACCOUNT),
            account_update(WRITE_ACCOUNT_EVENT)
        );
        let tail = |sql: &str| words(&sql[sql.rfind("SELECT a.available").unwrap()..]);
        assert_eq!(tail(WRITE_ACCOUNT), tail(WRITE_ACCOUNT_EVENT));
        assert!(WRITE_ACCOUNT_EVENT.contains("INSERT INTO events"));
        assert!(!WRITE_ACCOUNT.contains("INSERT INTO events"));
    }

    #[test]
    fn the_checkout_context_asks_the_gift_rule_question_of_the_gifts_feature() {
        assert!(
            words(CHECKOUT_CONTEXT).contains(&words(crate::gifts::store::PURCHASE_RULES_EXIST))
        );
    }
}
