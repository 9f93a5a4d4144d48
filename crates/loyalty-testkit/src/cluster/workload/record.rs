//! What the clients of a scenario were told: every acknowledged write by its client key, every
//! refusal, every failed attempt. The audit holds the committed state against it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use loyalty::pb;
use tonic::{Code, Status};

use super::client::{Call, Reply};

/// The kinds of write a till sends, each idempotent on its client key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WriteKind {
    Purchase,
    Enrolment,
    Redemption,
    Hold,
    Commit,
    Release,
    Return,
    Claim,
    GiftRedemption,
}

impl WriteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WriteKind::Purchase => "purchase",
            WriteKind::Enrolment => "enrolment",
            WriteKind::Redemption => "redemption",
            WriteKind::Hold => "hold",
            WriteKind::Commit => "commit",
            WriteKind::Release => "release",
            WriteKind::Return => "return",
            WriteKind::Claim => "gift_claim",
            WriteKind::GiftRedemption => "gift_redemption",
        }
    }
}

/// The first acknowledgement of a purchase.
#[derive(Debug, Clone)]
pub struct Ack {
    pub external_id: String,
    pub response: pb::RecordPurchaseResponse,
}

/// The first acknowledgement of a write, with the request that got it.
#[derive(Debug, Clone)]
pub struct Acked<Q, A> {
    pub request: Q,
    pub response: A,
}

/// A hold and what its settlements were told (each at most its first answer).
#[derive(Debug, Clone)]
pub struct HoldAck {
    pub request: pb::ReservePointsRequest,
    pub response: pb::ReservePointsResponse,
    pub commit: Option<pb::SettleReservationResponse>,
    pub release: Option<pb::SettleReservationResponse>,
}

/// What the clients of a scenario saw.
#[derive(Debug, Default)]
pub struct Record {
    /// RPCs sent, retries and deliberate replays included.
    pub attempts: u64,
    /// Attempts that repeated a failed attempt.
    pub retries: u64,
    /// Deliberate extra copies of an acknowledged write.
    pub replays: u64,
    pub reads: u64,
    /// Failed attempts by code (each one retried), e.g. `Unavailable`, `Unknown(transport)`.
    pub failures: BTreeMap<String, u64>,
    /// The same, by kind of call ("purchase", "redemption", ..., "read").
    pub failures_by_operation: BTreeMap<&'static str, BTreeMap<String, u64>>,
    /// When each failed attempt ended, how long it took, and its label.
    pub failed: Vec<(Instant, Duration, String)>,
    pub max_failed_latency: Duration,
    pub max_latency: Duration,
    /// When each write (the first acknowledgement of a client key) succeeded.
    pub write_acks: Vec<Instant>,
    /// purchase_id → its first acknowledgement.
    pub acknowledged: HashMap<String, Ack>,
    /// external_id → how many enrolments answered `created`.
    pub enrolled: HashMap<String, u32>,
    /// Customers an enrolment or a purchase was acknowledged for.
    pub customers: HashSet<String>,
    /// redemption_id → its first acknowledgement.
    pub redemptions: HashMap<String, Acked<pb::RedeemPointsRequest, pb::RedeemPointsResponse>>,
    /// reservation_id → the hold and its settlements.
    pub holds: HashMap<String, HoldAck>,
    /// return_id → its first acknowledgement.
    pub returns: HashMap<String, Acked<pb::ReturnPurchaseRequest, pb::ReturnPurchaseResponse>>,
    /// claim_key → its first acknowledgement.
    pub claims: HashMap<String, Acked<pb::ClaimGiftRequest, pb::ClaimGiftResponse>>,
    /// redemption_key of a gift code → its first acknowledgement.
    pub gift_redemptions: HashMap<String, Acked<pb::RedeemGiftRequest, pb::RedeemGiftResponse>>,
    /// Every answer by kind of write: "OK" or the code that refused it.
    pub outcomes: BTreeMap<&'static str, BTreeMap<String, u64>>,
    /// Client keys whose write was refused (a non-retryable answer), with the code.
    pub refused: HashMap<(WriteKind, String), Code>,
    /// Writes abandoned by their client after the give-up time, still failing.
    pub gave_up: Vec<(WriteKind, String)>,
    /// Gifts the scenario put in the catalog → their stock then.
    pub gift_stock: BTreeMap<String, i64>,
    pub violations: Vec<String>,
}

pub type Shared = Arc<Mutex<Record>>;

impl Record {
    pub fn shared() -> Shared {
        Arc::default()
    }

    /// Books what a till was told for `call`.
    pub fn book(&mut self, call: &Call, told: &Result<Reply, Option<Status>>) {
        let Some((kind, key)) = call.key() else {
            return;
        };
        let reply = match told {
            Ok(reply) => reply,
            Err(None) => {
                self.gave_up.push((kind, key.to_string()));
                return;
            }
            Err(Some(status)) => {
                self.count_outcome(kind, &format!("{:?}", status.code()));
                self.refused.insert((kind, key.to_string()), status.code());
                return;
            }
        };
        self.count_outcome(kind, "OK");
        match (call, reply) {
            (Call::Earn(q), Reply::Earn(a)) => self.ack_purchase(q, a),
            (Call::Enroll(q), Reply::Enroll(a)) => self.ack_enroll(q, a),
            (Call::Redeem(q), Reply::Redeem(a)) => self.ack_redemption(q, a),
            (Call::Reserve(q), Reply::Reserve(a)) => self.ack_hold(q, a),
            (Call::Commit(q), Reply::Settle(a)) => self.ack_settlement(&q.reservation_id, true, a),
            (Call::Release(q), Reply::Settle(a)) => {
                self.ack_settlement(&q.reservation_id, false, a)
            }
            (Call::Return(q), Reply::Return(a)) => self.ack_return(q, a),
            (Call::ClaimGift(q), Reply::ClaimGift(a)) => self.ack_claim(q, a),
            (Call::RedeemGift(q), Reply::RedeemGift(a)) => self.ack_gift_redemption(q, a),
            (call, reply) => self
                .violations
                .push(format!("{call:?} answered with {reply:?}")),
        }
    }

    fn count_outcome(&mut self, kind: WriteKind, outcome: &str) {
        *self
            .outcomes
            .entry(kind.as_str())
            .or_default()
            .entry(outcome.to_string())
            .or_default() += 1;
    }

    /// Books the acknowledgement of a purchase; every answer for one purchase_id must be the
    /// same.
    pub fn ack_purchase(
        &mut self,
        request: &pb::RecordPurchaseRequest,
        response: &pb::RecordPurchaseResponse,
    ) {
        if response.purchase_id != request.purchase_id
            || response.external_id != request.external_id
        {
            self.violations.push(format!(
                "{}: answered for {}/{}",
                request.purchase_id, response.external_id, response.purchase_id
            ));
        }
        match self.acknowledged.get(&request.purchase_id) {
            Some(first) if first.response != *response => self.violations.push(format!(
                "{}: two different answers: {:?} then {:?}",
                request.purchase_id, first.response, response
            )),
            Some(_) => {}
            None => {
                self.acknowledged.insert(
                    request.purchase_id.clone(),
                    Ack {
                        external_id: request.external_id.clone(),
                        response: response.clone(),
                    },
                );
                self.write_acks.push(Instant::now());
                self.customers.insert(request.external_id.clone());
            }
        }
    }

    /// Books an enrolment: the stored profile is the one sent, and a customer is created once.
    pub fn ack_enroll(
        &mut self,
        request: &pb::EnrollCustomerRequest,
        response: &pb::EnrollCustomerResponse,
    ) {
        let customer = response.customer.clone().unwrap_or_default();
        if customer.external_id != request.external_id
            || customer.display_name != request.display_name
            || customer.time_zone != request.time_zone
        {
            self.violations.push(format!(
                "enrolment of {} answered {customer:?}",
                request.external_id
            ));
        }
        let created = self
            .enrolled
            .entry(request.external_id.clone())
            .or_default();
        if response.created {
            *created += 1;
            if *created > 1 {
                self.violations.push(format!(
                    "{} was created {} times",
                    request.external_id, created
                ));
            }
        }
        self.write_acks.push(Instant::now());
        self.customers.insert(request.external_id.clone());
    }

    fn ack_redemption(&mut self, q: &pb::RedeemPointsRequest, a: &pb::RedeemPointsResponse) {
        if a.redemption_id != q.redemption_id || a.points != q.points {
            self.violations.push(format!(
                "redemption {}: asked for {} points, answered {a:?}",
                q.redemption_id, q.points
            ));
        }
        let first = first_answer(
            &mut self.redemptions,
            &mut self.violations,
            "redemption",
            &q.redemption_id,
            q,
            a,
        );
        if first {
            self.write_acks.push(Instant::now());
        }
    }

    fn ack_hold(&mut self, q: &pb::ReservePointsRequest, a: &pb::ReservePointsResponse) {
        if a.reservation_id != q.reservation_id || a.points != q.points {
            self.violations.push(format!(
                "hold {}: asked for {} points, answered {a:?}",
                q.reservation_id, q.points
            ));
        }
        match self.holds.get(&q.reservation_id) {
            Some(first) if first.response != *a => self.violations.push(format!(
                "hold {}: two different answers: {:?} then {a:?}",
                q.reservation_id, first.response
            )),
            Some(_) => {}
            None => {
                self.holds.insert(
                    q.reservation_id.clone(),
                    HoldAck {
                        request: q.clone(),
                        response: a.clone(),
                        commit: None,
                        release: None,
                    },
                );
                self.write_acks.push(Instant::now());
            }
        }
    }

    /// A commit must answer COMMITTED, a release RELEASED or EXPIRED (the sweep was first),
    /// every copy the same, and no hold may be both committed and released (rule 4).
    fn ack_settlement(
        &mut self,
        reservation_id: &str,
        commit: bool,
        a: &pb::SettleReservationResponse,
    ) {
        let what = if commit { "commit" } else { "release" };
        let status = a.status();
        let expected = if commit {
            status == pb::ReservationStatus::Committed
        } else {
            matches!(
                status,
                pb::ReservationStatus::Released | pb::ReservationStatus::Expired
            )
        };
        let Some(hold) = self.holds.get_mut(reservation_id) else {
            self.violations.push(format!(
                "{what} of hold {reservation_id}, which no client was told was held"
            ));
            return;
        };
        if !expected || a.reservation_id != reservation_id || a.points != hold.request.points {
            self.violations.push(format!(
                "{what} of hold {reservation_id} ({} points) answered {a:?}",
                hold.request.points
            ));
        }
        let (mine, other) = if commit {
            (&mut hold.commit, &hold.release)
        } else {
            (&mut hold.release, &hold.commit)
        };
        match mine {
            Some(first) if first != a => self.violations.push(format!(
                "{what} of hold {reservation_id}: two different answers: {first:?} then {a:?}"
            )),
            Some(_) => {}
            None => {
                *mine = Some(a.clone());
                self.write_acks.push(Instant::now());
            }
        }
        if let Some(other) = other {
            self.violations.push(format!(
                "hold {reservation_id} was settled twice: committed and released ({other:?}, {a:?})"
            ));
        }
    }

    fn ack_return(&mut self, q: &pb::ReturnPurchaseRequest, a: &pb::ReturnPurchaseResponse) {
        let asked: i64 = if q.lines.is_empty() {
            q.amount_minor
        } else {
            q.lines.iter().map(|l| l.amount_minor).sum()
        };
        if a.return_id != q.return_id || a.purchase_id != q.purchase_id || a.returned_minor != asked
        {
            self.violations.push(format!(
                "return {} of {asked} from {}: answered {a:?}",
                q.return_id, q.purchase_id
            ));
        }
        if first_answer(
            &mut self.returns,
            &mut self.violations,
            "return",
            &q.return_id,
            q,
            a,
        ) {
            self.write_acks.push(Instant::now());
        }
    }

    fn ack_claim(&mut self, q: &pb::ClaimGiftRequest, a: &pb::ClaimGiftResponse) {
        let grant = a.grant.clone().unwrap_or_default();
        if grant.gift_id != q.gift_id || grant.external_id != q.external_id || grant.code.is_empty()
        {
            self.violations.push(format!(
                "claim {} of {} for {}: granted {}/{}",
                q.claim_key, q.gift_id, q.external_id, grant.gift_id, grant.external_id
            ));
        }
        if first_answer(
            &mut self.claims,
            &mut self.violations,
            "gift claim",
            &q.claim_key,
            q,
            a,
        ) {
            self.write_acks.push(Instant::now());
        }
    }

    /// A code is redeemed at most once (rule 5): two different keys acknowledged for one code
    /// is a violation right here.
    fn ack_gift_redemption(&mut self, q: &pb::RedeemGiftRequest, a: &pb::RedeemGiftResponse) {
        let grant = a.grant.clone().unwrap_or_default();
        if grant.status() != pb::GiftGrantStatus::Redeemed || grant.code != q.code {
            self.violations.push(format!(
                "gift redemption {}: answered status {:?} for another or the same code",
                q.redemption_key,
                grant.status()
            ));
        }
        if let Some((other, _)) = self
            .gift_redemptions
            .iter()
            .find(|(key, r)| r.request.code == q.code && **key != q.redemption_key)
        {
            self.violations.push(format!(
                "a gift code was redeemed twice: with key {other} and with key {}",
                q.redemption_key
            ));
        }
        if first_answer(
            &mut self.gift_redemptions,
            &mut self.violations,
            "gift redemption",
            &q.redemption_key,
            q,
            a,
        ) {
            self.write_acks.push(Instant::now());
        }
    }

    /// Whether the client of this write gave up on it.
    pub fn gave_up_on(&self, kind: WriteKind, key: &str) -> bool {
        self.gave_up.iter().any(|(k, id)| *k == kind && id == key)
    }

    /// The code a write of this key was refused with, if it was.
    pub fn refusal(&self, kind: WriteKind, key: &str) -> Option<Code> {
        self.refused.get(&(kind, key.to_string())).copied()
    }

    /// The first write acknowledged after `t`.
    pub fn first_write_after(&self, t: Instant) -> Option<Instant> {
        self.write_acks.iter().copied().filter(|a| *a > t).min()
    }

    /// Writes first acknowledged in `[from, to]`.
    pub fn writes_between(&self, from: Instant, to: Instant) -> usize {
        self.write_acks
            .iter()
            .filter(|at| **at >= from && **at <= to)
            .count()
    }

    /// Failed attempts that ended in `[from, to]`.
    pub fn failures_between(&self, from: Instant, to: Instant) -> usize {
        self.failed
            .iter()
            .filter(|(at, _, _)| *at >= from && *at <= to)
            .count()
    }

    pub fn failed_attempts(&self) -> u64 {
        self.failures.values().sum()
    }

    /// How many writes of each kind were acknowledged (distinct client keys).
    pub fn acknowledged_by_kind(&self) -> BTreeMap<&'static str, usize> {
        let holds =
            |settled: fn(&HoldAck) -> bool| self.holds.values().filter(|h| settled(h)).count();
        BTreeMap::from([
            (WriteKind::Purchase.as_str(), self.acknowledged.len()),
            (WriteKind::Redemption.as_str(), self.redemptions.len()),
            (WriteKind::Hold.as_str(), self.holds.len()),
            (WriteKind::Commit.as_str(), holds(|h| h.commit.is_some())),
            (WriteKind::Release.as_str(), holds(|h| h.release.is_some())),
            (WriteKind::Return.as_str(), self.returns.len()),
            (WriteKind::Claim.as_str(), self.claims.len()),
            (
                WriteKind::GiftRedemption.as_str(),
                self.gift_redemptions.len(),
            ),
        ])
    }
}

/// Books the first answer of `key` in `answers`, or compares a later one with it. Returns
/// whether it was the first.
fn first_answer<Q: Clone, A: Clone + PartialEq + Debug>(
    answers: &mut HashMap<String, Acked<Q, A>>,
    violations: &mut Vec<String>,
    what: &str,
    key: &str,
    request: &Q,
    response: &A,
) -> bool {
    match answers.get(key) {
        Some(first) => {
            if first.response != *response {
                violations.push(format!(
                    "{what} {key}: two different answers: {:?} then {response:?}",
                    first.response
                ));
            }
            false
        }
        None => {
            answers.insert(
                key.to_string(),
                Acked {
                    request: request.clone(),
                    response: response.clone(),
                },
            );
            true
        }
    }
}
