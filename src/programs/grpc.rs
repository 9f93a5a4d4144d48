//! The handlers of `ProgramService` and the proto conversions of programs.

use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::pb::{self, program_service_server::ProgramService};
use crate::platform::proto::{caller, optional_datetime, timestamp};
use crate::programs::Programs;
use crate::programs::rules::{
    CategoryMultiplierInput, EarnRate, OldReceipts, Program, ProgramInput, ProgramRules,
    PromotionInput,
};

pub struct ProgramApi {
    pub programs: Programs,
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

fn program_message(program: Program) -> pb::Program {
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
        max_receipt_age_days: rules.receipt_age.max_days,
        old_receipts: match rules.receipt_age.older {
            OldReceipts::Refuse => pb::OldReceiptPolicy::Refuse,
            OldReceipts::EarnAtToday => pb::OldReceiptPolicy::EarnAtTodaysRules,
        } as i32,
        version: program.version,
        updated_at: Some(timestamp(program.updated_at)),
    }
}
