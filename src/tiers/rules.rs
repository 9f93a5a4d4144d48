//! The pure rules of tiers. No I/O; time comes in as a parameter.
//!
//! A program defines its tiers lowest first, each with a threshold on one metric (the same
//! metric for all tiers: spend, visits or points earned) measured over a rolling window. A
//! customer holds one tier or none ([`TierStanding`]):
//!
//! - **Up at once**: whenever the value qualifies for a higher tier than the one held (the
//!   qualifying purchase, or any look after a program change), the customer holds it from now.
//! - **Down only after the grace, only by the sweep**: when the value falls below the held
//!   tier (the window slid, or a return took spend back), `below_since` records when; the tier
//!   stays for `grace_days`, and only the sweep ([`TierTrigger::Sweep`]) then moves the customer
//!   to the tier the value qualifies for (possibly several levels down, possibly none). A
//!   purchase or return never downgrades; qualifying again during the grace ends it.
//! - **Warned**: `warning_days` before the downgrade a warning is due, with what it takes to
//!   keep the tier ([`downgrade_warning`]).
//! - **Points are earned, not held**: the points metric counts points earned by purchases (net
//!   of return clawbacks), never the balance, so spending points never costs a tier.
//!
//! The earn multiplier of the tier *held when a purchase starts* applies to that purchase: the
//! purchase that qualifies for Gold earns at the old rate (with the points metric, anything else
//! would be circular), the next one at Gold's.

use std::collections::HashSet;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::platform::validation::{self, Violations};
use crate::programs::rules::{BASE_MULTIPLIER_BP, MAX_MULTIPLIER_BP};

pub const MAX_TIERS: usize = 20;
pub const MAX_TIER_ID_CHARS: usize = 64;
pub const MAX_TIER_NAME_CHARS: usize = 64;
pub const MAX_PERKS: usize = 20;
pub const MAX_PERK_CHARS: usize = 200;
/// Like gift prices: beyond this a threshold is surely a mistake (and far from overflow).
pub const MAX_THRESHOLD: i64 = 1_000_000_000_000_000;
/// Ten years: the longest window, grace or warning.
pub const MAX_DAYS: u32 = 3_650;
pub const DEFAULT_WINDOW_DAYS: u32 = 365;
pub const DEFAULT_GRACE_DAYS: u32 = 30;
pub const DEFAULT_WARNING_DAYS: u32 = 7;

/// What qualifies for a tier, summed over the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierMetric {
    /// Spend in minor units of the program currency: each purchase's total less what was
    /// returned of it.
    #[default]
    Spend,
    /// Visits: purchases not returned in full.
    Visits,
    /// Points earned by purchases, less what returns clawed back. Not the balance: redeeming or
    /// expiring points does not lower it.
    PointsEarned,
}

impl TierMetric {
    pub fn as_str(self) -> &'static str {
        match self {
            TierMetric::Spend => "spend",
            TierMetric::Visits => "visits",
            TierMetric::PointsEarned => "points_earned",
        }
    }
}

fn base_multiplier() -> u32 {
    BASE_MULTIPLIER_BP
}

/// One level of the program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tier {
    /// Stable key, stored with each customer's standing: a tier can be renamed without
    /// moving anyone.
    pub id: String,
    /// Shown to customers: "Gold".
    pub name: String,
    /// The value over the window that qualifies (spend in minor units, visits or points).
    pub threshold: i64,
    /// Applied to what a purchase earns, in basis points like the category and promotion
    /// multipliers (15,000 = 1.5×).
    #[serde(default = "base_multiplier")]
    pub earn_multiplier_bp: u32,
    /// Free text shown to apps: "Free delivery", "Priority support".
    #[serde(default)]
    pub perks: Vec<String>,
}

/// The tiers of a program. Stored as one JSON column (`programs.tiers`); a program written
/// before tiers existed, or without any, reads as no tiers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TierProgram {
    pub metric: TierMetric,
    /// The rolling window the metric is summed over.
    pub window_days: u32,
    /// How long a customer keeps a tier after they stop qualifying for it.
    pub grace_days: u32,
    /// How long before the downgrade the warning is due (0: no warning).
    pub warning_days: u32,
    /// Lowest first; thresholds strictly rising. Empty: the program has no tiers.
    pub levels: Vec<Tier>,
}

impl Default for TierProgram {
    fn default() -> Self {
        TierProgram {
            metric: TierMetric::default(),
            window_days: DEFAULT_WINDOW_DAYS,
            grace_days: DEFAULT_GRACE_DAYS,
            warning_days: DEFAULT_WARNING_DAYS,
            levels: Vec::new(),
        }
    }
}

impl TierProgram {
    /// Checks the bounds, naming fields of `loyalty.v1.Program` (`program.tiers.*`).
    pub fn check(&self, v: &mut Violations) {
        if !(1..=MAX_DAYS).contains(&self.window_days) {
            v.add(
                "program.tiers.window_days",
                format!("must be between 1 and {MAX_DAYS}"),
            );
        }
        if self.grace_days > MAX_DAYS {
            v.add(
                "program.tiers.grace_days",
                format!("must be at most {MAX_DAYS}"),
            );
        }
        if self.warning_days > self.grace_days.min(MAX_DAYS) {
            v.add(
                "program.tiers.warning_days",
                "must be at most grace_days (a warning comes within the grace)",
            );
        }
        if self.levels.len() > MAX_TIERS {
            v.add(
                "program.tiers.levels",
                format!("at most {MAX_TIERS} entries"),
            );
        }
        let mut ids = HashSet::new();
        let mut names = HashSet::new();
        let mut previous_threshold: Option<i64> = None;
        for (i, tier) in self.levels.iter().enumerate().take(MAX_TIERS) {
            let field = format!("program.tiers.levels[{i}]");
            if let Some(id) = v.check(validation::identifier(&format!("{field}.id"), &tier.id)) {
                if id.chars().count() > MAX_TIER_ID_CHARS {
                    v.add(
                        format!("{field}.id"),
                        format!("must be at most {MAX_TIER_ID_CHARS} characters"),
                    );
                } else if !ids.insert(id) {
                    v.add(format!("{field}.id"), "is used by another tier");
                }
            }
            let name_field = format!("{field}.name");
            if let Some(name) = v.check(validation::text(
                &name_field,
                &tier.name,
                MAX_TIER_NAME_CHARS,
            )) {
                if name.trim().is_empty() {
                    v.add(name_field, "must not be empty");
                } else if !names.insert(name.trim().to_lowercase()) {
                    // "Gold" and "gold " would look the same to a customer.
                    v.add(name_field, "is used by another tier");
                }
            }
            if !(0..=MAX_THRESHOLD).contains(&tier.threshold) {
                v.add(
                    format!("{field}.threshold"),
                    format!("must be between 0 and {MAX_THRESHOLD}"),
                );
            } else if previous_threshold.is_some_and(|p| tier.threshold <= p) {
                v.add(
                    format!("{field}.threshold"),
                    "must be above the threshold of the tier before it",
                );
            }
            previous_threshold = Some(tier.threshold);
            if !(BASE_MULTIPLIER_BP..=MAX_MULTIPLIER_BP).contains(&tier.earn_multiplier_bp) {
                v.add(
                    format!("{field}.earn_multiplier_bp"),
                    format!(
                        "must be between {BASE_MULTIPLIER_BP} (1×) and {MAX_MULTIPLIER_BP} (100×)"
                    ),
                );
            }
            if tier.perks.len() > MAX_PERKS {
                v.add(
                    format!("{field}.perks"),
                    format!("at most {MAX_PERKS} entries"),
                );
            }
            for (j, perk) in tier.perks.iter().enumerate().take(MAX_PERKS) {
                let perk_field = format!("{field}.perks[{j}]");
                if let Some(perk) = v.check(validation::text(&perk_field, perk, MAX_PERK_CHARS))
                    && perk.trim().is_empty()
                {
                    v.add(perk_field, "must not be empty");
                }
            }
        }
    }

    /// The rank (index into `levels`) of the highest tier `value` qualifies for; `None` below
    /// the lowest.
    pub fn qualified_rank(&self, value: i64) -> Option<usize> {
        // Thresholds rise (checked on write), so the last one reached is the highest.
        self.levels.iter().rposition(|tier| tier.threshold <= value)
    }

    /// The highest tier `value` qualifies for.
    pub fn qualified_tier(&self, value: i64) -> Option<&Tier> {
        self.qualified_rank(value).map(|rank| &self.levels[rank])
    }

    pub fn rank_of(&self, tier_id: &str) -> Option<usize> {
        self.levels.iter().position(|tier| tier.id == tier_id)
    }

    /// The tier the customer holds, if it is still one of the program's.
    pub fn held_tier(&self, standing: &TierStanding) -> Option<&Tier> {
        let rank = self.rank_of(standing.tier_id.as_deref()?)?;
        Some(&self.levels[rank])
    }

    /// The multiplier a purchase earns with (QuotePurchase and RecordPurchase): the held tier's,
    /// 1× without one.
    pub fn earn_multiplier_bp(&self, standing: &TierStanding) -> u32 {
        self.held_tier(standing)
            .map_or(BASE_MULTIPLIER_BP, |tier| tier.earn_multiplier_bp)
    }

    /// When the grace of a customer below their tier ends: the sweep's downgrade.
    pub fn downgrade_at(&self, standing: &TierStanding) -> Option<DateTime<Utc>> {
        standing
            .below_since?
            .checked_add_signed(days(self.grace_days))
    }

    /// When the warning before the downgrade is due.
    pub fn warning_at(&self, standing: &TierStanding) -> Option<DateTime<Utc>> {
        if self.warning_days == 0 {
            return None;
        }
        let downgrade_at = self.downgrade_at(standing)?;
        // Never before the grace began (a warning as long as the grace warns at once).
        Some(
            downgrade_at
                .checked_sub_signed(days(self.warning_days))
                .unwrap_or(DateTime::<Utc>::MIN_UTC)
                .max(standing.below_since?),
        )
    }
}

/// What a customer holds. Stored per customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierStanding {
    /// The id of the tier held; `None`: no tier.
    pub tier_id: Option<String>,
    /// When the held tier was reached (for no tier: when the customer was first looked at, or
    /// left their last tier).
    pub since: DateTime<Utc>,
    /// Since when the customer no longer qualifies for the held tier; `None` while they do.
    pub below_since: Option<DateTime<Utc>>,
}

impl TierStanding {
    /// A customer who holds no tier yet.
    pub fn untiered(since: DateTime<Utc>) -> TierStanding {
        TierStanding {
            tier_id: None,
            since,
            below_since: None,
        }
    }
}

/// What made the service look at a customer's tier. Only the sweep downgrades.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierTrigger {
    Purchase,
    Return,
    Sweep,
}

/// What a look at a customer's tier changed (an event for the outbox).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TierEvent {
    Upgraded {
        from: Option<String>,
        to: String,
    },
    /// The sweep, once the grace had passed.
    Downgraded {
        from: String,
        to: Option<String>,
    },
    /// The held tier is no longer in the program: the customer is placed where the value
    /// qualifies, at once (there is no tier left to hold during a grace).
    Replaced {
        from: String,
        to: Option<String>,
    },
    /// The customer stopped qualifying for the held tier; they keep it until `downgrade_at`.
    GraceStarted {
        tier_id: String,
        downgrade_at: Option<DateTime<Utc>>,
    },
    /// Qualifying again during the grace: it ends, the tier stays.
    Requalified {
        tier_id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierDecision {
    /// To store (unchanged when nothing happened).
    pub standing: TierStanding,
    pub event: Option<TierEvent>,
}

/// The standing after a look at `now`, with `value` the metric over the window now.
pub fn next_standing(
    program: &TierProgram,
    current: &TierStanding,
    value: i64,
    trigger: TierTrigger,
    now: DateTime<Utc>,
) -> TierDecision {
    let qualified = program.qualified_rank(value);
    let id_of = |rank: Option<usize>| rank.map(|r| program.levels[r].id.clone());
    let held = match &current.tier_id {
        None => None,
        Some(id) => match program.rank_of(id) {
            Some(rank) => Some(rank),
            None => {
                let to = id_of(qualified);
                return TierDecision {
                    standing: TierStanding {
                        tier_id: to.clone(),
                        since: now,
                        below_since: None,
                    },
                    event: Some(TierEvent::Replaced {
                        from: id.clone(),
                        to,
                    }),
                };
            }
        },
    };
    // `None` (no tier) ranks below every tier.
    if qualified > held {
        let to = id_of(qualified).unwrap_or_default();
        return TierDecision {
            standing: TierStanding {
                tier_id: Some(to.clone()),
                since: now,
                below_since: None,
            },
            event: Some(TierEvent::Upgraded {
                from: current.tier_id.clone(),
                to,
            }),
        };
    }
    let Some(held_id) = id_of(held) else {
        // No tier held, none reached.
        return TierDecision {
            standing: current.clone(),
            event: None,
        };
    };
    if qualified == held {
        return match current.below_since {
            Some(_) => TierDecision {
                standing: TierStanding {
                    below_since: None,
                    ..current.clone()
                },
                event: Some(TierEvent::Requalified { tier_id: held_id }),
            },
            None => TierDecision {
                standing: current.clone(),
                event: None,
            },
        };
    }
    // Below the held tier: in the grace, or past it.
    let below = TierStanding {
        below_since: Some(current.below_since.unwrap_or(now)),
        ..current.clone()
    };
    let downgrade_at = program.downgrade_at(&below);
    if trigger == TierTrigger::Sweep && downgrade_at.is_some_and(|at| now >= at) {
        let to = id_of(qualified);
        return TierDecision {
            standing: TierStanding {
                tier_id: to.clone(),
                since: now,
                below_since: None,
            },
            event: Some(TierEvent::Downgraded { from: held_id, to }),
        };
    }
    let event = current
        .below_since
        .is_none()
        .then_some(TierEvent::GraceStarted {
            tier_id: held_id,
            downgrade_at,
        });
    TierDecision {
        standing: below,
        event,
    }
}

/// What keeps the held tier: `needed` more of the metric (now: the window keeps sliding),
/// before `by` when the customer is in the grace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeepTier {
    pub tier_id: String,
    pub metric: TierMetric,
    /// 0 while the customer qualifies.
    pub needed: i64,
    pub by: Option<DateTime<Utc>>,
}

/// What the held tier asks of a customer whose value is `value`; `None` without a tier.
pub fn keep_tier(program: &TierProgram, standing: &TierStanding, value: i64) -> Option<KeepTier> {
    let tier = program.held_tier(standing)?;
    Some(KeepTier {
        tier_id: tier.id.clone(),
        metric: program.metric,
        needed: shortfall(tier.threshold, value),
        by: program.downgrade_at(standing),
    })
}

/// The warning before a downgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DowngradeWarning {
    pub tier_id: String,
    pub downgrade_at: DateTime<Utc>,
    /// The grace this warning is about: with the customer and `tier_id`, the key that sends it
    /// once.
    pub below_since: DateTime<Utc>,
    /// Where the customer falls if nothing changes (the tier today's value qualifies for).
    pub falls_to: Option<String>,
    pub keep: KeepTier,
}

/// The warning due at `now`: in the last `warning_days` of the grace, while the value is
/// still below the held tier. The store sends it once per grace (keyed by `below_since`).
pub fn downgrade_warning(
    program: &TierProgram,
    standing: &TierStanding,
    value: i64,
    now: DateTime<Utc>,
) -> Option<DowngradeWarning> {
    let tier = program.held_tier(standing)?;
    let below_since = standing.below_since?;
    let downgrade_at = program.downgrade_at(standing)?;
    let warning_at = program.warning_at(standing)?;
    if value >= tier.threshold || now < warning_at || now >= downgrade_at {
        return None;
    }
    Some(DowngradeWarning {
        tier_id: tier.id.clone(),
        downgrade_at,
        below_since,
        falls_to: program.qualified_tier(value).map(|t| t.id.clone()),
        keep: keep_tier(program, standing, value)?,
    })
}

/// How far the customer is from the next tier (GetBalance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierProgress {
    pub next_tier_id: String,
    pub next_tier_name: String,
    pub metric: TierMetric,
    pub window_days: u32,
    pub value: i64,
    pub threshold: i64,
    /// How much more of the metric, within the window, reaches it.
    pub needed: i64,
}

/// Progress to the tier above both the one held and the one qualified for; `None` at the top
/// (or with no tiers).
pub fn progress(
    program: &TierProgram,
    standing: &TierStanding,
    value: i64,
) -> Option<TierProgress> {
    let held = standing
        .tier_id
        .as_deref()
        .and_then(|id| program.rank_of(id));
    let next = match held.max(program.qualified_rank(value)) {
        None => 0,
        Some(rank) => rank.checked_add(1)?,
    };
    let tier = program.levels.get(next)?;
    Some(TierProgress {
        next_tier_id: tier.id.clone(),
        next_tier_name: tier.name.clone(),
        metric: program.metric,
        window_days: program.window_days,
        value,
        threshold: tier.threshold,
        needed: shortfall(tier.threshold, value),
    })
}

/// What one purchase adds to the metric: its spend (net of returns), 1 visit (0 if returned in
/// full), or its points (net of clawbacks), at the purchase's instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contribution {
    pub at: DateTime<Utc>,
    pub amount: i64,
}

/// The metric at `now`: the contributions within the window `(now - window, now]`.
pub fn metric_value(
    program: &TierProgram,
    contributions: &[Contribution],
    now: DateTime<Utc>,
) -> i64 {
    let start = earlier(now, days(program.window_days));
    sum(contributions
        .iter()
        .filter(|c| c.at > start && c.at <= now)
        .map(|c| c.amount))
}

/// The instant the customer stops qualifying for `threshold` if nothing new comes: when
/// enough of today's contributions have left the window. `None` when they do not qualify now,
/// or never stop (a threshold of 0).
pub fn qualified_until(
    program: &TierProgram,
    contributions: &[Contribution],
    threshold: i64,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let window = days(program.window_days);
    let start = earlier(now, window);
    let mut counting: Vec<Contribution> = contributions
        .iter()
        .filter(|c| c.at > start && c.at <= now)
        .copied()
        .collect();
    counting.sort_unstable_by_key(|c| c.at);
    let mut value = sum(counting.iter().map(|c| c.amount));
    if value < threshold {
        return None;
    }
    for c in counting {
        value = value.saturating_sub(c.amount);
        if value < threshold {
            return c.at.checked_add_signed(window);
        }
    }
    None
}

/// When the sweep should look at the customer next: the warning, the downgrade, or when they
/// would stop qualifying for the held tier. `None`: nothing time-driven is ahead.
pub fn review_at(
    program: &TierProgram,
    standing: &TierStanding,
    contributions: &[Contribution],
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let tier = program.held_tier(standing)?;
    if standing.below_since.is_some() {
        return [program.warning_at(standing), program.downgrade_at(standing)]
            .into_iter()
            .flatten()
            .filter(|t| *t > now)
            .min()
            // Both passed: the downgrade is overdue.
            .or(Some(now));
    }
    if metric_value(program, contributions, now) < tier.threshold {
        // Below the tier with no grace recorded yet: look now.
        return Some(now);
    }
    qualified_until(program, contributions, tier.threshold, now)
}

fn shortfall(threshold: i64, value: i64) -> i64 {
    threshold.saturating_sub(value.max(0)).max(0)
}

fn sum(amounts: impl Iterator<Item = i64>) -> i64 {
    amounts.fold(0i64, |total, amount| total.saturating_add(amount))
}

fn days(n: u32) -> TimeDelta {
    TimeDelta::try_days(i64::from(n)).unwrap_or(TimeDelta::MAX)
}

fn earlier(t: DateTime<Utc>, span: TimeDelta) -> DateTime<Utc> {
    t.checked_sub_signed(span)
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn day(n: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap() + TimeDelta::days(n)
    }

    fn tier(id: &str, threshold: i64, earn_multiplier_bp: u32) -> Tier {
        Tier {
            id: id.into(),
            name: id.to_uppercase(),
            threshold,
            earn_multiplier_bp,
            perks: vec![],
        }
    }

    /// Spend over 365 days: Bronze from 0, Silver from 1,000.00, Gold from 5,000.00; 30 days
    /// of grace, warned 7 days before.
    fn program() -> TierProgram {
        TierProgram {
            levels: vec![
                tier("bronze", 0, 10_000),
                tier("silver", 100_000, 12_500),
                tier("gold", 500_000, 15_000),
            ],
            ..TierProgram::default()
        }
    }

    fn holding(tier_id: &str, since: i64) -> TierStanding {
        TierStanding {
            tier_id: Some(tier_id.into()),
            since: day(since),
            below_since: None,
        }
    }

    fn fields(program: TierProgram) -> Vec<String> {
        let mut v = Violations::default();
        program.check(&mut v);
        v.into_error().0.into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn an_empty_object_is_no_tiers_and_the_stored_form_reads_back() {
        let none: TierProgram = serde_json::from_str("{}").unwrap();
        assert_eq!(none, TierProgram::default());
        assert!(none.levels.is_empty());
        assert_eq!(
            (
                none.metric,
                none.window_days,
                none.grace_days,
                none.warning_days
            ),
            (TierMetric::Spend, 365, 30, 7)
        );
        let mut p = program();
        p.metric = TierMetric::PointsEarned;
        p.levels[2].perks = vec!["Free delivery".into(), "Priority support".into()];
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<TierProgram>(&json).unwrap(), p);
        // A tier written without multiplier or perks: 1×, none.
        let t: Tier =
            serde_json::from_str(r#"{"id": "gold", "name": "Gold", "threshold": 5}"#).unwrap();
        assert_eq!(
            (t.earn_multiplier_bp, t.perks.len()),
            (BASE_MULTIPLIER_BP, 0)
        );
        assert!(fields(program()).is_empty());
        assert!(fields(TierProgram::default()).is_empty());
    }

    #[test]
    fn bounds_name_their_fields() {
        let mut bad = program();
        bad.window_days = 0;
        bad.grace_days = MAX_DAYS + 1;
        bad.levels = vec![
            Tier {
                perks: vec!["ok".into(), " ".into()],
                ..tier("bronze", -1, 9_999)
            },
            tier("bronze", 10, MAX_MULTIPLIER_BP + 1),
            Tier {
                name: "bronze ".into(),
                ..tier("silver", 10, 10_000)
            },
            Tier {
                name: "".into(),
                ..tier("", MAX_THRESHOLD + 1, 10_000)
            },
        ];
        assert_eq!(
            fields(bad),
            [
                "program.tiers.window_days",
                "program.tiers.grace_days",
                "program.tiers.levels[0].threshold",
                "program.tiers.levels[0].earn_multiplier_bp",
                "program.tiers.levels[0].perks[1]",
                "program.tiers.levels[1].id",
                "program.tiers.levels[1].name",
                "program.tiers.levels[1].earn_multiplier_bp",
                "program.tiers.levels[2].name",
                "program.tiers.levels[2].threshold",
                "program.tiers.levels[3].id",
                "program.tiers.levels[3].name",
                "program.tiers.levels[3].threshold",
            ]
        );
        let mut warned_too_early = program();
        warned_too_early.warning_days = 31;
        assert_eq!(fields(warned_too_early), ["program.tiers.warning_days"]);
        let mut many = program();
        many.levels = (0..=MAX_TIERS as i64)
            .map(|i| tier(&format!("t{i}"), i, 10_000))
            .collect();
        assert_eq!(fields(many), ["program.tiers.levels"]);
    }

    #[test]
    fn the_highest_threshold_reached_qualifies() {
        let p = program();
        assert_eq!(p.qualified_rank(-5), None);
        assert_eq!(p.qualified_tier(0).unwrap().id, "bronze");
        assert_eq!(p.qualified_tier(99_999).unwrap().id, "bronze");
        assert_eq!(p.qualified_tier(100_000).unwrap().id, "silver");
        assert_eq!(p.qualified_tier(i64::MAX).unwrap().id, "gold");
        assert_eq!(TierProgram::default().qualified_rank(i64::MAX), None);
    }

    #[test]
    fn up_at_once_on_the_qualifying_purchase_even_across_levels() {
        let p = program();
        let d = next_standing(
            &p,
            &holding("bronze", 0),
            100_000,
            TierTrigger::Purchase,
            day(5),
        );
        assert_eq!(d.standing, holding("silver", 5));
        assert_eq!(
            d.event,
            Some(TierEvent::Upgraded {
                from: Some("bronze".into()),
                to: "silver".into()
            })
        );
        let d = next_standing(
            &p,
            &TierStanding::untiered(day(0)),
            600_000,
            TierTrigger::Purchase,
            day(5),
        );
        assert_eq!(d.standing.tier_id.as_deref(), Some("gold"));
        // Nothing new: nothing stored, no event.
        let d = next_standing(
            &p,
            &holding("silver", 5),
            150_000,
            TierTrigger::Purchase,
            day(6),
        );
        assert_eq!((d.standing, d.event), (holding("silver", 5), None));
    }

    #[test]
    fn down_only_by_the_sweep_once_the_grace_has_passed() {
        let p = program();
        // Gold since day 0; by day 400 the window holds 3,000.00: Silver's value.
        let started = next_standing(
            &p,
            &holding("gold", 0),
            300_000,
            TierTrigger::Sweep,
            day(400),
        );
        assert_eq!(started.standing.tier_id.as_deref(), Some("gold"));
        assert_eq!(started.standing.below_since, Some(day(400)));
        assert_eq!(
            started.event,
            Some(TierEvent::GraceStarted {
                tier_id: "gold".into(),
                downgrade_at: Some(day(430))
            })
        );
        assert_eq!(
            p.earn_multiplier_bp(&started.standing),
            15_000,
            "Gold's, in the grace"
        );
        // A second before the grace ends: still Gold, nothing to report.
        let edge = day(430) - TimeDelta::seconds(1);
        let d = next_standing(&p, &started.standing, 300_000, TierTrigger::Sweep, edge);
        assert_eq!((&d.standing, &d.event), (&started.standing, &None));
        // At the end of the grace exactly: down to the tier the value qualifies for.
        let d = next_standing(&p, &started.standing, 300_000, TierTrigger::Sweep, day(430));
        assert_eq!(d.standing, holding("silver", 430));
        assert_eq!(
            d.event,
            Some(TierEvent::Downgraded {
                from: "gold".into(),
                to: Some("silver".into())
            })
        );
        // Past the grace with nothing left: below every tier.
        let mut p_no_base = p.clone();
        p_no_base.levels.remove(0);
        let d = next_standing(
            &p_no_base,
            &started.standing,
            0,
            TierTrigger::Sweep,
            day(431),
        );
        assert_eq!(d.standing.tier_id, None);
    }

    #[test]
    fn qualifying_again_in_the_grace_ends_it() {
        let p = program();
        let mut in_grace = holding("gold", 0);
        in_grace.below_since = Some(day(400));
        // A purchase, not enough: the grace goes on from its start.
        let d = next_standing(&p, &in_grace, 450_000, TierTrigger::Purchase, day(410));
        assert_eq!((&d.standing, &d.event), (&in_grace, &None));
        // Enough.
        let d = next_standing(&p, &in_grace, 500_000, TierTrigger::Purchase, day(420));
        assert_eq!(d.standing, holding("gold", 0));
        assert_eq!(
            d.event,
            Some(TierEvent::Requalified {
                tier_id: "gold".into()
            })
        );
    }

    #[test]
    fn a_return_can_cost_the_qualification_but_never_the_tier_within_the_grace() {
        let p = program();
        // The purchase that makes Gold...
        let up = next_standing(
            &p,
            &holding("silver", 0),
            520_000,
            TierTrigger::Purchase,
            day(10),
        );
        assert_eq!(up.standing, holding("gold", 10));
        // ... is returned two days later: below Gold, the grace starts.
        let returned = next_standing(&p, &up.standing, 200_000, TierTrigger::Return, day(12));
        assert_eq!(returned.standing.tier_id.as_deref(), Some("gold"));
        assert_eq!(returned.standing.below_since, Some(day(12)));
        assert!(matches!(
            returned.event,
            Some(TierEvent::GraceStarted { .. })
        ));
        // A second return after the grace has passed still does not downgrade ...
        let again = next_standing(
            &p,
            &returned.standing,
            150_000,
            TierTrigger::Return,
            day(50),
        );
        assert_eq!(again.standing, returned.standing);
        assert_eq!(again.event, None);
        // ... the sweep does.
        let swept = next_standing(&p, &again.standing, 150_000, TierTrigger::Sweep, day(50));
        assert_eq!(swept.standing, holding("silver", 50));
        // With no grace the next sweep downgrades, a return still does not.
        let mut no_grace = program();
        no_grace.grace_days = 0;
        no_grace.warning_days = 0;
        let r = next_standing(
            &no_grace,
            &up.standing,
            200_000,
            TierTrigger::Return,
            day(12),
        );
        assert_eq!(r.standing.tier_id.as_deref(), Some("gold"));
        let s = next_standing(&no_grace, &r.standing, 200_000, TierTrigger::Sweep, day(12));
        assert_eq!(s.standing.tier_id.as_deref(), Some("silver"));
    }

    #[test]
    fn a_tier_removed_from_the_program_is_replaced_at_once() {
        let mut p = program();
        p.levels.retain(|t| t.id != "gold");
        let d = next_standing(
            &p,
            &holding("gold", 0),
            600_000,
            TierTrigger::Purchase,
            day(3),
        );
        assert_eq!(d.standing, holding("silver", 3));
        assert_eq!(
            d.event,
            Some(TierEvent::Replaced {
                from: "gold".into(),
                to: Some("silver".into())
            })
        );
        assert_eq!(
            p.earn_multiplier_bp(&holding("gold", 0)),
            BASE_MULTIPLIER_BP
        );
        assert_eq!(
            p.earn_multiplier_bp(&TierStanding::untiered(day(0))),
            BASE_MULTIPLIER_BP
        );
        assert_eq!(p.earn_multiplier_bp(&holding("silver", 0)), 12_500);
    }

    #[test]
    fn the_warning_comes_in_the_last_days_of_the_grace_with_what_keeps_the_tier() {
        let p = program();
        let mut in_grace = holding("gold", 0);
        in_grace.below_since = Some(day(100));
        // Downgrade at 130, warning from 123.
        assert_eq!(p.warning_at(&in_grace), Some(day(123)));
        let edge = day(123) - TimeDelta::seconds(1);
        assert_eq!(downgrade_warning(&p, &in_grace, 420_000, edge), None);
        let w = downgrade_warning(&p, &in_grace, 420_000, day(123)).unwrap();
        assert_eq!(
            w,
            DowngradeWarning {
                tier_id: "gold".into(),
                downgrade_at: day(130),
                below_since: day(100),
                falls_to: Some("silver".into()),
                keep: KeepTier {
                    tier_id: "gold".into(),
                    metric: TierMetric::Spend,
                    needed: 80_000,
                    by: Some(day(130)),
                },
            }
        );
        assert!(
            downgrade_warning(&p, &in_grace, 420_000, day(130) - TimeDelta::seconds(1)).is_some()
        );
        // At the downgrade it is too late; qualifying again, no warning.
        assert_eq!(downgrade_warning(&p, &in_grace, 420_000, day(130)), None);
        assert_eq!(downgrade_warning(&p, &in_grace, 500_000, day(125)), None);
        // Not in a grace, or no tier: none.
        assert_eq!(
            downgrade_warning(&p, &holding("gold", 0), 0, day(125)),
            None
        );
        // No warning days: none; as many as the grace: at once.
        let mut silent = program();
        silent.warning_days = 0;
        assert_eq!(downgrade_warning(&silent, &in_grace, 0, day(129)), None);
        let mut early = program();
        early.warning_days = 30;
        assert!(downgrade_warning(&early, &in_grace, 0, day(100)).is_some());
    }

    #[test]
    fn progress_is_to_the_tier_above_the_one_held() {
        let p = program();
        let pr = progress(&p, &holding("bronze", 0), 40_000).unwrap();
        assert_eq!(
            pr,
            TierProgress {
                next_tier_id: "silver".into(),
                next_tier_name: "SILVER".into(),
                metric: TierMetric::Spend,
                window_days: 365,
                value: 40_000,
                threshold: 100_000,
                needed: 60_000,
            }
        );
        assert_eq!(progress(&p, &holding("gold", 0), 0), None, "the top");
        // Held Silver in its grace (value at Bronze): the next is still Gold.
        assert_eq!(
            progress(&p, &holding("silver", 0), 20_000)
                .unwrap()
                .next_tier_id,
            "gold"
        );
        // Not assessed yet but qualifying higher: above that.
        assert_eq!(
            progress(&p, &TierStanding::untiered(day(0)), 200_000)
                .unwrap()
                .needed,
            300_000
        );
        let mut no_base = program();
        no_base.levels.remove(0);
        let pr = progress(&no_base, &TierStanding::untiered(day(0)), -50).unwrap();
        assert_eq!((pr.next_tier_id.as_str(), pr.needed), ("silver", 100_000));
        assert_eq!(progress(&TierProgram::default(), &holding("x", 0), 5), None);
        let keep = keep_tier(&p, &holding("silver", 0), 150_000).unwrap();
        assert_eq!((keep.needed, keep.by), (0, None));
    }

    fn spent(on: &[(i64, i64)]) -> Vec<Contribution> {
        on.iter()
            .map(|(d, amount)| Contribution {
                at: day(*d),
                amount: *amount,
            })
            .collect()
    }

    #[test]
    fn the_metric_is_summed_over_the_rolling_window() {
        let p = program();
        let c = spent(&[(0, 60_000), (100, 50_000), (365, 1_000), (366, 7)]);
        // At day 365, day 0 has just left (window (day 0, day 365]); day 366 is ahead.
        assert_eq!(metric_value(&p, &c, day(365)), 51_000);
        assert_eq!(
            metric_value(&p, &c, day(365) - TimeDelta::seconds(1)),
            110_000
        );
        // Returns lower a purchase's contribution at its own instant.
        let returned = spent(&[(0, 60_000), (100, 50_000 - 20_000)]);
        assert_eq!(metric_value(&p, &returned, day(200)), 90_000);
    }

    #[test]
    fn qualified_until_and_the_sweep_s_next_look() {
        let p = program();
        let c = spent(&[(0, 60_000), (100, 50_000)]);
        // 1,100.00 at day 200: Silver until day 0 leaves the window.
        assert_eq!(qualified_until(&p, &c, 100_000, day(200)), Some(day(365)));
        assert_eq!(qualified_until(&p, &c, 40_000, day(200)), Some(day(465)));
        assert_eq!(qualified_until(&p, &c, 0, day(200)), None, "never lapses");
        assert_eq!(qualified_until(&p, &c, 500_000, day(200)), None, "not now");

        assert_eq!(
            review_at(&p, &holding("silver", 100), &c, day(200)),
            Some(day(365))
        );
        assert_eq!(
            review_at(&p, &holding("gold", 100), &c, day(200)),
            Some(day(200))
        );
        assert_eq!(
            review_at(&p, &TierStanding::untiered(day(0)), &c, day(200)),
            None
        );
        let mut in_grace = holding("gold", 0);
        in_grace.below_since = Some(day(100));
        assert_eq!(review_at(&p, &in_grace, &c, day(110)), Some(day(123)));
        assert_eq!(review_at(&p, &in_grace, &c, day(123)), Some(day(130)));
        assert_eq!(
            review_at(&p, &in_grace, &c, day(140)),
            Some(day(140)),
            "overdue"
        );
    }

    #[test]
    fn no_input_makes_the_rules_panic() {
        let mut odd = program();
        odd.window_days = u32::MAX;
        odd.grace_days = u32::MAX;
        odd.warning_days = u32::MAX;
        // Unchecked: thresholds out of order.
        odd.levels.reverse();
        let instants = [DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC, day(0)];
        let contributions: Vec<Contribution> = instants
            .iter()
            .flat_map(|at| {
                [i64::MIN, -1, 0, i64::MAX].map(|amount| Contribution { at: *at, amount })
            })
            .collect();
        for p in [program(), odd, TierProgram::default()] {
            for now in instants {
                for value in [i64::MIN, -1, 0, 100_000, i64::MAX] {
                    for below_since in [
                        None,
                        Some(DateTime::<Utc>::MIN_UTC),
                        Some(DateTime::<Utc>::MAX_UTC),
                    ] {
                        for tier_id in [None, Some("gold"), Some("nope")] {
                            let standing = TierStanding {
                                tier_id: tier_id.map(String::from),
                                since: now,
                                below_since,
                            };
                            for trigger in [
                                TierTrigger::Purchase,
                                TierTrigger::Return,
                                TierTrigger::Sweep,
                            ] {
                                let _ = next_standing(&p, &standing, value, trigger, now);
                            }
                            let _ = downgrade_warning(&p, &standing, value, now);
                            let _ = progress(&p, &standing, value);
                            let _ = review_at(&p, &standing, &contributions, now);
                        }
                    }
                    let _ = qualified_until(&p, &contributions, value, now);
                }
                let _ = metric_value(&p, &contributions, now);
            }
        }
    }
}
