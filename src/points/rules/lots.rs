//! Lots and returns: which lots a debit takes, what a return takes back. Pure: the store
//! reads the lots and the purchase, these rules decide, the store writes the outcome.

use chrono::{DateTime, Utc};

use crate::platform::account::PointsExpiry;
use crate::programs::lifecycle::{ExpiryPolicy, Lifecycle};

/// When the points of a credit become spendable and when they expire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LotTerms {
    /// The pending period is over already (or there is none): available at once.
    pub spendable_now: bool,
    pub available_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// A purchase under "months without a purchase": every open lot moves to `expires_at`.
    pub extends_open_lots: bool,
}

impl LotTerms {
    /// The lot of a purchase at `occurred_at`, recorded at `now`.
    pub fn of_purchase(
        lifecycle: &Lifecycle,
        occurred_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Self {
        let available_at = lifecycle.available_at(occurred_at);
        LotTerms {
            // Without a pending period the points are spendable at once, even for a till whose
            // clock runs a little ahead of ours.
            spendable_now: lifecycle.pending_days == 0 || available_at <= now,
            available_at,
            expires_at: lifecycle.expiry.expires_at(occurred_at),
            extends_open_lots: lifecycle
                .expiry
                .extension_on_purchase(occurred_at)
                .is_some(),
        }
    }

    /// A credit outside a purchase (an adjustment, a refund of spent points) at `now`:
    /// spendable at once; under "months without a purchase" it lasts as long as the points
    /// of the customer's latest purchase (or from now, if they never bought).
    pub fn of_credit(
        expiry: ExpiryPolicy,
        last_purchase_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Self {
        let from = match expiry {
            ExpiryPolicy::MonthsWithoutPurchase(_) => last_purchase_at.unwrap_or(now),
            _ => now,
        };
        LotTerms {
            spendable_now: true,
            available_at: now,
            expires_at: expiry.expires_at(from),
            extends_open_lots: false,
        }
    }
}

/// The account's next expiry once a purchase is recorded, from what its statement saw
/// (`sql/record_purchase.sql`, whose reads all see the lots as they were before it):
/// `before`, the soonest expiry of the lots before the purchase; `lot`, the purchase's own lot
/// when it counts (matured, expiring, points left); `moved`, under "months without a
/// purchase", the points of the matured lots the purchase moved to its own lot's expiry
/// (their expiry was at or before it).
///
/// Computed here rather than by the statement (a union of the lots and the new one, grouped
/// and sorted) because that part of the statement cost about 6 % of checkout's database
/// ceiling before the standing was added (0-4 % since, BENCHMARKS.md); the statement now reads
/// the soonest expiry the way every account read does, from the open-lots index in order.
pub fn next_expiry_after_purchase(
    before: Option<PointsExpiry>,
    lot: Option<PointsExpiry>,
    moved: Option<PointsExpiry>,
) -> Option<PointsExpiry> {
    let moved = moved.filter(|m| m.points > 0);
    // Lots were moved only if some expired at or before the new expiry: then so did the
    // soonest one, which is among them.
    let before = if moved.is_some() { None } else { before };
    let groups = [before, lot, moved];
    let soonest = groups
        .iter()
        .flatten()
        .filter(|g| g.points > 0)
        .map(|g| g.at)
        .min()?;
    let points = groups
        .iter()
        .flatten()
        .filter(|g| g.points > 0 && g.at == soonest)
        .map(|g| g.points)
        .sum();
    Some(PointsExpiry {
        points,
        at: soonest,
    })
}

/// A lot with points left, as the store reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenLot {
    pub id: i64,
    pub remaining: i64,
    /// `None`: never expires.
    pub expires_at: Option<DateTime<Utc>>,
}

/// Takes up to `points` from `lots`, soonest-expiring first (never-expiring last, the oldest
/// lot first on a tie), and says how much from each. Takes less only if the lots hold less.
pub fn take_soonest_expiring(lots: &[OpenLot], points: i64) -> Vec<(i64, i64)> {
    let mut order: Vec<&OpenLot> = lots.iter().filter(|l| l.remaining > 0).collect();
    order.sort_by_key(|l| (l.expires_at.is_none(), l.expires_at, l.id));
    let mut left = points.max(0);
    let mut taken = Vec::new();
    for lot in order {
        if left == 0 {
            break;
        }
        let take = lot.remaining.min(left);
        taken.push((lot.id, take));
        left -= take;
    }
    taken
}

/// One line of a recorded purchase, as a return sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReturnableLine {
    pub amount_minor: i64,
    /// The line's share of the purchase's points.
    pub points: i64,
    /// Returned so far, in minor units.
    pub returned_minor: i64,
}

/// Points taken back once `returned` minor units of each line have come back in all: the
/// floor of each line's points × its returned fraction. A fully returned line gives back
/// exactly its points, so returns in several parts add up to exactly what was earned.
pub fn clawback_for(lines: &[ReturnableLine], returned: &[i64]) -> i64 {
    lines
        .iter()
        .zip(returned)
        .map(|(line, returned)| {
            if line.amount_minor <= 0 {
                return 0;
            }
            let share =
                i128::from(line.points) * i128::from(*returned) / i128::from(line.amount_minor);
            share as i64
        })
        .sum()
}

/// Spreads a returned amount over lines in proportion to what is still unreturned of each
/// (floor, then one minor unit each to the first lines with room), never beyond a line's
/// amount. `None` when the amount exceeds what is left to return.
pub fn spread_amount(lines: &[ReturnableLine], amount: i64) -> Option<Vec<i64>> {
    let open: Vec<i64> = lines
        .iter()
        .map(|l| (l.amount_minor - l.returned_minor).max(0))
        .collect();
    let total: i128 = open.iter().map(|o| i128::from(*o)).sum();
    if amount < 0 || i128::from(amount) > total {
        return None;
    }
    if total == 0 {
        return Some(vec![0; lines.len()]);
    }
    let mut parts: Vec<i64> = open
        .iter()
        .map(|o| (i128::from(amount) * i128::from(*o) / total) as i64)
        .collect();
    // Rounding left fewer units than there are lines; the lines have room for them all.
    let mut left = amount - parts.iter().sum::<i64>();
    while left > 0 {
        for (part, open) in parts.iter_mut().zip(&open) {
            if left > 0 && *part < *open {
                *part += 1;
                left -= 1;
            }
        }
    }
    Some(parts)
}

/// Points given back for redemptions that paid for a purchase, once `returned_minor` of its
/// `total_minor` has come back in all: the floor of the spent points × the returned fraction,
/// so a full return gives back exactly what was spent.
pub fn refund_for(redeemed: i64, returned_minor: i64, total_minor: i64) -> i64 {
    if total_minor <= 0 {
        return if returned_minor > 0 { redeemed } else { 0 };
    }
    (i128::from(redeemed) * i128::from(returned_minor.min(total_minor)) / i128::from(total_minor))
        as i64
}

/// How a clawback is paid: from the purchase's own lot, then the customer's other lots, then
/// (what they no longer have) as a debt or a write-off.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClawbackPlan {
    /// (lot id, points) in the order taken.
    pub from_lots: Vec<(i64, i64)>,
    /// What the lots could not cover.
    pub shortfall: i64,
}

/// Takes `points` from the purchase's own lot first (pending or not), then other spendable
/// lots soonest-expiring first, then other pending lots; the rest is the shortfall.
pub fn plan_clawback(
    own_lot: Option<OpenLot>,
    spendable: &[OpenLot],
    pending: &[OpenLot],
    points: i64,
) -> ClawbackPlan {
    let mut left = points.max(0);
    let mut from_lots = Vec::new();
    if let Some(own) = own_lot.filter(|l| l.remaining > 0) {
        let take = own.remaining.min(left);
        if take > 0 {
            from_lots.push((own.id, take));
            left -= take;
        }
    }
    let own_id = own_lot.map(|l| l.id);
    for group in [spendable, pending] {
        let others: Vec<OpenLot> = group
            .iter()
            .copied()
            .filter(|l| Some(l.id) != own_id)
            .collect();
        for (id, take) in take_soonest_expiring(&others, left) {
            from_lots.push((id, take));
            left -= take;
        }
    }
    ClawbackPlan {
        from_lots,
        shortfall: left,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expiry(points: i64, day: i64) -> Option<PointsExpiry> {
        Some(PointsExpiry {
            points,
            at: DateTime::from_timestamp(1_767_225_600 + day * 86_400, 0).unwrap(),
        })
    }

    #[test]
    fn a_purchase_lot_that_expires_first_is_the_next_expiry() {
        // Nothing expired before: the purchase's lot is the next expiry.
        assert_eq!(
            next_expiry_after_purchase(None, expiry(5, 30), None),
            expiry(5, 30)
        );
        // Sooner than the lots before it: it.
        assert_eq!(
            next_expiry_after_purchase(expiry(7, 60), expiry(5, 30), None),
            expiry(5, 30)
        );
        // Later: the lots before it stay the next expiry.
        assert_eq!(
            next_expiry_after_purchase(expiry(7, 10), expiry(5, 30), None),
            expiry(7, 10)
        );
        // On the same instant: they expire together.
        assert_eq!(
            next_expiry_after_purchase(expiry(7, 30), expiry(5, 30), None),
            expiry(12, 30)
        );
    }

    #[test]
    fn a_lot_that_does_not_count_leaves_the_next_expiry_as_it_was() {
        assert_eq!(
            next_expiry_after_purchase(expiry(7, 10), None, None),
            expiry(7, 10)
        );
        assert_eq!(next_expiry_after_purchase(None, None, None), None);
        // A lot with no points left (a return's debt took them) is no expiry.
        assert_eq!(
            next_expiry_after_purchase(expiry(7, 10), expiry(0, 5), None),
            expiry(7, 10)
        );
    }

    #[test]
    fn lots_moved_by_a_purchase_expire_with_its_own_lot() {
        // "Months without a purchase": the lots expiring at or before the new expiry (day 10
        // and others, 9 points in all) move to it and expire with the purchase's lot.
        assert_eq!(
            next_expiry_after_purchase(expiry(4, 10), expiry(5, 90), expiry(9, 90)),
            expiry(14, 90)
        );
        // None moved (the only lots expire later, a backdated purchase): they stay next, or
        // the purchase's lot if it is sooner.
        assert_eq!(
            next_expiry_after_purchase(expiry(4, 120), expiry(5, 90), expiry(0, 90)),
            expiry(5, 90)
        );
        assert_eq!(
            next_expiry_after_purchase(expiry(4, 120), None, None),
            expiry(4, 120)
        );
        // Moved, while the purchase's own lot went to repay a debt.
        assert_eq!(
            next_expiry_after_purchase(expiry(4, 10), None, expiry(9, 90)),
            expiry(9, 90)
        );
    }
    use chrono::TimeZone;

    fn day(d: u32) -> Option<DateTime<Utc>> {
        Some(Utc.with_ymd_and_hms(2026, 12, d, 0, 0, 0).unwrap())
    }

    fn lot(id: i64, remaining: i64, expires_at: Option<DateTime<Utc>>) -> OpenLot {
        OpenLot {
            id,
            remaining,
            expires_at,
        }
    }

    #[test]
    fn a_purchase_lot_is_pending_for_the_programs_period() {
        use crate::programs::lifecycle::ExpiryPolicy;
        let bought = day(1).unwrap();
        let lifecycle = Lifecycle {
            pending_days: 14,
            expiry: ExpiryPolicy::MonthsWithoutPurchase(6),
            ..Lifecycle::default()
        };
        let terms = LotTerms::of_purchase(&lifecycle, bought, day(2).unwrap());
        assert!(!terms.spendable_now);
        assert_eq!(terms.available_at, day(15).unwrap());
        assert_eq!(
            terms.expires_at,
            Some(Utc.with_ymd_and_hms(2027, 6, 1, 0, 0, 0).unwrap())
        );
        assert!(terms.extends_open_lots);
        // A receipt recorded after its pending period is spendable at once.
        assert!(LotTerms::of_purchase(&lifecycle, bought, day(15).unwrap()).spendable_now);
        // Credits under inactivity expire with the latest purchase's points.
        let credit = LotTerms::of_credit(lifecycle.expiry, Some(bought), day(20).unwrap());
        assert_eq!(credit.expires_at, terms.expires_at);
        assert!(credit.spendable_now && !credit.extends_open_lots);
        let ahead = bought + chrono::Duration::minutes(4);
        assert!(LotTerms::of_purchase(&Lifecycle::default(), ahead, bought).spendable_now);
        let never = LotTerms::of_purchase(&Lifecycle::default(), bought, bought);
        assert!(never.spendable_now && never.expires_at.is_none() && !never.extends_open_lots);
    }

    #[test]
    fn debits_take_the_soonest_expiring_lots_first() {
        let lots = [
            lot(1, 100, None),
            lot(2, 50, day(20)),
            lot(3, 30, day(10)),
            lot(4, 0, day(1)),
            lot(5, 40, day(10)),
        ];
        assert_eq!(
            take_soonest_expiring(&lots, 100),
            [(3, 30), (5, 40), (2, 30)]
        );
        // Never-expiring points go last; nothing beyond what the lots hold.
        assert_eq!(
            take_soonest_expiring(&lots, 500),
            [(3, 30), (5, 40), (2, 50), (1, 100)]
        );
        assert!(take_soonest_expiring(&lots, 0).is_empty());
    }

    fn line(amount_minor: i64, points: i64, returned_minor: i64) -> ReturnableLine {
        ReturnableLine {
            amount_minor,
            points,
            returned_minor,
        }
    }

    #[test]
    fn partial_returns_add_up_to_exactly_what_was_earned() {
        // A 1.5x coffee (3.50, 5 points) and a cake (2.50, 2 points).
        let lines = [line(350, 5, 0), line(250, 2, 0)];
        let mut returned = [0, 0];
        let mut taken = 0;
        for (coffee, cake) in [(100, 0), (100, 125), (150, 125)] {
            returned[0] += coffee;
            returned[1] += cake;
            let total = clawback_for(&lines, &returned);
            assert!(total >= taken);
            taken = total;
        }
        assert_eq!(taken, 7);
        // The coffee alone takes back what the coffee earned.
        assert_eq!(clawback_for(&lines, &[350, 0]), 5);
    }

    #[test]
    fn an_amount_spreads_over_what_is_left_of_each_line() {
        let lines = [line(300, 3, 100), line(100, 1, 0)];
        // 200 + 100 unreturned; 150 spreads 100 / 50.
        assert_eq!(spread_amount(&lines, 150), Some(vec![100, 50]));
        // Rounding leftovers go to the first line with room; never past a line's amount.
        assert_eq!(spread_amount(&lines, 299), Some(vec![200, 99]));
        assert_eq!(spread_amount(&lines, 300), Some(vec![200, 100]));
        assert_eq!(spread_amount(&lines, 301), None);
        assert_eq!(spread_amount(&lines, -1), None);
        let uneven = [line(3, 1, 0), line(3, 1, 0), line(3, 1, 0)];
        assert_eq!(spread_amount(&uneven, 2), Some(vec![1, 1, 0]));
    }

    #[test]
    fn refunds_of_spent_points_follow_the_returned_share() {
        assert_eq!(refund_for(500, 0, 1000), 0);
        assert_eq!(refund_for(500, 333, 1000), 166);
        assert_eq!(refund_for(500, 1000, 1000), 500);
        assert_eq!(refund_for(500, 5, 0), 500);
    }

    #[test]
    fn a_clawback_takes_the_purchases_own_lot_first_then_the_others() {
        let own = lot(7, 40, day(30));
        let spendable = [lot(1, 10, day(5)), own, lot(2, 20, None)];
        let pending = [lot(9, 100, day(31))];
        let plan = plan_clawback(Some(own), &spendable, &pending, 60);
        assert_eq!(plan.from_lots, [(7, 40), (1, 10), (2, 10)]);
        assert_eq!(plan.shortfall, 0);
        let plan = plan_clawback(Some(own), &spendable, &pending, 200);
        assert_eq!(plan.from_lots, [(7, 40), (1, 10), (2, 20), (9, 100)]);
        assert_eq!(plan.shortfall, 30);
        let plan = plan_clawback(None, &[], &[], 5);
        assert_eq!(plan.shortfall, 5);
    }
}
