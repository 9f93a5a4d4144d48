//! The handlers of `CheckoutService` and the proto conversions of points.

use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::pb::{self, checkout_service_server::CheckoutService};
use crate::platform::account::AccountState;
use crate::platform::proto::{caller, optional_datetime, timestamp};
use crate::points::rules::PurchaseReceipt;
use crate::points::rules::earn::Earn;
use crate::points::rules::ledger::{EntryKind, LedgerEntry};
use crate::points::rules::purchase::{LineInput, Purchase, PurchaseInput, Quote};
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
        let earn = self.points.quote_purchase(&caller, &quote).await?;
        Ok(Response::new(quote_message(earn)))
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

    async fn redeem_gift(
        &self,
        request: Request<pb::RedeemGiftRequest>,
    ) -> Result<Response<pb::RedeemGiftResponse>, Status> {
        crate::gifts::grpc::redeem_gift(&self.gifts, request).await
    }
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

fn quote_message(earn: Earn) -> pb::QuotePurchaseResponse {
    pb::QuotePurchaseResponse {
        points: earn.points,
        eligible: earn.eligible,
        applied_promotion_ids: earn.applied_promotion_ids,
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
