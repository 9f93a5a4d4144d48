//! The audit of the scheduler-side callers: the event watcher against the outbox, the greeting
//! workers against the greetings table.
//!
//! Events: every stored purchase has exactly one purchase_recorded event; every event of the
//! merchant got its position; the watcher received every stored event exactly once (no event
//! lost, none duplicated) with the cursor of its position, in strictly increasing cursor order
//! across all its reconnects, and so every stored purchase's purchase_recorded event exactly
//! once. Greetings: no greeting handed to a second worker while an earlier lease on it was
//! live and unacknowledged; none acknowledged SENT under two leases, none handed out again
//! after a final ack; each final ack stored; one birthday greeting per consenting birthday
//! customer and none for the others; nothing left unsettled once the workers are done.
//!
//! The checks are pure functions of what the database holds and what the callers were handed
//! ([`check_events`], [`check_greetings`]), so the proof that each can fail needs no cluster.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use loyalty::MerchantId;
use loyalty::pb;
use sqlx::PgConnection;

use super::super::*;

/// An event as the outbox holds it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredEvent {
    pub position: Option<i64>,
    pub kind: String,
    pub purchase_id: Option<String>,
}

/// A greeting as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredGreeting {
    pub greeting_id: String,
    pub external_id: String,
    pub kind: String,
    pub status: String,
    pub acked_token: Option<String>,
    pub acked_outcome: Option<String>,
}

/// What the engagement audit found.
#[derive(Debug, Default)]
pub struct EngagementAudit {
    pub events_stored: usize,
    pub events_received: usize,
    pub purchase_events_received: usize,
    pub watcher_reconnects: u32,
    pub watcher_stream_errors: BTreeMap<String, u64>,
    pub greetings_stored: usize,
    pub greetings_by_status: BTreeMap<String, usize>,
    pub greeting_handouts: usize,
    pub greetings_handed_out_again: usize,
    pub greeting_claims: u64,
    pub greeting_failed_attempts: BTreeMap<String, u64>,
    pub violations: Vec<String>,
}

impl EngagementAudit {
    /// The figures a scenario adds to its report.
    pub fn figures(&self) -> serde_json::Value {
        serde_json::json!({
            "events_stored": self.events_stored,
            "events_received": self.events_received,
            "purchase_events_received": self.purchase_events_received,
            "watcher_reconnects": self.watcher_reconnects,
            "watcher_stream_errors": self.watcher_stream_errors,
            "greetings_stored": self.greetings_stored,
            "greetings_by_status": self.greetings_by_status,
            "greeting_handouts": self.greeting_handouts,
            "greetings_handed_out_again": self.greetings_handed_out_again,
            "greeting_claims": self.greeting_claims,
            "greeting_failed_attempts": self.greeting_failed_attempts,
            "engagement_violations": self.violations.len(),
        })
    }
}

/// The merchant's outbox, its purchases and its greetings, in one snapshot.
pub async fn read_engagement(
    cluster: &Cluster,
) -> (Vec<StoredEvent>, Vec<String>, Vec<StoredGreeting>) {
    let pool = cluster.pool().await;
    let mut tx = pool.begin().await.expect("audit: begin");
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await
        .expect("audit: snapshot");
    let stored = read_in(&mut tx, cluster.merchant).await;
    drop(tx);
    pool.close().await;
    stored
}

async fn read_in(
    conn: &mut PgConnection,
    merchant: MerchantId,
) -> (Vec<StoredEvent>, Vec<String>, Vec<StoredGreeting>) {
    let events = sqlx::query_as(
        "SELECT position, kind, details->>'purchase_id' AS purchase_id
           FROM events WHERE merchant_id = $1 ORDER BY position NULLS LAST, id",
    )
    .bind(merchant.0)
    .fetch_all(&mut *conn)
    .await
    .expect("audit: events");
    let purchases = sqlx::query_scalar("SELECT purchase_id FROM purchases WHERE merchant_id = $1")
        .bind(merchant.0)
        .fetch_all(&mut *conn)
        .await
        .expect("audit: purchases");
    let greetings = sqlx::query_as(
        "SELECT g.greeting_id, c.external_id, g.kind, g.status, g.acked_token, g.acked_outcome
           FROM greetings g
           JOIN customers c ON c.merchant_id = g.merchant_id AND c.id = g.customer_id
          WHERE g.merchant_id = $1",
    )
    .bind(merchant.0)
    .fetch_all(&mut *conn)
    .await
    .expect("audit: greetings");
    (events, purchases, greetings)
}

/// The stream's end as the database has it: the cursor of the merchant's last numbered event
/// (empty without any), once no committed event of the merchant waits for its position (at
/// most `within`). The service's cursor is the position in decimal.
pub async fn stream_end(cluster: &Cluster, within: Duration) -> String {
    let pool = cluster.pool().await;
    let started = Instant::now();
    let end = loop {
        let (waiting, last): (i64, Option<i64>) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE position IS NULL), max(position)
               FROM events WHERE merchant_id = $1",
        )
        .bind(cluster.merchant.0)
        .fetch_one(&pool)
        .await
        .expect("audit: stream end");
        if waiting == 0 || started.elapsed() > within {
            break last.map(|p| p.to_string()).unwrap_or_default();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    pool.close().await;
    end
}

/// Whether the merchant's greetings are settled: at least `made` exist (the job has made the
/// scenario's birthdays) and none is due or leased (each handed out and acknowledged,
/// walked-away ones again after their lease).
pub async fn greetings_settled(cluster: &Cluster, made: usize) -> bool {
    let pool = cluster.pool().await;
    let (all, open): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE status IN ('due', 'leased'))
           FROM greetings WHERE merchant_id = $1",
    )
    .bind(cluster.merchant.0)
    .fetch_one(&pool)
    .await
    .unwrap_or((0, 1));
    pool.close().await;
    all >= made as i64 && open == 0
}

/// The watcher against the outbox (see the module's doc).
pub fn check_events(
    stored: &[StoredEvent],
    purchases: &[String],
    watched: &WatchRecord,
    found: &mut EngagementAudit,
) {
    let v = &mut found.violations;
    found.events_stored = stored.len();
    found.events_received = watched.received.len();
    found.watcher_reconnects = watched.reconnects;
    found.watcher_stream_errors = watched.stream_errors.clone();
    v.extend(watched.refusals.iter().cloned());

    // The outbox: one purchase_recorded event per stored purchase, every event numbered.
    let mut events_of: HashMap<&str, usize> = HashMap::new();
    for event in stored.iter().filter(|e| e.kind == "purchase_recorded") {
        match &event.purchase_id {
            Some(id) => *events_of.entry(id).or_default() += 1,
            None => v.push(format!(
                "a purchase_recorded event without a purchase_id: {event:?}"
            )),
        }
    }
    let stored_purchases: HashSet<&str> = purchases.iter().map(String::as_str).collect();
    for id in &stored_purchases {
        match events_of.get(id).copied().unwrap_or(0) {
            1 => {}
            n => v.push(format!(
                "purchase {id}: {n} purchase_recorded events stored"
            )),
        }
    }
    for id in events_of
        .keys()
        .filter(|id| !stored_purchases.contains(*id))
    {
        v.push(format!(
            "purchase_recorded event of {id}, a purchase that is not stored"
        ));
    }
    let unnumbered = stored.iter().filter(|e| e.position.is_none()).count();
    if unnumbered > 0 {
        v.push(format!(
            "{unnumbered} committed events never got a position"
        ));
    }

    // The watcher: cursors strictly increasing over every reconnect.
    let mut previous: Option<(u64, u32)> = None;
    for event in &watched.received {
        match event.cursor.parse::<u64>() {
            Ok(cursor) => {
                if let Some((before, connection)) = previous
                    && cursor <= before
                {
                    v.push(format!(
                        "cursor {cursor} (connection {}) after cursor {before} (connection \
                         {connection}): not strictly increasing",
                        event.connection
                    ));
                }
                previous = Some((cursor, event.connection));
            }
            Err(_) => v.push(format!(
                "cursor {:?} is not a stream position",
                event.cursor
            )),
        }
    }

    // Every stored event received exactly once, as stored.
    let mut received: HashMap<&str, Vec<&Received>> = HashMap::new();
    for event in &watched.received {
        received
            .entry(event.cursor.as_str())
            .or_default()
            .push(event);
    }
    let mut lost = Vec::new();
    for event in stored {
        let Some(position) = event.position else {
            continue;
        };
        let cursor = position.to_string();
        match received.remove(cursor.as_str()) {
            None => lost.push(cursor),
            Some(copies) => {
                if copies.len() > 1 {
                    v.push(format!(
                        "event {cursor} ({}) received {} times",
                        event.kind,
                        copies.len()
                    ));
                }
                let first = copies[0];
                if kind_name(first.kind) != Some(event.kind.as_str())
                    || first.purchase_id != event.purchase_id
                {
                    v.push(format!(
                        "event {cursor} received as {:?} {:?}, stored as {} {:?}",
                        kind_name(first.kind),
                        first.purchase_id,
                        event.kind,
                        event.purchase_id
                    ));
                }
            }
        }
    }
    if !lost.is_empty() {
        v.push(format!(
            "{} stored events never reached the watcher (lost), e.g. cursors {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        ));
    }
    for cursor in received.keys() {
        v.push(format!(
            "the watcher received event {cursor}, which is not stored"
        ));
    }

    // And so: every stored purchase's purchase_recorded event received exactly once.
    let mut purchase_events: HashMap<&str, usize> = HashMap::new();
    for event in &watched.received {
        if kind_name(event.kind) == Some("purchase_recorded")
            && let Some(id) = &event.purchase_id
        {
            *purchase_events.entry(id).or_default() += 1;
        }
    }
    found.purchase_events_received = purchase_events.values().sum();
    let wrong: Vec<String> = stored_purchases
        .iter()
        .filter_map(|id| match purchase_events.get(id).copied().unwrap_or(0) {
            1 => None,
            n => Some(format!("{id} ×{n}")),
        })
        .collect();
    if !wrong.is_empty() {
        v.push(format!(
            "{} stored purchases whose purchase_recorded event the watcher did not receive \
             exactly once: {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(10)]
        ));
    }
}

fn kind_name(kind: i32) -> Option<&'static str> {
    use pb::EventType as T;
    Some(match T::try_from(kind).ok()? {
        T::Unspecified => return None,
        T::PurchaseRecorded => "purchase_recorded",
        T::PointsRedeemed => "points_redeemed",
        T::PointsReturned => "points_returned",
        T::PointsExpiring => "points_expiring",
        T::StatusChanged => "status_changed",
        T::TierChanged => "tier_changed",
        T::GiftIssued => "gift_issued",
        T::GiftRedeemed => "gift_redeemed",
        T::GreetingDue => "greeting_due",
    })
}

fn stored_outcome(decision: Decision) -> Option<&'static str> {
    match decision {
        Decision::Sent => Some("sent"),
        Decision::FailedPermanently => Some("failed_permanently"),
        Decision::RetryLater => Some("retry_later"),
        Decision::WalkAway => None,
    }
}

/// The greeting workers against the greetings table (see the module's doc). `consenting` and
/// `without_consent` are the birthday customers enrolled for the scenario.
pub fn check_greetings(
    stored: &[StoredGreeting],
    workers: &GreetingRecord,
    consenting: &[String],
    without_consent: &[String],
    found: &mut EngagementAudit,
) {
    let v = &mut found.violations;
    found.greetings_stored = stored.len();
    found.greeting_handouts = workers.handouts.len();
    found.greeting_claims = workers.claims;
    found.greeting_failed_attempts = workers.failures.clone();
    v.extend(workers.refusals.iter().cloned());
    for greeting in stored {
        *found
            .greetings_by_status
            .entry(greeting.status.clone())
            .or_default() += 1;
    }

    // One birthday greeting per consenting birthday customer, none without consent.
    let mut birthdays: HashMap<&str, usize> = HashMap::new();
    for greeting in stored.iter().filter(|g| g.kind == "birthday") {
        *birthdays.entry(greeting.external_id.as_str()).or_default() += 1;
    }
    for id in consenting {
        if birthdays.get(id.as_str()).copied().unwrap_or(0) != 1 {
            v.push(format!(
                "{id} (birthday today, consent): {} birthday greetings",
                birthdays.get(id.as_str()).copied().unwrap_or(0)
            ));
        }
    }
    for id in without_consent {
        if let Some(n) = birthdays.get(id.as_str()) {
            v.push(format!("{id} (no consent): {n} birthday greetings"));
        }
    }
    let open = stored
        .iter()
        .filter(|g| g.status == "due" || g.status == "leased")
        .count();
    if open > 0 {
        v.push(format!(
            "{open} greetings still due or leased after the workers were done"
        ));
    }

    // Per greeting, its hand-outs in the service's claim order.
    let mut handouts: HashMap<&str, Vec<&Handout>> = HashMap::new();
    for handout in &workers.handouts {
        handouts
            .entry(&handout.greeting_id)
            .or_default()
            .push(handout);
    }
    let stored_by_id: HashMap<&str, &StoredGreeting> =
        stored.iter().map(|g| (g.greeting_id.as_str(), g)).collect();
    for (id, list) in &mut handouts {
        list.sort_by_key(|h| h.claimed_at());
        if list.len() > 1 {
            found.greetings_handed_out_again += 1;
        }
        let Some(greeting) = stored_by_id.get(id) else {
            v.push(format!("greeting {id} was handed out but is not stored"));
            continue;
        };
        let mut tokens = HashSet::new();
        for pair in list.windows(2) {
            let (earlier, later) = (pair[0], pair[1]);
            // The earlier lease ended at its expiry, or when its ack was sent (at the soonest).
            let ended = match earlier.ack_sent_at {
                Some(sent) => sent.min(earlier.lease_expires_at),
                None => earlier.lease_expires_at,
            };
            if later.claimed_at() < ended {
                v.push(format!(
                    "greeting {id}: handed to worker {} at {:?} while worker {}'s lease ran \
                     until {:?} unacknowledged",
                    later.worker,
                    later.claimed_at(),
                    earlier.worker,
                    ended
                ));
            }
            let final_ack = earlier.ack_answer == Some(Ok(()))
                && matches!(
                    earlier.decision,
                    Decision::Sent | Decision::FailedPermanently
                );
            if final_ack {
                v.push(format!(
                    "greeting {id}: handed out again after its {:?} was acknowledged",
                    earlier.decision
                ));
            }
        }
        for handout in list.iter() {
            if !tokens.insert(handout.lease_token.as_str()) {
                v.push(format!("greeting {id}: lease token handed out twice"));
            }
            if let Some(differs) = &handout.replay_differs {
                v.push(format!(
                    "greeting {id}: a replayed ack answered otherwise: {differs}"
                ));
            }
        }
        let sent: Vec<&&Handout> = list
            .iter()
            .filter(|h| h.decision == Decision::Sent && h.ack_answer == Some(Ok(())))
            .collect();
        if sent.len() > 1 {
            v.push(format!(
                "greeting {id}: acknowledged SENT under {} leases",
                sent.len()
            ));
        }
        // The last answered ack is what the greeting holds.
        if let Some(last) = list.iter().rev().find(|h| h.ack_answer == Some(Ok(()))) {
            let outcome = stored_outcome(last.decision);
            let newer_lease = list.iter().any(|h| h.claimed_at() > last.claimed_at());
            if !newer_lease
                && (greeting.acked_token.as_deref() != Some(last.lease_token.as_str())
                    || greeting.acked_outcome.as_deref() != outcome)
            {
                v.push(format!(
                    "greeting {id}: acknowledged {:?} with its lease, stored {} {:?}",
                    last.decision, greeting.status, greeting.acked_outcome
                ));
            }
        }
    }
    // A greeting stored as sent was acknowledged SENT by some worker (answered or not).
    for greeting in stored.iter().filter(|g| g.status == "sent") {
        let acked = handouts
            .get(greeting.greeting_id.as_str())
            .is_some_and(|list| {
                list.iter().any(|h| {
                    h.decision == Decision::Sent
                        && h.ack_sent_at.is_some()
                        && greeting.acked_token.as_deref() == Some(h.lease_token.as_str())
                })
            });
        if !acked {
            v.push(format!(
                "greeting {} is stored sent, but no worker acknowledged it SENT with that lease",
                greeting.greeting_id
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn event(position: i64, kind: &str, purchase: Option<&str>) -> StoredEvent {
        StoredEvent {
            position: Some(position),
            kind: kind.into(),
            purchase_id: purchase.map(String::from),
        }
    }

    fn received(cursor: &str, kind: pb::EventType, purchase: Option<&str>, c: u32) -> Received {
        Received {
            cursor: cursor.into(),
            kind: kind as i32,
            purchase_id: purchase.map(String::from),
            connection: c,
        }
    }

    fn outbox() -> (Vec<StoredEvent>, Vec<String>, WatchRecord) {
        use pb::EventType as T;
        let stored = vec![
            event(3, "purchase_recorded", Some("r-1")),
            event(5, "points_redeemed", None),
            event(9, "purchase_recorded", Some("r-2")),
            event(10, "greeting_due", None),
        ];
        let watched = WatchRecord {
            received: vec![
                received("3", T::PurchaseRecorded, Some("r-1"), 0),
                received("5", T::PointsRedeemed, None, 0),
                // A reconnect with cursor 5 in between.
                received("9", T::PurchaseRecorded, Some("r-2"), 1),
                received("10", T::GreetingDue, None, 1),
            ],
            reconnects: 1,
            ..WatchRecord::default()
        };
        (stored, vec!["r-1".into(), "r-2".into()], watched)
    }

    fn events_violations(
        stored: &[StoredEvent],
        purchases: &[String],
        w: &WatchRecord,
    ) -> Vec<String> {
        let mut found = EngagementAudit::default();
        check_events(stored, purchases, w, &mut found);
        found.violations
    }

    #[test]
    fn the_event_checks_pass_an_exact_stream_and_fail_every_break() {
        let (stored, purchases, watched) = outbox();
        assert_eq!(
            events_violations(&stored, &purchases, &watched),
            Vec::<String>::new()
        );

        type Break = Box<dyn Fn(&mut Vec<StoredEvent>, &mut Vec<String>, &mut WatchRecord)>;
        let breaks: Vec<(&str, Break)> = vec![
            (
                "lost",
                Box::new(|_, _, w| {
                    w.received.remove(2);
                }),
            ),
            (
                "received 2 times",
                Box::new(|_, _, w| {
                    let again = w.received[2].clone();
                    w.received.insert(
                        3,
                        received(
                            "9",
                            pb::EventType::PurchaseRecorded,
                            Some("r-2"),
                            again.connection + 1,
                        ),
                    );
                }),
            ),
            (
                "not strictly increasing",
                Box::new(|_, _, w| w.received.swap(0, 1)),
            ),
            (
                "not stored",
                Box::new(|_, _, w| {
                    w.received.push(received(
                        "11",
                        pb::EventType::PurchaseRecorded,
                        Some("r-9"),
                        1,
                    ))
                }),
            ),
            (
                "purchase_recorded events stored",
                Box::new(|_, p, _| p.push("r-3".into())),
            ),
            (
                "never got a position",
                Box::new(|s, _, _| {
                    s.push(StoredEvent {
                        position: None,
                        kind: "points_redeemed".into(),
                        purchase_id: None,
                    })
                }),
            ),
            (
                "received as",
                Box::new(|_, _, w| w.received[0].purchase_id = Some("r-2".into())),
            ),
            (
                "not a stream position",
                Box::new(|_, _, w| w.received[3].cursor = "ten".into()),
            ),
            (
                "OUT_OF_RANGE",
                Box::new(|_, _, w| {
                    w.refusals
                        .push("WatchEvents answered OutOfRange: OUT_OF_RANGE pruned".into())
                }),
            ),
        ];
        for (expected, break_it) in breaks {
            let (mut stored, mut purchases, mut watched) = outbox();
            break_it(&mut stored, &mut purchases, &mut watched);
            let violations = events_violations(&stored, &purchases, &watched);
            assert!(
                violations.iter().any(|v| v.contains(expected)),
                "{expected}: {violations:?}"
            );
        }
    }

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000) + Duration::from_millis(ms)
    }

    fn handout(
        worker: usize,
        token: &str,
        claimed: u64,
        decision: Decision,
        ack: Option<u64>,
    ) -> Handout {
        Handout {
            greeting_id: "g1".into(),
            external_id: "bday-0".into(),
            worker,
            lease_token: token.into(),
            lease_expires_at: at(claimed) + GREETING_LEASE,
            decision,
            ack_sent_at: ack.map(at),
            ack_answer: ack.map(|_| Ok(())),
            replay_differs: None,
        }
    }

    fn greetings() -> (Vec<StoredGreeting>, GreetingRecord) {
        let stored = vec![StoredGreeting {
            greeting_id: "g1".into(),
            external_id: "bday-0".into(),
            kind: "birthday".into(),
            status: "sent".into(),
            acked_token: Some("t2".into()),
            acked_outcome: Some("sent".into()),
        }];
        // Walked away from by worker 0; offered again when its lease ended, then sent.
        let record = GreetingRecord {
            handouts: vec![
                handout(0, "t1", 0, Decision::WalkAway, None),
                handout(1, "t2", 2_100, Decision::Sent, Some(2_150)),
            ],
            claims: 2,
            ..GreetingRecord::default()
        };
        (stored, record)
    }

    fn greeting_violations(stored: &[StoredGreeting], record: &GreetingRecord) -> Vec<String> {
        let mut found = EngagementAudit::default();
        check_greetings(
            stored,
            record,
            &["bday-0".into()],
            &["bday-nc-0".into()],
            &mut found,
        );
        found.violations
    }

    #[test]
    fn the_greeting_checks_pass_a_clean_run_and_fail_every_break() {
        let (stored, record) = greetings();
        assert_eq!(greeting_violations(&stored, &record), Vec::<String>::new());

        type Break = Box<dyn Fn(&mut Vec<StoredGreeting>, &mut GreetingRecord)>;
        let breaks: Vec<(&str, Break)> = vec![
            (
                "lease ran",
                Box::new(|_, r| {
                    r.handouts[1] = handout(1, "t2", 1_500, Decision::Sent, Some(1_600))
                }),
            ),
            (
                "SENT under 2 leases",
                Box::new(|_, r| {
                    r.handouts[0] = handout(0, "t1", 0, Decision::Sent, Some(100));
                }),
            ),
            (
                "handed out again after",
                Box::new(|_, r| {
                    r.handouts[0] = handout(0, "t1", 0, Decision::FailedPermanently, Some(100));
                }),
            ),
            (
                "lease token handed out twice",
                Box::new(|_, r| r.handouts[1].lease_token = "t1".into()),
            ),
            (
                "stored sent",
                Box::new(|s, _| s[0].acked_outcome = Some("failed_permanently".into())),
            ),
            (
                "no worker acknowledged it SENT",
                Box::new(|s, r| {
                    r.handouts.truncate(1);
                    s[0].acked_token = Some("t9".into());
                }),
            ),
            (
                "birthday greetings",
                Box::new(|s, _| {
                    let mut other = s[0].clone();
                    other.greeting_id = "g2".into();
                    other.external_id = "bday-nc-0".into();
                    s.push(other);
                }),
            ),
            (
                "(birthday today, consent): 0",
                Box::new(|s, r| {
                    s.clear();
                    r.handouts.clear();
                }),
            ),
            (
                "still due or leased",
                Box::new(|s, _| s[0].status = "leased".into()),
            ),
            (
                "replayed ack",
                Box::new(|_, r| r.handouts[1].replay_differs = Some("first Ok, replay Err".into())),
            ),
            (
                "answered PermissionDenied",
                Box::new(|_, r| {
                    r.refusals
                        .push("AckGreeting answered PermissionDenied: no".into())
                }),
            ),
        ];
        for (expected, break_it) in breaks {
            let (mut stored, mut record) = greetings();
            break_it(&mut stored, &mut record);
            let violations = greeting_violations(&stored, &record);
            assert!(
                violations.iter().any(|v| v.contains(expected)),
                "{expected}: {violations:?}"
            );
        }
    }
}
