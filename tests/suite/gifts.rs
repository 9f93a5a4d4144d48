//! Gifts through the real gRPC client: the catalog (admins), grants by hand and by purchase
//! rules, codes redeemed once at the till under concurrency, windows, tenancy, customer
//! tokens and stock that is never oversold.

use loyalty_testkit as common;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::{Merchant, Options, ShiftedClock, TestApp, purchase, violated_fields};
use futures::future::join_all;
use loyalty::gifts::rules::{GiftCode, GrantSource, GrantStatus};
use loyalty::gifts::store as gift_store;
use loyalty::pb;
use loyalty::{MerchantId, Scope};
use sqlx::postgres::PgPoolOptions;
use tonic::Code;

fn gift(gift_id: &str) -> pb::Gift {
    pb::Gift {
        gift_id: gift_id.into(),
        name: "Free coffee".into(),
        description: "Any size, any milk".into(),
        kind: pb::GiftKind::Item as i32,
        points_price: Some(500),
        stock: None,
        validity_days: 30,
        active: true,
        ..Default::default()
    }
}

async fn create(app: &TestApp, merchant: &Merchant, gift: pb::Gift) -> pb::Gift {
    app.program(&merchant.admin_key)
        .await
        .create_gift(pb::CreateGiftRequest { gift: Some(gift) })
        .await
        .expect("gift created")
        .into_inner()
        .gift
        .unwrap()
}

fn issue(external_id: &str, gift_id: &str, issue_key: &str) -> pb::IssueGiftRequest {
    pb::IssueGiftRequest {
        external_id: external_id.into(),
        gift_id: gift_id.into(),
        issue_key: issue_key.into(),
    }
}

fn redeem(code: &str, key: &str) -> pb::RedeemGiftRequest {
    pb::RedeemGiftRequest {
        code: code.into(),
        redemption_key: key.into(),
        store_id: "store-1".into(),
    }
}

/// A merchant whose customers card-1 and card-2 have bought something, with a pos key.
async fn shop(app: &TestApp) -> (Merchant, String) {
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    for (external_id, receipt) in [("card-1", "r-1"), ("card-2", "r-2")] {
        checkout
            .record_purchase(purchase(external_id, receipt, 1000))
            .await
            .unwrap();
    }
    (merchant, pos)
}

/// A gift granted by hand to `external_id`.
async fn granted(
    app: &TestApp,
    merchant: &Merchant,
    external_id: &str,
    key: &str,
) -> pb::GiftGrant {
    app.program(&merchant.admin_key)
        .await
        .issue_gift(issue(external_id, "free-coffee", key))
        .await
        .expect("gift issued")
        .into_inner()
        .grant
        .unwrap()
}

async fn count(app: &TestApp, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pool).await.unwrap()
}

async fn customer_id(app: &TestApp, merchant: &Merchant, external_id: &str) -> i64 {
    sqlx::query_scalar("SELECT id FROM customers WHERE merchant_id = $1 AND external_id = $2")
        .bind(merchant.id.0)
        .bind(external_id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

fn code_shape(code: &str) -> bool {
    let groups: Vec<&str> = code.split('-').collect();
    groups.iter().map(|g| g.len()).collect::<Vec<_>>() == [4, 4, 4, 4, 1]
        && code
            .chars()
            .all(|c| c == '-' || "0123456789ABCDEFGHJKMNPQRSTVWXYZ".contains(c))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_is_created_updated_listed_and_validated() {
    let app = TestApp::spawn().await;
    let (merchant, pos) = shop(&app).await;
    let mut program = app.program(&merchant.admin_key).await;

    let created = create(&app, &merchant, gift("free-coffee")).await;
    assert_eq!(created.version, 1);
    assert_eq!(created.points_price, Some(500));
    assert_eq!(created.stock, None);
    // A retry of the same gift answers the same; other content under its id is refused.
    let again = create(&app, &merchant, gift("free-coffee")).await;
    assert_eq!(again, created);
    let status = program
        .create_gift(pb::CreateGiftRequest {
            gift: Some(pb::Gift {
                name: "Free tea".into(),
                ..gift("free-coffee")
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");

    // Bad input names every field and writes nothing.
    let gifts_before = count(&app, "SELECT count(*) FROM gifts").await;
    let audit_before = count(&app, "SELECT count(*) FROM audit_log").await;
    let status = program
        .create_gift(pb::CreateGiftRequest {
            gift: Some(pb::Gift {
                gift_id: "x".repeat(65),
                name: String::new(),
                description: "bell\u{7}".into(),
                kind: 0,
                points_price: Some(0),
                stock: Some(-1),
                validity_days: 0,
                active: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        [
            "gift.gift_id",
            "gift.name",
            "gift.description",
            "gift.kind",
            "gift.points_price",
            "gift.stock",
            "gift.validity_days"
        ]
    );
    let status = program
        .create_gift(pb::CreateGiftRequest { gift: None })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["gift"]);
    let status = program
        .create_gift(pb::CreateGiftRequest {
            gift: Some(pb::Gift {
                kind: 99,
                ..gift("g")
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["gift.kind"]);
    assert_eq!(
        count(&app, "SELECT count(*) FROM gifts").await,
        gifts_before
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM audit_log").await,
        audit_before
    );

    // Updates check the version the admin read.
    let updated = program
        .update_gift(pb::UpdateGiftRequest {
            gift: Some(pb::Gift {
                stock: Some(10),
                ..gift("free-coffee")
            }),
            expected_version: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .gift
        .unwrap();
    assert_eq!((updated.version, updated.stock), (2, Some(10)));
    let status = program
        .update_gift(pb::UpdateGiftRequest {
            gift: Some(gift("free-coffee")),
            expected_version: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let status = program
        .update_gift(pb::UpdateGiftRequest {
            gift: Some(gift("no-such-gift")),
            expected_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = program
        .update_gift(pb::UpdateGiftRequest {
            gift: Some(gift("free-coffee")),
            expected_version: -1,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["expected_version"]);

    // Lists page by gift id; the catalog shows the active gifts only.
    create(&app, &merchant, gift("gift-b")).await;
    create(
        &app,
        &merchant,
        pb::Gift {
            active: false,
            kind: pb::GiftKind::Service as i32,
            ..gift("gift-c")
        },
    )
    .await;
    let first = program
        .list_gifts(pb::ListGiftsRequest {
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = first.gifts.iter().map(|g| g.gift_id.as_str()).collect();
    assert_eq!(ids, ["free-coffee", "gift-b"]);
    let second = program
        .list_gifts(pb::ListGiftsRequest {
            page_size: 2,
            page_token: first.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = second.gifts.iter().map(|g| g.gift_id.as_str()).collect();
    assert_eq!(ids, ["gift-c"]);
    assert!(second.next_page_token.is_empty());
    let status = program
        .list_gifts(pb::ListGiftsRequest {
            page_size: -1,
            page_token: "garbage".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["page_size", "page_token"]);

    let backend = app.key(&merchant, Scope::App).await;
    let token = app.customer_token(&backend, "card-1").await;
    for key in [&backend, &pos, &token] {
        let catalog = app
            .member(key)
            .await
            .list_gift_catalog(pb::ListGiftCatalogRequest::default())
            .await
            .unwrap()
            .into_inner();
        let ids: Vec<_> = catalog.gifts.iter().map(|g| g.gift_id.as_str()).collect();
        assert_eq!(ids, ["free-coffee", "gift-b"]);
    }

    // Only admins change the catalog.
    let status = app
        .program(&pos)
        .await
        .create_gift(pb::CreateGiftRequest {
            gift: Some(gift("pos-gift")),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_gift_is_idempotent_by_its_key() {
    let app = TestApp::spawn().await;
    let (merchant, _pos) = shop(&app).await;
    create(&app, &merchant, gift("free-coffee")).await;
    create(&app, &merchant, gift("other-gift")).await;
    let mut program = app.program(&merchant.admin_key).await;

    let grant = granted(&app, &merchant, "card-1", "issue-1").await;
    assert!(code_shape(&grant.code), "{}", grant.code.len());
    assert_eq!(grant.status, pb::GiftGrantStatus::Issued as i32);
    assert_eq!(grant.source, pb::GiftSource::Manual as i32);
    assert_eq!(
        (grant.gift_id.as_str(), grant.external_id.as_str()),
        ("free-coffee", "card-1")
    );
    assert_eq!(grant.gift_name, "Free coffee");
    let window = grant.valid_until.unwrap().seconds - grant.valid_from.unwrap().seconds;
    assert_eq!(window, 30 * 86_400);

    // A replay gets the same grant and writes nothing.
    let grants_before = count(&app, "SELECT count(*) FROM gift_grants").await;
    let audit_before = count(&app, "SELECT count(*) FROM audit_log").await;
    assert_eq!(granted(&app, &merchant, "card-1", "issue-1").await, grant);
    assert_eq!(
        count(&app, "SELECT count(*) FROM gift_grants").await,
        grants_before
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM audit_log").await,
        audit_before
    );
    // The same key for another gift or customer is refused.
    for other in [
        issue("card-1", "other-gift", "issue-1"),
        issue("card-2", "free-coffee", "issue-1"),
    ] {
        let status = program.issue_gift(other).await.unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    }
    // Another key makes another grant with another code.
    let second = granted(&app, &merchant, "card-1", "issue-2").await;
    assert_ne!(second.code, grant.code);

    // What ClaimGift will use: the grant of a key, and a replay told from a new grant.
    let mut conn = app.pool.acquire().await.unwrap();
    let found = gift_store::find_grant(&mut conn, merchant.id, GrantSource::Manual, "issue-1")
        .await
        .unwrap()
        .expect("the grant of issue-1");
    assert_eq!(found.code.display(), grant.code);
    let request = gift_store::GrantRequest {
        customer_id: customer_id(&app, &merchant, "card-1").await,
        gift_id: "free-coffee",
        source: GrantSource::Manual,
        source_reference: "issue-1",
        purchase_id: None,
        now: Utc::now(),
        delay_hours: 0,
    };
    match gift_store::try_grant(&mut conn, merchant.id, &request)
        .await
        .unwrap()
    {
        gift_store::Granted::Replayed(replayed) => assert_eq!(replayed, found),
        other => panic!("a replay, not {other:?}"),
    }
    let fresh = gift_store::GrantRequest {
        source_reference: "issue-by-store",
        ..request
    };
    assert!(matches!(
        gift_store::try_grant(&mut conn, merchant.id, &fresh)
            .await
            .unwrap(),
        gift_store::Granted::Created(_)
    ));
    assert!(
        gift_store::find_grant(&mut conn, merchant.id, GrantSource::Points, "issue-1")
            .await
            .unwrap()
            .is_none()
    );
    drop(conn);

    for (request, code) in [
        (issue("card-9", "free-coffee", "issue-3"), Code::NotFound),
        (issue("card-1", "no-such-gift", "issue-3"), Code::NotFound),
    ] {
        let status = program.issue_gift(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
    }
    let status = program
        .issue_gift(issue("", "free-coffee", " key"))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["external_id", "issue_key"]);

    // An inactive gift is not granted.
    program
        .update_gift(pb::UpdateGiftRequest {
            gift: Some(pb::Gift {
                active: false,
                ..gift("other-gift")
            }),
            expected_version: 0,
        })
        .await
        .unwrap();
    let status = program
        .issue_gift(issue("card-1", "other-gift", "issue-4"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_is_redeemed_once_and_a_replay_gets_the_same_answer() {
    let app = TestApp::spawn().await;
    let (merchant, pos) = shop(&app).await;
    create(&app, &merchant, gift("free-coffee")).await;
    let grant = granted(&app, &merchant, "card-1", "issue-1").await;
    let mut checkout = app.checkout(&pos).await;

    let first = checkout
        .redeem_gift(redeem(&grant.code, "till-1-1"))
        .await
        .unwrap()
        .into_inner();
    let redeemed = first.grant.clone().unwrap();
    assert_eq!(redeemed.status, pb::GiftGrantStatus::Redeemed as i32);
    assert_eq!(redeemed.code, grant.code);
    assert_eq!(redeemed.redeemed_store_id, "store-1");
    assert!(redeemed.redeemed_at.is_some());

    // The same key again: the same answer.
    let replay = checkout
        .redeem_gift(redeem(&grant.code, "till-1-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replay, first);
    // The same key with other content: refused.
    let status = checkout
        .redeem_gift(pb::RedeemGiftRequest {
            store_id: "store-2".into(),
            ..redeem(&grant.code, "till-1-1")
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    // Another key: redeemed already.
    let status = checkout
        .redeem_gift(redeem(&grant.code, "till-1-2"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("redeemed"),
        "{}",
        status.message()
    );
    assert!(!status.message().contains(&grant.code));

    // A code typed in lower case, without dashes, with look-alikes, is the same code.
    let other = granted(&app, &merchant, "card-1", "issue-2").await;
    let typed = other
        .code
        .replace('-', "")
        .to_lowercase()
        .replace('0', "o")
        .replace('1', "l");
    let status = checkout
        .redeem_gift(redeem(&typed, "till-1-1"))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::AlreadyExists,
        "the key names the first redemption"
    );
    let second = checkout
        .redeem_gift(redeem(&typed, "till-1-3"))
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap();
    assert_eq!(second.code, other.code);

    // Bad input names its fields.
    let status = checkout
        .redeem_gift(pb::RedeemGiftRequest {
            code: String::new(),
            redemption_key: String::new(),
            store_id: " x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        ["code", "redemption_key", "store_id"]
    );

    // The customer sees both redeemed, newest first.
    let listed = app
        .member(&pos)
        .await
        .list_customer_gifts(pb::ListCustomerGiftsRequest {
            external_id: "card-1".into(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.grants.len(), 1);
    assert_eq!(listed.grants[0].code, other.code);
    assert_eq!(
        listed.grants[0].status,
        pb::GiftGrantStatus::Redeemed as i32
    );
    let rest = app
        .member(&pos)
        .await
        .list_customer_gifts(pb::ListCustomerGiftsRequest {
            external_id: "card-1".into(),
            page_size: 1,
            page_token: listed.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.grants.len(), 1);
    assert_eq!(rest.grants[0].code, grant.code);
    assert!(rest.next_page_token.is_empty(), "the last page says so");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_redemptions_of_one_code_let_exactly_one_through() {
    let app = TestApp::spawn().await;
    let (merchant, pos) = shop(&app).await;
    create(&app, &merchant, gift("free-coffee")).await;
    let grant = granted(&app, &merchant, "card-1", "issue-1").await;
    let checkout = app.checkout(&pos).await;

    let mut tasks = Vec::new();
    for till in 0..20 {
        let mut checkout = checkout.clone();
        let code = grant.code.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("till-{till}");
            let answer = checkout.redeem_gift(redeem(&code, &key)).await;
            (key, answer)
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        let (key, answer) = task.await.unwrap();
        match answer {
            Ok(response) => winners.push((key, response.into_inner())),
            Err(status) => assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one redemption wins");
    let (key, answer) = winners.pop().unwrap();
    let replay = checkout
        .clone()
        .redeem_gift(redeem(&grant.code, &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replay, answer);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM gift_grants WHERE status = 'redeemed'"
        )
        .await,
        1
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_are_per_merchant_and_mistyped_codes_are_told_apart() {
    let app = TestApp::spawn().await;
    let (merchant, _pos) = shop(&app).await;
    create(&app, &merchant, gift("free-coffee")).await;
    let grant = granted(&app, &merchant, "card-1", "issue-1").await;

    // Another merchant's till: not found, and nothing changes.
    let (other, other_pos) = shop(&app).await;
    create(&app, &other, gift("free-coffee")).await;
    let mut foreign = app.checkout(&other_pos).await;
    let status = foreign
        .redeem_gift(redeem(&grant.code, "till-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = app
        .member(&other_pos)
        .await
        .list_customer_gifts(pb::ListCustomerGiftsRequest {
            external_id: "card-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        status.into_inner().grants.is_empty(),
        "other merchant's card-1 has no gifts"
    );

    // One character wrong, or two swapped: mistyped, not unknown.
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    let chars: Vec<char> = grant.code.chars().collect();
    let wrong: String = chars
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            if i == 2 {
                if c == 'A' { 'B' } else { 'A' }
            } else {
                c
            }
        })
        .collect();
    let swap_at = (0..chars.len() - 1)
        .find(|&i| chars[i] != '-' && chars[i + 1] != '-' && chars[i] != chars[i + 1])
        .unwrap();
    let mut swapped = chars.clone();
    swapped.swap(swap_at, swap_at + 1);
    let swapped: String = swapped.into_iter().collect();
    for typo in [wrong, swapped] {
        let status = checkout
            .redeem_gift(redeem(&typo, "till-2"))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["code"]);
        assert!(
            status.message().contains("mistyped"),
            "{}",
            status.message()
        );
    }
    // A well-formed code that was never issued: not found.
    let unknown = GiftCode::generate().display();
    let status = checkout
        .redeem_gift(redeem(&unknown, "till-3"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    // The grant is untouched and still redeemable by its own merchant.
    let redeemed = checkout
        .redeem_gift(redeem(&grant.code, "till-4"))
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap();
    assert_eq!(redeemed.status, pb::GiftGrantStatus::Redeemed as i32);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gift_is_redeemed_only_inside_its_window() {
    let clock = Arc::new(ShiftedClock::default());
    let app = TestApp::spawn_with(Options {
        clock: Some(clock.clone()),
        ..Default::default()
    })
    .await;
    let (merchant, pos) = shop(&app).await;
    create(
        &app,
        &merchant,
        pb::Gift {
            validity_days: 7,
            ..gift("free-coffee")
        },
    )
    .await;
    let card_1 = customer_id(&app, &merchant, "card-1").await;
    // A grant whose window opens tomorrow (as a come-back gift with a delay would).
    let mut conn = app.pool.acquire().await.unwrap();
    let tomorrow = gift_store::grant(
        &mut conn,
        merchant.id,
        card_1,
        "free-coffee",
        GrantSource::Manual,
        "tomorrow",
        None,
        Utc::now() + chrono::Duration::days(1),
    )
    .await
    .unwrap();
    assert_eq!(tomorrow.status, GrantStatus::Issued);
    drop(conn);
    let today = granted(&app, &merchant, "card-1", "today").await;
    let mut checkout = app.checkout(&pos).await;

    let code = tomorrow.code.display();
    let status = checkout
        .redeem_gift(redeem(&code, "k-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("not valid yet"),
        "{}",
        status.message()
    );

    // Seven and a half days on: the first grant's window is open, the second's has ended.
    clock.advance(Duration::from_secs(7 * 86_400 + 43_200));
    let status = checkout
        .redeem_gift(redeem(&today.code, "k-2"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("expired"), "{}", status.message());
    let listed = app
        .member(&pos)
        .await
        .list_customer_gifts(pb::ListCustomerGiftsRequest {
            external_id: "card-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let statuses: Vec<(String, i32)> = listed
        .grants
        .iter()
        .map(|g| (g.code.clone(), g.status))
        .collect();
    assert!(statuses.contains(&(today.code.clone(), pb::GiftGrantStatus::Expired as i32)));
    assert!(statuses.contains(&(code.clone(), pb::GiftGrantStatus::Issued as i32)));
    let redeemed = checkout
        .redeem_gift(redeem(&code, "k-3"))
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap();
    assert_eq!(redeemed.status, pb::GiftGrantStatus::Redeemed as i32);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_token_reads_only_its_own_gifts() {
    let app = TestApp::spawn().await;
    let (merchant, _pos) = shop(&app).await;
    create(&app, &merchant, gift("free-coffee")).await;
    let mine = granted(&app, &merchant, "card-1", "issue-1").await;
    granted(&app, &merchant, "card-2", "issue-2").await;
    let backend = app.key(&merchant, Scope::App).await;
    let token = app.customer_token(&backend, "card-1").await;
    let mut member = app.member(&token).await;

    let listed = member
        .list_customer_gifts(pb::ListCustomerGiftsRequest {
            external_id: "card-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.grants.len(), 1);
    assert_eq!(listed.grants[0].code, mine.code);
    // Anyone else, existing or not: PERMISSION_DENIED, the same either way.
    for other in ["card-2", "card-9"] {
        let status = member
            .list_customer_gifts(pb::ListCustomerGiftsRequest {
                external_id: other.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{other}");
    }
    // A token redeems nothing and issues nothing.
    let status = app
        .checkout(&token)
        .await
        .redeem_gift(redeem(&mine.code, "k"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = app
        .program(&token)
        .await
        .issue_gift(issue("card-1", "free-coffee", "k"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // An app key reads every customer's gifts; an unknown customer is NOT_FOUND.
    let mut backend_member = app.member(&backend).await;
    let status = backend_member
        .list_customer_gifts(pb::ListCustomerGiftsRequest {
            external_id: "card-9".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_grants_on_a_stock_of_five_make_exactly_five() {
    let app = TestApp::spawn().await;
    let (merchant, _pos) = shop(&app).await;
    for gift_id in ["by-rpc", "by-store"] {
        create(
            &app,
            &merchant,
            pb::Gift {
                stock: Some(5),
                ..gift(gift_id)
            },
        )
        .await;
    }

    // Through IssueGift, twenty distinct keys at once.
    let program = app.program(&merchant.admin_key).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut program = program.clone();
        tasks.push(tokio::spawn(async move {
            program
                .issue_gift(issue("card-1", "by-rpc", &format!("key-{i}")))
                .await
        }));
    }
    let mut issued = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => issued += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                assert!(
                    status.message().contains("out of stock"),
                    "{}",
                    status.message()
                );
            }
        }
    }
    assert_eq!(issued, 5);

    // Through the store function other features call, each in a transaction of its own.
    let pool = PgPoolOptions::new()
        .max_connections(20)
        .connect(&app.db.url)
        .await
        .unwrap();
    let card_2 = customer_id(&app, &merchant, "card-2").await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let pool = pool.clone();
        let merchant: MerchantId = merchant.id;
        tasks.push(tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            let granted = gift_store::grant(
                &mut tx,
                merchant,
                card_2,
                "by-store",
                GrantSource::Points,
                &format!("claim-{i}"),
                None,
                Utc::now(),
            )
            .await;
            if granted.is_ok() {
                tx.commit().await.unwrap();
            }
            granted.map(|_| ())
        }));
    }
    let mut granted = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => granted += 1,
            Err(error) => assert!(
                matches!(error, loyalty::Error::FailedPrecondition(_)),
                "{error:?}"
            ),
        }
    }
    assert_eq!(granted, 5);
    pool.close().await;

    let stocks: Vec<(String, Option<i64>, i64)> = sqlx::query_as(
        "SELECT f.gift_id, f.stock, count(g.id)
           FROM gifts f LEFT JOIN gift_grants g
             ON g.merchant_id = f.merchant_id AND g.gift_id = f.gift_id
          WHERE f.merchant_id = $1 AND f.gift_id IN ('by-rpc', 'by-store')
          GROUP BY f.gift_id, f.stock ORDER BY f.gift_id",
    )
    .bind(merchant.id.0)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        stocks,
        [
            ("by-rpc".to_string(), Some(0), 5),
            ("by-store".to_string(), Some(0), 5)
        ]
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gift_rules_are_validated_versioned_and_listed() {
    let app = TestApp::spawn().await;
    let (merchant, _pos) = shop(&app).await;
    create(&app, &merchant, gift("free-coffee")).await;
    let mut program = app.program(&merchant.admin_key).await;
    let rule = |rule_id: &str| pb::GiftRule {
        rule_id: rule_id.into(),
        trigger: pb::GiftTrigger::FirstPurchase as i32,
        gift_id: "free-coffee".into(),
        delay_hours: 12,
        active: true,
        ..Default::default()
    };

    let status = program
        .put_gift_rule(pb::PutGiftRuleRequest {
            rule: Some(pb::GiftRule {
                trigger: pb::GiftTrigger::EveryNthPurchase as i32,
                every_n: 0,
                gift_id: String::new(),
                delay_hours: 10_000,
                ..rule("")
            }),
            expected_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        [
            "rule.rule_id",
            "rule.gift_id",
            "rule.every_n",
            "rule.delay_hours"
        ]
    );
    let status = program
        .put_gift_rule(pb::PutGiftRuleRequest {
            rule: Some(pb::GiftRule {
                gift_id: "no-such-gift".into(),
                ..rule("come-back")
            }),
            expected_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(count(&app, "SELECT count(*) FROM gift_rules").await, 0);

    let put = program
        .put_gift_rule(pb::PutGiftRuleRequest {
            rule: Some(rule("come-back")),
            expected_version: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .rule
        .unwrap();
    assert_eq!((put.version, put.delay_hours), (1, 12));
    let every_third = program
        .put_gift_rule(pb::PutGiftRuleRequest {
            rule: Some(pb::GiftRule {
                trigger: pb::GiftTrigger::EveryNthPurchase as i32,
                every_n: 3,
                ..rule("every-third")
            }),
            expected_version: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .rule
        .unwrap();
    assert_eq!(every_third.every_n, 3);
    let replaced = program
        .put_gift_rule(pb::PutGiftRuleRequest {
            rule: Some(pb::GiftRule {
                active: false,
                ..rule("come-back")
            }),
            expected_version: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .rule
        .unwrap();
    assert_eq!((replaced.version, replaced.active), (2, false));
    for (rule_id, expected_version) in [("come-back", 1), ("new-rule", 4)] {
        let status = program
            .put_gift_rule(pb::PutGiftRuleRequest {
                rule: Some(rule(rule_id)),
                expected_version,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    }
    let listed = program
        .list_gift_rules(pb::ListGiftRulesRequest {})
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = listed.rules.iter().map(|r| r.rule_id.as_str()).collect();
    assert_eq!(ids, ["come-back", "every-third"]);
    assert_eq!(listed.rules[0], replaced);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchase_rules_grant_once_skip_sold_out_gifts_and_returns_revoke_them() {
    let app = TestApp::spawn().await;
    let (merchant, pos) = shop(&app).await;
    create(&app, &merchant, gift("come-back-coffee")).await;
    create(
        &app,
        &merchant,
        pb::Gift {
            stock: Some(1),
            ..gift("second-cake")
        },
    )
    .await;
    let mut conn = app.pool.acquire().await.unwrap();
    assert!(
        !gift_store::has_purchase_rules(&mut conn, merchant.id)
            .await
            .unwrap()
    );
    let mut program = app.program(&merchant.admin_key).await;
    for rule in [
        pb::GiftRule {
            rule_id: "come-back".into(),
            trigger: pb::GiftTrigger::FirstPurchase as i32,
            gift_id: "come-back-coffee".into(),
            delay_hours: 12,
            active: true,
            ..Default::default()
        },
        pb::GiftRule {
            rule_id: "every-second".into(),
            trigger: pb::GiftTrigger::EveryNthPurchase as i32,
            every_n: 2,
            gift_id: "second-cake".into(),
            active: true,
            ..Default::default()
        },
    ] {
        program
            .put_gift_rule(pb::PutGiftRuleRequest {
                rule: Some(rule),
                expected_version: 0,
            })
            .await
            .unwrap();
    }
    assert!(
        gift_store::has_purchase_rules(&mut conn, merchant.id)
            .await
            .unwrap()
    );
    // The same question folded into another statement (as checkout's context read may).
    let folded: (i64, bool) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT $1, {} FROM programs WHERE merchant_id = $1",
        gift_store::PURCHASE_RULES_EXIST
    )))
    .bind(merchant.id.0)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(folded, (merchant.id.0, true));
    let other = app.merchant().await;
    assert!(
        !gift_store::has_purchase_rules(&mut conn, other.id)
            .await
            .unwrap()
    );

    let card_1 = customer_id(&app, &merchant, "card-1").await;
    // What Postgres keeps (microseconds), so that windows compare exactly.
    let now = chrono::DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
    let rules = |purchase_id: &'static str, count: i64| {
        let pool = app.pool.clone();
        let merchant = merchant.id;
        async move {
            let mut tx = pool.begin().await.unwrap();
            let grants = gift_store::grants_for_purchase_rules(
                &mut tx,
                merchant,
                card_1,
                purchase_id,
                count,
                None,
                now,
            )
            .await
            .unwrap();
            tx.commit().await.unwrap();
            grants
        }
    };
    // The first purchase: the come-back gift, valid from 12 hours later.
    let first = rules("r-1", 1).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].gift_id, "come-back-coffee");
    assert_eq!(first[0].source, GrantSource::Rule);
    assert_eq!(first[0].purchase_id.as_deref(), Some("r-1"));
    assert_eq!(first[0].valid_from - now, chrono::Duration::hours(12));
    // A replay of that purchase grants nothing new.
    let replay = rules("r-1", 1).await;
    assert_eq!(replay, first);
    assert_eq!(
        gift_store::grants_of_purchase(&mut conn, merchant.id, "r-1")
            .await
            .unwrap(),
        first
    );
    // The second purchase: the cake; the fourth: sold out, skipped; the third: nothing.
    let second = rules("r-2", 2).await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].gift_id, "second-cake");
    assert!(rules("r-3", 3).await.is_empty());
    assert!(rules("r-4", 4).await.is_empty());

    // Returning the first purchase revokes its gift once; a redeemed gift stays redeemed.
    assert_eq!(
        gift_store::revoke_for_purchase(&mut conn, merchant.id, "r-1", now)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        gift_store::revoke_for_purchase(&mut conn, merchant.id, "r-1", now)
            .await
            .unwrap(),
        0
    );
    let status = app
        .checkout(&pos)
        .await
        .redeem_gift(redeem(&first[0].code.display(), "k-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("revoked"), "{}", status.message());
    // Returning the second puts the cake back into stock.
    assert_eq!(
        gift_store::revoke_for_purchase(&mut conn, merchant.id, "r-2", now)
            .await
            .unwrap(),
        1
    );
    let stock: Option<i64> = sqlx::query_scalar(
        "SELECT stock FROM gifts WHERE merchant_id = $1 AND gift_id = 'second-cake'",
    )
    .bind(merchant.id.0)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(stock, Some(1));
    let listed = app
        .member(&pos)
        .await
        .list_customer_gifts(pb::ListCustomerGiftsRequest {
            external_id: "card-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .grants
            .iter()
            .all(|g| g.status == pb::GiftGrantStatus::Revoked as i32
                && g.source == pb::GiftSource::Rule as i32)
    );
    assert_eq!(listed.grants.len(), 2);
    drop(conn);
    app.stop().await;
}

mod bad_input {
    //! Property-generated garbage for every gift RPC: a clear error (or, when the random
    //! request happens to be valid, an answer), nothing written by a refused request, never
    //! INTERNAL, never a panic.

    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            Just("free-coffee".to_string()),
            Just("card-1".to_string()),
            "[a-z0-9-]{1,12}",
            "\\PC{1,40}",
            "[\\x00-\\x1f]{1,4}",
            " [a-z]{1,5} ",
            "x{60,300}",
            "[0-9A-Za-z -]{15,25}",
        ]
    }

    fn number() -> impl Strategy<Value = i64> {
        prop_oneof![
            Just(0i64),
            Just(-1i64),
            Just(i64::MIN),
            Just(i64::MAX),
            0..100i64,
            any::<i64>()
        ]
    }

    fn gift() -> impl Strategy<Value = Option<pb::Gift>> {
        prop::option::of(
            (
                (text(), text(), text(), -1i32..5),
                (
                    prop::option::of(number()),
                    prop::option::of(number()),
                    prop_oneof![0u32..40, any::<u32>()],
                    any::<bool>(),
                ),
            )
                .prop_map(
                    |(
                        (gift_id, name, description, kind),
                        (points_price, stock, validity_days, active),
                    )| pb::Gift {
                        gift_id,
                        name,
                        description,
                        kind,
                        points_price,
                        stock,
                        validity_days,
                        active,
                        ..Default::default()
                    },
                ),
        )
    }

    fn rule() -> impl Strategy<Value = Option<pb::GiftRule>> {
        prop::option::of(
            (
                text(),
                -1i32..4,
                prop_oneof![0u32..5, any::<u32>()],
                text(),
                prop_oneof![0u32..20, any::<u32>()],
                any::<bool>(),
            )
                .prop_map(
                    |(rule_id, trigger, every_n, gift_id, delay_hours, active)| pb::GiftRule {
                        rule_id,
                        trigger,
                        every_n,
                        gift_id,
                        delay_hours,
                        active,
                        ..Default::default()
                    },
                ),
        )
    }

    async fn rows(app: &TestApp) -> Vec<i64> {
        let mut counts = Vec::new();
        for sql in [
            "SELECT count(*) FROM gifts",
            "SELECT coalesce(sum(version), 0)::bigint FROM gifts",
            "SELECT coalesce(sum(stock), 0)::bigint FROM gifts",
            "SELECT count(*) FROM gift_grants",
            "SELECT count(*) FROM gift_grants WHERE status <> 'issued'",
            "SELECT count(*) FROM gift_rules",
            "SELECT count(*) FROM audit_log",
        ] {
            counts.push(count(app, sql).await);
        }
        counts
    }

    fn check<S, F, Fut>(
        rt: &tokio::runtime::Runtime,
        app: &TestApp,
        name: &str,
        strategy: S,
        allowed: &[Code],
        call: F,
    ) where
        S: Strategy,
        S::Value: Clone + std::fmt::Debug,
        F: Fn(S::Value) -> Fut,
        Fut: Future<Output = Result<(), tonic::Status>>,
    {
        let mut runner = TestRunner::new(Config {
            cases: 40,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&strategy, |input| {
            rt.block_on(async {
                let before = rows(app).await;
                if let Err(status) = call(input.clone()).await {
                    prop_assert!(
                        allowed.contains(&status.code()),
                        "{name}: unexpected {:?}: {}",
                        status.code(),
                        status.message()
                    );
                    if status.code() == Code::InvalidArgument {
                        prop_assert!(!violated_fields(&status).is_empty(), "{name}: no field");
                    }
                    prop_assert_eq!(rows(app).await, before, "{} wrote when refused", name);
                }
                Ok(())
            })
        });
        if let Err(failure) = result {
            panic!("{name}: {failure}");
        }
    }

    #[test]
    fn malformed_gift_requests_get_clear_errors_and_write_nothing() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let app = rt.block_on(TestApp::spawn());
        let (merchant, pos) = rt.block_on(shop(&app));
        rt.block_on(async {
            create(&app, &merchant, super::gift("free-coffee")).await;
            granted(&app, &merchant, "card-1", "seed").await;
        });
        let program = rt.block_on(app.program(&merchant.admin_key));
        let checkout = rt.block_on(app.checkout(&pos));
        let member = rt.block_on(app.member(&pos));
        let write = [
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::FailedPrecondition,
        ];
        let read = [Code::InvalidArgument, Code::NotFound];

        check(&rt, &app, "CreateGift", gift(), &write, |gift| {
            let mut p = program.clone();
            async move {
                p.create_gift(pb::CreateGiftRequest { gift })
                    .await
                    .map(|_| ())
            }
        });
        check(
            &rt,
            &app,
            "UpdateGift",
            (gift(), number()),
            &write,
            |(gift, expected_version)| {
                let mut p = program.clone();
                async move {
                    p.update_gift(pb::UpdateGiftRequest {
                        gift,
                        expected_version,
                    })
                    .await
                    .map(|_| ())
                }
            },
        );
        check(
            &rt,
            &app,
            "PutGiftRule",
            (rule(), number()),
            &write,
            |(rule, expected_version)| {
                let mut p = program.clone();
                async move {
                    p.put_gift_rule(pb::PutGiftRuleRequest {
                        rule,
                        expected_version,
                    })
                    .await
                    .map(|_| ())
                }
            },
        );
        check(
            &rt,
            &app,
            "IssueGift",
            (text(), text(), text()),
            &write,
            |(external_id, gift_id, issue_key)| {
                let mut p = program.clone();
                async move {
                    p.issue_gift(pb::IssueGiftRequest {
                        external_id,
                        gift_id,
                        issue_key,
                    })
                    .await
                    .map(|_| ())
                }
            },
        );
        check(
            &rt,
            &app,
            "RedeemGift",
            (text(), text(), text()),
            &write,
            |(code, redemption_key, store_id)| {
                let mut c = checkout.clone();
                async move {
                    c.redeem_gift(pb::RedeemGiftRequest {
                        code,
                        redemption_key,
                        store_id,
                    })
                    .await
                    .map(|_| ())
                }
            },
        );
        check(
            &rt,
            &app,
            "ClaimGift",
            (
                prop_oneof![Just("card-1".to_string()), text()],
                prop_oneof![Just("free-coffee".to_string()), text()],
                text(),
            ),
            &write,
            |(external_id, gift_id, claim_key)| {
                let mut m = member.clone();
                async move {
                    m.claim_gift(pb::ClaimGiftRequest {
                        external_id,
                        gift_id,
                        claim_key,
                    })
                    .await
                    .map(|_| ())
                }
            },
        );
        check(
            &rt,
            &app,
            "ListCustomerGifts",
            (text(), any::<i32>(), text()),
            &read,
            |(external_id, page_size, page_token)| {
                let mut m = member.clone();
                async move {
                    m.list_customer_gifts(pb::ListCustomerGiftsRequest {
                        external_id,
                        page_size,
                        page_token,
                    })
                    .await
                    .map(|_| ())
                }
            },
        );
        check(
            &rt,
            &app,
            "ListGiftCatalog",
            (any::<i32>(), text()),
            &read,
            |(page_size, page_token)| {
                let mut m = member.clone();
                async move {
                    m.list_gift_catalog(pb::ListGiftCatalogRequest {
                        page_size,
                        page_token,
                    })
                    .await
                    .map(|_| ())
                }
            },
        );
        check(
            &rt,
            &app,
            "ListGifts",
            (any::<i32>(), text()),
            &read,
            |(page_size, page_token)| {
                let mut p = program.clone();
                async move {
                    p.list_gifts(pb::ListGiftsRequest {
                        page_size,
                        page_token,
                    })
                    .await
                    .map(|_| ())
                }
            },
        );
        rt.block_on(app.stop());
    }
}

/// A served process at trace level, through a whole gift flow: no code (as shown, as typed,
/// or as stored) ever reaches its logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_process_never_logs_a_gift_code() {
    use std::process::{Command, Stdio};
    use std::time::Instant;
    use tonic::transport::Channel;

    const BIN: &str = env!("CARGO_BIN_EXE_loyalty");
    let db = common::TestDb::create().await;
    let created = Command::new(BIN)
        .args(["merchant", "create", "Shop", "--currency", "EUR", "--json"])
        .env("DATABASE_URL", &db.url)
        .env("LOYALTY_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let merchant: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    let admin_key = merchant["admin_key"].as_str().unwrap().to_string();

    let port = common::cluster::free_port();
    let mut server = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            "",
        ])
        .env("DATABASE_URL", &db.url)
        .env("REDIS_URL", common::redis_url())
        .env("LOYALTY_REDIS_PREFIX", format!("test:{}", db.name))
        .env("LOYALTY_LOG_FORMAT", "json")
        .env("RUST_LOG", "trace,h2=info,hyper=info,tower=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start server");
    let output = common::DrainedOutput::of(&mut server);
    let endpoint = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let channel = loop {
        if let Ok(channel) = Channel::from_shared(endpoint.clone())
            .unwrap()
            .connect()
            .await
        {
            break channel;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "server did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let bearer = TestApp::bearer(&admin_key);
    let mut program = pb::program_service_client::ProgramServiceClient::with_interceptor(
        channel.clone(),
        bearer.clone(),
    );
    let mut checkout = pb::checkout_service_client::CheckoutServiceClient::with_interceptor(
        channel.clone(),
        bearer.clone(),
    );
    let mut member =
        pb::member_service_client::MemberServiceClient::with_interceptor(channel, bearer);
    checkout
        .record_purchase(purchase("card-1", "r-1", 1000))
        .await
        .unwrap();
    program
        .create_gift(pb::CreateGiftRequest {
            gift: Some(gift("free-coffee")),
        })
        .await
        .unwrap();
    let code = program
        .issue_gift(issue("card-1", "free-coffee", "issue-1"))
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap()
        .code;
    let listed = member
        .list_customer_gifts(pb::ListCustomerGiftsRequest {
            external_id: "card-1".into(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.grants[0].code, code);
    let typed = code.replace('-', " ").to_lowercase();
    checkout
        .redeem_gift(redeem(&typed, "till-1"))
        .await
        .unwrap();
    // Refusals too: redeemed already, and mistyped.
    checkout
        .redeem_gift(redeem(&code, "till-2"))
        .await
        .unwrap_err();
    let mut chars: Vec<char> = code.chars().collect();
    chars[0] = if chars[0] == 'A' { 'B' } else { 'A' };
    let mistyped: String = chars.into_iter().collect();
    checkout
        .redeem_gift(redeem(&mistyped, "till-3"))
        .await
        .unwrap_err();

    Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while server.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "server did not stop after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, stderr) = output.finish();
    let logs = String::from_utf8_lossy(&stderr);
    assert!(logs.contains("gift redeemed"), "the flow ran: {logs}");
    let stored = code.replace('-', "");
    let prefix = stored[..8].to_string();
    for secret in [code, typed, stored, mistyped, prefix] {
        assert!(!logs.contains(&secret), "a gift code leaked into the logs");
    }
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scope_reaches_exactly_its_gift_methods() {
    let app = TestApp::spawn().await;
    let (merchant, pos) = shop(&app).await;
    create(&app, &merchant, gift("free-coffee")).await;
    let backend = app.key(&merchant, Scope::App).await;
    let keys = [
        ("pos", pos.clone()),
        ("app", backend.clone()),
        ("scheduler", app.key(&merchant, Scope::Scheduler).await),
        ("admin", merchant.admin_key.clone()),
        ("customer", app.customer_token(&backend, "card-1").await),
    ];
    for (scope, key) in keys {
        let mut program = app.program(&key).await;
        let mut member = app.member(&key).await;
        let mut checkout = app.checkout(&key).await;
        let denied = |result: Result<(), tonic::Status>| matches!(result, Err(status) if status.code() == Code::PermissionDenied);
        let admin_only = [
            denied(
                program
                    .list_gifts(pb::ListGiftsRequest::default())
                    .await
                    .map(|_| ()),
            ),
            denied(
                program
                    .list_gift_rules(pb::ListGiftRulesRequest {})
                    .await
                    .map(|_| ()),
            ),
            denied(
                program
                    .issue_gift(issue("card-1", "free-coffee", &format!("k-{scope}")))
                    .await
                    .map(|_| ()),
            ),
            denied(
                program
                    .update_gift(pb::UpdateGiftRequest {
                        gift: Some(gift("free-coffee")),
                        expected_version: 0,
                    })
                    .await
                    .map(|_| ()),
            ),
        ];
        let reads = [
            denied(
                member
                    .list_gift_catalog(pb::ListGiftCatalogRequest::default())
                    .await
                    .map(|_| ()),
            ),
            denied(
                member
                    .list_customer_gifts(pb::ListCustomerGiftsRequest {
                        external_id: "card-1".into(),
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
            ),
        ];
        // A well-formed unknown code: NOT_FOUND for those who may redeem.
        let redeem_denied = denied(
            checkout
                .redeem_gift(redeem(&GiftCode::generate().display(), "k"))
                .await
                .map(|_| ()),
        );
        let (may_admin, may_read, may_redeem) = match scope {
            "admin" => (true, true, true),
            "pos" => (false, true, true),
            "app" | "customer" => (false, true, false),
            _ => (false, false, false),
        };
        assert_eq!(
            admin_only, [!may_admin; 4],
            "{scope}: ProgramService gift methods"
        );
        assert_eq!(reads, [!may_read; 2], "{scope}: MemberService gift reads");
        assert_eq!(redeem_denied, !may_redeem, "{scope}: RedeemGift");
    }
    app.stop().await;
}

fn claim(external_id: &str, gift_id: &str, claim_key: &str) -> pb::ClaimGiftRequest {
    pb::ClaimGiftRequest {
        external_id: external_id.into(),
        gift_id: gift_id.into(),
        claim_key: claim_key.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_claims_on_a_stock_of_five_sell_exactly_five() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let app_key = app.key(&merchant, Scope::App).await;
    let mut checkout = app.checkout(&pos).await;
    for i in 0..20 {
        checkout
            .record_purchase(purchase(&format!("card-{i}"), &format!("r-{i}"), 20_000))
            .await
            .unwrap();
    }
    create(
        &app,
        &merchant,
        pb::Gift {
            points_price: Some(150),
            stock: Some(5),
            ..gift("tote-bag")
        },
    )
    .await;
    let member = app.member(&app_key).await;
    let claims = (0..20).map(|i| {
        let mut member = member.clone();
        tokio::spawn(async move {
            member
                .claim_gift(claim(
                    &format!("card-{i}"),
                    "tote-bag",
                    &format!("claim-{i}"),
                ))
                .await
        })
    });
    let results: Vec<_> = join_all(claims)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 5);
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    }
    // The winners paid, the others kept every point.
    let paid: i64 = count(
        &app,
        "SELECT count(*) FROM accounts WHERE available = 50 AND lifetime_redeemed = 150",
    )
    .await;
    let kept: i64 = count(
        &app,
        "SELECT count(*) FROM accounts WHERE available = 200 AND lifetime_redeemed = 0",
    )
    .await;
    assert_eq!((paid, kept), (5, 15));
    assert_eq!(
        count(&app, "SELECT stock FROM gifts WHERE gift_id = 'tote-bag'").await,
        0
    );
    assert_eq!(count(&app, "SELECT count(*) FROM gift_grants").await, 5);
    app.assert_ledger_invariant().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_replays_its_answer_and_refuses_what_it_cannot_pay() {
    let app = TestApp::spawn().await;
    let (merchant, pos) = shop(&app).await; // card-1 and card-2 hold 10 points each
    create(
        &app,
        &merchant,
        pb::Gift {
            points_price: Some(4),
            ..gift("sticker")
        },
    )
    .await;
    create(
        &app,
        &merchant,
        pb::Gift {
            points_price: None,
            ..gift("not-for-points")
        },
    )
    .await;
    let mut member = app.member(&pos).await;
    let first = member
        .claim_gift(claim("card-1", "sticker", "k-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.balance.as_ref().unwrap().available, 6);
    let grant = first.grant.clone().unwrap();
    assert_eq!(grant.status, pb::GiftGrantStatus::Issued as i32);
    assert_eq!(grant.source, pb::GiftSource::Points as i32);
    // Redeemed at the till since: a replay of the claim still answers as the claim did.
    app.checkout(&pos)
        .await
        .redeem_gift(redeem(&grant.code, "till-1"))
        .await
        .unwrap();
    let replay = member
        .claim_gift(claim("card-1", "sticker", "k-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replay, first);
    let other = member
        .claim_gift(claim("card-2", "sticker", "k-1"))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists);
    let counts = app.row_counts().await;
    member
        .claim_gift(claim("card-1", "sticker", "k-2"))
        .await
        .unwrap();
    let broke = member
        .claim_gift(claim("card-1", "sticker", "k-3"))
        .await
        .unwrap_err();
    assert_eq!(broke.code(), Code::FailedPrecondition);
    assert!(
        broke.message().contains("2 available"),
        "{}",
        broke.message()
    );
    let unpriced = member
        .claim_gift(claim("card-2", "not-for-points", "k-4"))
        .await
        .unwrap_err();
    assert_eq!(unpriced.code(), Code::FailedPrecondition);
    let missing = member
        .claim_gift(claim("card-2", "no-such-gift", "k-5"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let bad = member
        .claim_gift(claim("", "sticker", ""))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&bad), ["external_id", "claim_key"]);
    // Only the second claim wrote.
    assert_ne!(app.row_counts().await, counts);
    assert_eq!(count(&app, "SELECT count(*) FROM gift_claims").await, 2);
    // A customer token reads; it does not spend.
    let token = app.customer_token(&pos, "card-2").await;
    let status = app
        .member(&token)
        .await
        .claim_gift(claim("card-2", "sticker", "k-6"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    app.assert_ledger_invariant().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purchase_answers_with_the_gifts_it_fired_and_a_full_return_revokes_them() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    create(&app, &merchant, gift("come-back-coffee")).await;
    create(&app, &merchant, gift("third-visit-cake")).await;
    let mut program = app.program(&merchant.admin_key).await;
    for (rule_id, trigger, every_n, gift_id) in [
        (
            "come-back",
            pb::GiftTrigger::FirstPurchase,
            0,
            "come-back-coffee",
        ),
        (
            "every-third",
            pb::GiftTrigger::EveryNthPurchase,
            3,
            "third-visit-cake",
        ),
    ] {
        program
            .put_gift_rule(pb::PutGiftRuleRequest {
                rule: Some(pb::GiftRule {
                    rule_id: rule_id.into(),
                    trigger: trigger as i32,
                    every_n,
                    gift_id: gift_id.into(),
                    delay_hours: 0,
                    active: true,
                    ..Default::default()
                }),
                expected_version: 0,
            })
            .await
            .unwrap();
    }
    let mut checkout = app.checkout(&pos).await;
    // A brand-new customer's first purchase fires the come-back gift.
    let request = purchase("card-9", "r-1", 1_000);
    let first = checkout
        .record_purchase(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.gifts_issued.len(), 1);
    let come_back = &first.gifts_issued[0];
    assert_eq!(come_back.gift_id, "come-back-coffee");
    assert_eq!(come_back.purchase_id, "r-1");
    assert_eq!(come_back.status, pb::GiftGrantStatus::Issued as i32);
    // A retry (the very same request: `purchase` stamps the current second) answers the
    // same, gifts included, and grants nothing more.
    let again = checkout
        .record_purchase(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, first);
    let second = checkout
        .record_purchase(purchase("card-9", "r-2", 1_000))
        .await
        .unwrap()
        .into_inner();
    assert!(second.gifts_issued.is_empty());
    let third = checkout
        .record_purchase(purchase("card-9", "r-3", 1_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(third.gifts_issued.len(), 1);
    assert_eq!(third.gifts_issued[0].gift_id, "third-visit-cake");
    assert_eq!(count(&app, "SELECT count(*) FROM gift_grants").await, 2);

    // Half of r-1 back keeps its gift; all of it revokes the gift.
    let half = checkout
        .return_purchase(pb::ReturnPurchaseRequest {
            purchase_id: "r-1".into(),
            return_id: "ret-1".into(),
            amount_minor: 500,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(half.gifts_revoked, 0);
    let rest = checkout
        .return_purchase(pb::ReturnPurchaseRequest {
            purchase_id: "r-1".into(),
            return_id: "ret-2".into(),
            amount_minor: 500,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.gifts_revoked, 1);
    let gifts = app
        .member(&pos)
        .await
        .list_customer_gifts(pb::ListCustomerGiftsRequest {
            external_id: "card-9".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .grants;
    let status_of = |gift_id: &str| {
        gifts
            .iter()
            .find(|g| g.gift_id == gift_id)
            .map(|g| g.status)
            .unwrap()
    };
    assert_eq!(
        status_of("come-back-coffee"),
        pb::GiftGrantStatus::Revoked as i32
    );
    assert_eq!(
        status_of("third-visit-cake"),
        pb::GiftGrantStatus::Issued as i32
    );
    app.assert_ledger_invariant().await;
    app.stop().await;
}
