//! The workload of a scenario: clients that call as tills do (retrying the identical
//! request), and the record of what each of them was told.
//!
//! Split in five: `client` (one till's connection, its calls and the retry), `record` (every
//! acknowledgement and refusal by client key), `till` (what a till does: buy, spend, hold
//! and settle, return, claim and redeem gifts), `engagement` (the scheduler-side callers: an
//! event watcher and greeting workers) and this file (the mix, the clients running together,
//! deliberate replays).

mod client;
mod engagement;
mod record;
mod till;

use std::time::{Duration, Instant};

use loyalty::pb;
use rand::Rng;
use rand::rngs::StdRng;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Status;

pub use client::{Call, Client, Reply, classify};
pub use engagement::{
    Decision, EventWatcher, GREETING_LEASE, GreetingRecord, GreetingWorkers, Handout, Received,
    WatchRecord, enroll_birthdays,
};
pub use record::{Ack, Acked, HoldAck, Record, Shared, WriteKind};
pub use till::{profile, receipt};

use super::*;

/// What a workload client does next.
///
/// Every write carries a client key, so [`Client::write`] retries it identically after a
/// retryable failure, and its answer is booked in [`Record`] by that key. `Reserve` is a till
/// taking payment: the hold is then committed (payment accepted), released (declined),
/// both at once from two tills, released and then committed (refused), committed after its
/// ttl (refused), or left for the service's sweep to release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Earn,
    Enroll,
    Balance,
    Redeem,
    Reserve,
    Return,
    ClaimGift,
    RedeemGift,
}

/// Relative weights of the operations.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mix {
    pub earn: u32,
    pub enroll: u32,
    pub balance: u32,
    pub redeem: u32,
    pub reserve: u32,
    /// Returns of purchases the same till recorded.
    pub return_purchase: u32,
    /// ClaimGift of the workload's catalog gift.
    pub claim_gift: u32,
    /// RedeemGift of a code the same till claimed (a claim when it has none).
    pub redeem_gift: u32,
}

impl Mix {
    /// Earning, enrolling and balance reads only.
    pub fn earning(earn: u32, enroll: u32, balance: u32) -> Mix {
        Mix {
            earn,
            enroll,
            balance,
            ..Mix::default()
        }
    }

    /// A till's day: purchases most, then reads, holds, redemptions, returns and gifts.
    pub fn till_day() -> Mix {
        Mix {
            earn: 55,
            enroll: 4,
            balance: 13,
            redeem: 9,
            reserve: 10,
            return_purchase: 5,
            claim_gift: 2,
            redeem_gift: 2,
        }
    }

    fn weights(&self) -> [(Op, u32); 8] {
        [
            (Op::Earn, self.earn),
            (Op::Enroll, self.enroll),
            (Op::Balance, self.balance),
            (Op::Redeem, self.redeem),
            (Op::Reserve, self.reserve),
            (Op::Return, self.return_purchase),
            (Op::ClaimGift, self.claim_gift),
            (Op::RedeemGift, self.redeem_gift),
        ]
    }

    fn pick(&self, rng: &mut StdRng) -> Op {
        let total: u32 = self.weights().iter().map(|(_, w)| w).sum();
        let mut roll = rng.random_range(0..total.max(1));
        for (op, weight) in self.weights() {
            if roll < weight {
                return op;
            }
            roll -= weight;
        }
        Op::Balance
    }

    fn claims_gifts(&self) -> bool {
        self.claim_gift + self.redeem_gift > 0
    }
}

/// The gift of the catalog the workload's gift traffic claims: a small stock, so it sells
/// out under load and the rest of the claims are refused.
#[derive(Debug, Clone)]
pub struct CatalogGift {
    pub gift_id: String,
    pub points_price: i64,
    pub stock: i64,
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
    /// Share of acknowledged writes sent again, in percent.
    pub replay_percent: u32,
    /// How many more copies a replayed write gets (at least 1).
    pub replay_copies: u32,
    pub deadline: Duration,
    /// A request still failing this long after it was first sent is abandoned (and reported).
    pub give_up_after: Duration,
    /// What ClaimGift claims; created in the catalog by [`Workload::start`].
    pub gift: CatalogGift,
    /// Each client stops after this many operations (`None`: when told to).
    pub operations_per_worker: Option<u64>,
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
            mix: Mix::till_day(),
            replay_percent: 10,
            replay_copies: 3,
            deadline: Duration::from_secs(2),
            give_up_after: Duration::from_secs(30),
            gift: CatalogGift {
                gift_id: "tote-bag".into(),
                points_price: 40,
                stock: 25,
            },
            operations_per_worker: None,
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

    /// Starts the clients against `cluster` with a record of their own; they run until
    /// [`Running::stop`] (or their operations are done).
    pub async fn start(&self, cluster: &Cluster) -> Running {
        self.start_recording(cluster, &Record::shared()).await
    }

    /// Starts the clients, booking into `record`. Puts the workload's gift in the catalog
    /// first when the mix claims gifts.
    pub async fn start_recording(&self, cluster: &Cluster, record: &Shared) -> Running {
        if self.mix.claims_gifts() {
            cluster.create_gift(&self.gift).await;
            record
                .lock()
                .unwrap()
                .gift_stock
                .insert(self.gift.gift_id.clone(), self.gift.stock);
        }
        let (stop, stopped) = watch::channel(false);
        let tasks = (0..self.workers)
            .map(|worker| {
                let till =
                    till::Till::new(self.clone(), worker, cluster.client(record, self.deadline));
                tokio::spawn(till.run(stopped.clone()))
            })
            .collect();
        Running {
            stop,
            tasks,
            record: record.clone(),
            started: Instant::now(),
        }
    }
}

/// Sends `copies` identical copies of a write, one after the other or all at once, booked
/// like every write (so each must get the first answer of its key). A refusal of a copy is
/// a violation: the write was or will be acknowledged by another copy.
pub async fn replay(
    client: &Client,
    call: &Call,
    copies: usize,
    concurrent: bool,
    give_up: Instant,
) -> Vec<Result<Reply, Option<Status>>> {
    client.record.lock().unwrap().replays += copies as u64;
    let answers = if concurrent {
        let calls = (0..copies).map(|_| {
            let mut client = client.clone();
            let call = call.clone();
            tokio::spawn(async move { client.write(&call, give_up).await })
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
            answers.push(client.write(call, give_up).await);
        }
        answers
    };
    for answer in &answers {
        if let Err(Some(status)) = answer {
            client.record.lock().unwrap().violations.push(format!(
                "a copy of {:?} was refused: {:?} {}",
                call.key(),
                status.code(),
                status.message()
            ));
        }
    }
    answers
}

/// A purchase sent `copies` times (see [`replay`]).
pub async fn replay_purchase(
    client: &Client,
    request: &pb::RecordPurchaseRequest,
    copies: usize,
    concurrent: bool,
    give_up: Instant,
) -> Vec<Result<Reply, Option<Status>>> {
    replay(
        client,
        &Call::Earn(request.clone()),
        copies,
        concurrent,
        give_up,
    )
    .await
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
        let record = self.join().await;
        (std::mem::take(&mut *record.lock().unwrap()), ran)
    }

    /// Waits for the clients to finish their operations (see
    /// [`Workload::operations_per_worker`]); what they saw stays in the shared record.
    pub async fn join(self) -> Shared {
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
                    .push("a client did not finish within 60 s".into()),
            }
        }
        self.record
    }
}
