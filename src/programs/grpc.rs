//! The handlers of `ProgramService` and the proto conversions of programs.

use tonic::{Request, Response, Status};

use chrono::Datelike;

use crate::error::Error;
use crate::greetings;
use crate::greetings::rules::{BirthdayReward, Holiday, HolidayDate, OccasionProgram};
use crate::pb::{self, program_service_server::ProgramService};
use crate::platform::proto::{caller, optional_datetime, timestamp};
use crate::platform::validation::Violations;
use crate::points::rules::requests::Adjustment;
use crate::points::{self, Points};
use crate::programs::Programs;
use crate::programs::lifecycle::{ExpiryPolicy, Lifecycle, RedemptionRule, ReturnPolicy};
use crate::programs::rules::{
    BASE_MULTIPLIER_BP, CategoryMultiplierInput, EarnRate, OldReceipts, Program, ProgramInput,
    ProgramRules, PromotionInput,
};
use crate::status::rules::StatusThresholds;
use crate::tiers;
use crate::tiers::rules::{Tier, TierMetric, TierProgram};

pub struct ProgramApi {
    pub programs: Programs,
    /// AdjustPoints is a points use case, answered here because admins find it here.
    pub points: Points,
    pub gifts: crate::gifts::Gifts,
}

#[tonic::async_trait]
impl ProgramService for ProgramApi {
    async fn get_program(
        &self,
        request: Request<pb::GetProgramRequest>,
    ) -> Result<Response<pb::GetProgramResponse>, Status> {
        let caller = caller(&request)?;
        let program = self.programs.get_program(&caller).await?;
        Ok(Response::new(pb::GetProgramResponse {
            program: Some(program_message(program)),
        }))
    }

    async fn update_program(
        &self,
        request: Request<pb::UpdateProgramRequest>,
    ) -> Result<Response<pb::UpdateProgramResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        if r.expected_version < 0 {
            return Err(Error::invalid("expected_version", "must not be negative").into());
        }
        let rules = ProgramRules::parse(program_input(r.program)?)?;
        let program = self
            .programs
            .update_program(&caller, rules, r.expected_version)
            .await?;
        Ok(Response::new(pb::UpdateProgramResponse {
            program: Some(program_message(program)),
        }))
    }

    async fn adjust_points(
        &self,
        request: Request<pb::AdjustPointsRequest>,
    ) -> Result<Response<pb::AdjustPointsResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let adjustment = Adjustment::parse(&r.external_id, &r.adjustment_key, r.points, &r.reason)?;
        let adjusted = self.points.adjust(&caller, adjustment).await?;
        Ok(Response::new(pb::AdjustPointsResponse {
            adjustment_key: r.adjustment_key,
            points: adjusted.points,
            balance: Some(points::balance_message(&adjusted.account)),
        }))
    }

    async fn create_gift(
        &self,
        request: Request<pb::CreateGiftRequest>,
    ) -> Result<Response<pb::CreateGiftResponse>, Status> {
        crate::gifts::grpc::create_gift(&self.gifts, request).await
    }

    async fn update_gift(
        &self,
        request: Request<pb::UpdateGiftRequest>,
    ) -> Result<Response<pb::UpdateGiftResponse>, Status> {
        crate::gifts::grpc::update_gift(&self.gifts, request).await
    }

    async fn list_gifts(
        &self,
        request: Request<pb::ListGiftsRequest>,
    ) -> Result<Response<pb::ListGiftsResponse>, Status> {
        crate::gifts::grpc::list_gifts(&self.gifts, request).await
    }

    async fn issue_gift(
        &self,
        request: Request<pb::IssueGiftRequest>,
    ) -> Result<Response<pb::IssueGiftResponse>, Status> {
        crate::gifts::grpc::issue_gift(&self.gifts, request).await
    }

    async fn put_gift_rule(
        &self,
        request: Request<pb::PutGiftRuleRequest>,
    ) -> Result<Response<pb::PutGiftRuleResponse>, Status> {
        crate::gifts::grpc::put_gift_rule(&self.gifts, request).await
    }

    async fn list_gift_rules(
        &self,
        request: Request<pb::ListGiftRulesRequest>,
    ) -> Result<Response<pb::ListGiftRulesResponse>, Status> {
        crate::gifts::grpc::list_gift_rules(&self.gifts, request).await
    }
}

fn program_input(program: Option<pb::Program>) -> Result<ProgramInput, Error> {
    let mut program = program.ok_or_else(|| Error::invalid("program", "is required"))?;
    let lifecycle = lifecycle_input(&program)?;
    let occasions = occasions_input(program.occasions.take())?;
    let status = program
        .status
        .map_or_else(StatusThresholds::default, status_input);
    let tiers = match program.tiers.take() {
        None => TierProgram::default(),
        Some(tiers) => tiers_input(tiers)?,
    };
    let mut promotions = Vec::with_capacity(program.promotions.len());
    for (i, p) in program.promotions.into_iter().enumerate() {
        promotions.push(PromotionInput {
            starts_at: optional_datetime(
                &format!("program.promotions[{i}].starts_at"),
                p.starts_at.as_ref(),
            )?,
            ends_at: optional_datetime(
                &format!("program.promotions[{i}].ends_at"),
                p.ends_at.as_ref(),
            )?,
            id: p.id,
            multiplier_bp: p.multiplier_bp,
            categories: p.categories,
        });
    }
    let old_receipts = match pb::OldReceiptPolicy::try_from(program.old_receipts) {
        Ok(pb::OldReceiptPolicy::Unspecified) => None,
        Ok(pb::OldReceiptPolicy::Refuse) => Some(OldReceipts::Refuse),
        Ok(pb::OldReceiptPolicy::EarnAtTodaysRules) => Some(OldReceipts::EarnAtToday),
        Err(_) => {
            return Err(Error::invalid(
                "program.old_receipts",
                "is not a known OldReceiptPolicy",
            ));
        }
    };
    Ok(ProgramInput {
        lifecycle,
        occasions,
        status,
        tiers,
        max_receipt_age_days: program.max_receipt_age_days,
        old_receipts,
        currency: program.currency,
        earn_rate: program.earn_rate.map(|r| EarnRate {
            points: r.points,
            currency_units: r.currency_units,
        }),
        minimum_purchase_minor: program.minimum_purchase_minor,
        category_multipliers: program
            .category_multipliers
            .into_iter()
            .map(|c| CategoryMultiplierInput {
                category: c.category,
                multiplier_bp: c.multiplier_bp,
            })
            .collect(),
        promotions,
    })
}

/// The lifecycle settings of a program message, with the proto's defaults applied (bounds are
/// checked by `Lifecycle::check`).
fn lifecycle_input(program: &pb::Program) -> Result<Lifecycle, Error> {
    let expiry = match &program.expiry {
        None => ExpiryPolicy::Never,
        Some(e) => match pb::ExpiryKind::try_from(e.kind) {
            Ok(pb::ExpiryKind::Unspecified | pb::ExpiryKind::Never) => ExpiryPolicy::Never,
            Ok(pb::ExpiryKind::MonthsAfterEarning) => ExpiryPolicy::MonthsAfterEarning(e.months),
            Ok(pb::ExpiryKind::EndOfMonthAfter) => ExpiryPolicy::EndOfMonthAfter(e.months),
            Ok(pb::ExpiryKind::MonthsWithoutPurchase) => {
                ExpiryPolicy::MonthsWithoutPurchase(e.months)
            }
            Err(_) => {
                return Err(Error::invalid(
                    "program.expiry.kind",
                    "is not a known ExpiryKind",
                ));
            }
        },
    };
    let defaults = RedemptionRule::default();
    let redemption = match &program.redemption {
        None => defaults,
        Some(r) => RedemptionRule {
            points_per_unit: match r.points_per_unit {
                0 => defaults.points_per_unit,
                n => n,
            },
            minimum_points: r.minimum_points,
            max_share_bp: r.max_share_bp.unwrap_or(defaults.max_share_bp),
        },
    };
    let returns = match pb::ReturnPolicy::try_from(program.return_policy) {
        Ok(pb::ReturnPolicy::Unspecified | pb::ReturnPolicy::Debt) => ReturnPolicy::Debt,
        Ok(pb::ReturnPolicy::CapAtBalance) => ReturnPolicy::CapAtBalance,
        Err(_) => {
            return Err(Error::invalid(
                "program.return_policy",
                "is not a known ReturnPolicy",
            ));
        }
    };
    Ok(Lifecycle {
        pending_days: program.pending_days,
        expiry,
        redemption,
        returns,
        expiry_warning_days: match program.expiry_warning_days {
            0 => crate::programs::lifecycle::DEFAULT_EXPIRY_WARNING_DAYS,
            days => days,
        },
    })
}

/// The occasion settings of a program message (unset: the defaults). A holiday's date must
/// exist: in every year (29 February does) or in its one year. The rest is checked by
/// `OccasionProgram::check`.
fn occasions_input(settings: Option<pb::OccasionSettings>) -> Result<OccasionProgram, Error> {
    let Some(settings) = settings else {
        return Ok(OccasionProgram::default());
    };
    let mut v = Violations::default();
    let mut holidays = Vec::with_capacity(settings.holidays.len());
    for (i, holiday) in settings.holidays.into_iter().enumerate() {
        let field = format!("program.occasions.holidays[{i}].date");
        // A date refused here keeps its place (a placeholder), so that the violations
        // `check` adds below name the right index; the result is dropped with the error.
        let refused = HolidayDate::Once {
            date: chrono::NaiveDate::MIN,
        };
        let date = match holiday.date {
            None => {
                v.add(field, "is required");
                refused
            }
            Some(d) if d.year == 0 => HolidayDate::Yearly {
                month: d.month,
                day: d.day,
            },
            Some(d) => {
                let month_day = v.check(greetings::rules::month_day(&field, d.month, d.day));
                let year = match i32::try_from(d.year) {
                    Ok(year) if year <= 9999 => Some(year),
                    _ => {
                        v.add(format!("{field}.year"), "must be between 1 and 9999, or 0");
                        None
                    }
                };
                match (month_day, year) {
                    (Some((month, day)), Some(year)) => {
                        match chrono::NaiveDate::from_ymd_opt(year, month, day) {
                            Some(date) => HolidayDate::Once { date },
                            None => {
                                v.add(
                                    format!("{field}.day"),
                                    format!("{month}/{day} is not a date in {year}"),
                                );
                                refused
                            }
                        }
                    }
                    _ => refused,
                }
            }
        };
        holidays.push(Holiday {
            id: holiday.id,
            name: holiday.name,
            date,
        });
    }
    let reward = settings.birthday_reward.unwrap_or_default();
    let occasions = OccasionProgram {
        birthdays: settings.birthdays,
        anniversaries: settings.anniversaries,
        holidays,
        birthday_reward: BirthdayReward {
            gift_id: Some(reward.gift_id).filter(|id| !id.is_empty()),
            bonus_points: reward.bonus_points,
        },
    };
    // `ProgramRules::parse` checks it again; here so that every violation is named at once.
    occasions.check(&mut v);
    v.finish()?;
    Ok(occasions)
}

fn occasions_message(occasions: OccasionProgram) -> pb::OccasionSettings {
    pb::OccasionSettings {
        birthdays: occasions.birthdays,
        anniversaries: occasions.anniversaries,
        holidays: occasions
            .holidays
            .into_iter()
            .map(|holiday| pb::Holiday {
                id: holiday.id,
                name: holiday.name,
                date: Some(match holiday.date {
                    HolidayDate::Yearly { month, day } => pb::HolidayDate {
                        month,
                        day,
                        year: 0,
                    },
                    HolidayDate::Once { date } => pb::HolidayDate {
                        month: date.month(),
                        day: date.day(),
                        year: u32::try_from(date.year()).unwrap_or(0),
                    },
                }),
            })
            .collect(),
        birthday_reward: (!occasions.birthday_reward.is_empty()).then(|| pb::BirthdayReward {
            gift_id: occasions.birthday_reward.gift_id.unwrap_or_default(),
            bonus_points: occasions.birthday_reward.bonus_points,
        }),
    }
}

/// The status thresholds as sent; every field is checked by `StatusThresholds::check` (0 is
/// out of bounds for each, so a field left out is named).
fn status_input(s: pb::StatusThresholds) -> StatusThresholds {
    StatusThresholds {
        regular_purchases: s.regular_purchases,
        regular_window_days: s.regular_window_days,
        loyal_after_regular_days: s.loyal_after_regular_days,
        loyal_purchases_per_year: s.loyal_purchases_per_year,
        at_risk_gap_factor_bp: s.at_risk_gap_factor_bp,
        at_risk_floor_days: s.at_risk_floor_days,
        lapsed_after_days: s.lapsed_after_days,
    }
}

fn status_message(s: StatusThresholds) -> pb::StatusThresholds {
    pb::StatusThresholds {
        regular_purchases: s.regular_purchases,
        regular_window_days: s.regular_window_days,
        loyal_after_regular_days: s.loyal_after_regular_days,
        loyal_purchases_per_year: s.loyal_purchases_per_year,
        at_risk_gap_factor_bp: s.at_risk_gap_factor_bp,
        at_risk_floor_days: s.at_risk_floor_days,
        lapsed_after_days: s.lapsed_after_days,
    }
}

/// The tiers as sent, with the proto's defaults applied (bounds are checked by
/// `TierProgram::check`).
fn tiers_input(t: pb::TierProgram) -> Result<TierProgram, Error> {
    let metric = match pb::TierMetric::try_from(t.metric) {
        Ok(pb::TierMetric::Unspecified | pb::TierMetric::Spend) => TierMetric::Spend,
        Ok(pb::TierMetric::Visits) => TierMetric::Visits,
        Ok(pb::TierMetric::PointsEarned) => TierMetric::PointsEarned,
        Err(_) => {
            return Err(Error::invalid(
                "program.tiers.metric",
                "is not a known TierMetric",
            ));
        }
    };
    Ok(TierProgram {
        metric,
        window_days: match t.window_days {
            0 => tiers::rules::DEFAULT_WINDOW_DAYS,
            days => days,
        },
        grace_days: t.grace_days,
        warning_days: t.warning_days,
        levels: t
            .levels
            .into_iter()
            .map(|tier| Tier {
                id: tier.id,
                name: tier.name,
                threshold: tier.threshold,
                earn_multiplier_bp: match tier.earn_multiplier_bp {
                    0 => BASE_MULTIPLIER_BP,
                    bp => bp,
                },
                perks: tier.perks,
            })
            .collect(),
    })
}

pub(crate) fn metric_message(metric: TierMetric) -> pb::TierMetric {
    match metric {
        TierMetric::Spend => pb::TierMetric::Spend,
        TierMetric::Visits => pb::TierMetric::Visits,
        TierMetric::PointsEarned => pb::TierMetric::PointsEarned,
    }
}

fn tiers_message(t: TierProgram) -> pb::TierProgram {
    pb::TierProgram {
        metric: metric_message(t.metric) as i32,
        window_days: t.window_days,
        grace_days: t.grace_days,
        warning_days: t.warning_days,
        levels: t
            .levels
            .into_iter()
            .map(|tier| pb::Tier {
                id: tier.id,
                name: tier.name,
                threshold: tier.threshold,
                earn_multiplier_bp: tier.earn_multiplier_bp,
                perks: tier.perks,
            })
            .collect(),
    }
}

fn expiry_message(expiry: ExpiryPolicy) -> pb::ExpiryPolicy {
    let (kind, months) = match expiry {
        ExpiryPolicy::Never => (pb::ExpiryKind::Never, 0),
        ExpiryPolicy::MonthsAfterEarning(m) => (pb::ExpiryKind::MonthsAfterEarning, m),
        ExpiryPolicy::EndOfMonthAfter(m) => (pb::ExpiryKind::EndOfMonthAfter, m),
        ExpiryPolicy::MonthsWithoutPurchase(m) => (pb::ExpiryKind::MonthsWithoutPurchase, m),
    };
    pb::ExpiryPolicy {
        kind: kind as i32,
        months,
    }
}

fn program_message(program: Program) -> pb::Program {
    let rules = program.rules;
    let lifecycle = rules.lifecycle;
    pb::Program {
        occasions: Some(occasions_message(rules.occasions)),
        pending_days: lifecycle.pending_days,
        expiry_warning_days: lifecycle.expiry_warning_days,
        expiry: Some(expiry_message(lifecycle.expiry)),
        redemption: Some(pb::RedemptionRule {
            points_per_unit: lifecycle.redemption.points_per_unit,
            minimum_points: lifecycle.redemption.minimum_points,
            max_share_bp: Some(lifecycle.redemption.max_share_bp),
        }),
        return_policy: match lifecycle.returns {
            ReturnPolicy::Debt => pb::ReturnPolicy::Debt,
            ReturnPolicy::CapAtBalance => pb::ReturnPolicy::CapAtBalance,
        } as i32,
        currency: rules.currency.code().to_string(),
        earn_rate: Some(pb::EarnRate {
            points: rules.earn_rate.points,
            currency_units: rules.earn_rate.currency_units,
        }),
        minimum_purchase_minor: rules.minimum_purchase_minor,
        category_multipliers: rules
            .category_multipliers
            .into_iter()
            .map(|(category, multiplier_bp)| pb::CategoryMultiplier {
                category,
                multiplier_bp,
            })
            .collect(),
        promotions: rules
            .promotions
            .into_iter()
            .map(|p| pb::Promotion {
                id: p.id,
                multiplier_bp: p.multiplier_bp,
                starts_at: Some(timestamp(p.starts_at)),
                ends_at: Some(timestamp(p.ends_at)),
                categories: p.categories,
            })
            .collect(),
        max_receipt_age_days: rules.receipt_age.max_days,
        old_receipts: match rules.receipt_age.older {
            OldReceipts::Refuse => pb::OldReceiptPolicy::Refuse,
            OldReceipts::EarnAtToday => pb::OldReceiptPolicy::EarnAtTodaysRules,
        } as i32,
        status: Some(status_message(rules.status)),
        tiers: Some(tiers_message(rules.tiers)),
        version: program.version,
        updated_at: Some(timestamp(program.updated_at)),
    }
}
