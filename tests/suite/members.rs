//! MemberService through the real gRPC client: enrolment, profiles, balances and ledger paging.

use loyalty_testkit as common;

use common::{TestApp, purchase};
use loyalty::Scope;
use loyalty::pb;
use tonic::Code;

fn enrollment(external_id: &str) -> pb::EnrollCustomerRequest {
    pb::EnrollCustomerRequest {
        external_id: external_id.into(),
        display_name: "Ada Lovelace".into(),
        birthday: Some(pb::Birthday {
            month: 12,
            day: 10,
            year: Some(1990),
        }),
        time_zone: "Europe/London".into(),
        email: "ada@example.com".into(),
        phone: "+441234567890".into(),
        marketing_consent: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_creates_then_replaces_the_profile() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut member = app.member(&pos).await;

    let created = member
        .enroll_customer(enrollment("card-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(created.created);
    let customer = created.customer.unwrap();
    assert_eq!(customer.display_name, "Ada Lovelace");
    assert_eq!(
        customer.birthday,
        Some(pb::Birthday {
            month: 12,
            day: 10,
            year: Some(1990)
        })
    );
    assert_eq!(customer.time_zone, "Europe/London");
    assert_eq!(customer.email, "ada@example.com");
    assert_eq!(customer.phone, "+441234567890");
    assert!(customer.marketing_consent);

    let mut update = enrollment("card-1");
    update.display_name = "Ada King".into();
    update.birthday = Some(pb::Birthday {
        month: 2,
        day: 29,
        year: None,
    });
    update.email = String::new();
    update.marketing_consent = false;
    let updated = member.enroll_customer(update).await.unwrap().into_inner();
    assert!(!updated.created);
    let updated = updated.customer.unwrap();
    assert_eq!(updated.display_name, "Ada King");
    assert_eq!(
        updated.birthday,
        Some(pb::Birthday {
            month: 2,
            day: 29,
            year: None
        })
    );
    assert_eq!(updated.email, "");
    assert!(!updated.marketing_consent);
    assert_eq!(updated.enrolled_at, customer.enrolled_at);

    let read = member
        .get_customer(pb::GetCustomerRequest {
            external_id: "card-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap();
    assert_eq!(read, updated);

    // An enrolled customer without purchases has an empty balance, not NOT_FOUND.
    let balance = member
        .get_balance(pb::GetBalanceRequest {
            external_id: "card-1".into(),
            min_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(balance.balance.unwrap(), pb::Balance::default());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_enrolled_by_a_purchase_keeps_their_points_when_the_profile_is_added() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    app.checkout(&pos)
        .await
        .record_purchase(purchase("card-1", "r-1", 1500))
        .await
        .unwrap();
    let mut member = app.member(&pos).await;
    let enrolled = member
        .enroll_customer(enrollment("card-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!enrolled.created);
    let balance = member
        .get_balance(pb::GetBalanceRequest {
            external_id: "card-1".into(),
            min_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(balance.balance.unwrap().available, 15);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_customers_are_not_found() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let app_key = app.key(&merchant, Scope::App).await;
    let mut member = app.member(&app_key).await;
    let status = member
        .get_customer(pb::GetCustomerRequest {
            external_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = member
        .get_balance(pb::GetBalanceRequest {
            external_id: "nobody".into(),
            min_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = member
        .list_ledger(pb::ListLedgerRequest {
            external_id: "nobody".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_pages_newest_first_with_opaque_tokens() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    for i in 1..=7 {
        checkout
            .record_purchase(purchase("card-1", &format!("r-{i}"), 100 * i))
            .await
            .unwrap();
    }
    // Another customer's entries never show up.
    checkout
        .record_purchase(purchase("card-2", "other", 100))
        .await
        .unwrap();
    let mut member = app.member(&app.key(&merchant, Scope::App).await).await;

    let mut references = Vec::new();
    let mut token = String::new();
    let mut pages = Vec::new();
    loop {
        let page = member
            .list_ledger(pb::ListLedgerRequest {
                external_id: "card-1".into(),
                page_size: 3,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        pages.push(page.entries.len());
        for entry in &page.entries {
            assert_eq!(entry.kind, pb::LedgerEntryKind::Earn as i32);
            references.push((entry.reference.clone(), entry.points));
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, [3, 3, 1]);
    let expected: Vec<(String, i64)> = (1..=7).rev().map(|i| (format!("r-{i}"), i)).collect();
    assert_eq!(references, expected);

    // A page that ends exactly at the last entry has no next token.
    let all = member
        .list_ledger(pb::ListLedgerRequest {
            external_id: "card-1".into(),
            page_size: 7,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 7);
    assert!(all.next_page_token.is_empty());

    // 0 means the default size; more than 100 is reduced to 100.
    for page_size in [0, 1000] {
        let page = member
            .list_ledger(pb::ListLedgerRequest {
                external_id: "card-1".into(),
                page_size,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.entries.len(), 7);
    }

    for (page_size, page_token, field) in [(-1, "", "page_size"), (10, "garbage", "page_token")] {
        let status = member
            .list_ledger(pb::ListLedgerRequest {
                external_id: "card-1".into(),
                page_size,
                page_token: page_token.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(common::violated_fields(&status), [field]);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_ledger_page_of_one_hundred() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    for i in 0..105 {
        checkout
            .record_purchase(purchase("card-1", &format!("r-{i:03}"), 100))
            .await
            .unwrap();
    }
    let mut member = app.member(&pos).await;
    let first = member
        .list_ledger(pb::ListLedgerRequest {
            external_id: "card-1".into(),
            page_size: 500,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.entries.len(), 100);
    assert_eq!(first.entries[0].reference, "r-104");
    let second = member
        .list_ledger(pb::ListLedgerRequest {
            external_id: "card-1".into(),
            page_size: 500,
            page_token: first.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.entries.len(), 5);
    assert_eq!(second.entries[4].reference, "r-000");
    assert!(second.next_page_token.is_empty());
    app.stop().await;
}
