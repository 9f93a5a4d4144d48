use tonic::{Request, Response, Status};

use crate::domain::customer::Enrollment;
use crate::domain::ledger::PageRequest;
use crate::domain::validation;
use crate::error::Error;
use crate::grpc::{caller, convert};
use crate::pb::{self, member_service_server::MemberService};
use crate::service::Loyalty;

pub struct MemberApi {
    pub loyalty: Loyalty,
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
        let input = convert::enrollment_input(request.into_inner());
        let enrollment = Enrollment::parse(input, self.loyalty.now())?;
        let (customer, created) = self.loyalty.enroll_customer(&caller, &enrollment).await?;
        Ok(Response::new(pb::EnrollCustomerResponse {
            customer: Some(convert::customer(customer)),
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
        let customer = self.loyalty.get_customer(&caller, &r.external_id).await?;
        Ok(Response::new(pb::GetCustomerResponse {
            customer: Some(convert::customer(customer)),
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
            .loyalty
            .get_balance(&caller, &r.external_id, r.min_version)
            .await?;
        Ok(Response::new(pb::GetBalanceResponse {
            balance: Some(convert::balance(&state)),
            purchase_count: state.purchase_count,
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
            .loyalty
            .list_ledger(&caller, &r.external_id, page)
            .await?;
        Ok(Response::new(convert::ledger_page(page)))
    }
}
