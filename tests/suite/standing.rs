//! Repeat-purchase status and tiers through the real gRPC client: the status climbs with
//! purchases (history and events with reasons), the sweep makes the time-driven changes over a
//! shifted clock (once per customer even with two sweeps at once), a return recomputes, tiers
//! go up at once and earn their multiplier from the next purchase (and quote), go down only
//! after the grace by the sweep with one warning, concurrent purchases of one customer, and
//! GetBalance showing it all from the cache.

use loyalty_testkit as common;

use std::sync::Arc;
use std::time::Duration;

use common::{Options, ShiftedClock, TestApp, violated_fields};
use futures::future::join_all;
use loyalty::Scope;
use loyalty::pb;
use loyalty::platform::cache::CacheRead;
use loyalty::platform::clock::Clock;
use loyalty::status::rules::RepeatStatus;

const DAY: Duration = Duration::from_secs(86_400);

fn thresholds() -> pb::StatusThresholds {
    pb::StatusThresholds {
        regular_purchases: 3,
        regular_window_days: 30,
        loyal_after_regular_days: 180,
        loyal_purchases_per_year: 50,
        at_risk_gap_factor_bp: 20_000,
        at_risk_floor_days: 20,
        lapsed_after_days: 60,
    }
}

fn tiers() -> pb::TierProgram {
    pb::TierProgram {
        metric: pb::TierMetric::Spend as i32,
        window_days: 90,
        grace_days: 10,
        warning_days: 3,
        levels: vec![
            pb::Tier {
                id: "silver".into(),
                name: "Silver".into(),
                threshold: 10_000,
                earn_multiplier_bp: 20_000,
                perks: vec!["Try at home".into()],
            },
            pb::Tier {
                id: "gold".into(),
                name: "Gold".into(),
                threshold: 100_000,
                earn_multiplier_bp: 30_000,
                perks: vec![],
            },
        ],
    }
}

fn program(tiers: Option<pb::TierProgram>) -> pb::Program {
    pb::Program {
        currency: "EUR".into(),
        earn_rate: Some(pb::EarnRate {
            points: 1,
            currency_units: 1,
        }),
        status: Some(thresholds()),
        tiers,
        ..Default::default()
    }
}

struct Fixture {
    app: TestApp,
    clock: Arc<ShiftedClock>,
    merchant: i64,
    admin_key: String,
    pos: String,
}

async fn fixture(tiers: Option<pb::TierProgram>) -> Fixture {
    let clock = Arc::new(ShiftedClock::default());
    let app = TestApp::spawn_with(Options {
        clock: Some(clock.clone()),
        ..Default::default()
    })
    .await;
    let merchant = app.merchant().await;
    app.program(&merchant.admin_key)
        .await
        .update_program(pb::UpdateProgramRequest {
            program: Some(program(tiers)),
            expected_version: 0,
        })
        .await
        .unwrap();
    let pos = app.key(&merchant, Scope::Pos).await;
    Fixture {
        app,
        clock,
        merchant: merchant.id.0,
        admin_key: merchant.admin_key.clone(),
        pos,
    }
}

impl Fixture {
    /// A purchase of `total` cents made now by the server's (shifted) clock.
    fn purchase(
        &self,
        external_id: &str,
        purchase_id: &str,
        total: i64,
    ) -> pb::RecordPurchaseRequest {
        let mut request = common::purchase(external_id, purchase_id, total);
        request.occurred_at = Some(prost_types::Timestamp {
            seconds: self.clock.now().timestamp(),
            nanos: 0,
        });
        request
    }

    async fn buy(
        &self,
        external_id: &str,
        purchase_id: &str,
        total: i64,
    ) -> pb::RecordPurchaseResponse {
        self.app
            .checkout(&self.pos)
            .await
            .record_purchase(self.purchase(external_id, purchase_id, total))
            .await
            .unwrap()
            .into_inner()
    }

    async fn balance(&self, external_id: &str) -> pb::GetBalanceResponse {
        self.app
            .member(&self.pos)
            .await
            .get_balance(pb::GetBalanceRequest {
                external_id: external_id.into(),
                min_version: 0,
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn standing(&self, external_id: &str) -> pb::CustomerStanding {
        self.balance(external_id)
            .await
            .standing
            .expect("GetBalance shows the standing")
    }

    async fn count(&self, sql: &str, external_id: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .bind(self.merchant)
            .bind(external_id)
            .fetch_one(&self.app.pool)
            .await
            .unwrap()
    }

    /// The customer's status history as (from, to, trigger, reason code), oldest first.
    async fn status_history(&self, external_id: &str) -> Vec<(String, String, String, String)> {
        sqlx::query_as(
            "SELECT h.from_status, h.to_status, h.trigger, h.reason ->> 'code'
               FROM customer_status_history h
               JOIN customers c ON c.merchant_id = h.merchant_id AND c.id = h.customer_id
              WHERE h.merchant_id = $1 AND c.external_id = $2
              ORDER BY h.id",
        )
        .bind(self.merchant)
        .bind(external_id)
        .fetch_all(&self.app.pool)
        .await
        .unwrap()
    }

    async fn tier_history(
        &self,
        external_id: &str,
    ) -> Vec<(Option<String>, Option<String>, String, String)> {
        sqlx::query_as(
            "SELECT h.from_tier, h.to_tier, h.change, h.trigger
               FROM customer_tier_history h
               JOIN customers c ON c.merchant_id = h.merchant_id AND c.id = h.customer_id
              WHERE h.merchant_id = $1 AND c.external_id = $2
              ORDER BY h.id",
        )
        .bind(self.merchant)
        .bind(external_id)
        .fetch_all(&self.app.pool)
        .await
        .unwrap()
    }

    async fn events(&self, kind: &str, external_id: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM events e
               JOIN customers c ON c.merchant_id = e.merchant_id AND c.id = e.customer_id
              WHERE e.merchant_id = $1 AND c.external_id = $2 AND e.kind = $3",
        )
        .bind(self.merchant)
        .bind(external_id)
        .bind(kind)
        .fetch_one(&self.app.pool)
        .await
        .unwrap()
    }
}

fn status(s: &pb::CustomerStanding) -> pb::RepeatStatus {
    pb::RepeatStatus::try_from(s.status).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_climbs_with_purchases_and_get_balance_shows_it_from_the_cache() {
    let f = fixture(None).await;
    f.buy("card-1", "r-1", 1_000).await;
    let first = f.standing("card-1").await;
    assert_eq!(status(&first), pb::RepeatStatus::New);
    assert_eq!(
        first.next_status.unwrap().sentence,
        "1 more purchase to become RETURNING"
    );
    f.clock.advance(2 * DAY);
    f.buy("card-1", "r-2", 1_000).await;
    let second = f.standing("card-1").await;
    assert_eq!(status(&second), pb::RepeatStatus::Returning);
    // 2 of 3 within 30 days: the first leaves the window in a little under 28 days (whole
    // days, rounded down).
    let hint = second.next_status.unwrap();
    assert_eq!(
        hint.sentence,
        "1 more purchase within 27 days to become REGULAR"
    );
    assert_eq!((hint.purchases_needed, hint.within_days), (1, Some(27)));
    f.clock.advance(DAY);
    let receipt = f.buy("card-1", "r-3", 1_000).await;
    let third = f.standing("card-1").await;
    assert_eq!(status(&third), pb::RepeatStatus::Regular);
    assert_eq!(
        f.status_history("card-1").await,
        [
            (
                "new".into(),
                "returning".into(),
                "purchase".into(),
                "repeat_purchases".into()
            ),
            (
                "returning".into(),
                "regular".into(),
                "purchase".into(),
                "purchases_in_window".into()
            ),
        ]
    );
    assert_eq!(f.events("status_changed", "card-1").await, 2);

    // The cache holds the standing with the balance, at the purchase's version ...
    let merchant = loyalty::MerchantId(f.merchant);
    let version = receipt.balance.unwrap().version;
    match f.app.cache.get(merchant, "card-1").await {
        CacheRead::Hit(state) => {
            assert_eq!(state.version, version);
            assert_eq!(state.standing.unwrap().status, RepeatStatus::Regular);
        }
        other => panic!("expected a cached standing, got {other:?}"),
    }
    // ... and a cached read counts the hint's days from the moment it is read: ten days on,
    // with no write in between, the deadline is ten days nearer.
    let before = third.next_status.unwrap();
    f.clock.advance(10 * DAY);
    let later = f.standing("card-1").await.next_status.unwrap();
    assert_eq!(later.deadline, before.deadline);
    assert_eq!(later.within_days.unwrap(), before.within_days.unwrap() - 10);
    // GetCustomer shows the same standing.
    let customer = f
        .app
        .member(&f.pos)
        .await
        .get_customer(pb::GetCustomerRequest {
            external_id: "card-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status(&customer.standing.unwrap()),
        pb::RepeatStatus::Regular
    );
    f.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sweep_makes_quiet_customers_at_risk_then_lapsed_each_once_under_two_sweeps() {
    let f = fixture(None).await;
    let customers: Vec<String> = (0..6).map(|i| format!("card-{i}")).collect();
    for (i, c) in customers.iter().enumerate() {
        f.buy(c, &format!("a-{i}"), 1_000).await;
    }
    f.clock.advance(DAY);
    for (i, c) in customers.iter().enumerate() {
        f.buy(c, &format!("b-{i}"), 1_000).await;
    }
    // Nothing is due yet.
    assert_eq!(
        f.app
            .points
            .standing_sweep(100)
            .await
            .unwrap()
            .status_changes,
        0
    );
    // A 1-day rhythm × 2 is under the 20-day floor: AT_RISK after 20 quiet days.
    f.clock.advance(19 * DAY);
    assert_eq!(
        f.app
            .points
            .standing_sweep(100)
            .await
            .unwrap()
            .status_changes,
        0
    );
    f.clock.advance(DAY + Duration::from_secs(60));
    let sweeps = (0..2).map(|_| {
        let points = f.app.points.clone();
        tokio::spawn(async move { points.standing_sweep(100).await.unwrap() })
    });
    let changed: u64 = join_all(sweeps)
        .await
        .into_iter()
        .map(|r| r.unwrap().status_changes)
        .sum();
    assert_eq!(changed, customers.len() as u64);
    for c in &customers {
        assert_eq!(status(&f.standing(c).await), pb::RepeatStatus::AtRisk);
        let history = f.status_history(c).await;
        assert_eq!(history.len(), 2, "{history:?}");
        assert_eq!(
            history[1],
            (
                "returning".into(),
                "at_risk".into(),
                "sweep".into(),
                "quiet_beyond_rhythm".into()
            )
        );
    }
    // One purchase now would be the third within 30 days.
    let hint = f.standing("card-0").await.next_status.unwrap();
    assert_eq!(hint.sentence, "1 more purchase to become REGULAR again");

    f.clock.advance(40 * DAY);
    let report = f.app.points.standing_sweep(100).await.unwrap();
    assert_eq!(report.status_changes, customers.len() as u64);
    assert_eq!(
        status(&f.standing("card-3").await),
        pb::RepeatStatus::Lapsed
    );
    // A lapsed customer is not looked at again: only a purchase changes them.
    f.clock.advance(100 * DAY);
    assert_eq!(f.app.points.standing_sweep(100).await.unwrap().looked_at, 0);
    // One purchase brings them back.
    f.buy("card-3", "c-3", 1_000).await;
    assert_eq!(
        status(&f.standing("card-3").await),
        pb::RepeatStatus::Returning
    );
    assert_eq!(f.events("status_changed", "card-3").await, 4);
    f.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_return_in_full_recomputes_the_status() {
    let f = fixture(None).await;
    f.buy("card-1", "r-1", 1_000).await;
    f.clock.advance(DAY);
    f.buy("card-1", "r-2", 1_000).await;
    assert_eq!(
        status(&f.standing("card-1").await),
        pb::RepeatStatus::Returning
    );
    f.app
        .checkout(&f.pos)
        .await
        .return_purchase(pb::ReturnPurchaseRequest {
            purchase_id: "r-2".into(),
            return_id: "ret-1".into(),
            lines: vec![],
            amount_minor: 1_000,
        })
        .await
        .unwrap();
    assert_eq!(status(&f.standing("card-1").await), pb::RepeatStatus::New);
    let history = f.status_history("card-1").await;
    assert_eq!(
        history.last().unwrap(),
        &(
            "returning".into(),
            "new".into(),
            "return".into(),
            "first_purchase".into()
        )
    );
    f.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tier_comes_at_once_earns_from_the_next_purchase_and_goes_only_after_the_grace() {
    let f = fixture(Some(tiers())).await;
    let mut checkout = f.app.checkout(&f.pos).await;
    assert_eq!(f.buy("card-1", "r-1", 6_000).await.points_earned, 60);
    let untiered = f.standing("card-1").await;
    assert!(untiered.tier.is_none());
    let progress = untiered.tier_progress.unwrap();
    assert_eq!(
        (progress.next_tier_id.as_str(), progress.needed),
        ("silver", 4_000)
    );

    // The purchase that reaches Silver earns at the old rate; Silver holds from it.
    assert_eq!(f.buy("card-1", "r-2", 5_000).await.points_earned, 50);
    let silver = f.standing("card-1").await;
    let tier = silver.tier.unwrap();
    assert_eq!((tier.id.as_str(), tier.name.as_str()), ("silver", "Silver"));
    assert_eq!(tier.perks, ["Try at home"]);
    assert_eq!(tier.earn_multiplier_bp, 20_000);
    let progress = silver.tier_progress.unwrap();
    assert_eq!(
        (
            progress.next_tier_id.as_str(),
            progress.value,
            progress.needed
        ),
        ("gold", 11_000, 89_000)
    );
    // The next purchase, and its quote, earn at Silver's 2×.
    let quote = checkout
        .quote_purchase(pb::QuotePurchaseRequest {
            external_id: "card-1".into(),
            store_id: "store-1".into(),
            occurred_at: None,
            currency: "EUR".into(),
            total_minor: 1_000,
            lines: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(quote.points, 20);
    assert_eq!(f.buy("card-1", "r-3", 1_000).await.points_earned, 20);

    // Spending points never costs the tier (it counts spend, not the balance).
    checkout
        .redeem_points(pb::RedeemPointsRequest {
            external_id: "card-1".into(),
            redemption_id: "x-1".into(),
            points: 100,
            purchase_id: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(f.standing("card-1").await.tier.unwrap().id, "silver");

    // A return takes the qualification away, but only starts the grace.
    checkout
        .return_purchase(pb::ReturnPurchaseRequest {
            purchase_id: "r-2".into(),
            return_id: "ret-1".into(),
            lines: vec![],
            amount_minor: 5_000,
        })
        .await
        .unwrap();
    let in_grace = f.standing("card-1").await.tier.unwrap();
    assert_eq!(in_grace.id, "silver");
    assert!(in_grace.downgrade_at.is_some());
    f.clock.advance(DAY);
    f.app.points.standing_sweep(100).await.unwrap();
    assert_eq!(f.standing("card-1").await.tier.unwrap().id, "silver");

    // Three days before the downgrade: one warning, however often the sweep looks.
    f.clock.advance(6 * DAY + Duration::from_secs(60));
    let report = f.app.points.standing_sweep(100).await.unwrap();
    assert_eq!(report.warnings, 1);
    f.app.points.standing_sweep(100).await.unwrap();
    f.clock.advance(DAY);
    f.app.points.standing_sweep(100).await.unwrap();
    assert_eq!(f.events("tier_downgrade_warning", "card-1").await, 1);
    assert_eq!(f.standing("card-1").await.tier.unwrap().id, "silver");

    // After the grace, the sweep downgrades.
    f.clock.advance(3 * DAY);
    let report = f.app.points.standing_sweep(100).await.unwrap();
    assert_eq!(report.tier_changes, 1);
    assert!(f.standing("card-1").await.tier.is_none());
    assert_eq!(
        f.tier_history("card-1").await,
        [
            (
                None,
                Some("silver".into()),
                "upgraded".into(),
                "purchase".into()
            ),
            (
                Some("silver".into()),
                None,
                "downgraded".into(),
                "sweep".into()
            ),
        ]
    );
    assert_eq!(f.events("tier_changed", "card-1").await, 2);
    // And the next purchase earns at 1× again.
    assert_eq!(f.buy("card-1", "r-4", 1_000).await.points_earned, 10);
    f.app.assert_ledger_invariant().await;
    f.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_purchases_of_one_customer_end_regular_with_one_history_row_per_change() {
    let f = fixture(Some(tiers())).await;
    let pos = f.pos.clone();
    let channel_app = &f.app;
    let clients: Vec<_> = join_all((0..4).map(|_| channel_app.checkout(&pos))).await;
    // Known first (the hot path), then ten purchases at once.
    f.buy("card-1", "r-0", 1_000).await;
    let calls = (1..=10).map(|i| {
        let mut client = clients[i % clients.len()].clone();
        let request = f.purchase("card-1", &format!("r-{i}"), 1_000);
        tokio::spawn(async move {
            client
                .record_purchase(request)
                .await
                .map(|r| r.into_inner())
        })
    });
    let receipts: Vec<_> = join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    assert_eq!(receipts.len(), 10);
    let counts: std::collections::HashSet<i64> =
        receipts.iter().map(|r| r.purchase_count).collect();
    assert_eq!(counts.len(), 10, "each purchase saw its own count");
    let standing = f.standing("card-1").await;
    assert_eq!(status(&standing), pb::RepeatStatus::Regular);
    // 11 purchases of 10.00: Silver (10,000 cents), reached once.
    assert_eq!(standing.tier.unwrap().id, "silver");
    let history = f.status_history("card-1").await;
    let changes: Vec<(&str, &str)> = history
        .iter()
        .map(|(from, to, _, _)| (from.as_str(), to.as_str()))
        .collect();
    assert_eq!(changes, [("new", "returning"), ("returning", "regular")]);
    assert_eq!(f.tier_history("card-1").await.len(), 1);
    assert_eq!(f.events("status_changed", "card-1").await, 2);
    assert_eq!(f.events("tier_changed", "card-1").await, 1);
    assert_eq!(
        f.count(
            "SELECT a.purchase_count FROM accounts a JOIN customers c
                ON c.merchant_id = a.merchant_id AND c.id = a.customer_id
             WHERE a.merchant_id = $1 AND c.external_id = $2",
            "card-1"
        )
        .await,
        11
    );
    f.app.assert_ledger_invariant().await;
    f.app.stop().await;
}

#[tokio::test]
async fn bad_status_and_tier_settings_are_refused_naming_the_field() {
    let f = fixture(None).await;
    let mut admin = f.app.program(&f.admin_key).await;
    let mut bad = program(Some(tiers()));
    bad.status.as_mut().unwrap().regular_purchases = 1;
    let levels = &mut bad.tiers.as_mut().unwrap().levels;
    levels[1].threshold = 5;
    levels[1].id = "silver".into();
    let refused = admin
        .update_program(pb::UpdateProgramRequest {
            program: Some(bad),
            expected_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&refused),
        [
            "program.status.regular_purchases",
            "program.tiers.levels[1].id",
            "program.tiers.levels[1].threshold",
        ]
    );
    // Good settings come back as stored.
    admin
        .update_program(pb::UpdateProgramRequest {
            program: Some(program(Some(tiers()))),
            expected_version: 0,
        })
        .await
        .unwrap();
    let stored = admin
        .get_program(pb::GetProgramRequest {})
        .await
        .unwrap()
        .into_inner()
        .program
        .unwrap();
    assert_eq!(stored.status, Some(thresholds()));
    assert_eq!(stored.tiers, Some(tiers()));
    f.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tier_up_gift_is_granted_once_by_the_purchase_that_reaches_the_tier() {
    let f = fixture(Some(tiers())).await;
    let mut admin = f.app.program(&f.admin_key).await;
    admin
        .create_gift(pb::CreateGiftRequest {
            gift: Some(pb::Gift {
                gift_id: "welcome-silver".into(),
                name: "Silver welcome".into(),
                description: "A tote bag".into(),
                kind: pb::GiftKind::Item as i32,
                validity_days: 30,
                active: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    // A tier_id only with TIER_UP, and TIER_UP needs one.
    let refused = admin
        .put_gift_rule(pb::PutGiftRuleRequest {
            rule: Some(pb::GiftRule {
                rule_id: "silver-up".into(),
                trigger: pb::GiftTrigger::TierUp as i32,
                gift_id: "welcome-silver".into(),
                active: true,
                ..Default::default()
            }),
            expected_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&refused), ["rule.tier_id"]);
    let rule = admin
        .put_gift_rule(pb::PutGiftRuleRequest {
            rule: Some(pb::GiftRule {
                rule_id: "silver-up".into(),
                trigger: pb::GiftTrigger::TierUp as i32,
                tier_id: "silver".into(),
                gift_id: "welcome-silver".into(),
                active: true,
                ..Default::default()
            }),
            expected_version: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .rule
        .unwrap();
    assert_eq!(rule.tier_id, "silver");

    assert!(f.buy("card-1", "r-1", 6_000).await.gifts_issued.is_empty());
    let reaching = f.purchase("card-1", "r-2", 5_000);
    let mut checkout = f.app.checkout(&f.pos).await;
    let reached = checkout
        .record_purchase(reaching.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reached.gifts_issued.len(), 1);
    assert_eq!(reached.gifts_issued[0].gift_id, "welcome-silver");
    // Holding the tier grants nothing more; another customer reaching it gets their own.
    assert!(f.buy("card-1", "r-3", 5_000).await.gifts_issued.is_empty());
    assert_eq!(f.buy("card-2", "s-1", 12_000).await.gifts_issued.len(), 1);
    // A replay of the reaching purchase answers with its gift, granting nothing new.
    let replayed = checkout
        .record_purchase(reaching)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.gifts_issued, reached.gifts_issued);
    assert_eq!(
        f.count(
            "SELECT count(*) FROM gift_grants g JOIN customers c
                ON c.merchant_id = g.merchant_id AND c.id = g.customer_id
             WHERE g.merchant_id = $1 AND c.external_id = $2",
            "card-1"
        )
        .await,
        1
    );
    f.app.stop().await;
}

/// Checkout reads a customer's standing facts from the index alone: every column of the
/// facts is in `purchases_customer_facts_idx`, so a regular's purchases cost an index page or
/// two rather than a heap page each. A column added to the read but not to the index makes
/// this an Index Scan, and this test fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_checkout_context_reads_the_purchases_from_the_index_only() {
    let f = fixture(Some(tiers())).await;
    for i in 0..5 {
        f.buy("card-1", &format!("p-{i}"), 2_000).await;
    }
    sqlx::query("VACUUM (ANALYZE) purchases")
        .execute(&f.app.pool)
        .await
        .unwrap();
    let mut tx = f.app.pool.begin().await.unwrap();
    // The test's table is tiny: a sequential scan would win on cost alone.
    for setting in ["enable_seqscan", "enable_bitmapscan"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL {setting} = off")))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    let explain = format!(
        "EXPLAIN (FORMAT JSON) {}",
        loyalty::points::sql::CHECKOUT_CONTEXT
    );
    let plan: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(explain))
        .bind(f.merchant)
        .bind("card-1")
        .bind(chrono::Utc::now())
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let mut purchase_scans = Vec::new();
    let mut stack = vec![&plan];
    while let Some(node) = stack.pop() {
        match node {
            serde_json::Value::Array(items) => stack.extend(items),
            serde_json::Value::Object(fields) => {
                if fields.get("Relation Name").and_then(|r| r.as_str()) == Some("purchases") {
                    purchase_scans.push((
                        fields["Node Type"].as_str().unwrap().to_string(),
                        fields
                            .get("Index Name")
                            .and_then(|i| i.as_str())
                            .map(String::from),
                    ));
                }
                stack.extend(fields.values());
            }
            _ => {}
        }
    }
    assert!(!purchase_scans.is_empty(), "no read of purchases in {plan}");
    for (node, index) in &purchase_scans {
        assert_eq!(node, "Index Only Scan", "{purchase_scans:?}");
        assert_eq!(index.as_deref(), Some("purchases_customer_facts_idx"));
    }
    tx.rollback().await.unwrap();
    f.app.stop().await;
}

/// A purchase moves the sweep's next look only earlier (so that the accounts update stays
/// HOT): a later one is left for the sweep, whose early look changes nothing a read shows,
/// keeps the version, and sets the exact next look; the time-driven change still comes on
/// time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purchase_only_moves_the_next_look_earlier_and_an_early_look_changes_nothing() {
    let f = fixture(None).await;
    let review_at = || async {
        let at: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
            "SELECT a.review_at FROM accounts a
               JOIN customers c ON c.merchant_id = a.merchant_id AND c.id = a.customer_id
              WHERE a.merchant_id = $1 AND c.external_id = $2",
        )
        .bind(f.merchant)
        .bind("card-1")
        .fetch_one(&f.app.pool)
        .await
        .unwrap();
        at.expect("a customer with purchases has a next look")
    };
    f.buy("card-1", "a", 1_000).await;
    let first = review_at().await;
    // Ten days later the second purchase's own next look lies beyond the first one's.
    f.clock.advance(10 * DAY);
    f.buy("card-1", "b", 1_000).await;
    assert_eq!(review_at().await, first, "the look moved later");
    let before = f.standing("card-1").await;
    let version = || async { f.balance("card-1").await.balance.unwrap().version };
    let version_before = version().await;

    // The early look: nothing shown changes, the version stays, the look moves on.
    let now = f.clock.now();
    f.clock
        .advance((first - now).to_std().unwrap() + Duration::from_secs(1));
    let report = f.app.points.standing_sweep(100).await.unwrap();
    assert_eq!((report.looked_at, report.status_changes), (1, 0));
    assert_eq!(version().await, version_before);
    assert_eq!(status(&f.standing("card-1").await), status(&before));
    let next = review_at().await;
    assert!(next > f.clock.now(), "next look {next} not ahead");
    // Nothing more until then; then the quiet customer's change comes.
    assert_eq!(f.app.points.standing_sweep(100).await.unwrap().looked_at, 0);
    let now = f.clock.now();
    f.clock
        .advance((next - now).to_std().unwrap() + Duration::from_secs(1));
    let report = f.app.points.standing_sweep(100).await.unwrap();
    assert_eq!(report.looked_at, 1);
    assert_eq!(
        status(&f.standing("card-1").await),
        pb::RepeatStatus::AtRisk
    );
    f.app.stop().await;
}
