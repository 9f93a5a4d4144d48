use tonic::{Request, Response, Status};

use crate::domain::program::ProgramRules;
use crate::error::Error;
use crate::grpc::{caller, convert};
use crate::pb::{self, program_service_server::ProgramService};
use crate::service::Loyalty;

pub struct ProgramApi {
    pub loyalty: Loyalty,
}

#[tonic::async_trait]
impl ProgramService for ProgramApi {
    async fn get_program(
        &self,
        request: Request<pb::GetProgramRequest>,
    ) -> Result<Response<pb::GetProgramResponse>, Status> {
        let caller = caller(&request)?;
        let program = self.loyalty.get_program(&caller).await?;
        Ok(Response::new(pb::GetProgramResponse {
            program: Some(convert::program(program)),
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
        let rules = ProgramRules::parse(convert::program_input(r.program)?)?;
        let program = self
            .loyalty
            .update_program(&caller, rules, r.expected_version)
            .await?;
        Ok(Response::new(pb::UpdateProgramResponse {
            program: Some(convert::program(program)),
        }))
    }
}
