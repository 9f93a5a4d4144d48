//! Every validation rule through the real gRPC client: INVALID_ARGUMENT naming the field, and
//! nothing written.

use loyalty_testkit as common;

use common::{TestApp, purchase, timestamp_in, violated_fields};
use loyalty::Scope;
use loyalty::pb;

fn line(sku: &str, amount_minor: i64) -> pb::PurchaseLine {
    pb::PurchaseLine {
        sku: sku.into(),
        category: "coffee".into(),
        quantity: 1,
        amount_minor,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_purchases_name_the_field_and_write_nothing() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    checkout
        .record_purchase(purchase("card-1", "r-0", 1000))
        .await
        .unwrap();
    let counts = app.row_counts().await;

    let base = || purchase("card-1", "r-1", 1000);
    let with = |change: &dyn Fn(&mut pb::RecordPurchaseRequest)| {
        let mut request = base();
        change(&mut request);
        request
    };
    let cases: Vec<(&str, pb::RecordPurchaseRequest)> = vec![
        ("external_id", with(&|r| r.external_id.clear())),
        ("external_id", with(&|r| r.external_id = "x".repeat(129))),
        ("external_id", with(&|r| r.external_id = "nul\0byte".into())),
        ("external_id", with(&|r| r.external_id = " padded".into())),
        ("purchase_id", with(&|r| r.purchase_id.clear())),
        ("purchase_id", with(&|r| r.purchase_id = "p".repeat(200))),
        ("store_id", with(&|r| r.store_id.clear())),
        ("occurred_at", with(&|r| r.occurred_at = None)),
        (
            "occurred_at",
            with(&|r| r.occurred_at = Some(timestamp_in(3600))),
        ),
        (
            "occurred_at",
            with(&|r| {
                r.occurred_at = Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: 0,
                })
            }),
        ),
        (
            "occurred_at",
            with(&|r| {
                r.occurred_at = Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: -1,
                })
            }),
        ),
        (
            "occurred_at",
            with(&|r| {
                r.occurred_at = Some(prost_types::Timestamp {
                    seconds: i64::MAX,
                    nanos: 0,
                })
            }),
        ),
        ("currency", with(&|r| r.currency.clear())),
        ("currency", with(&|r| r.currency = "EURO".into())),
        ("currency", with(&|r| r.currency = "QQQ".into())),
        ("total_minor", with(&|r| r.total_minor = -1)),
        ("total_minor", with(&|r| r.total_minor = 1001)),
        (
            "total_minor",
            with(&|r| {
                r.total_minor = i64::MAX;
                r.lines.clear();
            }),
        ),
        ("lines[0].sku", with(&|r| r.lines[0].sku.clear())),
        (
            "lines[1].category",
            with(&|r| r.lines[1].category = "c".repeat(65)),
        ),
        ("lines[0].quantity", with(&|r| r.lines[0].quantity = 0)),
        (
            "lines[1].amount_minor",
            with(&|r| r.lines[1].amount_minor = -500),
        ),
        (
            "lines[0].amount_minor",
            with(&|r| {
                r.lines = vec![line("a", i64::MAX), line("b", i64::MAX)];
                r.total_minor = -2;
            }),
        ),
        (
            "lines",
            with(&|r| {
                r.lines = vec![line("a", 1); 501];
                r.total_minor = 501;
            }),
        ),
    ];
    for (field, request) in cases {
        let status = checkout.record_purchase(request.clone()).await.unwrap_err();
        let fields = violated_fields(&status);
        assert!(
            fields.iter().any(|f| f == field),
            "expected {field} in {fields:?} for {request:?}"
        );
        if fields.len() == 1 {
            assert!(
                status.message().contains(field),
                "message {:?} should name {field}",
                status.message()
            );
        }
    }
    assert_eq!(app.row_counts().await, counts);

    // Several mistakes at once are all reported.
    let status = checkout
        .record_purchase(with(&|r| {
            r.external_id.clear();
            r.currency = "??".into();
            r.lines[0].quantity = 0;
        }))
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        ["external_id", "currency", "lines[0].quantity"]
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_enrolments_name_the_field_and_write_nothing() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut member = app.member(&pos).await;
    let counts = app.row_counts().await;
    let base = || pb::EnrollCustomerRequest {
        external_id: "card-1".into(),
        ..Default::default()
    };
    let with = |change: &dyn Fn(&mut pb::EnrollCustomerRequest)| {
        let mut request = base();
        change(&mut request);
        request
    };
    let birthday = |month, day, year| Some(pb::Birthday { month, day, year });
    let today = chrono::Utc::now().date_naive();
    let tomorrow = today.succ_opt().unwrap();
    use chrono::Datelike;
    let future_field = if tomorrow.year() > today.year() {
        "birthday.year"
    } else {
        "birthday"
    };
    let cases = vec![
        ("external_id", with(&|r| r.external_id.clear())),
        ("display_name", with(&|r| r.display_name = "n".repeat(201))),
        (
            "display_name",
            with(&|r| r.display_name = "bell\u{7}".into()),
        ),
        (
            "birthday.month",
            with(&|r| r.birthday = birthday(13, 1, None)),
        ),
        (
            "birthday.day",
            with(&|r| r.birthday = birthday(2, 30, None)),
        ),
        (
            "birthday.day",
            with(&|r| r.birthday = birthday(2, 29, Some(2023))),
        ),
        ("birthday.day", with(&|r| r.birthday = birthday(6, 0, None))),
        (
            "birthday.year",
            with(&|r| r.birthday = birthday(1, 1, Some(1800))),
        ),
        (
            future_field,
            with(&|r| {
                r.birthday = birthday(
                    tomorrow.month(),
                    tomorrow.day(),
                    Some(tomorrow.year() as u32),
                )
            }),
        ),
        (
            "time_zone",
            with(&|r| r.time_zone = "Atlantis/Capital".into()),
        ),
        ("email", with(&|r| r.email = "not-an-address".into())),
        ("phone", with(&|r| r.phone = "0151 1234567".into())),
    ];
    for (field, request) in cases {
        let status = member.enroll_customer(request).await.unwrap_err();
        assert_eq!(violated_fields(&status), [field]);
    }
    assert_eq!(app.row_counts().await, counts);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reads_name_the_field() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut member = app.member(&pos).await;
    for external_id in [String::new(), "x".repeat(129), "tab\tid".to_string()] {
        let status = member
            .get_balance(pb::GetBalanceRequest {
                external_id: external_id.clone(),
                min_version: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["external_id"]);
        let status = member
            .get_customer(pb::GetCustomerRequest {
                external_id: external_id.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["external_id"]);
        let status = member
            .list_ledger(pb::ListLedgerRequest {
                external_id,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["external_id"]);
    }
    let status = member
        .get_balance(pb::GetBalanceRequest {
            external_id: "card-1".into(),
            min_version: -1,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["min_version"]);

    let mut checkout = app.checkout(&pos).await;
    let status = checkout
        .quote_purchase(pb::QuotePurchaseRequest {
            external_id: " x".into(),
            currency: "EUR".into(),
            total_minor: -5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["external_id", "total_minor"]);
    app.stop().await;
}
