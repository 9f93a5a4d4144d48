use tonic::{Request, Response, Status};

use crate::domain::purchase::{Purchase, Quote};
use crate::grpc::{caller, convert};
use crate::pb::{self, checkout_service_server::CheckoutService};
use crate::service::Loyalty;

pub struct CheckoutApi {
    pub loyalty: Loyalty,
}

#[tonic::async_trait]
impl CheckoutService for CheckoutApi {
    async fn quote_purchase(
        &self,
        request: Request<pb::QuotePurchaseRequest>,
    ) -> Result<Response<pb::QuotePurchaseResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let occurred_at = convert::optional_datetime("occurred_at", r.occurred_at.as_ref())?;
        let quote = Quote::parse(
            &r.external_id,
            &r.store_id,
            occurred_at,
            &r.currency,
            r.total_minor,
            &convert::lines(r.lines),
            self.loyalty.now(),
        )?;
        let earn = self.loyalty.quote_purchase(&caller, &quote).await?;
        Ok(Response::new(convert::quote(earn)))
    }

    async fn record_purchase(
        &self,
        request: Request<pb::RecordPurchaseRequest>,
    ) -> Result<Response<pb::RecordPurchaseResponse>, Status> {
        let caller = caller(&request)?;
        let input = convert::purchase_input(request.into_inner())?;
        let purchase = Purchase::parse(input, self.loyalty.now())?;
        let receipt = self.loyalty.record_purchase(&caller, &purchase).await?;
        Ok(Response::new(convert::receipt(receipt)))
    }
}
