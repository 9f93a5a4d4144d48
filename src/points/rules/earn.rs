//! How many points a basket earns.
//!
//! points = floor( Σ line amount × category multiplier × best promotion multiplier
//!                 × earn_rate.points / (earn_rate.currency_units × minor units per unit) )
//!
//! Everything is exact integer arithmetic in 128 bits and rounds down once, per purchase, so
//! splitting a basket into more lines never loses points to rounding.
//!
//! A line looks only at the promotions that name its category (or none), through the
//! program's [`PromotionIndex`]: a basket costs O(lines + matching promotions), whatever the
//! size of the program, so one merchant's large program and large baskets cannot hold an
//! async worker for long.

use chrono::{DateTime, Utc};

use crate::platform::validation::Invalid;
use crate::points::rules::purchase::Basket;
use crate::programs::rules::{
    BASE_MULTIPLIER_BP, Program, ProgramRules, Promotion, PromotionIndex,
};

/// The most points one purchase may earn. A balance holds up to `i64::MAX` (about 9.2 × 10^18),
/// so a customer can take thousands of purchases at this cap before the balance is full; without
/// it, one purchase under an extreme (but valid) program could fill the balance and block every
/// later purchase of that customer.
pub const MAX_POINTS_PER_PURCHASE: i64 = 1_000_000_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Earn {
    pub points: i64,
    /// False when the total is below the program's minimum purchase amount.
    pub eligible: bool,
    /// Promotions chosen for at least one line, in program order.
    pub applied_promotion_ids: Vec<String>,
    /// Each line's share of `points` (they add up to it exactly), stored with the purchase so
    /// that a return takes back what the returned line earned. Empty for a basket without
    /// lines.
    pub line_points: Vec<i64>,
}

/// What the basket earns under a loaded program (its promotion index built already), with
/// the promotions of its own date.
pub fn earn(program: &Program, basket: &Basket) -> Result<Earn, Invalid> {
    earn_at(program, basket, basket.occurred_at)
}

/// What the basket earns with the promotions of `at` (the program's receipt age rule may move
/// an old receipt to the rules of today: `ReceiptAge::earning_instant`).
pub fn earn_at(program: &Program, basket: &Basket, at: DateTime<Utc>) -> Result<Earn, Invalid> {
    earn_indexed(
        &program.rules,
        &program.promotion_index,
        basket,
        at,
        BASE_MULTIPLIER_BP,
    )
}

/// [`earn_at`] for a customer whose tier earns `tier_multiplier_bp` (`TierProgram::
/// earn_multiplier_bp` of the tier held when the purchase starts): it multiplies every line
/// on top of its category and promotion multipliers, before the one rounding.
pub fn earn_at_tier(
    program: &Program,
    basket: &Basket,
    at: DateTime<Utc>,
    tier_multiplier_bp: u32,
) -> Result<Earn, Invalid> {
    earn_indexed(
        &program.rules,
        &program.promotion_index,
        basket,
        at,
        tier_multiplier_bp,
    )
}

/// Like [`earn`], for rules not loaded as a program (the index is built on the spot).
pub fn earn_under(rules: &ProgramRules, basket: &Basket) -> Result<Earn, Invalid> {
    let index = PromotionIndex::new(&rules.promotions);
    earn_indexed(
        rules,
        &index,
        basket,
        basket.occurred_at,
        BASE_MULTIPLIER_BP,
    )
}

fn earn_indexed(
    rules: &ProgramRules,
    index: &PromotionIndex,
    basket: &Basket,
    at: DateTime<Utc>,
    tier_multiplier_bp: u32,
) -> Result<Earn, Invalid> {
    if basket.currency != rules.currency {
        return Err(Invalid::field(
            "currency",
            format!("must be the program currency {}", rules.currency),
        ));
    }
    if basket.total_minor < rules.minimum_purchase_minor {
        return Ok(Earn {
            points: 0,
            eligible: false,
            applied_promotion_ids: Vec::new(),
            line_points: vec![0; basket.lines.len()],
        });
    }

    let mut applied = vec![false; rules.promotions.len()];
    let mut weights: Vec<i128> = Vec::with_capacity(basket.lines.len().max(1));
    let mut weigh = |category: &str, amount_minor: i64| {
        let best = best_promotion(&rules.promotions, index.candidates(category), at);
        let promotion_bp = match best {
            Some(index) => {
                applied[index] = true;
                rules.promotions[index].multiplier_bp
            }
            None => BASE_MULTIPLIER_BP,
        };
        // minor units × bp × bp
        weights.push(
            i128::from(amount_minor)
                * i128::from(rules.category_multiplier_bp(category))
                * i128::from(promotion_bp),
        );
    };
    if basket.lines.is_empty() {
        weigh("", basket.total_minor);
    } else {
        for line in &basket.lines {
            weigh(&line.category, line.amount_minor);
        }
    }
    let weighted: i128 = weights.iter().sum();

    let bp = i128::from(BASE_MULTIPLIER_BP);
    let numerator = weighted * i128::from(rules.earn_rate.points);
    let denominator =
        i128::from(rules.earn_rate.currency_units) * rules.currency.minor_per_unit() * bp * bp;
    let points = times_tier(numerator, denominator, tier_multiplier_bp)
        .and_then(|points| i64::try_from(points).ok())
        .filter(|points| *points <= MAX_POINTS_PER_PURCHASE)
        .ok_or_else(|| {
            Invalid::field(
                "total_minor",
                format!("earns more than {MAX_POINTS_PER_PURCHASE} points, the most one purchase may earn"),
            )
        })?;

    let applied_promotion_ids = rules
        .promotions
        .iter()
        .zip(applied)
        .filter(|(_, used)| *used)
        .map(|(promotion, _)| promotion.id.clone())
        .collect();
    let line_points = if basket.lines.is_empty() {
        Vec::new()
    } else {
        shares(points, &weights)
    };
    Ok(Earn {
        points,
        eligible: true,
        applied_promotion_ids,
        line_points,
    })
}

/// floor(numerator × tier / (denominator × 10,000)) without overflow: the numerator alone
/// may reach 10^36, so the tier multiplies its quotient and remainder apart. `None` (refused
/// as too many points) only far beyond any purchase's cap.
fn times_tier(numerator: i128, denominator: i128, tier_bp: u32) -> Option<i128> {
    let bp = i128::from(BASE_MULTIPLIER_BP);
    let tier = i128::from(tier_bp);
    let (quotient, remainder) = (numerator / denominator, numerator % denominator);
    let scaled = quotient.checked_mul(tier)?;
    let (whole, part) = (scaled / bp, scaled % bp);
    let rest = part
        .checked_mul(denominator)?
        .checked_add(remainder.checked_mul(tier)?)?
        / denominator.checked_mul(bp)?;
    whole.checked_add(rest)
}

/// Splits `points` over lines in proportion to their weights, exactly: each line gets the
/// floor of its share, and the points that rounding left over go one each to the lines with
/// the largest remainders (the first line on a tie). Nothing is lost or made up.
pub fn shares(points: i64, weights: &[i128]) -> Vec<i64> {
    let total: i128 = weights.iter().sum();
    if total <= 0 || points <= 0 || weights.iter().any(|w| *w < 0) {
        return vec![0; weights.len()];
    }
    let points = i128::from(points);
    // points × weight must fit in 128 bits (weights reach 10^26, points 10^15): drop low bits
    // of the weights where needed. The split stays exact; only its proportions round.
    let mut shift = 0;
    while (total >> shift) > i128::MAX / points {
        shift += 1;
    }
    let weights: Vec<i128> = weights.iter().map(|w| w >> shift).collect();
    let total: i128 = weights.iter().sum();
    let mut shares: Vec<i64> = Vec::with_capacity(weights.len());
    let mut remainders: Vec<(i128, usize)> = Vec::with_capacity(weights.len());
    let mut given: i128 = 0;
    for (i, weight) in weights.iter().enumerate() {
        let exact = points * weight;
        let share = exact / total;
        given += share;
        shares.push(share as i64);
        remainders.push((exact % total, i));
    }
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, i) in remainders.into_iter().take((points - given) as usize) {
        shares[i] += 1;
    }
    shares
}

/// The promotion with the highest multiplier among the line's candidates that are running at
/// `at`; on a tie the one listed first. Promotions never stack.
fn best_promotion(
    promotions: &[Promotion],
    candidates: impl Iterator<Item = usize>,
    at: DateTime<Utc>,
) -> Option<usize> {
    let mut best: Option<usize> = None;
    for index in candidates {
        let promotion = &promotions[index];
        let running = promotion.starts_at <= at && at < promotion.ends_at;
        let better = best.is_none_or(|b| {
            let held = promotions[b].multiplier_bp;
            promotion.multiplier_bp > held || (promotion.multiplier_bp == held && index < b)
        });
        if running && better {
            best = Some(index);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::money::{Currency, MAX_AMOUNT_MINOR};
    use crate::points::rules::purchase::Line;
    use crate::programs::rules::{EarnRate, MAX_MULTIPLIER_BP};
    use chrono::TimeZone;

    fn eur() -> Currency {
        Currency::parse("currency", "EUR").unwrap()
    }

    fn rules() -> ProgramRules {
        ProgramRules::default_for(eur())
    }

    fn at(hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 27, hour, 0, 0).unwrap()
    }

    fn basket(lines: &[(&str, i64)]) -> Basket {
        Basket {
            currency: eur(),
            total_minor: lines.iter().map(|(_, a)| a).sum(),
            lines: lines
                .iter()
                .map(|(category, amount)| Line {
                    sku: "sku".into(),
                    category: category.to_string(),
                    quantity: 1,
                    amount_minor: *amount,
                })
                .collect(),
            occurred_at: at(12),
        }
    }

    fn points(rules: &ProgramRules, basket: &Basket) -> i64 {
        earn_under(rules, basket).unwrap().points
    }

    fn promotion(
        id: &str,
        multiplier_bp: u32,
        from: u32,
        to: u32,
        categories: &[&str],
    ) -> Promotion {
        Promotion {
            id: id.into(),
            multiplier_bp,
            starts_at: at(from),
            ends_at: at(to),
            categories: categories.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn one_point_per_euro_rounds_down() {
        assert_eq!(points(&rules(), &basket(&[("", 1999)])), 19);
        assert_eq!(points(&rules(), &basket(&[("", 99)])), 0);
        assert_eq!(points(&rules(), &basket(&[("", 0)])), 0);
    }

    #[test]
    fn rounding_happens_once_per_purchase_not_per_line() {
        // Two lines of 0.99 EUR: per-line rounding would give 0.
        assert_eq!(points(&rules(), &basket(&[("", 99), ("", 99)])), 1);
    }

    #[test]
    fn integer_ratio_earn_rate() {
        let mut rules = rules();
        rules.earn_rate = EarnRate {
            points: 5,
            currency_units: 2,
        };
        // 10.00 EUR → 25 points; 3.00 EUR → 7.5 → 7.
        assert_eq!(points(&rules, &basket(&[("", 1000)])), 25);
        assert_eq!(points(&rules, &basket(&[("", 300)])), 7);
    }

    #[test]
    fn currencies_without_cents_and_with_mills() {
        let jpy = Currency::parse("c", "JPY").unwrap();
        let bhd = Currency::parse("c", "BHD").unwrap();
        let mut b = basket(&[("", 1500)]);
        b.currency = jpy;
        assert_eq!(points(&ProgramRules::default_for(jpy), &b), 1500);
        b.currency = bhd;
        assert_eq!(points(&ProgramRules::default_for(bhd), &b), 1);
    }

    #[test]
    fn category_multipliers_apply_per_line() {
        let mut rules = rules();
        rules.category_multipliers.insert("coffee".into(), 15_000);
        rules.category_multipliers.insert("tobacco".into(), 0);
        // 10 EUR coffee at 1.5x + 10 EUR tobacco at 0x + 10 EUR other at 1x = 25.
        assert_eq!(
            points(
                &rules,
                &basket(&[("coffee", 1000), ("tobacco", 1000), ("", 1000)])
            ),
            25
        );
    }

    #[test]
    fn promotions_apply_inside_their_window_and_category() {
        let mut rules = rules();
        rules
            .promotions
            .push(promotion("double-coffee", 20_000, 10, 14, &["coffee"]));
        let mut b = basket(&[("coffee", 1000), ("tea", 1000)]);
        let result = earn_under(&rules, &b).unwrap();
        assert_eq!(result.points, 30);
        assert_eq!(result.applied_promotion_ids, ["double-coffee"]);
        b.occurred_at = at(14); // the window is half-open
        let result = earn_under(&rules, &b).unwrap();
        assert_eq!(result.points, 20);
        assert!(result.applied_promotion_ids.is_empty());
    }

    #[test]
    fn the_best_promotion_wins_and_multiplies_the_category() {
        let mut rules = rules();
        rules.category_multipliers.insert("coffee".into(), 15_000);
        rules
            .promotions
            .push(promotion("all-double", 20_000, 0, 23, &[]));
        rules
            .promotions
            .push(promotion("coffee-triple", 30_000, 0, 23, &["coffee"]));
        let result = earn_under(&rules, &basket(&[("coffee", 1000), ("tea", 1000)])).unwrap();
        // coffee: 10 × 1.5 × 3 = 45; tea: 10 × 1 × 2 = 20.
        assert_eq!(result.points, 65);
        assert_eq!(
            result.applied_promotion_ids,
            ["all-double", "coffee-triple"]
        );
    }

    #[test]
    fn a_basket_without_lines_earns_on_its_total() {
        let mut rules = rules();
        rules
            .promotions
            .push(promotion("all-double", 20_000, 0, 23, &[]));
        rules
            .promotions
            .push(promotion("coffee-only", 50_000, 0, 23, &["coffee"]));
        let mut b = basket(&[]);
        b.total_minor = 1000;
        assert_eq!(points(&rules, &b), 20);
    }

    #[test]
    fn minimum_purchase_amount() {
        let mut rules = rules();
        rules.minimum_purchase_minor = 500;
        let below = earn_under(&rules, &basket(&[("", 499)])).unwrap();
        assert_eq!((below.points, below.eligible), (0, false));
        let at_minimum = earn_under(&rules, &basket(&[("", 500)])).unwrap();
        assert_eq!((at_minimum.points, at_minimum.eligible), (5, true));
    }

    #[test]
    fn the_currency_must_be_the_programs() {
        let mut b = basket(&[("", 100)]);
        b.currency = Currency::parse("c", "USD").unwrap();
        match earn_under(&rules(), &b) {
            Err(Invalid(v)) => assert_eq!(v[0].field, "currency"),
            other => panic!("{other:?}"),
        }
    }

    /// A yen program (no minor units) earning `points` per yen.
    fn yen_rules(points: u32) -> ProgramRules {
        let mut rules = ProgramRules::default_for(Currency::parse("c", "JPY").unwrap());
        rules.earn_rate = EarnRate {
            points,
            currency_units: 1,
        };
        rules
    }

    /// A basket of one line of `amount` yen in `category`.
    fn yen_basket(category: &str, amount: i64) -> Basket {
        let mut b = basket(&[(category, amount)]);
        b.currency = Currency::parse("c", "JPY").unwrap();
        b
    }

    fn assert_refused_on_total(result: Result<Earn, Invalid>) {
        match result {
            Err(Invalid(v)) => assert_eq!(v[0].field, "total_minor"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn extreme_inputs_never_overflow() {
        let mut rules = yen_rules(1_000_000);
        rules
            .category_multipliers
            .insert("x".into(), MAX_MULTIPLIER_BP);
        rules
            .promotions
            .push(promotion("max", MAX_MULTIPLIER_BP, 0, 23, &[]));
        assert_refused_on_total(earn_under(&rules, &yen_basket("x", MAX_AMOUNT_MINOR)));
    }

    #[test]
    fn one_purchase_earns_at_most_the_cap() {
        let rules = yen_rules(1_000);
        let at_cap = yen_basket("", MAX_POINTS_PER_PURCHASE / 1_000);
        assert_eq!(
            earn_under(&rules, &at_cap).unwrap().points,
            MAX_POINTS_PER_PURCHASE
        );
        let over = yen_basket("", MAX_POINTS_PER_PURCHASE / 1_000 + 1);
        assert_refused_on_total(earn_under(&rules, &over));
    }

    /// The rule before the index: every promotion checked for every line.
    fn best_by_scanning(
        promotions: &[Promotion],
        category: &str,
        basket: &Basket,
    ) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (index, promotion) in promotions.iter().enumerate() {
            if promotion.matches(category, basket.occurred_at)
                && best.is_none_or(|b| promotion.multiplier_bp > promotions[b].multiplier_bp)
            {
                best = Some(index);
            }
        }
        best
    }

    proptest::proptest! {
        /// The index picks the same promotion as scanning every promotion, ties included.
        #[test]
        fn the_index_picks_what_scanning_all_promotions_would(
            promos in proptest::collection::vec(
                (0u32..4, 8u32..14, 12u32..18, proptest::collection::vec(0usize..5, 0..4)),
                0..8,
            ),
            lines in proptest::collection::vec(0usize..6, 1..10),
        ) {
            const CATEGORIES: [&str; 6] = ["a", "b", "c", "d", "e", ""];
            let promotions: Vec<Promotion> = promos
                .iter()
                .enumerate()
                .map(|(i, (m, from, to, cats))| {
                    let names: Vec<&str> = cats.iter().map(|c| CATEGORIES[*c]).collect();
                    promotion(&format!("p{i}"), 10_000 + m * 5_000, *from, *to, &names)
                })
                .collect();
            let b = basket(&lines.iter().map(|l| (CATEGORIES[*l], 100)).collect::<Vec<_>>());
            let index = PromotionIndex::new(&promotions);
            for line in &b.lines {
                proptest::prop_assert_eq!(
                    best_promotion(&promotions, index.candidates(&line.category), b.occurred_at),
                    best_by_scanning(&promotions, &line.category, &b)
                );
            }
        }
    }

    #[test]
    fn line_shares_add_up_to_the_points_exactly() {
        assert_eq!(shares(10, &[1, 1, 1]), [4, 3, 3]);
        assert_eq!(shares(7, &[300, 100]), [5, 2]);
        assert_eq!(shares(0, &[5, 5]), [0, 0]);
        assert_eq!(shares(5, &[0, 0]), [0, 0]);
        assert_eq!(shares(5, &[0, 3]), [0, 5]);
        // Extreme weights (10^26) and points (10^15) neither overflow nor lose a point.
        let huge = 10_i128.pow(26);
        let split = shares(MAX_POINTS_PER_PURCHASE, &[huge, huge / 3, 7]);
        assert_eq!(split.iter().sum::<i64>(), MAX_POINTS_PER_PURCHASE);
        assert!(split[0] > split[1] && split[1] > split[2]);
    }

    #[test]
    fn each_line_earns_its_share_of_the_rounded_purchase() {
        let mut rules = rules();
        rules.category_multipliers.insert("coffee".into(), 15_000);
        // 3.50 coffee at 1.5x = 5.25, 2.50 cake = 2.50: 7.75 → 7 points, split 5 / 2.
        let earned = earn_under(&rules, &basket(&[("coffee", 350), ("cake", 250)])).unwrap();
        assert_eq!(earned.points, 7);
        assert_eq!(earned.line_points, [5, 2]);
        let none = earn_under(&rules, &basket(&[])).unwrap();
        assert!(none.line_points.is_empty());
    }

    #[test]
    fn a_tier_multiplies_on_top_of_category_and_promotion_before_the_one_rounding() {
        let mut rules = rules();
        rules.category_multipliers.insert("coffee".into(), 15_000);
        let program = Program {
            promotion_index: PromotionIndex::new(&rules.promotions),
            rules,
            version: 1,
            updated_at: at(0),
        };
        let basket = basket(&[("coffee", 1_099)]);
        let at = basket.occurred_at;
        // 10.99 EUR × 1.5 = 16.485 points: 16 at 1×, 24.7275 → 24 at 1.5×, 32.97 → 32 at 2×.
        assert_eq!(earn_at(&program, &basket, at).unwrap().points, 16);
        assert_eq!(
            earn_at_tier(&program, &basket, at, 10_000).unwrap().points,
            16
        );
        assert_eq!(
            earn_at_tier(&program, &basket, at, 15_000).unwrap().points,
            24
        );
        assert_eq!(
            earn_at_tier(&program, &basket, at, 20_000).unwrap().points,
            32
        );
        // The largest numerator does not overflow: it is refused as too many points.
        assert_eq!(times_tier(i128::MAX / 2, 1, 1_000_000), None);
        assert_eq!(times_tier(7, 2, 15_000), Some(5));
    }
}
