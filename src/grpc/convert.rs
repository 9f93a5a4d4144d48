//! Proto ⇄ domain conversions. Validation itself is in `domain`; this only moves fields.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;

use crate::domain::account::{AccountState, PurchaseReceipt};
use crate::domain::customer::{BirthdayInput, Customer, EnrollmentInput};
use crate::domain::earn::Earn;
use crate::domain::ledger::{EntryKind, LedgerEntry};
use crate::domain::program::{
    CategoryMultiplierInput, EarnRate, Program, ProgramInput, PromotionInput,
};
use crate::domain::purchase::{LineInput, PurchaseInput};
use crate::error::Error;
use crate::pb;
use crate::service::LedgerPage;

pub fn datetime(field: &str, ts: &Timestamp) -> Result<DateTime<Utc>, Error> {
    u32::try_from(ts.nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000)
        .and_then(|nanos| DateTime::from_timestamp(ts.seconds, nanos))
        .ok_or_else(|| Error::invalid(field, "is not a valid timestamp"))
}

pub fn optional_datetime(
    field: &str,
    ts: Option<&Timestamp>,
) -> Result<Option<DateTime<Utc>>, Error> {
    ts.map(|ts| datetime(field, ts)).transpose()
}

pub fn timestamp(at: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

pub fn lines(lines: Vec<pb::PurchaseLine>) -> Vec<LineInput> {
    lines
        .into_iter()
        .map(|l| LineInput {
            sku: l.sku,
            category: l.category,
            quantity: l.quantity,
            amount_minor: l.amount_minor,
        })
        .collect()
}

pub fn purchase_input(request: pb::RecordPurchaseRequest) -> Result<PurchaseInput, Error> {
    Ok(PurchaseInput {
        occurred_at: optional_datetime("occurred_at", request.occurred_at.as_ref())?,
        external_id: request.external_id,
        purchase_id: request.purchase_id,
        store_id: request.store_id,
        currency: request.currency,
        total_minor: request.total_minor,
        lines: lines(request.lines),
    })
}

pub fn balance(state: &AccountState) -> pb::Balance {
    pb::Balance {
        available: state.available,
        pending: state.pending,
        lifetime_earned: state.lifetime_earned,
        lifetime_redeemed: state.lifetime_redeemed,
        version: state.version,
    }
}

pub fn receipt(receipt: PurchaseReceipt) -> pb::RecordPurchaseResponse {
    pb::RecordPurchaseResponse {
        balance: Some(balance(&receipt.account)),
        purchase_count: receipt.account.purchase_count,
        purchase_id: receipt.purchase_id,
        external_id: receipt.external_id,
        points_earned: receipt.points_earned,
    }
}

pub fn quote(earn: Earn) -> pb::QuotePurchaseResponse {
    pb::QuotePurchaseResponse {
        points: earn.points,
        eligible: earn.eligible,
        applied_promotion_ids: earn.applied_promotion_ids,
    }
}

pub fn enrollment_input(request: pb::EnrollCustomerRequest) -> EnrollmentInput {
    EnrollmentInput {
        external_id: request.external_id,
        display_name: request.display_name,
        birthday: request.birthday.map(|b| BirthdayInput {
            month: b.month,
            day: b.day,
            year: b.year,
        }),
        time_zone: request.time_zone,
        email: request.email,
        phone: request.phone,
        marketing_consent: request.marketing_consent,
    }
}

pub fn customer(customer: Customer) -> pb::Customer {
    let profile = customer.profile;
    pb::Customer {
        external_id: customer.external_id,
        display_name: profile.display_name,
        birthday: profile.birthday.map(|b| pb::Birthday {
            month: b.month,
            day: b.day,
            year: b.year.map(|y| y as u32),
        }),
        time_zone: profile.time_zone.name().to_string(),
        email: profile.email.unwrap_or_default(),
        phone: profile.phone.unwrap_or_default(),
        marketing_consent: profile.marketing_consent,
        enrolled_at: Some(timestamp(customer.enrolled_at)),
        updated_at: Some(timestamp(customer.updated_at)),
    }
}

fn entry_kind(kind: EntryKind) -> pb::LedgerEntryKind {
    match kind {
        EntryKind::Earn => pb::LedgerEntryKind::Earn,
        EntryKind::Redeem => pb::LedgerEntryKind::Redeem,
        EntryKind::Reserve => pb::LedgerEntryKind::Reserve,
        EntryKind::Release => pb::LedgerEntryKind::Release,
        EntryKind::ReturnClawback => pb::LedgerEntryKind::ReturnClawback,
        EntryKind::Expire => pb::LedgerEntryKind::Expire,
        EntryKind::Adjust => pb::LedgerEntryKind::Adjust,
        EntryKind::Bonus => pb::LedgerEntryKind::Bonus,
    }
}

pub fn ledger_page(page: LedgerPage) -> pb::ListLedgerResponse {
    pb::ListLedgerResponse {
        entries: page
            .entries
            .into_iter()
            .map(|e: LedgerEntry| pb::LedgerEntry {
                entry_id: e.entry_id,
                kind: entry_kind(e.kind) as i32,
                points: e.points,
                reference: e.reference,
                occurred_at: Some(timestamp(e.occurred_at)),
                created_at: Some(timestamp(e.created_at)),
            })
            .collect(),
        next_page_token: page.next_page_token.unwrap_or_default(),
    }
}

pub fn program_input(program: Option<pb::Program>) -> Result<ProgramInput, Error> {
    let program = program.ok_or_else(|| Error::invalid("program", "is required"))?;
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
    Ok(ProgramInput {
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

pub fn program(program: Program) -> pb::Program {
    let rules = program.rules;
    pb::Program {
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
        version: program.version,
        updated_at: Some(timestamp(program.updated_at)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_out_of_range_are_invalid_arguments_not_panics() {
        for ts in [
            Timestamp {
                seconds: 0,
                nanos: -1,
            },
            Timestamp {
                seconds: 0,
                nanos: 1_000_000_000,
            },
            Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            },
            Timestamp {
                seconds: i64::MIN,
                nanos: 0,
            },
        ] {
            assert!(
                matches!(datetime("occurred_at", &ts), Err(Error::InvalidArgument(_))),
                "{ts:?}"
            );
        }
        let at = datetime(
            "t",
            &Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            },
        )
        .unwrap();
        assert_eq!(
            timestamp(at),
            Timestamp {
                seconds: 1_700_000_000,
                nanos: 5
            }
        );
    }
}
