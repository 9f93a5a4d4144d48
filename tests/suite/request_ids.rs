//! Request ids: every answer carries one (the caller's `x-request-id`, or a fresh one), and the
//! log lines of a request carry it with the merchant, so a till's complaint can be found in the
//! server's log.

use loyalty_testkit as common;

use std::time::Duration;

use common::cluster::ServerProcess;
use common::{TestApp, TestDb};
use loyalty::{Store, pb};
use tonic::Code;
use tonic::transport::Channel;

const REQUEST_ID: &str = "x-request-id";

fn balance_of(
    external_id: &str,
    request_id: Option<&str>,
) -> tonic::Request<pb::GetBalanceRequest> {
    let mut request = tonic::Request::new(pb::GetBalanceRequest {
        external_id: external_id.into(),
        min_version: 0,
    });
    if let Some(id) = request_id {
        request
            .metadata_mut()
            .insert(REQUEST_ID, id.parse().unwrap());
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_a_request_id() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let mut member = app.member(&merchant.admin_key).await;

    // The caller's id comes back, on a failure ...
    let status = member
        .get_balance(balance_of("nobody", Some("till-7:r-42")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.metadata().get(REQUEST_ID).unwrap(), "till-7:r-42");

    // ... and on a success.
    app.checkout(&merchant.admin_key)
        .await
        .record_purchase(common::purchase("card-1", "r-1", 1000))
        .await
        .unwrap();
    let response = member
        .get_balance(balance_of("card-1", Some("till-7:r-43")))
        .await
        .unwrap();
    assert_eq!(response.metadata().get(REQUEST_ID).unwrap(), "till-7:r-43");

    // Without one (or with one unfit to echo), the server makes one up.
    let mut ids = Vec::new();
    for sent in [None, Some("has space")] {
        let response = member
            .get_balance(balance_of("card-1", sent))
            .await
            .unwrap();
        let id = response
            .metadata()
            .get(REQUEST_ID)
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(id.len(), 16, "{id}");
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        ids.push(id.to_string());
    }
    assert_ne!(ids[0], ids[1]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_request_is_logged_with_its_request_id_and_merchant() {
    let db = TestDb::create().await;
    let store = Store::from_pool(db.pool().await);
    let (merchant, admin) = loyalty::create_merchant(&store, "Shop", "EUR")
        .await
        .unwrap();
    let mut server = ServerProcess::spawn_with(
        &db.url,
        &common::redis_url(),
        &format!("test:{}", db.name),
        &[("RUST_LOG", "info,loyalty=debug")],
    );
    server.wait_serving(Duration::from_secs(20)).await;

    let channel = Channel::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut member = pb::member_service_client::MemberServiceClient::new(channel);
    let mut request = balance_of("card-unknown", Some("req-5f1d-failing"));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", admin.secret.expose()).parse().unwrap(),
    );
    let status = member.get_balance(request).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    server.kill9();

    let logs = server.log();
    let line = logs
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["span"]["request_id"] == "req-5f1d-failing")
        .unwrap_or_else(|| panic!("no log line with the request id:\n{logs}"));
    assert_eq!(line["message"], "request failed", "{line}");
    assert_eq!(line["code"], "NOT_FOUND", "{line}");
    assert_eq!(line["span"]["merchant"], merchant.0, "{line}");
    assert_eq!(
        line["span"]["method"], "/loyalty.v1.MemberService/GetBalance",
        "{line}"
    );
    drop(store);
    db.drop_database().await;
}

/// A PostgreSQL outage under load fails every request the same way; the log must tell the
/// story in a few lines, not one line (or three) per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_under_load_writes_a_bounded_number_of_log_lines() {
    const REQUESTS: usize = 2_000;
    let db = TestDb::create().await;
    let store = Store::from_pool(db.pool().await);
    let (_, admin) = loyalty::create_merchant(&store, "Shop", "EUR")
        .await
        .unwrap();
    let proxy = common::proxy::Proxy::start(common::socket_addr_of(&db.url)).await;
    let mut server = ServerProcess::spawn_with(
        &common::with_host(&db.url, proxy.addr),
        &common::redis_url(),
        &format!("test:{}", db.name),
        &[
            ("RUST_LOG", "info"),
            ("LOYALTY_DB_ACQUIRE_TIMEOUT_MS", "20"),
            ("LOYALTY_KEY_CACHE_TTL_MS", "600000"),
        ],
    );
    server.wait_serving(Duration::from_secs(20)).await;
    let channel = Channel::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", admin.secret.expose()).parse().unwrap();
    let member = pb::member_service_client::MemberServiceClient::with_interceptor(
        channel,
        move |mut request: tonic::Request<()>| {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
            Ok(request)
        },
    );
    // The key is verified (and cached) while PostgreSQL is up. With a 20 ms acquire timeout
    // a request can still find the pool busy with the start-up passes of the background jobs
    // (sequencer, sweeps, greetings): UNAVAILABLE, as promised for a busy pool; ask again.
    let mut status = None;
    for _ in 0..50 {
        let code = member
            .clone()
            .get_balance(balance_of("nobody", None))
            .await
            .unwrap_err()
            .code();
        status = Some(code);
        if code != Code::Unavailable {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, Some(Code::NotFound));
    let logged_before = server.log().lines().count();

    proxy.cut().await;
    let mut lanes = Vec::new();
    for lane in 0..32 {
        let mut member = member.clone();
        lanes.push(tokio::spawn(async move {
            let mut unavailable = 0;
            for i in (lane..REQUESTS).step_by(32) {
                let external_id = format!("card-{i}");
                match member.get_balance(balance_of(&external_id, None)).await {
                    Err(status) if status.code() == Code::Unavailable => unavailable += 1,
                    other => panic!("expected UNAVAILABLE during the outage, got {other:?}"),
                }
            }
            unavailable
        }));
    }
    let mut unavailable = 0;
    for lane in lanes {
        unavailable += lane.await.unwrap();
    }
    assert_eq!(unavailable, REQUESTS);
    server.kill9();

    let logs = server.log();
    let outage: Vec<serde_json::Value> = logs
        .lines()
        .skip(logged_before)
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let count = |message: &str| outage.iter().filter(|l| l["message"] == message).count();
    // The throttle's budget: 10 "database unavailable" lines a minute; the failed requests
    // themselves are logged at debug level only.
    assert!(count("database unavailable") >= 1, "{logs}");
    assert!(count("database unavailable") <= 10, "{logs}");
    assert!(
        outage.len() <= 100,
        "{} lines for {REQUESTS} failed requests:\n{logs}",
        outage.len()
    );
    drop(proxy);
    drop(store);
    db.drop_database().await;
}
