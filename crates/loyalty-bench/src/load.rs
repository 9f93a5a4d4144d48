//! The load itself: tonic clients sending the scenarios' requests, closed loop (N workers back
//! to back) and open loop (a fixed arrival schedule, latency from the intended send time, so a
//! slow server cannot hide behind a slowed-down client: no coordinated omission).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use loyalty::code_name;
use loyalty::pb;
use loyalty::pb::checkout_service_client::CheckoutServiceClient;
use loyalty::pb::member_service_client::MemberServiceClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::args::Scenario;
use crate::setup::{CURRENCY, Keys};
use crate::stats::Recorder;

/// Closed-loop workers per HTTP/2 connection: one connection for everything would make its
/// single writer the bottleneck, one per worker would not resemble real clients.
pub const WORKERS_PER_CHANNEL: usize = 8;

/// The open loop's dispatcher sleeps at least this long: a request may leave up to this much
/// after its due time (and that delay counts in its latency), in exchange for far fewer
/// wake-ups than one per request at tens of thousands of requests per second.
const DISPATCH_QUANTUM: Duration = Duration::from_micros(100);

/// Client-side limit per request; a slower answer counts as DEADLINE_EXCEEDED.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Points each `redeem` op holds and commits (and the redeem ceiling's script spends): one
/// point, so that the bench's customers, topped up before the redeem scenarios
/// (`setup::top_up`), never run dry.
pub const REDEEM_POINTS: i64 = 1;

/// One kind of request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Health,
    Balance,
    Checkout,
    /// ReservePoints, then CommitReservation of that hold: one op, OK only if both are.
    Redeem,
}

/// 80 % reads, 20 % purchases: an app-heavy day (`mixed` stays as it was measured before
/// redeeming existed, so its figures stay comparable).
pub const MIXED: &[(Op, u32)] = &[(Op::Balance, 80), (Op::Checkout, 20)];

/// The ops of a scenario and their weights.
#[derive(Debug, Clone)]
pub struct Workload {
    ops: Vec<(Op, u32)>,
    total: u32,
}

impl Workload {
    pub fn new(ops: &[(Op, u32)]) -> Workload {
        let ops: Vec<(Op, u32)> = ops.iter().copied().filter(|(_, w)| *w > 0).collect();
        let total = ops.iter().map(|(_, w)| w).sum();
        Workload { ops, total }
    }

    /// `None` for pgbench, which is not a gRPC workload.
    pub fn of(scenario: Scenario) -> Option<Workload> {
        match scenario {
            Scenario::Health => Some(Workload::new(&[(Op::Health, 1)])),
            Scenario::Balance | Scenario::BalanceCold => Some(Workload::new(&[(Op::Balance, 1)])),
            // `watch` runs checkout's very load (its watchers are beside it: `watch.rs`).
            Scenario::Checkout | Scenario::CheckoutNoOutbox | Scenario::Watch => {
                Some(Workload::new(&[(Op::Checkout, 1)]))
            }
            Scenario::Mixed => Some(Workload::new(MIXED)),
            Scenario::Redeem => Some(Workload::new(&[(Op::Redeem, 1)])),
            Scenario::Pgbench | Scenario::RedeemPgbench => None,
        }
    }

    /// A weighted random op (one draw even for a single op, so seeds stay comparable).
    pub fn pick(&self, rng: &mut impl Rng) -> Op {
        let mut roll = rng.random_range(0..self.total.max(1));
        for (op, weight) in &self.ops {
            if roll < *weight {
                return *op;
            }
            roll -= weight;
        }
        self.ops.first().map_or(Op::Health, |(op, _)| *op)
    }
}

/// Purchase (and reservation) ids unique per run: `<run tag>-<loop>-<n>`.
pub struct PurchaseIds {
    prefix: String,
    next: u64,
}

impl PurchaseIds {
    pub fn new(prefix: String) -> PurchaseIds {
        PurchaseIds { prefix, next: 0 }
    }

    fn next_id(&mut self) -> String {
        self.next += 1;
        format!("{}-{}", self.prefix, self.next)
    }
}

/// A request ready to send.
enum Prepared {
    Health,
    Balance(pb::GetBalanceRequest),
    Checkout(pb::RecordPurchaseRequest),
    Redeem(pb::ReservePointsRequest),
}

/// The purchase ids of every checkout sent (warm-up included), by how it was answered: what
/// the `watch` scenario's watchers must have received.
#[derive(Debug, Default)]
pub struct PurchaseLog {
    /// Answered OK: committed, so its purchase_recorded event must reach every watcher.
    pub ok: HashSet<String>,
    /// Answered with an error: committed or not (a deadline can pass after the commit), so
    /// its event may come at most once.
    pub failed: HashSet<String>,
}

/// A server under load: its connections and the keys the requests carry.
pub struct Target {
    channels: Vec<Channel>,
    app_auth: MetadataValue<Ascii>,
    pos_auth: MetadataValue<Ascii>,
    customers: u64,
    /// Set for `watch`: every checkout's answer is logged by its purchase id.
    purchase_log: Option<Arc<Mutex<PurchaseLog>>>,
}

impl Target {
    pub async fn connect(
        endpoint: &str,
        channels: usize,
        keys: &Keys,
        customers: u64,
    ) -> Result<Target> {
        let endpoint = Endpoint::from_shared(endpoint.to_string())?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .timeout(REQUEST_TIMEOUT);
        let mut connected = Vec::with_capacity(channels);
        for _ in 0..channels.max(1) {
            // `connect` (not lazy): each is its own HTTP/2 connection.
            connected.push(
                endpoint
                    .connect()
                    .await
                    .with_context(|| format!("cannot connect to {}", endpoint.uri()))?,
            );
        }
        let bearer = |key: &str| -> Result<MetadataValue<Ascii>> {
            format!("Bearer {key}")
                .parse()
                .context("an API key is not ASCII")
        };
        Ok(Target {
            channels: connected,
            app_auth: bearer(&keys.app)?,
            pos_auth: bearer(&keys.pos)?,
            customers,
            purchase_log: None,
        })
    }

    /// Logs every checkout's purchase id with its answer into `log` (one short lock per
    /// checkout, outside the request).
    pub fn with_purchase_log(mut self, log: Arc<Mutex<PurchaseLog>>) -> Target {
        self.purchase_log = Some(log);
        self
    }

    /// Builds the request of `op` for a random customer of the whole population.
    fn prepare(&self, op: Op, rng: &mut StdRng, ids: &mut PurchaseIds) -> Prepared {
        match op {
            Op::Health => Prepared::Health,
            Op::Balance => Prepared::Balance(pb::GetBalanceRequest {
                external_id: rng.random_range(1..=self.customers).to_string(),
                min_version: 0,
            }),
            Op::Checkout => {
                let customer = rng.random_range(1..=self.customers);
                let lines = basket(rng);
                Prepared::Checkout(pb::RecordPurchaseRequest {
                    external_id: customer.to_string(),
                    purchase_id: ids.next_id(),
                    store_id: format!("store-{}", customer % 20),
                    occurred_at: Some(now()),
                    currency: CURRENCY.to_string(),
                    total_minor: lines.iter().map(|l| l.amount_minor).sum(),
                    lines,
                })
            }
            Op::Redeem => {
                // A fresh reservation id, for the receipt being paid (as a till names it).
                let reservation_id = ids.next_id();
                Prepared::Redeem(pb::ReservePointsRequest {
                    external_id: rng.random_range(1..=self.customers).to_string(),
                    purchase_id: format!("{reservation_id}-receipt"),
                    reservation_id,
                    points: REDEEM_POINTS,
                    ttl_seconds: 0,
                })
            }
        }
    }

    /// Sends one request; `Err` is the gRPC status name (or NOT_SERVING for health).
    async fn send(&self, request: Prepared, channel: usize) -> Result<(), &'static str> {
        let channel = self.channels[channel % self.channels.len()].clone();
        let status_name = |s: tonic::Status| code_name(s.code());
        match request {
            Prepared::Health => {
                let reply = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map_err(status_name)?;
                if reply.into_inner().status == ServingStatus::Serving as i32 {
                    Ok(())
                } else {
                    Err("NOT_SERVING")
                }
            }
            Prepared::Balance(message) => MemberServiceClient::new(channel)
                .get_balance(authorized(message, &self.app_auth))
                .await
                .map(drop)
                .map_err(status_name),
            Prepared::Checkout(message) => {
                let logged = self
                    .purchase_log
                    .as_ref()
                    .map(|log| (log, message.purchase_id.clone()));
                let answer = CheckoutServiceClient::new(channel)
                    .record_purchase(authorized(message, &self.pos_auth))
                    .await
                    .map(drop)
                    .map_err(status_name);
                if let Some((log, purchase_id)) = logged {
                    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                    if answer.is_ok() {
                        log.ok.insert(purchase_id);
                    } else {
                        log.failed.insert(purchase_id);
                    }
                }
                answer
            }
            Prepared::Redeem(message) => {
                let mut client = CheckoutServiceClient::new(channel);
                let reservation_id = message.reservation_id.clone();
                client
                    .reserve_points(authorized(message, &self.pos_auth))
                    .await
                    .map_err(status_name)?;
                client
                    .commit_reservation(authorized(
                        pb::CommitReservationRequest { reservation_id },
                        &self.pos_auth,
                    ))
                    .await
                    .map(drop)
                    .map_err(status_name)
            }
        }
    }
}

fn authorized<T>(message: T, auth: &MetadataValue<Ascii>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", auth.clone());
    request
}

fn now() -> prost_types::Timestamp {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: now.as_secs() as i64,
        nanos: now.subsec_nanos() as i32,
    }
}

/// What a café sells; categories matter because programs multiply by them.
const MENU: [(&str, &str, i64); 7] = [
    ("espresso", "coffee", 280),
    ("latte", "coffee", 420),
    ("croissant", "bakery", 250),
    ("bagel", "bakery", 320),
    ("sandwich", "food", 690),
    ("salad", "food", 850),
    ("mug", "merch", 1490),
];

/// Two or three different items, one or two of each.
fn basket(rng: &mut StdRng) -> Vec<pb::PurchaseLine> {
    let count = rng.random_range(2..=3);
    rand::seq::index::sample(rng, MENU.len(), count)
        .into_iter()
        .map(|i| {
            let (sku, category, price) = MENU[i];
            let quantity = rng.random_range(1..=2u32);
            pb::PurchaseLine {
                sku: sku.to_string(),
                category: category.to_string(),
                quantity,
                amount_minor: price * i64::from(quantity),
            }
        })
        .collect()
}

/// An unmeasured warm-up followed by the measured window.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub warmup: Duration,
    pub measure: Duration,
}

/// A per-worker seed derived from the run's seed.
fn seed_for(seed: u64, stream: u64) -> u64 {
    seed ^ stream.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// `concurrency` workers, each sending its next request as soon as the previous one is
/// answered. Latency is measured per request; only requests started in the measured window
/// count.
pub async fn closed_loop(
    target: Arc<Target>,
    workload: &Workload,
    concurrency: usize,
    window: Window,
    seed: u64,
    tag: &str,
) -> Result<Recorder> {
    let start = Instant::now();
    let measure_from = start + window.warmup;
    let end = measure_from + window.measure;
    let mut workers = JoinSet::new();
    for worker in 0..concurrency {
        let target = target.clone();
        let workload = workload.clone();
        let mut ids = PurchaseIds::new(format!("{tag}-c{worker}"));
        workers.spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed_for(seed, worker as u64));
            let mut recorder = Recorder::new();
            let channel = worker / WORKERS_PER_CHANNEL;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let op = workload.pick(&mut rng);
                let request = target.prepare(op, &mut rng, &mut ids);
                let result = target.send(request, channel).await;
                if sent >= measure_from {
                    match result {
                        Ok(()) => recorder.ok(sent.elapsed()),
                        Err(code) => recorder.error(code),
                    }
                }
            }
            recorder
        });
    }
    let mut total = Recorder::new();
    while let Some(done) = workers.join_next().await {
        total.merge(&done.context("a load worker panicked")?);
    }
    Ok(total)
}

/// Request `i` is due at `start + i / rate`, whatever happened to earlier requests; each is
/// spawned at its due time and its latency runs from that time. At most `max_in_flight` run at
/// once; a request due while the cap is reached is not sent and counts as CLIENT_OVERLOAD.
///
/// The schedule is kept by a blocking thread with `std::thread::sleep` (high-resolution
/// timers): tokio's timer ticks in whole milliseconds, which would add up to a millisecond of
/// client-made latency to every request; this way it is at most `DISPATCH_QUANTUM` plus the
/// kernel's timer slack (~50 µs).
pub async fn open_loop(
    target: Arc<Target>,
    workload: &Workload,
    rate: f64,
    window: Window,
    max_in_flight: u32,
    seed: u64,
    tag: &str,
) -> Result<Recorder> {
    let recorder = Arc::new(Mutex::new(Recorder::new()));
    let permits = Arc::new(Semaphore::new(max_in_flight as usize));
    let runtime = tokio::runtime::Handle::current();
    // The dispatcher is a thread, not a task: if this future is dropped (Ctrl-C), the guard
    // tells it to stop instead of sending on until its schedule ends.
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let dispatcher = {
        let stopped = stop.0.clone();
        let recorder = recorder.clone();
        let permits = permits.clone();
        let workload = workload.clone();
        let mut ids = PurchaseIds::new(format!("{tag}-o"));
        tokio::task::spawn_blocking(move || {
            let mut rng = StdRng::seed_from_u64(seed_for(seed, u64::MAX));
            let start = Instant::now() + Duration::from_millis(10);
            let measure_from = start + window.warmup;
            let due_requests =
                ((window.warmup + window.measure).as_secs_f64() * rate).floor() as u64;
            let due_at = |i: u64| start + Duration::from_secs_f64(i as f64 / rate);
            let mut i = 0;
            while i < due_requests && !stopped.load(Ordering::Relaxed) {
                let now = Instant::now();
                let next = due_at(i);
                if next > now {
                    std::thread::sleep((next - now).max(DISPATCH_QUANTUM));
                    continue;
                }
                // Everything due by now, in one go.
                while i < due_requests && due_at(i) <= Instant::now() {
                    let due = due_at(i);
                    let channel = i as usize;
                    i += 1;
                    let measured = due >= measure_from;
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        if measured {
                            lock(&recorder).error("CLIENT_OVERLOAD");
                        }
                        continue;
                    };
                    let op = workload.pick(&mut rng);
                    let request = target.prepare(op, &mut rng, &mut ids);
                    let target = target.clone();
                    let recorder = recorder.clone();
                    runtime.spawn(async move {
                        let result = target.send(request, channel).await;
                        let latency = due.elapsed();
                        drop(permit);
                        if measured {
                            let mut recorder = lock(&recorder);
                            match result {
                                Ok(()) => recorder.ok(latency),
                                Err(code) => recorder.error(code),
                            }
                        }
                    });
                }
            }
        })
    };
    dispatcher
        .await
        .context("the open-loop dispatcher panicked")?;
    // Every permit back means every request has finished.
    let _all = permits
        .acquire_many(max_in_flight)
        .await
        .context("open loop: permits closed")?;
    let total = lock(&recorder).clone();
    drop(stop);
    Ok(total)
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn lock(recorder: &Mutex<Recorder>) -> std::sync::MutexGuard<'_, Recorder> {
    recorder.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mixed_workload_follows_its_weights() {
        let workload = Workload::of(Scenario::Mixed).unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let checkouts = (0..100_000)
            .filter(|_| workload.pick(&mut rng) == Op::Checkout)
            .count();
        assert!((19_000..21_000).contains(&checkouts), "{checkouts}");
        let single = Workload::of(Scenario::Balance).unwrap();
        assert!((0..100).all(|_| single.pick(&mut rng) == Op::Balance));
        assert!(Workload::of(Scenario::Pgbench).is_none());
    }

    #[test]
    fn baskets_are_valid_receipts() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..1000 {
            let lines = basket(&mut rng);
            assert!((2..=3).contains(&lines.len()));
            let mut skus: Vec<&str> = lines.iter().map(|l| l.sku.as_str()).collect();
            skus.sort_unstable();
            skus.dedup();
            assert_eq!(skus.len(), lines.len(), "distinct items");
            assert!(lines.iter().all(|l| l.amount_minor > 0 && l.quantity >= 1));
        }
    }

    #[test]
    fn purchase_ids_are_unique_per_loop() {
        let mut ids = PurchaseIds::new("b1-checkout-c3".into());
        assert_eq!(ids.next_id(), "b1-checkout-c3-1");
        assert_eq!(ids.next_id(), "b1-checkout-c3-2");
        assert_ne!(seed_for(1, 0), seed_for(1, 1));
    }
}
