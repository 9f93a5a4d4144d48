//! Reliability suite, scenario 7: cross-merchant probes on every RPC. Another merchant's
//! customers are NOT_FOUND; identifiers are per merchant, so a write with another merchant's
//! ids lands in the caller's own namespace; and not one row of the probed merchant changes.

use loyalty_testkit as common;

use common::{Merchant, TestApp, purchase};
use loyalty::Scope;
use loyalty::pb;
use tonic::Code;

/// A digest of every row that belongs to `merchant`, in every table.
async fn digest(app: &TestApp, merchant: &Merchant) -> String {
    let mut parts = Vec::new();
    for table in [
        "merchants",
        "api_keys",
        "programs",
        "customers",
        "accounts",
        "purchases",
        "purchase_lines",
        "ledger_entries",
        "audit_log",
        "point_lots",
        "lot_movements",
        "redemptions",
        "reservations",
        "purchase_returns",
        "adjustments",
    ] {
        let column = if table == "merchants" {
            "id"
        } else {
            "merchant_id"
        };
        let sql = format!(
            "SELECT '{table}:' || count(*) || ':' || coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '')
               FROM {table} t WHERE {column} = $1"
        );
        let part: String = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(merchant.id.0)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        parts.push(part);
    }
    parts.join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_probed_across_merchants_finds_nothing_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let a = app.merchant().await;
    let a_pos = app.key(&a, Scope::Pos).await;

    // Merchant A: a customer with a profile and history, and a program of its own.
    let mut a_member = app.member(&a_pos).await;
    a_member
        .enroll_customer(pb::EnrollCustomerRequest {
            external_id: "card-1".into(),
            display_name: "A's customer".into(),
            email: "a-customer@example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut a_checkout = app.checkout(&a_pos).await;
    let a_first = purchase("card-1", "r-1", 5000);
    a_checkout.record_purchase(a_first.clone()).await.unwrap();
    for i in 2..=4 {
        a_checkout
            .record_purchase(purchase("card-1", &format!("r-{i}"), 1000))
            .await
            .unwrap();
    }
    // A's customer also spent, held, returned and was adjusted.
    a_checkout
        .redeem_points(pb::RedeemPointsRequest {
            external_id: "card-1".into(),
            redemption_id: "x-a".into(),
            points: 5,
            purchase_id: "r-2".into(),
        })
        .await
        .unwrap();
    a_checkout
        .reserve_points(pb::ReservePointsRequest {
            external_id: "card-1".into(),
            reservation_id: "h-a".into(),
            points: 5,
            ttl_seconds: 3600,
            purchase_id: String::new(),
        })
        .await
        .unwrap();
    a_checkout
        .return_purchase(pb::ReturnPurchaseRequest {
            purchase_id: "r-2".into(),
            return_id: "ret-a".into(),
            amount_minor: 500,
            ..Default::default()
        })
        .await
        .unwrap();
    app.program(&a.admin_key)
        .await
        .adjust_points(pb::AdjustPointsRequest {
            external_id: "card-1".into(),
            adjustment_key: "adj-a".into(),
            points: 3,
            reason: "welcome".into(),
        })
        .await
        .unwrap();
    let a_page = a_member
        .list_ledger(pb::ListLedgerRequest {
            external_id: "card-1".into(),
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!a_page.next_page_token.is_empty());
    let a_version = a_member
        .get_balance(pb::GetBalanceRequest {
            external_id: "card-1".into(),
            min_version: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .balance
        .unwrap()
        .version;
    let mut a_program_client = app.program(&a.admin_key).await;
    let mut a_program = a_program_client
        .get_program(pb::GetProgramRequest {})
        .await
        .unwrap()
        .into_inner()
        .program
        .unwrap();
    a_program.earn_rate = Some(pb::EarnRate {
        points: 7,
        currency_units: 1,
    });
    let a_program = a_program_client
        .update_program(pb::UpdateProgramRequest {
            program: Some(a_program),
            expected_version: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .program
        .unwrap();
    let before = digest(&app, &a).await;

    // Merchant B probes with every key scope it has.
    let b = app.merchant().await;
    let b_keys = [
        app.key(&b, Scope::Pos).await,
        app.key(&b, Scope::App).await,
        app.key(&b, Scope::Scheduler).await,
        b.admin_key.clone(),
    ];
    let mut probes = 0;
    for key in &b_keys {
        let mut member = app.member(key).await;
        let allowed = |code: Code| code == Code::NotFound || code == Code::PermissionDenied;
        let status = member
            .get_customer(pb::GetCustomerRequest {
                external_id: "card-1".into(),
            })
            .await
            .unwrap_err();
        assert!(allowed(status.code()), "GetCustomer: {status:?}");
        let status = member
            .get_balance(pb::GetBalanceRequest {
                external_id: "card-1".into(),
                min_version: a_version,
            })
            .await
            .unwrap_err();
        assert!(allowed(status.code()), "GetBalance: {status:?}");
        let status = member
            .list_ledger(pb::ListLedgerRequest {
                external_id: "card-1".into(),
                page_size: 10,
                page_token: a_page.next_page_token.clone(),
            })
            .await
            .unwrap_err();
        assert!(allowed(status.code()), "ListLedger: {status:?}");
        probes += 3;
    }
    let b_pos = &b_keys[0];
    let b_admin = &b_keys[3];
    let mut b_member = app.member(b_pos).await;
    let mut b_checkout = app.checkout(b_pos).await;

    // Quote for A's customer: B's program (1 point per euro), not A's (7).
    let quote = b_checkout
        .quote_purchase(pb::QuotePurchaseRequest {
            external_id: "card-1".into(),
            currency: "EUR".into(),
            total_minor: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(quote.points, 10);
    // A's exact receipt replayed by B: B's own purchase, B's own new customer, B's balance.
    let receipt = b_checkout
        .record_purchase(a_first.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.points_earned, 50);
    assert_eq!(receipt.purchase_count, 1);
    assert_eq!(receipt.balance.unwrap().available, 50);
    // Enrolling A's external id creates B's customer; nothing of A's profile shows through.
    let enrolled = b_member
        .enroll_customer(pb::EnrollCustomerRequest {
            external_id: "card-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !enrolled.created,
        "B's customer was created by B's purchase just before"
    );
    let profile = enrolled.customer.unwrap();
    assert_eq!(
        (profile.display_name.as_str(), profile.email.as_str()),
        ("", "")
    );
    let b_balance = b_member
        .get_balance(pb::GetBalanceRequest {
            external_id: "card-1".into(),
            min_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b_balance.balance.unwrap().available, 50);
    let b_ledger = b_member
        .list_ledger(pb::ListLedgerRequest {
            external_id: "card-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b_ledger.entries.len(), 1);
    // A's page token on B's customer: at most B's own entries.
    let b_with_a_token = b_member
        .list_ledger(pb::ListLedgerRequest {
            external_id: "card-1".into(),
            page_size: 10,
            page_token: a_page.next_page_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        b_with_a_token
            .entries
            .iter()
            .all(|e| e.entry_id == b_ledger.entries[0].entry_id)
    );
    // The program RPCs only ever see B's program, even with A's version number.
    let mut b_program_client = app.program(b_admin).await;
    let b_program = b_program_client
        .get_program(pb::GetProgramRequest {})
        .await
        .unwrap()
        .into_inner()
        .program
        .unwrap();
    assert_eq!(b_program.earn_rate.unwrap().points, 1);
    let status = b_program_client
        .update_program(pb::UpdateProgramRequest {
            program: Some(a_program.clone()),
            expected_version: a_program.version,
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "B's program is at another version"
    );
    probes += 8;

    // A's hold, receipt and client keys, used by B: NOT_FOUND, or B's own namespace.
    for status in [
        b_checkout
            .commit_reservation(pb::CommitReservationRequest {
                reservation_id: "h-a".into(),
            })
            .await
            .unwrap_err(),
        b_checkout
            .release_reservation(pb::ReleaseReservationRequest {
                reservation_id: "h-a".into(),
            })
            .await
            .unwrap_err(),
        b_checkout
            .return_purchase(pb::ReturnPurchaseRequest {
                purchase_id: "r-2".into(),
                return_id: "ret-a".into(),
                amount_minor: 500,
                ..Default::default()
            })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    let spent = b_checkout
        .redeem_points(pb::RedeemPointsRequest {
            external_id: "card-1".into(),
            redemption_id: "x-a".into(),
            points: 5,
            purchase_id: "r-2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spent.balance.unwrap().available, 45, "B's own 50 points");
    let adjusted = b_program_client
        .adjust_points(pb::AdjustPointsRequest {
            external_id: "card-1".into(),
            adjustment_key: "adj-a".into(),
            points: 3,
            reason: "welcome".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(adjusted.balance.unwrap().available, 48);
    probes += 5;

    assert_eq!(digest(&app, &a).await, before, "merchant A's data changed");
    // A is still served as before.
    let a_balance = a_member
        .get_balance(pb::GetBalanceRequest {
            external_id: "card-1".into(),
            min_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a_balance.balance.unwrap().version, a_version);
    app.assert_ledger_invariant().await;
    common::report(
        "7-cross-merchant",
        serde_json::json!({ "probes": probes, "rows_changed": 0, "violations": 0 }),
    );
    app.stop().await;
}

/// Two merchants write interleaved: each sees entry ids 1, 2, 3, ... of its own customer and
/// page tokens that continue from them, with no gaps left by the other merchant's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_ids_and_page_tokens_reveal_nothing_of_other_merchants() {
    let app = TestApp::spawn().await;
    let a = app.merchant().await;
    let b = app.merchant().await;
    let mut a_pos = app.checkout(&a.admin_key).await;
    let mut b_pos = app.checkout(&b.admin_key).await;
    for i in 0..4 {
        a_pos
            .record_purchase(purchase("card-a", &format!("a-{i}"), 1000))
            .await
            .unwrap();
        for j in 0..3 {
            b_pos
                .record_purchase(purchase(&format!("card-b{j}"), &format!("b-{i}-{j}"), 1000))
                .await
                .unwrap();
        }
    }
    let mut a_member = app.member(&a.admin_key).await;
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = a_member
            .list_ledger(pb::ListLedgerRequest {
                external_id: "card-a".into(),
                page_size: 1,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.entries.iter().map(|e| e.entry_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(ids, [4, 3, 2, 1]);
    let mut b_member = app.member(&b.admin_key).await;
    let b_ids: Vec<i64> = b_member
        .list_ledger(pb::ListLedgerRequest {
            external_id: "card-b1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
        .iter()
        .map(|e| e.entry_id)
        .collect();
    assert_eq!(b_ids, [4, 3, 2, 1]);
    // The entry id is the balance version the entry produced.
    let version = a_member
        .get_balance(pb::GetBalanceRequest {
            external_id: "card-a".into(),
            min_version: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .balance
        .unwrap()
        .version;
    assert_eq!(version, 4);
    app.stop().await;
}
