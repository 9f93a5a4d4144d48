//! Reliability suite, scenario 8: resource limits. The message size cap, the per-key rate
//! limit, request deadlines and bounded concurrency each refuse work quickly, with the right
//! code, and write nothing.

use loyalty_testkit as common;

use std::time::{Duration, Instant};

use common::{Options, TestApp, purchase};
use futures::future::join_all;
use loyalty::RateLimit;
use loyalty::Scope;
use loyalty::pb;
use sqlx::Connection;
use tonic::Code;
use tonic_types::StatusExt;

fn big_purchase(lines: usize) -> pb::RecordPurchaseRequest {
    let mut request = purchase("card-1", "r-big", lines as i64 * 100);
    request.lines = (0..lines)
        .map(|i| pb::PurchaseLine {
            sku: format!("sku-{i:05}-{}", "x".repeat(40)),
            category: "coffee".into(),
            quantity: 1,
            amount_minor: 100,
        })
        .collect();
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused_and_the_server_carries_on() {
    let app = TestApp::spawn_with(Options {
        max_message_bytes: 64 * 1024,
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    let counts = app.row_counts().await;

    // 10 000 lines is about 700 KB: over the 64 KB cap.
    let status = checkout
        .record_purchase(big_purchase(10_000))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("too large"),
        "{}",
        status.message()
    );
    // Under the cap but over the line limit: a validation error instead.
    let status = checkout
        .record_purchase(big_purchase(600))
        .await
        .unwrap_err();
    assert_eq!(common::violated_fields(&status), ["lines"]);
    assert_eq!(app.row_counts().await, counts);

    // The connection and the server are fine.
    checkout
        .record_purchase(purchase("card-1", "r-1", 1000))
        .await
        .unwrap();
    let metrics = app.metrics_text().await;
    let refused = common::metric_value(
        &metrics,
        "loyalty_rpc_requests_total",
        &[
            ("method", "/loyalty.v1.CheckoutService/RecordPurchase"),
            ("code", "RESOURCE_EXHAUSTED"),
        ],
    );
    assert_eq!(refused, 1.0);
    common::report(
        "8-message-size",
        serde_json::json!({ "requests": 3, "refused_oversized": 1, "writes": 1, "violations": 0 }),
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_has_its_own_rate_limit() {
    let app = TestApp::spawn_with(Options {
        rate_limit: Some(RateLimit {
            per_second: 20,
            burst: 20,
        }),
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let busy = app.key(&merchant, Scope::App).await;
    let quiet = app.key(&merchant, Scope::App).await;
    let request = || pb::GetBalanceRequest {
        external_id: "nobody".into(),
        min_version: 0,
    };

    let mut member = app.member(&busy).await;
    let mut codes = Vec::new();
    let started = Instant::now();
    for _ in 0..60 {
        codes.push(member.get_balance(request()).await.unwrap_err());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let limited: Vec<_> = codes
        .iter()
        .filter(|s| s.code() == Code::ResourceExhausted)
        .collect();
    let served = codes.iter().filter(|s| s.code() == Code::NotFound).count();
    // The burst, plus what the bucket refilled meanwhile.
    let allowed = 20.0 + 20.0 * elapsed + 1.0;
    assert!(
        served >= 20 && (served as f64) <= allowed,
        "served {served} of 60 in {elapsed:.2} s"
    );
    assert!(!limited.is_empty(), "nothing was limited in {elapsed:.2} s");
    assert_eq!(limited.len() + served, 60);
    let retry = limited[0]
        .get_details_retry_info()
        .expect("RetryInfo detail");
    assert!(retry.retry_delay.unwrap() <= Duration::from_millis(60));

    // Another key of the same merchant is not affected.
    let status = app
        .member(&quiet)
        .await
        .get_balance(request())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // And the busy key recovers as its bucket refills.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        member.get_balance(request()).await.unwrap_err().code(),
        Code::NotFound
    );
    common::report(
        "8-rate-limit",
        serde_json::json!({
            "requests": 62,
            "limited": limited.len(),
            "served": served,
            "limit_rps": 20,
            "violations": 0,
        }),
    );
    app.stop().await;
}

/// Holds every account row so purchases wait inside the server.
async fn lock_accounts(app: &TestApp) -> (sqlx::PgConnection, tokio::sync::oneshot::Sender<()>) {
    let mut conn = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
    sqlx::query("SELECT 1 FROM accounts FOR UPDATE")
        .execute(&mut conn)
        .await
        .unwrap();
    let (release, _) = tokio::sync::oneshot::channel();
    (conn, release)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_are_honoured_and_a_retry_applies_once() {
    let app = TestApp::spawn_with(Options {
        request_timeout: Duration::from_millis(400),
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    checkout
        .record_purchase(purchase("card-1", "r-0", 1000))
        .await
        .unwrap();

    let (mut blocker, _release) = lock_accounts(&app).await;
    let first = purchase("card-1", "r-1", 1000);
    let second = purchase("card-1", "r-2", 1000);
    // The client's deadline (150 ms) is shorter than the server's cap. tonic's client also
    // enforces it and may answer first (CANCELLED "Timeout expired"); the server-side metric
    // below proves the server gave up too.
    let mut request = tonic::Request::new(first.clone());
    request.set_timeout(Duration::from_millis(150));
    let started = Instant::now();
    let status = checkout.record_purchase(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    // No client deadline: the server's cap (400 ms) applies.
    let started = Instant::now();
    let status = checkout.record_purchase(second.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(380) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let metrics = app.metrics_text().await;
        let count = |code| {
            common::metric_value(
                &metrics,
                "loyalty_rpc_requests_total",
                &[
                    ("method", "/loyalty.v1.CheckoutService/RecordPurchase"),
                    ("code", code),
                ],
            )
        };
        // The server gave up on both: on its own deadline, or (when tonic's client timer fired
        // first and reset the stream) because the client cancelled.
        let server_side = count("DEADLINE_EXCEEDED") + count("CANCELLED");
        if server_side == 2.0 && count("DEADLINE_EXCEEDED") >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server-side deadline count {server_side}:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    // The till retries with the same receipts: each earns exactly once, whatever happened to
    // the abandoned attempts.
    for request in [&first, &second, &first, &second] {
        let receipt = checkout
            .record_purchase(request.clone())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(receipt.points_earned, 10);
    }
    let entries: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE reference IN ('r-1', 'r-2')")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(entries, 2);
    app.assert_ledger_invariant().await;
    common::report(
        "8-deadlines",
        serde_json::json!({
            "requests": 7,
            "deadline_exceeded": 2,
            "retries_applied_once": 2,
            "violations": 0,
        }),
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_quickly_instead_of_queueing() {
    let app = TestApp::spawn_with(Options {
        max_in_flight: 2,
        queue_timeout: Duration::from_millis(100),
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let checkout = app.checkout(&pos).await;
    checkout
        .clone()
        .record_purchase(purchase("card-1", "r-0", 1000))
        .await
        .unwrap();

    let (mut blocker, _release) = lock_accounts(&app).await;
    let counts = app.row_counts().await;
    let calls = (0..20).map(|i| {
        let mut client = checkout.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = client
                .record_purchase(purchase("card-1", &format!("r-{}", i + 1), 1000))
                .await;
            (result.map(|_| ()).map_err(|s| s.code()), started.elapsed())
        })
    });
    let calls: Vec<_> = calls.collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    // While two requests hold the only slots, everyone else has been turned away already.
    let finished = calls.iter().filter(|c| c.is_finished()).count();
    assert_eq!(finished, 18, "the others should have been shed");
    assert_eq!(app.row_counts().await, counts);
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    let results: Vec<_> = join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let ok = results.iter().filter(|(r, _)| r.is_ok()).count();
    let shed: Vec<_> = results
        .iter()
        .filter(|(r, _)| *r == Err(Code::ResourceExhausted))
        .collect();
    assert_eq!((ok, shed.len()), (2, 18), "{results:?}");
    assert!(
        shed.iter()
            .all(|(_, took)| *took < Duration::from_millis(600)),
        "{shed:?}"
    );
    app.assert_ledger_invariant().await;
    let slowest_shed = shed
        .iter()
        .map(|(_, took)| took.as_millis())
        .max()
        .unwrap_or(0);
    common::report(
        "8-overload",
        serde_json::json!({
            "requests": 20,
            "max_in_flight": 2,
            "served": ok,
            "shed": shed.len(),
            "slowest_shed_ms": slowest_shed,
            "violations": 0,
        }),
    );
    app.stop().await;
}
