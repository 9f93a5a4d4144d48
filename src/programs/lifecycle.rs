//! How points live once earned, as the merchant's program sets it: the pending period, the
//! expiry policy, the redemption rule and the return policy. Pure rules: no I/O, time comes in
//! as a parameter. Stored as one JSON column (`programs.lifecycle`); a program written before
//! these rules existed reads as the defaults.

use chrono::{DateTime, Datelike, Duration, Months, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::platform::money::Currency;
use crate::platform::validation::Violations;

/// A year: the longest pending period (a return window rarely passes 100 days).
pub const MAX_PENDING_DAYS: u32 = 365;
/// Ten years: the longest expiry period.
pub const MAX_EXPIRY_MONTHS: u32 = 120;
pub const DEFAULT_POINTS_PER_UNIT: u32 = 100;
pub const MAX_POINTS_PER_UNIT: u32 = 1_000_000;
/// 100 %, in basis points.
pub const FULL_SHARE_BP: u32 = 10_000;
/// Days before a lot's expiry its customer is warned (a points_expiring event), by default.
pub const DEFAULT_EXPIRY_WARNING_DAYS: u32 = 7;
pub const MAX_EXPIRY_WARNING_DAYS: u32 = 365;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Lifecycle {
    /// Days after the purchase before its points can be spent (typically the return window).
    pub pending_days: u32,
    pub expiry: ExpiryPolicy,
    pub redemption: RedemptionRule,
    pub returns: ReturnPolicy,
    /// Days before a lot expires that its points_expiring event is written (the expiry
    /// warnings job reads it from the stored JSON, `events/sql/warn_expiring.sql`).
    pub expiry_warning_days: u32,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            pending_days: 0,
            expiry: ExpiryPolicy::default(),
            redemption: RedemptionRule::default(),
            returns: ReturnPolicy::default(),
            expiry_warning_days: DEFAULT_EXPIRY_WARNING_DAYS,
        }
    }
}

/// When earned points expire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "policy", content = "months", rename_all = "snake_case")]
pub enum ExpiryPolicy {
    /// Points never expire.
    #[default]
    Never,
    /// N months after they were earned (the same day of the month, or the month's last day).
    MonthsAfterEarning(u32),
    /// At the end of the month N months after the month they were earned in (UTC).
    EndOfMonthAfter(u32),
    /// After N months without a purchase: every purchase extends all open lots.
    MonthsWithoutPurchase(u32),
}

impl ExpiryPolicy {
    /// The instant points earned at `earned_at` are gone (they can be spent strictly before
    /// it); `None` for never. For [`ExpiryPolicy::MonthsWithoutPurchase`], `earned_at` is the
    /// customer's latest purchase (or the credit itself if they have none).
    pub fn expires_at(self, earned_at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            ExpiryPolicy::Never => None,
            ExpiryPolicy::MonthsAfterEarning(months)
            | ExpiryPolicy::MonthsWithoutPurchase(months) => {
                // chrono clamps to the month's last day: 31 January + 1 month = 28/29 February.
                earned_at.checked_add_months(Months::new(months))
            }
            ExpiryPolicy::EndOfMonthAfter(months) => {
                let first = NaiveDate::from_ymd_opt(earned_at.year(), earned_at.month(), 1)?;
                let next_month_start = first.checked_add_months(Months::new(months + 1))?;
                Some(Utc.from_utc_datetime(&next_month_start.and_hms_opt(0, 0, 0)?))
            }
        }
    }

    /// For the policy counted from the latest purchase: the expiry every open lot moves to
    /// when a purchase at `purchased_at` is recorded.
    pub fn extension_on_purchase(self, purchased_at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            ExpiryPolicy::MonthsWithoutPurchase(_) => self.expires_at(purchased_at),
            _ => None,
        }
    }
}

/// How points pay: `points_per_unit` points are one whole currency unit of discount (100
/// points = 1.00 EUR), at least `minimum_points` at a time, for at most `max_share_bp` of a
/// basket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RedemptionRule {
    pub points_per_unit: u32,
    pub minimum_points: i64,
    pub max_share_bp: u32,
}

impl Default for RedemptionRule {
    fn default() -> Self {
        RedemptionRule {
            points_per_unit: DEFAULT_POINTS_PER_UNIT,
            minimum_points: 0,
            max_share_bp: FULL_SHARE_BP,
        }
    }
}

impl RedemptionRule {
    /// The discount `points` buy, in minor units, rounded down (never more than paid for).
    pub fn discount_minor(&self, points: i64, currency: Currency) -> i64 {
        let minor = i128::from(points) * currency.minor_per_unit();
        let discount = minor / i128::from(self.points_per_unit.max(1));
        i64::try_from(discount).unwrap_or(i64::MAX)
    }

    /// The most points this rule lets a basket of `total_minor` take, for a customer with
    /// `available` points: 0 when that is below the minimum.
    pub fn redeemable_points(&self, total_minor: i64, available: i64, currency: Currency) -> i64 {
        let cap_minor = i128::from(total_minor.max(0)) * i128::from(self.max_share_bp)
            / i128::from(FULL_SHARE_BP);
        let cap_points = cap_minor * i128::from(self.points_per_unit) / currency.minor_per_unit();
        let points = i64::try_from(cap_points)
            .unwrap_or(i64::MAX)
            .min(available.max(0));
        if points < self.minimum_points.max(1) {
            0
        } else {
            points
        }
    }
}

/// What a return's clawback does with points the customer no longer has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReturnPolicy {
    /// The balance goes negative; the next points that become available repay it first.
    #[default]
    Debt,
    /// The clawback stops at zero; the rest is written off (and recorded on the return).
    CapAtBalance,
}

impl ReturnPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ReturnPolicy::Debt => "debt",
            ReturnPolicy::CapAtBalance => "cap_at_balance",
        }
    }
}

impl Lifecycle {
    /// When points of a purchase at `occurred_at` become spendable.
    pub fn available_at(&self, occurred_at: DateTime<Utc>) -> DateTime<Utc> {
        occurred_at + Duration::days(i64::from(self.pending_days))
    }

    /// Checks the bounds, naming fields of `loyalty.v1.Program`.
    pub fn check(&self, v: &mut Violations) {
        if self.pending_days > MAX_PENDING_DAYS {
            v.add(
                "program.pending_days",
                format!("must be at most {MAX_PENDING_DAYS}"),
            );
        }
        if self.expiry_warning_days == 0 || self.expiry_warning_days > MAX_EXPIRY_WARNING_DAYS {
            v.add(
                "program.expiry_warning_days",
                format!("must be between 1 and {MAX_EXPIRY_WARNING_DAYS}"),
            );
        }
        match self.expiry {
            ExpiryPolicy::Never => {}
            ExpiryPolicy::MonthsAfterEarning(months)
            | ExpiryPolicy::EndOfMonthAfter(months)
            | ExpiryPolicy::MonthsWithoutPurchase(months) => {
                if months == 0 || months > MAX_EXPIRY_MONTHS {
                    v.add(
                        "program.expiry.months",
                        format!("must be between 1 and {MAX_EXPIRY_MONTHS}"),
                    );
                }
            }
        }
        let r = self.redemption;
        if r.points_per_unit == 0 || r.points_per_unit > MAX_POINTS_PER_UNIT {
            v.add(
                "program.redemption.points_per_unit",
                format!("must be between 1 and {MAX_POINTS_PER_UNIT}"),
            );
        }
        if r.minimum_points < 0 {
            v.add("program.redemption.minimum_points", "must not be negative");
        }
        if r.max_share_bp > FULL_SHARE_BP {
            v.add(
                "program.redemption.max_share_bp",
                format!("must be at most {FULL_SHARE_BP} (100 %)"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
    }

    #[test]
    fn months_after_earning_clamp_to_the_end_of_shorter_months() {
        let policy = ExpiryPolicy::MonthsAfterEarning(1);
        assert_eq!(
            policy.expires_at(at(2026, 1, 31, 10)),
            Some(at(2026, 2, 28, 10))
        );
        // A leap year keeps the 29th.
        assert_eq!(
            policy.expires_at(at(2028, 1, 31, 10)),
            Some(at(2028, 2, 29, 10))
        );
        // 29 February plus a year falls on 28 February.
        assert_eq!(
            ExpiryPolicy::MonthsAfterEarning(12).expires_at(at(2028, 2, 29, 8)),
            Some(at(2029, 2, 28, 8))
        );
        assert_eq!(
            ExpiryPolicy::MonthsAfterEarning(6).expires_at(at(2026, 8, 15, 0)),
            Some(at(2027, 2, 15, 0))
        );
    }

    #[test]
    fn end_of_month_after_is_the_first_instant_of_the_following_month() {
        let policy = ExpiryPolicy::EndOfMonthAfter(2);
        // Earned in January: gone at the end of March.
        assert_eq!(
            policy.expires_at(at(2026, 1, 31, 23)),
            Some(at(2026, 4, 1, 0))
        );
        assert_eq!(
            policy.expires_at(at(2026, 1, 1, 0)),
            Some(at(2026, 4, 1, 0))
        );
        // Across a year end.
        assert_eq!(
            ExpiryPolicy::EndOfMonthAfter(1).expires_at(at(2026, 12, 5, 12)),
            Some(at(2027, 2, 1, 0))
        );
        // 0 months: the end of the month it was earned in (not allowed by `check`, but exact).
        assert_eq!(
            ExpiryPolicy::EndOfMonthAfter(0).expires_at(at(2028, 2, 29, 12)),
            Some(at(2028, 3, 1, 0))
        );
    }

    #[test]
    fn never_expires_and_only_inactivity_extends_on_purchase() {
        assert_eq!(ExpiryPolicy::Never.expires_at(at(2026, 1, 1, 0)), None);
        let now = at(2026, 5, 31, 9);
        assert_eq!(
            ExpiryPolicy::MonthsWithoutPurchase(3).extension_on_purchase(now),
            Some(at(2026, 8, 31, 9))
        );
        assert_eq!(
            ExpiryPolicy::MonthsAfterEarning(3).extension_on_purchase(now),
            None
        );
    }

    #[test]
    fn the_stored_form_reads_back_and_an_empty_object_is_the_default() {
        let lifecycle = Lifecycle {
            pending_days: 14,
            expiry: ExpiryPolicy::EndOfMonthAfter(12),
            redemption: RedemptionRule {
                points_per_unit: 50,
                minimum_points: 200,
                max_share_bp: 5_000,
            },
            returns: ReturnPolicy::CapAtBalance,
            expiry_warning_days: 3,
        };
        let json = serde_json::to_string(&lifecycle).unwrap();
        assert_eq!(serde_json::from_str::<Lifecycle>(&json).unwrap(), lifecycle);
        assert_eq!(
            serde_json::from_str::<Lifecycle>("{}").unwrap(),
            Lifecycle::default()
        );
        // A program stored before the warnings existed warns a week ahead.
        assert_eq!(
            serde_json::from_str::<Lifecycle>(r#"{"pending_days": 3}"#)
                .unwrap()
                .expiry_warning_days,
            DEFAULT_EXPIRY_WARNING_DAYS
        );
    }

    #[test]
    fn discounts_round_down_and_respect_the_basket_share_and_minimum() {
        let eur = Currency::parse("currency", "EUR").unwrap();
        let jpy = Currency::parse("currency", "JPY").unwrap();
        let rule = RedemptionRule::default(); // 100 points = 1.00
        assert_eq!(rule.discount_minor(100, eur), 100);
        assert_eq!(rule.discount_minor(150, eur), 150);
        assert_eq!(rule.discount_minor(99, jpy), 0);
        assert_eq!(rule.discount_minor(250, jpy), 2);

        let half = RedemptionRule {
            max_share_bp: 5_000,
            minimum_points: 100,
            ..rule
        };
        // 10.00 EUR basket: at most 5.00 = 500 points.
        assert_eq!(half.redeemable_points(1_000, 10_000, eur), 500);
        assert_eq!(half.redeemable_points(1_000, 300, eur), 300);
        // Below the minimum: nothing.
        assert_eq!(half.redeemable_points(1_000, 99, eur), 0);
        assert_eq!(half.redeemable_points(100, 10_000, eur), 0);
        // A negative balance (a debt) spends nothing.
        assert_eq!(rule.redeemable_points(1_000, -5, eur), 0);
        // Extremes do not overflow.
        let rich = RedemptionRule {
            points_per_unit: MAX_POINTS_PER_UNIT,
            ..rule
        };
        assert_eq!(rich.redeemable_points(i64::MAX, i64::MAX, jpy), i64::MAX);
        assert!(rich.discount_minor(i64::MAX, jpy) > 0);
    }

    #[test]
    fn bounds_name_their_fields() {
        let mut v = Violations::default();
        Lifecycle {
            pending_days: 366,
            expiry: ExpiryPolicy::MonthsAfterEarning(0),
            redemption: RedemptionRule {
                points_per_unit: 0,
                minimum_points: -1,
                max_share_bp: 10_001,
            },
            returns: ReturnPolicy::Debt,
            expiry_warning_days: 366,
        }
        .check(&mut v);
        let fields: Vec<String> = v
            .into_error()
            .0
            .into_iter()
            .map(|violation| violation.field)
            .collect();
        assert_eq!(
            fields,
            [
                "program.pending_days",
                "program.expiry_warning_days",
                "program.expiry.months",
                "program.redemption.points_per_unit",
                "program.redemption.minimum_points",
                "program.redemption.max_share_bp",
            ]
        );
    }
}
