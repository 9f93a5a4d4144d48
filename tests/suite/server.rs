//! The server around the API: health (per service, NOT_SERVING without Postgres), reflection
//! (v1 and v1alpha), Prometheus metrics, and graceful shutdown.

use loyalty_testkit as common;

use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::{Options, TestApp, purchase};
use loyalty::Scope;
use loyalty::pb;
use sqlx::Connection;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const SERVICES: [&str; 4] = [
    "",
    "loyalty.v1.CheckoutService",
    "loyalty.v1.MemberService",
    "loyalty.v1.ProgramService",
];

async fn statuses(health: &mut HealthClient<tonic::transport::Channel>) -> Vec<i32> {
    let mut out = Vec::new();
    for service in SERVICES {
        let reply = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        out.push(reply.into_inner().status);
    }
    out
}

async fn wait_for(health: &mut HealthClient<tonic::transport::Channel>, status: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if statuses(health).await == vec![status as i32; SERVICES.len()] {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health did not become {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_postgres() {
    let db_proxy = Proxy::start(common::socket_addr_of(&common::admin_database_url())).await;
    let app = TestApp::spawn_with(Options {
        database_via: Some(db_proxy.addr),
        ..Options::default()
    })
    .await;
    let mut health = HealthClient::new(app.channel().await);
    wait_for(&mut health, ServingStatus::Serving).await;

    db_proxy.cut().await;
    wait_for(&mut health, ServingStatus::NotServing).await;
    // Meanwhile an RPC that needs Postgres fails fast with UNAVAILABLE.
    // Auth itself needs Postgres for an unseen key of our shape (a malformed one is refused
    // without a lookup).
    let merchant_key = &format!("lk_{}", "u".repeat(43));
    let started = Instant::now();
    let status = app
        .member(merchant_key)
        .await
        .get_balance(pb::GetBalanceRequest {
            external_id: "x".into(),
            min_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );

    db_proxy.restore();
    wait_for(&mut health, ServingStatus::Serving).await;
    app.stop().await;
}

/// The outside run's worry: one hot customer's lock queue drains the pool, and the health
/// probe, waiting for a pooled connection like every request, turned the whole replica
/// NOT_SERVING. The probe has a connection of its own: a busy database is not a dead one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_stays_serving_while_a_hot_customer_drains_the_pool() {
    let app = TestApp::spawn_with(Options {
        db_max_connections: 4,
        db_acquire_timeout: Duration::from_millis(300),
        health_interval: Duration::from_millis(50),
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    checkout
        .record_purchase(purchase("hot", "r-0", 1000))
        .await
        .unwrap();
    let mut health = HealthClient::new(app.channel().await);
    wait_for(&mut health, ServingStatus::Serving).await;

    // Hold the hot customer's row: every purchase for them holds a pooled connection while it
    // waits, and the pool (4) is soon empty.
    let holder = app.hold_account("hot").await;
    let tills: Vec<_> = (1..=8)
        .map(|i| {
            let mut checkout = checkout.clone();
            tokio::spawn(async move {
                let mut request = tonic::Request::new(purchase("hot", &format!("r-{i}"), 1000));
                request.set_timeout(Duration::from_secs(3));
                let _ = checkout.record_purchase(request).await;
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The pool is drained: a request that needs a connection of its own fails fast...
    let drained = app
        .member(&pos)
        .await
        .get_customer(pb::GetCustomerRequest {
            external_id: "somebody-else".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(drained.code(), tonic::Code::Unavailable, "{drained:?}");
    // ...and health, probed every 50 ms meanwhile, never left SERVING.
    for _ in 0..10 {
        assert_eq!(
            statuses(&mut health).await,
            vec![ServingStatus::Serving as i32; SERVICES.len()]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    holder.commit().await.unwrap();
    for till in tills {
        till.await.unwrap();
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_in_both_versions() {
    use tonic_reflection::pb::{v1, v1alpha};
    let app = TestApp::spawn().await;
    let channel = app.channel().await;

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "loyalty.v1.CheckoutService",
        "loyalty.v1.MemberService",
        "loyalty.v1.ProgramService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "loyalty.v1.CheckoutService".into(),
            ),
        ),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    assert!(matches!(
        response.message_response,
        Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
    ));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_rpcs_by_method_and_code() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    // The retry is the very same request (`purchase` stamps the current second).
    let request = purchase("card-1", "r-1", 1000);
    checkout.record_purchase(request.clone()).await.unwrap();
    checkout.record_purchase(request).await.unwrap();
    checkout
        .record_purchase(purchase("card-1", "r-1", 2000))
        .await
        .unwrap_err();
    let mut member = app.member(&pos).await;
    member
        .get_balance(pb::GetBalanceRequest {
            external_id: "card-1".into(),
            min_version: 0,
        })
        .await
        .unwrap();
    member
        .get_balance(pb::GetBalanceRequest {
            external_id: String::new(),
            min_version: 0,
        })
        .await
        .unwrap_err();
    app.member("lk_wrong")
        .await
        .get_customer(pb::GetCustomerRequest {
            external_id: "x".into(),
        })
        .await
        .unwrap_err();

    let text = app.metrics_text().await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let count = |method: &str, code: &str| {
        common::metric_value(
            &text,
            "loyalty_rpc_requests_total",
            &[("method", method), ("code", code)],
        )
    };
    let record = "/loyalty.v1.CheckoutService/RecordPurchase";
    assert_eq!(count(record, "OK"), 2.0, "{text}");
    assert_eq!(count(record, "ALREADY_EXISTS"), 1.0);
    assert_eq!(count("/loyalty.v1.MemberService/GetBalance", "OK"), 1.0);
    assert_eq!(
        count("/loyalty.v1.MemberService/GetBalance", "INVALID_ARGUMENT"),
        1.0
    );
    assert_eq!(
        count("/loyalty.v1.MemberService/GetCustomer", "UNAUTHENTICATED"),
        1.0
    );
    let latency = common::metric_value(
        &text,
        "loyalty_rpc_duration_seconds_count",
        &[("method", record), ("code", "OK")],
    );
    assert_eq!(latency, 2.0);
    assert!(text.contains("loyalty_cache_operations_total"), "{text}");
    assert!(
        text.contains("loyalty_db_pool_connections{state=\"max\"} 16"),
        "{text}"
    );
    assert!(common::metric_value(&text, "loyalty_process_resident_memory_bytes", &[]) > 1e6);
    app.stop().await;
}

/// A request in flight when the stop signal arrives still completes; afterwards the port is
/// closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_requests_finish() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    checkout
        .record_purchase(purchase("card-1", "r-1", 1000))
        .await
        .unwrap();

    // Hold the customer's account row so the next purchase waits inside the server.
    let mut blocker = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
    let mut tx = blocker.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM accounts FOR UPDATE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let in_flight = tokio::spawn(async move {
        checkout
            .record_purchase(purchase("card-1", "r-2", 1000))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let addr = app.addr;
    let stopping = tokio::spawn(app.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!in_flight.is_finished());
    tx.rollback().await.unwrap();
    let receipt = in_flight
        .await
        .unwrap()
        .expect("the in-flight purchase completes")
        .into_inner();
    assert_eq!(receipt.balance.unwrap().available, 20);
    stopping.await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}
