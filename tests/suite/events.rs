//! The event stream through the real gRPC client: `EngagementService.WatchEvents` replays,
//! then follows live, in commit order, exactly once across disconnects, replicas and
//! transactions that commit out of order; the outbox rows written by purchases, redemptions,
//! holds, returns and gifts; the retention's OUT_OF_RANGE; the expiry warnings.

use loyalty_testkit as common;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use common::{CheckoutClient, Merchant, Options, ShiftedClock, TestApp, purchase};
use loyalty::pb;
use loyalty::{Scope, Store};
use serde_json::Value;
use tonic::Code;
use tonic::codec::Streaming;

const DAY: Duration = Duration::from_secs(86_400);

type Events = Streaming<pb::WatchEventsResponse>;

async fn watch(app: &TestApp, key: &str, after_cursor: &str, types: &[pb::EventType]) -> Events {
    try_watch(app, key, after_cursor, types)
        .await
        .expect("watch opens")
}

async fn try_watch(
    app: &TestApp,
    key: &str,
    after_cursor: &str,
    types: &[pb::EventType],
) -> Result<Events, tonic::Status> {
    app.engagement(key)
        .await
        .watch_events(pb::WatchEventsRequest {
            after_cursor: after_cursor.into(),
            types: types.iter().map(|t| *t as i32).collect(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Purchases only: a customer's second purchase also writes status_changed (NEW to
/// RETURNING), which the tests of the stream's delivery leave aside.
const PURCHASES: &[pb::EventType] = &[pb::EventType::PurchaseRecorded];

/// The next event, within 10 seconds.
async fn next(stream: &mut Events) -> pb::Event {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event within 10 s")
        .expect("the stream is healthy")
        .expect("the stream goes on")
        .event
        .expect("an event")
}

/// Nothing more arrives within `wait`.
async fn quiet(stream: &mut Events, wait: Duration) {
    if let Ok(item) = tokio::time::timeout(wait, stream.message()).await {
        panic!("expected no event, got {item:?}");
    }
}

fn details(event: &pb::Event) -> Value {
    serde_json::from_str(&event.details_json).expect("details are JSON")
}

fn kind(event: &pb::Event) -> pb::EventType {
    pb::EventType::try_from(event.r#type).unwrap()
}

fn position(event: &pb::Event) -> i64 {
    event.cursor.parse().expect("our cursors are positions")
}

async fn set_program(app: &TestApp, admin: &str, program: pb::Program) {
    app.program(admin)
        .await
        .update_program(pb::UpdateProgramRequest {
            program: Some(program),
            expected_version: 0,
        })
        .await
        .unwrap();
}

fn program(expiry: Option<pb::ExpiryPolicy>, expiry_warning_days: u32) -> pb::Program {
    pb::Program {
        currency: "EUR".into(),
        earn_rate: Some(pb::EarnRate {
            points: 1,
            currency_units: 1,
        }),
        expiry,
        expiry_warning_days,
        ..Default::default()
    }
}

/// `RedeemPoints` of `points`, naming no purchase.
async fn redeem(
    checkout: &mut CheckoutClient,
    external_id: &str,
    redemption_id: &str,
    points: i64,
) {
    checkout
        .redeem_points(pb::RedeemPointsRequest {
            external_id: external_id.into(),
            redemption_id: redemption_id.into(),
            points,
            purchase_id: String::new(),
        })
        .await
        .unwrap();
}

/// A hold of `points` (default ttl) and its commit.
async fn hold_and_commit(
    checkout: &mut CheckoutClient,
    external_id: &str,
    reservation_id: &str,
    points: i64,
) {
    checkout
        .reserve_points(pb::ReservePointsRequest {
            external_id: external_id.into(),
            reservation_id: reservation_id.into(),
            points,
            ttl_seconds: 0,
            purchase_id: String::new(),
        })
        .await
        .unwrap();
    checkout
        .commit_reservation(pb::CommitReservationRequest {
            reservation_id: reservation_id.into(),
        })
        .await
        .unwrap();
}

/// An active item gift of the catalog, valid 30 days, without a points price.
async fn create_item_gift(app: &TestApp, admin: &str, gift_id: &str, name: &str) {
    app.program(admin)
        .await
        .create_gift(pb::CreateGiftRequest {
            gift: Some(pb::Gift {
                gift_id: gift_id.into(),
                name: name.into(),
                kind: pb::GiftKind::Item as i32,
                validity_days: 30,
                active: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

/// `IssueGift` by hand (admin): the grant made.
async fn issue_gift(
    app: &TestApp,
    admin: &str,
    external_id: &str,
    gift_id: &str,
    issue_key: &str,
) -> pb::GiftGrant {
    app.program(admin)
        .await
        .issue_gift(pb::IssueGiftRequest {
            external_id: external_id.into(),
            gift_id: gift_id.into(),
            issue_key: issue_key.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap()
}

/// A merchant with its pos and scheduler keys and a program of 1 point per EUR.
async fn shop(app: &TestApp) -> (Merchant, String, String) {
    let merchant = app.merchant().await;
    set_program(app, &merchant.admin_key, program(None, 0)).await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let scheduler = app.key(&merchant, Scope::Scheduler).await;
    (merchant, pos, scheduler)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_replays_then_follows_every_kind_of_change_with_its_balance() {
    let app = TestApp::spawn().await;
    let (merchant, pos, scheduler) = shop(&app).await;
    let mut checkout = app.checkout(&pos).await;
    let receipt = purchase("card-1", "r-1", 10_000);
    let bought = checkout
        .record_purchase(receipt.clone())
        .await
        .unwrap()
        .into_inner();
    redeem(&mut checkout, "card-1", "red-1", 30).await;

    // Replay: what was written before the watch.
    let mut stream = watch(&app, &scheduler, "", &[]).await;
    let first = next(&mut stream).await;
    assert_eq!(kind(&first), pb::EventType::PurchaseRecorded);
    assert_eq!(first.external_id, "card-1");
    assert_eq!(
        details(&first),
        serde_json::json!({
            "purchase_id": "r-1",
            "points": bought.points_earned,
            "total_minor": 10_000,
            "currency": "EUR",
            "store_id": "store-1",
        })
    );
    assert_eq!(first.balance, bought.balance);
    let redeemed = next(&mut stream).await;
    assert_eq!(kind(&redeemed), pb::EventType::PointsRedeemed);
    assert_eq!(
        details(&redeemed),
        serde_json::json!({"redemption_id": "red-1", "points": 30, "discount_minor": 30})
    );
    let balance = redeemed.balance.unwrap();
    assert_eq!(balance.available, bought.points_earned - 30);
    assert_eq!(balance.lifetime_redeemed, 30);
    assert!(balance.version > first.balance.unwrap().version);
    assert!(position(&redeemed) > position(&first));

    // Live: a hold (no event), its commit, a return, a gift issued and redeemed.
    hold_and_commit(&mut checkout, "card-1", "hold-1", 20).await;
    let committed = next(&mut stream).await;
    assert_eq!(kind(&committed), pb::EventType::PointsRedeemed);
    assert_eq!(
        details(&committed),
        serde_json::json!({"reservation_id": "hold-1", "points": 20, "discount_minor": 20})
    );
    assert_eq!(committed.balance.unwrap().lifetime_redeemed, 50);

    let returned = checkout
        .return_purchase(pb::ReturnPurchaseRequest {
            purchase_id: "r-1".into(),
            return_id: "ret-1".into(),
            lines: vec![],
            amount_minor: 5_000,
        })
        .await
        .unwrap()
        .into_inner();
    let event = next(&mut stream).await;
    assert_eq!(kind(&event), pb::EventType::PointsReturned);
    let d = details(&event);
    assert_eq!(d["purchase_id"], "r-1");
    assert_eq!(d["return_id"], "ret-1");
    assert_eq!(d["points"], returned.points_clawed_back);
    assert_eq!(d["returned_minor"], 5_000);
    assert_eq!(event.balance, returned.balance);

    let admin = &merchant.admin_key;
    create_item_gift(&app, admin, "free-coffee", "Free coffee").await;
    let grant = issue_gift(&app, admin, "card-1", "free-coffee", "welcome-1").await;
    let issued = next(&mut stream).await;
    assert_eq!(kind(&issued), pb::EventType::GiftIssued);
    let d = details(&issued);
    assert_eq!(d["gift_id"], "free-coffee");
    assert_eq!(d["source"], "manual");
    assert!(d["grant_id"].is_string());
    assert_eq!(issued.balance, returned.balance, "a gift moves no points");
    checkout
        .redeem_gift(pb::RedeemGiftRequest {
            code: grant.code.clone(),
            redemption_key: "gift-red-1".into(),
            store_id: "store-2".into(),
        })
        .await
        .unwrap();
    let used = next(&mut stream).await;
    assert_eq!(kind(&used), pb::EventType::GiftRedeemed);
    let d = details(&used);
    assert_eq!(d["grant_id"], details(&issued)["grant_id"]);
    assert_eq!(d["store_id"], "store-2");
    assert_eq!(d["redemption_key"], "gift-red-1");
    // The code is a bearer secret: in no event.
    let normalized: String = grant.code.chars().filter(|c| *c != '-').collect();
    for event in [&issued, &used] {
        assert!(
            !event.details_json.contains(&grant.code) && !event.details_json.contains(&normalized),
            "{}",
            event.details_json
        );
    }

    // A replay of the same request writes nothing new.
    checkout.record_purchase(receipt).await.unwrap();
    quiet(&mut stream, Duration::from_millis(400)).await;

    // Resuming from a cursor gives exactly what followed it.
    let mut resumed = watch(&app, &scheduler, &redeemed.cursor, &[]).await;
    for expected in [&committed, &event, &issued, &used] {
        assert_eq!(&next(&mut resumed).await, expected);
    }
    quiet(&mut resumed, Duration::from_millis(300)).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_only_its_merchants_events_of_the_types_it_asked_for() {
    let app = TestApp::spawn().await;
    let (merchant, pos, scheduler) = shop(&app).await;
    let (_other, other_pos, other_scheduler) = shop(&app).await;
    let mut gifts_only = watch(&app, &scheduler, "", &[pb::EventType::GiftIssued]).await;
    let mut all = watch(&app, &scheduler, "", &[]).await;
    let mut theirs = watch(&app, &other_scheduler, "", &[]).await;

    let mut ours = app.checkout(&pos).await;
    let mut other = app.checkout(&other_pos).await;
    other
        .record_purchase(purchase("card-1", "their-1", 1_000))
        .await
        .unwrap();
    ours.record_purchase(purchase("card-1", "our-1", 1_000))
        .await
        .unwrap();
    create_item_gift(&app, &merchant.admin_key, "mug", "Mug").await;
    issue_gift(&app, &merchant.admin_key, "card-1", "mug", "k-1").await;
    // Another customer: card-1's second purchase would also make it RETURNING (status_changed).
    ours.record_purchase(purchase("card-2", "our-2", 1_000))
        .await
        .unwrap();

    let e = next(&mut gifts_only).await;
    assert_eq!(kind(&e), pb::EventType::GiftIssued);
    quiet(&mut gifts_only, Duration::from_millis(400)).await;

    let seen: Vec<(pb::EventType, String)> = {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let e = next(&mut all).await;
            seen.push((kind(&e), e.details_json));
        }
        seen
    };
    assert_eq!(seen[0].0, pb::EventType::PurchaseRecorded);
    assert!(seen[0].1.contains("our-1"));
    assert_eq!(seen[1].0, pb::EventType::GiftIssued);
    assert!(seen[2].1.contains("our-2"));
    quiet(&mut all, Duration::from_millis(300)).await;

    let e = next(&mut theirs).await;
    assert!(e.details_json.contains("their-1"));
    quiet(&mut theirs, Duration::from_millis(300)).await;
    // A cursor of the other merchant's stream shows nothing of theirs either.
    let mut from_their_cursor = watch(&app, &scheduler, &e.cursor, &[]).await;
    let mine = next(&mut from_their_cursor).await;
    assert!(mine.details_json.contains("our-"), "{}", mine.details_json);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_checks_its_arguments_and_its_scope() {
    let app = TestApp::spawn().await;
    let (merchant, pos, scheduler) = shop(&app).await;
    for (cursor, types, field) in [
        ("abc", vec![], "after_cursor"),
        ("-3", vec![], "after_cursor"),
        ("0", vec![], "after_cursor"),
        ("", vec![0], "types[0]"),
        ("", vec![pb::EventType::GiftIssued as i32, 77], "types[1]"),
    ] {
        let status = app
            .engagement(&scheduler)
            .await
            .watch_events(pb::WatchEventsRequest {
                after_cursor: cursor.into(),
                types,
            })
            .await
            .unwrap_err();
        assert_eq!(common::violated_fields(&status), [field], "{cursor:?}");
    }
    for scope in [Scope::Pos, Scope::App] {
        let key = if scope == Scope::Pos {
            pos.clone()
        } else {
            app.key(&merchant, scope).await
        };
        let status = try_watch(&app, &key, "", &[]).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{scope:?}");
    }
    // Admins may watch too.
    let mut admin = watch(&app, &merchant.admin_key, "", &[]).await;
    quiet(&mut admin, Duration::from_millis(200)).await;
    // The greeting RPCs of the same service answer the same key (nothing is due here).
    let claimed = app
        .engagement(&scheduler)
        .await
        .claim_greetings(pb::ClaimGreetingsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(claimed.greetings.is_empty());
    app.stop().await;
}

/// Eight writers commit purchases concurrently while a watcher reads a few events at a time,
/// hangs up and reconnects with its last cursor: in the end it has seen every purchase
/// exactly once, in strictly increasing cursor order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_reconnects_misses_nothing_and_sees_nothing_twice_while_writers_commit() {
    // A sequencer numbering every 2 ms: batches land inside the seam between a watcher's
    // subscription and its replay, where a repeat or a gap would show.
    let app = TestApp::spawn_with(Options {
        events: loyalty::events::EventsConfig {
            poll_interval: Duration::from_millis(2),
            prune_interval: None,
            warning_interval: None,
            ..loyalty::events::EventsConfig::default()
        },
        ..Options::default()
    })
    .await;
    let (_merchant, pos, scheduler) = shop(&app).await;
    const WRITERS: usize = 8;
    const EACH: usize = 25;
    // Watchers that join one after another while the writers commit, and stay to the end.
    let mut stayers = Vec::new();
    for s in 0..8u64 {
        let mut client = app.engagement(&scheduler).await;
        stayers.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(15 * s)).await;
            let mut stream = client
                .watch_events(pb::WatchEventsRequest {
                    after_cursor: String::new(),
                    types: PURCHASES.iter().map(|t| *t as i32).collect(),
                })
                .await
                .unwrap()
                .into_inner();
            let mut seen = Vec::new();
            let mut last = 0;
            while seen.len() < WRITERS * EACH {
                let event = next(&mut stream).await;
                assert!(position(&event) > last, "out of order or repeated");
                last = position(&event);
                seen.push(details(&event)["purchase_id"].as_str().unwrap().to_string());
            }
            quiet(&mut stream, Duration::from_millis(300)).await;
            seen
        }));
    }
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut checkout = app.checkout(&pos).await;
        writers.push(tokio::spawn(async move {
            for i in 0..EACH {
                checkout
                    .record_purchase(purchase(
                        &format!("card-{w}"),
                        &format!("w{w}-{i}"),
                        1_000 + i as i64,
                    ))
                    .await
                    .unwrap();
            }
        }));
    }
    let mut seen: Vec<String> = Vec::new();
    let mut cursor = String::new();
    let mut last_position = 0;
    let mut reconnects = 0;
    while seen.len() < WRITERS * EACH {
        let mut stream = watch(&app, &scheduler, &cursor, PURCHASES).await;
        // A few events, then hang up (sometimes mid-replay, sometimes live).
        for _ in 0..(7 + reconnects % 5) {
            if seen.len() == WRITERS * EACH {
                break;
            }
            let event = next(&mut stream).await;
            assert!(position(&event) > last_position, "out of order or repeated");
            last_position = position(&event);
            cursor = event.cursor.clone();
            seen.push(details(&event)["purchase_id"].as_str().unwrap().to_string());
        }
        drop(stream);
        reconnects += 1;
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "an event was delivered twice");
    let expected: BTreeSet<String> = (0..WRITERS)
        .flat_map(|w| (0..EACH).map(move |i| format!("w{w}-{i}")))
        .collect();
    assert_eq!(
        unique.into_iter().cloned().collect::<BTreeSet<_>>(),
        expected
    );
    assert!(reconnects > 10);
    for stayer in stayers {
        let seen = stayer.await.unwrap();
        let unique: BTreeSet<String> = seen.iter().cloned().collect();
        assert_eq!(
            unique, expected,
            "a watcher that stayed saw each purchase once"
        );
    }
    // And nothing after the last one.
    let mut stream = watch(&app, &scheduler, &cursor, PURCHASES).await;
    quiet(&mut stream, Duration::from_millis(300)).await;
    app.stop().await;
}

/// A transaction inserts an event, then a later purchase commits, is numbered and streamed;
/// only then does the first transaction commit. Its event (the lower id) comes after, once,
/// to the live watcher and to one resuming from a cursor between the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_late_is_streamed_after_what_was_streamed_never_skipped() {
    let app = TestApp::spawn().await;
    let (merchant, pos, scheduler) = shop(&app).await;
    let mut checkout = app.checkout(&pos).await;
    checkout
        .record_purchase(purchase("card-1", "r-0", 1_000))
        .await
        .unwrap();
    let mut live = watch(&app, &scheduler, "", &[]).await;
    let before = next(&mut live).await;

    // A writer's transaction, open: its event row has an id but is invisible.
    let mut slow = app.pool.begin().await.unwrap();
    let slow_id: i64 = sqlx::query_scalar(
        "INSERT INTO events (merchant_id, kind, details)
         VALUES ($1, 'greeting_due', '{\"slow\": true}') RETURNING id",
    )
    .bind(merchant.id.0)
    .fetch_one(&mut *slow)
    .await
    .unwrap();

    checkout
        .record_purchase(purchase("card-2", "r-1", 1_000))
        .await
        .unwrap();
    let fast = next(&mut live).await;
    assert!(fast.details_json.contains("r-1"));
    let fast_id: i64 = sqlx::query_scalar("SELECT id FROM events WHERE position = $1")
        .bind(position(&fast))
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(slow_id < fast_id, "the slow event was inserted first");
    // A watcher resuming after the fast one, before the slow commit.
    let mut resumed = watch(&app, &scheduler, &fast.cursor, &[]).await;
    quiet(&mut live, Duration::from_millis(200)).await;

    slow.commit().await.unwrap();
    let late = next(&mut live).await;
    assert_eq!(kind(&late), pb::EventType::GreetingDue);
    assert!(position(&late) > position(&fast));
    assert_eq!(
        late.balance, None,
        "an event about no customer has no balance"
    );
    assert_eq!(late.external_id, "");
    assert_eq!(next(&mut resumed).await, late);
    quiet(&mut live, Duration::from_millis(300)).await;
    quiet(&mut resumed, Duration::from_millis(100)).await;
    // From the very start: all three, the late one last.
    let mut replay = watch(&app, &scheduler, "", &[]).await;
    assert_eq!(next(&mut replay).await, before);
    assert_eq!(next(&mut replay).await, fast);
    assert_eq!(next(&mut replay).await, late);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_older_than_the_retention_is_out_of_range_never_skipped() {
    let clock = Arc::new(ShiftedClock::default());
    let app = TestApp::spawn_with(Options {
        clock: Some(clock.clone()),
        ..Options::default()
    })
    .await;
    let (merchant, pos, scheduler) = shop(&app).await;
    let (_quiet_merchant, quiet_pos, quiet_scheduler) = shop(&app).await;
    app.checkout(&quiet_pos)
        .await
        .record_purchase(purchase("q-1", "q-1", 1_000))
        .await
        .unwrap();
    let mut stream = watch(&app, &quiet_scheduler, "", &[]).await;
    let quiet_last = next(&mut stream).await;
    let mut checkout = app.checkout(&pos).await;
    for i in 0..3 {
        checkout
            .record_purchase(purchase(&format!("card-{i}"), &format!("old-{i}"), 1_000))
            .await
            .unwrap();
    }
    let mut stream = watch(&app, &scheduler, "", &[]).await;
    let first = next(&mut stream).await;
    next(&mut stream).await;
    let last_old = next(&mut stream).await;
    // An event still young after the clock moves (written "later").
    sqlx::query(
        "INSERT INTO events (merchant_id, kind, occurred_at, details)
         VALUES ($1, 'greeting_due', now() + interval '300 hours', '{}')",
    )
    .bind(merchant.id.0)
    .execute(&app.pool)
    .await
    .unwrap();
    let young = next(&mut stream).await;

    clock.advance(Duration::from_secs(169 * 3600));
    let pruned = app.events.prune(2).await.unwrap();
    assert_eq!(
        pruned.deleted, 4,
        "the old events of both merchants, in batches of 2"
    );

    let status = try_watch(&app, &scheduler, &first.cursor, &[])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("empty after_cursor"),
        "{}",
        status.message()
    );
    // The cursor of the last pruned event loses nothing: it resumes with the young one.
    let mut resumed = watch(&app, &scheduler, &last_old.cursor, &[]).await;
    assert_eq!(next(&mut resumed).await, young);
    // From the oldest retained: the young one, then live.
    let mut restarted = watch(&app, &scheduler, "", &[]).await;
    assert_eq!(next(&mut restarted).await, young);
    checkout
        .record_purchase(purchase("card-new", "new-1", 1_000))
        .await
        .unwrap();
    assert!(next(&mut restarted).await.details_json.contains("new-1"));
    // The quiet merchant's last cursor: its own event is pruned but nothing after it.
    let mut quiet_resumed = watch(&app, &quiet_scheduler, &quiet_last.cursor, &[]).await;
    quiet(&mut quiet_resumed, Duration::from_millis(200)).await;
    // A pruning pass with nothing old does nothing.
    assert_eq!(app.events.prune(100).await.unwrap().deleted, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_expiring_is_written_once_per_lot_by_concurrent_passes() {
    let clock = Arc::new(ShiftedClock::default());
    let app = TestApp::spawn_with(Options {
        clock: Some(clock.clone()),
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let expiry = Some(pb::ExpiryPolicy {
        kind: pb::ExpiryKind::MonthsAfterEarning as i32,
        months: 1,
    });
    set_program(&app, &merchant.admin_key, program(expiry, 5)).await;
    let saved = app
        .program(&merchant.admin_key)
        .await
        .get_program(pb::GetProgramRequest {})
        .await
        .unwrap()
        .into_inner()
        .program
        .unwrap();
    assert_eq!(saved.expiry_warning_days, 5);
    let pos = app.key(&merchant, Scope::Pos).await;
    let scheduler = app.key(&merchant, Scope::Scheduler).await;
    let mut checkout = app.checkout(&pos).await;
    for (card, receipt) in [("card-1", "r-1"), ("card-2", "r-2"), ("card-1", "r-3")] {
        checkout
            .record_purchase(purchase(card, receipt, 2_000))
            .await
            .unwrap();
    }
    let mut stream = watch(&app, &scheduler, "", &[pb::EventType::PointsExpiring]).await;
    // Not due yet: a month ahead, the warning is 5 days.
    assert_eq!(app.events.warn_expiring(100).await.unwrap(), 0);
    clock.advance(27 * DAY);
    let passes: Vec<_> = (0..4)
        .map(|_| {
            let events = app.events.clone();
            tokio::spawn(async move { events.warn_expiring(1).await.unwrap() })
        })
        .collect();
    let mut written = 0;
    for pass in passes {
        written += pass.await.unwrap();
    }
    written += app.events.warn_expiring(100).await.unwrap();
    assert_eq!(written, 3, "one warning per lot");
    let mut cards = HashMap::new();
    for _ in 0..3 {
        let e = next(&mut stream).await;
        let d = details(&e);
        assert_eq!(d["points"], 20);
        assert!(d["expires_at"].is_string());
        assert_eq!(e.balance.as_ref().unwrap().available % 20, 0);
        *cards.entry(e.external_id).or_insert(0) += 1;
    }
    assert_eq!(cards["card-1"], 2);
    assert_eq!(cards["card-2"], 1);
    assert_eq!(app.events.warn_expiring(100).await.unwrap(), 0);
    quiet(&mut stream, Duration::from_millis(300)).await;
    app.stop().await;
}

/// Two `loyalty serve` processes on one database, writers on both, a watcher on each: each
/// watcher sees every event exactly once, both in the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_stream_every_event_once_in_the_same_order() {
    use common::cluster::ServerProcess;
    let db = common::TestDb::create().await;
    let settings = [("LOYALTY_EVENT_POLL_MS", "10")];
    let mut one = ServerProcess::spawn_with(&db.url, "", "events-a", &settings);
    let mut two = ServerProcess::spawn_with(&db.url, "", "events-b", &settings);
    one.wait_serving(Duration::from_secs(30)).await;
    two.wait_serving(Duration::from_secs(30)).await;
    let pool = db.pool().await;
    let store = Store::from_pool(pool.clone());
    let (merchant, admin) = loyalty::create_merchant(&store, "Two replicas", "EUR")
        .await
        .unwrap();
    let key = |scope| {
        let store = store.clone();
        async move {
            loyalty::create_key(&store, merchant, scope)
                .await
                .unwrap()
                .secret
                .expose()
                .to_string()
        }
    };
    let pos = key(Scope::Pos).await;
    let scheduler = key(Scope::Scheduler).await;
    drop(admin);
    let client = |endpoint: String, key: String| async move {
        let channel = tonic::transport::Channel::from_shared(endpoint)
            .unwrap()
            .connect()
            .await
            .unwrap();
        (channel, TestApp::bearer(&key))
    };
    let mut watchers = Vec::new();
    for server in [&one, &two] {
        let (channel, bearer) = client(server.endpoint(), scheduler.clone()).await;
        let stream = pb::engagement_service_client::EngagementServiceClient::with_interceptor(
            channel, bearer,
        )
        .watch_events(pb::WatchEventsRequest {
            after_cursor: String::new(),
            types: PURCHASES.iter().map(|t| *t as i32).collect(),
        })
        .await
        .unwrap()
        .into_inner();
        watchers.push(stream);
    }
    const EACH: usize = 30;
    let mut writers = Vec::new();
    for (w, server) in [&one, &two, &one, &two].into_iter().enumerate() {
        let (channel, bearer) = client(server.endpoint(), pos.clone()).await;
        let mut checkout =
            pb::checkout_service_client::CheckoutServiceClient::with_interceptor(channel, bearer);
        writers.push(tokio::spawn(async move {
            for i in 0..EACH {
                checkout
                    .record_purchase(purchase(&format!("card-{w}"), &format!("w{w}-{i}"), 1_000))
                    .await
                    .unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let mut orders = Vec::new();
    for stream in &mut watchers {
        let mut order = Vec::new();
        for _ in 0..4 * EACH {
            let event = next(stream).await;
            order.push((event.cursor.clone(), details(&event)["purchase_id"].clone()));
        }
        quiet(stream, Duration::from_millis(300)).await;
        let unique: BTreeSet<_> = order.iter().map(|(_, id)| id.to_string()).collect();
        assert_eq!(unique.len(), 4 * EACH, "each purchase exactly once");
        orders.push(order);
    }
    assert_eq!(orders[0], orders[1], "both replicas stream one order");
    drop(watchers);
    drop(one);
    drop(two);
    pool.close().await;
    db.drop_database().await;
}

/// A watcher that stops reading while ten thousand events arrive falls further behind than
/// the shared reader's broadcast holds (the events are large, so that HTTP/2 flow control
/// stops the server's sending after a thousand or so); it then reads them from the database
/// from its own cursor: every one, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_lags_behind_the_broadcast_reads_the_rest_from_the_database() {
    let app = TestApp::spawn().await;
    let (merchant, _pos, scheduler) = shop(&app).await;
    let mut stream = watch(&app, &scheduler, "", &[]).await;
    quiet(&mut stream, Duration::from_millis(100)).await;
    const N: i64 = 10_000;
    assert!(N as usize > 2 * loyalty::events::hub::CAPACITY);
    sqlx::query(
        "INSERT INTO events (merchant_id, kind, details)
         SELECT $1, 'greeting_due', jsonb_build_object('n', n, 'pad', repeat('x', 2000))
           FROM generate_series(1, $2) AS n",
    )
    .bind(merchant.id.0)
    .bind(N)
    .execute(&app.pool)
    .await
    .unwrap();
    // Numbered and broadcast while the watcher does not read.
    for _ in 0..200 {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE position IS NULL")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut last = 0;
    let mut seen = BTreeSet::new();
    for _ in 0..N {
        let event = next(&mut stream).await;
        assert!(position(&event) > last, "out of order or repeated");
        last = position(&event);
        assert!(seen.insert(details(&event)["n"].as_i64().unwrap()));
    }
    assert_eq!(seen, (1..=N).collect::<BTreeSet<_>>());
    quiet(&mut stream, Duration::from_millis(300)).await;
    app.stop().await;
}

/// A gift claimed with points: its gift_issued event carries the balance after the price
/// (the claim's account write comes before its grant's statement).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gift_claimed_with_points_is_issued_with_the_balance_after_its_price() {
    let app = TestApp::spawn().await;
    let (merchant, pos, scheduler) = shop(&app).await;
    app.checkout(&pos)
        .await
        .record_purchase(purchase("card-1", "r-1", 10_000))
        .await
        .unwrap();
    app.program(&merchant.admin_key)
        .await
        .create_gift(pb::CreateGiftRequest {
            gift: Some(pb::Gift {
                gift_id: "tote".into(),
                name: "Tote bag".into(),
                kind: pb::GiftKind::Item as i32,
                points_price: Some(60),
                validity_days: 30,
                active: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let mut stream = watch(&app, &scheduler, "", &[pb::EventType::GiftIssued]).await;
    let claimed = app
        .member(&pos)
        .await
        .claim_gift(pb::ClaimGiftRequest {
            external_id: "card-1".into(),
            gift_id: "tote".into(),
            claim_key: "claim-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let issued = next(&mut stream).await;
    assert_eq!(details(&issued)["source"], "points");
    assert_eq!(details(&issued)["gift_id"], "tote");
    assert_eq!(issued.balance, claimed.balance);
    assert_eq!(issued.balance.unwrap().available, 100 - 60);
    quiet(&mut stream, Duration::from_millis(300)).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_outbox_off_no_write_fills_it_and_watch_events_is_refused() {
    let app = TestApp::spawn_with(Options {
        outbox: false,
        ..Options::default()
    })
    .await;
    let (merchant, pos, scheduler) = shop(&app).await;
    let admin = &merchant.admin_key;
    let mut checkout = app.checkout(&pos).await;
    // Two purchases (the second changes the status: NEW to RETURNING), a redemption, a hold
    // and its commit, a return, a gift issued and redeemed: every writer of the outbox.
    for id in ["r-1", "r-2"] {
        checkout
            .record_purchase(purchase("card-1", id, 10_000))
            .await
            .unwrap();
    }
    redeem(&mut checkout, "card-1", "red-1", 30).await;
    hold_and_commit(&mut checkout, "card-1", "hold-1", 20).await;
    checkout
        .return_purchase(pb::ReturnPurchaseRequest {
            purchase_id: "r-1".into(),
            return_id: "ret-1".into(),
            lines: vec![],
            amount_minor: 5_000,
        })
        .await
        .unwrap();
    create_item_gift(&app, admin, "free-coffee", "Free coffee").await;
    let grant = issue_gift(&app, admin, "card-1", "free-coffee", "welcome-1").await;
    checkout
        .redeem_gift(pb::RedeemGiftRequest {
            code: grant.code,
            redemption_key: "gift-red-1".into(),
            store_id: "store-2".into(),
        })
        .await
        .unwrap();

    // Every write did its work...
    let balance = app
        .member(&pos)
        .await
        .get_balance(pb::GetBalanceRequest {
            external_id: "card-1".into(),
            min_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(balance.purchase_count, 2);
    assert_eq!(balance.balance.unwrap().lifetime_redeemed, 50);
    // ...and wrote no event.
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE merchant_id = $1")
        .bind(merchant.id.0)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(written, 0);
    // The switch is this server's sessions' only: another session still writes.
    let outside: bool = sqlx::query_scalar("SELECT outbox_on()")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(outside);

    let refused = try_watch(&app, &scheduler, "", &[]).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("LOYALTY_EVENTS_OUTBOX"),
        "{refused:?}"
    );
    app.stop().await;
}
