//! The handlers of `CheckoutService` and the proto conversions of points.

use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::pb::{self, checkout_service_server::CheckoutService};
use crate::platform::account::AccountState;
use crate::platform::proto::{caller, optional_datetime, timestamp};
use crate::platform::validation::{self, Invalid};
use crate::points::lifecycle::{Settled, Settlement};
use crate::points::rules::PurchaseReceipt;
use crate::points::rules::ledger::{EntryKind, LedgerEntry};
use crate::points::rules::purchase::{LineInput, Purchase, PurchaseInput, Quote};
use crate::points::rules::requests::{Hold, Redemption, ReturnRequest};
use crate::points::use_cases::Quoted;
use crate::points::{LedgerPage, Points};

pub struct CheckoutApi {
    pub points: Points,
    pub gifts: crate::gifts::Gifts,
}

#[tonic::async_trait]
impl CheckoutService for CheckoutApi {
    async fn quote_purchase(
        &self,
        request: Request<pb::QuotePurchaseRequest>,
    ) -> Result<Response<pb::QuotePurchaseResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let occurred_at = optional_datetime("occurred_at", r.occurred_at.as_ref())?;
        let quote = Quote::parse(
            &r.external_id,
            &r.store_id,
            occurred_at,
            &r.currency,
            r.total_minor,
            &lines(r.lines),
            self.points.now(),
        )?;
        let quoted = self.points.quote_purchase(&caller, &quote).await?;
        Ok(Response::new(quote_message(quoted)))
    }

    async fn record_purchase(
        &self,
        request: Request<pb::RecordPurchaseRequest>,
    ) -> Result<Response<pb::RecordPurchaseResponse>, Status> {
        let caller = caller(&request)?;
        let input = purchase_input(request.into_inner())?;
        let purchase = Purchase::parse(input, self.points.now())?;
        let receipt = self.points.record_purchase(&caller, purchase).await?;
        Ok(Response::new(receipt_message(receipt)))
    }

    async fn redeem_points(
        &self,
        request: Request<pb::RedeemPointsRequest>,
    ) -> Result<Response<pb::RedeemPointsResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let redemption =
            Redemption::parse(&r.external_id, &r.redemption_id, r.points, &r.purchase_id)?;
        let spent = self.points.redeem(&caller, redemption).await?;
        Ok(Response::new(pb::RedeemPointsResponse {
            redemption_id: r.redemption_id,
            points: spent.points,
            discount_minor: spent.discount_minor,
            balance: Some(balance_message(&spent.account)),
        }))
    }

    async fn reserve_points(
        &self,
        request: Request<pb::ReservePointsRequest>,
    ) -> Result<Response<pb::ReservePointsResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let hold = Hold::parse(
            &r.external_id,
            &r.reservation_id,
            r.points,
            r.ttl_seconds,
            &r.purchase_id,
        )?;
        let held = self.points.reserve(&caller, hold).await?;
        Ok(Response::new(pb::ReservePointsResponse {
            reservation_id: r.reservation_id,
            points: held.points,
            discount_minor: held.discount_minor,
            expires_at: Some(timestamp(held.expires_at)),
            balance: Some(balance_message(&held.account)),
        }))
    }

    async fn commit_reservation(
        &self,
        request: Request<pb::CommitReservationRequest>,
    ) -> Result<Response<pb::SettleReservationResponse>, Status> {
        let caller = caller(&request)?;
        let id = request.into_inner().reservation_id;
        validation::identifier("reservation_id", &id).map_err(Invalid::from)?;
        let settled = self.points.commit_reservation(&caller, id.clone()).await?;
        Ok(Response::new(settled_message(id, settled)))
    }

    async fn release_reservation(
        &self,
        request: Request<pb::ReleaseReservationRequest>,
    ) -> Result<Response<pb::SettleReservationResponse>, Status> {
        let caller = caller(&request)?;
        let id = request.into_inner().reservation_id;
        validation::identifier("reservation_id", &id).map_err(Invalid::from)?;
        let settled = self.points.release_reservation(&caller, id.clone()).await?;
        Ok(Response::new(settled_message(id, settled)))
    }

    async fn return_purchase(
        &self,
        request: Request<pb::ReturnPurchaseRequest>,
    ) -> Result<Response<pb::ReturnPurchaseResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let lines: Vec<(u32, i64)> = r
            .lines
            .iter()
            .map(|l| (l.line_no, l.amount_minor))
            .collect();
        let request = ReturnRequest::parse(&r.purchase_id, &r.return_id, &lines, r.amount_minor)?;
        let outcome = self.points.return_purchase(&caller, request).await?;
        Ok(Response::new(pb::ReturnPurchaseResponse {
            return_id: r.return_id,
            balance: Some(balance_message(&outcome.account)),
            purchase_id: outcome.purchase_id,
            external_id: outcome.external_id,
            returned_minor: outcome.returned_minor,
            points_clawed_back: outcome.points_clawed_back,
            points_written_off: outcome.points_written_off,
            points_refunded: outcome.points_refunded,
        }))
    }

    async fn redeem_gift(
        &self,
        request: Request<pb::RedeemGiftRequest>,
    ) -> Result<Response<pb::RedeemGiftResponse>, Status> {
        crate::gifts::grpc::redeem_gift(&self.gifts, request).await
    }
}

fn settled_message(reservation_id: String, settled: Settled) -> pb::SettleReservationResponse {
    pb::SettleReservationResponse {
        reservation_id,
        status: match settled.status {
            Settlement::Committed => pb::ReservationStatus::Committed,
            Settlement::Released => pb::ReservationStatus::Released,
            Settlement::Expired => pb::ReservationStatus::Expired,
        } as i32,
        points: settled.points,
        discount_minor: settled.discount_minor,
        balance: Some(balance_message(&settled.account)),
    }
}

/// The next expiry of an account, for GetBalance.
pub fn expiry_message(state: &AccountState) -> Option<pb::PointsExpiry> {
    state.next_expiry.map(|e| pb::PointsExpiry {
        points: e.points,
        expires_at: Some(timestamp(e.at)),
    })
}

fn lines(lines: Vec<pb::PurchaseLine>) -> Vec<LineInput> {
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

fn purchase_input(request: pb::RecordPurchaseRequest) -> Result<PurchaseInput, Error> {
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

pub fn balance_message(state: &AccountState) -> pb::Balance {
    pb::Balance {
        available: state.available,
        pending: state.pending,
        lifetime_earned: state.lifetime_earned,
        lifetime_redeemed: state.lifetime_redeemed,
        version: state.version,
    }
}

fn receipt_message(receipt: PurchaseReceipt) -> pb::RecordPurchaseResponse {
    pb::RecordPurchaseResponse {
        balance: Some(balance_message(&receipt.account)),
        purchase_count: receipt.account.purchase_count,
        purchase_id: receipt.purchase_id,
        external_id: receipt.external_id,
        points_earned: receipt.points_earned,
        gifts_issued: Vec::new(),
    }
}

fn quote_message(quoted: Quoted) -> pb::QuotePurchaseResponse {
    pb::QuotePurchaseResponse {
        points: quoted.earn.points,
        eligible: quoted.earn.eligible,
        applied_promotion_ids: quoted.earn.applied_promotion_ids,
        redeemable_points: quoted.redeemable_points,
        redeemable_discount_minor: quoted.redeemable_discount_minor,
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
        EntryKind::RedeemRefund => pb::LedgerEntryKind::RedeemRefund,
    }
}

pub fn ledger_page_message(page: LedgerPage) -> pb::ListLedgerResponse {
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
