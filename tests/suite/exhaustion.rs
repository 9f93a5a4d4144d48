//! Resource exhaustion without (or with) a key: requests whose bodies never come, floods of
//! public streams, too many connections and bodies held open. Raw HTTP/2 where a gRPC client
//! cannot misbehave enough.

use loyalty_testkit as common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::ServerProcess;
use common::{Options, TestApp};
use loyalty::Scope;
use loyalty::pb;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Requests sent on one HTTP/2 connection whose bodies are withheld: `sent` (maybe nothing)
/// goes out, the end of the body never does. Held until dropped.
struct Withheld {
    _streams: Vec<h2::SendStream<Bytes>>,
    responses: Vec<h2::client::ResponseFuture>,
}

async fn withhold_bodies(
    addr: std::net::SocketAddr,
    path: &str,
    key: Option<&str>,
    count: usize,
    sent: &[u8],
) -> Withheld {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut streams = Vec::new();
    let mut responses = Vec::new();
    for _ in 0..count {
        let mut client = client.clone().ready().await.unwrap();
        let mut request = http::Request::post(format!("http://{addr}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let (response, mut stream) = client
            .send_request(request.body(()).unwrap(), false)
            .unwrap();
        if !sent.is_empty() {
            stream
                .send_data(Bytes::copy_from_slice(sent), false)
                .unwrap();
        }
        streams.push(stream);
        responses.push(response);
    }
    Withheld {
        _streams: streams,
        responses,
    }
}

fn grpc_status(response: &http::Response<h2::RecvStream>) -> Option<&str> {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
}

/// A merchant with one customer who has bought once; returns a pos key.
async fn shop(app: &TestApp) -> String {
    let merchant = app.merchant().await;
    let key = app.key(&merchant, Scope::Pos).await;
    app.checkout(&key)
        .await
        .record_purchase(common::purchase("card-1", "p-1", 1000))
        .await
        .unwrap();
    key
}

/// Keyed GetBalance calls, each with a deadline: how many answered OK.
async fn balances_ok(app: &TestApp, key: &str, calls: usize) -> usize {
    let mut member = app.member(key).await;
    let mut ok = 0;
    for _ in 0..calls {
        let mut request = tonic::Request::new(pb::GetBalanceRequest {
            external_id: "card-1".into(),
            min_version: 0,
        });
        request.set_timeout(Duration::from_secs(2));
        match member.get_balance(request).await {
            Ok(_) => ok += 1,
            Err(status) => eprintln!("GetBalance: {status:?}"),
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_whose_bodies_never_come_cannot_starve_keyed_calls() {
    let app = TestApp::spawn_with(Options {
        max_in_flight: 8,
        max_streams_per_connection: 1000,
        queue_timeout: Duration::from_millis(50),
        ..Options::default()
    })
    .await;
    let key = shop(&app).await;

    // 300 unauthenticated health checks: headers only, the body withheld.
    let held = withhold_bodies(app.addr, "/grpc.health.v1.Health/Check", None, 300, &[]).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(balances_ok(&app, &key, 20).await, 20);

    // A health check with its body still gets its answer meanwhile.
    let mut health = HealthClient::new(app.channel().await);
    health
        .check(HealthCheckRequest::default())
        .await
        .expect("health answers");
    drop(held);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_calls_whose_bodies_never_come_hold_no_slot_and_end_at_the_deadline() {
    let app = TestApp::spawn_with(Options {
        max_in_flight: 8,
        max_streams_per_connection: 1000,
        queue_timeout: Duration::from_millis(50),
        request_timeout: Duration::from_secs(1),
        ..Options::default()
    })
    .await;
    let key = shop(&app).await;

    // The same attack with a valid key, against a unary write, with half a message sent.
    let half = [0u8, 0, 0, 0, 40, 10, 3];
    let mut held = withhold_bodies(
        app.addr,
        "/loyalty.v1.CheckoutService/RecordPurchase",
        Some(&key),
        300,
        &half,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(balances_ok(&app, &key, 20).await, 20);

    // Each withheld request ends at the server's deadline, not never.
    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(5), held.responses.remove(0))
        .await
        .expect("an answer within the deadline")
        .unwrap();
    assert_eq!(grpc_status(&response), Some("4"), "{response:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_streams_have_a_pool_of_their_own() {
    let app = TestApp::spawn_with(Options {
        streaming_probe: true,
        max_streams: 4,
        max_public_streams: 5,
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;

    let mut health = HealthClient::new(app.channel().await);
    let mut watches = Vec::new();
    for _ in 0..5 {
        let mut watch = health
            .watch(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();
        watch.message().await.unwrap().expect("a first status");
        watches.push(watch);
    }
    let refused = health
        .watch(HealthCheckRequest::default())
        .await
        .expect_err("the public pool is full");
    assert_eq!(refused.code(), Code::ResourceExhausted);

    // Keyed streams still get every slot of theirs.
    let mut probe = app.probe(&merchant.admin_key).await;
    let mut ticks = Vec::new();
    for _ in 0..4 {
        let mut stream = probe
            .ticks(common::probe::pb::TicksRequest {
                interval_ms: 20,
                count: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stream.message().await.unwrap().unwrap().seq, 0);
        ticks.push(stream);
    }
    drop(ticks);
    drop(watches);
    app.stop().await;
}

/// An HTTP/2 connection that answered one health check, or the reason it could not.
async fn connect_and_check(
    addr: std::net::SocketAddr,
) -> Result<h2::client::SendRequest<Bytes>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (client, connection) =
        tokio::time::timeout(Duration::from_secs(2), h2::client::handshake(tcp))
            .await
            .map_err(|_| "handshake timed out".to_string())?
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut ready = client.clone().ready().await.map_err(|e| e.to_string())?;
    let request = http::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = ready
        .send_request(request, false)
        .map_err(|e| e.to_string())?;
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(2), response)
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    if response.status() != 200 {
        return Err(format!("HTTP {}", response.status()));
    }
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_until_one_ends() {
    let app = TestApp::spawn_with(Options {
        max_connections: 3,
        ..Options::default()
    })
    .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(connect_and_check(app.addr).await.expect("within the limit"));
    }
    let refused = connect_and_check(app.addr).await;
    assert!(refused.is_err(), "a fourth connection must be refused");

    drop(open.pop());
    // The slot comes back once the server sees the connection end.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match connect_and_check(app.addr).await {
            Ok(_) => break,
            Err(error) if Instant::now() < deadline => {
                eprintln!("not yet: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("the freed slot never came back: {error}"),
        }
    }
    drop(open);
    app.stop().await;
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("a number");
    kb * 1024
}

/// Sixteen connections, each with ten unauthenticated health checks that send all but the last
/// bytes of a message of almost the largest size and hold them (160 MiB in all): the served
/// process buffers at most one message per connection, plus what HTTP/2 flow control lets the
/// connection send unread (1 MiB) and one frame per waiting stream (16 KiB), about 34 MiB for
/// all sixteen. Measured: 50–64 MiB with the allocator's overhead; 185 MiB without the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_held_open_cost_at_most_one_message_per_connection() {
    let db = common::TestDb::create().await;
    let mut server = ServerProcess::spawn_with(
        &db.url,
        "",
        "exhaustion",
        &[("LOYALTY_REQUEST_TIMEOUT_MS", "20000")],
    );
    server.wait_serving(Duration::from_secs(20)).await;
    let pid = server.pid().expect("running");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
    let before = rss_bytes(pid);

    const MESSAGE: usize = 1024 * 1024 - 64;
    let mut body = vec![0u8];
    body.extend_from_slice(&(MESSAGE as u32).to_be_bytes());
    body.extend(std::iter::repeat_n(8u8, MESSAGE - 1)); // all but the last byte

    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(withhold_bodies(addr, "/grpc.health.v1.Health/Check", None, 10, &body).await);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let grown = rss_bytes(pid).saturating_sub(before);
    eprintln!("RSS grew by {} MiB", grown / (1024 * 1024));
    assert!(
        grown < 80 * 1024 * 1024,
        "160 MiB held open grew the server by {} MiB",
        grown / (1024 * 1024)
    );
    drop(held);
    drop(server);
    db.drop_database().await;
}

/// One client (one address) cannot take every connection slot: beyond its own limit its
/// connections are closed, while another address still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection() {
    let app = TestApp::spawn_with(Options {
        max_connections: 10,
        max_connections_per_peer: 2,
        ..Options::default()
    })
    .await;
    let mut open = Vec::new();
    for _ in 0..2 {
        open.push(connect_and_check(app.addr).await.expect("within the limit"));
    }
    assert!(
        connect_and_check(app.addr).await.is_err(),
        "a third connection from 127.0.0.1 must be refused"
    );
    // Another loopback address is another peer.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let tcp = socket.connect(app.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.expect("another peer");
    tokio::spawn(connection);
    let mut ready = client.ready().await.unwrap();
    let request = http::Request::post(format!("http://{}/grpc.health.v1.Health/Check", app.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = ready.send_request(request, false).unwrap();
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(2), response)
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(
        grpc_status(&response),
        None,
        "answered in the trailers: {response:?}"
    );
    assert_eq!(response.status(), 200);
    drop(open);
    app.stop().await;
}
