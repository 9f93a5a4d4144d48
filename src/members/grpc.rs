//! The handlers of `MemberService` and the proto conversions of members.

use tonic::{Request, Response, Status};

use crate::access::tokens;
use crate::error::Error;
use crate::members::Members;
use crate::members::rules::{BirthdayInput, Customer, Enrollment, EnrollmentInput};
use crate::pb::{self, member_service_server::MemberService};
use crate::platform::proto::{caller, timestamp};
use crate::platform::validation;
use crate::points::rules::ledger::PageRequest;
use crate::points::rules::requests::Claim;
use crate::points::{self, Points};
use crate::status::grpc::standing_message;

pub struct MemberApi {
    pub members: Members,
    pub points: Points,
    pub gifts: crate::gifts::Gifts,
}

fn external_id(value: &str) -> Result<(), Error> {
    validation::identifier("external_id", value).map_err(|v| Error::InvalidArgument(vec![v]))?;
    Ok(())
}

#[tonic::async_trait]
impl MemberService for MemberApi {
    async fn enroll_customer(
        &self,
        request: Request<pb::EnrollCustomerRequest>,
    ) -> Result<Response<pb::EnrollCustomerResponse>, Status> {
        let caller = caller(&request)?;
        let input = enrollment_input(request.into_inner());
        let enrollment = Enrollment::parse(input, self.members.now())?;
        let (customer, created) = self.members.enroll_customer(&caller, &enrollment).await?;
        Ok(Response::new(pb::EnrollCustomerResponse {
            customer: Some(customer_message(customer)),
            created,
        }))
    }

    async fn get_customer(
        &self,
        request: Request<pb::GetCustomerRequest>,
    ) -> Result<Response<pb::GetCustomerResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        external_id(&r.external_id)?;
        let customer = self.members.get_customer(&caller, &r.external_id).await?;
        // The standing is cached with the balance: usually no database read.
        let state = self.points.get_balance(&caller, &r.external_id, 0).await?;
        Ok(Response::new(pb::GetCustomerResponse {
            customer: Some(customer_message(customer)),
            standing: state
                .standing
                .map(|s| standing_message(*s, self.points.now())),
        }))
    }

    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        external_id(&r.external_id)?;
        if r.min_version < 0 {
            return Err(Error::invalid("min_version", "must not be negative").into());
        }
        let state = self
            .points
            .get_balance(&caller, &r.external_id, r.min_version)
            .await?;
        Ok(Response::new(pb::GetBalanceResponse {
            balance: Some(points::balance_message(&state)),
            purchase_count: state.purchase_count,
            next_expiry: points::expiry_message(&state),
            standing: state
                .standing
                .map(|s| standing_message(*s, self.points.now())),
            external_id: r.external_id,
        }))
    }

    async fn list_ledger(
        &self,
        request: Request<pb::ListLedgerRequest>,
    ) -> Result<Response<pb::ListLedgerResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let mut violations = validation::Violations::default();
        violations.check(validation::identifier("external_id", &r.external_id));
        let page = violations.check(PageRequest::parse(r.page_size, &r.page_token));
        let Some(page) = page.filter(|_| violations.is_empty()) else {
            return Err(violations.into_error().into());
        };
        let page = self
            .points
            .list_ledger(&caller, &r.external_id, page)
            .await?;
        Ok(Response::new(points::ledger_page_message(page)))
    }

    async fn issue_customer_token(
        &self,
        request: Request<pb::IssueCustomerTokenRequest>,
    ) -> Result<Response<pb::IssueCustomerTokenResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let mut violations = validation::Violations::default();
        violations.check(validation::identifier("external_id", &r.external_id));
        let ttl = violations.check(tokens::ttl("ttl_seconds", r.ttl_seconds));
        let Some(ttl) = ttl.filter(|_| violations.is_empty()) else {
            return Err(violations.into_error().into());
        };
        let issued = self
            .members
            .issue_customer_token(&caller, &r.external_id, ttl)
            .await?;
        Ok(Response::new(pb::IssueCustomerTokenResponse {
            token: issued.token,
            expires_at: Some(timestamp(issued.expires_at)),
        }))
    }

    async fn list_gift_catalog(
        &self,
        request: Request<pb::ListGiftCatalogRequest>,
    ) -> Result<Response<pb::ListGiftCatalogResponse>, Status> {
        crate::gifts::grpc::list_gift_catalog(&self.gifts, request).await
    }

    async fn list_customer_gifts(
        &self,
        request: Request<pb::ListCustomerGiftsRequest>,
    ) -> Result<Response<pb::ListCustomerGiftsResponse>, Status> {
        crate::gifts::grpc::list_customer_gifts(&self.gifts, request).await
    }

    async fn claim_gift(
        &self,
        request: Request<pb::ClaimGiftRequest>,
    ) -> Result<Response<pb::ClaimGiftResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let claim = Claim::parse(&r.external_id, &r.gift_id, &r.claim_key)?;
        let claimed = self.points.claim_gift(&caller, claim).await?;
        Ok(Response::new(pb::ClaimGiftResponse {
            grant: Some(crate::gifts::grant_message(
                &claimed.grant,
                claimed.grant.created_at,
            )),
            balance: Some(points::balance_message(&claimed.account)),
        }))
    }
}

fn enrollment_input(request: pb::EnrollCustomerRequest) -> EnrollmentInput {
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

fn customer_message(customer: Customer) -> pb::Customer {
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
