//! ProgramService through the real gRPC client, and the program's effect on checkout.

use loyalty_testkit as common;

use std::time::Duration;

use common::{Options, TestApp, purchase, timestamp_in};
use loyalty::Scope;
use loyalty::pb;
use tonic::Code;

fn rules() -> pb::Program {
    pb::Program {
        currency: "EUR".into(),
        earn_rate: Some(pb::EarnRate {
            points: 2,
            currency_units: 1,
        }),
        minimum_purchase_minor: 500,
        category_multipliers: vec![pb::CategoryMultiplier {
            category: "coffee".into(),
            multiplier_bp: 15_000,
        }],
        promotions: vec![pb::Promotion {
            id: "double-bakery".into(),
            multiplier_bp: 20_000,
            starts_at: Some(timestamp_in(-3600)),
            ends_at: Some(timestamp_in(3600)),
            categories: vec!["bakery".into()],
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_merchant_starts_with_one_point_per_unit() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant_in("JPY").await;
    let program = app
        .program(&merchant.admin_key)
        .await
        .get_program(pb::GetProgramRequest {})
        .await
        .unwrap()
        .into_inner()
        .program
        .unwrap();
    assert_eq!(program.currency, "JPY");
    assert_eq!(
        program.earn_rate,
        Some(pb::EarnRate {
            points: 1,
            currency_units: 1
        })
    );
    assert_eq!(program.minimum_purchase_minor, 0);
    assert!(program.category_multipliers.is_empty() && program.promotions.is_empty());
    assert_eq!(program.version, 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_updated_program_drives_quotes_and_purchases() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let mut program = app.program(&merchant.admin_key).await;
    let updated = program
        .update_program(pb::UpdateProgramRequest {
            program: Some(rules()),
            expected_version: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .program
        .unwrap();
    assert_eq!(updated.version, 2);
    assert_eq!(
        updated.earn_rate,
        Some(pb::EarnRate {
            points: 2,
            currency_units: 1
        })
    );
    assert_eq!(updated.promotions[0].id, "double-bakery");
    let read = program
        .get_program(pb::GetProgramRequest {})
        .await
        .unwrap()
        .into_inner()
        .program
        .unwrap();
    assert_eq!(read, updated);

    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    // 10.00 coffee at 1.5x and 10.00 bakery doubled, at 2 points per euro: 30 + 40.
    let basket = purchase("card-1", "r-1", 2000);
    let quote = checkout
        .quote_purchase(pb::QuotePurchaseRequest {
            currency: "EUR".into(),
            total_minor: 2000,
            lines: basket.lines.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(quote.points, 70);
    assert_eq!(quote.applied_promotion_ids, ["double-bakery"]);
    let receipt = checkout.record_purchase(basket).await.unwrap().into_inner();
    assert_eq!(receipt.points_earned, 70);

    // Below the minimum purchase: counted as a purchase, earns nothing.
    let small = checkout
        .record_purchase(purchase("card-1", "r-2", 499))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(small.points_earned, 0);
    assert_eq!(small.purchase_count, 2);
    assert_eq!(small.balance.unwrap().available, 70);
    let quote = checkout
        .quote_purchase(pb::QuotePurchaseRequest {
            currency: "EUR".into(),
            total_minor: 499,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!quote.eligible);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_expected_version_is_refused_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let mut program = app.program(&merchant.admin_key).await;
    program
        .update_program(pb::UpdateProgramRequest {
            program: Some(rules()),
            expected_version: 1,
        })
        .await
        .unwrap();
    let before = app.row_counts().await;
    let mut other = rules();
    other.minimum_purchase_minor = 0;
    let status = program
        .update_program(pb::UpdateProgramRequest {
            program: Some(other),
            expected_version: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(app.row_counts().await, before);
    let audit: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'program.update'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(audit, 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_currency_can_change_only_before_the_first_purchase() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let mut program = app.program(&merchant.admin_key).await;
    let mut usd = rules();
    usd.currency = "USD".into();
    program
        .update_program(pb::UpdateProgramRequest {
            program: Some(usd),
            expected_version: 0,
        })
        .await
        .unwrap();

    let pos = app.key(&merchant, Scope::Pos).await;
    let mut request = purchase("card-1", "r-1", 1000);
    request.currency = "USD".into();
    app.checkout(&pos)
        .await
        .record_purchase(request)
        .await
        .unwrap();

    let status = program
        .update_program(pb::UpdateProgramRequest {
            program: Some(rules()),
            expected_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("USD"), "{}", status.message());
    app.stop().await;
}

/// The outside run's worry: a currency change racing a merchant's first purchase could commit
/// both, leaving a purchase in a currency the program no longer has. The test plays the
/// currency change with UpdateProgram's own steps (lock the program row, find no purchase,
/// change the currency), and sends the first purchase between the check and the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_currency_change_and_a_first_purchase_never_both_commit() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    // The till knows the customer already (enrolled, no purchase yet).
    app.member(&pos)
        .await
        .enroll_customer(common::cluster::profile("card-1"))
        .await
        .unwrap();

    let mut change = app.pool.begin().await.unwrap();
    sqlx::query("SELECT currency FROM programs WHERE merchant_id = $1 FOR UPDATE")
        .bind(merchant.id.0)
        .execute(&mut *change)
        .await
        .unwrap();
    let purchased: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM purchases WHERE merchant_id = $1)")
            .bind(merchant.id.0)
            .fetch_one(&mut *change)
            .await
            .unwrap();
    assert!(!purchased);

    let till = tokio::spawn(async move {
        let mut request = tonic::Request::new(purchase("card-1", "r-1", 1000));
        request.set_timeout(Duration::from_secs(5));
        checkout.record_purchase(request).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::query(
        "UPDATE programs SET currency = 'USD', version = version + 1 WHERE merchant_id = $1",
    )
    .bind(merchant.id.0)
    .execute(&mut *change)
    .await
    .unwrap();
    change.commit().await.unwrap();

    let answer = till.await.unwrap();
    let stray: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM purchases p JOIN programs g ON g.merchant_id = p.merchant_id
          WHERE p.merchant_id = $1 AND p.currency <> g.currency",
    )
    .bind(merchant.id.0)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        stray, 0,
        "a purchase in a currency the program no longer has: {answer:?}"
    );
    let refused = answer.expect_err("the purchase in the old currency is refused");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert_eq!(common::violated_fields(&refused), ["currency"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_program_names_every_bad_field_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let mut program = app.program(&merchant.admin_key).await;
    let before = app.row_counts().await;
    let mut bad = rules();
    bad.currency = "XYZ".into();
    bad.earn_rate = Some(pb::EarnRate {
        points: 1,
        currency_units: 0,
    });
    bad.category_multipliers.push(pb::CategoryMultiplier {
        category: "coffee".into(),
        multiplier_bp: 1,
    });
    bad.promotions[0].ends_at = Some(timestamp_in(-7200));
    let status = program
        .update_program(pb::UpdateProgramRequest {
            program: Some(bad),
            expected_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        common::violated_fields(&status),
        [
            "program.currency",
            "program.earn_rate.currency_units",
            "program.category_multipliers[1].category",
            "program.promotions[0].ends_at",
        ]
    );
    let status = program
        .update_program(pb::UpdateProgramRequest {
            program: None,
            expected_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(common::violated_fields(&status), ["program"]);
    let mut bad_time = rules();
    bad_time.promotions[0].starts_at = Some(prost_types::Timestamp {
        seconds: 0,
        nanos: -5,
    });
    let status = program
        .update_program(pb::UpdateProgramRequest {
            program: Some(bad_time),
            expected_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        common::violated_fields(&status),
        ["program.promotions[0].starts_at"]
    );
    assert_eq!(app.row_counts().await, before);
    app.stop().await;
}

/// Two replicas on one database: a program change made through one is used by the very next
/// purchase on the other (checkout compares the program version on every purchase).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_change_reaches_every_replica_at_once() {
    let first = TestApp::spawn().await;
    let second = TestApp::spawn_with(Options {
        database_url: Some(first.db.url.clone()),
        ..Options::default()
    })
    .await;
    let merchant = first.merchant().await;
    let pos = first.key(&merchant, Scope::Pos).await;
    let mut checkout = second.checkout(&pos).await;
    let before = checkout
        .record_purchase(purchase("card-1", "r-1", 1000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.points_earned, 10);

    let mut program = first.program(&merchant.admin_key).await;
    let mut tenfold = rules();
    tenfold.earn_rate = Some(pb::EarnRate {
        points: 10,
        currency_units: 1,
    });
    tenfold.category_multipliers.clear();
    tenfold.promotions.clear();
    program
        .update_program(pb::UpdateProgramRequest {
            program: Some(tenfold),
            expected_version: 0,
        })
        .await
        .unwrap();

    let after = checkout
        .record_purchase(purchase("card-1", "r-2", 1000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.points_earned, 100);
    second.stop().await;
    first.stop().await;
}

/// A till's retry gets its original answer even after the program changed so that the same
/// basket would now be refused (here: it would earn more points than a balance can hold).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_gets_its_original_answer_after_the_program_changed() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    let largest = purchase("card-1", "r-1", 100_000_000_000_000);
    let first = checkout
        .record_purchase(largest.clone())
        .await
        .unwrap()
        .into_inner();

    let mut generous = rules();
    generous.earn_rate = Some(pb::EarnRate {
        points: 1_000_000,
        currency_units: 1,
    });
    generous.category_multipliers[0].multiplier_bp = 1_000_000;
    app.program(&merchant.admin_key)
        .await
        .update_program(pb::UpdateProgramRequest {
            program: Some(generous),
            expected_version: 0,
        })
        .await
        .unwrap();
    let mut new_receipt = largest.clone();
    new_receipt.purchase_id = "r-2".into();
    let refused = checkout.record_purchase(new_receipt).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    let before = app.row_counts().await;
    let replayed = checkout
        .record_purchase(largest)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed, first);
    assert_eq!(app.row_counts().await, before);
    app.stop().await;
}

/// A program whose only promotion is a 100x day long past, with the rules of `old_receipts`.
fn with_an_old_100x_day(
    days_ago: i64,
    max_days: u32,
    old_receipts: pb::OldReceiptPolicy,
) -> pb::Program {
    pb::Program {
        currency: "EUR".into(),
        earn_rate: Some(pb::EarnRate {
            points: 1,
            currency_units: 1,
        }),
        promotions: vec![pb::Promotion {
            id: "anniversary-100x".into(),
            multiplier_bp: 1_000_000,
            starts_at: Some(timestamp_in(-days_ago * 86_400 - 3600)),
            ends_at: Some(timestamp_in(-days_ago * 86_400 + 3600)),
            categories: vec![],
        }],
        max_receipt_age_days: max_days,
        old_receipts: old_receipts as i32,
        ..Default::default()
    }
}

fn dated(purchase_id: &str, days_ago: i64) -> pb::RecordPurchaseRequest {
    pb::RecordPurchaseRequest {
        occurred_at: Some(timestamp_in(-days_ago * 86_400)),
        ..purchase("card-1", purchase_id, 1000)
    }
}

/// A till cannot date a receipt back into a past promotion: by default a receipt more than
/// 30 days old is refused and writes nothing; a program may instead let it earn under today's
/// rules, where the old day's promotion does not apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backdated_receipts_are_refused_or_earn_under_todays_rules() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let mut program = app.program(&merchant.admin_key).await;
    let defaults = program
        .get_program(pb::GetProgramRequest {})
        .await
        .unwrap()
        .into_inner()
        .program
        .unwrap();
    assert_eq!(defaults.max_receipt_age_days, 30);
    assert_eq!(defaults.old_receipts, pb::OldReceiptPolicy::Refuse as i32);

    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    // The default program: 31 days back is refused, naming occurred_at, and writes nothing.
    let before = app.row_counts().await;
    let refused = checkout
        .record_purchase(dated("r-old", 31))
        .await
        .unwrap_err();
    assert_eq!(common::violated_fields(&refused), ["occurred_at"]);
    assert!(
        refused.message().contains("30 days"),
        "{}",
        refused.message()
    );
    assert_eq!(app.row_counts().await, before);
    let quote = checkout
        .quote_purchase(pb::QuotePurchaseRequest {
            currency: "EUR".into(),
            total_minor: 1000,
            occurred_at: Some(timestamp_in(-31 * 86_400)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(common::violated_fields(&quote), ["occurred_at"]);

    // Within the allowed age, the old day's promotion applies: 10 EUR at 100x.
    program
        .update_program(pb::UpdateProgramRequest {
            program: Some(with_an_old_100x_day(40, 60, pb::OldReceiptPolicy::Refuse)),
            expected_version: 0,
        })
        .await
        .unwrap();
    let r40 = dated("r-40", 40);
    let within = checkout
        .record_purchase(r40.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(within.points_earned, 1000);

    // Once the program allows only 30 days, a retry of that very receipt still gets its
    // original answer (rule 3), while a new one as old is refused.
    program
        .update_program(pb::UpdateProgramRequest {
            program: Some(with_an_old_100x_day(40, 30, pb::OldReceiptPolicy::Refuse)),
            expected_version: 0,
        })
        .await
        .unwrap();
    let retry = checkout.record_purchase(r40).await.unwrap().into_inner();
    assert_eq!(retry, within);
    let refused = checkout
        .record_purchase(dated("r-40-new", 40))
        .await
        .unwrap_err();
    assert_eq!(common::violated_fields(&refused), ["occurred_at"]);

    // Older than allowed, with "earn under today's rules": 10 points, not 1,000.
    program
        .update_program(pb::UpdateProgramRequest {
            program: Some(with_an_old_100x_day(
                40,
                30,
                pb::OldReceiptPolicy::EarnAtTodaysRules,
            )),
            expected_version: 0,
        })
        .await
        .unwrap();
    let today = checkout
        .record_purchase(dated("r-40-again", 40))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(today.points_earned, 10);

    // An age beyond ten years or an unknown policy is refused, naming the field.
    for (bad, field) in [
        (
            with_an_old_100x_day(40, 3651, pb::OldReceiptPolicy::Refuse),
            "program.max_receipt_age_days",
        ),
        (
            pb::Program {
                old_receipts: 7,
                ..with_an_old_100x_day(40, 30, pb::OldReceiptPolicy::Refuse)
            },
            "program.old_receipts",
        ),
    ] {
        let status = program
            .update_program(pb::UpdateProgramRequest {
                program: Some(bad),
                expected_version: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(common::violated_fields(&status), [field]);
    }
    app.stop().await;
}
