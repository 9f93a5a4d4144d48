//! Customer tokens through the real gRPC client: an app backend mints a token bound to one
//! customer; the token reads that customer only, expires, dies with the key that minted it,
//! and calls nothing else.

use loyalty_testkit as common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Options, ShiftedClock, TestApp, purchase};
use loyalty::Scope;
use loyalty::pb;
use tonic::Code;

fn balance(external_id: &str) -> pb::GetBalanceRequest {
    pb::GetBalanceRequest {
        external_id: external_id.into(),
        min_version: 0,
    }
}

fn ledger(external_id: &str) -> pb::ListLedgerRequest {
    pb::ListLedgerRequest {
        external_id: external_id.into(),
        ..Default::default()
    }
}

fn customer(external_id: &str) -> pb::GetCustomerRequest {
    pb::GetCustomerRequest {
        external_id: external_id.into(),
    }
}

/// A merchant with two customers who have bought something, and an app backend key.
async fn shop(app: &TestApp) -> (common::Merchant, String) {
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    for (external_id, receipt) in [("card-1", "r-1"), ("card-2", "r-2")] {
        checkout
            .record_purchase(purchase(external_id, receipt, 1000))
            .await
            .unwrap();
    }
    app.member(&pos)
        .await
        .enroll_customer(pb::EnrollCustomerRequest {
            external_id: "card-1".into(),
            display_name: "Ada".into(),
            email: "ada@example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let backend = app.key(&merchant, Scope::App).await;
    (merchant, backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_token_reads_its_own_customer_and_nobody_else() {
    let app = TestApp::spawn().await;
    let (merchant, backend) = shop(&app).await;
    let issued = app
        .member(&backend)
        .await
        .issue_customer_token(pb::IssueCustomerTokenRequest {
            external_id: "card-1".into(),
            ttl_seconds: 600,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(issued.token.starts_with("lct_"), "{}", issued.token);
    let expires_at = issued.expires_at.unwrap().seconds;
    let expected = common::timestamp_in(600).seconds;
    assert!(
        (expected - 2..=expected).contains(&expires_at),
        "{expires_at}"
    );
    assert!(!format!("{issued:?}").contains(&issued.token));

    let mut app_client = app.member(&issued.token).await;
    let own = app_client.get_balance(balance("card-1")).await.unwrap();
    assert_eq!(own.into_inner().balance.unwrap().available, 10);
    let profile = app_client.get_customer(customer("card-1")).await.unwrap();
    assert_eq!(
        profile.into_inner().customer.unwrap().email,
        "ada@example.com"
    );
    let entries = app_client.list_ledger(ledger("card-1")).await.unwrap();
    assert_eq!(entries.into_inner().entries.len(), 1);

    // Another customer: PERMISSION_DENIED, the same whether they exist or not (no oracle).
    for other in ["card-2", "no-such-card"] {
        for status in [
            app_client.get_balance(balance(other)).await.unwrap_err(),
            app_client.get_customer(customer(other)).await.unwrap_err(),
            app_client.list_ledger(ledger(other)).await.unwrap_err(),
        ] {
            assert_eq!(status.code(), Code::PermissionDenied, "{other}: {status:?}");
            assert!(!status.message().contains(other), "{}", status.message());
        }
    }

    // Nothing but those reads: not checkout, enrolment, minting or the program.
    let mut checkout = app.checkout(&issued.token).await;
    let status = checkout
        .record_purchase(purchase("card-1", "r-3", 1000))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = checkout
        .quote_purchase(pb::QuotePurchaseRequest {
            currency: "EUR".into(),
            total_minor: 100,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = app_client
        .enroll_customer(pb::EnrollCustomerRequest {
            external_id: "card-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = app_client
        .issue_customer_token(pb::IssueCustomerTokenRequest {
            external_id: "card-2".into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = app
        .program(&issued.token)
        .await
        .get_program(pb::GetProgramRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // The merchant-wide app key (for the app backend) still reads every customer.
    let mut backend_client = app.member(&backend).await;
    backend_client.get_balance(balance("card-2")).await.unwrap();

    // Tills and admins mint too; a token of another merchant reads nothing here.
    let pos = app.key(&merchant, Scope::Pos).await;
    let from_till = app.customer_token(&pos, "card-2").await;
    app.member(&from_till)
        .await
        .get_balance(balance("card-2"))
        .await
        .unwrap();
    let other = app.merchant().await;
    let foreign = app.customer_token(&other.admin_key, "card-1").await;
    let status = app
        .member(&foreign)
        .await
        .get_balance(balance("card-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_revoked_tokens_are_refused() {
    let clock = Arc::new(ShiftedClock::default());
    let app = TestApp::spawn_with(Options {
        clock: Some(clock.clone()),
        ..Default::default()
    })
    .await;
    let (merchant, backend) = shop(&app).await;
    let mut minting = app.member(&backend).await;

    // Bad lifetimes and ids are INVALID_ARGUMENT naming the field.
    let status = minting
        .issue_customer_token(pb::IssueCustomerTokenRequest {
            external_id: "card-1".into(),
            ttl_seconds: 86_401,
        })
        .await
        .unwrap_err();
    assert_eq!(common::violated_fields(&status), ["ttl_seconds"]);
    let status = minting
        .issue_customer_token(pb::IssueCustomerTokenRequest {
            external_id: String::new(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(common::violated_fields(&status), ["external_id"]);

    // A token whose customer was changed no longer verifies.
    let token = app.customer_token(&backend, "card-1").await;
    let other = app.customer_token(&backend, "card-2").await;
    let (_, tag) = token.rsplit_once('.').unwrap();
    let (other_payload, _) = other.rsplit_once('.').unwrap();
    let spliced = format!("{other_payload}.{tag}");
    let status = app
        .member(&spliced)
        .await
        .get_balance(balance("card-2"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(!status.message().contains("lct_"), "{}", status.message());

    // The default lifetime is 15 minutes, checked against the server's clock.
    let mut app_client = app.member(&token).await;
    app_client.get_balance(balance("card-1")).await.unwrap();
    clock.advance(Duration::from_secs(14 * 60));
    app_client.get_balance(balance("card-1")).await.unwrap();
    clock.advance(Duration::from_secs(61));
    let status = app_client.get_balance(balance("card-1")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // Revoking the key that minted a token revokes the token within the key cache TTL.
    let key = loyalty::create_key(&app.store, merchant.id, Scope::App)
        .await
        .unwrap();
    let token = app.customer_token(key.secret.expose(), "card-1").await;
    let mut app_client = app.member(&token).await;
    app_client.get_balance(balance("card-1")).await.unwrap();
    loyalty::revoke_key(&app.store, key.key_id).await.unwrap();
    let revoked_at = Instant::now();
    loop {
        match app_client.get_balance(balance("card-1")).await {
            Ok(_) => {
                assert!(
                    revoked_at.elapsed() < Duration::from_secs(2),
                    "the token outlived its key"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unauthenticated);
                break;
            }
        }
    }
    // And the revoked key mints no more.
    let status = app
        .member(key.secret.expose())
        .await
        .issue_customer_token(pb::IssueCustomerTokenRequest {
            external_id: "card-1".into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    app.stop().await;
}
