//! The internal callers beside the tills (scope scheduler): an event watcher that follows
//! `WatchEvents` and, after any error, reconnects with the last cursor it received; and
//! greeting workers that claim due greetings under a short lease and acknowledge them (or walk
//! away, leaving the greeting to come back after its lease). Both book what they were handed,
//! for the audit (`audit::engagement`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use loyalty::pb;
use loyalty::pb::engagement_service_client::EngagementServiceClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use super::classify;
use crate::cluster::Cluster;

/// Wait before a watcher reconnects, or a worker claims again after a failure.
const BACKOFF: Duration = Duration::from_millis(100);

/// Every call but the stream carries this deadline.
const CALL_DEADLINE: Duration = Duration::from_secs(2);

/// The lease a greeting worker asks for: short, so a walked-away greeting comes back within
/// the scenario.
pub const GREETING_LEASE: Duration = Duration::from_secs(2);

fn channel(endpoint: &str) -> Channel {
    Endpoint::from_shared(endpoint.to_string())
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        // A connection to a killed or frozen server is noticed, not waited on forever.
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .connect_lazy()
}

fn bearer(key: &str) -> MetadataValue<Ascii> {
    format!("Bearer {key}").parse().expect("ASCII key")
}

fn request<T>(message: T, key: &MetadataValue<Ascii>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", key.clone());
    request
}

/// One event as the watcher received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub cursor: String,
    pub kind: i32,
    /// `details_json.purchase_id`, when it has one.
    pub purchase_id: Option<String>,
    /// Which connection (0, 1, ... one more after every reconnect) delivered it.
    pub connection: u32,
}

/// What the watcher saw, in arrival order.
#[derive(Debug, Clone, Default)]
pub struct WatchRecord {
    pub received: Vec<Received>,
    /// Streams that ended with an error (or ended at all), by label; each was followed by a
    /// reconnect with the last cursor.
    pub stream_errors: BTreeMap<String, u64>,
    pub reconnects: u32,
    /// Answers that must never come (OUT_OF_RANGE, INVALID_ARGUMENT on our own cursor...).
    pub refusals: Vec<String>,
}

impl WatchRecord {
    pub fn last_cursor(&self) -> String {
        self.received
            .last()
            .map(|r| r.cursor.clone())
            .unwrap_or_default()
    }
}

/// The `purchase_id` of an event's details.
pub fn purchase_id_of(details_json: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(details_json).ok()?;
    Some(value.get("purchase_id")?.as_str()?.to_string())
}

/// A watcher following the merchant's events from the start of its stream.
pub struct EventWatcher {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    pub record: Arc<Mutex<WatchRecord>>,
}

impl EventWatcher {
    pub fn start(cluster: &Cluster) -> EventWatcher {
        let endpoint = cluster.endpoint();
        let key = bearer(&cluster.scheduler_key);
        let record = Arc::new(Mutex::new(WatchRecord::default()));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(follow(endpoint, key, record.clone(), stopped));
        EventWatcher { stop, task, record }
    }

    /// Waits (up to `within`) until the watcher's last cursor is `cursor` (the stream's end
    /// as the database has it; empty: nothing to wait for), then stops it. Returns what it saw.
    pub async fn stop_at(self, cursor: &str, within: Duration) -> WatchRecord {
        let started = Instant::now();
        while !cursor.is_empty()
            && self.record.lock().unwrap().last_cursor() != cursor
            && started.elapsed() < within
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        std::mem::take(&mut *self.record.lock().unwrap())
    }
}

async fn follow(
    endpoint: String,
    key: MetadataValue<Ascii>,
    record: Arc<Mutex<WatchRecord>>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut connection = 0;
    while !*stopped.borrow_and_update() {
        let mut client = EngagementServiceClient::new(channel(&endpoint));
        let after_cursor = record.lock().unwrap().last_cursor();
        let opened = tokio::select! {
            opened = client.watch_events(request(
                pb::WatchEventsRequest { after_cursor, types: Vec::new() },
                &key,
            )) => opened,
            _ = stopped.changed() => return,
        };
        let ended = match opened {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    let next = tokio::select! {
                        next = stream.message() => next,
                        _ = stopped.changed() => return,
                    };
                    match next {
                        Ok(Some(pb::WatchEventsResponse { event: Some(event) })) => {
                            record.lock().unwrap().received.push(Received {
                                purchase_id: purchase_id_of(&event.details_json),
                                cursor: event.cursor,
                                kind: event.r#type,
                                connection,
                            });
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break "STREAM_ENDED".to_string(),
                        Err(status) => break stream_failure(&record, &status),
                    }
                }
            }
            Err(status) => stream_failure(&record, &status),
        };
        {
            let mut record = record.lock().unwrap();
            *record.stream_errors.entry(ended).or_default() += 1;
            record.reconnects += 1;
        }
        connection += 1;
        tokio::select! {
            _ = tokio::time::sleep(BACKOFF) => {}
            _ = stopped.changed() => return,
        }
    }
}

/// The label of a failed stream; an answer a watcher must never get is booked as a refusal.
fn stream_failure(record: &Mutex<WatchRecord>, status: &tonic::Status) -> String {
    let (label, retryable) = classify(status);
    if !retryable {
        record.lock().unwrap().refusals.push(format!(
            "WatchEvents answered {:?}: {}",
            status.code(),
            status.message()
        ));
    }
    label
}

/// What a greeting worker did with one hand-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Sent,
    FailedPermanently,
    RetryLater,
    /// No ack: the lease ends and the greeting is offered again.
    WalkAway,
}

impl Decision {
    fn outcome(self) -> Option<pb::GreetingOutcome> {
        match self {
            Decision::Sent => Some(pb::GreetingOutcome::Sent),
            Decision::FailedPermanently => Some(pb::GreetingOutcome::FailedPermanently),
            Decision::RetryLater => Some(pb::GreetingOutcome::RetryLater),
            Decision::WalkAway => None,
        }
    }
}

/// One greeting handed to one worker under one lease, and what came of its ack.
#[derive(Debug, Clone)]
pub struct Handout {
    pub greeting_id: String,
    pub external_id: String,
    pub worker: usize,
    pub lease_token: String,
    /// The service's clock: the lease starts at `lease_expires_at - GREETING_LEASE`.
    pub lease_expires_at: SystemTime,
    pub decision: Decision,
    /// When the first copy of the ack was sent (an ack may take effect from then on).
    pub ack_sent_at: Option<SystemTime>,
    /// The ack's final answer: `Ok` or the code of a non-retryable refusal; `None` if no copy
    /// was ever answered (retries gave up).
    pub ack_answer: Option<Result<(), Code>>,
    /// A replayed copy of an answered ack got another answer than the first.
    pub replay_differs: Option<String>,
}

impl Handout {
    pub fn claimed_at(&self) -> SystemTime {
        self.lease_expires_at - GREETING_LEASE
    }
}

/// Everything the greeting workers were handed.
#[derive(Debug, Clone, Default)]
pub struct GreetingRecord {
    pub handouts: Vec<Handout>,
    pub claims: u64,
    /// Failed attempts of claims and acks, by label.
    pub failures: BTreeMap<String, u64>,
    /// Refusals no worker should get (INVALID_ARGUMENT, PERMISSION_DENIED, ...).
    pub refusals: Vec<String>,
}

/// Greeting workers running.
pub struct GreetingWorkers {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    pub record: Arc<Mutex<GreetingRecord>>,
}

impl GreetingWorkers {
    /// `workers` senders claiming up to 2 greetings at a time under a 2 s lease and taking
    /// 150–350 ms to "send" each (so the hand-outs last a few seconds and meet the scenario's
    /// fault): most are acknowledged SENT, some FAILED_PERMANENTLY or RETRY_LATER, some walked
    /// away from; now and then an ack is sent twice (the replay must answer the same).
    pub fn start(cluster: &Cluster, workers: usize, seed: u64) -> GreetingWorkers {
        let record = Arc::new(Mutex::new(GreetingRecord::default()));
        let (stop, stopped) = watch::channel(false);
        let tasks = (0..workers)
            .map(|worker| {
                let sender = Sender {
                    worker,
                    endpoint: cluster.endpoint(),
                    key: bearer(&cluster.scheduler_key),
                    record: record.clone(),
                    rng: StdRng::seed_from_u64(seed ^ (0x6772_6565 + worker as u64)),
                };
                tokio::spawn(sender.run(stopped.clone()))
            })
            .collect();
        GreetingWorkers {
            stop,
            tasks,
            record,
        }
    }

    /// Lets the workers go on until `settled` says nothing is left to hand out (or `within`
    /// passed), then stops them. Returns what they were handed.
    pub async fn stop_when<F, Fut>(self, within: Duration, mut settled: F) -> GreetingRecord
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let started = Instant::now();
        while started.elapsed() < within && !settled().await {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        std::mem::take(&mut *self.record.lock().unwrap())
    }
}

struct Sender {
    worker: usize,
    endpoint: String,
    key: MetadataValue<Ascii>,
    record: Arc<Mutex<GreetingRecord>>,
    rng: StdRng,
}

impl Sender {
    async fn run(mut self, stopped: watch::Receiver<bool>) {
        let mut client = EngagementServiceClient::new(channel(&self.endpoint));
        while !*stopped.borrow() {
            let mut claim = request(
                pb::ClaimGreetingsRequest {
                    limit: 2,
                    lease_seconds: GREETING_LEASE.as_secs() as u32,
                },
                &self.key,
            );
            claim.set_timeout(CALL_DEADLINE);
            let greetings = match client.claim_greetings(claim).await {
                Ok(answer) => answer.into_inner().greetings,
                Err(status) => {
                    // A claim is not keyed: one whose answer was lost leaves its greetings
                    // under a lease nobody knows; they come back when it ends.
                    self.failed(&status, "ClaimGreetings");
                    client = EngagementServiceClient::new(channel(&self.endpoint));
                    tokio::time::sleep(BACKOFF).await;
                    continue;
                }
            };
            self.record.lock().unwrap().claims += 1;
            if greetings.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            for greeting in greetings {
                let handout = self.handle(&mut client, greeting).await;
                self.record.lock().unwrap().handouts.push(handout);
            }
        }
    }

    fn failed(&self, status: &tonic::Status, call: &str) {
        let (label, retryable) = classify(status);
        let mut record = self.record.lock().unwrap();
        *record.failures.entry(label).or_default() += 1;
        if !retryable {
            record.refusals.push(format!(
                "{call} answered {:?}: {}",
                status.code(),
                status.message()
            ));
        }
    }

    async fn handle(
        &mut self,
        client: &mut EngagementServiceClient<Channel>,
        greeting: pb::Greeting,
    ) -> Handout {
        let roll = self.rng.random_range(0..100);
        let decision = match roll {
            0..80 => Decision::Sent,
            80..86 => Decision::FailedPermanently,
            86..90 => Decision::RetryLater,
            _ => Decision::WalkAway,
        };
        let lease_expires_at = greeting
            .lease_expires_at
            .as_ref()
            .and_then(|ts| {
                SystemTime::UNIX_EPOCH.checked_add(Duration::new(
                    u64::try_from(ts.seconds).ok()?,
                    u32::try_from(ts.nanos).ok()?,
                ))
            })
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut handout = Handout {
            greeting_id: greeting.greeting_id.clone(),
            external_id: greeting.external_id.clone(),
            worker: self.worker,
            lease_token: greeting.lease_token.clone(),
            lease_expires_at,
            decision,
            ack_sent_at: None,
            ack_answer: None,
            replay_differs: None,
        };
        let Some(outcome) = decision.outcome() else {
            return handout;
        };
        // Sending the greeting (an email, an SMS) takes a moment.
        tokio::time::sleep(Duration::from_millis(self.rng.random_range(150..350))).await;
        let ack = pb::AckGreetingRequest {
            greeting_id: greeting.greeting_id,
            outcome: outcome as i32,
            lease_token: greeting.lease_token,
        };
        handout.ack_sent_at = Some(SystemTime::now());
        handout.ack_answer = self.ack(client, &ack).await;
        // Now and then the same ack again: a replay answers the same.
        if handout.ack_answer.is_some() && self.rng.random_range(0..100) < 15 {
            let again = self.ack(client, &ack).await;
            if again.is_some() && again != handout.ack_answer {
                handout.replay_differs =
                    Some(format!("first {:?}, replay {again:?}", handout.ack_answer));
            }
        }
        handout
    }

    /// Sends the ack until it is answered (retrying the identical request after retryable
    /// failures, for up to 20 s); `None` if it never was.
    async fn ack(
        &self,
        client: &mut EngagementServiceClient<Channel>,
        ack: &pb::AckGreetingRequest,
    ) -> Option<Result<(), Code>> {
        let give_up = Instant::now() + Duration::from_secs(20);
        loop {
            let mut call = request(ack.clone(), &self.key);
            call.set_timeout(CALL_DEADLINE);
            match client.ack_greeting(call).await {
                Ok(_) => return Some(Ok(())),
                Err(status) => {
                    let (label, retryable) = classify(&status);
                    if !retryable {
                        // FAILED_PRECONDITION: the lease ended and the greeting was handed
                        // out again (an outage can outlast a 2 s lease): an outcome, not a
                        // fault.
                        if status.code() != Code::FailedPrecondition {
                            self.failed(&status, "AckGreeting");
                        }
                        return Some(Err(status.code()));
                    }
                    *self
                        .record
                        .lock()
                        .unwrap()
                        .failures
                        .entry(label)
                        .or_default() += 1;
                    if Instant::now() > give_up {
                        return None;
                    }
                    *client = EngagementServiceClient::new(channel(&self.endpoint));
                    tokio::time::sleep(BACKOFF).await;
                }
            }
        }
    }
}

/// Enrolls `consenting` customers whose birthday is today on their own local day (and who
/// allow marketing), and `without_consent` more with the same birthday who do not: the first
/// get exactly one birthday greeting each, the others none. Their time zone puts them near
/// local noon, so the test does not straddle their midnight. Returns the two lists of ids.
pub async fn enroll_birthdays(
    cluster: &Cluster,
    consenting: usize,
    without_consent: usize,
) -> (Vec<String>, Vec<String>) {
    use chrono::{Datelike, Timelike};
    let now = chrono::Utc::now();
    // Etc/GMT-N is UTC+N (POSIX signs).
    let offset = 12 - i64::from(now.hour());
    let zone = match offset {
        0 => "Etc/UTC".to_string(),
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    };
    let local = now + chrono::Duration::hours(offset);
    let mut members =
        pb::member_service_client::MemberServiceClient::new(channel(&cluster.endpoint()));
    let key = bearer(&cluster.pos_key);
    let mut lists = (Vec::new(), Vec::new());
    for (i, consent) in (0..consenting)
        .map(|i| (i, true))
        .chain((0..without_consent).map(|i| (i, false)))
    {
        let external_id = if consent {
            format!("bday-{i}")
        } else {
            format!("bday-nc-{i}")
        };
        let mut call = request(
            pb::EnrollCustomerRequest {
                external_id: external_id.clone(),
                display_name: format!("Birthday {i}"),
                birthday: Some(pb::Birthday {
                    month: local.month(),
                    day: local.day(),
                    year: Some(1990),
                }),
                time_zone: zone.clone(),
                email: format!("{external_id}@example.test"),
                marketing_consent: consent,
                ..Default::default()
            },
            &key,
        );
        call.set_timeout(Duration::from_secs(10));
        members
            .enroll_customer(call)
            .await
            .unwrap_or_else(|e| panic!("enrol {external_id}: {e:?}"));
        if consent {
            lists.0.push(external_id);
        } else {
            lists.1.push(external_id);
        }
    }
    lists
}
