//! The statements of the hot paths, kept in `.sql` files so they read as SQL and so the
//! benchmark's pgbench ceiling (`loyalty-bench`) runs exactly the same text: it generates its
//! script from these constants, and `sql/checkout.pgbench` beside them is that script (a test
//! of the bench keeps the two equal).

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

#[cfg(test)]
mod tests {
    use super::*;

    fn words(sql: &str) -> String {
        sql.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn the_checkout_context_asks_the_gift_rule_question_of_the_gifts_feature() {
        assert!(
            words(CHECKOUT_CONTEXT).contains(&words(crate::gifts::store::PURCHASE_RULES_EXIST))
        );
    }
}
