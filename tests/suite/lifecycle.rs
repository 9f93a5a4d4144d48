//! The points lifecycle through the real gRPC client: spending (with real concurrency),
//! holds committed or released exactly once, returns that take back exactly what was earned,
//! pending points, expiry, adjustments, and the sweep run by several callers at once.

use loyalty_testkit as common;

use std::sync::Arc;
use std::time::Duration;

use common::{Options, ShiftedClock, TestApp, purchase};
use futures::future::join_all;
use loyalty::Scope;
use loyalty::pb;
use tonic::Code;
use tonic_types::StatusExt;

const DAY: Duration = Duration::from_secs(86_400);

/// The default program (1 point per EUR, EUR) with lifecycle settings.
fn program(
    pending_days: u32,
    expiry: Option<pb::ExpiryPolicy>,
    return_policy: pb::ReturnPolicy,
) -> pb::Program {
    pb::Program {
        currency: "EUR".into(),
        earn_rate: Some(pb::EarnRate {
            points: 1,
            currency_units: 1,
        }),
        pending_days,
        expiry,
        redemption: Some(pb::RedemptionRule {
            points_per_unit: 100,
            minimum_points: 0,
            max_share_bp: Some(5_000),
        }),
        return_policy: return_policy as i32,
        ..Default::default()
    }
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

async fn balance(app: &TestApp, key: &str, external_id: &str) -> pb::GetBalanceResponse {
    app.member(key)
        .await
        .get_balance(pb::GetBalanceRequest {
            external_id: external_id.into(),
            min_version: 0,
        })
        .await
        .unwrap()
        .into_inner()
}

fn redeem(external_id: &str, id: &str, points: i64) -> pb::RedeemPointsRequest {
    pb::RedeemPointsRequest {
        external_id: external_id.into(),
        redemption_id: id.into(),
        points,
        purchase_id: String::new(),
    }
}

fn hold(external_id: &str, id: &str, points: i64, ttl_seconds: u32) -> pb::ReservePointsRequest {
    pb::ReservePointsRequest {
        external_id: external_id.into(),
        reservation_id: id.into(),
        points,
        ttl_seconds,
        purchase_id: String::new(),
    }
}

async fn entries(app: &TestApp, kind: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE kind = $1")
        .bind(kind)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_redemptions_never_overdraw() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    checkout
        .record_purchase(purchase("card-1", "r-1", 50_000))
        .await
        .unwrap();

    let attempts = (0..100).map(|i| {
        let mut checkout = checkout.clone();
        tokio::spawn(async move {
            checkout
                .redeem_points(redeem("card-1", &format!("redeem-{i}"), 10))
                .await
        })
    });
    let results: Vec<_> = join_all(attempts)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let won: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(won.len(), 50);
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        let failure = refused.get_details_precondition_failure().expect("detail");
        assert_eq!(failure.violations[0].description, "0 points are available");
    }
    // 10 points at 100 points per euro: 0.10 EUR.
    assert!(won.iter().all(|w| w.get_ref().discount_minor == 10));
    let read = balance(&app, &pos, "card-1").await.balance.unwrap();
    assert_eq!((read.available, read.lifetime_redeemed), (0, 500));
    assert_eq!(entries(&app, "redeem").await, 50);
    app.assert_ledger_invariant().await;
    app.stop().await;
}

/// Spending takes the soonest-expiring lot first, the oldest lot on a tie, and never-expiring
/// points last, and records what each spend took from each lot.
#[tokio::test]
async fn spending_takes_the_soonest_expiring_lots_first() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    let bought = |id: &str, total: i64, days_ago: i64| {
        let mut p = purchase("card-1", id, total);
        if let Some(at) = p.occurred_at.as_mut() {
            at.seconds -= days_ago * 86_400;
        }
        p
    };
    // Earned while points never expired: spent last.
    checkout
        .record_purchase(bought("forever", 3_000, 28))
        .await
        .unwrap();
    let expiry = pb::ExpiryPolicy {
        kind: pb::ExpiryKind::MonthsAfterEarning as i32,
        months: 3,
    };
    set_program(
        &app,
        &merchant.admin_key,
        program(0, Some(expiry), pb::ReturnPolicy::Debt),
    )
    .await;
    // "late" and "tie" expire together (earned the same second), "soon" 24 days earlier.
    for (id, total, days_ago) in [("late", 2_000, 1), ("soon", 1_000, 25), ("tie", 1_500, 1)] {
        checkout
            .record_purchase(bought(id, total, days_ago))
            .await
            .unwrap();
    }
    let remaining = || async {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT source_reference, remaining FROM point_lots
              WHERE source_kind = 'earn' ORDER BY id",
        )
        .fetch_all(&app.pool)
        .await
        .unwrap();
        rows.into_iter()
            .map(|(reference, left)| format!("{reference}={left}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        remaining().await,
        ["forever=30", "late=20", "soon=10", "tie=15"]
    );
    checkout
        .redeem_points(redeem("card-1", "x-1", 35))
        .await
        .unwrap();
    assert_eq!(
        remaining().await,
        ["forever=30", "late=0", "soon=0", "tie=10"]
    );
    checkout
        .redeem_points(redeem("card-1", "x-2", 15))
        .await
        .unwrap();
    assert_eq!(
        remaining().await,
        ["forever=25", "late=0", "soon=0", "tie=0"]
    );
    // Each spend's movements add up to what it spent, lot by lot.
    let moved: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT entry_seq, count(*), sum(points)::bigint FROM lot_movements
          GROUP BY entry_seq ORDER BY entry_seq",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(moved, [(5, 3, 35), (6, 2, 15)]);
    assert_eq!(
        balance(&app, &pos, "card-1")
            .await
            .balance
            .unwrap()
            .available,
        25
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redemption_replays_its_answer_and_refuses_other_content() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    checkout
        .record_purchase(purchase("card-1", "r-1", 1_000))
        .await
        .unwrap();
    let first = checkout
        .redeem_points(redeem("card-1", "x-1", 4))
        .await
        .unwrap()
        .into_inner();
    checkout
        .record_purchase(purchase("card-1", "r-2", 1_000))
        .await
        .unwrap();
    let again = checkout
        .redeem_points(redeem("card-1", "x-1", 4))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, first);
    let other = checkout
        .redeem_points(redeem("card-1", "x-1", 5))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists);
    // Bad input names the field and writes nothing.
    let counts = app.row_counts().await;
    let bad = checkout
        .redeem_points(redeem("card-1", "", -1))
        .await
        .unwrap_err();
    assert_eq!(common::violated_fields(&bad), ["redemption_id", "points"]);
    let unknown = checkout
        .redeem_points(redeem("card-9", "x-2", 1))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(app.row_counts().await, counts);
    assert_eq!(
        balance(&app, &pos, "card-1")
            .await
            .balance
            .unwrap()
            .available,
        16
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commit_racing_release_settles_each_hold_exactly_once() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    checkout
        .record_purchase(purchase("card-1", "r-1", 10_000))
        .await
        .unwrap();
    let held = checkout
        .reserve_points(hold("card-1", "h-0", 30, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held.balance.unwrap().available, 70);
    // Its default lifetime is a quarter hour.
    let expires = held.expires_at.unwrap().seconds - common::now_timestamp().seconds;
    assert!((890..=900).contains(&expires), "{expires}");

    for i in 0..10 {
        let id = format!("h-{i}");
        if i > 0 {
            checkout
                .reserve_points(hold("card-1", &id, 5, 60))
                .await
                .unwrap();
        }
        let commit = {
            let mut c = checkout.clone();
            let id = id.clone();
            tokio::spawn(async move {
                c.commit_reservation(pb::CommitReservationRequest { reservation_id: id })
                    .await
            })
        };
        let release = {
            let mut c = checkout.clone();
            let id = id.clone();
            tokio::spawn(async move {
                c.release_reservation(pb::ReleaseReservationRequest { reservation_id: id })
                    .await
            })
        };
        let (commit, release) = (commit.await.unwrap(), release.await.unwrap());
        let winner = match (commit, release) {
            (Ok(won), Err(lost)) => {
                assert_eq!(
                    won.get_ref().status,
                    pb::ReservationStatus::Committed as i32
                );
                assert_eq!(lost.code(), Code::FailedPrecondition);
                let replay = checkout
                    .commit_reservation(pb::CommitReservationRequest { reservation_id: id })
                    .await
                    .unwrap();
                (won.into_inner(), replay.into_inner())
            }
            (Err(lost), Ok(won)) => {
                assert_eq!(won.get_ref().status, pb::ReservationStatus::Released as i32);
                assert_eq!(lost.code(), Code::FailedPrecondition);
                let replay = checkout
                    .release_reservation(pb::ReleaseReservationRequest { reservation_id: id })
                    .await
                    .unwrap();
                (won.into_inner(), replay.into_inner())
            }
            other => panic!("exactly one must win: {other:?}"),
        };
        // A replay of the winner gets the same answer.
        assert_eq!(winner.0, winner.1);
    }
    let read = balance(&app, &pos, "card-1").await.balance.unwrap();
    let committed: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(points), 0)::bigint FROM reservations WHERE status = 'committed'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(read.available, 100 - committed);
    assert_eq!(read.lifetime_redeemed, committed);
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations WHERE status = 'held'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(held, 0);
    // Each hold wrote one RESERVE and one RELEASE; each commit one REDEEM besides.
    assert_eq!(entries(&app, "reserve").await, 10);
    assert_eq!(entries(&app, "release").await, 10);
    app.assert_ledger_invariant().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_hold_is_released_by_the_sweep_exactly_once() {
    let clock = Arc::new(ShiftedClock::default());
    let app = TestApp::spawn_with(Options {
        clock: Some(clock.clone()),
        ..Default::default()
    })
    .await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    checkout
        .record_purchase(purchase("card-1", "r-1", 10_000))
        .await
        .unwrap();
    checkout
        .reserve_points(hold("card-1", "h-1", 40, 60))
        .await
        .unwrap();
    // Not due yet: nothing happens.
    assert_eq!(app.points.sweep(100).await.unwrap().holds_released, 0);
    clock.advance(Duration::from_secs(61));
    // A commit after the ttl is refused even before the sweep ran.
    let late = checkout
        .commit_reservation(pb::CommitReservationRequest {
            reservation_id: "h-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);

    let sweeps = (0..4).map(|_| {
        let points = app.points.clone();
        tokio::spawn(async move { points.sweep(100).await.unwrap() })
    });
    let released: u64 = join_all(sweeps)
        .await
        .into_iter()
        .map(|r| r.unwrap().holds_released)
        .sum();
    assert_eq!(released, 1);
    assert_eq!(entries(&app, "release").await, 1);
    let read = balance(&app, &pos, "card-1").await.balance.unwrap();
    assert_eq!(read.available, 100);
    // A release now answers with the expiry, a commit is refused.
    let answer = checkout
        .release_reservation(pb::ReleaseReservationRequest {
            reservation_id: "h-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.status, pb::ReservationStatus::Expired as i32);
    assert_eq!(answer.balance.unwrap().available, 100);
    let status = checkout
        .commit_reservation(pb::CommitReservationRequest {
            reservation_id: "h-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    app.assert_ledger_invariant().await;
    app.stop().await;
}

/// A hot customer's account is locked by one till after another, so a sweep pass that skipped
/// a locked account (`SKIP LOCKED`) almost never found it free: under the reliability
/// suite's hot-customer load (scenario 2) expired holds stayed held up to 7 s, their points
/// unavailable meanwhile. The pass now waits for the till's transaction (short, and bounded by
/// the statement timeout) and releases the hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sweep_pass_releases_an_expired_hold_whose_account_a_till_holds_for_a_moment() {
    let clock = Arc::new(ShiftedClock::default());
    let app = TestApp::spawn_with(Options {
        clock: Some(clock.clone()),
        ..Default::default()
    })
    .await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    checkout
        .record_purchase(purchase("card-1", "r-1", 10_000))
        .await
        .unwrap();
    checkout
        .reserve_points(hold("card-1", "h-1", 40, 60))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(61));

    let till = app.hold_account("card-1").await;
    let points = app.points.clone();
    let pass = tokio::spawn(async move { points.sweep(100).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(till);
    let report = pass.await.unwrap();
    assert_eq!(report.holds_released, 1, "{report:?}");
    let read = balance(&app, &pos, "card-1").await.balance.unwrap();
    assert_eq!(read.available, 100);
    app.assert_ledger_invariant().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_points_become_available_through_the_sweep() {
    let clock = Arc::new(ShiftedClock::default());
    let app = TestApp::spawn_with(Options {
        clock: Some(clock.clone()),
        ..Default::default()
    })
    .await;
    let merchant = app.merchant().await;
    set_program(
        &app,
        &merchant.admin_key,
        program(14, None, pb::ReturnPolicy::Debt),
    )
    .await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    let earned = checkout
        .record_purchase(purchase("card-1", "r-1", 5_000))
        .await
        .unwrap()
        .into_inner()
        .balance
        .unwrap();
    assert_eq!((earned.available, earned.pending), (0, 50));
    // Pending points are shown, not spendable.
    let refused = checkout
        .redeem_points(redeem("card-1", "x-1", 10))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);

    clock.advance(13 * DAY);
    assert_eq!(app.points.sweep(100).await.unwrap().lots_matured, 0);
    clock.advance(DAY + Duration::from_secs(1));
    assert_eq!(app.points.sweep(100).await.unwrap().lots_matured, 1);
    let read = balance(&app, &pos, "card-1").await;
    let b = read.balance.unwrap();
    assert_eq!((b.available, b.pending), (50, 0));
    assert!(b.version > earned.version);
    checkout
        .redeem_points(redeem("card-1", "x-1", 10))
        .await
        .unwrap();
    app.assert_ledger_invariant().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn due_lots_expire_once_under_concurrent_sweeps_and_holds_protect_theirs() {
    let clock = Arc::new(ShiftedClock::default());
    let app = TestApp::spawn_with(Options {
        clock: Some(clock.clone()),
        ..Default::default()
    })
    .await;
    let merchant = app.merchant().await;
    let expiry = pb::ExpiryPolicy {
        kind: pb::ExpiryKind::MonthsAfterEarning as i32,
        months: 1,
    };
    set_program(
        &app,
        &merchant.admin_key,
        program(0, Some(expiry), pb::ReturnPolicy::Debt),
    )
    .await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    for customer in 0..20 {
        checkout
            .record_purchase(purchase(
                &format!("card-{customer}"),
                &format!("r-{customer}"),
                3_000,
            ))
            .await
            .unwrap();
    }
    // The balance shows what expires next, and when (a month after the purchase).
    let read = balance(&app, &pos, "card-0").await;
    let next = read.next_expiry.expect("next expiry");
    assert_eq!(next.points, 30);
    let in_days = (next.expires_at.unwrap().seconds - common::now_timestamp().seconds) / 86_400;
    assert!((27..=31).contains(&in_days), "{in_days}");
    // card-2 spends 5 first: only the rest expires.
    checkout
        .redeem_points(redeem("card-2", "x-2", 5))
        .await
        .unwrap();
    // An hour before the expiry, card-1 holds 20 of its 30 points for a day.
    let expires_at = next.expires_at.unwrap().seconds;
    let until = (expires_at - common::now_timestamp().seconds - 3_600) as u64;
    clock.advance(Duration::from_secs(until));
    checkout
        .reserve_points(hold("card-1", "h-1", 20, 86_400))
        .await
        .unwrap();
    assert_eq!(app.points.sweep(100).await.unwrap().lots_expired, 0);
    clock.advance(Duration::from_secs(2 * 3_600));
    let sweeps = (0..4).map(|_| {
        let points = app.points.clone();
        tokio::spawn(async move { points.sweep(7).await.unwrap() })
    });
    let mut expired: u64 = join_all(sweeps)
        .await
        .into_iter()
        .map(|r| r.unwrap().lots_expired)
        .sum();
    // Batches of 7: passes until nothing is left.
    loop {
        let more = app.points.sweep(7).await.unwrap().lots_expired;
        if more == 0 {
            break;
        }
        expired += more;
    }
    assert_eq!(expired, 20);
    assert_eq!(entries(&app, "expire").await, 20);
    let points_expired: i64 = sqlx::query_scalar(
        "SELECT (-sum(points))::bigint FROM ledger_entries WHERE kind = 'expire'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(points_expired, 18 * 30 + 10 + 25);
    let b = balance(&app, &pos, "card-1").await.balance.unwrap();
    assert_eq!(b.available, 0);
    // The held points survived; given back now, they expire at the next pass, once.
    let released = checkout
        .release_reservation(pb::ReleaseReservationRequest {
            reservation_id: "h-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.balance.unwrap().available, 20);
    assert_eq!(app.points.sweep(100).await.unwrap().lots_expired, 1);
    assert_eq!(app.points.sweep(100).await.unwrap().lots_expired, 0);
    assert_eq!(
        balance(&app, &pos, "card-1")
            .await
            .balance
            .unwrap()
            .available,
        0
    );
    assert!(balance(&app, &pos, "card-3").await.next_expiry.is_none());
    app.assert_ledger_invariant().await;
    app.stop().await;
}

/// The next expiry a purchase publishes (its statement returns the soonest expiry of the lots
/// before it and the store adds the purchase's own lot and the lots it moved) is the one the
/// database computes from the lots after it, under every expiry policy, for purchases made
/// in and out of order and after a redemption.
#[tokio::test]
async fn the_next_expiry_a_purchase_caches_is_the_one_its_lots_give() {
    let app = TestApp::spawn().await;
    let policies = [
        (pb::ExpiryKind::MonthsAfterEarning, 1),
        (pb::ExpiryKind::EndOfMonthAfter, 1),
        (pb::ExpiryKind::MonthsWithoutPurchase, 2),
    ];
    for (kind, months) in policies {
        let merchant = app.merchant().await;
        let expiry = pb::ExpiryPolicy {
            kind: kind as i32,
            months,
        };
        set_program(
            &app,
            &merchant.admin_key,
            program(0, Some(expiry), pb::ReturnPolicy::Debt),
        )
        .await;
        let pos = app.key(&merchant, Scope::Pos).await;
        let mut checkout = app.checkout(&pos).await;
        // Days ago: out of order (the third is older than the first two), then today.
        for (n, days_ago) in [20, 5, 25, 0].into_iter().enumerate() {
            let mut request = purchase("card-1", &format!("r-{n}"), 1_000 * (n as i64 + 1));
            request.occurred_at = Some(common::timestamp_in(-days_ago * 86_400));
            checkout.record_purchase(request).await.unwrap();
            let hits = app.metrics.cache_op_count("get", "hit");
            let cached = balance(&app, &pos, "card-1").await.next_expiry;
            assert_eq!(
                app.metrics.cache_op_count("get", "hit"),
                hits + 1,
                "the balance after purchase {n} came from the cache"
            );
            let stored: Option<(i64, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
                "SELECT n.points, n.expires_at
                   FROM customers c, next_expiry(c.merchant_id, c.id) n
                  WHERE c.merchant_id = $1 AND c.external_id = 'card-1'",
            )
            .bind(merchant.id.0)
            .fetch_optional(&app.pool)
            .await
            .unwrap();
            let cached = cached.map(|e| (e.points, e.expires_at.unwrap().seconds));
            let stored = stored.map(|(points, at)| (points, at.timestamp()));
            assert!(stored.is_some(), "{kind:?}: something expires");
            assert_eq!(cached, stored, "{kind:?}, after purchase {n}");
            if n == 1 {
                // Spending takes the soonest-expiring points first: the next purchases start
                // from lots partly spent.
                checkout
                    .redeem_points(redeem("card-1", "x-1", 15))
                    .await
                    .unwrap();
            }
        }
    }
    app.assert_lots_invariant().await;
    app.stop().await;
}

fn return_lines(
    purchase_id: &str,
    return_id: &str,
    lines: &[(u32, i64)],
) -> pb::ReturnPurchaseRequest {
    pb::ReturnPurchaseRequest {
        purchase_id: purchase_id.into(),
        return_id: return_id.into(),
        lines: lines
            .iter()
            .map(|(line_no, amount_minor)| pb::ReturnedLine {
                line_no: *line_no,
                amount_minor: *amount_minor,
            })
            .collect(),
        amount_minor: 0,
    }
}

fn return_amount(
    purchase_id: &str,
    return_id: &str,
    amount_minor: i64,
) -> pb::ReturnPurchaseRequest {
    pb::ReturnPurchaseRequest {
        purchase_id: purchase_id.into(),
        return_id: return_id.into(),
        lines: vec![],
        amount_minor,
    }
}

/// A coffee at 1.5x (3.50 EUR) and a cake (2.50 EUR) at 10 points per EUR: 52 + 25 = 77.
fn coffee_and_cake(purchase_id: &str) -> pb::RecordPurchaseRequest {
    let mut request = purchase("card-1", purchase_id, 600);
    request.lines = vec![
        pb::PurchaseLine {
            sku: "latte".into(),
            category: "coffee".into(),
            quantity: 1,
            amount_minor: 350,
        },
        pb::PurchaseLine {
            sku: "cake".into(),
            category: "bakery".into(),
            quantity: 1,
            amount_minor: 250,
        },
    ];
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_returns_take_back_exactly_what_the_purchase_earned() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let mut rules = program(0, None, pb::ReturnPolicy::Debt);
    rules.earn_rate = Some(pb::EarnRate {
        points: 10,
        currency_units: 1,
    });
    rules.category_multipliers = vec![pb::CategoryMultiplier {
        category: "coffee".into(),
        multiplier_bp: 15_000,
    }];
    set_program(&app, &merchant.admin_key, rules).await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    let earned = checkout
        .record_purchase(coffee_and_cake("r-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(earned.points_earned, 77);

    // The coffee alone takes back what the coffee earned (52.5 → its share 53 or 52).
    let coffee = checkout
        .return_purchase(return_lines("r-1", "ret-1", &[(1, 350)]))
        .await
        .unwrap()
        .into_inner();
    let coffee_share: i64 = sqlx::query_scalar(
        "SELECT points FROM purchase_lines WHERE purchase_id = 'r-1' AND line_no = 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(coffee.points_clawed_back, coffee_share);
    assert_eq!(coffee.returned_minor, 350);
    // The cake in two parts, the last one by amount.
    let first = checkout
        .return_purchase(return_lines("r-1", "ret-2", &[(2, 100)]))
        .await
        .unwrap()
        .into_inner();
    let last = checkout
        .return_purchase(return_amount("r-1", "ret-3", 150))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        coffee.points_clawed_back + first.points_clawed_back + last.points_clawed_back,
        77
    );
    assert_eq!(last.balance.unwrap().available, 0);
    // A replay answers the same; a fourth return is more than was bought.
    let replay = checkout
        .return_purchase(return_amount("r-1", "ret-3", 150))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replay, last);
    let counts = app.row_counts().await;
    let fourth = checkout
        .return_purchase(return_amount("r-1", "ret-4", 1))
        .await
        .unwrap_err();
    assert_eq!(common::violated_fields(&fourth), ["amount_minor"]);
    let too_much = checkout
        .return_purchase(return_lines("r-1", "ret-5", &[(1, 1), (3, 5)]))
        .await
        .unwrap_err();
    assert_eq!(
        common::violated_fields(&too_much),
        ["lines[0].amount_minor", "lines[1].line_no"]
    );
    assert_eq!(app.row_counts().await, counts);
    let unknown = checkout
        .return_purchase(return_amount("r-404", "ret-6", 1))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    app.assert_ledger_invariant().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_after_spending_leaves_a_debt_the_next_earn_repays() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    checkout
        .record_purchase(purchase("card-1", "r-1", 10_000))
        .await
        .unwrap();
    checkout
        .redeem_points(redeem("card-1", "x-1", 80))
        .await
        .unwrap();
    let returned = checkout
        .return_purchase(return_amount("r-1", "ret-1", 10_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(returned.points_clawed_back, 100);
    assert_eq!(returned.points_written_off, 0);
    assert_eq!(returned.balance.unwrap().available, -80);
    // A debt cannot be spent.
    let refused = checkout
        .redeem_points(redeem("card-1", "x-2", 1))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    // The next purchase repays it first.
    let next = checkout
        .record_purchase(purchase("card-1", "r-2", 5_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.balance.unwrap().available, -30);
    let next = checkout
        .record_purchase(purchase("card-1", "r-3", 5_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.balance.unwrap().available, 20);
    checkout
        .redeem_points(redeem("card-1", "x-3", 20))
        .await
        .unwrap();
    app.assert_ledger_invariant().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_return_writes_off_the_rest_and_spent_points_come_back_pro_rata() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    set_program(
        &app,
        &merchant.admin_key,
        program(0, None, pb::ReturnPolicy::CapAtBalance),
    )
    .await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    checkout
        .record_purchase(purchase("card-1", "r-1", 10_000))
        .await
        .unwrap();
    // 60 points paid for receipt r-2 (0.60 EUR), which earned 40 itself.
    let mut spend = redeem("card-1", "x-1", 60);
    spend.purchase_id = "r-2".into();
    checkout.redeem_points(spend).await.unwrap();
    checkout
        .record_purchase(purchase("card-1", "r-2", 4_000))
        .await
        .unwrap();
    // Half of r-2 back: 20 of its points go, 30 of the spent ones come back.
    let half = checkout
        .return_purchase(return_amount("r-2", "ret-1", 2_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((half.points_clawed_back, half.points_refunded), (20, 30));
    assert_eq!(half.balance.unwrap().available, 40 + 40 - 20 + 30);
    // Spend everything, then return all of r-1: nothing is left to take, all written off.
    checkout
        .redeem_points(redeem("card-1", "x-2", 90))
        .await
        .unwrap();
    let all = checkout
        .return_purchase(return_amount("r-1", "ret-2", 10_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((all.points_clawed_back, all.points_written_off), (0, 100));
    assert_eq!(all.balance.unwrap().available, 0);
    app.assert_ledger_invariant().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_adjust_points_with_a_reason_once() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    app.checkout(&pos)
        .await
        .record_purchase(purchase("card-1", "r-1", 1_000))
        .await
        .unwrap();
    let mut admin = app.program(&merchant.admin_key).await;
    let adjust = |key: &str, points: i64, reason: &str| pb::AdjustPointsRequest {
        external_id: "card-1".into(),
        adjustment_key: key.into(),
        points,
        reason: reason.into(),
    };
    let added = admin
        .adjust_points(adjust("goodwill-1", 25, "late delivery"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(added.balance.unwrap().available, 35);
    let replay = admin
        .adjust_points(adjust("goodwill-1", 25, "late delivery"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replay.balance.unwrap().available, 35);
    let removed = admin
        .adjust_points(adjust("fix-1", -30, "double entry"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.balance.unwrap().available, 5);
    let too_many = admin
        .adjust_points(adjust("fix-2", -6, "typo"))
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::FailedPrecondition);
    let no_reason = admin
        .adjust_points(adjust("fix-3", 5, " "))
        .await
        .unwrap_err();
    assert_eq!(common::violated_fields(&no_reason), ["reason"]);
    // Only admins adjust.
    let denied = app
        .program(&pos)
        .await
        .adjust_points(adjust("fix-4", 5, "x"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let audited: Vec<(String, serde_json::Value)> = sqlx::query_as(
        "SELECT actor, details FROM audit_log WHERE action = 'points.adjust' ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(audited.len(), 2);
    assert_eq!(audited[0].1["reason"], "late delivery");
    assert!(audited[0].0.starts_with("key:"));
    app.assert_ledger_invariant().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quote_says_what_the_customer_could_spend_on_the_basket() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    set_program(
        &app,
        &merchant.admin_key,
        program(0, None, pb::ReturnPolicy::Debt),
    )
    .await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    checkout
        .record_purchase(purchase("card-1", "r-1", 100_000))
        .await
        .unwrap();
    let quote = |external_id: &str, total: i64| pb::QuotePurchaseRequest {
        external_id: external_id.into(),
        currency: "EUR".into(),
        total_minor: total,
        ..Default::default()
    };
    // 1000 points; a 6.00 basket lets points pay half: 3.00 = 300 points.
    let q = checkout
        .quote_purchase(quote("card-1", 600))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (q.redeemable_points, q.redeemable_discount_minor),
        (300, 300)
    );
    // A large basket is capped by the balance.
    let q = checkout
        .quote_purchase(quote("card-1", 1_000_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (q.redeemable_points, q.redeemable_discount_minor),
        (1000, 1000)
    );
    // An unknown customer, or none, can spend nothing.
    let q = checkout
        .quote_purchase(quote("card-9", 600))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.redeemable_points, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_own_sweep_releases_a_forgotten_hold() {
    let app = TestApp::spawn_with(Options {
        sweep_interval: Some(Duration::from_millis(50)),
        ..Default::default()
    })
    .await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    checkout
        .record_purchase(purchase("card-1", "r-1", 1_000))
        .await
        .unwrap();
    checkout
        .reserve_points(hold("card-1", "h-1", 10, 1))
        .await
        .unwrap();
    assert_eq!(
        balance(&app, &pos, "card-1")
            .await
            .balance
            .unwrap()
            .available,
        0
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let read = balance(&app, &pos, "card-1").await.balance.unwrap();
        if read.available == 10 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the hold was never released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status: String =
        sqlx::query_scalar("SELECT status FROM reservations WHERE reservation_id = 'h-1'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(status, "expired");
    app.stop().await;
}

/// The lifecycle migration turns every balance earned before lots existed into one
/// never-expiring lot per customer, for every merchant, so the lots agree with the accounts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lifecycle_migration_gives_earlier_balances_their_lots() {
    use sqlx::Connection;
    let admin_url = common::admin_database_url();
    let name = format!("loyalty_t_migration_{}", std::process::id());
    let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name}"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .unwrap();
    let mut db = sqlx::PgConnection::connect(&common::with_database(&admin_url, &name))
        .await
        .unwrap();
    let (before, after): (Vec<_>, Vec<_>) = loyalty::MIGRATOR
        .iter()
        .partition(|m| m.version < 20261203000001);
    for migration in before {
        sqlx::raw_sql(migration.sql.clone())
            .execute(&mut db)
            .await
            .unwrap();
    }
    // Two merchants, each with customers who earned (one spent nothing, one has no points).
    sqlx::raw_sql(
        "INSERT INTO merchants (name) VALUES ('a'), ('b');
         INSERT INTO customers (merchant_id, external_id) VALUES
             (1, 'card-1'), (1, 'card-2'), (1, 'card-3'), (2, 'card-1');
         INSERT INTO accounts (merchant_id, customer_id, available, lifetime_earned, version)
         SELECT merchant_id, id, CASE external_id WHEN 'card-3' THEN 0 ELSE 40 END, 40, 1
           FROM customers;",
    )
    .execute(&mut db)
    .await
    .unwrap();
    for migration in after {
        sqlx::raw_sql(migration.sql.clone())
            .execute(&mut db)
            .await
            .unwrap();
    }
    type Lot = (
        i64,
        String,
        i64,
        bool,
        Option<chrono::DateTime<chrono::Utc>>,
    );
    let lots: Vec<Lot> = sqlx::query_as(
        "SELECT merchant_id, source_reference, remaining, matured, expires_at
           FROM point_lots ORDER BY merchant_id, source_reference",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(
        lots,
        [
            (1, "card-1".to_string(), 40, true, None),
            (1, "card-2".to_string(), 40, true, None),
            (2, "card-1".to_string(), 40, true, None),
        ]
    );
    db.close().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
}
