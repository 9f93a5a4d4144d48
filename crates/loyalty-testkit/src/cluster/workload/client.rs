//! A till's connection: the calls it sends, the retry of the identical request after a
//! retryable failure, and the booking of what it was told.

use std::time::{Duration, Instant};

use loyalty::pb;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::super::HANG_GRACE;
use super::record::{Shared, WriteKind};

/// One RPC, as sent (every retry sends exactly this again).
#[derive(Debug, Clone)]
pub enum Call {
    Earn(pb::RecordPurchaseRequest),
    Enroll(pb::EnrollCustomerRequest),
    Balance(pb::GetBalanceRequest),
    Redeem(pb::RedeemPointsRequest),
    Reserve(pb::ReservePointsRequest),
    Commit(pb::CommitReservationRequest),
    Release(pb::ReleaseReservationRequest),
    Return(pb::ReturnPurchaseRequest),
    ClaimGift(pb::ClaimGiftRequest),
    RedeemGift(pb::RedeemGiftRequest),
}

impl Call {
    /// The kind of write and its client key; `None` for a read.
    pub fn key(&self) -> Option<(WriteKind, &str)> {
        Some(match self {
            Call::Earn(r) => (WriteKind::Purchase, &r.purchase_id),
            Call::Enroll(r) => (WriteKind::Enrolment, &r.external_id),
            Call::Balance(_) => return None,
            Call::Redeem(r) => (WriteKind::Redemption, &r.redemption_id),
            Call::Reserve(r) => (WriteKind::Hold, &r.reservation_id),
            Call::Commit(r) => (WriteKind::Commit, &r.reservation_id),
            Call::Release(r) => (WriteKind::Release, &r.reservation_id),
            Call::Return(r) => (WriteKind::Return, &r.return_id),
            Call::ClaimGift(r) => (WriteKind::Claim, &r.claim_key),
            Call::RedeemGift(r) => (WriteKind::GiftRedemption, &r.redemption_key),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Earn(pb::RecordPurchaseResponse),
    Enroll(pb::EnrollCustomerResponse),
    Balance(pb::GetBalanceResponse),
    Redeem(pb::RedeemPointsResponse),
    Reserve(pb::ReservePointsResponse),
    /// The answer of a commit or a release.
    Settle(pb::SettleReservationResponse),
    Return(pb::ReturnPurchaseResponse),
    ClaimGift(pb::ClaimGiftResponse),
    RedeemGift(pb::RedeemGiftResponse),
}

/// How a failed attempt is counted, and whether a till would retry it.
pub fn classify(status: &Status) -> (String, bool) {
    let message = status.message();
    let transport = message.contains("transport error")
        || message.contains("h2 protocol error")
        || message.contains("tcp connect error")
        || message.contains("connection");
    let code = status.code();
    let label = if code == Code::Cancelled && message.contains("Timeout expired") {
        // tonic's own client-side deadline.
        "DeadlineExceeded(client)".to_string()
    } else if transport {
        format!("{code:?}(transport)")
    } else {
        format!("{code:?}")
    };
    let retryable = match code {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::ResourceExhausted
        | Code::Unknown => true,
        // A reset connection (the server was killed) surfaces as an h2 INTERNAL error; the
        // server's own INTERNAL ("internal error") is a bug, never retried.
        Code::Internal => transport,
        _ => false,
    };
    (label, retryable)
}

/// A till: a connection of its own to the server, the merchant's key, a deadline on every call,
/// and the identical request sent again after a retryable failure.
#[derive(Clone)]
pub struct Client {
    endpoint: String,
    key: MetadataValue<Ascii>,
    checkout: pb::checkout_service_client::CheckoutServiceClient<Channel>,
    member: pb::member_service_client::MemberServiceClient<Channel>,
    pub record: Shared,
    pub deadline: Duration,
    pub backoff: Duration,
}

impl Client {
    pub fn new(endpoint: &str, key: &str, record: Shared, deadline: Duration) -> Client {
        let channel = Self::channel(endpoint);
        Client {
            endpoint: endpoint.to_string(),
            key: format!("Bearer {key}").parse().unwrap(),
            checkout: pb::checkout_service_client::CheckoutServiceClient::new(channel.clone()),
            member: pb::member_service_client::MemberServiceClient::new(channel),
            record,
            deadline,
            backoff: Duration::from_millis(50),
        }
    }

    fn channel(endpoint: &str) -> Channel {
        Endpoint::from_shared(endpoint.to_string())
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy()
    }

    /// A new connection (after the old one broke).
    pub fn reconnect(&mut self) {
        let channel = Self::channel(&self.endpoint);
        self.checkout = pb::checkout_service_client::CheckoutServiceClient::new(channel.clone());
        self.member = pb::member_service_client::MemberServiceClient::new(channel);
    }

    /// One attempt.
    pub async fn send(&mut self, call: &Call) -> Result<Reply, Status> {
        let (key, deadline) = (&self.key, self.deadline);
        let checkout = &mut self.checkout;
        let member = &mut self.member;
        match call {
            Call::Earn(r) => checkout
                .record_purchase(authorized(r.clone(), key, deadline))
                .await
                .map(|r| Reply::Earn(r.into_inner())),
            Call::Enroll(r) => member
                .enroll_customer(authorized(r.clone(), key, deadline))
                .await
                .map(|r| Reply::Enroll(r.into_inner())),
            Call::Balance(r) => member
                .get_balance(authorized(r.clone(), key, deadline))
                .await
                .map(|r| Reply::Balance(r.into_inner())),
            Call::Redeem(r) => checkout
                .redeem_points(authorized(r.clone(), key, deadline))
                .await
                .map(|r| Reply::Redeem(r.into_inner())),
            Call::Reserve(r) => checkout
                .reserve_points(authorized(r.clone(), key, deadline))
                .await
                .map(|r| Reply::Reserve(r.into_inner())),
            Call::Commit(r) => checkout
                .commit_reservation(authorized(r.clone(), key, deadline))
                .await
                .map(|r| Reply::Settle(r.into_inner())),
            Call::Release(r) => checkout
                .release_reservation(authorized(r.clone(), key, deadline))
                .await
                .map(|r| Reply::Settle(r.into_inner())),
            Call::Return(r) => checkout
                .return_purchase(authorized(r.clone(), key, deadline))
                .await
                .map(|r| Reply::Return(r.into_inner())),
            Call::ClaimGift(r) => member
                .claim_gift(authorized(r.clone(), key, deadline))
                .await
                .map(|r| Reply::ClaimGift(r.into_inner())),
            Call::RedeemGift(r) => checkout
                .redeem_gift(authorized(r.clone(), key, deadline))
                .await
                .map(|r| Reply::RedeemGift(r.into_inner())),
        }
    }

    /// Sends `call` until it succeeds, retrying the identical request after retryable failures
    /// (with a short backoff, on a new connection after repeated failures), until `give_up`.
    /// A non-retryable answer is returned as is (the caller decides whether it is expected).
    /// `Err(None)` means the client gave up. Books nothing but the attempts: see
    /// [`Client::write`].
    pub async fn call(&mut self, call: &Call, give_up: Instant) -> Result<Reply, Option<Status>> {
        let mut failures_in_a_row = 0u32;
        loop {
            let started = Instant::now();
            let answer = tokio::time::timeout(self.deadline + HANG_GRACE, self.send(call)).await;
            let latency = started.elapsed();
            let result = match answer {
                Ok(result) => result,
                Err(_) => {
                    self.record.lock().unwrap().violations.push(format!(
                        "a call hung for {latency:?} (deadline {:?}): {call:?}",
                        self.deadline
                    ));
                    Err(Status::deadline_exceeded("client hang"))
                }
            };
            {
                let mut record = self.record.lock().unwrap();
                record.attempts += 1;
                if failures_in_a_row > 0 {
                    record.retries += 1;
                }
                record.max_latency = record.max_latency.max(latency);
                if let Call::Balance(_) = call {
                    record.reads += 1;
                }
                let status = match result {
                    Ok(reply) => return Ok(reply),
                    Err(status) => status,
                };
                let (label, retryable) = classify(&status);
                if !retryable {
                    return Err(Some(status));
                }
                let kind = call.key().map_or("read", |(kind, _)| kind.as_str());
                *record
                    .failures_by_operation
                    .entry(kind)
                    .or_default()
                    .entry(label.clone())
                    .or_default() += 1;
                *record.failures.entry(label.clone()).or_default() += 1;
                record.failed.push((Instant::now(), latency, label));
                record.max_failed_latency = record.max_failed_latency.max(latency);
            }
            if Instant::now() >= give_up {
                return Err(None);
            }
            failures_in_a_row += 1;
            if failures_in_a_row >= 2 {
                self.reconnect();
            }
            tokio::time::sleep(self.backoff).await;
        }
    }

    /// Sends a write like [`Client::call`] and books what the till was told: the first
    /// answer of its client key (every later one must equal it), a refusal, or that it gave
    /// up.
    pub async fn write(&mut self, call: &Call, give_up: Instant) -> Result<Reply, Option<Status>> {
        let told = self.call(call, give_up).await;
        self.record.lock().unwrap().book(call, &told);
        told
    }

    /// Records a purchase until acknowledged; a refusal is a violation (a retried identical
    /// request must succeed).
    pub async fn earn(
        &mut self,
        request: &pb::RecordPurchaseRequest,
        give_up: Instant,
    ) -> Option<pb::RecordPurchaseResponse> {
        match self.write(&Call::Earn(request.clone()), give_up).await {
            Ok(Reply::Earn(response)) => Some(response),
            Ok(_) | Err(None) => None,
            Err(Some(status)) => {
                self.record.lock().unwrap().violations.push(format!(
                    "{}: {:?} {} (a retried identical request must succeed)",
                    request.purchase_id,
                    status.code(),
                    status.message()
                ));
                None
            }
        }
    }

    /// Enrolls until acknowledged; a refusal is a violation.
    pub async fn enroll(
        &mut self,
        request: &pb::EnrollCustomerRequest,
        give_up: Instant,
    ) -> Option<pb::EnrollCustomerResponse> {
        match self.write(&Call::Enroll(request.clone()), give_up).await {
            Ok(Reply::Enroll(response)) => Some(response),
            Ok(_) | Err(None) => None,
            Err(Some(status)) => {
                self.record.lock().unwrap().violations.push(format!(
                    "enrolment of {}: {:?} {}",
                    request.external_id,
                    status.code(),
                    status.message()
                ));
                None
            }
        }
    }
}

/// `message` with the key and the deadline of a till.
fn authorized<T>(message: T, key: &MetadataValue<Ascii>, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", key.clone());
    request.set_timeout(deadline);
    request
}
