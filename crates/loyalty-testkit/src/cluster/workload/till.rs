//! What one workload client does, as a till would: records purchases (some for brand-new
//! customers), enrolls, reads its writes back, spends points, holds points while it takes
//! payment and then settles the hold, returns its own purchases, claims the catalog gift and
//! redeems the codes it got.
//!
//! A refusal the till could expect (not enough points, a sold-out gift, a commit after the
//! release) is an outcome, booked with its code; any other refusal is a violation.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use loyalty::pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tonic::{Code, Status};

use super::{Call, Client, Op, Reply, Workload, replay};

/// The ttl of a hold the till walks away from: the service's sweep must release it.
const WALK_AWAY_TTL_SECONDS: u32 = 2;
/// The ttl of a hold whose payment takes too long: its commit comes after the ttl.
const SLOW_PAYMENT_TTL_SECONDS: u32 = 1;
/// The ttl of every other hold: far longer than any settlement takes.
const HOLD_TTL_SECONDS: u32 = 60;

/// A receipt of `total` cents (1–3 lines adding up to it) from one of a few stores.
pub fn receipt(
    rng: &mut StdRng,
    external_id: &str,
    purchase_id: &str,
) -> pb::RecordPurchaseRequest {
    let total = rng.random_range(100..10_000);
    let mut request = crate::purchase(external_id, purchase_id, total);
    request.store_id = format!("store-{}", rng.random_range(1..4));
    if rng.random_ratio(1, 3) {
        request.lines.truncate(1);
        request.lines[0].amount_minor = total;
    }
    request
}

/// The profile every enrolment of `external_id` sends (the same each time, so copies are
/// identical).
pub fn profile(external_id: &str) -> pb::EnrollCustomerRequest {
    pb::EnrollCustomerRequest {
        external_id: external_id.to_string(),
        display_name: format!("Member {external_id}"),
        time_zone: "Europe/Berlin".into(),
        marketing_consent: true,
        ..Default::default()
    }
}

/// What a till knows of a customer: the highest version it saw acknowledged or read, and the
/// points available then.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    version: i64,
    available: i64,
}

/// A purchase this till recorded, with what is left to return of it. Returned either by
/// lines (the till keeps what is left of each) or by amount (the service spreads it).
#[derive(Debug, Clone)]
struct Returnable {
    purchase_id: String,
    external_id: String,
    by_lines: bool,
    lines_left: Vec<i64>,
    left: i64,
}

/// How a till settles a hold.
#[derive(Debug, Clone, Copy)]
enum Settlement {
    /// The payment went through.
    Commit,
    /// The card was declined.
    Release,
    /// Declined, then the payment came through after all: the commit must be refused.
    ReleaseThenCommit,
    /// Two tills settle the same hold at once, one committing and one releasing: exactly
    /// one of them wins.
    CommitAndReleaseAtOnce,
    /// Nobody settles it: the sweep releases it after its ttl.
    WalkAway,
    /// The commit comes after the ttl: refused; the release then succeeds.
    CommitTooLate,
}

pub(super) struct Till {
    workload: Workload,
    worker: usize,
    n: u64,
    rng: StdRng,
    client: Client,
    seen: HashMap<String, Seen>,
    purchases: Vec<Returnable>,
    /// Codes this till claimed and has not redeemed yet.
    codes: Vec<String>,
}

impl Till {
    pub(super) fn new(workload: Workload, worker: usize, client: Client) -> Till {
        let rng = StdRng::seed_from_u64(workload.seed.wrapping_add(worker as u64 * 7919));
        Till {
            workload,
            worker,
            n: 0,
            rng,
            client,
            seen: HashMap::new(),
            purchases: Vec::new(),
            codes: Vec::new(),
        }
    }

    pub(super) async fn run(mut self, stop: watch::Receiver<bool>) {
        let mut done = 0;
        while !*stop.borrow()
            && self
                .workload
                .operations_per_worker
                .is_none_or(|limit| done < limit)
        {
            done += 1;
            self.n += 1;
            let customer = self.pick_customer();
            let give_up = Instant::now() + self.workload.give_up_after;
            match self.workload.mix.pick(&mut self.rng) {
                Op::Earn => self.earn(customer, give_up).await,
                Op::Enroll => {
                    self.client.enroll(&profile(&customer), give_up).await;
                }
                Op::Balance => self.read_balance(customer, give_up).await,
                Op::Redeem => self.redeem(customer, give_up).await,
                Op::Reserve => self.reserve(customer, give_up).await,
                Op::Return => self.return_purchase(customer, give_up).await,
                Op::ClaimGift => self.claim_gift(customer, give_up).await,
                Op::RedeemGift => self.redeem_gift(customer, give_up).await,
            }
        }
    }

    fn pick_customer(&mut self) -> String {
        let w = &self.workload;
        if w.cold.is_empty() || self.rng.random_range(0..100) < w.hot_percent {
            w.hot[self.rng.random_range(0..w.hot.len())].clone()
        } else {
            w.cold[self.rng.random_range(0..w.cold.len())].clone()
        }
    }

    /// A client key of this till's current operation.
    fn key(&self, what: &str) -> String {
        format!("w{}-{}-{what}", self.worker, self.n)
    }

    fn violation(&self, violation: String) {
        self.client
            .record
            .lock()
            .unwrap()
            .violations
            .push(violation);
    }

    /// Whether any client was told this customer exists (so NOT_FOUND would be wrong).
    fn known(&self, customer: &str) -> bool {
        self.client
            .record
            .lock()
            .unwrap()
            .customers
            .contains(customer)
    }

    fn version_seen(&self, customer: &str) -> i64 {
        self.seen.get(customer).map_or(0, |s| s.version)
    }

    /// Books the balance an answer showed. A fresh write (not a stored answer of an earlier
    /// one) must come after every version this till saw before sending it.
    fn saw(
        &mut self,
        customer: &str,
        key: &str,
        balance: Option<&pb::Balance>,
        before: i64,
        fresh: bool,
    ) {
        let Some(balance) = balance else {
            self.violation(format!("{key}: an answer without a balance"));
            return;
        };
        if fresh && balance.version <= before {
            self.violation(format!(
                "{key}: new write acknowledged at version {}, but version {before} of \
                 {customer} was seen before it was sent",
                balance.version
            ));
        }
        let seen = self.seen.entry(customer.to_string()).or_default();
        if balance.version >= seen.version {
            *seen = Seen {
                version: balance.version,
                available: balance.available,
            };
        }
    }

    /// A refusal outside `expected` is a violation.
    fn check_refusal(&self, call: &Call, status: &Status, expected: &[Code]) {
        if !expected.contains(&status.code()) {
            self.violation(format!(
                "{:?} refused: {:?} {} (a till expects only {expected:?})",
                call.key(),
                status.code(),
                status.message()
            ));
        }
    }

    /// What spending on `customer` may be refused with: not enough points, and not found
    /// while nobody was told the customer exists.
    fn spend_refusals(&self, customer: &str) -> Vec<Code> {
        let mut expected = vec![Code::FailedPrecondition];
        if !self.known(customer) {
            expected.push(Code::NotFound);
        }
        expected
    }

    /// Up to a little more than the till last saw available, so concurrent spending on a
    /// hot customer runs the balance down to nothing and is refused there. Now and then
    /// exactly that (the whole basket paid with points), so a later return finds the
    /// purchase's points spent and leaves a debt.
    fn points_to_spend(&mut self, customer: &str) -> i64 {
        let available = self.seen.get(customer).map_or(0, |s| s.available).max(0);
        if available > 0 && self.rng.random_ratio(1, 4) {
            return available;
        }
        self.rng.random_range(1..=available + 40)
    }

    /// Sometimes one of this till's purchases of `customer`, for the points to pay (a return
    /// of it then gives them back pro rata).
    fn paid_purchase(&mut self, customer: &str) -> String {
        let own: Vec<&Returnable> = self
            .purchases
            .iter()
            .filter(|p| p.external_id == customer)
            .collect();
        if own.is_empty() || !self.rng.random_ratio(1, 3) {
            return String::new();
        }
        own[self.rng.random_range(0..own.len())].purchase_id.clone()
    }

    /// Sends an acknowledged write again, sometimes (see [`replay`]).
    async fn maybe_replay(&mut self, call: &Call, give_up: Instant) {
        if self.rng.random_range(0..100) < self.workload.replay_percent {
            let copies =
                self.rng
                    .random_range(1..=self.workload.replay_copies.max(1)) as usize;
            let concurrent = self.rng.random_bool(0.5);
            replay(&self.client, call, copies, concurrent, give_up).await;
        }
    }

    async fn earn(&mut self, customer: String, give_up: Instant) {
        let customer = if self.rng.random_range(0..100) < self.workload.new_customer_percent {
            format!("new-w{}-{}", self.worker, self.n)
        } else {
            customer
        };
        let request = receipt(
            &mut self.rng,
            &customer,
            &format!("w{}-{}", self.worker, self.n),
        );
        let before = self.version_seen(&customer);
        let Some(first) = self.client.earn(&request, give_up).await else {
            return;
        };
        self.saw(
            &customer,
            &request.purchase_id,
            first.balance.as_ref(),
            before,
            true,
        );
        let lines_left: Vec<i64> = request.lines.iter().map(|l| l.amount_minor).collect();
        self.purchases.push(Returnable {
            purchase_id: request.purchase_id.clone(),
            external_id: customer,
            by_lines: self.rng.random_bool(0.5),
            left: request.total_minor,
            lines_left,
        });
        self.maybe_replay(&Call::Earn(request), give_up).await;
    }

    async fn read_balance(&mut self, customer: String, give_up: Instant) {
        let min_version = self.version_seen(&customer);
        let call = Call::Balance(pb::GetBalanceRequest {
            external_id: customer.clone(),
            min_version,
        });
        match self.client.call(&call, give_up).await {
            Ok(Reply::Balance(reply)) => {
                let balance = reply.balance.unwrap_or_default();
                if balance.version < min_version {
                    self.violation(format!(
                        "{customer}: read version {} after asking for at least {min_version}",
                        balance.version
                    ));
                }
                self.saw(&customer, "a read", Some(&balance), min_version, false);
            }
            Ok(other) => self.violation(format!("GetBalance answered {other:?}")),
            // Not enrolled yet: fine, unless this till saw it acknowledged.
            Err(Some(status)) if status.code() == Code::NotFound && min_version == 0 => {}
            Err(Some(status)) => self.violation(format!(
                "balance of {customer} (min_version {min_version}): {:?} {}",
                status.code(),
                status.message()
            )),
            Err(None) => {}
        }
    }

    async fn redeem(&mut self, customer: String, give_up: Instant) {
        let expected = self.spend_refusals(&customer);
        let before = self.version_seen(&customer);
        let call = Call::Redeem(pb::RedeemPointsRequest {
            external_id: customer.clone(),
            redemption_id: self.key("redeem"),
            points: self.points_to_spend(&customer),
            purchase_id: self.paid_purchase(&customer),
        });
        match self.client.write(&call, give_up).await {
            Ok(Reply::Redeem(spent)) => {
                self.saw(
                    &customer,
                    &spent.redemption_id,
                    spent.balance.as_ref(),
                    before,
                    true,
                );
                self.maybe_replay(&call, give_up).await;
            }
            Err(Some(status)) => self.check_refusal(&call, &status, &expected),
            _ => {}
        }
    }

    fn pick_settlement(&mut self) -> Settlement {
        match self.rng.random_range(0..100) {
            0..55 => Settlement::Commit,
            55..75 => Settlement::Release,
            75..81 => Settlement::ReleaseThenCommit,
            81..89 => Settlement::CommitAndReleaseAtOnce,
            89..95 => Settlement::WalkAway,
            _ => Settlement::CommitTooLate,
        }
    }

    /// Holds points while "taking payment", then settles the hold as the payment went.
    async fn reserve(&mut self, customer: String, give_up: Instant) {
        let settlement = self.pick_settlement();
        let ttl_seconds = match settlement {
            Settlement::WalkAway => WALK_AWAY_TTL_SECONDS,
            Settlement::CommitTooLate => SLOW_PAYMENT_TTL_SECONDS,
            _ => HOLD_TTL_SECONDS,
        };
        let expected = self.spend_refusals(&customer);
        let before = self.version_seen(&customer);
        let reservation_id = self.key("hold");
        let call = Call::Reserve(pb::ReservePointsRequest {
            external_id: customer.clone(),
            reservation_id: reservation_id.clone(),
            points: self.points_to_spend(&customer),
            ttl_seconds,
            purchase_id: self.paid_purchase(&customer),
        });
        match self.client.write(&call, give_up).await {
            Ok(Reply::Reserve(held)) => {
                self.saw(
                    &customer,
                    &reservation_id,
                    held.balance.as_ref(),
                    before,
                    true,
                );
            }
            Err(Some(status)) => return self.check_refusal(&call, &status, &expected),
            _ => return,
        }
        self.maybe_replay(&call, give_up).await;
        let commit = Call::Commit(pb::CommitReservationRequest {
            reservation_id: reservation_id.clone(),
        });
        let release = Call::Release(pb::ReleaseReservationRequest {
            reservation_id: reservation_id.clone(),
        });
        match settlement {
            Settlement::Commit => {
                self.settle(&customer, &commit, &[], give_up).await;
            }
            Settlement::Release => {
                self.settle(&customer, &release, &[], give_up).await;
            }
            Settlement::ReleaseThenCommit => {
                self.settle(&customer, &release, &[], give_up).await;
                // An acknowledged commit is booked as a second settlement (a violation).
                self.settle(&customer, &commit, &[Code::FailedPrecondition], give_up)
                    .await;
            }
            Settlement::CommitAndReleaseAtOnce => {
                let mut mine = self.client.clone();
                let mut other = self.client.clone();
                other.reconnect();
                let (committed, released) =
                    tokio::join!(mine.write(&commit, give_up), other.write(&release, give_up));
                if !exactly_one_won(&committed, &released) {
                    self.violation(format!(
                        "hold {reservation_id} committed and released at once by two tills: \
                         {committed:?} / {released:?} (exactly one must win, the other be \
                         refused)"
                    ));
                }
            }
            Settlement::WalkAway => {}
            Settlement::CommitTooLate => {
                let ttl = Duration::from_secs(u64::from(ttl_seconds));
                tokio::time::sleep(ttl + Duration::from_millis(300)).await;
                if self
                    .settle(&customer, &commit, &[Code::FailedPrecondition], give_up)
                    .await
                    .is_some()
                {
                    self.violation(format!(
                        "hold {reservation_id} was committed after its ttl of {ttl_seconds} s"
                    ));
                }
                self.settle(&customer, &release, &[], give_up).await;
            }
        }
    }

    /// Sends a commit or a release; returns its answer when acknowledged.
    async fn settle(
        &mut self,
        customer: &str,
        call: &Call,
        expected: &[Code],
        give_up: Instant,
    ) -> Option<pb::SettleReservationResponse> {
        let before = self.version_seen(customer);
        match self.client.write(call, give_up).await {
            Ok(Reply::Settle(settled)) => {
                // EXPIRED is the sweep's stored answer, not a change made now.
                let fresh = settled.status() != pb::ReservationStatus::Expired;
                let key = settled.reservation_id.clone();
                self.saw(customer, &key, settled.balance.as_ref(), before, fresh);
                self.maybe_replay(call, give_up).await;
                Some(settled)
            }
            Err(Some(status)) => {
                self.check_refusal(call, &status, expected);
                None
            }
            _ => None,
        }
    }

    /// Returns part or all of what is left of one of this till's purchases (a purchase
    /// when it has none left to return).
    async fn return_purchase(&mut self, customer: String, give_up: Instant) {
        let open: Vec<usize> = (0..self.purchases.len())
            .filter(|i| self.purchases[*i].left > 0)
            .collect();
        if open.is_empty() {
            return self.earn(customer, give_up).await;
        }
        let index = open[self.rng.random_range(0..open.len())];
        let everything = self.rng.random_ratio(1, 3);
        let purchase = self.purchases[index].clone();
        let mut request = pb::ReturnPurchaseRequest {
            purchase_id: purchase.purchase_id.clone(),
            return_id: self.key("return"),
            ..Default::default()
        };
        if purchase.by_lines {
            for (i, left) in purchase.lines_left.iter().enumerate() {
                if *left == 0 || !(everything || self.rng.random_bool(0.6)) {
                    continue;
                }
                let amount_minor = if everything {
                    *left
                } else {
                    self.rng.random_range(1..=*left)
                };
                request.lines.push(pb::ReturnedLine {
                    line_no: i as u32 + 1,
                    amount_minor,
                });
            }
            if request.lines.is_empty() {
                let (i, left) = purchase
                    .lines_left
                    .iter()
                    .enumerate()
                    .find(|(_, left)| **left > 0)
                    .expect("a purchase with something left has a line with something left");
                request.lines.push(pb::ReturnedLine {
                    line_no: i as u32 + 1,
                    amount_minor: *left,
                });
            }
        } else {
            request.amount_minor = if everything {
                purchase.left
            } else {
                self.rng.random_range(1..=purchase.left)
            };
        }
        let before = self.version_seen(&purchase.external_id);
        let call = Call::Return(request.clone());
        match self.client.write(&call, give_up).await {
            Ok(Reply::Return(returned)) => {
                self.saw(
                    &purchase.external_id,
                    &returned.return_id,
                    returned.balance.as_ref(),
                    before,
                    true,
                );
                let kept = &mut self.purchases[index];
                kept.left -= returned.returned_minor;
                for line in &request.lines {
                    kept.lines_left[line.line_no as usize - 1] -= line.amount_minor;
                }
                self.maybe_replay(&call, give_up).await;
            }
            // Nothing about returning a till's own acknowledged purchase may be refused.
            Err(Some(status)) => self.check_refusal(&call, &status, &[]),
            _ => {}
        }
    }

    async fn claim_gift(&mut self, customer: String, give_up: Instant) {
        let expected = self.spend_refusals(&customer);
        let before = self.version_seen(&customer);
        let claim_key = self.key("claim");
        let call = Call::ClaimGift(pb::ClaimGiftRequest {
            external_id: customer.clone(),
            gift_id: self.workload.gift.gift_id.clone(),
            claim_key: claim_key.clone(),
        });
        match self.client.write(&call, give_up).await {
            Ok(Reply::ClaimGift(claimed)) => {
                let key = claim_key;
                self.saw(&customer, &key, claimed.balance.as_ref(), before, true);
                if let Some(grant) = claimed.grant {
                    self.codes.push(grant.code);
                }
                self.maybe_replay(&call, give_up).await;
            }
            // Not enough points, or sold out.
            Err(Some(status)) => self.check_refusal(&call, &status, &expected),
            _ => {}
        }
    }

    /// Redeems a code this till claimed (claims one when it has none); now and then two
    /// tills scan the same code at once, and exactly one of them may redeem it.
    async fn redeem_gift(&mut self, customer: String, give_up: Instant) {
        let Some(code) = self.codes.pop() else {
            return self.claim_gift(customer, give_up).await;
        };
        let redeem = |redemption_key: String| {
            Call::RedeemGift(pb::RedeemGiftRequest {
                code: code.clone(),
                redemption_key,
                store_id: "store-1".into(),
            })
        };
        if self.rng.random_ratio(1, 4) {
            let (first, second) = (redeem(self.key("gift-a")), redeem(self.key("gift-b")));
            let mut mine = self.client.clone();
            let mut other = self.client.clone();
            other.reconnect();
            let (a, b) = tokio::join!(mine.write(&first, give_up), other.write(&second, give_up));
            if !exactly_one_won(&a, &b) {
                self.violation(format!(
                    "one code redeemed by two tills at once: {a:?} / {b:?} (exactly one must \
                     redeem it, the other be told it is redeemed already)"
                ));
            }
            return;
        }
        let call = redeem(self.key("gift"));
        match self.client.write(&call, give_up).await {
            Ok(_) => self.maybe_replay(&call, give_up).await,
            // Nobody else has this code: its redemption may not be refused.
            Err(Some(status)) => self.check_refusal(&call, &status, &[]),
            Err(None) => {}
        }
    }
}

/// Two tills raced for one thing (a hold's settlement, a gift code): exactly one may win, and
/// the other must be told FAILED_PRECONDITION. A till that gave up is left to the audit.
fn exactly_one_won(a: &Result<Reply, Option<Status>>, b: &Result<Reply, Option<Status>>) -> bool {
    let told = [a, b];
    if told.iter().any(|t| matches!(t, Err(None))) {
        return true;
    }
    let won = told.iter().filter(|t| t.is_ok()).count();
    let refused = told
        .iter()
        .filter(|t| matches!(t, Err(Some(s)) if s.code() == Code::FailedPrecondition))
        .count();
    won == 1 && refused == 1
}
