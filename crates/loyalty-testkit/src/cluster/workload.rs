//! The workload of a scenario: clients that call as tills do (retrying the identical
//! request), and the record of every acknowledged write.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use loyalty::pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::*;

/// What a workload client does.
///
/// Only earning (`RecordPurchase`) and enrolling (`EnrollCustomer`) write today; `Balance` is a
/// read-your-writes probe. Redeem, Return and Reserve have no RPCs yet (a later issue adds
/// them). Each will join as a variant here with its own request in [`Call`]: it carries a client
/// key, so [`Client::call`] retries it identically like `Earn`, its acknowledgement goes into
/// [`Record`] next to `acknowledged`, and [`audit`] gets its checks where it says so (one ledger
/// entry per key, no overdraft, every reservation committed or released exactly once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Earn,
    Enroll,
    Balance,
}

/// Relative weights of the operations.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub earn: u32,
    pub enroll: u32,
    pub balance: u32,
}

impl Mix {
    fn pick(&self, rng: &mut StdRng) -> Op {
        let roll = rng.random_range(0..self.earn + self.enroll + self.balance);
        if roll < self.earn {
            Op::Earn
        } else if roll < self.earn + self.enroll {
            Op::Enroll
        } else {
            Op::Balance
        }
    }
}

/// One RPC, as sent (every retry sends exactly this again).
#[derive(Debug, Clone)]
pub enum Call {
    Earn(pb::RecordPurchaseRequest),
    Enroll(pb::EnrollCustomerRequest),
    Balance(pb::GetBalanceRequest),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Earn(pb::RecordPurchaseResponse),
    Enroll(pb::EnrollCustomerResponse),
    Balance(pb::GetBalanceResponse),
}

/// The first acknowledgement of a purchase.
#[derive(Debug, Clone)]
pub struct Ack {
    pub external_id: String,
    pub response: pb::RecordPurchaseResponse,
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
    /// When each failed attempt ended, how long it took, and its label.
    pub failed: Vec<(Instant, Duration, String)>,
    pub max_failed_latency: Duration,
    pub max_latency: Duration,
    /// When each write (first acknowledgement of a purchase, or an enrolment) succeeded.
    pub write_acks: Vec<Instant>,
    /// purchase_id → its first acknowledgement.
    pub acknowledged: HashMap<String, Ack>,
    /// external_id → how many enrolments answered `created`.
    pub enrolled: HashMap<String, u32>,
    /// Customers an enrolment or a purchase was acknowledged for.
    pub customers: HashSet<String>,
    /// Purchases abandoned by their client after the give-up time, still failing.
    pub gave_up: Vec<String>,
    pub violations: Vec<String>,
}

pub type Shared = Arc<Mutex<Record>>;

impl Record {
    pub fn shared() -> Shared {
        Arc::default()
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

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.key.clone());
        request.set_timeout(self.deadline);
        request
    }

    /// One attempt.
    pub async fn send(&mut self, call: &Call) -> Result<Reply, Status> {
        match call {
            Call::Earn(r) => {
                let request = self.request(r.clone());
                self.checkout
                    .record_purchase(request)
                    .await
                    .map(|r| Reply::Earn(r.into_inner()))
            }
            Call::Enroll(r) => {
                let request = self.request(r.clone());
                self.member
                    .enroll_customer(request)
                    .await
                    .map(|r| Reply::Enroll(r.into_inner()))
            }
            Call::Balance(r) => {
                let request = self.request(r.clone());
                self.member
                    .get_balance(request)
                    .await
                    .map(|r| Reply::Balance(r.into_inner()))
            }
        }
    }

    /// Sends `call` until it succeeds, retrying the identical request after retryable failures
    /// (with a short backoff, on a new connection after repeated failures), until `give_up`.
    /// A non-retryable answer is returned as is (the caller decides whether it is expected).
    /// `Err(None)` means the client gave up.
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

    /// Records a purchase until acknowledged; books the acknowledgement (or the violation).
    pub async fn earn(
        &mut self,
        request: &pb::RecordPurchaseRequest,
        give_up: Instant,
    ) -> Option<pb::RecordPurchaseResponse> {
        match self.call(&Call::Earn(request.clone()), give_up).await {
            Ok(Reply::Earn(response)) => {
                self.record.lock().unwrap().ack_purchase(request, &response);
                Some(response)
            }
            Ok(other) => unreachable!("{other:?}"),
            Err(Some(status)) => {
                self.record.lock().unwrap().violations.push(format!(
                    "{}: {:?} {} (a retried identical request must succeed)",
                    request.purchase_id,
                    status.code(),
                    status.message()
                ));
                None
            }
            Err(None) => {
                let mut record = self.record.lock().unwrap();
                record.gave_up.push(request.purchase_id.clone());
                None
            }
        }
    }

    /// Enrolls until acknowledged; books the acknowledgement (or the violation).
    pub async fn enroll(
        &mut self,
        request: &pb::EnrollCustomerRequest,
        give_up: Instant,
    ) -> Option<pb::EnrollCustomerResponse> {
        match self.call(&Call::Enroll(request.clone()), give_up).await {
            Ok(Reply::Enroll(response)) => {
                self.record.lock().unwrap().ack_enroll(request, &response);
                Some(response)
            }
            Ok(other) => unreachable!("{other:?}"),
            Err(Some(status)) => {
                self.record.lock().unwrap().violations.push(format!(
                    "enrolment of {}: {:?} {}",
                    request.external_id,
                    status.code(),
                    status.message()
                ));
                None
            }
            Err(None) => {
                self.record
                    .lock()
                    .unwrap()
                    .gave_up
                    .push(format!("enrolment of {}", request.external_id));
                None
            }
        }
    }
}

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

/// Concurrent clients driving a mix of operations against a few hot and some cold customers.
#[derive(Debug, Clone)]
pub struct Workload {
    pub hot: Vec<String>,
    pub cold: Vec<String>,
    /// Share of operations on the hot customers, in percent.
    pub hot_percent: u32,
    /// Share of purchases by a brand-new customer (enrolled by that purchase), in percent.
    pub new_customer_percent: u32,
    pub workers: usize,
    pub mix: Mix,
    /// Share of acknowledged writes sent again (1–3 more copies), in percent.
    pub replay_percent: u32,
    pub deadline: Duration,
    /// A request still failing this long after it was first sent is abandoned (and reported).
    pub give_up_after: Duration,
    pub seed: u64,
}

impl Workload {
    pub fn new(workers: usize) -> Workload {
        Workload {
            hot: (1..=4).map(|i| format!("hot-{i}")).collect(),
            cold: (1..=12).map(|i| format!("cold-{i}")).collect(),
            hot_percent: 80,
            new_customer_percent: 3,
            workers,
            mix: Mix {
                earn: 80,
                enroll: 5,
                balance: 15,
            },
            replay_percent: 10,
            deadline: Duration::from_secs(2),
            give_up_after: Duration::from_secs(30),
            seed: std::env::var("LOYALTY_RELIABILITY_SEED")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_nanos() as u64
                }),
        }
    }

    /// Starts the clients against `cluster`; they run until [`Running::stop`].
    pub fn start(&self, cluster: &Cluster) -> Running {
        let record = Record::shared();
        let (stop, stopped) = watch::channel(false);
        let tasks = (0..self.workers)
            .map(|worker| {
                let workload = self.clone();
                let client = cluster.client(&record, self.deadline);
                let stopped = stopped.clone();
                tokio::spawn(async move { workload.worker(worker, client, stopped).await })
            })
            .collect();
        Running {
            stop,
            tasks,
            record,
            started: Instant::now(),
        }
    }

    async fn worker(self, worker: usize, mut client: Client, stop: watch::Receiver<bool>) {
        let mut rng = StdRng::seed_from_u64(self.seed.wrapping_add(worker as u64 * 7919));
        // The highest version of each customer this till has seen acknowledged or read.
        let mut seen: HashMap<String, i64> = HashMap::new();
        let mut n = 0u64;
        while !*stop.borrow() {
            n += 1;
            let customer = if self.cold.is_empty() || rng.random_range(0..100) < self.hot_percent {
                &self.hot[rng.random_range(0..self.hot.len())]
            } else {
                &self.cold[rng.random_range(0..self.cold.len())]
            };
            let give_up = Instant::now() + self.give_up_after;
            match self.mix.pick(&mut rng) {
                Op::Earn => {
                    let newcomer;
                    let customer = if rng.random_range(0..100) < self.new_customer_percent {
                        newcomer = format!("new-w{worker}-{n}");
                        &newcomer
                    } else {
                        customer
                    };
                    let request = receipt(&mut rng, customer, &format!("w{worker}-{n}"));
                    let before = seen.get(customer).copied().unwrap_or(0);
                    let Some(first) = client.earn(&request, give_up).await else {
                        continue;
                    };
                    let version = first.balance.as_ref().map_or(0, |b| b.version);
                    if version <= before {
                        client.record.lock().unwrap().violations.push(format!(
                            "{}: new purchase acknowledged at version {version}, but version \
                             {before} of {customer} was seen before it was sent",
                            request.purchase_id
                        ));
                    }
                    seen.insert(customer.clone(), version.max(before));
                    if rng.random_range(0..100) < self.replay_percent {
                        let copies = rng.random_range(1..=3);
                        let concurrent = rng.random_bool(0.5);
                        replay(&client, &request, copies, concurrent, give_up).await;
                    }
                }
                Op::Enroll => {
                    let request = profile(customer);
                    client.enroll(&request, give_up).await;
                }
                Op::Balance => {
                    let min_version = seen.get(customer).copied().unwrap_or(0);
                    let call = Call::Balance(pb::GetBalanceRequest {
                        external_id: customer.clone(),
                        min_version,
                    });
                    match client.call(&call, give_up).await {
                        Ok(Reply::Balance(reply)) => {
                            let balance = reply.balance.unwrap_or_default();
                            if balance.version < min_version {
                                client.record.lock().unwrap().violations.push(format!(
                                    "{customer}: read version {} after asking for at least \
                                     {min_version}",
                                    balance.version
                                ));
                            }
                            seen.insert(customer.clone(), balance.version.max(min_version));
                        }
                        Ok(other) => unreachable!("{other:?}"),
                        // Not enrolled yet: fine, unless this till saw it acknowledged.
                        Err(Some(status))
                            if status.code() == Code::NotFound && min_version == 0 => {}
                        Err(Some(status)) => {
                            client.record.lock().unwrap().violations.push(format!(
                                "balance of {customer} (min_version {min_version}): {:?} {}",
                                status.code(),
                                status.message()
                            ));
                        }
                        Err(None) => {}
                    }
                }
            }
        }
    }
}

/// Sends `copies` more identical copies of an acknowledged purchase, one after the other or all
/// at once; each must get the first answer (checked by [`Record::ack_purchase`]).
pub async fn replay(
    client: &Client,
    request: &pb::RecordPurchaseRequest,
    copies: usize,
    concurrent: bool,
    give_up: Instant,
) -> Vec<Option<pb::RecordPurchaseResponse>> {
    client.record.lock().unwrap().replays += copies as u64;
    if concurrent {
        let calls = (0..copies).map(|_| {
            let mut client = client.clone();
            let request = request.clone();
            tokio::spawn(async move { client.earn(&request, give_up).await })
        });
        futures::future::join_all(calls)
            .await
            .into_iter()
            .map(|r| r.expect("replay task"))
            .collect()
    } else {
        let mut client = client.clone();
        let mut answers = Vec::new();
        for _ in 0..copies {
            answers.push(client.earn(request, give_up).await);
        }
        answers
    }
}

/// A workload in progress.
pub struct Running {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    pub record: Shared,
    pub started: Instant,
}

impl Running {
    /// Waits (up to `within`) for the first write acknowledged after `t`; returns its delay.
    pub async fn first_write_after(&self, t: Instant, within: Duration) -> Option<Duration> {
        loop {
            if let Some(at) = self.record.lock().unwrap().first_write_after(t) {
                return Some(at - t);
            }
            if t.elapsed() > within {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the clients (each finishes its current operation, retries included) and returns
    /// what they saw.
    pub async fn stop(self) -> (Record, Duration) {
        let _ = self.stop.send(true);
        let ran = self.started.elapsed();
        for task in self.tasks {
            match tokio::time::timeout(Duration::from_secs(60), task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => self
                    .record
                    .lock()
                    .unwrap()
                    .violations
                    .push(format!("a client task failed: {e}")),
                Err(_) => self
                    .record
                    .lock()
                    .unwrap()
                    .violations
                    .push("a client did not finish within 60 s of the stop".into()),
            }
        }
        let record = std::mem::take(&mut *self.record.lock().unwrap());
        (record, ran)
    }
}
