//! CheckoutService through the real gRPC client: earning, idempotent retries (sequential and
//! concurrent), conflicting reuse of a purchase id, quotes.

use loyalty_testkit as common;

use common::{TestApp, purchase};
use futures::future::join_all;
use loyalty::Scope;
use loyalty::pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purchase_earns_points_and_returns_the_new_balance() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;

    let first = checkout
        .record_purchase(purchase("card-1", "r-1", 1234))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.purchase_id, "r-1");
    assert_eq!(first.external_id, "card-1");
    assert_eq!(first.points_earned, 12);
    assert_eq!(first.purchase_count, 1);
    let balance = first.balance.unwrap();
    assert_eq!(
        (balance.available, balance.pending, balance.lifetime_earned),
        (12, 0, 12)
    );
    assert_eq!(balance.version, 1);

    let second = checkout
        .record_purchase(purchase("card-1", "r-2", 999))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.points_earned, 9);
    assert_eq!(second.purchase_count, 2);
    let balance = second.balance.unwrap();
    assert_eq!(
        (balance.available, balance.lifetime_earned, balance.version),
        (21, 21, 2)
    );

    // The customer was enrolled by their first purchase.
    let mut member = app.member(&pos).await;
    let customer = member
        .get_customer(pb::GetCustomerRequest {
            external_id: "card-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap();
    assert_eq!(customer.external_id, "card-1");
    assert_eq!(customer.time_zone, "UTC");

    let read = member
        .get_balance(pb::GetBalanceRequest {
            external_id: "card-1".into(),
            min_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.balance.unwrap().available, 21);
    assert_eq!(read.purchase_count, 2);

    let lines: i64 = sqlx::query_scalar("SELECT count(*) FROM purchase_lines")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(lines, 4);
    app.assert_ledger_invariant().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sequential_replays_return_the_identical_response_and_write_nothing() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;

    let request = purchase("card-1", "r-1", 5000);
    let original = checkout
        .record_purchase(request.clone())
        .await
        .unwrap()
        .into_inner();
    // A later purchase moves the balance on; replays must still answer as the original did.
    checkout
        .record_purchase(purchase("card-1", "r-2", 1000))
        .await
        .unwrap();
    let counts = app.row_counts().await;

    for _ in 0..5 {
        let replay = checkout
            .record_purchase(request.clone())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(replay, original);
    }
    assert_eq!(app.row_counts().await, counts);
    let entries: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE reference = 'r-1'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(entries, 1);
    app.stop().await;
}

/// 50 copies of one request in flight at once, over several connections, for a customer who
/// is new (enrolled by the purchase) and for one who exists: one effect each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_replays_earn_exactly_once() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(app.checkout(&pos).await);
    }
    app.checkout(&pos)
        .await
        .record_purchase(purchase("existing", "warm-up", 100))
        .await
        .unwrap();

    for (customer, purchase_id) in [("new-customer", "r-new"), ("existing", "r-existing")] {
        let request = purchase(customer, purchase_id, 4200);
        let calls = (0..50).map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let request = request.clone();
            tokio::spawn(async move {
                client
                    .record_purchase(request)
                    .await
                    .map(|r| r.into_inner())
            })
        });
        let responses: Vec<_> = join_all(calls)
            .await
            .into_iter()
            .map(|r| r.unwrap().unwrap())
            .collect();
        assert!(
            responses.iter().all(|r| *r == responses[0]),
            "responses differ: {responses:?}"
        );
        assert_eq!(responses[0].points_earned, 42);

        let (entries, points): (i64, Option<i64>) = sqlx::query_as(
            "SELECT count(*), sum(points)::bigint FROM ledger_entries WHERE reference = $1",
        )
        .bind(purchase_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!((entries, points), (1, Some(42)), "{customer}");
    }
    let customers: i64 = sqlx::query_scalar("SELECT count(*) FROM customers")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(customers, 2);
    let balance = app
        .member(&pos)
        .await
        .get_balance(pb::GetBalanceRequest {
            external_id: "existing".into(),
            min_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(balance.balance.unwrap().available, 43);
    assert_eq!(balance.purchase_count, 2);
    app.assert_ledger_invariant().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reusing_a_purchase_id_for_other_content_is_already_exists_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    checkout
        .record_purchase(purchase("card-1", "r-1", 1000))
        .await
        .unwrap();
    let counts = app.row_counts().await;

    let different_total = purchase("card-1", "r-1", 1001);
    let mut other_store = purchase("card-1", "r-1", 1000);
    other_store.store_id = "store-2".into();
    // A different customer must not even be enrolled.
    let other_customer = purchase("card-2", "r-1", 1000);
    for request in [different_total, other_store, other_customer] {
        let status = checkout.record_purchase(request).await.unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        assert!(status.message().contains("r-1"), "{}", status.message());
    }
    assert_eq!(app.row_counts().await, counts);

    // Concurrent conflicting first attempts: exactly one wins, the others are refused.
    let calls = (0..20).map(|i| {
        let mut client = checkout.clone();
        tokio::spawn(async move {
            client
                .record_purchase(purchase("card-3", "r-race", 100 + i))
                .await
        })
    });
    let results: Vec<_> = join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|s| s.code() == Code::AlreadyExists)
    );
    app.assert_ledger_invariant().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quote_matches_the_recorded_points_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    let counts = app.row_counts().await;

    let basket = purchase("card-1", "r-1", 2599);
    let quote = checkout
        .quote_purchase(pb::QuotePurchaseRequest {
            external_id: basket.external_id.clone(),
            store_id: basket.store_id.clone(),
            occurred_at: None,
            currency: basket.currency.clone(),
            total_minor: basket.total_minor,
            lines: basket.lines.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((quote.points, quote.eligible), (25, true));
    assert_eq!(app.row_counts().await, counts);

    let recorded = checkout.record_purchase(basket).await.unwrap().into_inner();
    assert_eq!(recorded.points_earned, quote.points);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purchase_in_another_currency_is_refused() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    let counts = app.row_counts().await;
    let mut request = purchase("card-1", "r-1", 1000);
    request.currency = "USD".into();
    let status = checkout.record_purchase(request).await.unwrap_err();
    assert_eq!(common::violated_fields(&status), ["currency"]);
    assert_eq!(app.row_counts().await, counts);
    app.stop().await;
}
