//! The merchant's program: currency, earn rate, minimum purchase, category multipliers and
//! promotions. Validated once when an admin writes it; read on every checkout.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::greetings::rules::OccasionProgram;
use crate::platform::money::{self, Currency};
use crate::platform::validation::Invalid;
use crate::platform::validation::{self, Violations};
use crate::programs::lifecycle::Lifecycle;
use crate::status::rules::StatusThresholds;
use crate::tiers::rules::TierProgram;

/// 1x, in basis points.
pub const BASE_MULTIPLIER_BP: u32 = 10_000;
/// 100x: the largest multiplier a category or promotion may carry.
pub const MAX_MULTIPLIER_BP: u32 = 1_000_000;
pub const MAX_EARN_POINTS: u32 = 1_000_000;
pub const MAX_EARN_CURRENCY_UNITS: u32 = 1_000_000;
pub const MAX_CATEGORIES: usize = 1_000;
pub const MAX_PROMOTIONS: usize = 100;
/// Categories named by all promotions together: bounds the size of a program (a program of
/// 100 promotions naming 1,000 categories each was 0.7 MB) and the work of indexing it.
pub const MAX_PROMOTION_CATEGORIES: usize = 10_000;
pub const MAX_CATEGORY_CHARS: usize = 64;
/// How far back a receipt may be dated unless the program says otherwise.
pub const DEFAULT_MAX_RECEIPT_AGE_DAYS: u32 = 30;
/// Ten years: the most a program may allow.
pub const MAX_RECEIPT_AGE_DAYS: u32 = 3_650;

/// What a purchase dated further back than the program allows gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldReceipts {
    /// Refused (INVALID_ARGUMENT on `occurred_at`), nothing written. The default.
    Refuse,
    /// Earns under the rules of the moment it is recorded: promotions are matched against
    /// now, not against the receipt's date.
    EarnAtToday,
}

impl OldReceipts {
    /// The name stored in `programs.old_receipts`.
    pub fn as_str(self) -> &'static str {
        match self {
            OldReceipts::Refuse => "refuse",
            OldReceipts::EarnAtToday => "earn_at_today",
        }
    }

    pub fn parse(value: &str) -> Option<OldReceipts> {
        [OldReceipts::Refuse, OldReceipts::EarnAtToday]
            .into_iter()
            .find(|o| o.as_str() == value)
    }
}

/// How far back a receipt may be dated, and what happens to older ones. Without it a till
/// could date a receipt into the best promotion of any past day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiptAge {
    pub max_days: u32,
    pub older: OldReceipts,
}

impl Default for ReceiptAge {
    fn default() -> Self {
        ReceiptAge {
            max_days: DEFAULT_MAX_RECEIPT_AGE_DAYS,
            older: OldReceipts::Refuse,
        }
    }
}

impl ReceiptAge {
    /// The instant whose rules (promotions) a receipt dated `occurred_at` earns under when it
    /// is recorded at `now`: its own date if recent enough, otherwise `now` or a refusal, as
    /// the program says.
    pub fn earning_instant(
        &self,
        occurred_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<DateTime<Utc>, Invalid> {
        if now - occurred_at <= Duration::days(i64::from(self.max_days)) {
            return Ok(occurred_at);
        }
        match self.older {
            OldReceipts::EarnAtToday => Ok(now),
            OldReceipts::Refuse => Err(Invalid::field(
                "occurred_at",
                format!(
                    "is more than {} days ago, the oldest receipt the program accepts",
                    self.max_days
                ),
            )),
        }
    }
}

/// `points` points for every `currency_units` whole units of currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EarnRate {
    pub points: u32,
    pub currency_units: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promotion {
    pub id: String,
    pub multiplier_bp: u32,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    /// Empty: every line.
    pub categories: Vec<String>,
}

impl Promotion {
    /// Whether this promotion applies to a line of `category` bought at `at`.
    pub fn matches(&self, category: &str, at: DateTime<Utc>) -> bool {
        self.starts_at <= at
            && at < self.ends_at
            && (self.categories.is_empty() || self.categories.iter().any(|c| c == category))
    }
}

/// The promotions of a program by the category they name, built once per program version, so
/// that earning costs O(lines + matching promotions), not O(lines × all promotion categories).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromotionIndex {
    /// Category → the promotions naming it, in program order.
    by_category: HashMap<String, Vec<usize>>,
    /// Promotions that name no category: they apply to every line.
    every_line: Vec<usize>,
}

impl PromotionIndex {
    pub fn new(promotions: &[Promotion]) -> PromotionIndex {
        let mut index = PromotionIndex::default();
        for (i, promotion) in promotions.iter().enumerate() {
            if promotion.categories.is_empty() {
                index.every_line.push(i);
            }
            for category in &promotion.categories {
                let named = index.by_category.entry(category.clone()).or_default();
                // A category listed twice by one promotion counts once.
                if named.last() != Some(&i) {
                    named.push(i);
                }
            }
        }
        index
    }

    /// The promotions that may apply to a line of `category` (their windows still to be
    /// checked), by index into the program's promotions.
    pub fn candidates<'a>(&'a self, category: &str) -> impl Iterator<Item = usize> + 'a {
        let named = self
            .by_category
            .get(category)
            .map_or(&[][..], Vec::as_slice);
        self.every_line.iter().chain(named).copied()
    }
}

/// The rules as an admin writes them (everything but the version and update time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramRules {
    pub currency: Currency,
    pub earn_rate: EarnRate,
    pub minimum_purchase_minor: i64,
    pub category_multipliers: BTreeMap<String, u32>,
    pub promotions: Vec<Promotion>,
    pub receipt_age: ReceiptAge,
    /// Pending period, expiry, redemption and returns.
    pub lifecycle: Lifecycle,
    /// Which occasions are greeted, the holidays and the birthday reward.
    pub occasions: OccasionProgram,
    /// Repeat-purchase status thresholds.
    pub status: StatusThresholds,
    /// VIP tiers (none by default).
    pub tiers: TierProgram,
}

impl ProgramRules {
    /// The program every new merchant starts with: 1 point per whole unit of `currency`.
    pub fn default_for(currency: Currency) -> Self {
        ProgramRules {
            currency,
            earn_rate: EarnRate {
                points: 1,
                currency_units: 1,
            },
            minimum_purchase_minor: 0,
            category_multipliers: BTreeMap::new(),
            promotions: Vec::new(),
            receipt_age: ReceiptAge::default(),
            lifecycle: Lifecycle::default(),
            occasions: OccasionProgram::default(),
            status: StatusThresholds::default(),
            tiers: TierProgram::default(),
        }
    }

    /// How many days of a customer's purchases an assessment of their status and tier reads:
    /// the status's look-back and the tiers' window, whichever is longer. Stored with the
    /// program (`programs.look_back_days`) so checkout's first read can bound its purchases
    /// before it has the program's rules.
    pub fn look_back_days(&self) -> u32 {
        self.status.look_back_days().max(self.tiers.window_days)
    }

    pub fn category_multiplier_bp(&self, category: &str) -> u32 {
        self.category_multipliers
            .get(category)
            .copied()
            .unwrap_or(BASE_MULTIPLIER_BP)
    }
}

/// A stored program: its rules plus the version that grows on every update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    pub rules: ProgramRules,
    pub version: i64,
    pub updated_at: DateTime<Utc>,
    /// Built from `rules.promotions` when the program is loaded.
    pub promotion_index: PromotionIndex,
}

/// A category multiplier as the caller sent it (before duplicate and bound checks).
#[derive(Debug, Clone)]
pub struct CategoryMultiplierInput {
    pub category: String,
    pub multiplier_bp: u32,
}

/// A promotion as the caller sent it; the window ends are optional so that a missing one can
/// be reported as a violation of that very field.
#[derive(Debug, Clone)]
pub struct PromotionInput {
    pub id: String,
    pub multiplier_bp: u32,
    pub starts_at: Option<DateTime<Utc>>,
    pub ends_at: Option<DateTime<Utc>>,
    pub categories: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ProgramInput {
    pub currency: String,
    /// `None` when the caller left the earn rate out.
    pub earn_rate: Option<EarnRate>,
    pub minimum_purchase_minor: i64,
    pub category_multipliers: Vec<CategoryMultiplierInput>,
    pub promotions: Vec<PromotionInput>,
    /// 0 means the default ([`DEFAULT_MAX_RECEIPT_AGE_DAYS`]).
    pub max_receipt_age_days: u32,
    /// `None` means the default (refuse).
    pub old_receipts: Option<OldReceipts>,
    /// Checked by `parse` (its proto defaults already applied).
    pub lifecycle: Lifecycle,
    /// Checked by `parse`.
    pub occasions: OccasionProgram,
    pub status: StatusThresholds,
    /// Checked by `parse` (its proto defaults already applied).
    pub tiers: TierProgram,
}

impl ProgramRules {
    /// Validates an admin's program. Field names are those of `loyalty.v1.Program`, prefixed
    /// with `program.`.
    pub fn parse(input: ProgramInput) -> Result<ProgramRules, Invalid> {
        let mut v = Violations::default();
        let currency = v.check(Currency::parse("program.currency", &input.currency));

        let earn_rate = match input.earn_rate {
            None => {
                v.add("program.earn_rate", "is required");
                None
            }
            Some(rate) => {
                if rate.points > MAX_EARN_POINTS {
                    v.add(
                        "program.earn_rate.points",
                        format!("must be at most {MAX_EARN_POINTS}"),
                    );
                }
                if rate.currency_units == 0 {
                    v.add("program.earn_rate.currency_units", "must be at least 1");
                } else if rate.currency_units > MAX_EARN_CURRENCY_UNITS {
                    v.add(
                        "program.earn_rate.currency_units",
                        format!("must be at most {MAX_EARN_CURRENCY_UNITS}"),
                    );
                }
                Some(rate)
            }
        };

        let minimum = v.check(money::amount(
            "program.minimum_purchase_minor",
            input.minimum_purchase_minor,
        ));

        if input.category_multipliers.len() > MAX_CATEGORIES {
            v.add(
                "program.category_multipliers",
                format!("at most {MAX_CATEGORIES} entries"),
            );
        }
        let mut category_multipliers = BTreeMap::new();
        for (i, entry) in input
            .category_multipliers
            .iter()
            .enumerate()
            .take(MAX_CATEGORIES)
        {
            let field = format!("program.category_multipliers[{i}]");
            if let Some(category) = v.check(category(&format!("{field}.category"), &entry.category))
            {
                if category.is_empty() {
                    v.add(format!("{field}.category"), "must not be empty");
                } else if category_multipliers
                    .insert(category, entry.multiplier_bp)
                    .is_some()
                {
                    v.add(format!("{field}.category"), "is listed twice");
                }
            }
            if entry.multiplier_bp > MAX_MULTIPLIER_BP {
                v.add(
                    format!("{field}.multiplier_bp"),
                    format!("must be at most {MAX_MULTIPLIER_BP}"),
                );
            }
        }

        if input.promotions.len() > MAX_PROMOTIONS {
            v.add(
                "program.promotions",
                format!("at most {MAX_PROMOTIONS} entries"),
            );
        }
        let named_categories: usize = input.promotions.iter().map(|p| p.categories.len()).sum();
        if named_categories > MAX_PROMOTION_CATEGORIES {
            v.add(
                "program.promotions",
                format!(
                    "name {named_categories} categories in all; at most \
                     {MAX_PROMOTION_CATEGORIES} across all promotions"
                ),
            );
        }
        let mut promotions = Vec::new();
        let mut promotion_ids = HashSet::new();
        for (i, promo) in input
            .promotions
            .into_iter()
            .enumerate()
            .take(MAX_PROMOTIONS)
        {
            let field = format!("program.promotions[{i}]");
            let id = v.check(validation::identifier(&format!("{field}.id"), &promo.id));
            if let Some(id) = &id {
                if id.chars().count() > MAX_CATEGORY_CHARS {
                    v.add(
                        format!("{field}.id"),
                        format!("must be at most {MAX_CATEGORY_CHARS} characters"),
                    );
                } else if !promotion_ids.insert(id.clone()) {
                    v.add(format!("{field}.id"), "is used by another promotion");
                }
            }
            if promo.multiplier_bp > MAX_MULTIPLIER_BP {
                v.add(
                    format!("{field}.multiplier_bp"),
                    format!("must be at most {MAX_MULTIPLIER_BP}"),
                );
            }
            if promo.starts_at.is_none() {
                v.add(format!("{field}.starts_at"), "is required");
            }
            if promo.ends_at.is_none() {
                v.add(format!("{field}.ends_at"), "is required");
            }
            if let (Some(starts_at), Some(ends_at)) = (promo.starts_at, promo.ends_at)
                && ends_at <= starts_at
            {
                v.add(format!("{field}.ends_at"), "must be after starts_at");
            }
            if promo.categories.len() > MAX_CATEGORIES {
                v.add(
                    format!("{field}.categories"),
                    format!("at most {MAX_CATEGORIES} entries"),
                );
            }
            let mut categories = Vec::new();
            for (j, raw) in promo.categories.iter().enumerate().take(MAX_CATEGORIES) {
                let category_field = format!("{field}.categories[{j}]");
                match v.check(category(&category_field, raw)) {
                    Some(c) if c.is_empty() => v.add(category_field, "must not be empty"),
                    Some(c) => categories.push(c),
                    None => {}
                }
            }
            if let (Some(id), Some(starts_at), Some(ends_at)) = (id, promo.starts_at, promo.ends_at)
            {
                promotions.push(Promotion {
                    id,
                    multiplier_bp: promo.multiplier_bp,
                    starts_at,
                    ends_at,
                    categories,
                });
            }
        }

        let max_days = match input.max_receipt_age_days {
            0 => DEFAULT_MAX_RECEIPT_AGE_DAYS,
            days => days,
        };
        if max_days > MAX_RECEIPT_AGE_DAYS {
            v.add(
                "program.max_receipt_age_days",
                format!("must be at most {MAX_RECEIPT_AGE_DAYS}"),
            );
        }
        let receipt_age = ReceiptAge {
            max_days,
            older: input.old_receipts.unwrap_or(OldReceipts::Refuse),
        };
        input.lifecycle.check(&mut v);
        input.occasions.check(&mut v);
        input.status.check(&mut v);
        input.tiers.check(&mut v);

        match (currency, earn_rate, minimum) {
            (Some(currency), Some(earn_rate), Some(minimum_purchase_minor)) if v.is_empty() => {
                Ok(ProgramRules {
                    currency,
                    earn_rate,
                    minimum_purchase_minor,
                    category_multipliers,
                    promotions,
                    receipt_age,
                    lifecycle: input.lifecycle,
                    occasions: input.occasions,
                    status: input.status,
                    tiers: input.tiers,
                })
            }
            _ => Err(v.into_error()),
        }
    }
}

/// A line category: at most 64 characters, no control characters. Empty means "uncategorised".
pub fn category(field: &str, value: &str) -> Result<String, validation::Violation> {
    validation::text(field, value, MAX_CATEGORY_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn input() -> ProgramInput {
        ProgramInput {
            currency: "EUR".into(),
            earn_rate: Some(EarnRate {
                points: 1,
                currency_units: 1,
            }),
            minimum_purchase_minor: 0,
            category_multipliers: vec![],
            promotions: vec![],
            max_receipt_age_days: 0,
            old_receipts: None,
            lifecycle: Lifecycle::default(),
            occasions: OccasionProgram::default(),
            status: StatusThresholds::default(),
            tiers: TierProgram::default(),
        }
    }

    fn fields(result: Result<ProgramRules, Invalid>) -> Vec<String> {
        match result {
            Err(Invalid(v)) => v.into_iter().map(|v| v.field).collect(),
            other => panic!("expected violations, got {other:?}"),
        }
    }

    fn at(day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, day, 0, 0, 0).unwrap()
    }

    #[test]
    fn a_valid_program_parses() {
        let mut program = input();
        program.category_multipliers.push(CategoryMultiplierInput {
            category: "coffee".into(),
            multiplier_bp: 15_000,
        });
        program.promotions.push(PromotionInput {
            id: "black-friday".into(),
            multiplier_bp: 20_000,
            starts_at: Some(at(27)),
            ends_at: Some(at(28)),
            categories: vec!["coffee".into()],
        });
        let rules = ProgramRules::parse(program).unwrap();
        assert_eq!(rules.category_multiplier_bp("coffee"), 15_000);
        assert_eq!(rules.category_multiplier_bp("tea"), BASE_MULTIPLIER_BP);
        assert_eq!(rules.promotions[0].id, "black-friday");
    }

    #[test]
    fn every_bad_field_is_named() {
        let program = ProgramInput {
            currency: "EURO".into(),
            earn_rate: Some(EarnRate {
                points: MAX_EARN_POINTS + 1,
                currency_units: 0,
            }),
            minimum_purchase_minor: -1,
            category_multipliers: vec![
                CategoryMultiplierInput {
                    category: "a".into(),
                    multiplier_bp: 1,
                },
                CategoryMultiplierInput {
                    category: "a".into(),
                    multiplier_bp: MAX_MULTIPLIER_BP + 1,
                },
                CategoryMultiplierInput {
                    category: "".into(),
                    multiplier_bp: 1,
                },
            ],
            promotions: vec![
                PromotionInput {
                    id: "p".into(),
                    multiplier_bp: 2,
                    starts_at: Some(at(2)),
                    ends_at: Some(at(1)),
                    categories: vec!["".into()],
                },
                PromotionInput {
                    id: "p".into(),
                    multiplier_bp: 2,
                    starts_at: None,
                    ends_at: None,
                    categories: vec![],
                },
            ],
            max_receipt_age_days: MAX_RECEIPT_AGE_DAYS + 1,
            old_receipts: None,
            lifecycle: Lifecycle::default(),
            occasions: OccasionProgram::default(),
            status: StatusThresholds::default(),
            tiers: TierProgram::default(),
        };
        assert_eq!(
            fields(ProgramRules::parse(program)),
            [
                "program.currency",
                "program.earn_rate.points",
                "program.earn_rate.currency_units",
                "program.minimum_purchase_minor",
                "program.category_multipliers[1].category",
                "program.category_multipliers[1].multiplier_bp",
                "program.category_multipliers[2].category",
                "program.promotions[0].ends_at",
                "program.promotions[0].categories[0]",
                "program.promotions[1].id",
                "program.promotions[1].starts_at",
                "program.promotions[1].ends_at",
                "program.max_receipt_age_days",
            ]
        );
    }

    #[test]
    fn receipt_age_defaults_to_thirty_days_refused() {
        let rules = ProgramRules::parse(input()).unwrap();
        assert_eq!(rules.receipt_age, ReceiptAge::default());
        assert_eq!(rules.receipt_age.max_days, 30);
        assert_eq!(rules.receipt_age.older, OldReceipts::Refuse);
        let mut custom = input();
        custom.max_receipt_age_days = MAX_RECEIPT_AGE_DAYS;
        custom.old_receipts = Some(OldReceipts::EarnAtToday);
        let rules = ProgramRules::parse(custom).unwrap();
        assert_eq!(
            rules.receipt_age,
            ReceiptAge {
                max_days: MAX_RECEIPT_AGE_DAYS,
                older: OldReceipts::EarnAtToday
            }
        );
        for older in [OldReceipts::Refuse, OldReceipts::EarnAtToday] {
            assert_eq!(OldReceipts::parse(older.as_str()), Some(older));
        }
        assert_eq!(OldReceipts::parse("ignore"), None);
    }

    #[test]
    fn old_receipts_are_refused_or_earn_at_now() {
        let now = at(30);
        let refuse = ReceiptAge {
            max_days: 10,
            older: OldReceipts::Refuse,
        };
        let edge = now - Duration::days(10);
        assert_eq!(refuse.earning_instant(edge, now), Ok(edge));
        assert_eq!(refuse.earning_instant(now, now), Ok(now));
        let too_old = edge - Duration::seconds(1);
        let Err(Invalid(violations)) = refuse.earning_instant(too_old, now) else {
            panic!("an old receipt must be refused");
        };
        assert_eq!(violations[0].field, "occurred_at");
        assert!(violations[0].description.contains("10 days"));
        let today = ReceiptAge {
            older: OldReceipts::EarnAtToday,
            ..refuse
        };
        assert_eq!(today.earning_instant(too_old, now), Ok(now));
        assert_eq!(today.earning_instant(edge, now), Ok(edge));
    }

    #[test]
    fn earn_rate_is_required() {
        let mut program = input();
        program.earn_rate = None;
        assert_eq!(fields(ProgramRules::parse(program)), ["program.earn_rate"]);
    }

    #[test]
    fn promotion_window_is_half_open_and_category_scoped() {
        let promo = Promotion {
            id: "p".into(),
            multiplier_bp: 20_000,
            starts_at: at(1),
            ends_at: at(2),
            categories: vec!["coffee".into()],
        };
        assert!(promo.matches("coffee", at(1)));
        assert!(!promo.matches("coffee", at(2)));
        assert!(!promo.matches("tea", at(1)));
        let everything = Promotion {
            categories: vec![],
            ..promo
        };
        assert!(everything.matches("tea", at(1)));
        assert!(everything.matches("", at(1)));
    }
}
